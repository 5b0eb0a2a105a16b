//! The Qwen-Image demo models written from Rust: x2v's three stage loaders accept both variants
//! strictly, a short encode → denoise → decode run gives a varied image of the requested size
//! (text to image, and an edit), one seed always writes the same bytes, and
//! diffusers' pipelines load the directories and give the same images.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use x2v_models::qwen_image::demo::{DemoOptions, EDIT_DIR, T2I_DIR, write_demo_models};
use x2v_models::qwen_image::pipeline::{
    DenoiseSettings, ModelDir, QwenDecoder, QwenEncoder, Variant, denoise, load_transformer,
};
use x2v_models::qwen_image::resize::RgbImage;
use x2v_models::schedulers::FlowMatchDynamicConfig;

const PROMPT: &str = "A red fox walks on the grass at sunset.";

/// Generation settings of one case of `tools/fixtures/qwen_demo.py` (`<case>.json`).
#[derive(Debug, serde::Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: String,
    height: i64,
    width: i64,
    steps: usize,
    true_cfg_scale: f64,
    seed: u64,
}

impl Case {
    /// A 4-step image of [`PROMPT`] (true CFG 4, the default negative prompt).
    fn new((width, height): (i64, i64), steps: usize) -> Self {
        let (prompt, negative_prompt) = (PROMPT.into(), " ".into());
        Case { prompt, negative_prompt, height, width, steps, true_cfg_scale: 4.0, seed: 3 }
    }
}

/// Runs the three stages on `dir` and returns `uint8 [H, W, 3]`.
fn generate(dir: &Path, images: &[RgbImage], case: &Case) -> Tensor {
    let started = Instant::now();
    let encoder = QwenEncoder::load(dir, Device::Cpu, Kind::Float).unwrap();
    let phase1 = encoder
        .encode(
            &case.prompt,
            Some(&case.negative_prompt),
            images,
            Some((case.width, case.height)),
            case.true_cfg_scale,
        )
        .unwrap();
    let dit = load_transformer(dir, Device::Cpu, Kind::Float).unwrap();
    let settings = DenoiseSettings::single(
        case.steps,
        case.true_cfg_scale,
        case.seed,
        FlowMatchDynamicConfig::from_dir(&dir.join("scheduler")).unwrap(),
    );
    let phase2 = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap();
    let decoder = QwenDecoder::load(dir, Device::Cpu, Kind::Float).unwrap();
    assert!(encoder.parameter_bytes() > 0 && decoder.parameter_bytes() > 0);
    let image = decoder.decode(&phase2).unwrap().get(0);
    eprintln!("{}: {:.2} s", dir.display(), started.elapsed().as_secs_f64());
    image
}

#[track_caller]
fn assert_varied(image: &Tensor, (width, height): (i64, i64)) {
    assert_eq!(image.size(), [height, width, 3]);
    assert_eq!(image.kind(), Kind::Uint8);
    let f = image.to_kind(Kind::Double);
    let std = f.std(true).double_value(&[]);
    let (lo, hi) = (f.min().double_value(&[]), f.max().double_value(&[]));
    eprintln!("image: std {std:.1}, range [{lo}, {hi}]");
    assert!(std > 5.0 && hi - lo > 50.0, "image is nearly constant: std {std}, range [{lo}, {hi}]");
}

/// An RGB test picture of diagonal stripes.
fn picture(width: usize, height: usize) -> RgbImage {
    let data = (0..height * width * 3)
        .map(|i| {
            let (y, x, c) = (i / (width * 3), i / 3 % width, i % 3);
            ((x * 255 / width + y * 128 / height + c * 80) % 256) as u8
        })
        .collect();
    RgbImage::new(width, height, data).unwrap()
}

#[test]
fn both_variants_run_through_the_three_stages() {
    let tmp = tempfile::tempdir().unwrap();
    write_demo_models(tmp.path(), &DemoOptions { seed: 0 }).unwrap();
    let (t2i, edit) = (tmp.path().join(T2I_DIR), tmp.path().join(EDIT_DIR));
    assert_eq!(ModelDir::open(&t2i).unwrap().variant(), Variant::TextToImage);
    assert_eq!(ModelDir::open(&edit).unwrap().variant(), Variant::EditPlus);

    assert_varied(&generate(&t2i, &[], &Case::new((256, 256), 4)), (256, 256));
    // Each input image is encoded at ~1 MP, as the pipeline does: one keeps the test short (two
    // are run by `cli/tests/demo_model.rs`).
    let images = [picture(96, 64)];
    assert_varied(&generate(&edit, &images, &Case::new((320, 192), 2)), (320, 192));

    // Each directory does what its pipeline does.
    let encoder = QwenEncoder::load(&t2i, Device::Cpu, Kind::Float).unwrap();
    let err = encoder.encode(PROMPT, None, &images, Some((64, 64)), 1.0).unwrap_err();
    assert!(err.to_string().contains("takes no input image"), "{err}");
    let encoder = QwenEncoder::load(&edit, Device::Cpu, Kind::Float).unwrap();
    let err = encoder.encode(PROMPT, None, &[], Some((64, 64)), 1.0).unwrap_err();
    assert!(err.to_string().contains("needs an input image"), "{err}");
}

#[test]
fn one_seed_writes_identical_files() {
    let (a, b, c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_demo_models(a.path(), &DemoOptions { seed: 11 }).unwrap();
    write_demo_models(b.path(), &DemoOptions { seed: 11 }).unwrap();
    let (fa, fb) = (
        x2v_models::testing::files_by_path(a.path()),
        x2v_models::testing::files_by_path(b.path()),
    );
    let names: Vec<&str> = fa.keys().map(String::as_str).collect();
    let common = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ];
    for want in common.iter().flat_map(|f| [format!("t2i/{f}"), format!("edit/{f}")]) {
        assert!(names.contains(&want.as_str()), "{want} missing from {names:?}");
    }
    for want in ["edit/processor/preprocessor_config.json", "edit/processor/tokenizer.json"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("t2i/processor")), "{names:?}");
    assert_eq!(fa, fb, "same seed, different files");
    let weights = "transformer/diffusion_pytorch_model.safetensors";
    assert_eq!(fa[&format!("t2i/{weights}")], fa[&format!("edit/{weights}")], "shared weights");

    write_demo_models(c.path(), &DemoOptions { seed: 12 }).unwrap();
    let fc = x2v_models::testing::files_by_path(c.path());
    let weights = format!("t2i/{weights}");
    assert_ne!(fa[&weights], fc[&weights], "another seed gives other weights");
    assert_eq!(fa["t2i/transformer/config.json"], fc["t2i/transformer/config.json"]);
}

/// diffusers' `QwenImagePipeline` / `QwenImageEditPlusPipeline.from_pretrained` on the written
/// directories (`tools/fixtures/qwen_demo.py`), against x2v on the same settings.
#[test]
fn diffusers_loads_both_and_gives_the_same_images() {
    let (model, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_demo_models(model.path(), &DemoOptions { seed: 0 }).unwrap();
    let script = x2v_testkit::repo_root().join("tools/fixtures/qwen_demo.py");
    let run = Command::new(common::python())
        .arg(&script)
        .arg("--model-dir")
        .arg(model.path())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    for (name, dir) in [("t2i", T2I_DIR), ("edit", EDIT_DIR)] {
        let text = std::fs::read_to_string(out.path().join(format!("{name}.json"))).unwrap();
        let case: Case = serde_json::from_str(&text).unwrap();
        let images: Vec<RgbImage> = match name {
            "edit" => vec![read_png(&out.path().join("edit_image.png"))],
            _ => vec![],
        };
        let got = generate(&model.path().join(dir), &images, &case);
        let want = common::tensors(&out.path().join(format!("{name}.safetensors")));
        common::assert_frames_match(&format!("demo {name}"), &got, &want["image_u8"].get(0));
    }
}

fn read_png(path: &Path) -> RgbImage {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    RgbImage::new(w as usize, h as usize, img.into_raw()).unwrap()
}
