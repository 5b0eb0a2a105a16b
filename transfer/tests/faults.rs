//! Fault injection: a misbehaving network between peers, hostile frames, and a full receive pool.
//! Whatever happens, the receiver hands out nothing corrupted and frees its pool.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::proxy::{Dir, Fault, Proxy};
use common::*;
use x2v_core::{ErrorKind, JobId};
use x2v_transfer::conn::{CancelFlag, Ctx};
use x2v_transfer::digest::{LEAF_BYTES, leaves};
use x2v_transfer::wire::{Frame, read_frame, write_frame};
use x2v_transfer::{Engine, Opts, Secret, TransferError, TransportKind, auth};

const SIZE: usize = 8 << 20;

/// Waits (bounded) for the receiver to release every lease after a failed transfer.
fn pool_drains(e: &Engine) -> bool {
    let until = Instant::now() + LONG;
    while Instant::now() < until {
        if e.pool().free_bytes() == e.pool().capacity() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

async fn push_through(
    fault: Fault,
    crc: bool,
    timeout: Duration,
) -> (Engine, JobId, Result<(), TransferError>) {
    push_payload_through(&blob(SIZE), fault, crc, timeout).await
}

async fn push_payload_through(
    payload: &x2v_transfer::Payload,
    fault: Fault,
    crc: bool,
    timeout: Duration,
) -> (Engine, JobId, Result<(), TransferError>) {
    let rx = engine(16 << 20);
    let proxy = Proxy::start(addr(&rx), fault, Dir::Up);
    let mut cfg = config(1 << 20);
    cfg.transport = x2v_transfer::TransportChoice::Force(TransportKind::Tcp);
    cfg.chunk_crc = crc;
    let tx = Engine::start(cfg).unwrap();
    let job = JobId::new();
    let r = tx.push(proxy.addr, job, payload, Opts::timeout(timeout)).await.map(|_| ());
    (rx, job, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_caught_by_sha256_and_names_the_tensor() {
    let (rx, job, r) = push_through(Fault::Corrupt(SIZE as u64 / 2), false, LONG).await;
    let err = r.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("`latents`") && err.to_string().contains("SHA-256"), "{err}");
    assert!(rx.try_recv(job).is_none(), "a corrupted payload must never be handed out");
    assert!(pool_drains(&rx));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_names_the_leaf_whether_digests_were_precomputed_or_deferred() {
    // The flipped bit lands a little before 4 MiB into the data (frame headers come first): leaf 3.
    for payload in [blob(SIZE), deferred_blob(SIZE)] {
        let fault = Fault::Corrupt(SIZE as u64 / 2);
        let (rx, job, r) = push_payload_through(&payload, fault, false, LONG).await;
        let err = r.unwrap_err().to_string();
        assert!(err.contains("`latents`"), "{err}");
        assert!(err.contains("SHA-256 mismatch in bytes 3145728..4194304 (leaf 3 of 8"), "{err}");
        assert!(rx.try_recv(job).is_none(), "a corrupted payload must never be handed out");
        assert!(pool_drains(&rx));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_caught_per_chunk_when_crc_is_on() {
    let (rx, job, r) = push_through(Fault::Corrupt(SIZE as u64 / 2), true, LONG).await;
    let err = r.unwrap_err();
    assert!(err.to_string().contains("`latents`") && err.to_string().contains("CRC32"), "{err}");
    assert!(rx.try_recv(job).is_none());
    assert!(pool_drains(&rx));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_and_reset_fail_the_transfer_fast() {
    for fault in
        [Fault::Truncate(SIZE as u64 / 3), Fault::Reset(SIZE as u64 / 3), Fault::Truncate(20)]
    {
        let (rx, job, r) = push_through(fault, false, LONG).await;
        let err = r.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{fault:?}: {err}");
        assert!(rx.try_recv(job).is_none());
        assert!(pool_drains(&rx), "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_delayed_bytes_end_at_the_deadline() {
    let deadline = Duration::from_millis(600);
    let (rx, job, r) = push_through(Fault::Blackhole(SIZE as u64 / 4), false, deadline).await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::DeadlineExceeded);
    assert!(rx.try_recv(job).is_none());
    let (_rx, _, r) = push_through(Fault::Delay(Duration::from_millis(40)), false, deadline).await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::DeadlineExceeded);
    // The receiver's side of a blackholed transfer expires on the deadline the sender announced.
    assert!(pool_drains(&rx));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_survives_a_corrupting_link_without_handing_anything_out() {
    let owner = engine(1 << 20);
    let job = JobId::new();
    owner.publish(job, blob(SIZE)).unwrap();
    let proxy = Proxy::start(addr(&owner), Fault::Corrupt(SIZE as u64 / 2), Dir::Down);
    let puller = forced(16 << 20, TransportKind::Tcp);
    let err = puller.pull(proxy.addr, job, opts()).await.unwrap_err();
    assert!(err.to_string().contains("`latents`"), "{err}");
    assert_eq!(puller.pool().free_bytes(), puller.pool().capacity());
    // No verified ack was sent, so the payload is still published and a clean path delivers it.
    let got = puller.pull(addr(&owner), job, opts()).await.unwrap();
    same(&got, &blob(SIZE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_is_backpressure_not_a_crash() {
    let mut cfg = config(1 << 20);
    cfg.pool_wait = Duration::from_millis(50);
    let rx = Engine::start(cfg).unwrap();
    let tx = forced(1 << 20, TransportKind::Tcp);
    let (first, second) = (JobId::new(), JobId::new());
    tx.push(addr(&rx), first, &blob(700 << 10), opts()).await.unwrap();
    let err = tx.push(addr(&rx), second, &blob(700 << 10), opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded, "{err}");
    assert!(err.to_string().contains("pool exhausted"), "{err}");
    let held = rx.try_recv(first).unwrap();
    drop(held);
    tx.push(addr(&rx), second, &blob(700 << 10), opts()).await.unwrap();
    assert!(rx.try_recv(second).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_waits_for_space_within_the_deadline() {
    let mut cfg = config(1 << 20);
    cfg.pool_wait = LONG;
    let rx = Engine::start(cfg).unwrap();
    let tx = forced(1 << 20, TransportKind::Tcp);
    let (first, second) = (JobId::new(), JobId::new());
    tx.push(addr(&rx), first, &blob(700 << 10), opts()).await.unwrap();
    let pending = tokio::spawn({
        let (tx, peer) = (tx.clone(), addr(&rx));
        async move { tx.push(peer, second, &blob(700 << 10), opts()).await }
    });
    // The consumer takes the first payload; its space frees the waiting push.
    let held = rx.recv(first, opts()).await.unwrap();
    drop(held);
    pending.await.unwrap().unwrap();
    same(&rx.recv(second, opts()).await.unwrap(), &blob(700 << 10));
}

/// An authenticated raw client, for frames the engine itself would never send.
fn raw_client(e: &Engine) -> (TcpStream, Ctx) {
    let mut s = TcpStream::connect(addr(e)).unwrap();
    let ctx = Ctx::new("raw", Instant::now() + LONG, CancelFlag::default());
    auth::connect(&mut s, &Secret::new(SECRET).unwrap(), &ctx).unwrap();
    (s, ctx)
}

fn expect_error(s: &mut TcpStream, ctx: &Ctx, needle: &str) {
    match read_frame(s, ctx, "test") {
        Ok(Frame::Error { message, .. }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected an Error frame containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn out_of_bounds_chunks_are_rejected() {
    let rx = engine(1 << 20);
    let payload = blob(4096);
    let cases: [(u32, u64, u32, &str); 4] = [
        (0, 4000, 200, "out of bounds"),
        (3, 0, 10, "tensor #3"),
        (0, 100, 10, "expected offset 0"),
        (0, 0, u32::MAX, "out of bounds"),
    ];
    for (tensor, offset, len, needle) in cases {
        let (mut s, ctx) = raw_client(&rx);
        let begin = Frame::PushBegin {
            job: *JobId::new().as_uuid().as_bytes(),
            deadline_ms: 60_000,
            chunk_crc: false,
            leaf_bytes: payload.leaf_bytes(),
            tensors: payload.manifest(),
        };
        write_frame(&mut s, &begin, &ctx, "test").unwrap();
        assert_eq!(read_frame(&mut s, &ctx, "test").unwrap(), Frame::Ready { shm_offset: None });
        write_frame(&mut s, &Frame::Chunk { tensor, offset, len, crc: None }, &ctx, "test")
            .unwrap();
        expect_error(&mut s, &ctx, needle);
    }
    assert_eq!(rx.pool().free_bytes(), rx.pool().capacity());
}

#[test]
fn malformed_frames_and_bad_manifests_get_clear_errors() {
    let rx = engine(1 << 20);
    // Garbage after a good handshake.
    let (mut s, ctx) = raw_client(&rx);
    s.write_all(&[3, 0, 0, 0, 250, 1, 2, 3]).unwrap();
    expect_error(&mut s, &ctx, "unknown frame tag 250");
    // A manifest whose shape disagrees with its length.
    let (mut s, ctx) = raw_client(&rx);
    let mut tensors = blob(4096).manifest();
    tensors[0].byte_len = 4095;
    let begin = Frame::PushBegin {
        job: *JobId::new().as_uuid().as_bytes(),
        deadline_ms: 60_000,
        chunk_crc: false,
        leaf_bytes: Some(x2v_transfer::digest::LEAF_BYTES),
        tensors,
    };
    write_frame(&mut s, &begin, &ctx, "test").unwrap();
    expect_error(&mut s, &ctx, "needs 4096 bytes");
    // Not an x2v peer at all: garbage instead of the Auth frame.
    let mut s = TcpStream::connect(addr(&rx)).unwrap();
    let ctx = Ctx::new("raw", Instant::now() + LONG, CancelFlag::default());
    assert!(matches!(read_frame(&mut s, &ctx, "test").unwrap(), Frame::Hello { .. }));
    s.write_all(&[4, 0, 0, 0, 2, b'H', b'T', b'T', b'P']).unwrap();
    expect_error(&mut s, &ctx, "bad magic");
}

#[test]
fn shared_memory_chunk_announcements_are_bounds_checked() {
    let rx = engine(1 << 20);
    let (mut sock, ctx, _pool) = raw_shm_client(&rx);
    let begin = push_begin(blob(4096).leaf_bytes(), blob(4096).manifest());
    write_frame(&mut sock, &begin, &ctx, "test").unwrap();
    assert!(matches!(
        read_frame(&mut sock, &ctx, "test").unwrap(),
        Frame::Ready { shm_offset: Some(_) }
    ));
    write_frame(
        &mut sock,
        &Frame::Chunk { tensor: 0, offset: 0, len: 8192, crc: None },
        &ctx,
        "test",
    )
    .unwrap();
    match read_frame(&mut sock, &ctx, "test") {
        Ok(Frame::Error { message, .. }) => assert!(message.contains("out of bounds"), "{message}"),
        other => panic!("expected an out-of-bounds error, got {other:?}"),
    }
    assert_eq!(rx.pool().free_bytes(), rx.pool().capacity());
}

/// Sends `data` as tensor 0 in `chunk`-byte chunks, each header followed by its bytes.
fn send_bytes(s: &mut TcpStream, ctx: &Ctx, data: &[u8], chunk: usize) {
    for (k, piece) in data.chunks(chunk).enumerate() {
        let header = Frame::Chunk {
            tensor: 0,
            offset: (k * chunk) as u64,
            len: piece.len() as u32,
            crc: None,
        };
        write_frame(s, &header, ctx, "test").unwrap();
        s.write_all(piece).unwrap();
    }
}

fn push_begin(leaf_bytes: Option<u32>, tensors: Vec<x2v_transfer::TensorMeta>) -> Frame {
    Frame::PushBegin {
        job: *JobId::new().as_uuid().as_bytes(),
        deadline_ms: 60_000,
        chunk_crc: false,
        leaf_bytes,
        tensors,
    }
}

#[test]
fn a_writer_lying_about_its_digests_is_caught() {
    let rx = engine(16 << 20);
    let data = pattern(SIZE, 9);
    let honest = leaves(&data, LEAF_BYTES);
    let root = x2v_transfer::digest::root(LEAF_BYTES, SIZE as u64, &honest);
    let mut meta = blob(SIZE).manifest();
    assert_eq!(meta[0].sha256, Some(root), "the payload's root is the chunked SHA-256");
    let mut wrong_leaf = honest.clone();
    wrong_leaf[5][0] ^= 1;
    let mut wrong_root = root;
    wrong_root[31] ^= 1;
    // (root in the manifest, leaf digests sent after the bytes, what the receiver says)
    type Case = (Option<[u8; 32]>, Vec<[u8; 32]>, &'static str);
    let cases: [Case; 4] = [
        (Some(wrong_root), honest.clone(), "root mismatch"),
        (None, wrong_leaf, "SHA-256 mismatch in bytes 5242880..6291456 (leaf 5 of 8"),
        (None, honest[..7].to_vec(), "sent 7 of the 8 leaf digests"),
        (None, Vec::new(), "sent 0 of the 8 leaf digests"),
    ];
    for (claimed, digests, needle) in cases {
        let (mut s, ctx) = raw_client(&rx);
        meta[0].sha256 = claimed;
        write_frame(&mut s, &push_begin(Some(LEAF_BYTES), meta.clone()), &ctx, "test").unwrap();
        assert_eq!(read_frame(&mut s, &ctx, "test").unwrap(), Frame::Ready { shm_offset: None });
        send_bytes(&mut s, &ctx, &data, 3 << 20);
        if !digests.is_empty() {
            let f = Frame::Leaves { tensor: 0, first: 0, digests };
            write_frame(&mut s, &f, &ctx, "test").unwrap();
        }
        write_frame(&mut s, &Frame::DataDone, &ctx, "test").unwrap();
        expect_error(&mut s, &ctx, needle);
    }
    assert!(pool_drains(&rx));
    // The honest version of the same exchange is delivered, with the root it was checked against.
    let (mut s, ctx) = raw_client(&rx);
    meta[0].sha256 = None;
    let job = JobId::new();
    let begin = Frame::PushBegin {
        job: *job.as_uuid().as_bytes(),
        deadline_ms: 60_000,
        chunk_crc: false,
        leaf_bytes: Some(LEAF_BYTES),
        tensors: meta.clone(),
    };
    write_frame(&mut s, &begin, &ctx, "test").unwrap();
    assert_eq!(read_frame(&mut s, &ctx, "test").unwrap(), Frame::Ready { shm_offset: None });
    send_bytes(&mut s, &ctx, &data, 3 << 20);
    for (k, batch) in honest.chunks(3).enumerate() {
        let f = Frame::Leaves { tensor: 0, first: 3 * k as u32, digests: batch.to_vec() };
        write_frame(&mut s, &f, &ctx, "test").unwrap();
    }
    write_frame(&mut s, &Frame::DataDone, &ctx, "test").unwrap();
    assert_eq!(read_frame(&mut s, &ctx, "test").unwrap(), Frame::Ack);
    let got = rx.try_recv(job).expect("verified payload");
    assert_eq!(got.tensors()[0].sha256, Some(root));
}

#[test]
fn leaf_digest_frames_are_checked_against_the_manifest() {
    let rx = engine(1 << 20);
    let data = pattern(3 * 4096, 1);
    let meta = x2v_transfer::Payload::deferred(vec![(
        "t".into(),
        x2v_transfer::Dtype::U8,
        vec![data.len() as u64],
        data.clone(),
    )])
    .unwrap()
    .manifest();
    let d = [[0u8; 32]];
    let cases: [(Option<u32>, Frame, &str); 4] = [
        (Some(4096), Frame::Leaves { tensor: 0, first: 1, digests: d.to_vec() }, "expected leaf 0"),
        (Some(4096), Frame::Leaves { tensor: 2, first: 0, digests: d.to_vec() }, "out of range"),
        (Some(4096), Frame::Leaves { tensor: 0, first: 0, digests: vec![[0; 32]; 4] }, "3 in all"),
        (Some(1 << 20), Frame::Leaves { tensor: 0, first: 0, digests: d.repeat(2) }, "1 in all"),
    ];
    for (leaf_bytes, frame, needle) in cases {
        let (mut s, ctx) = raw_client(&rx);
        write_frame(&mut s, &push_begin(leaf_bytes, meta.clone()), &ctx, "test").unwrap();
        assert_eq!(read_frame(&mut s, &ctx, "test").unwrap(), Frame::Ready { shm_offset: None });
        write_frame(&mut s, &frame, &ctx, "test").unwrap();
        expect_error(&mut s, &ctx, needle);
    }
    // Digests for a payload that announced none, on a receiver that does not require them.
    let mut cfg = config(1 << 20);
    cfg.require_sha256 = false;
    let lax = Engine::start(cfg).unwrap();
    let (mut s, ctx) = raw_client(&lax);
    write_frame(&mut s, &push_begin(None, meta.clone()), &ctx, "test").unwrap();
    assert_eq!(read_frame(&mut s, &ctx, "test").unwrap(), Frame::Ready { shm_offset: None });
    write_frame(&mut s, &Frame::Leaves { tensor: 0, first: 0, digests: d.to_vec() }, &ctx, "test")
        .unwrap();
    expect_error(&mut s, &ctx, "announced no digests");
    // A root without a leaf size is refused before anything is reserved.
    let (mut s, ctx) = raw_client(&lax);
    let mut rooted = meta.clone();
    rooted[0].sha256 = Some([1; 32]);
    write_frame(&mut s, &push_begin(None, rooted), &ctx, "test").unwrap();
    expect_error(&mut s, &ctx, "no leaf size");
    // A receiver that requires digests refuses a payload that will carry none, whatever follows.
    let (mut s, ctx) = raw_client(&rx);
    write_frame(&mut s, &push_begin(None, meta), &ctx, "test").unwrap();
    expect_error(&mut s, &ctx, "requires one");
    assert!(pool_drains(&rx) && pool_drains(&lax));
}

/// An authenticated shm connection to `e`, its pool mapped as a file, ours handed over.
fn raw_shm_client(e: &Engine) -> (std::os::unix::net::UnixStream, Ctx, std::fs::File) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
    let mut tcp = TcpStream::connect(addr(e)).unwrap();
    let ctx = Ctx::new("raw", Instant::now() + LONG, CancelFlag::default());
    let info = auth::connect(&mut tcp, &Secret::new(SECRET).unwrap(), &ctx).unwrap();
    let name = info.shm.expect("the engine serves shared memory");
    let mut sock =
        UnixStream::connect_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    auth::connect(&mut sock, &Secret::new(SECRET).unwrap(), &ctx).unwrap();
    let theirs = x2v_transfer::region::recv_fd(&sock).unwrap();
    let ours = x2v_transfer::region::Region::create("x2v-test-raw", 4096).unwrap();
    x2v_transfer::region::send_fd(&sock, ours.fd()).unwrap();
    (sock, ctx, std::fs::File::from(theirs))
}

#[test]
fn corruption_in_shared_memory_is_caught_and_named() {
    use std::os::unix::fs::FileExt;
    let rx = engine(16 << 20);
    let data = pattern(SIZE, 9);
    let honest = leaves(&data, LEAF_BYTES);
    for precomputed in [true, false] {
        let (mut sock, ctx, pool) = raw_shm_client(&rx);
        let mut meta = blob(SIZE).manifest();
        if !precomputed {
            meta[0].sha256 = None;
        }
        write_frame(&mut sock, &push_begin(Some(LEAF_BYTES), meta), &ctx, "test").unwrap();
        let Frame::Ready { shm_offset: Some(at) } = read_frame(&mut sock, &ctx, "test").unwrap()
        else {
            panic!("expected a shared-memory offset")
        };
        // What lands in the receiver's pool differs from what was hashed in one bit of leaf 6.
        let mut landed = data.to_vec();
        landed[6 * (1 << 20) + 12345] ^= 0x10;
        pool.write_all_at(&landed, at).unwrap();
        for (k, piece) in landed.chunks(4 << 20).enumerate() {
            let f = Frame::Chunk {
                tensor: 0,
                offset: (k * (4 << 20)) as u64,
                len: piece.len() as u32,
                crc: None,
            };
            write_frame(&mut sock, &f, &ctx, "test").unwrap();
        }
        let f = Frame::Leaves { tensor: 0, first: 0, digests: honest.clone() };
        write_frame(&mut sock, &f, &ctx, "test").unwrap();
        write_frame(&mut sock, &Frame::DataDone, &ctx, "test").unwrap();
        match read_frame(&mut sock, &ctx, "test") {
            Ok(Frame::Error { message, .. }) => assert!(
                message.contains("`latents`") && message.contains("bytes 6291456..7340032"),
                "{message}"
            ),
            other => panic!("expected an integrity error, got {other:?}"),
        }
    }
    assert!(pool_drains(&rx));
}
