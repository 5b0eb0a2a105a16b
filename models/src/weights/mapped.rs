//! Read-only memory maps of checkpoint files and the safetensors header.
//!
//! A checkpoint is never read into a buffer: each tensor is copied from the mapping straight into
//! its parameter, and the pages behind it are handed back to the kernel as soon as the copy is
//! done ([`Mapping::release_before`]), so loading costs the parameters plus a bounded window of
//! file pages, not a second copy of the weights.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tch::Kind;

use crate::error::Error;

/// A whole file mapped read-only and private.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    path: PathBuf,
}

// SAFETY: the mapping is read-only for its whole life and unmapped only on drop, so shared
// references from several threads only ever read.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let read_err =
            |e: std::io::Error| Error::Read { path: path.to_owned(), message: e.to_string() };
        let file = File::open(path).map_err(read_err)?;
        let len = usize::try_from(file.metadata().map_err(read_err)?.len())
            .map_err(|_| Error::Read { path: path.to_owned(), message: "file too large".into() })?;
        if len == 0 {
            return Ok(Mapping { ptr: std::ptr::null_mut(), len: 0, path: path.to_owned() });
        }
        // SAFETY: a fresh private read-only mapping of an open file; the pointer is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(read_err(std::io::Error::last_os_error()));
        }
        Ok(Mapping { ptr: ptr.cast(), len, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Gives the pages wholly before byte `end` back to the kernel. They stay mapped: reading
    /// them again faults them back in from the page cache with the same contents.
    pub fn release_before(&self, end: usize) {
        let page = page_size();
        let end = end.min(self.len) / page * page;
        if end == 0 {
            return;
        }
        // SAFETY: the range lies inside this mapping; MADV_DONTNEED on a private read-only file
        // mapping only drops this process's copies of the pages.
        unsafe {
            libc::madvise(self.ptr.cast(), end, libc::MADV_DONTNEED);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly what `open` mapped; no slice of it outlives `self`.
            unsafe {
                libc::munmap(self.ptr.cast(), self.len);
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(1)
}

/// One tensor in a safetensors file: element type, shape and absolute byte range.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub kind: Kind,
    pub shape: Vec<i64>,
    pub start: usize,
    pub end: usize,
}

/// Safetensors dtype names and their libtorch kinds.
const SAFETENSORS_KINDS: &[(&str, Kind)] = &[
    ("F64", Kind::Double),
    ("F32", Kind::Float),
    ("F16", Kind::Half),
    ("BF16", Kind::BFloat16),
    ("I64", Kind::Int64),
    ("I32", Kind::Int),
    ("I16", Kind::Int16),
    ("I8", Kind::Int8),
    ("U8", Kind::Uint8),
    ("BOOL", Kind::Bool),
    ("F8_E4M3", Kind::Float8e4m3fn),
    ("F8_E5M2", Kind::Float8e5m2),
];

/// Parses the header of a safetensors file: `u64` little-endian header length, a JSON object of
/// `name → {dtype, shape, data_offsets}`, then the data the offsets are relative to.
pub fn safetensors_index(map: &Mapping) -> Result<BTreeMap<String, RawTensor>, Error> {
    let bad = |message: String| Error::Read { path: map.path().to_owned(), message };
    let bytes = map.bytes();
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| bad("shorter than a safetensors header".into()))?;
    let data_start = usize::try_from(n).ok().and_then(|n| n.checked_add(8)).unwrap_or(usize::MAX);
    let header = bytes
        .get(8..data_start)
        .ok_or_else(|| bad(format!("header length {n} runs past the end of the file")))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad_entry = |what: &str| bad(format!("tensor `{name}`: {what}"));
        let dtype = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad_entry("no dtype"))?;
        let kind = SAFETENSORS_KINDS
            .iter()
            .find(|(n, _)| *n == dtype)
            .map(|&(_, k)| k)
            .ok_or_else(|| bad_entry(&format!("unsupported dtype {dtype}")))?;
        let shape: Vec<i64> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_i64().filter(|&d| d >= 0)).collect())
            .ok_or_else(|| bad_entry("bad shape"))?;
        let offsets: Vec<usize> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .filter(|o: &Vec<usize>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad_entry("bad data_offsets"))?;
        let (start, end) = (data_start + offsets[0], data_start + offsets[1]);
        let numel: i64 = shape.iter().product();
        let want = numel as usize * kind.elt_size_in_bytes();
        if end > bytes.len() || end - start != want {
            return Err(bad_entry(&format!(
                "{} bytes at [{start}, {end}) do not hold {shape:?} of {dtype} in a {}-byte file",
                end.saturating_sub(start),
                bytes.len()
            )));
        }
        out.insert(name, RawTensor { kind, shape, start, end });
    }
    Ok(out)
}
