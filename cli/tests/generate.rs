//! `x2v generate` end to end: the real binary on the tiny Wan2.1 T2V model directory of
//! `tools/fixtures/wan_pipeline.py`, compared with the frames diffusers' `WanPipeline` produced;
//! plus the argument checks.

use std::process::{Command, Output};

use tch::{Kind, Tensor};
use x2v_models::testing::{
    self as common, PipelineSettings as Settings, assert_frames_match, pipeline_settings,
};

fn x2v(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_x2v")).arg("generate").args(args).output().expect("x2v runs")
}

/// A valid T2V command line for the fixture, with `--out` set to `out`.
fn t2v_args(out: &str) -> (Vec<String>, Settings) {
    task_args("t2v", out)
}

/// A valid command line for the fixture's `task` (`t2v` or `i2v`), with `--out` set to `out`.
fn task_args(task: &str, out: &str) -> (Vec<String>, Settings) {
    let fx = common::fixture("wan_pipeline");
    let s = pipeline_settings(&fx, task);
    let mut args = vec![
        ("--model-dir", fx.join(task).display().to_string()),
        ("--task", task.into()),
        ("--prompt", s.prompt.clone()),
        ("--negative-prompt", s.negative_prompt.clone()),
        ("--size", format!("{}x{}", s.width, s.height)),
        ("--frames", s.frames.to_string()),
        ("--steps", s.steps.to_string()),
        ("--guidance", s.guidance_scale.to_string()),
        ("--shift", s.shift.to_string()),
        ("--seed", s.seed.to_string()),
        ("--out", out.into()),
    ];
    if task == "i2v" {
        args.push(("--image", fx.join("image.png").display().to_string()));
    }
    (args.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect(), s)
}

/// Replaces the value of `flag` (or appends the pair).
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.into(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

#[test]
fn t2v_npy_matches_wan_pipeline_frames() {
    npy_matches_reference("t2v");
}

/// The first frame is read from `image.png` with the `image` crate.
#[test]
fn i2v_npy_matches_wan_image_to_video_pipeline_frames() {
    npy_matches_reference("i2v");
}

fn npy_matches_reference(task: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("video.npy");
    let (args, s) = task_args(task, out.to_str().unwrap());
    let o = x2v(&args);
    assert!(o.status.success(), "x2v generate failed: {}", String::from_utf8_lossy(&o.stderr));
    let got = Tensor::read_npy(&out).unwrap();
    assert_eq!(got.kind(), Kind::Uint8);
    assert_eq!(got.size(), [s.frames, s.height, s.width, 3]);
    let fx = common::fixture("wan_pipeline");
    let want = &common::tensors(&fx.join(format!("{task}.safetensors")))["frames_u8"];
    assert_frames_match(&format!("x2v generate {task}"), &got, want);
}

#[test]
fn bad_arguments_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("v.npy");
    let (args, _) = t2v_args(out.to_str().unwrap());
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (with(args.clone(), "--frames", "6"), &["--frames 6", "4k+1"]),
        (with(args.clone(), "--size", "60x64"), &["--size 60x64", "width 60", "multiple of 16"]),
        (with(args.clone(), "--size", "64by64"), &["--size", "`64by64`"]),
        (with(args.clone(), "--out", "v.gif"), &["v.gif", "must be a .mp4 or .npy"]),
        (with(args.clone(), "--fps", "0"), &["--fps", "got 0"]),
        (with(args.clone(), "--task", "x2v"), &["unknown task `x2v`"]),
        (with(args.clone(), "--task", "i2v"), &["--task i2v needs --image"]),
        (with(args.clone(), "--image", "first.png"), &["--image first.png", "--task i2v"]),
        (with(args.clone(), "--model-dir", "/nonexistent/wan"), &["/nonexistent/wan"]),
        (
            with(with(args.clone(), "--task", "i2v"), "--image", "/nonexistent/first.png"),
            &["--image /nonexistent/first.png"],
        ),
    ];
    for (case, needles) in cases {
        let o = x2v(&case);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{case:?} succeeded");
        for n in needles {
            assert!(err.contains(n), "{case:?}: stderr lacks {n:?}:\n{err}");
        }
    }
    assert!(!out.exists(), "no output is written for bad arguments");
}

#[test]
fn mp4_output_is_h264_of_the_same_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let (npy, mp4) = (tmp.path().join("v.npy"), tmp.path().join("v.mp4"));
    let (args, s) = t2v_args(npy.to_str().unwrap());
    assert!(x2v(&args).status.success());
    let mp4_args = with(with(args, "--out", mp4.to_str().unwrap()), "--fps", "8");
    let o = x2v(&mp4_args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let probe = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_streams", "-of", "json"])
        .arg(&mp4)
        .output()
        .expect("ffprobe is installed (make setup)");
    let v: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    let st = &v["streams"][0];
    assert_eq!(st["codec_name"], "h264", "{v:#}");
    assert_eq!((st["width"].as_i64(), st["height"].as_i64()), (Some(s.width), Some(s.height)));
    assert_eq!(st["nb_read_frames"].as_str(), Some(s.frames.to_string().as_str()));
    assert_eq!(st["r_frame_rate"], "8/1");

    // The MP4 decodes back to the lossless frames within H.264's loss.
    let raw = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&mp4)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap()
        .stdout;
    let want = Vec::<u8>::try_from(&Tensor::read_npy(&npy).unwrap().view([-1])).unwrap();
    assert_eq!(raw.len(), want.len());
    let mse =
        raw.iter().zip(&want).map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum::<f64>()
            / want.len() as f64;
    let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10();
    assert!(psnr > 25.0, "PSNR of the MP4 against the lossless frames: {psnr:.1} dB");
}
