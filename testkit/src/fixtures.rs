//! Reference fixtures for parity tests: generated on demand by the Python scripts in
//! `tools/fixtures/` (diffusers/transformers on tiny random weights) and cached by the scripts'
//! content hash, so a changed generator always regenerates its fixture.
//!
//! The Python interpreter is `$X2V_PYTHON` (set by the Makefile), else the venv that
//! `make setup` creates; a missing interpreter is a test failure that says to run `make setup`.
//! Reading the fixtures' tensors needs libtorch: `x2v_models::testing` does that.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::repo_root;

static GENERATE: Mutex<()> = Mutex::new(());

/// Pipeline frames may differ from the reference by at most this many uint8 levels …
pub const MAX_LEVELS: i64 = 1;
/// … in at least this fraction of the values.
pub const MIN_MATCH: f64 = 0.999;

/// The Python interpreter of the fixture generators.
pub fn python() -> PathBuf {
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

/// The script plus every module it imports from `tools/fixtures/` or `tools/` (`from umt5 import
/// ...`, `import export_vae_onnx`), transitively, so that a change to any of them regenerates the
/// fixture.
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
            let file = format!("{module}.py");
            let found = [tools.join(&file), tools.parent().unwrap_or(tools).join(&file)]
                .into_iter()
                .find(|p| p.exists());
            if let Some(sibling) = found
                && !sources.contains(&sibling)
            {
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
    /// Wan2.2 A14B: the low-noise expert's scale.
    #[serde(default)]
    pub guidance_scale_2: Option<f64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_sources_follow_sibling_imports() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("main.py", "import torch\nfrom helper import f\n");
        write("helper.py", "import deep, os\n");
        write("deep.py", "x = 1\n");
        let main = dir.path().join("main.py");
        let names: Vec<_> = generator_sources(dir.path(), &main)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["main.py", "helper.py", "deep.py"]);
    }

    #[test]
    fn content_hash_changes_with_any_source() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.py"), dir.path().join("b.py"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let before = content_hash(&[a.clone(), b.clone()]);
        std::fs::write(&b, "c").unwrap();
        assert_ne!(before, content_hash(&[a, b]));
    }
}
