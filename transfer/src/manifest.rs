//! Payload descriptions: a manifest of named tensors (dtype, shape, byte length, chunked SHA-256
//! root) and the sender-side [`Payload`] that pairs a manifest with the bytes.
//!
//! Digests are the chunked SHA-256 of [`crate::digest`]: per tensor, a SHA-256 per leaf of
//! [`LEAF_BYTES`] and a root over them. A payload either carries its roots in the manifest (computed
//! when it is built, on every core: [`Payload::new`]) or has the writer hash the leaves while the bytes
//! move and send them after the data ([`Payload::deferred`]); either way the receiver hashes what
//! landed, leaf by leaf, on its own threads, and checks it before anything is handed out.
//!
//! Tensors are matched by name, never by position. A manifest is validated on both sides: the sender
//! cannot build an inconsistent one, and the receiver re-checks everything it decodes off the wire.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use crate::digest::{self, LEAF_BYTES, Sha};
use crate::error::{Result, TransferError};

/// Longest tensor name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Highest tensor rank accepted.
pub const MAX_RANK: usize = 8;
/// Most tensors in one payload.
pub const MAX_TENSORS: usize = 1024;

/// Element types a tensor may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Dtype {
    F32 = 1,
    F16 = 2,
    BF16 = 3,
    F64 = 4,
    I64 = 5,
    I32 = 6,
    I16 = 7,
    I8 = 8,
    U8 = 9,
    Bool = 10,
    F8E4M3 = 11,
    F8E5M2 = 12,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Decodes a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        use Dtype::*;
        [F32, F16, BF16, F64, I64, I32, I16, I8, U8, Bool, F8E4M3, F8E5M2]
            .into_iter()
            .find(|d| d.code() == code)
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Unique within the payload, e.g. `text_embeddings`.
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Exactly `product(shape) * dtype.size()`.
    pub byte_len: u64,
    /// Chunked SHA-256 root of the bytes ([`crate::digest`]). `None` in a manifest when the writer
    /// sends the tensor's leaf digests after its bytes instead ([`Payload::deferred`]) or runs with
    /// digests switched off; a receiver fills in the root it verified.
    pub sha256: Option<[u8; 32]>,
}

impl TensorMeta {
    /// Checks the fields against each other and the crate limits.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(TransferError::Invalid(format!(
                "tensor name must be 1..={MAX_NAME_LEN} bytes, got {} bytes",
                self.name.len()
            )));
        }
        if self.shape.len() > MAX_RANK {
            return Err(TransferError::Invalid(format!(
                "tensor `{}` has rank {}, at most {MAX_RANK} allowed",
                self.name,
                self.shape.len()
            )));
        }
        let expected = self
            .shape
            .iter()
            .try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                TransferError::Invalid(format!("tensor `{}` shape overflows u64", self.name))
            })?;
        if expected != self.byte_len {
            return Err(TransferError::Invalid(format!(
                "tensor `{}`: shape {:?} of {:?} needs {expected} bytes, manifest says {}",
                self.name, self.shape, self.dtype, self.byte_len
            )));
        }
        Ok(())
    }
}

/// Validates a whole manifest: each tensor, unique names, count and total size limits.
pub fn validate_manifest(tensors: &[TensorMeta], max_total: u64) -> Result<u64> {
    if tensors.is_empty() || tensors.len() > MAX_TENSORS {
        return Err(TransferError::Invalid(format!(
            "a payload carries 1..={MAX_TENSORS} tensors, got {}",
            tensors.len()
        )));
    }
    let mut names = HashSet::with_capacity(tensors.len());
    let mut total: u64 = 0;
    for t in tensors {
        t.validate()?;
        if !names.insert(t.name.as_str()) {
            return Err(TransferError::Invalid(format!("tensor name `{}` appears twice", t.name)));
        }
        total = total
            .checked_add(t.byte_len)
            .ok_or_else(|| TransferError::Invalid("total size overflows".into()))?;
    }
    if total > max_total {
        return Err(TransferError::TooLarge {
            requested: total,
            limit: max_total,
            what: "payload",
        });
    }
    Ok(total)
}

/// A tensor to send: its description and its bytes (cheaply cloneable).
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub meta: TensorMeta,
    pub data: Bytes,
}

/// One tensor to put in a [`Payload`]: its name, dtype, shape and bytes (row-major, little-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPart {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub bytes: Bytes,
}

/// How a payload's tensors are digested.
#[derive(Debug, Clone)]
pub(crate) enum Digests {
    /// No digests ([`Payload::without_digests`]).
    Off,
    /// Computed when the payload was built: roots in the manifest, leaves sent after the bytes.
    Known { leaf_bytes: u32, leaves: Arc<[Vec<Sha>]> },
    /// Computed by the writer while the bytes move, sent after them.
    OnSend { leaf_bytes: u32 },
}

impl Digests {
    /// The leaf size announced on the wire; `None` when the payload carries no digests.
    pub fn leaf_bytes(&self) -> Option<u32> {
        match self {
            Digests::Off => None,
            Digests::Known { leaf_bytes, .. } | Digests::OnSend { leaf_bytes } => Some(*leaf_bytes),
        }
    }
}

/// What a sender pushes or publishes: named tensors, and how their digests are made.
#[derive(Debug, Clone)]
pub struct Payload {
    pub(crate) tensors: Vec<OutTensor>,
    pub(crate) digests: Digests,
}

/// How [`Payload::assemble`] digests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    Never,
    Now,
    OnSend,
}

impl Payload {
    /// Builds a payload, computing every tensor's chunked SHA-256 now, on every core (about
    /// 1.4–2 GB/s per core: call from a blocking context, or use [`Payload::build`]). The roots go in
    /// the manifest. [`Payload::deferred`] leaves the hashing to the writer, overlapped with the bytes.
    pub fn new(tensors: Vec<(String, Dtype, Vec<u64>, Bytes)>) -> Result<Self> {
        Self::assemble(tensors, When::Now)
    }

    /// [`Payload::new`] on named parts.
    pub fn from_parts(parts: Vec<TensorPart>) -> Result<Self> {
        Self::new(parts.into_iter().map(|p| (p.name, p.dtype, p.shape, p.bytes)).collect())
    }

    /// Builds a payload whose digests the writer computes while it moves the bytes (on
    /// `EngineConfig::hash_threads` threads), sending each tensor's leaf digests after its bytes: no
    /// hashing before the first byte moves. Cheap; every push or pull of it hashes again.
    pub fn deferred(tensors: Vec<(String, Dtype, Vec<u64>, Bytes)>) -> Result<Self> {
        Self::assemble(tensors, When::OnSend)
    }

    /// [`Payload::deferred`] on named parts.
    pub fn deferred_parts(parts: Vec<TensorPart>) -> Result<Self> {
        Self::deferred(parts.into_iter().map(|p| (p.name, p.dtype, p.shape, p.bytes)).collect())
    }

    /// Builds a payload without digests; receivers that require SHA-256 will refuse it.
    pub fn without_digests(tensors: Vec<(String, Dtype, Vec<u64>, Bytes)>) -> Result<Self> {
        Self::assemble(tensors, When::Never)
    }

    /// [`Payload::new`] on a blocking thread, for async callers.
    pub async fn build(tensors: Vec<(String, Dtype, Vec<u64>, Bytes)>) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::new(tensors))
            .await
            .map_err(|e| TransferError::Invalid(format!("hashing task failed: {e}")))?
    }

    fn assemble(tensors: Vec<(String, Dtype, Vec<u64>, Bytes)>, when: When) -> Result<Self> {
        let mut tensors: Vec<OutTensor> = tensors
            .into_iter()
            .map(|(name, dtype, shape, data)| OutTensor {
                meta: TensorMeta { name, dtype, shape, byte_len: data.len() as u64, sha256: None },
                data,
            })
            .collect();
        let metas: Vec<TensorMeta> = tensors.iter().map(|t| t.meta.clone()).collect();
        validate_manifest(&metas, u64::MAX)?;
        let digests = match when {
            When::Never => Digests::Off,
            When::OnSend => Digests::OnSend { leaf_bytes: LEAF_BYTES },
            When::Now => {
                let data: Vec<&[u8]> = tensors.iter().map(|t| &t.data[..]).collect();
                let leaves = digest::leaves_parallel(&data, LEAF_BYTES, digest::default_threads());
                for (t, l) in tensors.iter_mut().zip(&leaves) {
                    t.meta.sha256 = Some(digest::root(LEAF_BYTES, t.meta.byte_len, l));
                }
                Digests::Known { leaf_bytes: LEAF_BYTES, leaves: leaves.into() }
            }
        };
        Ok(Payload { tensors, digests })
    }

    /// The tensors, in payload order.
    pub fn tensors(&self) -> &[OutTensor] {
        &self.tensors
    }

    /// The manifest, in payload order.
    pub fn manifest(&self) -> Vec<TensorMeta> {
        self.tensors.iter().map(|t| t.meta.clone()).collect()
    }

    /// Sum of all tensors' byte lengths.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.meta.byte_len).sum()
    }

    /// The digests' leaf size; `None` for a payload without digests.
    pub fn leaf_bytes(&self) -> Option<u32> {
        self.digests.leaf_bytes()
    }

    /// Whether the writer computes the digests while sending ([`Payload::deferred`]).
    pub fn digests_deferred(&self) -> bool {
        matches!(self.digests, Digests::OnSend { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, shape: Vec<u64>, byte_len: u64) -> TensorMeta {
        TensorMeta { name: name.into(), dtype: Dtype::BF16, shape, byte_len, sha256: None }
    }

    #[test]
    fn shape_must_match_byte_length() {
        assert!(meta("a", vec![2, 3], 12).validate().is_ok());
        let err = meta("a", vec![2, 3], 24).validate().unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes"), "{err}");
        assert!(meta("a", vec![u64::MAX, 4], 0).validate().is_err());
        assert!(meta("", vec![], 2).validate().is_err());
        assert!(meta("a", vec![1; 9], 2).validate().is_err());
    }

    #[test]
    fn manifest_rejects_duplicates_and_oversize() {
        let dup = [meta("x", vec![1], 2), meta("x", vec![1], 2)];
        assert!(validate_manifest(&dup, 100).unwrap_err().to_string().contains("twice"));
        let big = [meta("x", vec![100], 200)];
        assert!(matches!(validate_manifest(&big, 100), Err(TransferError::TooLarge { .. })));
        assert!(validate_manifest(&[], 100).is_err());
    }

    /// First bytes of the chunked SHA-256 root of `abc` (1 MiB leaves; see `digest::tests`).
    const ABC_ROOT: [u8; 4] = [0xc4, 0x5f, 0xdb, 0x47];

    #[test]
    fn payload_digests_bytes() {
        let p = Payload::new(vec![("t".into(), Dtype::U8, vec![3], Bytes::from_static(b"abc"))])
            .unwrap();
        let d = p.manifest()[0].sha256.unwrap();
        assert_eq!(d[..4], ABC_ROOT);
        assert_eq!(p.leaf_bytes(), Some(LEAF_BYTES));
        assert!(
            Payload::new(vec![("t".into(), Dtype::F32, vec![3], Bytes::from_static(b"abc"))])
                .is_err()
        );
    }

    #[test]
    fn named_parts_build_the_same_payload() {
        let part = TensorPart {
            name: "t".into(),
            dtype: Dtype::U8,
            shape: vec![3],
            bytes: Bytes::from_static(b"abc"),
        };
        let p = Payload::from_parts(vec![part.clone()]).unwrap();
        assert_eq!(p.manifest()[0].name, "t");
        assert_eq!(p.manifest()[0].sha256.unwrap()[..4], ABC_ROOT);
        let wrong = TensorPart { dtype: Dtype::F32, ..part };
        assert!(Payload::from_parts(vec![wrong]).is_err());
    }

    #[test]
    fn dtype_codes_round_trip() {
        for code in 0..=255u8 {
            if let Some(d) = Dtype::from_code(code) {
                assert_eq!(d.code(), code);
            }
        }
        assert_eq!(Dtype::from_code(3), Some(Dtype::BF16));
        assert_eq!(Dtype::from_code(0), None);
    }

    #[test]
    fn payloads_carry_their_digest_plan() {
        let data = Bytes::from((0..3 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let tensors = || vec![("t".to_string(), Dtype::U8, vec![data.len() as u64], data.clone())];
        let now = Payload::new(tensors()).unwrap();
        let Digests::Known { leaf_bytes, leaves } = &now.digests else { panic!("not hashed") };
        assert_eq!((*leaf_bytes, leaves[0].len()), (LEAF_BYTES, 3));
        assert_eq!(leaves[0], digest::leaves(&data, LEAF_BYTES));
        assert_eq!(now.manifest()[0].sha256, Some(digest::chunked_sha256(&data, LEAF_BYTES)));
        let later = Payload::deferred(tensors()).unwrap();
        assert!(later.digests_deferred() && !now.digests_deferred());
        assert_eq!((later.manifest()[0].sha256, later.leaf_bytes()), (None, Some(LEAF_BYTES)));
        let off = Payload::without_digests(tensors()).unwrap();
        assert_eq!((off.manifest()[0].sha256, off.leaf_bytes()), (None, None));
        assert!(Payload::deferred(vec![("t".into(), Dtype::F32, vec![3], data.clone())]).is_err());
    }
}
