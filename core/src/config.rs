//! Layered configuration: a struct's defaults, then a TOML or JSON file, then `X2V_*` variables.
//!
//! Every binary has one serde struct (`Default` + `Serialize` + `Deserialize`). [`load`] turns the
//! defaults into a JSON tree, merges the file over it, then the environment, and deserializes the
//! result. Keys the defaults do not have are errors that name the key, so a typo in a file is caught
//! at start-up rather than silently ignored.
//!
//! Environment variables: `X2V_<SECTION>__<FIELD>=value` (double underscore between levels, case
//! insensitive), e.g. `X2V_GATEWAY__LISTEN=0.0.0.0:8000`. A value is read as the type of the field it
//! replaces: strings verbatim, numbers, booleans, arrays and tables as JSON. Variables under the
//! prefix that name no field are reported as warnings, since the environment is shared with tools.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "X2V_";

/// `X2V_*` variables the binaries read themselves (config path, tool paths); never warned about.
pub const RESERVED_VARS: &[&str] = &["X2V_CONFIG", "X2V_PYTHON", "X2V_REDIS_URL"];

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid {format}: {message}")]
    Parse { path: PathBuf, format: &'static str, message: String },
    #[error("config file {path} has an unknown key `{key}`")]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path} must hold a table at the top level")]
    NotATable { path: PathBuf },
    #[error("environment variable {var}={value:?} is not a valid {expected}")]
    BadEnvValue { var: String, value: String, expected: &'static str },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// Configuration errors are always the operator's input.
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::InvalidRequest
    }
}

/// A warning produced while loading (the loader has no subscriber of its own to log to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning(pub String);

/// Loads `T` from its defaults, an optional file and the process environment.
pub fn load<T>(file: Option<&Path>) -> Result<(T, Vec<ConfigWarning>), ConfigError>
where
    T: Default + Serialize + DeserializeOwned,
{
    load_from(file, std::env::vars())
}

/// [`load`] with an explicit environment (for tests and embedding).
pub fn load_from<T, I>(file: Option<&Path>, env: I) -> Result<(T, Vec<ConfigWarning>), ConfigError>
where
    T: Default + Serialize + DeserializeOwned,
    I: IntoIterator<Item = (String, String)>,
{
    let mut tree =
        serde_json::to_value(T::default()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    if let Some(path) = file {
        let overlay = read_file(path)?;
        merge(&mut tree, overlay, "", path)?;
    }
    let mut warnings = Vec::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !RESERVED_VARS.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (var, value) in vars {
        let path: Vec<String> =
            var[ENV_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
        match lookup_mut(&mut tree, &path) {
            Some(slot) => *slot = env_value(slot, &var, value)?,
            None => {
                warnings.push(ConfigWarning(format!("{var} names no configuration field; ignored")))
            }
        }
    }
    // The path names the offending field (`transfer.transport: unknown variant ...`).
    let value = serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::Invalid(if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        })
    })?;
    Ok((value, warnings))
}

fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let value = if is_json {
        serde_json::from_str::<Value>(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            format: "JSON",
            message: e.to_string(),
        })?
    } else {
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            format: "TOML",
            message: e.to_string(),
        })?;
        serde_json::to_value(table).map_err(|e| ConfigError::Invalid(e.to_string()))?
    };
    if !value.is_object() {
        return Err(ConfigError::NotATable { path: path.into() });
    }
    Ok(value)
}

/// Merges `overlay` into `base`. Tables merge key by key; anything else replaces. Keys absent from
/// the defaults are errors, except under a table that is empty in the defaults (a free-form map).
fn merge(base: &mut Value, overlay: Value, prefix: &str, path: &Path) -> Result<(), ConfigError> {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            let free_form = base.is_empty();
            for (key, value) in overlay {
                let full = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value, &full, path)?,
                    None if free_form => {
                        base.insert(key, value);
                    }
                    None => return Err(ConfigError::UnknownKey { path: path.into(), key: full }),
                }
            }
            Ok(())
        }
        (slot, value) => {
            *slot = value;
            Ok(())
        }
    }
}

fn lookup_mut<'a>(tree: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(tree, |node, key| {
        node.as_object_mut().and_then(|m: &mut Map<String, Value>| m.get_mut(key))
    })
}

fn env_value(current: &Value, var: &str, raw: String) -> Result<Value, ConfigError> {
    let bad =
        |expected| ConfigError::BadEnvValue { var: var.to_owned(), value: raw.clone(), expected };
    match current {
        Value::String(_) => Ok(Value::String(raw)),
        Value::Bool(_) => match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Value::Bool(true)),
            "0" | "false" | "no" | "off" => Ok(Value::Bool(false)),
            _ => Err(bad("boolean (true/false)")),
        },
        Value::Number(_) => match serde_json::from_str::<Value>(&raw) {
            Ok(v @ Value::Number(_)) => Ok(v),
            _ => Err(bad("number")),
        },
        Value::Array(_) => match serde_json::from_str::<Value>(&raw) {
            Ok(v @ Value::Array(_)) => Ok(v),
            _ => Err(bad("JSON array")),
        },
        Value::Object(_) => match serde_json::from_str::<Value>(&raw) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(bad("JSON object")),
        },
        // An unset optional field: JSON if it parses as a scalar, otherwise the text itself.
        Value::Null => Ok(serde_json::from_str::<Value>(&raw)
            .ok()
            .filter(|v| !v.is_object() && !v.is_array() && !v.is_null())
            .unwrap_or(Value::String(raw))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Server {
        listen: String,
        workers: u32,
        verbose: bool,
        otlp_endpoint: Option<String>,
        ranks: Vec<u32>,
        labels: BTreeMap<String, String>,
    }

    impl Default for Server {
        fn default() -> Self {
            Server {
                listen: "127.0.0.1:8000".into(),
                workers: 2,
                verbose: false,
                otlp_endpoint: None,
                ranks: vec![0],
                labels: BTreeMap::new(),
            }
        }
    }

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Root {
        name: String,
        server: Server,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_then_file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            &dir,
            "x.toml",
            "name = \"a\"\n[server]\nworkers = 8\nlisten = \"0.0.0.0:1\"\n[server.labels]\nzone = \"eu\"\n",
        );
        let (cfg, warnings): (Root, _) = load_from(
            Some(&file),
            env(&[
                ("X2V_SERVER__WORKERS", "16"),
                ("X2V_SERVER__VERBOSE", "true"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(cfg.name, "a");
        assert_eq!(cfg.server.listen, "0.0.0.0:1");
        assert_eq!(cfg.server.workers, 16);
        assert!(cfg.server.verbose);
        assert_eq!(cfg.server.ranks, vec![0]);
        assert_eq!(cfg.server.labels["zone"], "eu");
    }

    #[test]
    fn json_files_and_optional_fields() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "x.json", r#"{"server": {"ranks": [1, 2]}}"#);
        let (cfg, _): (Root, _) =
            load_from(Some(&file), env(&[("X2V_SERVER__OTLP_ENDPOINT", "http://collector:4317")]))
                .unwrap();
        assert_eq!(cfg.server.ranks, vec![1, 2]);
        assert_eq!(cfg.server.otlp_endpoint.as_deref(), Some("http://collector:4317"));
    }

    #[test]
    fn string_fields_keep_numeric_text() {
        let (cfg, _): (Root, _) = load_from(None, env(&[("X2V_NAME", "123")])).unwrap();
        assert_eq!(cfg.name, "123");
    }

    #[test]
    fn unknown_file_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "x.toml", "[server]\nworkrs = 3\n");
        let err = load_from::<Root, _>(Some(&file), env(&[])).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "server.workrs"),
            "{err}"
        );
        assert!(err.to_string().contains("server.workrs"));
    }

    #[test]
    fn bad_values_are_named() {
        let err = load_from::<Root, _>(None, env(&[("X2V_SERVER__WORKERS", "many")])).unwrap_err();
        assert!(err.to_string().contains("X2V_SERVER__WORKERS"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "x.toml", "[server]\nworkers = \"eight\"\n");
        let err = load_from::<Root, _>(Some(&file), env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        let file = write(&dir, "y.toml", "[server\n");
        let err = load_from::<Root, _>(Some(&file), env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { format: "TOML", .. }), "{err}");
        let err =
            load_from::<Root, _>(Some(&dir.path().join("missing.toml")), env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn unknown_env_vars_warn() {
        let (_, warnings): (Root, _) =
            load_from(None, env(&[("X2V_CACHE", "/tmp/c"), ("X2V_CONFIG", "/etc/x2v.toml")]))
                .unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].0.contains("X2V_CACHE"));
    }
}
