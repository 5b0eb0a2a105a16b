//! Two "hosts": this process in the root network namespace, a peer process in its own namespace joined
//! by a veth pair. They share a kernel (same boot id) but not a socket namespace, so the automatic
//! choice must fall back from shared memory to TCP. Skipped, with the reason printed, where namespaces
//! cannot be created (not root, no `ip`, sandboxed).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;
use x2v_core::JobId;
use x2v_transfer::{Engine, TransportKind};

const SIZE: usize = 32 << 20;

struct Netns {
    name: String,
    veth: String,
    subnet: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out =
        Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn setup() -> Result<Netns, String> {
        let id = std::process::id() % 100_000;
        let ns = Netns {
            name: format!("x2vt{id}"),
            veth: format!("x2va{id}"),
            subnet: format!("10.231.{}", id % 250),
        };
        ip(&["netns", "add", &ns.name])?;
        let peer_end = format!("x2vb{id}");
        let (host, guest) = (format!("{}.1/24", ns.subnet), format!("{}.2/24", ns.subnet));
        let steps: [&[&str]; 7] = [
            &["link", "add", &ns.veth, "type", "veth", "peer", "name", &peer_end],
            &["link", "set", &peer_end, "netns", &ns.name],
            &["addr", "add", &host, "dev", &ns.veth],
            &["link", "set", &ns.veth, "up"],
            &["-n", &ns.name, "addr", "add", &guest, "dev", &peer_end],
            &["-n", &ns.name, "link", "set", &peer_end, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step)?;
        }
        Ok(ns)
    }

    fn spawn(&self, args: &[&str]) -> (Child, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_x2v-transfer-peer")])
            .args(args)
            .env("X2V_TRANSFER_SECRET", std::str::from_utf8(SECRET).unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("peer starts in the namespace");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        (child, line)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.veth]);
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_in_two_network_namespaces_move_payloads_over_tcp() {
    let ns = match Netns::setup() {
        Ok(ns) => ns,
        Err(reason) => {
            eprintln!("SKIPPED peers_in_two_network_namespaces_move_payloads_over_tcp: {reason}");
            return;
        }
    };
    let mut cfg = config(64 << 20);
    cfg.listen = format!("{}.1:0", ns.subnet).parse().unwrap();
    let here = Engine::start(cfg).unwrap();

    // Pull: the peer publishes, we read it across the veth pair.
    let guest = format!("{}.2:0", ns.subnet);
    let (mut server, line) = ns.spawn(&["--listen", &guest, "--publish-bytes", &SIZE.to_string()]);
    let (peer, job) =
        (field(&line, "addr=").parse().unwrap(), field(&line, "job=").parse().unwrap());
    let got = here.pull(peer, job, opts()).await.unwrap();
    assert_eq!(
        got.transport(),
        TransportKind::Tcp,
        "shared memory is unreachable across namespaces"
    );
    same(&got, &blob(SIZE));
    drop(server.stdin.take());
    assert!(server.wait().unwrap().success());

    // Push: a peer in the namespace writes into our pool.
    let job = JobId::new();
    let (to, job_s, size) = (here.local_addr().to_string(), job.to_string(), SIZE.to_string());
    let (mut pusher, _) = ns.spawn(&[
        "--listen",
        &guest,
        "--push-to",
        &to,
        "--push-job",
        &job_s,
        "--push-bytes",
        &size,
    ]);
    let got = here.recv(job, opts()).await.unwrap();
    assert_eq!(got.transport(), TransportKind::Tcp);
    same(&got, &blob(SIZE));
    assert!(pusher.wait().unwrap().success());
}
