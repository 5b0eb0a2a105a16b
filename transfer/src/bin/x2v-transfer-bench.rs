//! Throughput table for x2v-transfer against its ceilings and against Mooncake, in one run, and the
//! time per push of Wan-sized payloads.
//!
//! ```text
//! cargo run --release -p x2v-transfer --bin x2v-transfer-bench -- [--sizes 1M,64M,1G] [--runs 5]
//!     [--hash-threads N] [--wan-runs 30] [--no-wan]
//!     [--python ~/.cache/x2v/venv/bin/python] [--mooncake tools/bench_mooncake.py] [--no-mooncake]
//!     [--only <substring of a row name>]
//! ```
//! Every cell of the first table is `best / median` GB/s (1 GB = 1e9 bytes) over `--runs` timed runs
//! after one warm-up. x2v rows time a push from the call to the receiver's verified ack. "SHA-256 on"
//! rows push a [`Payload::deferred`]: the sender hashes the leaves of the chunked SHA-256 while the
//! bytes move, so its hashing is inside the timed path, and the receiver hashes every byte before
//! acking. The "precomputed" rows push a [`Payload::new`] whose roots were computed before the timing
//! (the sender then only sends them); the sender's hashing alone has a row of its own.
//!
//! Both engines hash on `--hash-threads` threads (default: every core the process may use), and both
//! ends run on this one host: with SHA-256 on, every byte is hashed twice (once per side) on the same
//! cores that also carry the copies, so the SHA-256 rows scale with the number of cores and are bound
//! by about `cores × per-core SHA-256 speed / 2` (the last row measures one core). A two-core host
//! cannot reach the figures of a host with eight; read them against the core count printed first.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use x2v_core::JobId;
use x2v_transfer::digest::{self, LEAF_BYTES};
use x2v_transfer::{
    Dtype, Engine, EngineConfig, Opts, Payload, Secret, TransportChoice, TransportKind,
};

const USAGE: &str = "usage: x2v-transfer-bench [--sizes 1M,64M,1G] [--runs N (at least 3)]
    [--hash-threads N] [--wan-runs N] [--no-wan]
    [--python PATH] [--mooncake tools/bench_mooncake.py] [--no-mooncake]
    [--only <substring of a row name>]

Prints a table of best / median GB/s per path and size (x2v rows: one push, call to verified ack),
then best / median milliseconds per push of Wan-sized payloads.";

struct Args {
    sizes: Vec<usize>,
    runs: usize,
    hash_threads: usize,
    wan_runs: Option<usize>,
    python: String,
    mooncake: Option<String>,
    only: Option<String>,
}

fn parse_size(s: &str) -> anyhow::Result<usize> {
    let (n, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(n.parse::<usize>().with_context(|| format!("size {s:?}"))? * mult)
}

fn args() -> anyhow::Result<Args> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/bench_mooncake.py");
    let mut a = Args {
        sizes: vec![1 << 20, 64 << 20, 1 << 30],
        runs: 5,
        hash_threads: digest::default_threads(),
        wan_runs: Some(30),
        python: std::env::var("X2V_PYTHON").unwrap_or_else(|_| {
            format!("{}/.cache/x2v/venv/bin/python", std::env::var("HOME").unwrap_or_default())
        }),
        mooncake: Some(root.into()),
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--no-mooncake" => a.mooncake = None,
            "--only" => a.only = Some(it.next().context("--only")?),
            "--sizes" => {
                a.sizes = it
                    .next()
                    .context("--sizes")?
                    .split(',')
                    .map(parse_size)
                    .collect::<Result<_, _>>()?
            }
            "--runs" => a.runs = it.next().context("--runs")?.parse()?,
            "--hash-threads" => a.hash_threads = it.next().context("--hash-threads")?.parse()?,
            "--wan-runs" => a.wan_runs = Some(it.next().context("--wan-runs")?.parse()?),
            "--no-wan" => a.wan_runs = None,
            "--python" => a.python = it.next().context("--python")?,
            "--mooncake" => a.mooncake = Some(it.next().context("--mooncake")?),
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    if a.runs < 3 || a.wan_runs.is_some_and(|r| r < 3) {
        bail!("--runs and --wan-runs must be at least 3");
    }
    Ok(a)
}

/// `best / median` of per-run GB/s.
fn cell(mut gbps: Vec<f64>) -> String {
    if gbps.is_empty() {
        return "n/a".into();
    }
    gbps.sort_by(|a, b| b.total_cmp(a));
    format!("{:.2} / {:.2}", gbps[0], gbps[gbps.len() / 2])
}

fn time_runs(
    size: usize,
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    f()?;
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(size as f64 / t.elapsed().as_secs_f64() / 1e9)
        })
        .collect()
}

fn memcpy(src: &[u8], runs: usize) -> anyhow::Result<Vec<f64>> {
    let mut dst = vec![1u8; src.len()];
    time_runs(src.len(), runs, || {
        dst.copy_from_slice(src);
        std::hint::black_box(&dst);
        Ok(())
    })
}

/// One std TCP stream over loopback, 4 MiB writes, into a pre-faulted buffer, with a 1-byte ack.
fn raw_tcp(src: &[u8], runs: usize) -> anyhow::Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let len = src.len();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut dst = vec![1u8; len];
        let mut go = [0u8; 1];
        while s.read_exact(&mut go).is_ok() {
            s.read_exact(&mut dst)?;
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let r = time_runs(len, runs, || {
        c.write_all(&[0])?;
        for piece in src.chunks(4 << 20) {
            c.write_all(piece)?;
        }
        c.read_exact(&mut [0u8; 1])?;
        Ok(())
    });
    drop(c);
    server.join().map_err(|_| anyhow::anyhow!("raw TCP server panicked"))??;
    r
}

fn secret() -> Secret {
    Secret::new(b"x2v-transfer-bench-secret".to_vec()).expect("long enough")
}

/// How the pushed payload is digested.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sha {
    Off,
    /// The sender hashes while it sends (inside the timed push).
    OnSend,
    /// Hashed before the timing; the sender only sends the digests.
    Precomputed,
}

/// A receiving and a sending engine, the sender forced onto `kind`.
fn engines(
    kind: TransportKind,
    pool: usize,
    hash_threads: usize,
) -> anyhow::Result<(Engine, Engine)> {
    let mut rx_cfg = EngineConfig::new(secret());
    rx_cfg.pool_bytes = pool + (8 << 20);
    rx_cfg.require_sha256 = false;
    rx_cfg.hash_threads = hash_threads;
    let rx = Engine::start(rx_cfg)?;
    let mut tx_cfg = EngineConfig::new(secret());
    tx_cfg.pool_bytes = 1 << 20;
    tx_cfg.transport = TransportChoice::Force(kind);
    tx_cfg.hash_threads = hash_threads;
    Ok((rx, Engine::start(tx_cfg)?))
}

fn payload(tensors: Vec<(String, Dtype, Vec<u64>, Bytes)>, sha: Sha) -> anyhow::Result<Payload> {
    Ok(match sha {
        Sha::Off => Payload::without_digests(tensors)?,
        Sha::OnSend => Payload::deferred(tensors)?,
        Sha::Precomputed => Payload::new(tensors)?,
    })
}

/// One verified push of `payload`, call to ack, the payload dropped on the receiver afterwards.
fn push(
    rt: &tokio::runtime::Runtime,
    (rx, tx): &(Engine, Engine),
    payload: &Payload,
    kind: TransportKind,
) -> anyhow::Result<()> {
    let job = JobId::new();
    let r = rt.block_on(tx.push(
        rx.local_addr(),
        job,
        payload,
        Opts::timeout(Duration::from_secs(120)),
    ))?;
    if r.transport != kind {
        bail!("asked for {kind}, got {}", r.transport);
    }
    drop(rx.try_recv(job).context("acknowledged payload missing")?);
    Ok(())
}

fn x2v(
    rt: &tokio::runtime::Runtime,
    data: &Bytes,
    kind: TransportKind,
    sha: Sha,
    a: &Args,
) -> anyhow::Result<Vec<f64>> {
    let pair = engines(kind, data.len(), a.hash_threads)?;
    let tensor = vec![("latents".to_string(), Dtype::U8, vec![data.len() as u64], data.clone())];
    let payload = payload(tensor, sha)?;
    time_runs(data.len(), a.runs, || push(rt, &pair, &payload, kind))
}

/// The sender's chunked SHA-256 on its own: every leaf on `threads` threads, then the root.
fn sender_sha(data: &Bytes, a: &Args) -> anyhow::Result<Vec<f64>> {
    time_runs(data.len(), a.runs, || {
        let leaves = digest::leaves_parallel(&[&data[..]], LEAF_BYTES, a.hash_threads);
        std::hint::black_box(digest::root(LEAF_BYTES, data.len() as u64, &leaves[0]));
        Ok(())
    })
}

/// Plain SHA-256, one stream on one core: the per-core speed everything else is bound by.
fn one_core_sha(data: &Bytes, a: &Args) -> anyhow::Result<Vec<f64>> {
    time_runs(data.len(), a.runs, || {
        std::hint::black_box(digest::leaf(data));
        Ok(())
    })
}

/// Wan-sized payloads: best / median milliseconds per verified push.
fn wan_table(rt: &tokio::runtime::Runtime, a: &Args, runs: usize) -> anyhow::Result<()> {
    let mib = |n: u64| n << 20;
    let part = |name: &str, bytes: u64, seed: u8| {
        let data: Vec<u8> =
            (0..bytes).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        (name.to_string(), Dtype::BF16, vec![bytes / 2], Bytes::from(data))
    };
    let phase1 = || {
        vec![
            part("prompt_embeds", mib(4), 1),
            part("negative_prompt_embeds", mib(4), 2),
            part("condition", mib(4), 3),
        ]
    };
    let phase2 = || vec![part("latents", mib(8), 4)];
    let cols: [(&str, Vec<_>); 2] =
        [("12 MiB (3 tensors of 4 MiB)", phase1()), ("8 MiB (1 tensor)", phase2())];
    let rows = [
        ("x2v shm, SHA-256 on (sender hashes in the push)", TransportKind::Shm, Sha::OnSend),
        ("x2v TCP, SHA-256 on (sender hashes in the push)", TransportKind::Tcp, Sha::OnSend),
        ("x2v shm, SHA-256 off", TransportKind::Shm, Sha::Off),
        ("x2v TCP, SHA-256 off", TransportKind::Tcp, Sha::Off),
    ];
    let mut cells = vec![Vec::new(); rows.len()];
    for (_, tensors) in &cols {
        let total: u64 = tensors.iter().map(|t| t.3.len() as u64).sum();
        for (r, &(name, kind, sha)) in rows.iter().enumerate() {
            if a.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                cells[r].push("skipped".to_string());
                continue;
            }
            let pair = engines(kind, total as usize, a.hash_threads)?;
            let p = payload(tensors.clone(), sha)?;
            let gbps = time_runs(total as usize, runs, || push(rt, &pair, &p, kind))?;
            let mut ms: Vec<f64> = gbps.iter().map(|g| total as f64 / g / 1e6).collect();
            ms.sort_by(f64::total_cmp);
            cells[r].push(format!("{:.2} / {:.2}", ms[0], ms[ms.len() / 2]));
        }
    }
    println!();
    let header: Vec<&str> = cols.iter().map(|c| c.0).collect();
    println!("| Wan-sized push (ms, best / median of {runs} runs) | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(cols.len()));
    for ((name, ..), row) in rows.iter().zip(&cells) {
        println!("| {name} | {} |", row.join(" | "));
    }
    Ok(())
}

/// Runs the Mooncake script; `Err` carries the reason the row is missing.
fn mooncake(a: &Args) -> Result<Vec<(usize, Vec<f64>, bool)>, String> {
    let script = a.mooncake.as_ref().ok_or("skipped (--no-mooncake)")?;
    let sizes: Vec<String> = a.sizes.iter().map(ToString::to_string).collect();
    let mut child = Command::new(&a.python)
        .args([script.as_str(), "--sizes", &sizes.join(","), "--runs", &a.runs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", a.python))?;
    let mut rows = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let num = |k: &str| line.split(&format!("\"{k}\": ")).nth(1).map(|r| r.to_string());
        let size = num("size")
            .and_then(|r| r.split(',').next()?.trim().parse().ok())
            .ok_or(format!("bad line {line}"))?;
        let list = num("gbps")
            .and_then(|r| Some(r.split(']').next()?.trim_start_matches('[').to_string()));
        let gbps = list
            .ok_or(format!("bad line {line}"))?
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect();
        rows.push((size, gbps, line.contains("\"verified\": true")));
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() || rows.is_empty() {
        return Err(format!(
            "the Mooncake script failed ({status}); is mooncake-transfer-engine-non-cuda installed?"
        ));
    }
    Ok(rows)
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 30 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n => format!("{} KiB", n >> 10),
    }
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!(
        "cores available: {}; hashing threads per side: {} (chunked SHA-256, {} KiB leaves)",
        digest::default_threads(),
        a.hash_threads,
        LEAF_BYTES >> 10
    );
    println!();
    let names = [
        "memcpy (1 thread, pre-faulted)",
        "raw TCP loopback (std, 4 MiB writes)",
        "x2v shm, SHA-256 off",
        "x2v shm, SHA-256 on (sender hashes in the push)",
        "x2v TCP, SHA-256 off",
        "x2v TCP, SHA-256 on (sender hashes in the push)",
        "x2v shm, SHA-256 on, precomputed (Payload::new)",
        "x2v TCP, SHA-256 on, precomputed (Payload::new)",
        "sender chunked SHA-256 alone (hashing threads)",
        "SHA-256, one stream (1 core)",
    ];
    let mut table: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    for &size in &a.sizes {
        eprintln!("measuring {} ...", human(size));
        let data: Bytes = (0..size).map(|i| (i as u8).wrapping_mul(31)).collect::<Vec<u8>>().into();
        for (row, name) in names.iter().enumerate() {
            if a.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                table[row].push("skipped".into());
                continue;
            }
            let runs = match row {
                0 => memcpy(&data, a.runs)?,
                1 => raw_tcp(&data, a.runs)?,
                2 => x2v(&rt, &data, TransportKind::Shm, Sha::Off, &a)?,
                3 => x2v(&rt, &data, TransportKind::Shm, Sha::OnSend, &a)?,
                4 => x2v(&rt, &data, TransportKind::Tcp, Sha::Off, &a)?,
                5 => x2v(&rt, &data, TransportKind::Tcp, Sha::OnSend, &a)?,
                6 => x2v(&rt, &data, TransportKind::Shm, Sha::Precomputed, &a)?,
                7 => x2v(&rt, &data, TransportKind::Tcp, Sha::Precomputed, &a)?,
                8 => sender_sha(&data, &a)?,
                _ => one_core_sha(&data, &a)?,
            };
            table[row].push(cell(runs));
        }
    }
    eprintln!("measuring Mooncake ...");
    let mc = mooncake(&a);
    let header: Vec<String> = a.sizes.iter().map(|&s| human(s)).collect();
    println!("| path (GB/s, best / median of {} runs) | {} |", a.runs, header.join(" | "));
    println!("|---|{}", "---|".repeat(a.sizes.len()));
    for (name, row) in names.iter().zip(&table) {
        println!("| {name} | {} |", row.join(" | "));
    }
    match mc {
        Ok(rows) => {
            let cells: Vec<String> = a
                .sizes
                .iter()
                .map(|s| match rows.iter().find(|r| r.0 == *s) {
                    Some((_, g, true)) => cell(g.clone()),
                    Some((_, _, false)) => "data mismatch".into(),
                    None => "n/a".into(),
                })
                .collect();
            println!(
                "| Mooncake TE TCP loopback (P2PHANDSHAKE, sync write) | {} |",
                cells.join(" | ")
            );
        }
        Err(reason) => println!("| Mooncake TE TCP loopback | not measured: {reason} |"),
    }
    if let Some(runs) = a.wan_runs {
        eprintln!("measuring Wan-sized payloads ...");
        wan_table(&rt, &a, runs)?;
    }
    Ok(())
}
