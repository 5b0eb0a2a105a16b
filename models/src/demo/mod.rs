//! What the tiny random-initialised demo models of every family ([`crate::wan::demo`],
//! [`crate::qwen_image::demo`]) share: seeded, portable initial values ([`init()`]) and the
//! writing of a diffusers component (`config.json` beside fp32 safetensors with the reference key
//! names, each tensor drawn from a generator seeded by the seed and its key alone).

mod init;

use std::path::Path;

use serde_json::Value;
use tch::{Tensor, nn};

use crate::error::Error;
pub(crate) use init::{Normal, init};

pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Write { path: dir.to_owned(), message: e.to_string() })
}

/// Writes `value` as pretty JSON with a final newline, creating the parent directory.
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise") + "\n";
    write_text(path, &text)
}

pub(crate) fn write_text(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text)
        .map_err(|e| Error::Write { path: path.to_owned(), message: e.to_string() })
}

/// Writes `config.json` and `file_name` (the tensors of `shapes`, randomly initialised) into `dir`.
/// Each tensor's generator is seeded by `seed` and `<dir name>/<key>`.
pub(crate) fn write_component(
    dir: &Path,
    config: &Value,
    file_name: &str,
    shapes: &[(String, Vec<i64>)],
    seed: u64,
) -> Result<(), Error> {
    write_json(&dir.join("config.json"), config)?;
    let component = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let tensors: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(key, shape)| {
            let mut rng = Normal::new(seed, &format!("{component}/{key}"));
            (key.clone(), init(key, shape, &mut rng))
        })
        .collect();
    let path = dir.join(file_name);
    Tensor::write_safetensors(&tensors, &path)
        .map_err(|e| Error::Write { path, message: e.to_string() })
}

/// The parameters (key, shape) a var store holds once a model is built on it, sorted by key.
pub(crate) fn shapes_of(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
    let mut shapes: Vec<(String, Vec<i64>)> =
        vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect();
    shapes.sort();
    shapes
}

pub(crate) fn build_err(what: &'static str) -> impl Fn(String) -> Error {
    move |message| Error::DemoBuild { what, message }
}
