//! A peer in another process, killed in the middle of a transfer: the survivor fails fast with a
//! clear error, hands nothing out, and gets its pool back.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::proxy::{Dir, Fault, Proxy};
use common::*;
use x2v_core::{ErrorKind, JobId};
use x2v_transfer::TransportKind;

const SIZE: usize = 32 << 20;

struct Peer {
    child: Child,
    addr: SocketAddr,
    job: JobId,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_peer(args: &[&str]) -> Peer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_x2v-transfer-peer"))
        .args(args)
        .env("X2V_TRANSFER_SECRET", std::str::from_utf8(SECRET).unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("peer binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let field = |k: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_else(|| panic!("{line}"))
    };
    let (addr, job) =
        if line.starts_with("READY") { (field("addr="), field("job=")) } else { panic!("{line}") };
    Peer { child, addr: addr.parse().unwrap(), job: job.parse().unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_from_a_peer_killed_mid_transfer_fails_fast() {
    let mut peer = spawn_peer(&["--listen", "127.0.0.1:0", "--publish-bytes", &SIZE.to_string()]);
    // The proxy lets a third of the data through and then holds the rest, so the kill lands mid-payload.
    let proxy =
        std::sync::Arc::new(Proxy::start(peer.addr, Fault::Blackhole(SIZE as u64 / 3), Dir::Down));
    let puller = forced(64 << 20, TransportKind::Tcp);
    let pull = tokio::spawn({
        let (puller, job, at) = (puller.clone(), peer.job, proxy.addr);
        async move { puller.pull(at, job, opts()).await }
    });
    let p = proxy.clone();
    assert!(
        tokio::task::spawn_blocking(move || p.wait_forwarded(SIZE as u64 / 3, LONG)).await.unwrap()
    );
    let killed = Instant::now();
    peer.child.kill().unwrap();
    let err = pull.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        killed.elapsed() < LONG / 2,
        "the failure must not wait for the deadline: {:?}",
        killed.elapsed()
    );
    assert_eq!(puller.pool().free_bytes(), puller.pool().capacity());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_killed_mid_transfer_leaves_nothing_behind() {
    let rx = engine(64 << 20);
    let job = JobId::new();
    let proxy =
        std::sync::Arc::new(Proxy::start(addr(&rx), Fault::Blackhole(SIZE as u64 / 2), Dir::Up));
    let (to, job_s, size) = (proxy.addr.to_string(), job.to_string(), SIZE.to_string());
    let args =
        ["--push-to", &to, "--push-job", &job_s, "--push-bytes", &size, "--transport", "tcp"];
    let mut peer = spawn_peer(&args);
    let p = proxy.clone();
    assert!(
        tokio::task::spawn_blocking(move || p.wait_forwarded(SIZE as u64 / 2, LONG)).await.unwrap()
    );
    assert!(rx.pool().free_bytes() < rx.pool().capacity(), "the lease is held mid-transfer");
    peer.child.kill().unwrap();
    let until = Instant::now() + LONG;
    while rx.pool().free_bytes() < rx.pool().capacity() && Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(rx.pool().free_bytes(), rx.pool().capacity(), "the receiver released the lease");
    assert!(rx.try_recv(job).is_none(), "a partial payload is never delivered");
}
