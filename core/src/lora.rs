//! What a job asks of LoRA adapters: names (file stems in a served model's adapter directory) with
//! a weight each, checked the same way by the gateway, the stages and the CLI.

use serde::{Deserialize, Serialize};

/// Adapters one job may compose at most.
pub const MAX_LORAS: usize = 8;
/// Longest adapter name.
pub const MAX_NAME: usize = 128;
/// Bounds of an adapter's weight.
pub const SCALE: (f64, f64) = (-10.0, 10.0);

/// One adapter of a job and its weight (diffusers' `set_adapters(..., adapter_weights)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    pub name: String,
    pub scale: f32,
}

/// Checks an adapter name: letters, digits, `.`, `_` and `-`, not starting with `.` (a name is a
/// file stem in the adapter directory, never a path).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "LoRA name {name:?} must be 1-{MAX_NAME} letters, digits, `.`, `_` or `-`, not \
             starting with `.`"
        ))
    }
}

/// `NAME` of every `NAME.safetensors` in `dir` with a valid name, sorted (none if `dir` cannot be
/// read).
pub fn list_names(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".safetensors")?.to_owned();
            check_name(&name).is_ok().then_some(name)
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_file_stems_never_paths() {
        for ok in ["style", "wan2.1-lightx2v_4step", "A.b-c_9"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "../x", "a/b", "a b", "a:1", &"x".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_valid_safetensors_stems_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.safetensors", "a.safetensors", ".x.safetensors", "c.bin", "d e.safetensors"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        assert_eq!(list_names(dir.path()), ["a", "b"]);
        assert!(list_names(&dir.path().join("missing")).is_empty());
    }
}
