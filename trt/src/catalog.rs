//! The engine catalog: which exported decoder graphs a deployment has, and the image shapes each
//! one serves. Written by `tools/export_vae_onnx.py` next to the graphs (`engines.toml`):
//!
//! ```toml
//! dir = "."                 # graphs, relative to this file
//! precision = "fp16"        # what TensorRT builds in: fp32, fp16 or bf16
//! [[static]]                # one graph per resolution, every dimension fixed
//! file = "decoder_1328x1328.onnx"
//! height = 1328
//! width = 1328
//! [[profile]]               # one graph with dynamic height and width, and its TensorRT profiles
//! file = "decoder_dynamic.onnx"
//! min = "256x256"
//! max = "1920x1920"
//! opt = ["1024x1024", "720x1280"]
//! ```
//!
//! Sizes are image pixels `HxW`, multiples of [`SIZE_MULTIPLE`]. A request's shape goes to the
//! static engine of exactly its size, else to the first profile engine whose `min..=max` holds it
//! in both dimensions, else to no engine (the decoder falls back to libtorch).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Image sides are multiples of this (the VAE's 8× and the 2×2 latent packing of the pipelines).
pub const SIZE_MULTIPLE: u32 = 16;
/// Latent pixels per image pixel side.
pub const VAE_SCALE: u32 = 8;
/// Latent channels of the Qwen-Image (Wan2.1) VAE.
pub const Z_DIM: u32 = 16;

/// An image size, height × width in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Size {
    pub height: u32,
    pub width: u32,
}

impl Size {
    pub const fn new(height: u32, width: u32) -> Self {
        Size { height, width }
    }

    /// The decoder graph's input shape for this size: `[1, 16, 1, H/8, W/8]`.
    pub fn latent_shape(self) -> [i64; 5] {
        [
            1,
            i64::from(Z_DIM),
            1,
            i64::from(self.height / VAE_SCALE),
            i64::from(self.width / VAE_SCALE),
        ]
    }

    /// The decoder graph's output shape for this size: `[1, 3, H, W]`.
    pub fn image_shape(self) -> [i64; 4] {
        [1, 3, i64::from(self.height), i64::from(self.width)]
    }

    /// Whether `self` lies within `min..=max` in both dimensions.
    pub fn within(self, min: Size, max: Size) -> bool {
        (min.height..=max.height).contains(&self.height)
            && (min.width..=max.width).contains(&self.width)
    }

    fn check(self) -> Result<Self, String> {
        if self.height == 0
            || self.width == 0
            || !self.height.is_multiple_of(SIZE_MULTIPLE)
            || !self.width.is_multiple_of(SIZE_MULTIPLE)
        {
            return Err(format!(
                "`{self}`: height and width must be positive multiples of {SIZE_MULTIPLE}"
            ));
        }
        Ok(self)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

impl std::str::FromStr for Size {
    type Err = String;

    /// `HxW`, e.g. `1328x1328`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |v: &str| v.trim().parse::<u32>().ok();
        let (h, w) = s.split_once(['x', 'X']).ok_or_else(|| format!("`{s}`: expected HxW"))?;
        match (parse(h), parse(w)) {
            (Some(height), Some(width)) => Size { height, width }.check(),
            _ => Err(format!("`{s}`: expected HxW with whole numbers")),
        }
    }
}

/// What TensorRT builds its engines in (the graph's own I/O dtype is read from the graph).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// How an engine covers shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// Exactly one size.
    Static(Size),
    /// Every size in `min..=max`; TensorRT builds one optimisation profile per `opt` size.
    Profiles { min: Size, max: Size, opt: Vec<Size> },
}

/// `32x48` for a static engine, `16x16 .. 64x64 (opt 48x64)` for a profile engine.
impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Coverage::Static(s) => write!(f, "{s}"),
            Coverage::Profiles { min, max, opt } => {
                let opt: Vec<String> = opt.iter().map(ToString::to_string).collect();
                write!(f, "{min} .. {max} (opt {})", opt.join(", "))
            }
        }
    }
}

/// One exported decoder graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSpec {
    /// Position in the catalog (statics first, then profiles, each in file order).
    pub id: usize,
    /// The graph file.
    pub path: PathBuf,
    pub coverage: Coverage,
    /// Memory the loaded engine is charged against the budget, in bytes: the catalog's
    /// `memory_mib`, else an estimate from the graph's size (see [`EngineSpec::estimate`]).
    pub cost: u64,
}

impl EngineSpec {
    /// A short name for logs and metrics: the file name.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map_or_else(|| self.path.display().to_string(), |n| n.to_string_lossy().into_owned())
    }

    pub fn covers(&self, size: Size) -> bool {
        match &self.coverage {
            Coverage::Static(s) => *s == size,
            Coverage::Profiles { min, max, .. } => size.within(*min, *max),
        }
    }

    /// Charge of an engine the catalog gives no `memory_mib` for: twice its graph file (the
    /// weights once as the graph, once as what the provider builds from them) plus the
    /// activations of its largest shape in fp32 at [`ACTIVATION_FACTOR`] image-sized buffers.
    pub fn estimate(file_bytes: u64, coverage: &Coverage) -> u64 {
        let largest = match coverage {
            Coverage::Static(s) => *s,
            Coverage::Profiles { max, .. } => *max,
        };
        let pixels = u64::from(largest.height) * u64::from(largest.width);
        2 * file_bytes + pixels * ACTIVATION_FACTOR * 4
    }
}

/// Image-sized fp32 buffers the decoder's activations peak at (its last stage runs 96 channels
/// at full resolution, two of them live at once, plus the causal-conv caches).
pub const ACTIVATION_FACTOR: u64 = 256;

/// The parsed, checked catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    /// Where the catalog came from (for messages).
    pub source: PathBuf,
    pub precision: Precision,
    pub engines: Vec<EngineSpec>,
}

/// A catalog that cannot be used: the message names the file and the bad value.
#[derive(Debug, thiserror::Error)]
#[error("engine catalog {path}: {message}")]
pub struct CatalogError {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    dir: Option<String>,
    #[serde(default)]
    precision: Precision,
    #[serde(default, rename = "static")]
    statics: Vec<RawStatic>,
    #[serde(default, rename = "profile")]
    profiles: Vec<RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatic {
    file: String,
    height: u32,
    width: u32,
    #[serde(default)]
    memory_mib: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    file: String,
    min: String,
    max: String,
    opt: Vec<String>,
    #[serde(default)]
    memory_mib: Option<u64>,
}

impl Catalog {
    /// Reads and checks a catalog file. Graph files are resolved against `dir` (relative to the
    /// catalog's folder); a missing graph file is not an error here (the engine falls back when it
    /// is asked for, and `x2v doctor` reports it).
    pub fn from_file(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError {
            path: path.to_owned(),
            message: format!("cannot read it: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parses catalog `text` that came from `source`, resolving graphs against `base`.
    pub fn parse(text: &str, source: &Path, base: &Path) -> Result<Self, CatalogError> {
        let err = |message: String| CatalogError { path: source.to_owned(), message };
        let raw: RawCatalog = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let dir = match raw.dir.as_deref() {
            None | Some("") => base.to_owned(),
            Some(d) => base.join(d),
        };
        let mut engines = Vec::new();
        for (i, s) in raw.statics.iter().enumerate() {
            let what = format!("static[{i}] (`{}`)", s.file);
            let size =
                Size::new(s.height, s.width).check().map_err(|m| err(format!("{what}: {m}")))?;
            if let Some(other) = engines.iter().find(|e: &&EngineSpec| e.covers(size)) {
                return Err(err(format!(
                    "{what}: size {size} is already served by `{}`",
                    other.name()
                )));
            }
            let coverage = Coverage::Static(size);
            engines.push(spec(engines.len(), &dir, &s.file, coverage, s.memory_mib).map_err(&err)?);
        }
        for (i, p) in raw.profiles.iter().enumerate() {
            let what = format!("profile[{i}] (`{}`)", p.file);
            let size = |v: &str, field: &str| {
                v.parse::<Size>().map_err(|m| err(format!("{what}: {field} {m}")))
            };
            let (min, max) = (size(&p.min, "min")?, size(&p.max, "max")?);
            if min.height > max.height || min.width > max.width {
                return Err(err(format!("{what}: min {min} exceeds max {max}")));
            }
            if p.opt.is_empty() {
                return Err(err(format!("{what}: opt must list at least one size")));
            }
            let opt = p.opt.iter().map(|o| size(o, "opt")).collect::<Result<Vec<_>, _>>()?;
            if let Some(o) = opt.iter().find(|o| !o.within(min, max)) {
                return Err(err(format!("{what}: opt {o} lies outside min {min} .. max {max}")));
            }
            let coverage = Coverage::Profiles { min, max, opt };
            engines.push(spec(engines.len(), &dir, &p.file, coverage, p.memory_mib).map_err(&err)?);
        }
        if engines.is_empty() {
            return Err(err("lists no engine ([[static]] or [[profile]])".into()));
        }
        Ok(Catalog { source: source.to_owned(), precision: raw.precision, engines })
    }

    /// The engine that serves `size`: the static engine of exactly that size, else the first
    /// profile engine whose range holds it.
    pub fn select(&self, size: Size) -> Option<&EngineSpec> {
        size.check().ok()?;
        let exact =
            self.engines.iter().find(|e| matches!(e.coverage, Coverage::Static(s) if s == size));
        exact.or_else(|| self.engines.iter().find(|e| e.covers(size)))
    }
}

fn spec(
    id: usize,
    dir: &Path,
    file: &str,
    coverage: Coverage,
    memory_mib: Option<u64>,
) -> Result<EngineSpec, String> {
    if file.trim().is_empty() {
        return Err(format!("engine {id}: `file` is empty"));
    }
    let path = dir.join(file);
    let cost = match memory_mib {
        Some(0) => return Err(format!("`{file}`: memory_mib must be positive")),
        Some(mib) => mib << 20,
        None => EngineSpec::estimate(std::fs::metadata(&path).map_or(0, |m| m.len()), &coverage),
    };
    Ok(EngineSpec { id, path, coverage, cost })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Catalog, CatalogError> {
        Catalog::parse(text, Path::new("engines.toml"), Path::new("/engines"))
    }

    const GOOD: &str = r#"
        dir = "graphs"
        precision = "fp16"
        [[static]]
        file = "decoder_1328x1328.onnx"
        height = 1328
        width = 1328
        memory_mib = 900
        [[static]]
        file = "decoder_928x1664.onnx"
        height = 928
        width = 1664
        [[profile]]
        file = "decoder_dynamic.onnx"
        min = "256x256"
        max = "1920x1920"
        opt = ["1024x1024", "720x1280"]
    "#;

    #[test]
    fn a_catalog_resolves_graphs_and_picks_the_static_engine_before_a_profile() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.precision, Precision::Fp16);
        assert_eq!(c.engines.len(), 3);
        assert_eq!(c.engines[0].path, Path::new("/engines/graphs/decoder_1328x1328.onnx"));
        assert_eq!(c.engines[0].cost, 900 << 20);
        assert_eq!(c.select(Size::new(1328, 1328)).unwrap().id, 0);
        assert_eq!(c.select(Size::new(928, 1664)).unwrap().id, 1);
        // Not a static size, inside the profile's range.
        assert_eq!(c.select(Size::new(1024, 768)).unwrap().id, 2);
        // The profile's bounds are inclusive; one step past them is not served.
        assert_eq!(c.select(Size::new(1920, 1920)).unwrap().id, 2);
        assert!(c.select(Size::new(1936, 1024)).is_none());
        assert!(c.select(Size::new(240, 1024)).is_none());
        let Coverage::Profiles { opt, .. } = &c.engines[2].coverage else { panic!() };
        assert_eq!(opt, &[Size::new(1024, 1024), Size::new(720, 1280)]);
    }

    #[test]
    fn an_engine_without_memory_mib_is_charged_an_estimate_from_its_shape() {
        let c = parse(GOOD).unwrap();
        // The graph does not exist, so only the activations of 928×1664 count.
        assert_eq!(c.engines[1].cost, 928 * 1664 * ACTIVATION_FACTOR * 4);
    }

    #[test]
    fn bad_catalogs_are_refused_naming_the_value() {
        let cases = [
            ("precision = \"int4\"\n[[static]]\nfile=\"a\"\nheight=16\nwidth=16", "int4"),
            ("[[static]]\nfile=\"a\"\nheight=100\nwidth=16", "100x16"),
            ("[[static]]\nfile=\"a\"\nheight=0\nwidth=16", "0x16"),
            (
                "[[static]]\nfile=\"a\"\nheight=16\nwidth=16\n[[static]]\nfile=\"b\"\nheight=16\nwidth=16",
                "already served by `a`",
            ),
            (
                "[[profile]]\nfile=\"p\"\nmin=\"512x512\"\nmax=\"256x256\"\nopt=[\"256x256\"]",
                "min 512x512 exceeds max 256x256",
            ),
            (
                "[[profile]]\nfile=\"p\"\nmin=\"256x256\"\nmax=\"512x512\"\nopt=[\"1024x1024\"]",
                "opt 1024x1024 lies outside",
            ),
            (
                "[[profile]]\nfile=\"p\"\nmin=\"256x256\"\nmax=\"512x512\"\nopt=[]",
                "at least one size",
            ),
            (
                "[[profile]]\nfile=\"p\"\nmin=\"256\"\nmax=\"512x512\"\nopt=[\"256x256\"]",
                "min `256`: expected HxW",
            ),
            (
                "[[static]]\nfile=\"a\"\nheight=16\nwidth=16\nmemory_mib=0",
                "memory_mib must be positive",
            ),
            ("[[static]]\nfile=\"\"\nheight=16\nwidth=16", "`file` is empty"),
            ("[[static]]\nfile=\"a\"\nheight=16\nwidth=16\nshape=3", "unknown field `shape`"),
            ("dir = \"x\"", "lists no engine"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.starts_with("engine catalog engines.toml: "), "{e}");
            assert!(e.contains(want), "{text:?}: {e} does not mention {want:?}");
        }
    }

    #[test]
    fn sizes_parse_as_height_by_width() {
        assert_eq!("720x1280".parse::<Size>().unwrap(), Size::new(720, 1280));
        assert_eq!(Size::new(720, 1280).latent_shape(), [1, 16, 1, 90, 160]);
        assert_eq!(Size::new(720, 1280).image_shape(), [1, 3, 720, 1280]);
        assert!("720*1280".parse::<Size>().is_err());
        assert!("axb".parse::<Size>().is_err());
    }
}
