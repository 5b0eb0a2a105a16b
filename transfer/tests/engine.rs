//! Happy paths and refusals of the engine over TCP and shared memory.

mod common;

use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;
use x2v_core::{ErrorKind, JobId};
use x2v_transfer::{
    Dtype, EngineConfig, Opts, Payload, Secret, TransferError, TransportChoice, TransportKind,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_tcp_is_verified_and_acknowledged() {
    let (rx, tx) = (engine(16 << 20), forced(1 << 20, TransportKind::Tcp));
    let payload = phase1(77);
    let job = JobId::new();
    let receipt = tx.push(addr(&rx), job, &payload, opts()).await.unwrap();
    assert_eq!(receipt.transport, TransportKind::Tcp);
    assert_eq!(receipt.bytes, payload.total_bytes());
    // The ack came after verification, so the payload is already waiting.
    let got = rx.try_recv(job).expect("acknowledged payload is in the inbox");
    same(&got, &payload);
    assert_eq!(got.transport(), TransportKind::Tcp);
    assert!(rx.try_recv(job).is_none(), "a payload is handed out once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_peers_pick_shared_memory() {
    let (rx, tx) = (engine(16 << 20), engine(1 << 20));
    let payload = phase1(300);
    let job = JobId::new();
    let waiter = tokio::spawn({
        let rx = rx.clone();
        async move { rx.recv(job, opts()).await }
    });
    let receipt = tx.push(addr(&rx), job, &payload, opts()).await.unwrap();
    assert_eq!(receipt.transport, TransportKind::Shm);
    let got = waiter.await.unwrap().unwrap();
    same(&got, &payload);
    // The cached connection carries a second payload without a new handshake.
    let job2 = JobId::new();
    tx.push(addr(&rx), job2, &blob(3 << 20), opts()).await.unwrap();
    same(&rx.try_recv(job2).unwrap(), &blob(3 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_reads_the_outbox_over_both_transports() {
    for kind in [TransportKind::Tcp, TransportKind::Shm] {
        let (owner, puller) = (engine(1 << 20), forced(16 << 20, kind));
        let payload = phase1(50);
        let job = JobId::new();
        owner.publish(job, payload.clone()).unwrap();
        assert!(matches!(owner.publish(job, payload.clone()), Err(TransferError::Conflict { .. })));
        let got = puller.pull(addr(&owner), job, opts()).await.unwrap();
        assert_eq!(got.transport(), kind);
        same(&got, &payload);
        // The verified ack consumed the outbox entry.
        let err = puller.pull(addr(&owner), job, opts()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        drop(got);
        assert_eq!(puller.pool().free_bytes(), puller.pool().capacity());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_payload_serves_every_pull_until_it_expires() {
    let (owner, puller) = (engine(1 << 20), forced(16 << 20, TransportKind::Tcp));
    let payload = phase1(40);
    let job = JobId::new();
    owner.publish_retained(job, payload.clone(), Duration::from_millis(600)).unwrap();
    // A redelivered job pulls again: the first verified pull does not consume it.
    for _ in 0..2 {
        same(&puller.pull(addr(&owner), job, opts()).await.unwrap(), &payload);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let err = puller.pull(addr(&owner), job, opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Expired entries are swept, so the job id can be published again; unpublish withdraws it.
    owner.publish_retained(job, payload.clone(), Duration::from_secs(60)).unwrap();
    assert!(owner.unpublish(job));
    let err = puller.pull(addr(&owner), job, opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// A payload whose leaves span tensors of every shape of interest: several leaves with a short last
/// one, exactly one leaf, one byte, nothing.
fn leafy(deferred: bool) -> Payload {
    let leaf = x2v_transfer::digest::LEAF_BYTES as usize;
    let tensors = vec![
        (
            "text_embeddings".into(),
            Dtype::BF16,
            vec![1, (3 * leaf as u64 + 6) / 2],
            pattern(3 * leaf + 6, 1),
        ),
        ("image_embeddings".into(), Dtype::U8, vec![leaf as u64], pattern(leaf, 2)),
        ("scale".into(), Dtype::U8, vec![1], pattern(1, 3)),
        ("empty".into(), Dtype::F16, vec![0, 4], bytes::Bytes::new()),
    ];
    if deferred { Payload::deferred(tensors).unwrap() } else { Payload::new(tensors).unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_hashed_while_sending_are_verified_on_any_thread_count() {
    let precomputed = leafy(false);
    let deferred = leafy(true);
    for kind in [TransportKind::Tcp, TransportKind::Shm] {
        for threads in [0, 1, 3] {
            let mut cfg = config(16 << 20);
            cfg.transport = TransportChoice::Force(kind);
            cfg.hash_threads = threads;
            let rx = x2v_transfer::Engine::start(cfg).unwrap();
            let mut cfg = config(1 << 20);
            cfg.transport = TransportChoice::Force(kind);
            cfg.hash_threads = threads;
            let tx = x2v_transfer::Engine::start(cfg).unwrap();
            for payload in [&deferred, &precomputed] {
                let job = JobId::new();
                tx.push(addr(&rx), job, payload, opts()).await.unwrap();
                let got = rx.try_recv(job).unwrap();
                same_bytes(&got, payload);
                // Whoever hashed, the receiver ends with the roots `Payload::new` computes up front.
                assert_eq!(got.tensors(), precomputed.manifest().as_slice(), "{kind} {threads}");
            }
            // The owner of a deferred payload hashes it while serving the pull.
            let job = JobId::new();
            tx.publish(job, deferred.clone()).unwrap();
            let got = rx.pull(addr(&tx), job, opts()).await.unwrap();
            assert_eq!(got.transport(), kind);
            same_bytes(&got, &deferred);
            assert_eq!(got.tensors(), precomputed.manifest().as_slice());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_rejected_with_a_clear_error() {
    let rx = engine(1 << 20);
    let mut cfg = config(1 << 20);
    cfg.secret = Secret::new(b"a-different-deployment-secret".to_vec()).unwrap();
    let intruder = x2v_transfer::Engine::start(cfg).unwrap();
    let err = intruder.push(addr(&rx), JobId::new(), &blob(10), opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
    assert!(err.to_string().contains("wrong transfer secret"), "{err}");
    assert_eq!(rx.pool().free_bytes(), rx.pool().capacity());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_unverifiable_payloads_are_refused() {
    let rx = engine(1 << 20);
    let tx = forced(1 << 20, TransportKind::Tcp);
    let err = tx.push(addr(&rx), JobId::new(), &blob(2 << 20), opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    let bare =
        Payload::without_digests(vec![("x".into(), Dtype::U8, vec![4], pattern(4, 0))]).unwrap();
    let err = tx.push(addr(&rx), JobId::new(), &bare, opts()).await.unwrap_err();
    assert!(err.to_string().contains("requires one"), "{err}");
    // Digests that follow the bytes count as digests.
    tx.push(addr(&rx), JobId::new(), &deferred_blob(4), opts()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_can_be_switched_off_end_to_end() {
    let mut cfg = config(1 << 20);
    cfg.require_sha256 = false;
    let rx = x2v_transfer::Engine::start(cfg).unwrap();
    let tx = forced(1 << 20, TransportKind::Tcp);
    let bare =
        Payload::without_digests(vec![("x".into(), Dtype::U8, vec![40_000], pattern(40_000, 3))])
            .unwrap();
    let job = JobId::new();
    tx.push(addr(&rx), job, &bare, opts()).await.unwrap();
    same(&rx.try_recv(job).unwrap(), &bare);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_is_delivered_once() {
    let rx = engine(1 << 20);
    let tx = forced(1 << 20, TransportKind::Tcp);
    let job = JobId::new();
    tx.push(addr(&rx), job, &blob(100), opts()).await.unwrap();
    let err = tx.push(addr(&rx), job, &blob(100), opts()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_without_a_sender_hits_its_deadline_and_honours_cancel() {
    let rx = engine(1 << 20);
    let err = rx.recv(JobId::new(), Opts::timeout(Duration::from_millis(100))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    let token = CancellationToken::new();
    token.cancel();
    let err = rx.recv(JobId::new(), Opts::timeout(LONG).with_cancel(token)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_costs_the_deadline_and_can_be_cancelled() {
    // Accepts connections but never speaks: the handshake must not hang past the deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = silent.local_addr().unwrap();
    let tx = engine(1 << 20);
    let err = tx
        .push(peer, JobId::new(), &blob(10), Opts::timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
    let token = CancellationToken::new();
    let op = tokio::spawn({
        let (tx, token) = (tx.clone(), token.clone());
        async move {
            tx.push(peer, JobId::new(), &blob(10), Opts::timeout(LONG).with_cancel(token)).await
        }
    });
    token.cancel();
    let err = op.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forcing_an_unavailable_transport_fails_loudly() {
    let mut cfg = config(1 << 20);
    cfg.serve_shm = false;
    let tcp_only = x2v_transfer::Engine::start(cfg).unwrap();
    let shm = forced(1 << 20, TransportKind::Shm);
    let err = shm.push(addr(&tcp_only), JobId::new(), &blob(10), opts()).await.unwrap_err();
    assert!(matches!(err, TransferError::TransportUnavailable { transport: "shm", .. }), "{err}");
    let rdma = forced(1 << 20, TransportKind::Rdma);
    let err = rdma.push(addr(&tcp_only), JobId::new(), &blob(10), opts()).await.unwrap_err();
    assert!(matches!(err, TransferError::TransportUnavailable { transport: "rdma", .. }), "{err}");
    // Auto falls back to TCP when the peer offers no shared memory.
    let auto = engine(1 << 20);
    let r = auto.push(addr(&tcp_only), JobId::new(), &blob(10), opts()).await.unwrap();
    assert_eq!(r.transport, TransportKind::Tcp);
}

#[test]
fn config_defaults_are_sane() {
    let cfg = EngineConfig::new(Secret::new(SECRET).unwrap());
    assert_eq!(cfg.transport, TransportChoice::Auto);
    assert!(cfg.require_sha256);
    assert_eq!(cfg.hash_threads, x2v_transfer::digest::default_threads());
}
