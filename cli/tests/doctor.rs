//! `x2v doctor` end to end: the real binary, a real `redis-server` on a free port.

use std::process::Command;

use serde_json::Value;
use x2v_testkit::redis::RedisServer;

fn doctor(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_x2v"))
        .arg("doctor")
        .arg("--json")
        .args(args)
        .env_remove("X2V_REDIS_URL")
        .env_remove("X2V_VAE__ENGINES")
        .output()
        .expect("x2v runs");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("doctor --json prints JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    });
    (out.status.code().expect("exited"), report)
}

fn status_of<'a>(report: &'a Value, name: &str) -> &'a str {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {report}"))["status"]
        .as_str()
        .unwrap()
}

#[test]
fn healthy_host_passes_and_reports_libtorch() {
    let (code, report) = doctor(&[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(status_of(&report, "libtorch"), "ok");
    assert_eq!(status_of(&report, "glibc"), "ok");
    let libtorch =
        report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "libtorch").unwrap();
    assert!(libtorch["detail"].as_str().unwrap().contains("2.11.0"), "{libtorch}");
}

#[test]
fn configured_redis_must_answer() {
    let redis = RedisServer::ephemeral();
    let url = format!("redis://127.0.0.1:{}", redis.port());
    let (code, report) = doctor(&["--redis-url", &url]);
    assert_eq!((code, status_of(&report, "redis")), (0, "ok"), "{report:#}");

    drop(redis);
    let (code, report) = doctor(&["--redis-url", &url]);
    assert_eq!((code, status_of(&report, "redis")), (1, "fail"), "{report:#}");
}

#[test]
fn requiring_a_gpu_fails_where_libtorch_sees_none() {
    let (_, report) = doctor(&[]);
    let cuda = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "cuda").unwrap();
    let devices: i64 =
        cuda["detail"].as_str().unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let (code, report) = doctor(&["--require-gpu"]);
    if devices == 0 {
        assert_eq!((code, status_of(&report, "cuda")), (1, "fail"), "{report:#}");
    } else {
        assert_eq!((code, status_of(&report, "cuda")), (0, "ok"), "{report:#}");
    }
}

fn checks_named<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["checks"].as_array().unwrap().iter().filter(|c| c["name"] == name).collect()
}

#[test]
fn an_engine_catalog_is_checked_engine_by_engine() {
    let fx = x2v_testkit::fixtures::fixture("qwen_vae_onnx");
    let dir = tempfile::tempdir().unwrap();
    for f in ["engines.toml", "decoder_32x48.onnx", "decoder_48x32.onnx", "decoder_dynamic.onnx"] {
        std::fs::copy(fx.join("engines").join(f), dir.path().join(f)).unwrap();
    }
    let catalog = dir.path().join("engines.toml");
    let (code, report) = doctor(&["--engines", catalog.to_str().unwrap()]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(status_of(&report, "onnxruntime"), "ok");
    assert!(report.to_string().contains("ONNX Runtime 1.31"), "{report:#}");
    let engines = checks_named(&report, "engine");
    assert_eq!(engines.len(), 3, "{report:#}");
    assert!(engines.iter().all(|c| c["status"] == "ok"), "{report:#}");
    // The CPU wheel has neither GPU provider: worth knowing, not a failure.
    let providers = checks_named(&report, "provider");
    assert_eq!(providers.len(), 3, "{report:#}");

    // A truncated graph is a failure that names the file.
    let graph = dir.path().join("decoder_48x32.onnx");
    let bytes = std::fs::read(&graph).unwrap();
    std::fs::write(&graph, &bytes[..bytes.len() / 3]).unwrap();
    let (code, report) = doctor(&["--engines", catalog.to_str().unwrap()]);
    assert_eq!(code, 1, "{report:#}");
    let failed: Vec<_> =
        checks_named(&report, "engine").into_iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(failed.len(), 1, "{report:#}");
    assert!(failed[0]["detail"].as_str().unwrap().contains("decoder_48x32.onnx"), "{report:#}");

    // A catalog that does not parse fails as a whole.
    std::fs::write(&catalog, "[[static]]\nfile = \"x.onnx\"\nheight = 10\nwidth = 16\n").unwrap();
    let (code, report) = doctor(&["--engines", catalog.to_str().unwrap()]);
    assert_eq!((code, status_of(&report, "engines")), (1, "fail"), "{report:#}");
}
