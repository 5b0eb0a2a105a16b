//! Codec tests: every frame round-trips, and arbitrary bytes decode to a frame or an error, never a panic.

use proptest::prelude::*;
use x2v_core::ErrorKind;

use super::*;

fn dtype() -> impl Strategy<Value = Dtype> {
    (1u8..=12).prop_map(|c| Dtype::from_code(c).expect("codes 1..=12 exist"))
}

fn tensor() -> impl Strategy<Value = TensorMeta> {
    (
        "[a-z_.0-9]{1,40}",
        dtype(),
        prop::collection::vec(any::<u64>(), 0..=MAX_RANK),
        any::<u64>(),
        any::<Option<[u8; 32]>>(),
    )
        .prop_map(|(name, dtype, shape, byte_len, sha256)| TensorMeta {
            name,
            dtype,
            shape,
            byte_len,
            sha256,
        })
}

/// A leaf size a receiver accepts, or none.
fn leaf_bytes() -> impl Strategy<Value = Option<u32>> {
    prop::option::of((12u32..=26).prop_map(|shift| 1 << shift))
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<[u8; 32]>(), any::<[u8; 16]>(), prop::option::of("[a-z/0-9-]{1,60}"))
            .prop_map(|(nonce, host_id, shm)| Frame::Hello { nonce, host_id, shm }),
        (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(nonce, mac)| Frame::Auth { nonce, mac }),
        any::<[u8; 32]>().prop_map(|mac| Frame::AuthOk { mac }),
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<bool>(),
            leaf_bytes(),
            prop::collection::vec(tensor(), 0..5)
        )
            .prop_map(|(job, deadline_ms, chunk_crc, leaf_bytes, tensors)| {
                Frame::PushBegin { job, deadline_ms, chunk_crc, leaf_bytes, tensors }
            }),
        (any::<[u8; 16]>(), any::<u64>(), any::<bool>()).prop_map(
            |(job, deadline_ms, chunk_crc)| Frame::PullRequest { job, deadline_ms, chunk_crc }
        ),
        (leaf_bytes(), prop::collection::vec(tensor(), 0..5))
            .prop_map(|(leaf_bytes, tensors)| Frame::Manifest { leaf_bytes, tensors }),
        any::<Option<u64>>().prop_map(|shm_offset| Frame::Ready { shm_offset }),
        (any::<u32>(), any::<u64>(), any::<u32>(), any::<Option<u32>>())
            .prop_map(|(tensor, offset, len, crc)| Frame::Chunk { tensor, offset, len, crc }),
        (any::<u32>(), any::<u32>(), prop::collection::vec(any::<[u8; 32]>(), 1..40))
            .prop_map(|(tensor, first, digests)| Frame::Leaves { tensor, first, digests }),
        Just(Frame::DataDone),
        Just(Frame::Ack),
        (0..ErrorKind::ALL.len(), ".{0,100}")
            .prop_map(|(i, message)| Frame::Error { kind: ErrorKind::ALL[i], message }),
    ]
}

fn split(bytes: &[u8]) -> (u32, u8, &[u8]) {
    (u32::from_le_bytes(bytes[..4].try_into().unwrap()), bytes[4], &bytes[5..])
}

proptest! {
    #[test]
    fn frames_round_trip(f in frame()) {
        let bytes = f.encode();
        let (len, tag, body) = split(&bytes);
        prop_assert_eq!(len as usize, body.len());
        prop_assert_eq!(Frame::decode(tag, body), Ok(f));
    }

    #[test]
    fn arbitrary_bytes_never_panic(tag in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Frame::decode(tag, &body);
    }

    #[test]
    fn truncated_or_extended_frames_are_rejected(f in frame(), cut in any::<prop::sample::Index>(), extra in 1u8..) {
        let bytes = f.encode();
        let (_, tag, body) = split(&bytes);
        if !body.is_empty() {
            let n = cut.index(body.len());
            prop_assert!(Frame::decode(tag, &body[..n]).is_err());
        }
        let mut longer = body.to_vec();
        longer.push(extra);
        prop_assert!(Frame::decode(tag, &longer).is_err());
    }
}

proptest! {
    #[test]
    fn leaf_sizes_out_of_bounds_are_rejected(bad in any::<u32>()) {
        prop_assume!(bad != 0 && crate::digest::check_leaf_bytes(bad).is_err());
        let f = Frame::Manifest { leaf_bytes: Some(bad), tensors: vec![] };
        let bytes = f.encode();
        let (_, tag, body) = split(&bytes);
        prop_assert!(Frame::decode(tag, body).unwrap_err().contains("leaf size"));
    }

    #[test]
    fn leaf_digest_counts_are_bounded(n in any::<u32>()) {
        // A count no frame may carry is refused before any digest is read.
        prop_assume!(n == 0 || n as usize > MAX_LEAVES_PER_FRAME);
        let mut body = vec![0u8; 8];
        body.extend_from_slice(&n.to_le_bytes());
        body.extend_from_slice(&[7; 64]);
        prop_assert!(Frame::decode(T_LEAVES, &body).unwrap_err().contains("leaf digests"));
    }
}

#[test]
fn the_largest_leaves_frame_fits_a_control_frame() {
    let f = Frame::Leaves { tensor: 0, first: 0, digests: vec![[9; 32]; MAX_LEAVES_PER_FRAME] };
    let bytes = f.encode();
    let (len, tag, body) = split(&bytes);
    assert!(len <= MAX_BODY);
    assert_eq!(Frame::decode(tag, body), Ok(f));
}

#[test]
fn bad_magic_and_version_are_named() {
    let f = Frame::Auth { nonce: [0; 32], mac: [0; 32] };
    let bytes = f.encode();
    let (_, tag, body) = split(&bytes);
    let mut bad = body.to_vec();
    bad[0] = b'Y';
    assert!(Frame::decode(tag, &bad).unwrap_err().contains("magic"));
    let mut bad = body.to_vec();
    bad[4] = 99;
    assert!(Frame::decode(tag, &bad).unwrap_err().contains("version"));
    assert!(Frame::decode(200, &[]).unwrap_err().contains("unknown frame tag"));
}

#[test]
fn oversized_frames_are_refused_before_allocation() {
    use crate::conn::{CancelFlag, Ctx};
    use std::io::Write;
    use std::time::{Duration, Instant};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.write_all(&(MAX_BODY + 1).to_le_bytes()).unwrap();
    a.write_all(&[T_ACK]).unwrap();
    let ctx = Ctx::new("peer", Instant::now() + Duration::from_secs(30), CancelFlag::default());
    let err = read_frame(&mut b, &ctx, "test").unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
}
