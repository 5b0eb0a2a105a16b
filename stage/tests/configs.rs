//! The stage configs shipped in `configs/` (one directory per topology, with `encoder.toml`,
//! `dit*.toml` and `decoder.toml`) load as `StageConfig` through the same loader the services use,
//! and fit together: unique ranks per stage, no port used twice, and one Redis, prefix, store and
//! transfer secret shared with the gateway (`configs/gateway.toml`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use x2v_queue::QueueBackend;
use x2v_queue::storage::StorageConfig;
use x2v_stage::StageConfig;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("stage/ has a parent").to_path_buf()
}

fn configs_dir() -> PathBuf {
    repo_root().join("configs")
}

/// Which stage a file name belongs to (`encoder.toml`, `dit.toml`, `dit-1.toml`, `decoder.toml`).
fn stage_of(file: &str) -> Option<&'static str> {
    let stem = file.strip_suffix(".toml")?;
    if stem == "encoder" {
        Some("encoder")
    } else if stem == "decoder" {
        Some("decoder")
    } else if stem == "dit" || stem.starts_with("dit-") {
        Some("dit")
    } else {
        None
    }
}

struct StageFile {
    path: PathBuf,
    stage: &'static str,
    config: StageConfig,
}

/// Every topology directory under `configs/` with its stage files, loaded with no environment.
fn topologies() -> BTreeMap<String, Vec<StageFile>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(configs_dir()).expect("configs/ exists") {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        let mut names: Vec<PathBuf> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for path in names {
            let file = path.file_name().unwrap().to_str().unwrap().to_owned();
            let Some(stage) = stage_of(&file) else { continue };
            let (config, warnings) = x2v_core::config::load_from::<StageConfig, _>(
                Some(&path),
                std::iter::empty::<(String, String)>(),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(warnings.is_empty(), "{}: {warnings:?}", path.display());
            files.push(StageFile { path, stage, config });
        }
        out.insert(dir.file_name().unwrap().to_str().unwrap().to_owned(), files);
    }
    out
}

/// `configs/gateway.toml` as a plain tree (this crate does not depend on the gateway).
fn gateway() -> Value {
    let path = configs_dir().join("gateway.toml");
    let (tree, _) = x2v_core::config::load_from::<BTreeMap<String, Value>, _>(
        Some(&path),
        std::iter::empty::<(String, String)>(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(tree).unwrap()
}

fn port_of(addr: &str, what: &str, path: &Path) -> u16 {
    let (_, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{}: {what} `{addr}` has no port", path.display()));
    let port: u16 =
        port.parse().unwrap_or_else(|_| panic!("{}: {what} `{addr}` port", path.display()));
    assert_ne!(port, 0, "{}: {what} must name a fixed port", path.display());
    port
}

#[test]
fn every_topology_is_shipped_complete() {
    let topologies = topologies();
    for name in [
        "wan2.1-t2v-1.3b",
        "wan2.1-i2v-14b-480p",
        "wan2.2-t2v-a14b",
        "wan2.2-ti2v-5b",
        "qwen-image",
    ] {
        let files = topologies.get(name).unwrap_or_else(|| panic!("configs/{name}/ is missing"));
        let names: BTreeSet<String> = files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        for want in ["encoder.toml", "dit.toml", "dit-1.toml", "decoder.toml"] {
            assert!(names.contains(want), "configs/{name}/{want} is missing");
        }
    }
}

#[test]
fn every_stage_config_parses_and_unknown_keys_are_errors() {
    let topologies = topologies();
    let count: usize = topologies.values().map(Vec::len).sum();
    assert!(count >= 8, "found only {count} stage configs");
    for (name, files) in &topologies {
        for f in files {
            let p = f.path.display();
            assert_eq!(f.config.model, *name, "{p}: `model` must be its directory's name");
            assert!(f.config.model_dir.starts_with("/models/"), "{p}: model_dir under /models");
            assert!(!f.config.tasks.is_empty(), "{p}: no tasks");
            assert!(f.config.capacity >= 1, "{p}: capacity 0");
            assert_eq!(
                f.config.queue.backend,
                QueueBackend::Redis,
                "{p}: stage services use Redis"
            );
            let device = f.config.device.to_string();
            assert!(
                device == "auto"
                    || device == "cpu"
                    || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok()),
                "{p}: device `{device}`",
            );
        }
    }

    // The loader the services use rejects a key StageConfig does not have.
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(configs_dir().join("wan2.1-t2v-1.3b/dit.toml")).unwrap();
    let bad = dir.path().join("dit.toml");
    std::fs::write(&bad, src.replace("[transfer]\n", "[transfer]\nsecrett = \"x\"\n")).unwrap();
    let err = x2v_core::config::load_from::<StageConfig, _>(
        Some(&bad),
        std::iter::empty::<(String, String)>(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("transfer.secrett"), "{err}");
}

#[test]
fn ranks_are_unique_per_stage_across_topologies() {
    // Every topology shares the gateway's Redis prefix, where a rank names one worker of a stage.
    let all = topologies();
    let mut seen: BTreeMap<(&str, u32), &Path> = BTreeMap::new();
    for (name, files) in &all {
        let mut stages = BTreeSet::new();
        for f in files {
            stages.insert(f.stage);
            if let Some(other) = seen.insert((f.stage, f.config.rank), &f.path) {
                panic!(
                    "{name}: {} rank {} in both {} and {}",
                    f.stage,
                    f.config.rank,
                    other.display(),
                    f.path.display()
                );
            }
        }
        assert_eq!(
            stages.len(),
            3,
            "{name}: needs an encoder, a DiT and a decoder, has {stages:?}"
        );
        // Every worker of one topology serves the same tasks.
        let tasks: BTreeSet<_> = files.iter().map(|f| format!("{:?}", f.config.tasks)).collect();
        assert_eq!(tasks.len(), 1, "{name}: stages disagree on tasks: {tasks:?}");
        // DiT ranks of one topology run on distinct GPUs.
        let dits: Vec<&StageFile> = files.iter().filter(|f| f.stage == "dit").collect();
        let devices: BTreeSet<String> = dits.iter().map(|f| f.config.device.to_string()).collect();
        assert_eq!(devices.len(), dits.len(), "{name}: two DiT ranks share a device");
    }
    assert!(all.len() >= 2, "both topologies are checked");
}

#[test]
fn ports_do_not_collide() {
    let gateway = gateway();
    let gateway_listen = gateway["listen"].as_str().expect("gateway listen").to_owned();
    let gateway_path = configs_dir().join("gateway.toml");
    let gateway_port = port_of(&gateway_listen, "listen", &gateway_path);
    // Within a topology (one host can run it all), and across topologies too, so two models can
    // share a host.
    let mut everywhere: BTreeMap<u16, String> = BTreeMap::new();
    everywhere.insert(gateway_port, "gateway listen".into());
    for files in topologies().values() {
        for f in files {
            let c = &f.config;
            for (what, addr) in [
                ("grpc.listen", &c.grpc.listen),
                ("http.listen", &c.http.listen),
                ("transfer.listen", &c.transfer.listen),
            ] {
                let port = port_of(addr, what, &f.path);
                let here = format!("{} {what}", f.path.display());
                if let Some(other) = everywhere.insert(port, here.clone()) {
                    panic!("port {port} used by both {other} and {here}");
                }
            }
            // Other stages dial `advertise`; in compose there is no port mapping between them.
            let advertised = port_of(&c.transfer.advertise, "transfer.advertise", &f.path);
            assert_eq!(
                advertised,
                port_of(&c.transfer.listen, "transfer.listen", &f.path),
                "{}: advertise and listen ports differ",
                f.path.display()
            );
        }
        // Advertised endpoints are distinct within a topology.
        let ads: BTreeSet<&str> =
            files.iter().map(|f| f.config.transfer.advertise.as_str()).collect();
        assert_eq!(ads.len(), files.len(), "two workers advertise the same transfer endpoint");
    }
}

#[test]
fn stages_share_the_gateways_queue_storage_and_secret() {
    let gateway = gateway();
    let redis_url = gateway["queue"]["redis_url"].as_str().unwrap();
    let prefix = gateway["queue"]["prefix"].as_str().unwrap();
    let storage: StorageConfig = serde_json::from_value(gateway["storage"].clone()).unwrap();
    let mut secrets = BTreeSet::new();
    for files in topologies().values() {
        for f in files {
            let c = &f.config;
            let p = f.path.display();
            assert_eq!(c.queue.prefix, prefix, "{p}: queue.prefix differs from the gateway's");
            assert_eq!(
                c.queue.redis_url.expose(),
                redis_url,
                "{p}: queue.redis_url differs from the gateway's"
            );
            assert_eq!(c.storage, storage, "{p}: storage differs from the gateway's");
            assert!(c.transfer.secret.is_empty(), "{p}: put the secret in a file, not the config");
            assert!(!c.transfer.secret_file.is_empty(), "{p}: transfer.secret_file unset");
            secrets.insert(c.transfer.secret_file.clone());
        }
    }
    assert_eq!(secrets.len(), 1, "stages read different secret files: {secrets:?}");
}

#[test]
fn compose_overrides_apply() {
    // The variables docker/compose.*.yml sets on the stage containers.
    let path = configs_dir().join("wan2.1-i2v-14b-480p/dit-1.toml");
    let env = [
        ("X2V_DEVICE", "cuda:0"),
        ("X2V_TRANSFER__ADVERTISE", "10.0.0.5:9222"),
        ("X2V_QUEUE__REDIS_URL", "redis://10.0.0.7:6379/0"),
        ("X2V_TELEMETRY__OTLP_ENDPOINT", "http://otel-collector:4317"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let (c, warnings) = x2v_core::config::load_from::<StageConfig, _>(Some(&path), env).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(c.device.to_string(), "cuda:0");
    assert_eq!(c.rank, 3);
    assert_eq!(c.transfer.advertise, "10.0.0.5:9222");
    assert_eq!(c.queue.redis_url.expose(), "redis://10.0.0.7:6379/0");
    assert_eq!(c.telemetry.otlp_endpoint.as_deref(), Some("http://otel-collector:4317"));
}

/// `(service, config file)` for every stage service of a compose file, read from its
/// `X2V_CONFIG: /etc/x2v/${TOPOLOGY:-...}/FILE` lines (a text scan: no YAML parser needed).
fn compose_stage_services(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut service = None;
    for line in text.lines() {
        // Service keys are indented by exactly two spaces under `services:`.
        if let Some(key) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':'))
            && !key.starts_with(' ')
            && !key.starts_with('#')
        {
            service = Some(key.to_owned());
        }
        if let Some((_, rest)) = line.trim().split_once("X2V_CONFIG: /etc/x2v/${TOPOLOGY:-") {
            let file = rest.rsplit_once("}/").expect("X2V_CONFIG names a file").1;
            out.push((service.clone().expect("X2V_CONFIG inside a service"), file.to_owned()));
        }
    }
    out
}

#[test]
fn compose_files_match_the_configs() {
    let topologies = topologies();
    let docker = repo_root().join("docker");
    for platform in ["cpu", "cuda", "intel", "mlu"] {
        let path = docker.join(format!("compose.{platform}.yml"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let services = compose_stage_services(&text);
        let stages: BTreeSet<&str> = services.iter().filter_map(|(_, f)| stage_of(f)).collect();
        assert_eq!(stages.len(), 3, "{platform}: needs encoder, DiT and decoder services");
        if platform == "cuda" {
            let dits = services.iter().filter(|(_, f)| stage_of(f) == Some("dit")).count();
            assert!(dits >= 2, "cuda: two DiT ranks expected, found {dits}");
        }
        assert!(text.contains("--appendonly"), "{platform}: Redis without AOF");
        assert!(text.contains("x2v_transfer_secret"), "{platform}: no transfer secret");
        for (topology, files) in &topologies {
            for (service, file) in &services {
                let f = files
                    .iter()
                    .find(|f| f.path.file_name().unwrap() == file.as_str())
                    .unwrap_or_else(|| {
                        panic!("{platform}: {service} runs {topology}/{file}: missing")
                    });
                // Other stages dial `transfer.advertise`: in compose, the service's own name.
                let host = f.config.transfer.advertise.rsplit_once(':').unwrap().0;
                assert_eq!(
                    host,
                    service,
                    "{}: advertise host vs compose service",
                    f.path.display()
                );
            }
        }
    }
}
