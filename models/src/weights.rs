//! Checkpoint tensors into `tch` var stores: safetensors files (single, or sharded through an
//! `*.index.json`), `torch.save` pickles (the original Wan `.pth` files), key remapping, strict
//! key and shape checks, and the dtype policy (a model dtype plus a keep-in-fp32 list).
//!
//! Model code builds its modules on an `nn::Path` whose segments equal the checkpoint keys of the
//! reference layout (diffusers), then calls [`load_into`]. Other layouts are handled by a remap
//! function applied to the checkpoint's keys (data, not scattered `if`s).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor, nn};

/// Why weights could not be loaded. Every variant names the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("checkpoint file {0} does not exist")]
    MissingFile(PathBuf),
    #[error(
        "no safetensors checkpoint in {0} (looked for *.safetensors and *.safetensors.index.json)"
    )]
    NoCheckpoint(PathBuf),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("bad shard index {path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("checkpoint {source_desc} is missing key `{key}`")]
    MissingKey { key: String, source_desc: String },
    #[error("checkpoint {source_desc} has unexpected key `{key}` (not a parameter of the model)")]
    UnexpectedKey { key: String, source_desc: String },
    #[error("key `{key}` has shape {got:?} in {source_desc}, the model expects {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<i64>, got: Vec<i64>, source_desc: String },
    #[error("key `{key}` appears in more than one shard of {source_desc}")]
    DuplicateKey { key: String, source_desc: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl WeightsError {
    pub fn kind(&self) -> x2v_core::ErrorKind {
        match self {
            WeightsError::Torch(_) => x2v_core::ErrorKind::Internal,
            _ => x2v_core::ErrorKind::InvalidRequest,
        }
    }
}

/// A set of named tensors read from checkpoint files (kept on the CPU until loaded).
pub struct Checkpoint {
    tensors: BTreeMap<String, Tensor>,
    /// Where the tensors came from, for error messages.
    desc: String,
}

impl Checkpoint {
    /// Reads a `.safetensors` file, a `*.safetensors.index.json` shard index, a `.pth`/`.pt`/`.bin`
    /// pickle, or a directory holding one safetensors file or one shard index.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        if !path.exists() {
            return Err(WeightsError::MissingFile(path.to_owned()));
        }
        if path.is_dir() {
            return Self::open(&find_in_dir(path)?);
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".index.json") {
            return Self::open_index(path);
        }
        let read_err =
            |e: tch::TchError| WeightsError::Read { path: path.to_owned(), message: e.to_string() };
        let tensors = if name.ends_with(".safetensors") {
            Tensor::read_safetensors(path).map_err(read_err)?
        } else {
            Tensor::loadz_multi_with_device(path, tch::Device::Cpu).map_err(read_err)?
        };
        Ok(Checkpoint { tensors: tensors.into_iter().collect(), desc: path.display().to_string() })
    }

    fn open_index(index: &Path) -> Result<Self, WeightsError> {
        let bad = |message: String| WeightsError::Index { path: index.to_owned(), message };
        let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut tensors = BTreeMap::new();
        for shard in shards {
            let shard_path = dir.join(shard);
            if !shard_path.exists() {
                return Err(WeightsError::MissingFile(shard_path));
            }
            for (key, tensor) in Checkpoint::open(&shard_path)?.tensors {
                if tensors.insert(key.clone(), tensor).is_some() {
                    return Err(WeightsError::DuplicateKey {
                        key,
                        source_desc: index.display().to_string(),
                    });
                }
            }
        }
        for key in map.keys() {
            if !tensors.contains_key(key) {
                return Err(WeightsError::MissingKey {
                    key: key.clone(),
                    source_desc: index.display().to_string(),
                });
            }
        }
        Ok(Checkpoint { tensors, desc: index.display().to_string() })
    }

    /// Builds a checkpoint from tensors already in memory.
    pub fn from_tensors(
        desc: impl Into<String>,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Self {
        Checkpoint { tensors: tensors.into_iter().collect(), desc: desc.into() }
    }

    /// Renames keys with `f`; a key mapped to `None` is dropped (keys the model does not use).
    pub fn remap(self, f: impl Fn(&str) -> Option<String>) -> Self {
        let tensors = self.tensors.into_iter().filter_map(|(k, t)| f(&k).map(|k| (k, t))).collect();
        Checkpoint { tensors, desc: self.desc }
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn description(&self) -> &str {
        &self.desc
    }
}

fn find_in_dir(dir: &Path) -> Result<PathBuf, WeightsError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| WeightsError::Read { path: dir.to_owned(), message: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let named = |suffix: &str| {
        files.iter().filter(|p| p.to_string_lossy().ends_with(suffix)).cloned().collect::<Vec<_>>()
    };
    if let [index] = named(".safetensors.index.json").as_slice() {
        return Ok(index.clone());
    }
    if let [single] = named(".safetensors").as_slice() {
        return Ok(single.clone());
    }
    Err(WeightsError::NoCheckpoint(dir.to_owned()))
}

/// How checkpoint tensors are placed into a var store.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions<'a> {
    /// Every model parameter must be present and every checkpoint key must be used.
    pub strict: bool,
    /// Cast parameters to this kind (e.g. `Kind::BFloat16`); `None` keeps the var store's kinds.
    pub dtype: Option<Kind>,
    /// Parameters whose key contains any of these patterns stay fp32 when `dtype` is set.
    pub keep_f32: &'a [&'a str],
}

impl LoadOptions<'_> {
    pub fn strict() -> Self {
        LoadOptions { strict: true, dtype: None, keep_f32: &[] }
    }
}

/// Copies `ckpt` into the variables of `vs` (matched by full key), checking keys and shapes.
pub fn load_into(
    vs: &nn::VarStore,
    ckpt: &Checkpoint,
    opts: &LoadOptions<'_>,
) -> Result<(), WeightsError> {
    let vars: HashMap<String, Tensor> = vs.variables();
    let desc = || ckpt.desc.clone();
    if opts.strict {
        let mut unexpected: Vec<&String> =
            ckpt.tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
        unexpected.sort();
        if let Some(key) = unexpected.first() {
            return Err(WeightsError::UnexpectedKey { key: (*key).clone(), source_desc: desc() });
        }
    }
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let _guard = tch::no_grad_guard();
    for name in names {
        let mut var = vars[name].shallow_clone();
        let Some(src) = ckpt.tensors.get(name) else {
            if opts.strict {
                return Err(WeightsError::MissingKey { key: name.clone(), source_desc: desc() });
            }
            continue;
        };
        if src.size() != var.size() {
            return Err(WeightsError::ShapeMismatch {
                key: name.clone(),
                expected: var.size(),
                got: src.size(),
                source_desc: desc(),
            });
        }
        let kind = match opts.dtype {
            Some(k) if !opts.keep_f32.iter().any(|p| name.contains(p)) => k,
            Some(_) => Kind::Float,
            None => var.kind(),
        };
        if var.kind() == kind {
            var.f_copy_(src)?;
        } else {
            // Replaces the variable's storage; every handle to it sees the new dtype.
            var.set_data(&src.to_device(var.device()).to_kind(kind));
        }
    }
    Ok(())
}

/// Bytes held by the parameters of `vs` (element count × element size, each in its own dtype).
pub fn parameter_bytes(vs: &nn::VarStore) -> u64 {
    vs.variables().values().map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Module;

    fn model(vs: &nn::Path) -> nn::Sequential {
        nn::seq()
            .add(nn::linear(vs / "proj_in", 4, 8, Default::default()))
            .add(nn::layer_norm(vs / "norm", vec![8], Default::default()))
            .add(nn::linear(vs / "proj_out", 8, 2, Default::default()))
    }

    fn reference() -> (nn::VarStore, nn::Sequential) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = model(&vs.root());
        (vs, m)
    }

    fn save(vs: &nn::VarStore, path: &Path, rename: impl Fn(&str) -> String) {
        let vars: Vec<(String, Tensor)> =
            vs.variables().into_iter().map(|(k, t)| (rename(&k), t)).collect();
        Tensor::write_safetensors(&vars, path).unwrap();
    }

    #[test]
    fn loads_renamed_checkpoint_and_reproduces_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let (src_vs, src) = reference();
        let file = dir.path().join("model.safetensors");
        save(&src_vs, &file, |k| k.replace("proj_", "p."));
        let ckpt = Checkpoint::open(dir.path()).unwrap().remap(|k| Some(k.replace("p.", "proj_")));

        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = model(&vs.root());
        load_into(&vs, &ckpt, &LoadOptions::strict()).unwrap();
        let x = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let diff = (m.forward(&x) - src.forward(&x)).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn strict_loading_names_missing_unexpected_and_misshapen_keys() {
        let (src_vs, _) = reference();
        let vars = src_vs.variables();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _m = model(&vs.root());

        let mut partial: Vec<(String, Tensor)> =
            vars.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        partial.retain(|(k, _)| k != "norm.bias");
        let err = load_into(&vs, &Checkpoint::from_tensors("t", partial), &LoadOptions::strict())
            .unwrap_err();
        assert!(
            matches!(&err, WeightsError::MissingKey { key, .. } if key == "norm.bias"),
            "{err}"
        );

        let mut extra: Vec<(String, Tensor)> =
            vars.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        extra.push(("head.weight".into(), Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))));
        let err = load_into(&vs, &Checkpoint::from_tensors("t", extra), &LoadOptions::strict())
            .unwrap_err();
        assert!(err.to_string().contains("unexpected key `head.weight`"), "{err}");

        let mut wrong: Vec<(String, Tensor)> =
            vars.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        wrong.retain(|(k, _)| k != "proj_out.weight");
        wrong.push((
            "proj_out.weight".into(),
            Tensor::zeros([3, 8], (Kind::Float, tch::Device::Cpu)),
        ));
        let err = load_into(&vs, &Checkpoint::from_tensors("t", wrong), &LoadOptions::strict())
            .unwrap_err();
        assert!(
            matches!(&err, WeightsError::ShapeMismatch { key, got, .. } if key == "proj_out.weight" && got == &vec![3, 8])
        );
    }

    #[test]
    fn sharded_index_and_dtype_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (src_vs, _) = reference();
        let vars = src_vs.variables();
        let (a, b): (Vec<_>, Vec<_>) = vars
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .partition(|(k, _)| k.starts_with("proj"));
        Tensor::write_safetensors(&a, dir.path().join("m-00001-of-00002.safetensors")).unwrap();
        Tensor::write_safetensors(&b, dir.path().join("m-00002-of-00002.safetensors")).unwrap();
        let weight_map: serde_json::Map<String, serde_json::Value> = a
            .iter()
            .map(|(k, _)| (k.clone(), "m-00001-of-00002.safetensors".into()))
            .chain(b.iter().map(|(k, _)| (k.clone(), "m-00002-of-00002.safetensors".into())))
            .collect();
        let index = dir.path().join("m.safetensors.index.json");
        std::fs::write(
            &index,
            serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
        )
        .unwrap();

        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.len(), vars.len());
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _m = model(&vs.root());
        let opts = LoadOptions { strict: true, dtype: Some(Kind::BFloat16), keep_f32: &["norm."] };
        load_into(&vs, &ckpt, &opts).unwrap();
        let loaded = vs.variables();
        assert_eq!(loaded["proj_in.weight"].kind(), Kind::BFloat16);
        assert_eq!(loaded["norm.weight"].kind(), Kind::Float);

        std::fs::remove_file(dir.path().join("m-00002-of-00002.safetensors")).unwrap();
        let err = Checkpoint::open(&index).err().expect("a missing shard is an error");
        assert!(
            matches!(err, WeightsError::MissingFile(ref p) if p.ends_with("m-00002-of-00002.safetensors")),
            "{err}"
        );
    }

    #[test]
    fn missing_paths_are_named() {
        let err = Checkpoint::open(Path::new("/nonexistent/x.safetensors")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/x.safetensors"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Checkpoint::open(dir.path()), Err(WeightsError::NoCheckpoint(_))));
    }
}
