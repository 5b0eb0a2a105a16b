//! Throughput table for x2v-transfer against its ceilings and against Mooncake, in one run.
//!
//! ```text
//! cargo run --release -p x2v-transfer --bin x2v-transfer-bench -- [--sizes 1M,64M,1G] [--runs 5]
//!     [--python ~/.cache/x2v/venv/bin/python] [--mooncake tools/bench_mooncake.py] [--no-mooncake]
//!     [--only <substring of a row name>]
//! ```
//! Every cell is `best / median` GB/s (1 GB = 1e9 bytes) over `--runs` timed runs after one warm-up.
//! x2v rows time a push from the call to the receiver's verified ack; with SHA-256 on, the receiver
//! hashes every byte before acking, and the sender's digest (computed once per payload when it is
//! built) is reported on its own row.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use x2v_core::JobId;
use x2v_transfer::{
    Dtype, Engine, EngineConfig, Opts, Payload, Secret, TransportChoice, TransportKind,
};

const USAGE: &str = "usage: x2v-transfer-bench [--sizes 1M,64M,1G] [--runs N (at least 3)]
    [--python PATH] [--mooncake tools/bench_mooncake.py] [--no-mooncake]
    [--only <substring of a row name>]

Prints a table of best / median GB/s per path and size (x2v rows: one push, call to verified ack).";

struct Args {
    sizes: Vec<usize>,
    runs: usize,
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
            "--python" => a.python = it.next().context("--python")?,
            "--mooncake" => a.mooncake = Some(it.next().context("--mooncake")?),
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    if a.runs < 3 {
        bail!("--runs must be at least 3");
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

fn x2v(
    rt: &tokio::runtime::Runtime,
    data: &Bytes,
    kind: TransportKind,
    sha: bool,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut rx_cfg = EngineConfig::new(secret());
    rx_cfg.pool_bytes = data.len() + (8 << 20);
    rx_cfg.require_sha256 = false;
    let rx = Engine::start(rx_cfg)?;
    let mut tx_cfg = EngineConfig::new(secret());
    tx_cfg.pool_bytes = 1 << 20;
    tx_cfg.transport = TransportChoice::Force(kind);
    let tx = Engine::start(tx_cfg)?;
    let tensor = vec![("latents".to_string(), Dtype::U8, vec![data.len() as u64], data.clone())];
    let payload = if sha { Payload::new(tensor)? } else { Payload::without_digests(tensor)? };
    time_runs(data.len(), runs, || {
        let job = JobId::new();
        let r = rt.block_on(tx.push(
            rx.local_addr(),
            job,
            &payload,
            Opts::timeout(Duration::from_secs(120)),
        ))?;
        if r.transport != kind {
            bail!("asked for {kind}, got {}", r.transport);
        }
        drop(rx.try_recv(job).context("acknowledged payload missing")?);
        Ok(())
    })
}

fn sender_sha(data: &Bytes, runs: usize) -> anyhow::Result<Vec<f64>> {
    time_runs(data.len(), runs, || {
        Payload::new(vec![("t".into(), Dtype::U8, vec![data.len() as u64], data.clone())])?;
        Ok(())
    })
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
    let names = [
        "memcpy (1 thread, pre-faulted)",
        "raw TCP loopback (std, 4 MiB writes)",
        "x2v shm, SHA-256 off",
        "x2v shm, SHA-256 on",
        "x2v TCP, SHA-256 off",
        "x2v TCP, SHA-256 on",
        "sender SHA-256 (Payload::new, 1 core)",
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
                2 => x2v(&rt, &data, TransportKind::Shm, false, a.runs)?,
                3 => x2v(&rt, &data, TransportKind::Shm, true, a.runs)?,
                4 => x2v(&rt, &data, TransportKind::Tcp, false, a.runs)?,
                5 => x2v(&rt, &data, TransportKind::Tcp, true, a.runs)?,
                _ => sender_sha(&data, a.runs)?,
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
    Ok(())
}
