//! `configs/gateway.toml` loads as `GatewayConfig` through the loader the gateway uses, and serves
//! every model a topology directory in `configs/` runs, with the tasks its stages run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use x2v_gateway::config::GatewayConfig;
use x2v_queue::QueueBackend;
use x2v_queue::storage::StorageKind;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("gateway/ has a parent").join("configs")
}

fn gateway() -> GatewayConfig {
    let path = configs_dir().join("gateway.toml");
    let (config, warnings) = x2v_core::config::load_from::<GatewayConfig, _>(
        Some(&path),
        std::iter::empty::<(String, String)>(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(warnings.is_empty(), "{warnings:?}");
    config
}

/// Each stage file (`encoder.toml`, `dit*.toml`, `decoder.toml`) of each topology directory, as a
/// plain tree (this crate does not depend on the stage crate, whose tests check the full schema).
fn stage_files() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(configs_dir()).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            let stem = name.strip_suffix(".toml").unwrap_or("");
            if !(stem == "encoder"
                || stem == "decoder"
                || stem == "dit"
                || stem.starts_with("dit-"))
            {
                continue;
            }
            let (tree, _) = x2v_core::config::load_from::<BTreeMap<String, Value>, _>(
                Some(&path),
                std::iter::empty::<(String, String)>(),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path, serde_json::to_value(tree).unwrap()));
        }
    }
    out
}

#[test]
fn gateway_config_parses() {
    let config = gateway();
    assert_eq!(config.queue.backend, QueueBackend::Redis);
    assert!(!config.queue.redis_url.is_empty());
    assert!(!config.queue.prefix.is_empty());
    assert_eq!(config.storage.kind, StorageKind::Local);
    let names: BTreeSet<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names.len(), config.models.len(), "a model is listed twice");
    for want in ["wan2.1-t2v-1.3b", "wan2.1-i2v-14b-480p"] {
        assert!(names.contains(want), "gateway.toml does not serve {want}");
    }
    for m in &config.models {
        assert!(!m.tasks.is_empty() && !m.sizes.is_empty(), "{}: tasks and sizes", m.name);
        assert_eq!(m.max_frames % 4, 1, "{}: max_frames must be 4k+1", m.name);
        assert!(m.default_steps <= m.max_steps, "{}: default_steps > max_steps", m.name);
    }
}

#[test]
fn every_topology_model_is_served_with_its_tasks() {
    let config = gateway();
    let files = stage_files();
    assert!(files.len() >= 8, "found only {} stage configs", files.len());
    let mut topologies = BTreeSet::new();
    for (path, tree) in &files {
        let p = path.display();
        let model = tree["model"].as_str().unwrap_or_else(|| panic!("{p}: no `model`"));
        let served =
            config.models.iter().find(|m| m.name == model).unwrap_or_else(|| {
                panic!("{p}: model `{model}` is not in gateway.toml's [[models]]")
            });
        let served_tasks: BTreeSet<&str> = served.tasks.iter().map(|t| t.as_str()).collect();
        for task in tree["tasks"].as_array().unwrap_or_else(|| panic!("{p}: no `tasks`")) {
            let task = task.as_str().unwrap();
            assert!(served_tasks.contains(task), "{p}: task {task} not served for {model}");
        }
        topologies.insert(path.parent().unwrap().to_path_buf());
    }
    assert!(topologies.len() >= 2, "expected at least two topology directories");
}

#[test]
fn the_env_overrides_configs_in_the_documented_way() {
    // What docker/compose.*.yml and configs/README.md rely on: variables win over the file.
    let path = configs_dir().join("gateway.toml");
    let (config, warnings) = x2v_core::config::load_from::<GatewayConfig, _>(
        Some(&path),
        [
            ("X2V_QUEUE__REDIS_URL".to_owned(), "redis://10.0.0.7:6379/0".to_owned()),
            ("X2V_AUTH__API_KEYS".to_owned(), r#"["sk-a","sk-b"]"#.to_owned()),
            ("X2V_TELEMETRY__OTLP_ENDPOINT".to_owned(), "http://otel-collector:4317".to_owned()),
        ],
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.queue.redis_url.expose(), "redis://10.0.0.7:6379/0");
    let keys: Vec<&str> = config.auth.api_keys.iter().map(|k| k.expose()).collect();
    assert_eq!(keys, ["sk-a", "sk-b"]);
    assert_eq!(config.telemetry.otlp_endpoint.as_deref(), Some("http://otel-collector:4317"));
}
