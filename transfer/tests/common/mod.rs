//! Shared test helpers: engines on loopback with small pools, deterministic payloads.
#![allow(dead_code)]

pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use x2v_transfer::{
    Dtype, Engine, EngineConfig, Opts, Payload, Secret, TransportChoice, TransportKind,
};

pub const SECRET: &[u8] = b"x2v-test-deployment-secret";
/// Generous: tests share two loaded cores.
pub const LONG: Duration = Duration::from_secs(60);

pub fn config(pool_bytes: usize) -> EngineConfig {
    let mut cfg = EngineConfig::new(Secret::new(SECRET).unwrap());
    cfg.pool_bytes = pool_bytes;
    cfg
}

pub fn engine(pool_bytes: usize) -> Engine {
    Engine::start(config(pool_bytes)).unwrap()
}

pub fn forced(pool_bytes: usize, kind: TransportKind) -> Engine {
    let mut cfg = config(pool_bytes);
    cfg.transport = TransportChoice::Force(kind);
    Engine::start(cfg).unwrap()
}

pub fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

/// A Phase1-like payload: a bf16 text embedding, an f32 image embedding, an empty tensor.
pub fn phase1(text_len: u64) -> Payload {
    Payload::new(vec![
        (
            "text_embeddings".into(),
            Dtype::BF16,
            vec![1, text_len, 64],
            pattern((text_len * 128) as usize, 1),
        ),
        ("image_embeddings".into(), Dtype::F32, vec![257, 32], pattern(257 * 32 * 4, 2)),
        ("empty".into(), Dtype::F16, vec![0, 4], Bytes::new()),
    ])
    .unwrap()
}

/// One tensor of `len` bytes.
pub fn blob(len: usize) -> Payload {
    Payload::new(vec![("latents".into(), Dtype::U8, vec![len as u64], pattern(len, 9))]).unwrap()
}

/// One tensor of `len` bytes whose digests the sender computes while it sends them.
pub fn deferred_blob(len: usize) -> Payload {
    Payload::deferred(vec![("latents".into(), Dtype::U8, vec![len as u64], pattern(len, 9))])
        .unwrap()
}

/// Same bytes and names; the digests may have been made differently.
pub fn same_bytes(received: &x2v_transfer::Received, sent: &Payload) {
    assert_eq!(received.tensors().len(), sent.tensors().len());
    for t in sent.tensors() {
        let (meta, bytes) = received.get(&t.meta.name).unwrap();
        assert_eq!(
            (&meta.name, meta.dtype, &meta.shape),
            (&t.meta.name, t.meta.dtype, &t.meta.shape)
        );
        assert!(bytes == &t.data[..], "bytes of `{}` differ", t.meta.name);
    }
}

pub fn opts() -> Opts {
    Opts::timeout(LONG)
}

pub fn same(received: &x2v_transfer::Received, sent: &Payload) {
    assert_eq!(received.tensors(), sent.manifest().as_slice());
    for t in sent.tensors() {
        let (meta, bytes) = received.get(&t.meta.name).unwrap();
        assert_eq!(meta, &t.meta);
        assert!(bytes == &t.data[..], "bytes of `{}` differ", t.meta.name);
    }
}

pub fn addr(e: &Engine) -> SocketAddr {
    e.local_addr()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("x2v_transfer=debug")
        .with_test_writer()
        .try_init();
}
