//! Wan VAE parity with diffusers `AutoencoderKLWan` on a tiny random model (base_dim 8), loaded
//! from the diffusers `vae/` layout and from the original `Wan2.1_VAE.pth` key names.

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::wan::vae::{AutoencoderKLWan, Quantize, VaeConfig, VaeParts, frames_u8};
use x2v_models::weights::parameter_bytes;

/// fp32 CPU; tolerances are relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

#[track_caller]
fn close(what: &str, got: &Tensor, want: &Tensor) {
    common::assert_close(what, got, want, TOL);
}

fn load(path: &Path) -> AutoencoderKLWan {
    AutoencoderKLWan::load(path, None, Device::Cpu, Kind::Float).expect("load VAE")
}

fn check_video_round_trip(vae: &AutoencoderKLWan, io: &std::collections::HashMap<String, Tensor>) {
    let mode = vae.encode(&io["video"]).unwrap();
    close("latent_mode_raw", &mode, &io["latent_mode_raw"]);
    let norm = vae.normalize_latents(&mode).unwrap();
    close("latent_normalized", &norm, &io["latent_normalized"]);
    // Decode the reference's normalised latents so the decoder is checked on its own.
    let z = vae.denormalize_latents(&io["latent_normalized"]).unwrap();
    let decoded = vae.decode(&z).unwrap();
    assert_eq!(decoded.size(), vec![1, 3, 9, 32, 32]);
    close("decoded", &decoded, &io["decoded"]);
}

#[test]
fn diffusers_layout_matches_diffusers() {
    let dir = common::fixture("wan_vae");
    let io = common::tensors(&dir.join("io.safetensors"));
    let vae = load(&dir.join("vae"));
    assert_eq!(vae.config().base_dim, 8);
    check_video_round_trip(&vae, &io);
}

#[test]
fn original_layout_matches_diffusers() {
    let dir = common::fixture("wan_vae");
    let io = common::tensors(&dir.join("io.safetensors"));
    let cfg = VaeConfig::from_file(&dir.join("vae/config.json")).unwrap();
    let vae =
        AutoencoderKLWan::load(&dir.join("Wan2.1_VAE.pth"), Some(cfg), Device::Cpu, Kind::Float)
            .unwrap();
    check_video_round_trip(&vae, &io);
}

#[test]
fn image_round_trip_matches_diffusers() {
    let dir = common::fixture("wan_vae");
    let io = common::tensors(&dir.join("io.safetensors"));
    let vae = load(&dir.join("vae"));
    let mode = vae.encode(&io["image"]).unwrap();
    assert_eq!(mode.size(), vec![1, 16, 1, 4, 4]);
    close("image_latent_mode_raw", &mode, &io["image_latent_mode_raw"]);
    let decoded = vae.decode(&io["image_latent_mode_raw"]).unwrap();
    close("image_decoded", &decoded, &io["image_decoded"]);
}

/// Fraction of bytes equal to the reference and the largest difference in levels.
fn byte_agreement(got: &Tensor, want: &Tensor) -> (f64, i64) {
    assert_eq!(got.size(), want.size());
    let d = (got.to_kind(Kind::Int) - want.to_kind(Kind::Int)).abs();
    let equal = d.eq(0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    (equal, d.max().int64_value(&[]))
}

#[test]
fn uint8_frames_match_diffusers_rules() {
    let dir = common::fixture("wan_vae");
    let io = common::tensors(&dir.join("io.safetensors"));
    let vae = load(&dir.join("vae"));
    let z = vae.denormalize_latents(&io["latent_normalized"]).unwrap();
    let decoded = vae.decode(&z).unwrap();
    for (rule, key) in
        [(Quantize::Truncate, "frames_u8_trunc"), (Quantize::Round, "frames_u8_round")]
    {
        let got = frames_u8(&decoded.get(0), rule).unwrap();
        assert_eq!(got.size(), vec![9, 32, 32, 3]);
        assert_eq!(got.kind(), Kind::Uint8);
        let (equal, max_levels) = byte_agreement(&got, &io[key]);
        let within_one = {
            let d = (got.to_kind(Kind::Int) - io[key].to_kind(Kind::Int)).abs();
            d.le(1).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
        };
        assert!(within_one >= 0.999, "{key}: only {within_one} of bytes within one level");
        assert!(max_levels <= 2, "{key}: a byte differs by {max_levels} levels");
        eprintln!("{key}: {equal:.6} equal, max diff {max_levels}");
        // Same floats in, same bytes out: the rule itself is exact.
        let exact = frames_u8(&io["decoded"].get(0), rule).unwrap();
        assert!(exact.equal(&io[key]), "{key}: rule differs from diffusers on identical floats");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = common::fixture("wan_vae");
    let vae = load(&dir.join("vae"));
    let err =
        vae.encode(&Tensor::zeros([1, 3, 6, 32, 32], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(
        matches!(err, x2v_models::Error::Input { .. }) && err.to_string().contains("6 frames"),
        "{err}"
    );
    let err =
        vae.encode(&Tensor::zeros([1, 3, 5, 30, 32], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("30×32"), "{err}");
    let err = vae.decode(&Tensor::zeros([1, 4, 2, 4, 4], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("16 channels"), "{err}");
    let err = frames_u8(&Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu)), Quantize::Round)
        .unwrap_err();
    assert!(err.to_string().contains("[2, 3, 4]"), "{err}");
    // Patchified RGB has 3·p² channels: a patch size without them is refused.
    let mut cfg = VaeConfig::wan21();
    cfg.patch_size = Some(2);
    let err = AutoencoderKLWan::build(&cfg, VaeParts::Full, Device::Cpu, Kind::Float).unwrap_err();
    assert!(
        err.to_string().contains("in_channels = 3 must be a positive multiple of patch_size² = 4"),
        "{err}"
    );
}

#[test]
fn wan21_preset_has_the_published_parameter_count() {
    let vae =
        AutoencoderKLWan::build(&VaeConfig::wan21(), VaeParts::Full, Device::Cpu, Kind::Float)
            .unwrap();
    let total: i64 = vae.var_store().variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(total, 126_892_531);
}

#[test]
fn i2v_condition_matches_diffusers_prepare_latents() {
    let dir = common::fixture("wan_vae");
    let io = common::tensors(&dir.join("io.safetensors"));
    let vae = load(&dir.join("vae"));
    let y = vae.i2v_condition(&io["i2v_image"], 9).unwrap();
    assert_eq!(y.size(), vec![1, 20, 3, 4, 4]);
    close("i2v_y", &y, &io["i2v_y"]);
    assert!(y.narrow(1, 0, 4).equal(&io["i2v_y"].narrow(1, 0, 4)), "mask channels are exact");
    let err = vae.i2v_condition(&io["i2v_image"], 8).unwrap_err();
    assert!(err.to_string().contains("num_frames = 8"), "{err}");
}

#[test]
fn halves_load_alone_and_match_the_whole_vae() {
    let dir = common::fixture("wan_vae");
    let io = common::tensors(&dir.join("io.safetensors"));
    let half = |parts| {
        AutoencoderKLWan::load_parts(&dir.join("vae"), None, Device::Cpu, Kind::Float, parts)
            .unwrap()
    };
    let whole = AutoencoderKLWan::load(&dir.join("vae"), None, Device::Cpu, Kind::Float).unwrap();
    let enc = half(VaeParts::Encoder);
    let dec = half(VaeParts::Decoder);
    let enc_vs = enc.var_store();
    let (full, e, d) = (
        parameter_bytes(whole.var_store()),
        parameter_bytes(enc_vs),
        parameter_bytes(dec.var_store()),
    );
    eprintln!("parameter bytes: full {full}, encoder half {e}, decoder half {d}");
    assert!(e < full && d < full && e + d == full, "full {full}, encoder {e}, decoder {d}");
    assert!(
        enc_vs.variables().keys().all(|k| k.starts_with("encoder.")
            || k == "quant_conv.weight"
            || k == "quant_conv.bias")
    );

    close("encoder half", &enc.encode(&io["video"]).unwrap(), &io["latent_mode_raw"]);
    let y = enc.i2v_condition(&io["i2v_image"], 9).unwrap();
    close("encoder half i2v_y", &y, &io["i2v_y"]);
    let z = dec.denormalize_latents(&io["latent_normalized"]).unwrap();
    close("decoder half", &dec.decode(&z).unwrap(), &io["decoded"]);

    // The half left out is reported, not silently absent.
    let err = dec.encode(&io["video"]).unwrap_err();
    assert!(err.to_string().contains("without its encoder"), "{err}");
    let err = enc.decode(&z).unwrap_err();
    assert!(err.to_string().contains("without its decoder"), "{err}");

    // The original layout's halves load the same way.
    let cfg = VaeConfig::from_file(&dir.join("vae/config.json")).unwrap();
    let orig = dir.join("Wan2.1_VAE.pth");
    let orig_dec =
        AutoencoderKLWan::load_parts(&orig, Some(cfg), Device::Cpu, Kind::Float, VaeParts::Decoder)
            .unwrap();
    assert_eq!(parameter_bytes(orig_dec.var_store()), d);
}

#[test]
fn a_half_is_strict_about_its_own_keys() {
    let dir = common::fixture("wan_vae");
    let ckpt = common::tensors(&dir.join("vae/diffusion_pytorch_model.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("vae/config.json"), tmp.path().join("config.json")).unwrap();
    let write = |skip: &str| {
        let kept: Vec<(String, Tensor)> = ckpt
            .iter()
            .filter(|(k, _)| k.as_str() != skip)
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        Tensor::write_safetensors(&kept, tmp.path().join("diffusion_pytorch_model.safetensors"))
            .unwrap();
    };
    let load =
        |parts| AutoencoderKLWan::load_parts(tmp.path(), None, Device::Cpu, Kind::Float, parts);

    // Without an encoder weight, the decoder half still loads; the encoder half names the key.
    write("encoder.conv_in.weight");
    load(VaeParts::Decoder).unwrap();
    let err = load(VaeParts::Encoder).unwrap_err();
    assert!(err.to_string().contains("missing key `encoder.conv_in.weight`"), "{err}");
    write("post_quant_conv.bias");
    load(VaeParts::Encoder).unwrap();
    let err = load(VaeParts::Decoder).unwrap_err();
    assert!(err.to_string().contains("missing key `post_quant_conv.bias`"), "{err}");
}
