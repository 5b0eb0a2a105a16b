//! A host without ONNX Runtime: engines are configured, the library is not there, and every
//! decode falls back with `runtime_missing` (its own process: the library loads once per process).

use x2v_trt::{BackendChoice, EngineConfig, Fallback, Size, Target, VaeEngines};

#[test]
fn a_missing_onnx_runtime_makes_every_decode_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("engines.toml");
    std::fs::write(&catalog, "[[static]]\nfile = \"d.onnx\"\nheight = 16\nwidth = 16\n").unwrap();
    let config = EngineConfig {
        backend: BackendChoice::Onnx,
        engines: catalog.display().to_string(),
        onnxruntime: dir.path().join("libonnxruntime.so.1.31.1").display().to_string(),
        ..EngineConfig::default()
    };
    let engines = VaeEngines::new(&config, Target::Cpu, None).unwrap();
    assert_eq!(engines.backend(), None);
    let miss = engines.decode(Size::new(16, 16), &[0.0; 16 * 2 * 2]).unwrap_err();
    assert_eq!(miss.reason, Fallback::RuntimeMissing);
    assert!(miss.message.contains("libonnxruntime.so.1.31.1: no such file"), "{}", miss.message);
}
