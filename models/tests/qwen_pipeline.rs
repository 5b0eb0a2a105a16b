//! The Qwen-Image stage pipeline against diffusers' `QwenImagePipeline`, `QwenImageEditPipeline`
//! and `QwenImageEditPlusPipeline` on the tiny model of `tools/fixtures/qwen_pipeline.py`: each
//! stage on the reference's inputs, then the whole pipeline (encode → denoise → decode) from the
//! prompt, the input images and the seed.

mod common;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use x2v_models::qwen_image::latents::{pack, unpack};
use x2v_models::qwen_image::pipeline::{
    DenoiseSettings, ImageGeometry, ModelDir, Phase1, Phase2, QwenDecoder, QwenEncoder, Variant,
    denoise, load_transformer,
};
use x2v_models::qwen_image::resize::RgbImage;
use x2v_models::schedulers::FlowMatchDynamicConfig;

/// fp32 CPU; relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

/// Generation settings of one case (`<case>.json`).
#[derive(Debug, serde::Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: String,
    height: i64,
    width: i64,
    steps: usize,
    true_cfg_scale: f64,
    seed: u64,
    num_images: usize,
}

struct Fixture {
    dir: PathBuf,
}

fn fixture() -> Fixture {
    Fixture { dir: common::fixture("qwen_pipeline") }
}

impl Fixture {
    fn case(&self, name: &str) -> (Case, std::collections::HashMap<String, Tensor>) {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.json"))).unwrap();
        let case = serde_json::from_str(&text).unwrap();
        (case, common::tensors(&self.dir.join(format!("{name}.safetensors"))))
    }

    /// The fixture's model as published for `variant` (its own `model_index.json`).
    fn model_dir(&self, variant: Variant) -> PathBuf {
        let dir = self.dir.join(match variant {
            Variant::TextToImage => "t2i",
            Variant::Edit => "edit",
            Variant::EditPlus => "edit_plus",
        });
        assert_eq!(ModelDir::open(&dir).unwrap().variant(), variant);
        dir
    }

    fn images(&self, name: &str, n: usize) -> Vec<RgbImage> {
        let files: Vec<PathBuf> = match name {
            "edit" => vec![self.dir.join("edit_image.png")],
            _ => (0..n).map(|i| self.dir.join(format!("edit_plus_image_{i}.png"))).collect(),
        };
        files.iter().map(|p| read_png(p)).collect()
    }
}

fn read_png(path: &Path) -> RgbImage {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    RgbImage::new(w as usize, h as usize, img.into_raw()).unwrap()
}

fn variant_of(name: &str) -> Variant {
    match name {
        "t2i" => Variant::TextToImage,
        "edit" => Variant::Edit,
        _ => Variant::EditPlus,
    }
}

#[track_caller]
fn close(what: &str, got: &Tensor, want: &Tensor) {
    let (diff, scale) = common::max_abs_diff(got, want);
    eprintln!("{what}: max |diff| {diff:.2e} (reference scale {scale:.2e})");
    common::assert_close(what, got, want, TOL);
}

fn settings(dir: &Path, case: &Case) -> DenoiseSettings {
    DenoiseSettings {
        steps: case.steps,
        true_cfg_scale: case.true_cfg_scale,
        seed: case.seed,
        scheduler: FlowMatchDynamicConfig::from_dir(&dir.join("scheduler")).unwrap(),
    }
}

/// The encoder stage: prompt embeddings (positive and negative) and every image's latents.
fn encoder_matches(name: &str) {
    let fx = fixture();
    let (case, io) = fx.case(name);
    let dir = fx.model_dir(variant_of(name));
    let encoder = QwenEncoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let images = fx.images(name, case.num_images);
    let size = Some((case.width, case.height));
    let p1 = encoder
        .encode(&case.prompt, Some(&case.negative_prompt), &images, size, case.true_cfg_scale)
        .unwrap();
    assert_eq!(p1.geometry, ImageGeometry { height: case.height, width: case.width });
    close(&format!("{name} prompt_embeds"), &p1.prompt_embeds, &io["prompt_embeds"]);
    let neg = p1.negative_prompt_embeds.as_ref().expect("true CFG is on");
    close(&format!("{name} negative_prompt_embeds"), neg, &io["negative_prompt_embeds"]);
    assert!(p1.prompt_mask.is_none(), "batch 1: the mask is all ones and not sent");
    assert_eq!(p1.image_latents.len(), case.num_images);
    for (i, z) in p1.image_latents.iter().enumerate() {
        close(
            &format!("{name} image_latents.{i}"),
            &pack(z).unwrap(),
            &io[&format!("image_latents_{i}")],
        );
    }
}

#[test]
fn t2i_encoder_matches_diffusers() {
    encoder_matches("t2i");
}

#[test]
fn edit_encoder_matches_diffusers() {
    encoder_matches("edit");
}

#[test]
fn edit_plus_encoder_matches_diffusers_with_two_images() {
    encoder_matches("edit_plus");
}

/// The reference's Phase1 (its prompt embeddings and image latents).
fn reference_phase1(case: &Case, io: &std::collections::HashMap<String, Tensor>) -> Phase1 {
    let geometry = ImageGeometry { height: case.height, width: case.width };
    let image_latents = (0..case.num_images)
        .map(|i| {
            let packed = &io[&format!("image_latents_{i}")];
            let n = packed.size()[1];
            // Recover the grid from the fixture's VAE input size.
            let vae = &io[&format!("vae_image_{i}")];
            let (h, w) = (vae.size()[2], vae.size()[3]);
            assert_eq!(n, (h / 16) * (w / 16));
            unpack(packed, h, w).unwrap()
        })
        .collect();
    Phase1 {
        geometry,
        prompt_embeds: io["prompt_embeds"].shallow_clone(),
        prompt_mask: None,
        negative_prompt_embeds: Some(io["negative_prompt_embeds"].shallow_clone()),
        negative_prompt_mask: None,
        image_latents,
    }
}

/// The DiT stage on the reference's conditioning: the first step and the final latents.
fn denoise_matches(name: &str) {
    let fx = fixture();
    let (case, io) = fx.case(name);
    let dir = fx.model_dir(variant_of(name));
    let dit = load_transformer(&dir, Device::Cpu, Kind::Float).unwrap();
    let p1 = reference_phase1(&case, &io);
    let mut steps = Vec::new();
    let p2 = denoise(&dit, &p1, &settings(&dir, &case), |p| steps.push(p), || false).unwrap();
    assert_eq!(steps.len(), case.steps);
    assert_eq!(steps.last().unwrap().step, case.steps);
    let got = pack(&p2.latents).unwrap();
    close(&format!("{name} final latents"), &got, &io["final_latents"]);
}

#[test]
fn t2i_denoise_matches_diffusers() {
    denoise_matches("t2i");
}

#[test]
fn edit_plus_denoise_matches_diffusers() {
    denoise_matches("edit_plus");
}

#[test]
fn decoder_matches_diffusers() {
    let fx = fixture();
    let (case, io) = fx.case("t2i");
    let dir = fx.model_dir(Variant::TextToImage);
    let decoder = QwenDecoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let geometry = ImageGeometry { height: case.height, width: case.width };
    let latents = unpack(&io["final_latents"], case.height, case.width).unwrap();
    let image = decoder.decode(&Phase2 { geometry, latents }).unwrap();
    assert_eq!(image.size(), [case.height, case.width, 3]);
    common::assert_frames_match("t2i decode", &image, &io["image_u8"].get(0));
}

/// Prompt, images and seed in; the image out, against diffusers' `output_type="np"` image.
fn whole_pipeline_matches(name: &str) {
    let fx = fixture();
    let (case, io) = fx.case(name);
    let dir = fx.model_dir(variant_of(name));
    let images = fx.images(name, case.num_images);
    let p1 = QwenEncoder::load(&dir, Device::Cpu, Kind::Float)
        .unwrap()
        .encode(
            &case.prompt,
            Some(&case.negative_prompt),
            &images,
            Some((case.width, case.height)),
            case.true_cfg_scale,
        )
        .unwrap();
    let dit = load_transformer(&dir, Device::Cpu, Kind::Float).unwrap();
    let p2 = denoise(&dit, &p1, &settings(&dir, &case), |_| {}, || false).unwrap();
    let image = QwenDecoder::load(&dir, Device::Cpu, Kind::Float).unwrap().decode(&p2).unwrap();
    common::assert_frames_match(&format!("{name} pipeline"), &image, &io["image_u8"].get(0));
}

#[test]
fn t2i_pipeline_matches_diffusers() {
    whole_pipeline_matches("t2i");
}

#[test]
fn edit_pipeline_matches_diffusers() {
    whole_pipeline_matches("edit");
}

#[test]
fn edit_plus_pipeline_matches_diffusers_with_two_images() {
    whole_pipeline_matches("edit_plus");
}

#[test]
fn cancellation_stops_between_steps() {
    let fx = fixture();
    let (case, io) = fx.case("t2i");
    let dir = fx.model_dir(Variant::TextToImage);
    let dit = load_transformer(&dir, Device::Cpu, Kind::Float).unwrap();
    let p1 = reference_phase1(&case, &io);
    let done = std::cell::Cell::new(0);
    let err = denoise(&dit, &p1, &settings(&dir, &case), |p| done.set(p.step), || done.get() == 1)
        .unwrap_err();
    assert!(matches!(err, x2v_models::Error::Cancelled { completed: 1, .. }), "{err}");
}

#[test]
fn bad_inputs_are_refused_with_clear_errors() {
    let fx = fixture();
    let (case, io) = fx.case("t2i");
    let t2i = fx.model_dir(Variant::TextToImage);
    let encoder = QwenEncoder::load(&t2i, Device::Cpu, Kind::Float).unwrap();
    let img = fx.images("edit", 1);
    let err = encoder.encode("x", None, &img, Some((64, 64)), 1.0).unwrap_err();
    assert!(err.to_string().contains("takes no input image"), "{err}");
    let err = encoder.encode("x", None, &[], Some((8, 64)), 1.0).unwrap_err();
    assert!(err.to_string().contains("multiple of 16"), "{err}");
    assert_eq!(err.kind(), x2v_core::ErrorKind::InvalidRequest);

    let edit = fx.model_dir(Variant::Edit);
    let encoder = QwenEncoder::load(&edit, Device::Cpu, Kind::Float).unwrap();
    let err = encoder.encode("x", None, &[], None, 1.0).unwrap_err();
    assert!(err.to_string().contains("needs an input image"), "{err}");

    // The DiT refuses guidance without negative embeddings and malformed image latents.
    let dit = load_transformer(&t2i, Device::Cpu, Kind::Float).unwrap();
    let mut p1 = reference_phase1(&case, &io);
    p1.negative_prompt_embeds = None;
    let err = denoise(&dit, &p1, &settings(&t2i, &case), |_| {}, || false).unwrap_err();
    assert!(err.to_string().contains("needs negative_prompt_embeds"), "{err}");
    let mut p1 = reference_phase1(&case, &io);
    p1.image_latents = vec![Tensor::zeros([1, 16, 1, 3, 4], (Kind::Float, Device::Cpu))];
    let err = denoise(&dit, &p1, &settings(&t2i, &case), |_| {}, || false).unwrap_err();
    assert!(err.to_string().contains("image_latents.0"), "{err}");
}
