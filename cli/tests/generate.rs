//! `x2v generate` end to end: the real binary on the tiny Wan2.1 T2V model directory of
//! `tools/fixtures/wan_pipeline.py`, compared with the frames diffusers' `WanPipeline` produced;
//! plus the argument checks.

use std::path::Path;
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
    let image = (task == "i2v").then(|| fx.join("image.png"));
    (args_for(&fx.join(task), task, &s, image.as_deref(), out), s)
}

/// `x2v generate` on `model` for `task` with the settings `s` (and a first frame), writing `out`.
fn args_for(
    model: &Path,
    task: &str,
    s: &Settings,
    image: Option<&Path>,
    out: &str,
) -> Vec<String> {
    let mut args = vec![
        ("--model-dir", model.display().to_string()),
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
    if let Some(image) = image {
        args.push(("--image", image.display().to_string()));
    }
    args.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect()
}

/// Replaces the value of `flag` (or appends the pair).
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.into(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

/// Each command line is refused before anything loads (exit 2), its error naming every needle.
#[track_caller]
fn assert_refused(cases: Vec<(Vec<String>, &[&str])>) {
    for (case, needles) in cases {
        let o = x2v(&case);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{case:?} succeeded");
        assert_eq!(o.status.code(), Some(2), "{case:?}: bad arguments exit 2:\n{err}");
        for n in needles {
            assert!(err.contains(n), "{case:?}: stderr lacks {n:?}:\n{err}");
        }
    }
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
        (with(args.clone(), "--task", "v2v"), &["--task v2v needs --video"]),
        (with(args.clone(), "--video", "in.mp4"), &["--video in.mp4", "--task v2v"]),
        (
            with(with(args.clone(), "--task", "v2v"), "--video", "/nonexistent/in.mp4"),
            &["--video /nonexistent/in.mp4"],
        ),
        (
            with(with(args.clone(), "--task", "v2v"), "--video", "Cargo.toml"),
            &["--video Cargo.toml", "MP4"],
        ),
        (
            with(with(args.clone(), "--sampler", "step-distill"), "--steps", "8"),
            &["--steps 8", "--sampler step-distill", "(4)"],
        ),
        (
            with(with(args.clone(), "--sampler", "step-distill"), "--denoising-steps", "500,750"),
            &["--denoising-steps", "descending"],
        ),
        (
            with(with(args.clone(), "--task", "i2v"), "--image", "/nonexistent/first.png"),
            &["--image /nonexistent/first.png"],
        ),
    ];
    assert_refused(cases);
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

/// The Qwen-Image command line of fixture case `case` (`t2i`, `edit` or `edit_plus` of
/// `tools/fixtures/qwen_pipeline.py`), writing `out`.
fn qwen_args(case: &str, out: &str) -> (Vec<String>, serde_json::Value) {
    let fx = common::fixture("qwen_pipeline");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let s = |k: &str| c[k].as_str().map(String::from).unwrap_or_else(|| c[k].to_string());
    let mut args = vec![
        ("--model-dir", fx.join(case).display().to_string()),
        ("--task", if case == "t2i" { "t2i".into() } else { "edit".into() }),
        ("--prompt", s("prompt")),
        ("--negative-prompt", s("negative_prompt")),
        ("--size", format!("{}x{}", s("width"), s("height"))),
        ("--steps", s("steps")),
        ("--guidance", s("true_cfg_scale")),
        ("--seed", s("seed")),
        ("--out", out.into()),
    ];
    match case {
        "edit" => args.push(("--image", fx.join("edit_image.png").display().to_string())),
        "edit_plus" => {
            for i in 0..c["num_images"].as_u64().unwrap() {
                args.push((
                    "--image",
                    fx.join(format!("edit_plus_image_{i}.png")).display().to_string(),
                ));
            }
        }
        _ => {}
    }
    (args.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect(), c)
}

fn qwen_npy_matches_reference(case: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("image.npy");
    let (args, c) = qwen_args(case, out.to_str().unwrap());
    let o = x2v(&args);
    assert!(o.status.success(), "x2v generate failed: {}", String::from_utf8_lossy(&o.stderr));
    let got = Tensor::read_npy(&out).unwrap();
    assert_eq!(got.kind(), Kind::Uint8);
    assert_eq!(got.size(), [c["height"].as_i64().unwrap(), c["width"].as_i64().unwrap(), 3]);
    let fx = common::fixture("qwen_pipeline");
    let want = common::tensors(&fx.join(format!("{case}.safetensors")))["image_u8"].get(0);
    assert_frames_match(&format!("x2v generate {case}"), &got, &want);
}

#[test]
fn t2i_npy_matches_qwen_image_pipeline() {
    qwen_npy_matches_reference("t2i");
}

/// Two input images (Qwen-Image-Edit-2509 layout), read from PNG files.
#[test]
fn edit_with_two_images_npy_matches_qwen_image_edit_plus_pipeline() {
    qwen_npy_matches_reference("edit_plus");
}

#[test]
fn t2i_png_holds_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (npy, png) = (tmp.path().join("i.npy"), tmp.path().join("i.png"));
    let (args, _) = qwen_args("t2i", npy.to_str().unwrap());
    assert!(x2v(&args).status.success());
    let o = x2v(&with(args, "--out", png.to_str().unwrap()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let decoded = image::open(&png).unwrap().to_rgb8();
    let want = Vec::<u8>::try_from(&Tensor::read_npy(&npy).unwrap().view([-1])).unwrap();
    assert_eq!(decoded.into_raw(), want, "PNG is lossless");
}

#[test]
fn bad_image_arguments_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("i.npy");
    let (t2i, _) = qwen_args("t2i", out.to_str().unwrap());
    let (edit, _) = qwen_args("edit", out.to_str().unwrap());
    let fx = common::fixture("qwen_pipeline");
    let edit_dir = fx.join("edit").display().to_string();
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (with(t2i.clone(), "--out", "i.gif"), &["i.gif", ".png or .npy"]),
        (with(t2i.clone(), "--size", "8x64"), &["--size 8x64", "width 8"]),
        (with(t2i.clone(), "--steps", "0"), &["--steps", "got 0"]),
        (with(t2i.clone(), "--guidance", "NaN"), &["--guidance", "finite"]),
        (with(t2i.clone(), "--image", "a.png"), &["--image a.png", "--task edit"]),
        (with(t2i.clone(), "--task", "edit"), &["QwenImagePipeline", "--task edit"]),
        (with(t2i.clone(), "--model-dir", "/nonexistent/qwen"), &["/nonexistent/qwen"]),
        (with(edit.clone(), "--image", "/nonexistent/a.png"), &["--image /nonexistent/a.png"]),
        (
            [with(edit.clone(), "--model-dir", &edit_dir), vec!["--image".into(), "b.png".into()]]
                .concat(),
            &["QwenImageEditPipeline takes at most 1 --image, got 2"],
        ),
    ];
    assert_refused(cases);
    assert!(!out.exists(), "no output is written for bad arguments");
}

/// `--task ti2v` on a Wan2.2 TI2V-5B model: text and a first frame, as diffusers'
/// `WanImageToVideoPipeline` with `expand_timesteps`; the arguments are checked against the model.
#[test]
fn ti2v_npy_matches_the_image_to_video_reference() {
    let fx = common::fixture("wan_ti2v");
    let s = pipeline_settings(&fx, "i2v");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("video.npy");
    let image = fx.join("image.png");
    let args = args_for(&fx.join("ti2v"), "ti2v", &s, Some(&image), out.to_str().unwrap());
    let o = x2v(&args);
    assert!(o.status.success(), "x2v generate failed: {}", String::from_utf8_lossy(&o.stderr));
    let want = &common::tensors(&fx.join("i2v.safetensors"))["frames_u8"];
    assert_frames_match("x2v generate ti2v", &Tensor::read_npy(&out).unwrap(), want);

    let wan21 = common::fixture("wan_pipeline").join("t2v").display().to_string();
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (with(args.clone(), "--size", "64x48"), &["--size 64x48", "multiple of 32"]),
        (with(args.clone(), "--model-dir", &wan21), &["--task ti2v needs a Wan2.2 TI2V-5B"]),
    ];
    assert_refused(cases);
}
