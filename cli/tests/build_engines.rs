//! `x2v build-engines` on the exported fixture engines (ONNX Runtime's CPU provider here).

use std::process::Command;

fn build_engines(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_x2v"))
        .arg("build-engines")
        .args(args)
        .output()
        .expect("x2v runs");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_engine_of_a_catalog_loads_once_and_is_reported() {
    let fx = x2v_testkit::fixtures::fixture("qwen_vae_onnx");
    let catalog = fx.join("engines/engines.toml");
    let (code, out, err) = build_engines(&["--engines", catalog.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("| onnx_cpu |")).collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows.iter().all(|r| r.ends_with("| ok |")), "{out}");
    assert!(out.contains("| decoder_dynamic.onnx | 16x16 .. 64x64 (opt 48x64) |"), "{out}");
}

#[test]
fn what_cannot_load_here_is_an_error_naming_the_reason() {
    let fx = x2v_testkit::fixtures::fixture("qwen_vae_onnx");
    let catalog = fx.join("engines/engines.toml");
    let catalog = catalog.to_str().unwrap();
    // TensorRT needs a GPU.
    let (code, _, err) = build_engines(&["--engines", catalog, "--backend", "tensorrt"]);
    assert_eq!(code, 1);
    assert!(err.contains("provider_unavailable"), "{err}");
    // Bad values are refused naming them.
    let (code, _, err) = build_engines(&["--engines", catalog, "--device", "gpu0"]);
    assert_eq!(code, 2);
    assert!(err.contains("expected auto, cpu, cuda or cuda:N; got `gpu0`"), "{err}");
    let (code, _, err) = build_engines(&["--engines", "/nonexistent/engines.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/engines.toml"), "{err}");
}
