//! Stage payloads on the wire: [`Phase1`] and [`Phase2`] as the named tensors `x2v-transfer`
//! moves, and back.
//!
//! Sending: each tensor becomes a [`Part`] `(name, dtype, shape, bytes)` — a contiguous
//! little-endian CPU copy in the tensor's own dtype (bf16 stays bf16), ready for
//! `x2v_transfer::Payload::new`. Receiving: each `(TensorMeta, bytes)` pair of a
//! `x2v_transfer::Received` becomes a tensor on the stage's device after its dtype, shape and
//! length are checked against each other. Errors name the tensor.

use bytes::Bytes;
use tch::{Device, Kind, Tensor};
use x2v_transfer::{Dtype, Received, TensorMeta};

use super::{Geometry, Phase1, Phase2};

/// One tensor ready for `x2v_transfer::Payload::new`: name, dtype, shape, bytes.
pub type Part = (String, Dtype, Vec<u64>, Bytes);

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

/// Why a tensor or a phase payload could not be converted.
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

/// The wire dtype of a libtorch element type, if it has one.
pub fn wire_dtype(kind: Kind) -> Option<Dtype> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|&(_, d)| d)
}

/// The libtorch element type of a wire dtype.
pub fn tensor_kind(dtype: Dtype) -> Kind {
    KINDS.iter().find(|(_, d)| *d == dtype).map(|&(k, _)| k).expect("every wire dtype is listed")
}

/// `tensor` as a [`Part`] called `name`: same dtype and shape, bytes copied to the CPU in
/// row-major order (a strided or device tensor is made contiguous on the way).
pub fn tensor_to_part(name: &str, tensor: &Tensor) -> Result<Part, PayloadError> {
    let kind = tensor.kind();
    let dtype = wire_dtype(kind)
        .ok_or_else(|| PayloadError::UnsupportedKind { name: name.to_owned(), kind })?;
    let shape: Vec<u64> = tensor.size().iter().map(|&d| d as u64).collect();
    let numel = tensor.numel();
    let mut data = vec![0u8; numel * dtype.size() as usize];
    if numel > 0 {
        tensor
            .f_copy_data_u8(&mut data, numel)
            .map_err(|source| PayloadError::Torch { name: name.to_owned(), source })?;
    }
    Ok((name.to_owned(), dtype, shape, Bytes::from(data)))
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
    let t = if data.is_empty() {
        Tensor::f_zeros(&shape, (kind, Device::Cpu)).map_err(torch)?
    } else {
        Tensor::f_from_data_size(data, &shape, kind).map_err(torch)?
    };
    t.f_to_device(device).map_err(torch)
}

/// The `(meta, bytes)` pairs of a received payload, in the sender's order.
pub fn received_parts(received: &Received) -> impl Iterator<Item = (&TensorMeta, &[u8])> {
    received.tensors().iter().map(|m| (m, received.bytes(&m.name).unwrap_or_default()))
}

/// Collects named tensors of one phase: names must be in `expected` and appear once.
fn collect<'a>(
    phase: &'static str,
    expected: &'static [&'static str],
    parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
    device: Device,
) -> Result<Vec<(&'static str, Tensor)>, PayloadError> {
    let mut out: Vec<(&'static str, Tensor)> = Vec::new();
    for (meta, data) in parts {
        let Some(&name) = expected.iter().find(|n| **n == meta.name) else {
            return Err(PayloadError::Unknown { phase, name: meta.name.clone(), expected });
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(PayloadError::Duplicate { phase, name: name.to_owned() });
        }
        out.push((name, tensor_from_part(meta, data, device)?));
    }
    Ok(out)
}

fn take(named: &mut Vec<(&'static str, Tensor)>, name: &str) -> Option<Tensor> {
    let i = named.iter().position(|(n, _)| *n == name)?;
    Some(named.swap_remove(i).1)
}

impl Phase1 {
    /// The tensors as [`Part`]s, named as in [`Phase1::NAMES`] (absent optional ones left out).
    pub fn to_parts(&self) -> Result<Vec<Part>, PayloadError> {
        self.named().iter().map(|(name, t)| tensor_to_part(name, t)).collect()
    }

    /// Rebuilds a Phase1 on `device` from received `(meta, bytes)` pairs; `prompt_embeds` is
    /// required, the other names of [`Phase1::NAMES`] optional, anything else an error.
    pub fn from_parts<'a>(
        geometry: Geometry,
        parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
        device: Device,
    ) -> Result<Self, PayloadError> {
        const PHASE: &str = "Phase1";
        let mut named = collect(PHASE, &Self::NAMES, parts, device)?;
        let prompt_embeds = take(&mut named, "prompt_embeds")
            .ok_or(PayloadError::Missing { phase: PHASE, name: "prompt_embeds" })?;
        Ok(Phase1 {
            geometry,
            prompt_embeds,
            negative_prompt_embeds: take(&mut named, "negative_prompt_embeds"),
            image_embeds: take(&mut named, "image_embeds"),
            condition: take(&mut named, "condition"),
        })
    }

    /// [`Phase1::from_parts`] on a received payload.
    pub fn from_received(
        geometry: Geometry,
        received: &Received,
        device: Device,
    ) -> Result<Self, PayloadError> {
        Self::from_parts(geometry, received_parts(received), device)
    }
}

impl Phase2 {
    /// The tensor names used on the wire.
    pub const NAMES: [&'static str; 1] = ["latents"];

    /// The latents as one [`Part`] called `latents`.
    pub fn to_parts(&self) -> Result<Vec<Part>, PayloadError> {
        Ok(vec![tensor_to_part("latents", &self.latents)?])
    }

    /// Rebuilds a Phase2 on `device` from received `(meta, bytes)` pairs (exactly `latents`).
    pub fn from_parts<'a>(
        geometry: Geometry,
        parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
        device: Device,
    ) -> Result<Self, PayloadError> {
        const PHASE: &str = "Phase2";
        let mut named = collect(PHASE, &Self::NAMES, parts, device)?;
        let latents = take(&mut named, "latents")
            .ok_or(PayloadError::Missing { phase: PHASE, name: "latents" })?;
        Ok(Phase2 { geometry, latents })
    }

    /// [`Phase2::from_parts`] on a received payload.
    pub fn from_received(
        geometry: Geometry,
        received: &Received,
        device: Device,
    ) -> Result<Self, PayloadError> {
        Self::from_parts(geometry, received_parts(received), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the receiving side sees for a part (no digest: conversion does not check it).
    fn meta(part: &Part) -> TensorMeta {
        TensorMeta {
            name: part.0.clone(),
            dtype: part.1,
            shape: part.2.clone(),
            byte_len: part.3.len() as u64,
            sha256: None,
        }
    }

    fn round_trip(t: &Tensor) -> Tensor {
        let part = tensor_to_part("x", t).unwrap();
        assert_eq!(part.2, t.size().iter().map(|&d| d as u64).collect::<Vec<_>>());
        tensor_from_part(&meta(&part), &part.3, Device::Cpu).unwrap()
    }

    #[test]
    fn f32_bf16_and_u8_round_trip_exactly() {
        let f = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu));
        let part = tensor_to_part("f", &f).unwrap();
        assert_eq!((part.1, part.3.len()), (Dtype::F32, 2 * 3 * 5 * 4));
        assert!(round_trip(&f).equal(&f));

        let b = Tensor::randn([4, 7], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let part = tensor_to_part("b", &b).unwrap();
        assert_eq!((part.1, part.3.len()), (Dtype::BF16, 4 * 7 * 2));
        let back = round_trip(&b);
        assert_eq!(back.kind(), Kind::BFloat16);
        assert!(back.equal(&b));

        let u = Tensor::arange(256, (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8).view([4, 64]);
        assert_eq!(tensor_to_part("u", &u).unwrap().1, Dtype::U8);
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
        let err = tensor_from_part(&wrong_shape, &part.3, Device::Cpu).unwrap_err();
        assert!(matches!(err, PayloadError::Malformed { ref name, .. } if name == "prompt_embeds"));
        assert!(err.to_string().contains("needs 32 bytes, the manifest says 24"), "{err}");

        let err = tensor_from_part(&meta(&part), &part.3[..20], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`prompt_embeds`"), "{err}");
        assert!(err.to_string().contains("needs 24 bytes, 20 arrived"), "{err}");

        let mut wrong_dtype = meta(&part);
        wrong_dtype.dtype = Dtype::BF16;
        let err = tensor_from_part(&wrong_dtype, &part.3, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes"), "{err}");

        let c = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
        let err = tensor_to_part("c", &c).unwrap_err();
        assert!(err.to_string().contains("`c`") && err.to_string().contains("ComplexFloat"));
    }

    #[test]
    fn phases_round_trip_by_name() {
        let g = Geometry { frames: 5, height: 64, width: 64 };
        let bf = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let p1 = Phase1 {
            geometry: g,
            prompt_embeds: bf(&[1, 7, 32]),
            negative_prompt_embeds: Some(bf(&[1, 3, 32])),
            image_embeds: None,
            condition: Some(Tensor::randn([1, 20, 2, 8, 8], (Kind::Float, Device::Cpu))),
        };
        let parts = p1.to_parts().unwrap();
        let names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(names, ["prompt_embeds", "negative_prompt_embeds", "condition"]);
        let metas: Vec<TensorMeta> = parts.iter().map(meta).collect();
        let pairs = metas.iter().zip(&parts).map(|(m, p)| (m, &p.3[..]));
        let back = Phase1::from_parts(g, pairs, Device::Cpu).unwrap();
        assert_eq!(back.geometry, g);
        assert!(back.prompt_embeds.equal(&p1.prompt_embeds));
        assert_eq!(back.prompt_embeds.kind(), Kind::BFloat16);
        let neg = back.negative_prompt_embeds.unwrap();
        assert!(neg.equal(p1.negative_prompt_embeds.as_ref().unwrap()));
        assert!(back.image_embeds.is_none());
        assert!(back.condition.unwrap().equal(p1.condition.as_ref().unwrap()));

        // Without prompt_embeds, or with a foreign or repeated name, the payload is refused.
        let missing = metas.iter().zip(&parts).skip(1).map(|(m, p)| (m, &p.3[..]));
        let err = Phase1::from_parts(g, missing, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("lacks tensor `prompt_embeds`"), "{err}");
        let lat =
            tensor_to_part("latents", &Tensor::zeros([1], (Kind::Float, Device::Cpu))).unwrap();
        let lat_meta = meta(&lat);
        let err = Phase1::from_parts(g, [(&lat_meta, &lat.3[..])], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("unknown Phase1 tensor `latents`"), "{err}");
        let twice = [(&metas[0], &parts[0].3[..]), (&metas[0], &parts[0].3[..])];
        let err = Phase1::from_parts(g, twice, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`prompt_embeds` appears twice"), "{err}");

        let p2 = Phase2 {
            geometry: g,
            latents: Tensor::randn(g.latent_shape(), (Kind::Float, Device::Cpu)),
        };
        let p2_parts = p2.to_parts().unwrap();
        assert_eq!(p2_parts[0].0, "latents");
        let m = meta(&p2_parts[0]);
        let back = Phase2::from_parts(g, [(&m, &p2_parts[0].3[..])], Device::Cpu).unwrap();
        assert!(back.latents.equal(&p2.latents));
        let err = Phase2::from_parts(g, [(&metas[0], &parts[0].3[..])], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("unknown Phase2 tensor `prompt_embeds`"), "{err}");
        let err = Phase2::from_parts(g, std::iter::empty(), Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("lacks tensor `latents`"), "{err}");
    }
}
