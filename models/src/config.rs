//! Model configs: one JSON file per component, next to its weights, or a named preset when the
//! weights come without one (the original Wan release).

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Component, Error};

/// A component's config: serde from its `config.json`, plus the checks x2v needs.
pub trait ModelConfig: DeserializeOwned {
    const COMPONENT: Component;

    /// Values x2v does not support, described for the user.
    fn validate(&self) -> Result<(), String>;

    /// The config object inside the file's JSON (some files nest it, e.g. CLIP's
    /// `vision_config`).
    fn select(json: serde_json::Value) -> serde_json::Value {
        json
    }
}

/// Reads and validates the config file at `path`.
pub fn read_config_file<T: ModelConfig>(path: &Path) -> Result<T, Error> {
    let bad = |message: String| Error::config(T::COMPONENT, Some(path), message);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let cfg: T = serde_json::from_value(T::select(json)).map_err(|e| bad(e.to_string()))?;
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

/// The config of the component stored at `dir`: `dir/config.json` when there is one, else
/// `preset()` (validated too).
pub fn read_config<T: ModelConfig>(dir: &Path, preset: impl FnOnce() -> T) -> Result<T, Error> {
    let file = dir.join("config.json");
    if file.is_file() {
        return read_config_file(&file);
    }
    checked(preset())
}

/// Validates a config given in code (a preset or a caller's override).
pub fn checked<T: ModelConfig>(cfg: T) -> Result<T, Error> {
    cfg.validate().map_err(|m| Error::config(T::COMPONENT, None, m))?;
    Ok(cfg)
}
