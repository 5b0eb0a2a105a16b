//! The Qwen-Image stage pipeline against diffusers' `QwenImagePipeline`, `QwenImageEditPipeline`
//! and `QwenImageEditPlusPipeline` on the tiny model of `tools/fixtures/qwen_pipeline.py`: each
//! stage on the reference's inputs, then the whole pipeline (encode → denoise → decode) from the
//! prompt, the input images and the seed; several images per prompt, batched and back to back;
//! the previews of images being denoised.

mod common;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use x2v_models::qwen_image::latents::{pack, true_cfg, unpack};
use x2v_models::qwen_image::pipeline::{
    DenoiseSettings, ImageGeometry, ModelDir, Phase1, Phase2, Preview, QwenDecoder, QwenEncoder,
    Variant, denoise, denoise_with_previews, load_transformer, preview_steps,
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
    common::assert_close(what, got, want, TOL);
}

fn settings(dir: &Path, case: &Case) -> DenoiseSettings {
    DenoiseSettings::single(
        case.steps,
        case.true_cfg_scale,
        case.seed,
        FlowMatchDynamicConfig::from_dir(&dir.join("scheduler")).unwrap(),
    )
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
    let image = decoder.decode(&Phase2 { geometry, latents }).unwrap().get(0);
    assert_eq!(image.size(), [case.height, case.width, 3]);
    common::assert_frames_match("t2i decode", &image, &io["image_u8"].get(0));
}

/// The encoder stage on `name`'s prompt, negative prompt, input images and size.
fn encode_case(fx: &Fixture, name: &str, case: &Case, dir: &Path) -> Phase1 {
    QwenEncoder::load(dir, Device::Cpu, Kind::Float)
        .unwrap()
        .encode(
            &case.prompt,
            Some(&case.negative_prompt),
            &fx.images(name, case.num_images),
            Some((case.width, case.height)),
            case.true_cfg_scale,
        )
        .unwrap()
}

/// Prompt, images and seed in; the image out, against diffusers' `output_type="np"` image.
fn whole_pipeline_matches(name: &str) {
    let fx = fixture();
    let (case, io) = fx.case(name);
    let dir = fx.model_dir(variant_of(name));
    let p1 = encode_case(&fx, name, &case, &dir);
    let dit = load_transformer(&dir, Device::Cpu, Kind::Float).unwrap();
    let p2 = denoise(&dit, &p1, &settings(&dir, &case), |_| {}, || false).unwrap();
    let image = QwenDecoder::load(&dir, Device::Cpu, Kind::Float).unwrap().decode(&p2).unwrap();
    common::assert_frames_match(&format!("{name} pipeline"), &image.get(0), &io["image_u8"].get(0));
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

/// The encoder and decoder of `name`'s case with `n` images per prompt: the stage pipeline with
/// the DiT batching `max_batch` images per forward, previews on.
fn images_per_prompt(name: &str, n: usize, max_batch: usize) -> (Tensor, Vec<Preview>, Tensor) {
    let fx = fixture();
    let (case, _) = fx.case(name);
    let dir = fx.model_dir(variant_of(name));
    let p1 = encode_case(&fx, name, &case, &dir);
    let dit = load_transformer(&dir, Device::Cpu, Kind::Float).unwrap();
    let s = DenoiseSettings { num_images: n, max_batch, previews: 1, ..settings(&dir, &case) };
    let mut previews = vec![];
    let mut steps = vec![];
    let p2 = denoise_with_previews(
        &dit,
        &p1,
        &s,
        |p| steps.push((p.step, p.total)),
        |p| previews.push(p),
        || false,
    )
    .unwrap();
    let batches = n.div_ceil(max_batch);
    let want: Vec<(usize, usize)> =
        (1..=batches * case.steps).map(|i| (i, batches * case.steps)).collect();
    assert_eq!(steps, want, "progress counts the steps of every batch");
    let images = QwenDecoder::load(&dir, Device::Cpu, Kind::Float).unwrap().decode(&p2).unwrap();
    (images, previews, p2.latents)
}

#[track_caller]
fn images_per_prompt_match(name: &str, n: usize, max_batch: usize) {
    let fx = fixture();
    let tag = format!("{name}_n{n}");
    let (_, io) = fx.case(&tag);
    let (images, previews, _) = images_per_prompt(name, n, max_batch);
    assert_eq!(images.size()[0], n as i64);
    let (case, _) = fx.case(name);
    for i in 0..n as i64 {
        let what = format!("{tag} image {i} (batches of {max_batch})");
        common::assert_frames_match(&what, &images.get(i), &io["image_u8"].get(i));
    }
    // One preview per image, after the middle step, in image order.
    let step = preview_steps(case.steps, 1)[0];
    let seen: Vec<(usize, usize, usize)> =
        previews.iter().map(|p| (p.image, p.index, p.step)).collect();
    assert_eq!(seen, (0..n).map(|i| (i, 0, step)).collect::<Vec<_>>());
}

#[test]
fn three_images_per_prompt_match_diffusers_batched_and_back_to_back() {
    images_per_prompt_match("t2i", 3, 3);
    images_per_prompt_match("t2i", 3, 1);
    images_per_prompt_match("t2i", 3, 2);
}

#[test]
fn two_edits_per_prompt_match_diffusers() {
    images_per_prompt_match("edit_plus", 2, 2);
}

#[test]
fn preview_steps_are_evenly_spaced_before_the_last() {
    assert_eq!(preview_steps(50, 3), [13, 25, 38]);
    assert_eq!(preview_steps(20, 1), [10]);
    assert_eq!(preview_steps(4, 3), [1, 2, 3]);
    assert_eq!(preview_steps(2, 3), [1]);
    assert_eq!(preview_steps(1, 2), Vec::<usize>::new());
    assert_eq!(preview_steps(10, 0), Vec::<usize>::new());
}

/// A preview is the x0 prediction of its step (`x_t − σ_t·v`, with v after true CFG): at step 1,
/// diffusers' initial noise minus σ_0 times its CFG-combined step-0 prediction.
#[test]
fn previews_are_the_x0_prediction_of_their_step() {
    let fx = fixture();
    let (case, io) = fx.case("t2i");
    let dir = fx.model_dir(Variant::TextToImage);
    assert_eq!(preview_steps(case.steps, 3), [1, 2], "case t2i has 3 steps");
    let dit = load_transformer(&dir, Device::Cpu, Kind::Float).unwrap();
    let p1 = reference_phase1(&case, &io);
    let s = DenoiseSettings { previews: 3, ..settings(&dir, &case) };
    let mut previews = vec![];
    denoise_with_previews(&dit, &p1, &s, |_| {}, |p| previews.push(p), || false).unwrap();
    let seen: Vec<(usize, usize, usize)> =
        previews.iter().map(|p| (p.image, p.index, p.step)).collect();
    assert_eq!(seen, [(0, 0, 1), (0, 1, 2)]);
    let sigma0 = io["sigmas"].double_value(&[0]);
    let v = true_cfg(&io["noise_pred_0"], &io["neg_noise_pred_0"], case.true_cfg_scale).unwrap();
    let x0 = unpack(&(&io["noise"] - v * sigma0), case.height, case.width).unwrap();
    close("preview 0 (x0 at step 1)", &previews[0].latents, &x0);
    // Decoded, a preview is an image of the output's size.
    let decoder = QwenDecoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let geometry = ImageGeometry { height: case.height, width: case.width };
    let image = decoder.decode(&Phase2 { geometry, latents: previews[1].latents.shallow_clone() });
    assert_eq!(image.unwrap().size(), [1, case.height, case.width, 3]);
    let err = denoise_with_previews(
        &dit,
        &p1,
        &DenoiseSettings { previews: 4, ..s },
        |_| {},
        |_| {},
        || false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("at most 3 previews"), "{err}");
}
