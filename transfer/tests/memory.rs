//! What an engine's receive pool costs the process: nothing while idle, the payload while it is held,
//! nothing again once it is dropped. Alone in its test binary, so that no other test moves the RSS.

mod common;

use std::time::Duration;

use common::*;
use x2v_core::JobId;
use x2v_transfer::{Engine, Payload, TransportChoice, TransportKind};

const MIB: u64 = 1 << 20;
/// Room for thread stacks, socket buffers and allocator slack, far below any pool or payload size.
const SLACK: u64 = 24 * MIB;

/// Resident bytes of this whole process.
fn rss() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let kb = rollup.lines().find_map(|l| l.strip_prefix("Rss:")).expect("Rss line");
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

fn receiver() -> Engine {
    let mut cfg = config(256 << 20);
    // Give pages back as soon as the payload is dropped, so the test need not wait for the pool to
    // go quiet.
    cfg.pool_keep_warm = Duration::ZERO;
    Engine::start(cfg).unwrap()
}

fn sender(kind: TransportKind) -> Engine {
    let mut cfg = config(256 << 20);
    cfg.transport = TransportChoice::Force(kind);
    Engine::start(cfg).unwrap()
}

async fn round_trip(rx: &Engine, tx: &Engine, payload: &Payload, base: u64) {
    let job = JobId::new();
    tx.push(addr(rx), job, payload, opts()).await.unwrap();
    let got = rx.recv(job, opts()).await.unwrap();
    same(&got, payload);
    let held = rx.pool().resident_bytes();
    assert!(held >= payload.total_bytes(), "pool holds {held} bytes for the payload");
    assert!(rss() >= base + 48 * MIB, "RSS {} does not show the payload over {base}", rss());
    drop(got);
    assert_eq!(rx.pool().resident_bytes(), 0, "a dropped payload gives its pages back");
    let after = rss();
    assert!(after <= base + SLACK, "RSS {after} did not fall back to {base} after the drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_costs_memory_only_while_a_payload_is_held() {
    let payload = blob(64 << 20);
    let before = rss();
    let (rx, tcp, shm) = (receiver(), sender(TransportKind::Tcp), sender(TransportKind::Shm));
    let base = rss();
    assert!(
        base <= before + SLACK,
        "three engines with 256 MiB pools grew RSS from {before} to {base}"
    );
    assert_eq!(rx.pool().resident_bytes(), 0);

    round_trip(&rx, &tcp, &payload, base).await;
    round_trip(&rx, &shm, &payload, base).await;
}
