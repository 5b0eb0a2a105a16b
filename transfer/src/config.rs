//! Engine configuration, with defaults sized for Phase1/Phase2 payloads on one host or across a LAN.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::Secret;

/// Which transport carries the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Copy into the peer's shared-memory pool (same host only).
    Shm,
    /// Stream over the authenticated TCP connection.
    Tcp,
    /// RDMA verbs (needs the `rdma` feature and a verbs device on both sides).
    Rdma,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the engine picks a transport for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TransportChoice {
    /// The best both peers share: shm on the same host, else TCP.
    #[default]
    Auto,
    /// Always this one; fail with `TransportUnavailable` when the peer cannot do it.
    Force(TransportKind),
}

/// Everything an [`crate::Engine`] needs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// TCP address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The deployment secret every peer must hold.
    pub secret: Secret,
    /// Receive pool size: the largest payload, or sum of payloads held at once, this engine accepts.
    /// Memory is used only for what is being received or held (see `pool_keep_warm`), not for the size.
    pub pool_bytes: usize,
    /// Released pool pages stay allocated until the pool has seen no reservation or release for this
    /// long, so that back-to-back transfers reuse them instead of faulting in fresh pages; zero gives
    /// them back as each payload is dropped.
    pub pool_keep_warm: Duration,
    /// Transport policy for outgoing operations.
    pub transport: TransportChoice,
    /// Serve same-host peers over shared memory.
    pub serve_shm: bool,
    /// TCP chunk size (large writes are markedly faster here than small ones).
    pub chunk_bytes: usize,
    /// Ask for a CRC32 on every TCP chunk on top of the per-tensor SHA-256.
    pub chunk_crc: bool,
    /// Refuse payloads whose manifest lacks SHA-256 digests.
    pub require_sha256: bool,
    /// Threads that hash one transfer's SHA-256 leaves, on each side, next to the thread moving the
    /// bytes (which, on the writer, joins them once its bytes are out). Default: every core the
    /// process may use. `0`: the thread moving the bytes hashes them itself (the receiver between its
    /// reads, the writer of a [`crate::Payload::deferred`] after its writes).
    pub hash_threads: usize,
    /// Connecting to a peer fails after this long (the kernel's SYN retries take minutes).
    pub connect_timeout: Duration,
    /// Longest a reservation waits for pool space before answering `Overloaded`.
    pub pool_wait: Duration,
    /// Cap on the deadline a remote peer may ask this engine to honour.
    pub max_deadline: Duration,
    /// Served connections idle this long are closed.
    pub idle_timeout: Duration,
    /// `SO_SNDBUF`/`SO_RCVBUF` for TCP sockets; `None` keeps the kernel's autotuning.
    pub socket_buffer: Option<usize>,
}

impl EngineConfig {
    /// Defaults: loopback listener on a free port, pool of up to 256 MiB with pages kept warm for 1 s,
    /// automatic transport, 4 MiB chunks, SHA-256 required and hashed on every core.
    pub fn new(secret: Secret) -> Self {
        EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret,
            pool_bytes: 256 << 20,
            pool_keep_warm: Duration::from_secs(1),
            transport: TransportChoice::Auto,
            serve_shm: true,
            chunk_bytes: 4 << 20,
            chunk_crc: false,
            require_sha256: true,
            hash_threads: crate::digest::default_threads(),
            connect_timeout: Duration::from_secs(5),
            pool_wait: Duration::from_secs(2),
            max_deadline: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(120),
            socket_buffer: None,
        }
    }
}

/// Per-operation options.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The whole operation (connect, handshake, reservation, bytes, verification, ack) must end by then.
    pub timeout: Duration,
    /// Cancels the operation; dropping the future cancels it too.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
}

impl Opts {
    pub fn timeout(timeout: Duration) -> Self {
        Opts { timeout, cancel: None }
    }

    pub fn with_cancel(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }
}
