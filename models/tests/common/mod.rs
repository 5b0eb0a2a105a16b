//! Reference fixtures for parity tests: generated on demand by the Python scripts in
//! `tools/fixtures/` (diffusers/transformers on tiny random weights) and cached by the scripts'
//! content hash, so a changed generator always regenerates its fixture.
//!
//! The Python interpreter is `$X2V_PYTHON` (set by the Makefile), else the venv that
//! `make setup` creates; a missing interpreter is a test failure that says to run `make setup`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use tch::Tensor;

static GENERATE: Mutex<()> = Mutex::new(());

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate sits in the workspace root")
        .to_owned()
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("X2V_PYTHON") {
        return p.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let venv = Path::new(&home).join(".cache/x2v/venv/bin/python");
    assert!(
        venv.exists(),
        "no Python for fixture generation: run `make setup` (or set X2V_PYTHON)"
    );
    venv
}

fn content_hash(files: &[PathBuf]) -> String {
    // FNV-1a over the generator sources: a stable key without a hashing dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        for b in std::fs::read(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display())) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The script plus every sibling module it imports (`from umt5 import ...`), transitively, so that a
/// change to any of them regenerates the fixture.
fn generator_sources(tools: &Path, script: &Path) -> Vec<PathBuf> {
    let mut sources = vec![script.to_owned()];
    let mut i = 0;
    while i < sources.len() {
        let text = std::fs::read_to_string(&sources[i]).unwrap_or_default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let module = match words.as_slice() {
                ["from", m, "import", ..] | ["import", m, ..] => m.trim_end_matches(','),
                _ => continue,
            };
            let sibling = tools.join(format!("{module}.py"));
            if sibling.exists() && !sources.contains(&sibling) {
                sources.push(sibling);
            }
        }
        i += 1;
    }
    sources
}

/// The directory holding fixture `name` (from `tools/fixtures/<name>.py`), generating it if needed.
pub fn fixture(name: &str) -> PathBuf {
    let tools = repo_root().join("tools/fixtures");
    let script = tools.join(format!("{name}.py"));
    assert!(script.exists(), "no fixture generator {}", script.display());
    let key = content_hash(&generator_sources(&tools, &script));
    let base = std::env::var_os("X2V_FIXTURE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        target.join("x2v-fixtures")
    });
    let dir = base.join(format!("{name}-{key}"));
    let _lock = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if dir.join(".complete").exists() {
        return dir;
    }
    let tmp = base.join(format!(".{name}-{key}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new(python())
        .arg(&script)
        .arg("--out")
        .arg(&tmp)
        .env("PYTHONHASHSEED", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the fixture generator {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "fixture generator {} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(tmp.join(".complete"), b"").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // Another test process may have produced the same fixture meanwhile; either copy is valid.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// All tensors of a safetensors file, by name.
pub fn tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Max absolute difference and the reference's max absolute value (the scale tolerances refer to).
pub fn max_abs_diff(got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.size(), want.size(), "shape mismatch");
    let got = got.to_kind(tch::Kind::Double);
    let want = want.to_kind(tch::Kind::Double);
    let diff = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    (diff, scale)
}

/// Asserts `got` is within `tol * max(1, max|want|)` of `want` elementwise.
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let (diff, scale) = max_abs_diff(got, want);
    let bound = tol * scale.max(1.0);
    assert!(
        diff <= bound,
        "{what}: max |diff| {diff:.3e} exceeds {bound:.3e} (reference scale {scale:.3e})"
    );
}

/// Pipeline frames may differ from the reference by at most this many uint8 levels …
pub const MAX_LEVELS: i64 = 1;
/// … in at least this fraction of the values.
pub const MIN_MATCH: f64 = 0.999;

/// Generation settings of a `wan_pipeline` fixture case (`<task>.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PipelineSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub frames: i64,
    pub height: i64,
    pub width: i64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub shift: f64,
}

/// The settings of case `name` of the pipeline fixture in `fx`.
pub fn pipeline_settings(fx: &Path, name: &str) -> PipelineSettings {
    let path = fx.join(format!("{name}.json"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Largest |difference| in uint8 levels and the fraction of values within [`MAX_LEVELS`].
pub fn frame_agreement(got: &Tensor, want: &Tensor) -> (i64, f64) {
    use tch::Kind;
    assert_eq!(got.size(), want.size(), "frame shape mismatch");
    let diff = (got.to_kind(Kind::Int64) - want.to_kind(Kind::Int64)).abs();
    let max = diff.max().int64_value(&[]);
    let within = diff.le(MAX_LEVELS).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    (max, within)
}

/// Asserts at least [`MIN_MATCH`] of the frame values are within [`MAX_LEVELS`] of the reference.
#[track_caller]
pub fn assert_frames_match(what: &str, got: &Tensor, want: &Tensor) {
    let (max, within) = frame_agreement(got, want);
    eprintln!("{what}: max |diff| {max} levels, {:.4}% within {MAX_LEVELS}", within * 100.0);
    assert!(
        within >= MIN_MATCH,
        "{what}: only {:.4}% of values within {MAX_LEVELS} level(s) of the reference (need {:.1}%), max {max}",
        within * 100.0,
        MIN_MATCH * 100.0
    );
}
