//! Checkpoint tensors into `tch` var stores: safetensors files (single, or sharded through an
//! `*.index.json`), `torch.save` archives (the original Wan `.pth` files), key remapping and
//! layout conversion, strict key and shape checks.
//!
//! Loading never holds a second copy of the weights. Model code creates every parameter empty, in
//! its final dtype on its final device ([`crate::nn::Builder`]); a [`Checkpoint`] only indexes its
//! files, which are memory-mapped; [`load_into`] copies each tensor from the mapping into its
//! parameter (converting the dtype on the way) in file order and gives the file pages back behind
//! it, so host memory while loading is the parameters plus a window of one tensor.
//!
//! Model code builds its modules on an `nn::Path` whose segments equal the checkpoint keys of the
//! reference layout (diffusers), then calls [`load_into`]. Other layouts are handled by a remap
//! function applied to the checkpoint's keys (data, not scattered `if`s).

mod mapped;
mod pth;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::{Kind, Tensor, nn};

use crate::error::{Component, Error};
use mapped::{Mapping, safetensors_index};

/// Where one checkpoint tensor's values are.
enum Source {
    /// `shape`·`kind` bytes at `start` in a mapped file.
    Mapped { map: Arc<Mapping>, start: usize },
    /// Already in memory (tensors given by the caller, or a format read whole).
    Memory(Tensor),
}

/// One checkpoint tensor, not read yet: its element type, shape and where its values are.
pub struct Entry {
    source: Source,
    kind: Kind,
    shape: Vec<i64>,
}

impl Entry {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    fn byte_len(&self) -> usize {
        self.shape.iter().product::<i64>() as usize * self.kind.elt_size_in_bytes()
    }

    /// The same values under another shape with the same element count.
    pub fn reshape(self, shape: &[i64]) -> Entry {
        assert_eq!(
            shape.iter().product::<i64>(),
            self.shape.iter().product::<i64>(),
            "reshape {:?} -> {shape:?} changes the element count",
            self.shape
        );
        let source = match self.source {
            Source::Memory(t) => Source::Memory(t.reshape(shape)),
            mapped => mapped,
        };
        Entry { source, kind: self.kind, shape: shape.to_vec() }
    }

    /// `n` equal parts along dim 0 (PyTorch's `chunk(n, 0)` for a divisible size); row-major
    /// parts of a mapped tensor are byte ranges of it, so nothing is read.
    pub fn chunk0(self, n: i64) -> Vec<Entry> {
        let rows = self.shape.first().copied().unwrap_or(0);
        assert!(n > 0 && rows % n == 0, "cannot split {rows} rows into {n} equal parts");
        let mut shape = self.shape.clone();
        shape[0] = rows / n;
        let part_bytes = self.byte_len() / n as usize;
        (0..n)
            .map(|i| {
                let source = match &self.source {
                    Source::Mapped { map, start } => {
                        Source::Mapped { map: map.clone(), start: start + i as usize * part_bytes }
                    }
                    Source::Memory(t) => Source::Memory(t.narrow(0, i * shape[0], shape[0])),
                };
                Entry { source, kind: self.kind, shape: shape.clone() }
            })
            .collect()
    }

    /// Copies the values into `dst` (same shape; the dtype and device may differ). A mapped
    /// tensor is copied in windows of whole rows, each window's file pages released as soon as it
    /// is copied, so even the largest tensor holds at most [`COPY_WINDOW`] of file pages.
    fn copy_into(&self, dst: &mut Tensor) -> Result<(), tch::TchError> {
        let (map, start) = match &self.source {
            Source::Memory(t) => return dst.f_copy_(t),
            Source::Mapped { map, start } => (map, *start),
        };
        let len = self.byte_len();
        let rows = self.shape.first().copied().unwrap_or(1).max(1) as usize;
        if len == 0 {
            return Ok(());
        }
        let row_bytes = len / rows;
        let rows_per_window = (COPY_WINDOW / row_bytes.max(1)).max(1);
        let mut row = 0;
        while row < rows {
            let n = rows_per_window.min(rows - row);
            let from = start + row * row_bytes;
            let bytes = &map.bytes()[from..from + n * row_bytes];
            let mut shape = self.shape.clone();
            if let Some(first) = shape.first_mut() {
                *first = n as i64;
            }
            let mut part = if self.shape.is_empty() {
                dst.shallow_clone()
            } else {
                dst.narrow(0, row as i64, n as i64)
            };
            copy_bytes(bytes, &shape, self.kind, &mut part)?;
            map.release_before(from + n * row_bytes);
            row += n;
        }
        Ok(())
    }
}

/// File pages one copy holds at most before they are released.
const COPY_WINDOW: usize = 16 << 20;

/// Copies `bytes` (row-major `shape` of `kind`) into `dst`.
fn copy_bytes(
    bytes: &[u8],
    shape: &[i64],
    kind: Kind,
    dst: &mut Tensor,
) -> Result<(), tch::TchError> {
    if !(bytes.as_ptr() as usize).is_multiple_of(kind.elt_size_in_bytes()) {
        // Misaligned for its element type: go through an aligned copy.
        let t = Tensor::f_from_data_size(bytes, shape, kind)?;
        return dst.f_copy_(&t);
    }
    // SAFETY: `bytes` holds exactly `shape`·`kind` aligned values and stays mapped while the view
    // lives; the view is read once by `copy_` and dropped before returning, so it never outlives
    // the mapping.
    let view = unsafe { Tensor::f_from_blob(bytes.as_ptr(), shape, &[], kind, tch::Device::Cpu)? };
    dst.f_copy_(&view)
}

/// A set of named checkpoint tensors, indexed but not read.
pub struct Checkpoint {
    entries: BTreeMap<String, Entry>,
    /// Where the tensors came from, for error messages.
    desc: String,
}

impl Checkpoint {
    /// Indexes a `.safetensors` file, a `*.safetensors.index.json` shard index, a `.pth`/`.pt`/
    /// `.bin` archive, or a directory holding one safetensors file or one shard index.
    pub fn open(path: &Path) -> Result<Self, Error> {
        if !path.exists() {
            return Err(Error::MissingFile(path.to_owned()));
        }
        if path.is_dir() {
            return Self::open(&find_in_dir(path)?);
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".index.json") {
            return Self::open_index(path);
        }
        let entries = if name.ends_with(".safetensors") {
            open_safetensors(path)?
        } else {
            open_pickle(path)?
        };
        Ok(Checkpoint { entries, desc: path.display().to_string() })
    }

    fn open_index(index: &Path) -> Result<Self, Error> {
        let bad = |message: String| Error::Index { path: index.to_owned(), message };
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
        let mut entries = BTreeMap::new();
        for shard in shards {
            let shard_path = dir.join(shard);
            if !shard_path.exists() {
                return Err(Error::MissingFile(shard_path));
            }
            for (key, entry) in Checkpoint::open(&shard_path)?.entries {
                if entries.insert(key.clone(), entry).is_some() {
                    return Err(Error::DuplicateKey {
                        key,
                        source_desc: index.display().to_string(),
                    });
                }
            }
        }
        if let Some(key) = map.keys().find(|k| !entries.contains_key(*k)) {
            return Err(Error::MissingKey {
                key: key.clone(),
                source_desc: index.display().to_string(),
            });
        }
        Ok(Checkpoint { entries, desc: index.display().to_string() })
    }

    /// Builds a checkpoint from tensors already in memory.
    pub fn from_tensors(
        desc: impl Into<String>,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Self {
        let entries = tensors
            .into_iter()
            .map(|(k, t)| {
                let entry = Entry { kind: t.kind(), shape: t.size(), source: Source::Memory(t) };
                (k, entry)
            })
            .collect();
        Checkpoint { entries, desc: desc.into() }
    }

    /// Renames keys with `f`; a key mapped to `None` is dropped (keys the model does not use).
    pub fn remap(self, f: impl Fn(&str) -> Option<String>) -> Self {
        let entries = self.entries.into_iter().filter_map(|(k, e)| f(&k).map(|k| (k, e))).collect();
        Checkpoint { entries, desc: self.desc }
    }

    /// Rewrites each `(key, entry)` into any number of new ones (renames, reshapes, splits of a
    /// fused tensor), for converting between layouts without reading any values.
    pub fn transform(self, mut f: impl FnMut(&str, Entry) -> Vec<(String, Entry)>) -> Self {
        let entries = self.entries.into_iter().flat_map(|(k, e)| f(&k, e)).collect();
        Checkpoint { entries, desc: self.desc }
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn description(&self) -> &str {
        &self.desc
    }
}

fn open_safetensors(path: &Path) -> Result<BTreeMap<String, Entry>, Error> {
    let map = Arc::new(Mapping::open(path)?);
    let index = safetensors_index(&map)?;
    Ok(index
        .into_iter()
        .map(|(name, raw)| {
            let source = Source::Mapped { map: map.clone(), start: raw.start };
            (name, Entry { source, kind: raw.kind, shape: raw.shape })
        })
        .collect())
}

/// A `torch.save` archive: indexed in place when its tensors lie contiguously in the file, else
/// (legacy format, strided views) read whole by libtorch.
fn open_pickle(path: &Path) -> Result<BTreeMap<String, Entry>, Error> {
    match pth::read_index(path) {
        Ok(index) => {
            let map = Arc::new(Mapping::open(path)?);
            let mut entries = BTreeMap::new();
            for t in index {
                let end = t.offset.saturating_add(t.len);
                if end > map.bytes().len() as u64 {
                    return Err(Error::Read {
                        path: path.to_owned(),
                        message: format!("tensor `{}` runs past the end of the file", t.name),
                    });
                }
                let source = Source::Mapped { map: map.clone(), start: t.offset as usize };
                entries.insert(t.name, Entry { source, kind: t.kind, shape: t.shape });
            }
            Ok(entries)
        }
        Err(pth::PthError::Unsupported(why)) => {
            tracing::debug!(path = %path.display(), why, "reading the archive whole");
            read_pickle_whole(path)
        }
        Err(e) => Err(Error::Read { path: path.to_owned(), message: e.to_string() }),
    }
}

fn read_pickle_whole(path: &Path) -> Result<BTreeMap<String, Entry>, Error> {
    let read_err = |e: tch::TchError| Error::Read { path: path.to_owned(), message: e.to_string() };
    let tensors = Tensor::loadz_multi_with_device(path, tch::Device::Cpu).map_err(read_err)?;
    Ok(tensors
        .into_iter()
        .map(|(k, t)| (k, Entry { kind: t.kind(), shape: t.size(), source: Source::Memory(t) }))
        .collect())
}

fn find_in_dir(dir: &Path) -> Result<PathBuf, Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Read { path: dir.to_owned(), message: e.to_string() })?
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
    Err(Error::NoCheckpoint(dir.to_owned()))
}

/// How checkpoint tensors are placed into a var store.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Every model parameter must be present and every checkpoint key must be used.
    pub strict: bool,
}

impl LoadOptions {
    pub fn strict() -> Self {
        LoadOptions { strict: true }
    }
}

/// Copies `ckpt` into the variables of `vs` (matched by full key), checking every key and shape
/// before the first copy. Each parameter keeps its own dtype and device: a bf16 checkpoint fills
/// fp32 parameters and the other way round. Mapped tensors are copied in file order and the
/// pages behind them released as the copy moves on.
pub fn load_into(vs: &nn::VarStore, ckpt: &Checkpoint, opts: &LoadOptions) -> Result<(), Error> {
    let started = Instant::now();
    let vars: HashMap<String, Tensor> = vs.variables();
    let desc = || ckpt.desc.clone();
    if opts.strict {
        if let Some(key) = ckpt.entries.keys().find(|k| !vars.contains_key(*k)) {
            return Err(Error::UnexpectedKey { key: key.clone(), source_desc: desc() });
        }
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        if let Some(key) = names.into_iter().find(|k| !ckpt.entries.contains_key(*k)) {
            return Err(Error::MissingKey { key: key.clone(), source_desc: desc() });
        }
    }
    let mut work: Vec<(&String, &Entry, Tensor)> = Vec::with_capacity(vars.len());
    for (name, entry) in &ckpt.entries {
        let Some(var) = vars.get(name) else { continue };
        if entry.shape != var.size() {
            return Err(Error::ShapeMismatch {
                key: name.clone(),
                expected: var.size(),
                got: entry.shape.clone(),
                source_desc: desc(),
            });
        }
        work.push((name, entry, var.shallow_clone()));
    }
    // File order within each mapping, so the released prefix only ever grows.
    let order = |e: &Entry| match &e.source {
        Source::Mapped { map, start } => (Arc::as_ptr(map) as usize, *start),
        Source::Memory(_) => (0, 0),
    };
    work.sort_by_key(|(_, e, _)| order(e));
    let _guard = tch::no_grad_guard();
    let mut bytes = 0u64;
    for (name, entry, mut var) in work {
        entry.copy_into(&mut var).map_err(|e| Error::Read {
            path: PathBuf::from(&ckpt.desc),
            message: format!("copying `{name}`: {e}"),
        })?;
        bytes += entry.byte_len() as u64;
    }
    tracing::debug!(
        checkpoint = %ckpt.desc,
        tensors = ckpt.entries.len(),
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "checkpoint copied into parameters"
    );
    Ok(())
}

/// Bytes held by the parameters of `vs` (element count × element size, each in its own dtype).
pub fn parameter_bytes(vs: &nn::VarStore) -> u64 {
    vs.variables().values().map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum()
}

/// Parameters in `vs` (element count).
pub fn parameter_count(vs: &nn::VarStore) -> u64 {
    vs.variables().values().map(|t| t.numel() as u64).sum()
}

/// Hands the heap pages freed while loading (layout conversions, fused projections) back to the
/// kernel: glibc keeps freed chunks in its arenas, which RSS would otherwise carry for the life
/// of a stage process.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of this process in MiB (`VmRSS` of `/proc/self/status`; 0 where it cannot
/// be read), for benchmarks and tools that report memory.
pub fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Serves allocations of 1 MiB and more (weights, activations) straight from the kernel and
/// returns them on free, instead of glibc's default of raising that threshold to the largest
/// block freed so far (up to 32 MiB), after which freed activations stay in the heap and a
/// stage's RSS keeps the high-water mark of every job. Call once at start-up, before loading.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it has no preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Logs a loaded component: what, from where, dtype, device, parameters, bytes and time; then
/// gives the memory freed while loading back to the kernel.
pub fn log_loaded(
    component: Component,
    ckpt: &Checkpoint,
    vs: &nn::VarStore,
    kind: Kind,
    started: Instant,
) {
    tracing::info!(
        component = component.as_str(),
        checkpoint = ckpt.description(),
        dtype = ?kind,
        device = ?vs.device(),
        parameters = parameter_count(vs),
        bytes = parameter_bytes(vs),
        seconds = started.elapsed().as_secs_f64(),
        "loaded"
    );
    release_free_heap();
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Builder, LayerNorm, Linear};

    struct Model(Linear, LayerNorm, Linear);

    impl Model {
        fn forward(&self, x: &Tensor) -> Tensor {
            self.2.forward(&self.1.forward(&self.0.forward(x)))
        }
    }

    fn model(vs: &nn::VarStore, kind: Kind, keep_f32: &'static [&'static str]) -> Model {
        let b = Builder::new(vs, kind, keep_f32);
        Model(
            Linear::new(&b / "proj_in", 4, 8),
            LayerNorm::new(&b / "norm", 8, 1e-5),
            Linear::new(&b / "proj_out", 8, 2),
        )
    }

    fn reference() -> (nn::VarStore, Model) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = model(&vs, Kind::Float, &[]);
        let _guard = tch::no_grad_guard();
        for (_, mut t) in vs.variables() {
            let _ = t.normal_(0.0, 1.0);
        }
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
        let m = model(&vs, Kind::Float, &[]);
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
        let _m = model(&vs, Kind::Float, &[]);

        let mut partial: Vec<(String, Tensor)> =
            vars.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        partial.retain(|(k, _)| k != "norm.bias");
        let err = load_into(&vs, &Checkpoint::from_tensors("t", partial), &LoadOptions::strict())
            .unwrap_err();
        assert!(matches!(&err, Error::MissingKey { key, .. } if key == "norm.bias"), "{err}");

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
            matches!(&err, Error::ShapeMismatch { key, got, .. } if key == "proj_out.weight" && got == &vec![3, 8])
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
        let _m = model(&vs, Kind::BFloat16, &["norm."]);
        load_into(&vs, &ckpt, &LoadOptions::strict()).unwrap();
        let loaded = vs.variables();
        assert_eq!(loaded["proj_in.weight"].kind(), Kind::BFloat16);
        assert_eq!(loaded["norm.weight"].kind(), Kind::Float);

        std::fs::remove_file(dir.path().join("m-00002-of-00002.safetensors")).unwrap();
        let err = Checkpoint::open(&index).err().expect("a missing shard is an error");
        assert!(
            matches!(err, Error::MissingFile(ref p) if p.ends_with("m-00002-of-00002.safetensors")),
            "{err}"
        );
    }

    #[test]
    fn missing_paths_are_named() {
        let err = Checkpoint::open(Path::new("/nonexistent/x.safetensors")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/x.safetensors"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Checkpoint::open(dir.path()), Err(Error::NoCheckpoint(_))));
    }

    /// Resident bytes of this process's mappings of `file` (from `/proc/self/smaps`).
    fn resident_bytes_of(file: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = file.to_string_lossy();
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            if line.contains('-') && line.split_whitespace().count() >= 5 && !line.ends_with(" kB")
            {
                inside = line.ends_with(name.as_ref());
            } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
                total += kb.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap() * 1024;
            }
        }
        total
    }

    #[test]
    fn loading_leaves_no_file_pages_resident_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.safetensors");
        // 4 × 8 MiB fp32 tensors, filled so every page holds data.
        let tensors: Vec<(String, Tensor)> = (0..4)
            .map(|i| {
                let t = Tensor::full([2048, 1024], f64::from(i), (Kind::Float, tch::Device::Cpu));
                (format!("w{i}"), t)
            })
            .collect();
        Tensor::write_safetensors(&tensors, &file).unwrap();
        let ckpt = Checkpoint::open(&file).unwrap();
        let opened = resident_bytes_of(&file);
        assert!(
            opened <= 128 << 10,
            "opening reads the header only, yet {opened} bytes are resident"
        );
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let b = crate::nn::Builder::new(&vs, Kind::BFloat16, &[]);
        let params: Vec<Tensor> =
            (0..4).map(|i| b.param(&format!("w{i}"), &[2048, 1024])).collect();
        load_into(&vs, &ckpt, &LoadOptions::strict()).unwrap();
        let left = resident_bytes_of(&file);
        assert!(left <= 8192, "{left} bytes of the 32 MiB file stay resident after loading");
        for (i, p) in params.iter().enumerate() {
            assert_eq!(p.kind(), Kind::BFloat16);
            assert_eq!(p.mean(Kind::Float).double_value(&[]), i as f64);
        }
    }

    #[test]
    fn tensors_larger_than_the_copy_window_load_exactly() {
        // 40 MiB + one row: three windows, the last one partial; and a 0-dim tensor.
        let rows = (COPY_WINDOW * 5 / 2 / 4096) as i64 + 1;
        let big = Tensor::arange(rows, (Kind::Float, tch::Device::Cpu))
            .unsqueeze(1)
            .expand([rows, 1024], false)
            .contiguous();
        let scalar = Tensor::from(7.5f32);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.safetensors");
        Tensor::write_safetensors(&[("big", &big), ("s", &scalar)], &file).unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let b = crate::nn::Builder::new(&vs, Kind::Float, &[]);
        let p = b.param("big", &[rows, 1024]);
        let s = b.param("s", &[]);
        load_into(&vs, &Checkpoint::open(&file).unwrap(), &LoadOptions::strict()).unwrap();
        assert!(p.equal(&big));
        assert_eq!(s.double_value(&[]), 7.5);
        assert!(resident_bytes_of(&file) <= 8192);
    }

    #[test]
    fn misaligned_tensors_and_layout_transforms_load() {
        // A hand-written safetensors file whose data starts at an odd offset.
        let mut header = br#"{"qkv":{"dtype":"F32","shape":[6,2],"data_offsets":[0,48]},"cls":{"dtype":"F32","shape":[1,1,2],"data_offsets":[48,56]}}"#.to_vec();
        while header.len() % 4 != 1 {
            header.push(b' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        assert_ne!(bytes.len() % 4, 0, "the data must start misaligned");
        for v in 0..14 {
            bytes.extend_from_slice(&(v as f32).to_le_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("odd.safetensors");
        std::fs::write(&file, bytes).unwrap();
        let ckpt = Checkpoint::open(&file).unwrap().transform(|key, e| match key {
            "qkv" => ["q", "k", "v"].iter().map(|n| n.to_string()).zip(e.chunk0(3)).collect(),
            _ => vec![(key.to_owned(), e.reshape(&[2]))],
        });
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let b = crate::nn::Builder::new(&vs, Kind::Float, &[]);
        let q = b.param("q", &[2, 2]);
        let v = b.param("v", &[2, 2]);
        let _k = b.param("k", &[2, 2]);
        let cls = b.param("cls", &[2]);
        load_into(&vs, &ckpt, &LoadOptions::strict()).unwrap();
        assert_eq!(Vec::<f32>::try_from(q.view([-1])).unwrap(), [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(Vec::<f32>::try_from(v.view([-1])).unwrap(), [8.0, 9.0, 10.0, 11.0]);
        assert_eq!(Vec::<f32>::try_from(cls).unwrap(), [12.0, 13.0]);
    }
}
