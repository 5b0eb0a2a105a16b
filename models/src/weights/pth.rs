//! Index of a `torch.save` checkpoint (the zip format of the original Wan release's `.pth` files):
//! where each tensor of the saved state dict lies in the file, so a loader can memory-map the file
//! and copy every tensor straight into its parameter instead of unpickling the whole archive.
//!
//! Only the zip directory records, the local headers of the entries used and the small pickled
//! `<archive>/data.pkl` are read. The pickle is run on a small stack machine that knows the opcodes
//! `torch.save` emits (protocol 2) and the common later ones; objects other than tensors, state
//! dicts and storages are kept as opaque placeholders. Valid archives outside what this reader
//! handles give [`PthError::Unsupported`], so the caller can fall back to libtorch's full loader.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::Kind;

/// One tensor of a `torch.save` archive whose bytes lie contiguously in the file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PthTensor {
    /// State-dict key.
    pub name: String,
    /// Element type.
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte offset of the first element in the `.pth` file.
    pub offset: u64,
    /// Byte length: numel * element size.
    pub len: u64,
}

/// Why a `.pth` file could not be indexed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PthError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid torch.save zip archive: {message}")]
    Zip { path: PathBuf, message: String },
    #[error("bad pickle in {path}: {message}")]
    Pickle { path: PathBuf, message: String },
    #[error("tensor `{name}` of {path}: {message}")]
    Tensor { path: PathBuf, name: String, message: String },
    /// A valid archive this reader does not handle; libtorch's full loader can still read it.
    #[error("{0}")]
    Unsupported(String),
}

/// Reads the zip central directory and the pickled `*/data.pkl` of `path`, returning the tensors
/// of the top-level state dict in file order (ascending offset; views of one storage keep their
/// state-dict order). Non-tensor values of the state dict are skipped.
pub(crate) fn read_index(path: &Path) -> Result<Vec<PthTensor>, PthError> {
    File::open(path).map_err(Fail::Io).and_then(index).map_err(|e| e.at(path))
}

/// Errors before the file path is attached.
#[derive(Debug)]
enum Fail {
    Io(std::io::Error),
    Zip(String),
    Pickle(String),
    Tensor { name: String, message: String },
    Unsupported(String),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Io(e)
    }
}

impl Fail {
    fn at(self, path: &Path) -> PthError {
        let path = path.to_owned();
        match self {
            Fail::Io(source) => PthError::Io { path, source },
            Fail::Zip(message) => PthError::Zip { path, message },
            Fail::Pickle(message) => PthError::Pickle { path, message },
            Fail::Tensor { name, message } => PthError::Tensor { path, name, message },
            Fail::Unsupported(m) => PthError::Unsupported(format!("{}: {m}", path.display())),
        }
    }
}

fn index<R: Read + Seek>(src: R) -> Result<Vec<PthTensor>, Fail> {
    let mut zip = Archive::open(src)?;
    // torch.save names every entry `<archive>/...`, the archive name being free-form.
    let pkl = zip
        .names
        .iter()
        .find(|n| n.strip_suffix("/data.pkl").is_some_and(|p| !p.is_empty() && !p.contains('/')))
        .cloned()
        .ok_or_else(|| Fail::Zip("no `<archive>/data.pkl` entry".into()))?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    // Archives from before the `byteorder` entry existed are little-endian.
    let byteorder = format!("{prefix}byteorder");
    if zip.entries.contains_key(&byteorder) {
        let order = zip.read_entry(&byteorder)?;
        if order != b"little" {
            let order = String::from_utf8_lossy(&order).into_owned();
            return Err(Fail::Unsupported(format!("byte order `{order}` (only little-endian)")));
        }
    }
    let root = Unpickler::run(&zip.read_entry(&pkl)?)?;
    let Value::Dict(dict) = root else {
        return Err(Fail::Unsupported("the pickled object is not a dict of tensors".into()));
    };
    let mut storages: HashMap<String, (u64, u64)> = HashMap::new();
    let mut out = Vec::new();
    for (key, value) in dict.borrow().iter() {
        let (Value::Str(name), Value::Tensor(t)) = (key, value) else { continue };
        let range = match storages.get(&t.key) {
            Some(r) => *r,
            None => {
                let r = zip.data_range(&format!("{prefix}data/{}", t.key))?;
                *storages.entry(t.key.clone()).or_insert(r)
            }
        };
        out.push(locate(name, t, range)?);
    }
    out.sort_by_key(|t| t.offset);
    Ok(out)
}

/// Places a tensor inside its storage entry `(start, len)`.
fn locate(name: &str, t: &TensorArgs, (start, len): (u64, u64)) -> Result<PthTensor, Fail> {
    let bad = |message: String| Fail::Tensor { name: name.to_owned(), message };
    let kind = storage_kind(&t.storage_type).ok_or_else(|| {
        Fail::Unsupported(format!("tensor `{name}` has storage type {}", t.storage_type))
    })?;
    if t.shape.len() != t.stride.len() || t.shape.iter().any(|&d| d < 0) || t.storage_offset < 0 {
        return Err(bad(format!(
            "invalid shape {:?}, stride {:?} or storage offset {}",
            t.shape, t.stride, t.storage_offset
        )));
    }
    let numel = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    let numel = numel.ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
    // Row-major contiguity; a dimension of size 1 may carry any stride, and an empty tensor
    // reads no bytes whatever its strides.
    if numel > 0 {
        let mut expected = 1i64;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && s != expected {
                return Err(Fail::Unsupported(format!(
                    "tensor `{name}` is not contiguous (shape {:?}, stride {:?})",
                    t.shape, t.stride
                )));
            }
            expected = expected.saturating_mul(d);
        }
    }
    let elt = kind.elt_size_in_bytes() as u64;
    let first = (t.storage_offset as u64).checked_mul(elt);
    let bytes = numel.checked_mul(elt);
    match (first, bytes) {
        (Some(first), Some(bytes)) if first.checked_add(bytes).is_some_and(|end| end <= len) => {
            Ok(PthTensor {
                name: name.to_owned(),
                kind,
                shape: t.shape.clone(),
                offset: start + first,
                len: bytes,
            })
        }
        _ => Err(bad(format!(
            "{numel} elements at storage offset {} run past its storage `{}` of {len} bytes",
            t.storage_offset, t.key
        ))),
    }
}

/// Element type of a typed storage class as torch.save names it (`torch.<T>Storage`).
fn storage_kind(storage_type: &str) -> Option<Kind> {
    Some(match storage_type {
        "torch.FloatStorage" => Kind::Float,
        "torch.DoubleStorage" => Kind::Double,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.ShortStorage" => Kind::Int16,
        "torch.CharStorage" => Kind::Int8,
        "torch.ByteStorage" => Kind::Uint8,
        "torch.BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// Little-endian cursor over a byte slice; running out is a `Fail` of the given section.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    fail: fn(String) -> Fail,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], fail: fn(String) -> Fail, what: &'static str) -> Self {
        Reader { buf, pos: 0, fail, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| (self.fail)(format!("{} is truncated", self.what)))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Fail> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u8(&mut self) -> Result<u8, Fail> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Fail> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, Fail> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Fail> {
        self.array().map(u64::from_le_bytes)
    }

    /// A length field; one beyond the address space is as truncated as one beyond the buffer.
    fn bytes(&mut self, n: u64) -> Result<&'a [u8], Fail> {
        self.take(usize::try_from(n).unwrap_or(usize::MAX))
    }
}

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_DIRECTORY: u32 = 0x0605_4b50;
const ZIP64_END_OF_DIRECTORY: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// A central-directory record.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    flags: u16,
    method: u16,
    size: u64,
    header_offset: u64,
}

/// The directory of a zip archive, read from its end records and central directory.
struct Archive<R> {
    src: R,
    len: u64,
    entries: HashMap<String, Entry>,
    /// Entry names in central-directory order.
    names: Vec<String>,
}

impl<R: Read + Seek> Archive<R> {
    fn open(mut src: R) -> Result<Self, Fail> {
        let len = src.seek(SeekFrom::End(0))?;
        let mut zip = Archive { src, len, entries: HashMap::new(), names: Vec::new() };
        let magic = zip.read_at(0, len.min(4))?;
        if magic != LOCAL_HEADER.to_le_bytes() {
            // The pre-1.6 torch.save format is a bare pickle stream (protocol 2 starts 0x80).
            return Err(if magic.first() == Some(&0x80) {
                Fail::Unsupported("legacy (non-zip) torch.save format".into())
            } else {
                Fail::Zip("the file does not start with a zip local header".into())
            });
        }
        // The end record (22 bytes) is followed by a comment of at most 65535 bytes.
        let tail_len = len.min(22 + 0xFFFF);
        let tail = zip.read_at(len - tail_len, tail_len)?;
        let sig = END_OF_DIRECTORY.to_le_bytes();
        let pos = (0..tail.len().saturating_sub(21)).rev().find(|&i| tail[i..i + 4] == sig);
        let pos = pos.ok_or_else(|| Fail::Zip("no end of central directory record".into()))?;
        let eocd_at = len - tail_len + pos as u64;
        let mut r = Reader::new(&tail[pos + 4..], Fail::Zip, "end of central directory record");
        r.take(6)?; // disk numbers, entries on this disk
        let (mut count, mut cd_size, mut cd_offset) =
            (u64::from(r.u16()?), u64::from(r.u32()?), u64::from(r.u32()?));
        // Saturated fields mean the real values are in the zip64 record the locator points to.
        let locator = if eocd_at >= 20 { zip.read_at(eocd_at - 20, 20)? } else { Vec::new() };
        if locator.get(..4) == Some(&ZIP64_LOCATOR.to_le_bytes()[..]) {
            let at = u64::from_le_bytes(locator[8..16].try_into().expect("8 bytes"));
            let record = zip.read_at(at, 56)?;
            let mut r = Reader::new(&record, Fail::Zip, "zip64 end of central directory record");
            if r.u32()? != ZIP64_END_OF_DIRECTORY {
                return Err(Fail::Zip("bad zip64 end of central directory signature".into()));
            }
            r.take(28)?; // record size, versions, disk numbers, entries on this disk
            (count, cd_size, cd_offset) = (r.u64()?, r.u64()?, r.u64()?);
        } else if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            return Err(Fail::Zip("zip64 sizes without a zip64 locator".into()));
        }
        if cd_offset.checked_add(cd_size).is_none_or(|end| end > len) {
            return Err(Fail::Zip("the central directory lies outside the file".into()));
        }
        let cd = zip.read_at(cd_offset, cd_size)?;
        let mut r = Reader::new(&cd, Fail::Zip, "central directory");
        for _ in 0..count {
            if r.u32()? != CENTRAL_HEADER {
                return Err(Fail::Zip("bad central directory header signature".into()));
            }
            r.take(4)?; // versions
            let (flags, method) = (r.u16()?, r.u16()?);
            r.take(8)?; // time, date, crc
            let compressed = u64::from(r.u32()?);
            let mut size = u64::from(r.u32()?);
            let (name_len, extra_len, comment_len) = (r.u16()?, r.u16()?, r.u16()?);
            r.take(8)?; // disk, attributes
            let mut header_offset = u64::from(r.u32()?);
            let name = String::from_utf8_lossy(r.take(name_len.into())?).into_owned();
            let mut extra = Reader::new(r.take(extra_len.into())?, Fail::Zip, "zip extra field");
            r.take(comment_len.into())?;
            // The zip64 extra field holds, in this order, only the fields saturated above.
            while extra.buf.len() - extra.pos >= 4 {
                let (id, n) = (extra.u16()?, extra.u16()?);
                let mut field = Reader::new(extra.take(n.into())?, Fail::Zip, "zip64 extra field");
                if id == ZIP64_EXTRA_ID {
                    if size == 0xFFFF_FFFF {
                        size = field.u64()?;
                    }
                    if compressed == 0xFFFF_FFFF {
                        field.u64()?;
                    }
                    if header_offset == 0xFFFF_FFFF {
                        header_offset = field.u64()?;
                    }
                }
            }
            zip.names.push(name.clone());
            zip.entries.insert(name, Entry { flags, method, size, header_offset });
        }
        Ok(zip)
    }

    fn read_at(&mut self, offset: u64, n: u64) -> Result<Vec<u8>, Fail> {
        let n = usize::try_from(n).map_err(|_| Fail::Zip(format!("{n}-byte record")))?;
        let mut buf = vec![0; n];
        self.src.seek(SeekFrom::Start(offset))?;
        self.src.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// `(absolute offset, length)` of a stored entry's bytes.
    fn data_range(&mut self, name: &str) -> Result<(u64, u64), Fail> {
        let e = self.entries.get(name).ok_or_else(|| Fail::Zip(format!("no entry `{name}`")))?;
        let e = e.clone();
        if e.flags & 1 != 0 {
            return Err(Fail::Unsupported(format!("entry `{name}` is encrypted")));
        }
        if e.method != 0 {
            return Err(Fail::Unsupported(format!(
                "entry `{name}` is compressed (method {})",
                e.method
            )));
        }
        let header = self.read_at(e.header_offset, 30)?;
        let mut r = Reader::new(&header, Fail::Zip, "local header");
        if r.u32()? != LOCAL_HEADER {
            return Err(Fail::Zip(format!("bad local header signature for `{name}`")));
        }
        // The local name and extra field (where torch pads data to 64 bytes) may differ in
        // length from the central directory's, so only the local header says where data starts.
        r.take(22)?;
        let (name_len, extra_len) = (r.u16()?, r.u16()?);
        let start = e.header_offset + 30 + u64::from(name_len) + u64::from(extra_len);
        if start.checked_add(e.size).is_none_or(|end| end > self.len) {
            return Err(Fail::Zip(format!("entry `{name}` runs past the end of the file")));
        }
        Ok((start, e.size))
    }

    fn read_entry(&mut self, name: &str) -> Result<Vec<u8>, Fail> {
        let (start, len) = self.data_range(name)?;
        self.read_at(start, len)
    }
}

/// Arguments of `torch._utils._rebuild_tensor_v2` this reader needs.
#[derive(Debug)]
struct TensorArgs {
    storage_type: String,
    key: String,
    storage_offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

/// A pickled value, as far as this reader distinguishes them. Lists and dicts are shared so
/// that items added after memoization show through every reference, as in Python.
#[derive(Debug, Clone)]
enum Value {
    None,
    Int(i64),
    Str(String),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(String, String),
    /// A `('storage', type, key, location, numel)` persistent id.
    Storage {
        storage_type: String,
        key: String,
    },
    Tensor(Rc<TensorArgs>),
    /// Anything else (booleans, floats, bytes, sets, objects): kept only to balance the stack.
    Opaque,
}

struct Unpickler<'a> {
    r: Reader<'a>,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn run(data: &'a [u8]) -> Result<Value, Fail> {
        let r = Reader::new(data, Fail::Pickle, "the pickle");
        Unpickler { r, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }.machine()
    }

    fn machine(&mut self) -> Result<Value, Fail> {
        loop {
            let at = self.r.pos;
            let op = self.r.u8()?;
            match op {
                b'.' => return self.pop(), // STOP
                0x80 => {
                    self.r.u8()?; // PROTO
                }
                0x95 => {
                    self.r.u64()?; // FRAME: the framed opcodes follow inline
                }
                b'(' => self.marks.push(self.stack.len()), // MARK
                b'0' => {
                    self.pop()?; // POP
                }
                b'1' => {
                    self.pop_mark()?; // POP_MARK
                }
                b'2' => {
                    // DUP
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Opaque), // NEWTRUE, NEWFALSE
                b'J' => self.stack.push(Value::Int(self.r.u32()? as i32 as i64)), // BININT
                b'K' => self.stack.push(Value::Int(self.r.u8()?.into())), // BININT1
                b'M' => self.stack.push(Value::Int(self.r.u16()?.into())), // BININT2
                0x8a => {
                    // LONG1
                    let n = self.r.u8()?;
                    let v = long(self.r.bytes(n.into())?);
                    self.stack.push(v)
                }
                0x8b => {
                    // LONG4
                    let n = self.r.u32()?;
                    let v = long(self.r.bytes(n.into())?);
                    self.stack.push(v)
                }
                b'G' => {
                    self.r.take(8)?; // BINFLOAT
                    self.stack.push(Value::Opaque)
                }
                b'X' | 0x8c | 0x8d | b'U' | b'T' => {
                    // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, SHORT_BINSTRING, BINSTRING
                    let n = match op {
                        b'X' | b'T' => u64::from(self.r.u32()?),
                        0x8d => self.r.u64()?,
                        _ => u64::from(self.r.u8()?),
                    };
                    let s = std::str::from_utf8(self.r.bytes(n)?)
                        .map_err(|_| Fail::Pickle(format!("string at byte {at} is not UTF-8")))?;
                    self.stack.push(Value::Str(s.to_owned()))
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                    let n = match op {
                        b'B' => u64::from(self.r.u32()?),
                        b'C' => u64::from(self.r.u8()?),
                        _ => self.r.u64()?,
                    };
                    self.r.bytes(n)?;
                    self.stack.push(Value::Opaque)
                }
                b'}' => self.stack.push(Value::Dict(Default::default())), // EMPTY_DICT
                b']' => self.stack.push(Value::List(Default::default())), // EMPTY_LIST
                b')' => self.stack.push(Value::Tuple(Default::default())), // EMPTY_TUPLE
                0x8f => self.stack.push(Value::Opaque),                   // EMPTY_SET
                b'd' => {
                    // DICT
                    let items = pairs(self.pop_mark()?)?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(items))))
                }
                b'l' => {
                    // LIST
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))))
                }
                b't' => {
                    // TUPLE
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)))
                }
                0x85..=0x87 => {
                    // TUPLE1, TUPLE2, TUPLE3
                    let n = usize::from(op - 0x84);
                    let at = self.stack.len().checked_sub(n).ok_or_else(underflow)?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(Rc::new(items)))
                }
                b'a' => {
                    // APPEND
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    // APPENDS
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                0x90 => {
                    self.pop_mark()?; // ADDITEMS (to a set)
                }
                0x91 => {
                    // FROZENSET
                    self.pop_mark()?;
                    self.stack.push(Value::Opaque)
                }
                b's' => {
                    // SETITEM
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?
                }
                b'u' => {
                    // SETITEMS
                    let items = pairs(self.pop_mark()?)?;
                    self.set_items(items)?
                }
                b'c' => {
                    // GLOBAL: "module\nname\n"
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name))
                }
                0x93 => {
                    // STACK_GLOBAL
                    let (Value::Str(name), Value::Str(module)) = (self.pop()?, self.pop()?) else {
                        return Err(Fail::Pickle(format!(
                            "STACK_GLOBAL at byte {at} without names"
                        )));
                    };
                    self.stack.push(Value::Global(module, name))
                }
                b'R' => {
                    // REDUCE
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = reduce(callable, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    self.pop()?; // BUILD: the state (e.g. `_metadata`) is not needed
                }
                0x81 => {
                    // NEWOBJ
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(Value::Opaque)
                }
                0x92 => {
                    // NEWOBJ_EX
                    self.pop()?;
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(Value::Opaque)
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid))
                }
                b'q' => {
                    let i = self.r.u8()?.into();
                    self.memoize(i)?
                }
                b'r' => {
                    let i = self.r.u32()?;
                    self.memoize(i)?
                }
                0x94 => self.memoize(self.memo.len() as u32)?, // MEMOIZE
                b'h' | b'j' => {
                    // BINGET, LONG_BINGET
                    let i = if op == b'h' { self.r.u8()?.into() } else { self.r.u32()? };
                    let v = self.memo.get(&i).cloned();
                    let v = v.ok_or_else(|| Fail::Pickle(format!("memo {i} read before set")))?;
                    self.stack.push(v)
                }
                _ => {
                    return Err(Fail::Unsupported(format!(
                        "pickle opcode 0x{op:02x} at byte {at} of data.pkl"
                    )));
                }
            }
        }
    }

    fn pop(&mut self) -> Result<Value, Fail> {
        // A MARK above the top means the pickle pops into a marked region: malformed.
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(underflow());
        }
        self.stack.pop().ok_or_else(underflow)
    }

    fn top(&self) -> Result<&Value, Fail> {
        self.stack.last().ok_or_else(underflow)
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, Fail> {
        let mark = self.marks.pop().ok_or_else(|| Fail::Pickle("no MARK to pop to".into()))?;
        if mark > self.stack.len() {
            return Err(underflow());
        }
        Ok(self.stack.split_off(mark))
    }

    fn line(&mut self) -> Result<String, Fail> {
        let rest = &self.r.buf[self.r.pos..];
        let n = rest.iter().position(|&b| b == b'\n');
        let n = n.ok_or_else(|| Fail::Pickle("GLOBAL name without newline".into()))?;
        let s = String::from_utf8_lossy(self.r.take(n + 1)?[..n].as_ref()).into_owned();
        Ok(s)
    }

    fn memoize(&mut self, i: u32) -> Result<(), Fail> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), Fail> {
        if let Value::List(l) = self.top()? {
            l.borrow_mut().extend(items);
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>) -> Result<(), Fail> {
        // Items set on an object this reader does not model are dropped.
        if let Value::Dict(d) = self.top()? {
            d.borrow_mut().extend(items);
        }
        Ok(())
    }
}

fn underflow() -> Fail {
    Fail::Pickle("stack underflow".into())
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, Fail> {
    if !items.len().is_multiple_of(2) {
        return Err(Fail::Pickle("odd number of dict items".into()));
    }
    let mut it = items.into_iter();
    Ok(std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect())
}

/// A LONG1/LONG4 payload: little-endian two's complement; wider than 64 bits is not needed.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::Opaque;
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut v = [if negative { 0xFF } else { 0 }; 8];
    v[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(v))
}

fn persistent_load(pid: Value) -> Value {
    if let Value::Tuple(t) = &pid
        && let [Value::Str(tag), Value::Global(module, name), Value::Str(key), ..] = &t[..]
        && tag == "storage"
    {
        return Value::Storage { storage_type: format!("{module}.{name}"), key: key.clone() };
    }
    Value::Opaque
}

fn reduce(callable: Value, args: Value) -> Result<Value, Fail> {
    let (Value::Global(module, name), Value::Tuple(args)) = (&callable, &args) else {
        return Ok(Value::Opaque);
    };
    Ok(match (module.as_str(), name.as_str()) {
        // `OrderedDict()`: its items follow as SETITEMS, its attributes as BUILD.
        ("collections", "OrderedDict") => Value::Dict(Default::default()),
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => rebuild_tensor(args)?,
        // A saved `nn.Parameter` wraps the tensor that is its first argument.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            args.first().cloned().unwrap_or(Value::Opaque)
        }
        _ => Value::Opaque,
    })
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata])`.
fn rebuild_tensor(args: &[Value]) -> Result<Value, Fail> {
    let ints = |v: &Value| -> Option<Vec<i64>> {
        match v {
            Value::Tuple(t) => {
                t.iter().map(|i| if let Value::Int(i) = i { Some(*i) } else { None }).collect()
            }
            _ => None,
        }
    };
    if let [Value::Storage { storage_type, key }, Value::Int(storage_offset), size, stride, ..] =
        args
        && let (Some(shape), Some(stride)) = (ints(size), ints(stride))
    {
        return Ok(Value::Tensor(Rc::new(TensorArgs {
            storage_type: storage_type.clone(),
            key: key.clone(),
            storage_offset: *storage_offset,
            shape,
            stride,
        })));
    }
    Err(Fail::Unsupported(format!("a tensor rebuilt from arguments {args:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;
    use std::sync::OnceLock;
    use tch::{Device, Tensor};

    /// Checkpoints written by the real `torch.save`, generated once for all tests.
    fn fixtures() -> &'static Path {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let python = std::env::var_os("X2V_PYTHON").unwrap_or_else(|| "python3".into());
            let script = r#"
import sys, torch
d = sys.argv[1]
torch.manual_seed(0)
torch.save({
    "f32": torch.randn(3, 4),
    "bf16": torch.randn(5).bfloat16(),
    "f16": torch.randn(2, 3).half(),
    "f64": torch.randn(2, dtype=torch.float64),
    "i64": torch.arange(7) - 3,
    "i32": torch.arange(4, dtype=torch.int32),
    "i16": torch.arange(3, dtype=torch.int16),
    "i8": torch.tensor([-1, 2], dtype=torch.int8),
    "u8": torch.tensor([250, 3], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 3),
    "unit_dims": torch.randn(3, 4)[1:2].t(),
}, d + "/dtypes.pth")
t = torch.arange(10.0)
torch.save({"a": t[2:], "b": t, "c": t[3:5], "row": torch.arange(12.0).reshape(3, 4)[1]},
           d + "/views.pth")
torch.save({"w": torch.randn(3, 4).t()}, d + "/transposed.pth")
m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
torch.save(m.state_dict(), d + "/state_dict.pth")
torch.save(dict(m.state_dict()), d + "/state_dict_plain.pth")
torch.save({"w": torch.arange(6, dtype=torch.int32), "n": 3, "note": "x",
            "meta": {"x": 1.5, "y": [1, None, True, b"raw"], "big": 2**70, "t": torch.ones(2)}},
           d + "/mixed.pth")
torch.save({"w": torch.ones(2)}, d + "/legacy.pth", _use_new_zipfile_serialization=False)
"#;
            let out = Command::new(python).arg("-c").arg(script).arg(dir.path()).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            dir
        })
        .path()
    }

    /// Checks the index of `indexed` against libtorch's loading of `original` (the same
    /// checkpoint, possibly in another zip layout): names, shapes, kinds and bytes.
    fn check_against_libtorch(original: &Path, indexed: &Path) -> Vec<PthTensor> {
        let index = read_index(indexed).unwrap();
        let loaded = Tensor::loadz_multi_with_device(original, Device::Cpu).unwrap();
        let file = std::fs::read(indexed).unwrap();
        let mut names: Vec<_> = index.iter().map(|t| t.name.as_str()).collect();
        let mut expected: Vec<_> = loaded.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        expected.sort();
        assert_eq!(names, expected);
        for t in &index {
            let want = &loaded.iter().find(|(n, _)| *n == t.name).unwrap().1;
            assert_eq!(t.shape, want.size(), "{}", t.name);
            assert_eq!(t.kind, want.kind(), "{}", t.name);
            let numel = want.numel();
            assert_eq!(t.len, (numel * t.kind.elt_size_in_bytes()) as u64, "{}", t.name);
            let mut bytes = vec![0u8; t.len as usize];
            want.contiguous().copy_data_u8(&mut bytes, numel);
            let got = &file[t.offset as usize..(t.offset + t.len) as usize];
            assert_eq!(got, &bytes[..], "{}", t.name);
        }
        index
    }

    #[test]
    fn pth_dtypes_match_libtorch() {
        let path = fixtures().join("dtypes.pth");
        let index = check_against_libtorch(&path, &path);
        let kind = |name: &str| index.iter().find(|t| t.name == name).unwrap().kind;
        assert_eq!(kind("bf16"), Kind::BFloat16);
        assert_eq!(kind("f16"), Kind::Half);
        assert_eq!(kind("bool"), Kind::Bool);
        assert_eq!(kind("u8"), Kind::Uint8);
        let scalar = index.iter().find(|t| t.name == "scalar").unwrap();
        assert_eq!((scalar.shape.as_slice(), scalar.len), (&[][..], 4));
        assert!(index.windows(2).all(|w| w[0].offset <= w[1].offset), "file order");
        // torch aligns tensor data to 64 bytes through the local header's extra field.
        assert!(
            index
                .iter()
                .filter(|t| !["unit_dims", "empty"].contains(&t.name.as_str()))
                .all(|t| t.offset % 64 == 0)
        );
    }

    #[test]
    fn pth_views_share_storage() {
        let path = fixtures().join("views.pth");
        let index = check_against_libtorch(&path, &path);
        let at = |name: &str| index.iter().find(|t| t.name == name).unwrap();
        assert_eq!(at("a").offset, at("b").offset + 8);
        assert_eq!(at("c").offset, at("b").offset + 12);
        assert_eq!((at("a").len, at("b").len, at("c").len), (32, 40, 8));
    }

    #[test]
    fn pth_transposed_view_is_unsupported() {
        let err = read_index(&fixtures().join("transposed.pth")).unwrap_err();
        assert!(matches!(&err, PthError::Unsupported(m) if m.contains("not contiguous")), "{err}");
    }

    #[test]
    fn pth_state_dict_with_metadata() {
        // libtorch's own loader fails on the OrderedDict's BUILD of `_metadata` ("Expected
        // GenericDict but got None"), so the values come from the same tensors saved as a dict.
        let plain = fixtures().join("state_dict_plain.pth");
        let index = check_against_libtorch(&plain, &fixtures().join("state_dict.pth"));
        let names: Vec<_> = index.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["0.weight", "0.bias", "1.weight", "1.bias"]);
        assert_eq!(index[0].shape, [3, 4]);
    }

    #[test]
    fn pth_non_tensor_values_are_skipped() {
        let path = fixtures().join("mixed.pth");
        let index = read_index(&path).unwrap();
        assert_eq!(index.len(), 1);
        let w = &index[0];
        assert_eq!((w.name.as_str(), w.kind, w.shape.as_slice()), ("w", Kind::Int, &[6][..]));
        let file = std::fs::read(&path).unwrap();
        let want: Vec<u8> = (0i32..6).flat_map(i32::to_le_bytes).collect();
        assert_eq!(&file[w.offset as usize..(w.offset + w.len) as usize], &want[..]);
    }

    #[test]
    fn pth_non_zip_files_are_rejected() {
        let err = read_index(&fixtures().join("legacy.pth")).unwrap_err();
        assert!(matches!(&err, PthError::Unsupported(m) if m.contains("legacy")), "{err}");
        let text = fixtures().join("text.pth");
        std::fs::write(&text, "not a checkpoint").unwrap();
        assert!(matches!(read_index(&text), Err(PthError::Zip { .. })));
        let empty = fixtures().join("empty.pth");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(read_index(&empty), Err(PthError::Zip { .. })));
        let missing = read_index(&fixtures().join("missing.pth"));
        assert!(matches!(missing, Err(PthError::Io { .. })));
    }

    /// Rewrites the entries of the zip `src` into `dst` (CRCs zeroed, which this reader does not
    /// check), with every size and offset in zip64 records if `zip64`, an odd-length local extra
    /// field, and the compression method `method(name)` recorded per entry.
    fn repack(src: &Path, dst: &Path, zip64: bool, method: impl Fn(&str) -> u16) {
        let mut zip = Archive::open(File::open(src).unwrap()).unwrap();
        let (mut out, mut central) = (Vec::new(), Vec::new());
        let names = zip.names.clone();
        for name in &names {
            let (start, len) = zip.data_range(name).unwrap();
            let data = zip.read_at(start, len).unwrap();
            let offset = out.len() as u64;
            let local_extra = [0xFE, 0xCA, 3, 0, 1, 2, 3];
            let m = method(name);
            out.extend(LOCAL_HEADER.to_le_bytes());
            for v in [45u16, 0, m, 0, 0] {
                out.extend(v.to_le_bytes());
            }
            for v in [0u32, len as u32, len as u32] {
                out.extend(v.to_le_bytes());
            }
            out.extend((name.len() as u16).to_le_bytes());
            out.extend((local_extra.len() as u16).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(local_extra);
            out.extend(&data);

            let (small, extra) = if zip64 {
                let mut extra = Vec::new();
                extra.extend(ZIP64_EXTRA_ID.to_le_bytes());
                extra.extend(24u16.to_le_bytes());
                for v in [len, len, offset] {
                    extra.extend(v.to_le_bytes());
                }
                ([0xFFFF_FFFFu32; 3], extra)
            } else {
                ([len as u32, len as u32, offset as u32], Vec::new())
            };
            central.extend(CENTRAL_HEADER.to_le_bytes());
            for v in [45u16, 45, 0, m, 0, 0] {
                central.extend(v.to_le_bytes());
            }
            for v in [0u32, small[0], small[1]] {
                central.extend(v.to_le_bytes());
            }
            for v in [name.len() as u16, extra.len() as u16, 0, 0, 0] {
                central.extend(v.to_le_bytes());
            }
            central.extend(0u32.to_le_bytes());
            central.extend(small[2].to_le_bytes());
            central.extend(name.as_bytes());
            central.extend(extra);
        }
        let (count, cd_offset, cd_size) =
            (names.len() as u64, out.len() as u64, central.len() as u64);
        out.extend(central);
        if zip64 {
            let record = out.len() as u64;
            out.extend(ZIP64_END_OF_DIRECTORY.to_le_bytes());
            out.extend(44u64.to_le_bytes());
            out.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            for v in [count, count, cd_size, cd_offset] {
                out.extend(v.to_le_bytes());
            }
            out.extend(ZIP64_LOCATOR.to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend(record.to_le_bytes());
            out.extend(1u32.to_le_bytes());
        }
        out.extend(END_OF_DIRECTORY.to_le_bytes());
        out.extend([0, 0, 0, 0]);
        if zip64 {
            out.extend([0xFF; 12]);
        } else {
            for v in [count as u16, count as u16] {
                out.extend(v.to_le_bytes());
            }
            out.extend((cd_size as u32).to_le_bytes());
            out.extend((cd_offset as u32).to_le_bytes());
        }
        // A comment, so the end record is not simply the last 22 bytes.
        out.extend(5u16.to_le_bytes());
        out.extend(b"hello");
        File::create(dst).unwrap().write_all(&out).unwrap();
    }

    #[test]
    fn pth_zip64_records() {
        let original = fixtures().join("views.pth");
        let repacked = fixtures().join("views_zip64.pth");
        repack(&original, &repacked, true, |_| 0);
        let zip = Archive::open(File::open(&repacked).unwrap()).unwrap();
        let plain = Archive::open(File::open(&original).unwrap()).unwrap();
        assert_eq!(zip.names, plain.names);
        for (name, e) in &zip.entries {
            assert_eq!(e.size, plain.entries[name].size, "{name}");
        }
        let index = check_against_libtorch(&original, &repacked);
        assert_eq!(index.len(), 4);
        // The same layout without zip64 records reads the same.
        let small = fixtures().join("views_plain.pth");
        repack(&original, &small, false, |_| 0);
        assert_eq!(read_index(&small).unwrap(), index);
    }

    #[test]
    fn pth_compressed_entry_is_unsupported() {
        let repacked = fixtures().join("views_deflate.pth");
        repack(&fixtures().join("views.pth"), &repacked, false, |n| {
            if n.ends_with("data/0") { 8 } else { 0 }
        });
        let err = read_index(&repacked).unwrap_err();
        assert!(matches!(&err, PthError::Unsupported(m) if m.contains("compressed")), "{err}");
    }
}
