//! Tensor comparisons for parity tests against the reference fixtures that
//! [`x2v_testkit::fixtures`] generates, shared by this crate's tests and the CLI's. Behind the
//! `testing` feature: only dev-dependencies enable it.

pub use x2v_testkit::fixtures::{
    MAX_LEVELS, MIN_MATCH, PipelineSettings, fixture, pipeline_settings, python,
};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::{Kind, Tensor};

/// Every file under `dir` by relative path, with its bytes (to compare written model
/// directories).
pub fn files_by_path(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                let bytes =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.insert(rel, bytes);
            }
        }
    }
    out
}

/// All tensors of a safetensors file, by name.
pub fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Max absolute difference and the reference's max absolute value (the scale tolerances refer to).
pub fn max_abs_diff(got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.size(), want.size(), "shape mismatch");
    let got = got.to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    let diff = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    (diff, scale)
}

/// Asserts `got` is within `tol * max(1, max|want|)` of `want` elementwise, and prints the measured
/// difference (the figure a parity report quotes; `--nocapture` shows it).
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let (diff, scale) = max_abs_diff(got, want);
    eprintln!("{what}: max |diff| {diff:.2e} (reference scale {scale:.2e})");
    let bound = tol * scale.max(1.0);
    assert!(
        diff <= bound,
        "{what}: max |diff| {diff:.3e} exceeds {bound:.3e} (reference scale {scale:.3e})"
    );
}

/// Largest |difference| in uint8 levels and the fraction of values within [`MAX_LEVELS`].
pub fn frame_agreement(got: &Tensor, want: &Tensor) -> (i64, f64) {
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
