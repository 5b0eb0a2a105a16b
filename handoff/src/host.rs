//! Host memory between libtorch and x2v-transfer, copied once on each side.
//!
//! - Sending: a tensor is copied once into a fresh host tensor that the payload's [`Bytes`] then
//!   own, so a device tensor goes straight from the device into the payload (no staging copy).
//! - Receiving: a tensor for a device is copied straight out of the receive pool (a view of the
//!   verified bytes, when they are aligned for their element type, which the pool's page-aligned
//!   parts always are); a tensor for the CPU gets its own copy, since the pool's space is returned
//!   when the payload is dropped and a libtorch tensor cannot hold it.
#![allow(unsafe_code)]

use bytes::Bytes;
use tch::{Device, Kind, TchError, Tensor};

/// A contiguous CPU tensor that nothing else references, read as bytes.
struct HostTensor {
    tensor: Tensor,
    len: usize,
}

impl AsRef<[u8]> for HostTensor {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `tensor` is a contiguous CPU tensor of `len` bytes (made by `copied`, which
        // allocates it empty and fills it) that only this struct holds: no handle to it was given
        // out, so its storage is neither freed nor written while the struct lives.
        unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.len) }
    }
}

/// `tensor`'s values in row-major order as bytes: one copy, from its device into memory the
/// returned [`Bytes`] own.
pub(crate) fn tensor_bytes(tensor: &Tensor) -> Result<Bytes, TchError> {
    let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
    if len == 0 {
        return Ok(Bytes::new());
    }
    let host = copied(tensor, Device::Cpu)?;
    Ok(Bytes::from_owner(HostTensor { tensor: host, len }))
}

/// A `shape` tensor of `kind` on `device` holding `data` (row-major, exactly `shape`·`kind` bytes,
/// not empty): copied once, straight from `data` when it is aligned for `kind`.
pub(crate) fn tensor_from_bytes(
    data: &[u8],
    shape: &[i64],
    kind: Kind,
    device: Device,
) -> Result<Tensor, TchError> {
    if !(data.as_ptr() as usize).is_multiple_of(kind.elt_size_in_bytes()) {
        return Tensor::f_from_data_size(data, shape, kind)?.f_to_device(device);
    }
    // SAFETY: `data` holds exactly `shape`·`kind` aligned values and is borrowed for this call;
    // the view is only read, by the copy below, and dropped before returning, so it never
    // outlives the bytes.
    let view = unsafe { Tensor::f_from_blob(data.as_ptr(), shape, &[], kind, Device::Cpu)? };
    copied(&view, device)
}

/// A new contiguous tensor on `device` holding `src`'s values, written by one copy that has ended
/// when this returns (a blocking copy between devices waits for it), without zero-filling first.
fn copied(src: &Tensor, device: Device) -> Result<Tensor, TchError> {
    let mut dst = Tensor::f_empty(src.size(), (src.kind(), device))?;
    dst.f_copy_(src)?;
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_own_a_copy_taken_once() {
        let mut t = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let bytes = tensor_bytes(&t).unwrap();
        assert_eq!(bytes.len(), 60);
        let expect: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
        let got: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, expect);
        // Later writes to the source do not reach the payload.
        let _ = t.fill_(7.0);
        assert_eq!(bytes.chunks_exact(4).next().unwrap(), &expect[0].to_le_bytes());
        // A strided tensor's bytes are row-major.
        let s = Tensor::arange(6, (Kind::Int, Device::Cpu)).view([2, 3]).transpose(0, 1);
        let bytes = tensor_bytes(&s).unwrap();
        let got: Vec<i32> =
            bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, [0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn aligned_and_misaligned_bytes_give_the_same_tensor_which_owns_its_memory() {
        let t = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
        let bytes = tensor_bytes(&t).unwrap();
        // The same bytes at an aligned and a misaligned address.
        let mut buf = vec![0u8; bytes.len() + 8];
        let start = buf.as_ptr().align_offset(8);
        buf[start..start + bytes.len()].copy_from_slice(&bytes);
        let aligned =
            tensor_from_bytes(&buf[start..start + 96], &[4, 6], Kind::Float, Device::Cpu).unwrap();
        buf.copy_within(start..start + 96, start + 1);
        let misaligned =
            tensor_from_bytes(&buf[start + 1..start + 97], &[4, 6], Kind::Float, Device::Cpu)
                .unwrap();
        assert!(aligned.equal(&t) && misaligned.equal(&t));
        // Neither aliases the buffer: overwriting it changes nothing.
        buf.fill(0xff);
        drop(buf);
        assert!(aligned.equal(&t) && misaligned.equal(&t));
    }
}
