//! x2v-handoff: what one stage hands the next, as the named tensors `x2v-transfer` moves.
//!
//! Sending: each tensor becomes a [`TensorPart`] (name, dtype, shape, bytes) — a contiguous
//! little-endian CPU copy in the tensor's own dtype (bf16 stays bf16), ready for
//! [`x2v_transfer::Payload::from_parts`]. Receiving: each `(TensorMeta, bytes)` pair of a received
//! payload becomes a tensor on the stage's device after its dtype, shape and length are checked
//! against each other. Each side copies a tensor's bytes once (`host.rs`). Errors name the tensor.
//!
//! The model code knows nothing of the transport; each family's stage payloads implement
//! [`Handoff`] here ([`wan`], [`qwen_image`]: Phase1 and Phase2).
#![deny(unsafe_code)]

mod host;
pub mod qwen_image;
pub mod wan;

use tch::{Device, Kind, Tensor};
pub use x2v_transfer::TensorPart;
use x2v_transfer::{Dtype, Received, TensorMeta};

/// libtorch element types and their wire dtypes (one to one).
const KINDS: &[(Kind, Dtype)] = &[
    (Kind::Float, Dtype::F32),
    (Kind::Half, Dtype::F16),
    (Kind::BFloat16, Dtype::BF16),
    (Kind::Double, Dtype::F64),
    (Kind::Int64, Dtype::I64),
    (Kind::Int, Dtype::I32),
    (Kind::Int16, Dtype::I16),
    (Kind::Int8, Dtype::I8),
    (Kind::Uint8, Dtype::U8),
    (Kind::Bool, Dtype::Bool),
    (Kind::Float8e4m3fn, Dtype::F8E4M3),
    (Kind::Float8e5m2, Dtype::F8E5M2),
];

/// Why a tensor or a stage payload could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("tensor `{name}` has dtype {kind:?}, which has no wire dtype")]
    UnsupportedKind { name: String, kind: Kind },
    #[error("tensor `{name}`: {message}")]
    Malformed { name: String, message: String },
    #[error("the {phase} payload lacks tensor `{name}`")]
    Missing { phase: &'static str, name: &'static str },
    #[error("unknown {phase} tensor `{name}` (expected one of {expected:?})")]
    Unknown { phase: &'static str, name: String, expected: &'static [&'static str] },
    #[error("tensor `{name}` appears twice in the {phase} payload")]
    Duplicate { phase: &'static str, name: String },
    #[error("tensor `{name}`: {source}")]
    Torch {
        name: String,
        #[source]
        source: tch::TchError,
    },
}

impl PayloadError {
    pub fn kind(&self) -> x2v_core::ErrorKind {
        match self {
            PayloadError::UnsupportedKind { .. } | PayloadError::Torch { .. } => {
                x2v_core::ErrorKind::Internal
            }
            _ => x2v_core::ErrorKind::InvalidRequest,
        }
    }
}

/// A stage payload that crosses to the next stage as named tensors.
pub trait Handoff: Sized {
    /// What the receiver must know besides the tensors (the job's output geometry).
    type Geometry;

    /// The payload's name in errors (`Phase1`).
    const PHASE: &'static str;
    /// The tensor names used on the wire; anything else is refused on receipt.
    const NAMES: &'static [&'static str];

    /// The tensors as parts, named from [`Handoff::NAMES`] (absent optional ones left out).
    fn to_parts(&self) -> Result<Vec<TensorPart>, PayloadError>;

    /// Rebuilds the payload on `device` from received `(meta, bytes)` pairs.
    fn from_parts<'a>(
        geometry: Self::Geometry,
        parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
        device: Device,
    ) -> Result<Self, PayloadError>;

    /// [`Handoff::from_parts`] on a received payload.
    fn from_received(
        geometry: Self::Geometry,
        received: &Received,
        device: Device,
    ) -> Result<Self, PayloadError> {
        Self::from_parts(geometry, received_parts(received), device)
    }
}

/// The wire dtype of a libtorch element type, if it has one.
pub fn wire_dtype(kind: Kind) -> Option<Dtype> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|&(_, d)| d)
}

/// The libtorch element type of a wire dtype.
pub fn tensor_kind(dtype: Dtype) -> Kind {
    KINDS.iter().find(|(_, d)| *d == dtype).map(|&(k, _)| k).expect("every wire dtype is listed")
}

/// `tensor` as a [`TensorPart`] called `name`: same dtype and shape, its values copied once to
/// host memory in row-major order (a strided or device tensor is made contiguous on the way).
pub fn tensor_to_part(name: &str, tensor: &Tensor) -> Result<TensorPart, PayloadError> {
    let kind = tensor.kind();
    let dtype = wire_dtype(kind)
        .ok_or_else(|| PayloadError::UnsupportedKind { name: name.to_owned(), kind })?;
    let shape: Vec<u64> = tensor.size().iter().map(|&d| d as u64).collect();
    let bytes = host::tensor_bytes(tensor)
        .map_err(|source| PayloadError::Torch { name: name.to_owned(), source })?;
    Ok(TensorPart { name: name.to_owned(), dtype, shape, bytes })
}

/// The tensor `meta` describes, built from `data` on `device`. The shape, dtype and byte length
/// of `meta` and the length of `data` must agree.
pub fn tensor_from_part(
    meta: &TensorMeta,
    data: &[u8],
    device: Device,
) -> Result<Tensor, PayloadError> {
    let bad = |message: String| PayloadError::Malformed { name: meta.name.clone(), message };
    let shape: Vec<i64> = meta
        .shape
        .iter()
        .map(|&d| i64::try_from(d).map_err(|_| bad(format!("dimension {d} is too large"))))
        .collect::<Result<_, _>>()?;
    let want = meta
        .shape
        .iter()
        .try_fold(meta.dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", meta.shape)))?;
    if want != meta.byte_len {
        return Err(bad(format!(
            "shape {:?} of {:?} needs {want} bytes, the manifest says {}",
            meta.shape, meta.dtype, meta.byte_len
        )));
    }
    if data.len() as u64 != want {
        return Err(bad(format!(
            "shape {:?} of {:?} needs {want} bytes, {} arrived",
            meta.shape,
            meta.dtype,
            data.len()
        )));
    }
    let kind = tensor_kind(meta.dtype);
    let torch = |source| PayloadError::Torch { name: meta.name.clone(), source };
    if data.is_empty() {
        return Tensor::f_zeros(&shape, (kind, device)).map_err(torch);
    }
    host::tensor_from_bytes(data, &shape, kind, device).map_err(torch)
}

/// The `(meta, bytes)` pairs of a received payload, in the sender's order.
pub fn received_parts(received: &Received) -> impl Iterator<Item = (&TensorMeta, &[u8])> {
    received.tensors().iter().map(|m| (m, received.bytes(&m.name).unwrap_or_default()))
}

/// Named tensors of one payload as they arrived: names from the payload's
/// [`Handoff::NAMES`], each once.
pub struct Collected {
    phase: &'static str,
    tensors: Vec<(&'static str, Tensor)>,
}

impl Collected {
    /// Converts `parts` on `device`, refusing names outside `P::NAMES` and repeated names.
    pub fn of<'a, P: Handoff>(
        parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
        device: Device,
    ) -> Result<Self, PayloadError> {
        let phase = P::PHASE;
        let mut tensors: Vec<(&'static str, Tensor)> = Vec::new();
        for (meta, data) in parts {
            let Some(&name) = P::NAMES.iter().find(|n| **n == meta.name) else {
                let name = meta.name.clone();
                return Err(PayloadError::Unknown { phase, name, expected: P::NAMES });
            };
            if tensors.iter().any(|(n, _)| *n == name) {
                return Err(PayloadError::Duplicate { phase, name: name.to_owned() });
            }
            tensors.push((name, tensor_from_part(meta, data, device)?));
        }
        Ok(Collected { phase, tensors })
    }

    /// Takes the tensor called `name`, if it arrived.
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        let i = self.tensors.iter().position(|(n, _)| *n == name)?;
        Some(self.tensors.swap_remove(i).1)
    }

    /// Takes the tensor called `name`, which the payload requires.
    pub fn require(&mut self, name: &'static str) -> Result<Tensor, PayloadError> {
        self.take(name).ok_or(PayloadError::Missing { phase: self.phase, name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the receiving side sees for a part (no digest: conversion does not check it).
    pub(crate) fn meta(part: &TensorPart) -> TensorMeta {
        TensorMeta {
            name: part.name.clone(),
            dtype: part.dtype,
            shape: part.shape.clone(),
            byte_len: part.bytes.len() as u64,
            sha256: None,
        }
    }

    fn round_trip(t: &Tensor) -> Tensor {
        let part = tensor_to_part("x", t).unwrap();
        assert_eq!(part.shape, t.size().iter().map(|&d| d as u64).collect::<Vec<_>>());
        tensor_from_part(&meta(&part), &part.bytes, Device::Cpu).unwrap()
    }

    #[test]
    fn f32_bf16_and_u8_round_trip_exactly() {
        let f = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu));
        let part = tensor_to_part("f", &f).unwrap();
        assert_eq!((part.dtype, part.bytes.len()), (Dtype::F32, 2 * 3 * 5 * 4));
        assert!(round_trip(&f).equal(&f));

        let b = Tensor::randn([4, 7], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let part = tensor_to_part("b", &b).unwrap();
        assert_eq!((part.dtype, part.bytes.len()), (Dtype::BF16, 4 * 7 * 2));
        let back = round_trip(&b);
        assert_eq!(back.kind(), Kind::BFloat16);
        assert!(back.equal(&b));

        let u = Tensor::arange(256, (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8).view([4, 64]);
        assert_eq!(tensor_to_part("u", &u).unwrap().dtype, Dtype::U8);
        assert!(round_trip(&u).equal(&u));
    }

    #[test]
    fn strided_and_empty_tensors_round_trip() {
        let t = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
        assert!(!t.is_contiguous());
        assert!(round_trip(&t).equal(&t));
        let e = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        assert_eq!(round_trip(&e).size(), [0, 3]);
    }

    #[test]
    fn mismatches_name_the_tensor() {
        let t = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let part = tensor_to_part("prompt_embeds", &t).unwrap();

        let mut wrong_shape = meta(&part);
        wrong_shape.shape = vec![2, 4];
        let err = tensor_from_part(&wrong_shape, &part.bytes, Device::Cpu).unwrap_err();
        assert!(matches!(err, PayloadError::Malformed { ref name, .. } if name == "prompt_embeds"));
        assert!(err.to_string().contains("needs 32 bytes, the manifest says 24"), "{err}");

        let err = tensor_from_part(&meta(&part), &part.bytes[..20], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`prompt_embeds`"), "{err}");
        assert!(err.to_string().contains("needs 24 bytes, 20 arrived"), "{err}");

        let mut wrong_dtype = meta(&part);
        wrong_dtype.dtype = Dtype::BF16;
        let err = tensor_from_part(&wrong_dtype, &part.bytes, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes"), "{err}");

        let c = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
        let err = tensor_to_part("c", &c).unwrap_err();
        assert!(err.to_string().contains("`c`") && err.to_string().contains("ComplexFloat"));
    }
}
