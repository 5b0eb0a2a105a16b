//! The engine path on ONNX Runtime's CPU provider against the libtorch decoder and diffusers, on
//! the tiny random Qwen-Image VAE of `tools/fixtures/qwen_vae_onnx.py` (exported by
//! `tools/export_vae_onnx.py`): a static engine (32×48), a profile engine (48×64 lies only in its
//! range), and every way an engine can fail to load falling back with its reason.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use x2v_models::qwen_image::vae::{QwenImageVae, image_u8};
use x2v_models::testing::{assert_close, assert_frames_match, fixture, tensors};
use x2v_models::wan::vae::VaeParts;
use x2v_trt::{Backend, BackendChoice, EngineConfig, Fallback, Size, Target, VaeEngines};

/// fp32 engine output against libtorch's, relative to the image scale.
const TOL: f64 = 1e-3;

fn config(catalog: &Path, backend: BackendChoice) -> EngineConfig {
    EngineConfig { backend, engines: catalog.display().to_string(), ..EngineConfig::default() }
}

fn cpu_engines(catalog: &Path) -> VaeEngines {
    VaeEngines::new(&config(catalog, BackendChoice::Onnx), Target::Cpu, None).unwrap()
}

fn latents_of(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view([-1])).unwrap()
}

/// A copy of the fixture's engines that a test may damage.
fn engines_copy(fx: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fx.join("engines")).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let catalog = tmp.path().join("engines.toml");
    (tmp, catalog)
}

#[test]
fn engines_on_the_cpu_provider_match_the_libtorch_decoder_and_diffusers() {
    let fx = fixture("qwen_vae_onnx");
    let io = tensors(&fx.join("io.safetensors"));
    let vae =
        QwenImageVae::load_parts(&fx.join("vae"), Device::Cpu, Kind::Float, VaeParts::Decoder)
            .unwrap();
    let engines = cpu_engines(&fx.join("engines/engines.toml"));
    assert_eq!(engines.backend(), Some(Backend::OnnxCpu));
    for (h, w) in [(32, 48), (48, 64)] {
        let name = format!("{h}x{w}");
        let latents = &io[&format!("latents_{name}")];
        let (image, backend) = engines.decode(Size::new(h, w), &latents_of(latents)).unwrap();
        assert_eq!(backend, Backend::OnnxCpu);
        let image = Tensor::from_slice(&image).view([1, 3, i64::from(h), i64::from(w)]);
        let torch = vae.decode_latents(latents).unwrap();
        assert_close(&format!("{name}: engine vs libtorch"), &image, &torch, TOL);
        assert_close(
            &format!("{name}: engine vs diffusers"),
            &image,
            &io[&format!("decoded_{name}")],
            TOL,
        );
        assert_frames_match(
            &format!("{name}: engine image vs diffusers"),
            &image_u8(&image),
            &io[&format!("image_u8_{name}")],
        );
    }
    let VaeEngines::Engines(manager) = &engines else { unreachable!() };
    // 32×48 went to its static engine, 48×64 to the profile engine; both stay loaded.
    assert_eq!(manager.resident().len(), 2, "{:?}", manager.resident());
}

#[test]
fn a_shape_no_engine_serves_falls_back() {
    let fx = fixture("qwen_vae_onnx");
    let engines = cpu_engines(&fx.join("engines/engines.toml"));
    // 80×80 is beyond the profile's 64×64 maximum; 48×32 has its own static engine.
    let miss = engines.decode(Size::new(80, 80), &[0.0; 16 * 10 * 10]).unwrap_err();
    assert_eq!(miss.reason, Fallback::NoEngineForShape);
    assert!(engines.decode(Size::new(48, 32), &[0.0; 16 * 6 * 4]).is_ok());
}

#[test]
fn a_failed_run_falls_back_and_the_engine_is_loaded_afresh() {
    let fx = fixture("qwen_vae_onnx");
    let engines = cpu_engines(&fx.join("engines/engines.toml"));
    let VaeEngines::Engines(manager) = &engines else { unreachable!() };
    let good = vec![0.2f32; 16 * 4 * 6];
    assert!(engines.decode(Size::new(32, 48), &good).is_ok());
    // Latents of the wrong length: the run fails, the engine is unloaded, libtorch takes over.
    let miss = engines.decode(Size::new(32, 48), &good[..10]).unwrap_err();
    assert_eq!(miss.reason, Fallback::RunFailed, "{}", miss.message);
    assert!(manager.resident().is_empty(), "{:?}", manager.resident());
    assert!(engines.decode(Size::new(32, 48), &good).is_ok());
    assert_eq!(manager.stats().loads, 2);
}

#[test]
fn corrupt_truncated_or_missing_graphs_fall_back_instead_of_crashing() {
    let fx = fixture("qwen_vae_onnx");
    let (dir, catalog) = engines_copy(&fx);
    let file = dir.path().join("decoder_32x48.onnx");
    let bytes = std::fs::read(&file).unwrap();
    let latents = vec![0.1f32; 16 * 4 * 6];
    // What each case leaves in the graph's place: `None` removes the file.
    let cases = [
        ("truncated", Some(&bytes[..bytes.len() / 2]), Fallback::EngineLoadFailed),
        ("garbage", Some(&b"not an onnx graph at all"[..]), Fallback::EngineLoadFailed),
        ("missing", None, Fallback::EngineMissing),
    ];
    for (what, content, reason) in cases {
        match content {
            Some(c) => std::fs::write(&file, c).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        let engines = cpu_engines(&catalog);
        let miss = engines.decode(Size::new(32, 48), &latents).unwrap_err();
        assert_eq!(miss.reason, reason, "{what}: {}", miss.message);
        // Remembered, not retried; the other engines still work.
        assert_eq!(engines.decode(Size::new(32, 48), &latents).unwrap_err().reason, reason);
        assert!(engines.decode(Size::new(48, 32), &[0.0; 16 * 6 * 4]).is_ok(), "{what}");
    }
}

#[test]
fn a_graph_that_does_not_match_its_catalog_entry_or_weights_is_refused() {
    let fx = fixture("qwen_vae_onnx");
    let (dir, catalog) = engines_copy(&fx);
    // The 32×48 graph listed as serving 64×48.
    std::fs::write(
        &catalog,
        "[[static]]\nfile = \"decoder_32x48.onnx\"\nheight = 64\nwidth = 48\n",
    )
    .unwrap();
    let miss = cpu_engines(&catalog).decode(Size::new(64, 48), &[0.0; 16 * 8 * 6]).unwrap_err();
    assert_eq!(miss.reason, Fallback::EngineLoadFailed);
    assert!(miss.message.contains("the catalog says 64x48"), "{}", miss.message);
    drop(dir);

    // The digest the decoder computes from the model's VAE folder is the one the export stamped.
    let digest = x2v_decoder::vae::weights_sha256(&fx.join("vae")).unwrap();
    assert!(digest.is_some());
    let own = VaeEngines::new(
        &config(&fx.join("engines/engines.toml"), BackendChoice::Onnx),
        Target::Cpu,
        digest,
    )
    .unwrap();
    assert!(own.decode(Size::new(32, 48), &[0.0; 16 * 4 * 6]).is_ok());

    // Exported from other weights than the model's.
    let stale = VaeEngines::new(
        &config(&fx.join("engines/engines.toml"), BackendChoice::Onnx),
        Target::Cpu,
        Some("0".repeat(64)),
    )
    .unwrap();
    let miss = stale.decode(Size::new(32, 48), &[0.0; 16 * 4 * 6]).unwrap_err();
    assert_eq!(miss.reason, Fallback::EngineStale, "{}", miss.message);
}

#[test]
fn providers_this_host_lacks_fall_back_with_their_reason() {
    let fx = fixture("qwen_vae_onnx");
    let catalog = fx.join("engines/engines.toml");
    // TensorRT needs a GPU; so does the CUDA provider, which the CPU wheel does not even have.
    for (backend, target) in [
        (BackendChoice::Tensorrt, Target::Cpu),
        (BackendChoice::Tensorrt, Target::Cuda(0)),
        (BackendChoice::Onnx, Target::Cuda(0)),
    ] {
        let engines = VaeEngines::new(&config(&catalog, backend), target, None).unwrap();
        assert_eq!(engines.backend(), None, "{backend:?} on {target:?}");
        let miss = engines.decode(Size::new(32, 48), &[0.0; 16 * 4 * 6]).unwrap_err();
        assert_eq!(
            miss.reason,
            Fallback::ProviderUnavailable,
            "{backend:?} on {target:?}: {}",
            miss.message
        );
    }
    // `torch` never uses engines; `auto` without a catalog neither.
    for cfg in [config(&catalog, BackendChoice::Torch), EngineConfig::default()] {
        let engines = VaeEngines::new(&cfg, Target::Cpu, None).unwrap();
        assert_eq!(
            engines.decode(Size::new(32, 48), &[0.0; 16 * 4 * 6]).unwrap_err().reason,
            Fallback::NotConfigured
        );
    }
    // An explicit engine backend without a catalog is a configuration error naming the field.
    let e = VaeEngines::new(
        &EngineConfig { backend: BackendChoice::Onnx, ..EngineConfig::default() },
        Target::Cpu,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("vae.engines"), "{e}");
}
