//! LoRA adapters as published: a safetensors file of low-rank pairs per target layer, in either the
//! diffusers/PEFT naming (`<module>.lora_A.weight`, `<module>.lora_B.weight`) or the kohya /
//! original-release naming (`<module>.lora_down.weight`, `<module>.lora_up.weight`, an optional
//! scalar `<module>.alpha`). A model family maps the `<module>` part to its own layer names
//! (diffusers names, x2v's var-store paths); every other key is refused by name, so that an adapter
//! is applied whole or not at all.
//!
//! An adapter's layer adds `scale · alpha/rank · B(A x)` to its layer's output, as PEFT does
//! (`alpha` absent: `alpha = rank`). Adapters never modify the base weights: they are applied at
//! run time on top of them ([`crate::nn::Linear::set_lora`]), so the base model is exactly itself
//! again once they are cleared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::error::Error;

/// One target layer's low-rank pair.
#[derive(Debug)]
pub struct LoraLayer {
    /// `[rank, in]` (CPU, as stored).
    pub down: Tensor,
    /// `[out, rank]`.
    pub up: Tensor,
    /// `alpha` of the layer, when the adapter stores one.
    pub alpha: Option<f64>,
}

impl LoraLayer {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// `alpha / rank` (1 without an alpha).
    pub fn alpha_scale(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f64)
    }
}

/// A loaded adapter: its layers by the model's module names.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    path: PathBuf,
    layers: BTreeMap<String, LoraLayer>,
}

/// Which tensor of a layer a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// `(module, part)` of an adapter key, by its suffix.
fn split_key(key: &str) -> Option<(&str, Part)> {
    const SUFFIXES: [(&str, Part); 5] = [
        (".lora_A.weight", Part::Down),
        (".lora_down.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    SUFFIXES.iter().find_map(|(suffix, part)| key.strip_suffix(suffix).map(|m| (m, *part)))
}

impl LoraAdapter {
    /// Reads adapter `name` from `path`. `module_of` maps a key's module part (everything before
    /// `.lora_A.weight`, `.lora_down.weight`, `.alpha`, ...) to the model's layer name, or `None`
    /// when the model has no such layer.
    pub fn load(
        name: &str,
        path: &Path,
        module_of: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let bad = |message: String| Error::Lora { adapter: name.to_owned(), message };
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        if tensors.is_empty() {
            return Err(bad(format!("{} holds no tensors", path.display())));
        }
        let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        for (key, tensor) in tensors {
            let (module, part) = split_key(&key).ok_or_else(|| {
                bad(format!(
                    "key `{key}` is not a LoRA tensor x2v applies (`.lora_A.weight`, \
                     `.lora_B.weight`, `.lora_down.weight`, `.lora_up.weight`, `.alpha`)"
                ))
            })?;
            let target = module_of(module).ok_or_else(|| {
                bad(format!("key `{key}` targets `{module}`, not a layer of this model"))
            })?;
            let slot = &mut parts.entry(target).or_default()[part as usize];
            if slot.is_some() {
                return Err(bad(format!("key `{key}` repeats a tensor of `{module}`")));
            }
            *slot = Some(tensor);
        }
        let mut layers = BTreeMap::new();
        for (module, [down, up, alpha]) in parts {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(bad(format!("layer `{module}` lacks its down or up matrix")));
            };
            let (d, u) = (down.size(), up.size());
            if d.len() != 2 || u.len() != 2 || d[0] != u[1] || d[0] == 0 {
                return Err(bad(format!(
                    "layer `{module}`: down {d:?} and up {u:?} are not a rank-r pair ([r, in], [out, r])"
                )));
            }
            let alpha = match alpha {
                None => None,
                Some(a) if a.numel() == 1 => Some(a.to_kind(Kind::Double).double_value(&[])),
                Some(a) => {
                    return Err(bad(format!(
                        "layer `{module}`: alpha must be a scalar, got {:?}",
                        a.size()
                    )));
                }
            };
            if alpha.is_some_and(|a| !a.is_finite()) {
                return Err(bad(format!("layer `{module}`: alpha is not finite")));
            }
            let float = |t: Tensor| if t.is_floating_point() { Ok(t) } else { Err(()) };
            let (down, up) = match (float(down), float(up)) {
                (Ok(d), Ok(u)) => (d, u),
                _ => return Err(bad(format!("layer `{module}`: weights must be floating point"))),
            };
            layers.insert(module, LoraLayer { down, up, alpha });
        }
        Ok(LoraAdapter { name: name.to_owned(), path: path.to_owned(), layers })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layers by the model's module names.
    pub fn layers(&self) -> &BTreeMap<String, LoraLayer> {
        &self.layers
    }

    /// Bytes of the stored matrices.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        self.layers.values().map(|l| size(&l.down) + size(&l.up)).sum()
    }
}

pub use x2v_core::lora::{check_name, list_names};

/// The adapters of a directory (`NAME.safetensors`), loaded on first use and kept in memory up to
/// a byte budget, least recently used first out. It lives on the thread that runs the model (the
/// tensors are not shared across threads); an adapter a running job holds stays valid after its
/// eviction, which only drops it from the cache.
#[derive(Debug)]
pub struct LoraStore {
    dir: PathBuf,
    budget_bytes: u64,
    loader: fn(&str, &Path) -> Result<LoraAdapter, Error>,
    /// Most recently used last.
    cache: std::cell::RefCell<Vec<Rc<LoraAdapter>>>,
}

impl LoraStore {
    /// A store over `dir`, reading adapters with `loader` (the model family's key mapping).
    pub fn new(
        dir: &Path,
        budget_bytes: u64,
        loader: fn(&str, &Path) -> Result<LoraAdapter, Error>,
    ) -> Result<Self, Error> {
        if !dir.is_dir() {
            return Err(Error::NotADirectory(dir.to_owned()));
        }
        Ok(LoraStore { dir: dir.to_owned(), budget_bytes, loader, cache: Default::default() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The adapter names in the directory, sorted.
    pub fn names(&self) -> Vec<String> {
        list_names(&self.dir)
    }

    /// Adapter `name`, from the cache or read from its file.
    pub fn get(&self, name: &str) -> Result<Rc<LoraAdapter>, Error> {
        let bad = |message: String| Error::Lora { adapter: name.to_owned(), message };
        check_name(name).map_err(bad)?;
        let mut cache = self.cache.borrow_mut();
        if let Some(i) = cache.iter().position(|a| a.name() == name) {
            let hit = cache.remove(i);
            cache.push(hit.clone());
            return Ok(hit);
        }
        let path = self.dir.join(format!("{name}.safetensors"));
        if !path.is_file() {
            let known = list_names(&self.dir);
            return Err(bad(format!(
                "no such adapter in {} (available: {})",
                self.dir.display(),
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        let adapter = Rc::new((self.loader)(name, &path)?);
        cache.push(adapter.clone());
        let mut total: u64 = cache.iter().map(|a| a.bytes()).sum();
        while total > self.budget_bytes && cache.len() > 1 {
            total -= cache.remove(0).bytes();
        }
        Ok(adapter)
    }

    /// Names of the adapters in memory, least recently used first.
    pub fn cached(&self) -> Vec<String> {
        let cache = self.cache.borrow();
        cache.iter().map(|a| a.name().to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_by_their_published_suffixes() {
        assert_eq!(split_key("a.b.lora_A.weight"), Some(("a.b", Part::Down)));
        assert_eq!(split_key("a.lora_down.weight"), Some(("a", Part::Down)));
        assert_eq!(split_key("a.lora_up.weight"), Some(("a", Part::Up)));
        assert_eq!(split_key("a.lora_B.weight"), Some(("a", Part::Up)));
        assert_eq!(
            split_key("blocks.0.self_attn.q.alpha"),
            Some(("blocks.0.self_attn.q", Part::Alpha))
        );
        assert_eq!(split_key("blocks.0.self_attn.q.diff_b"), None);
    }
}
