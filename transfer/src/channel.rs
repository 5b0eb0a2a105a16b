//! An authenticated connection to a peer, and how one is opened: TCP first (connect timeout, socket
//! tuning, handshake), then, when the peer is on the same host and both allow it, an upgrade to a Unix
//! socket over which the two pools are shared once.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};

use socket2::SockRef;

use crate::auth::{self, PeerInfo, Secret};
use crate::config::{TransportChoice, TransportKind};
use crate::conn::{Ctx, Stream};
use crate::error::{Result, TransferError};
use crate::region::{self, Region};

/// One live, authenticated connection.
pub struct Channel {
    pub stream: Box<dyn Stream>,
    pub kind: TransportKind,
    /// The peer's pool, mapped here (shm only).
    pub peer_region: Option<Region>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Channel {
    /// Whether the peer has not closed the connection since it was last used.
    pub fn is_alive(&self) -> bool {
        use rustix::net::RecvFlags;
        let mut b = [0u8; 1];
        matches!(
            rustix::net::recv(self.stream.as_fd(), &mut b, RecvFlags::PEEK | RecvFlags::DONTWAIT),
            Err(rustix::io::Errno::AGAIN)
        )
    }
}

/// Applies the TCP settings that matter for bulk transfer.
pub fn tune_tcp(s: &TcpStream, buffer: Option<usize>) {
    let _ = s.set_nodelay(true);
    if let Some(n) = buffer {
        let sock = SockRef::from(s);
        let _ = sock.set_send_buffer_size(n);
        let _ = sock.set_recv_buffer_size(n);
    }
}

/// What [`open`] needs from the engine.
pub struct Local<'a> {
    pub secret: &'a Secret,
    pub host_id: [u8; 16],
    pub choice: TransportChoice,
    pub connect_timeout: std::time::Duration,
    pub socket_buffer: Option<usize>,
    /// Our pool, offered to a same-host peer.
    pub pool_region: &'a Region,
}

/// Connects to `peer`, authenticates, and settles on a transport.
pub fn open(peer: SocketAddr, local: &Local<'_>, ctx: &Ctx) -> Result<Channel> {
    ctx.check("connecting")?;
    let timeout =
        local.connect_timeout.min(ctx.remaining()).max(std::time::Duration::from_millis(1));
    let mut tcp = TcpStream::connect_timeout(&peer, timeout)
        .map_err(|source| TransferError::Connect { peer: peer.to_string(), source })?;
    tune_tcp(&tcp, local.socket_buffer);
    let info = auth::connect(&mut tcp, local.secret, ctx)?;
    let same_host = info.host_id == local.host_id;
    let tcp_channel = |tcp: TcpStream| Channel {
        stream: Box::new(tcp),
        kind: TransportKind::Tcp,
        peer_region: None,
    };
    match local.choice {
        TransportChoice::Force(TransportKind::Tcp) => Ok(tcp_channel(tcp)),
        TransportChoice::Force(TransportKind::Shm) => match (&info.shm, same_host) {
            (Some(name), true) => open_shm(name, &info, local, ctx),
            (None, _) => Err(TransferError::TransportUnavailable {
                transport: "shm",
                reason: format!("peer {peer} does not serve shared memory"),
            }),
            (_, false) => Err(TransferError::TransportUnavailable {
                transport: "shm",
                reason: format!("peer {peer} runs on another host"),
            }),
        },
        TransportChoice::Force(TransportKind::Rdma) => {
            Err(crate::rdma::unavailable(&peer.to_string()))
        }
        TransportChoice::Auto => match (&info.shm, same_host) {
            (Some(name), true) => match open_shm(name, &info, local, ctx) {
                Ok(ch) => Ok(ch),
                Err(e) => {
                    // Same boot id but no shared socket namespace (containers, netns): TCP still works.
                    tracing::debug!(%peer, error = %e, "shared memory unreachable, using TCP");
                    Ok(tcp_channel(tcp))
                }
            },
            _ => Ok(tcp_channel(tcp)),
        },
    }
}

fn abstract_addr(name: &str) -> std::io::Result<UnixAddr> {
    UnixAddr::from_abstract_name(name.as_bytes())
}

fn open_shm(name: &str, _info: &PeerInfo, local: &Local<'_>, ctx: &Ctx) -> Result<Channel> {
    let io = |during: &'static str| {
        let peer = ctx.peer.clone();
        move |source| TransferError::Io { peer, during, source }
    };
    let mut sock = UnixStream::connect_addr(&abstract_addr(name).map_err(io("shm connect"))?)
        .map_err(io("shm connect"))?;
    auth::connect(&mut sock, local.secret, ctx)?;
    let region = exchange_regions(&sock, local.pool_region, ctx, true)?;
    Ok(Channel { stream: Box::new(sock), kind: TransportKind::Shm, peer_region: Some(region) })
}

/// Swaps pool descriptors over an authenticated Unix socket; the server sends first.
pub fn exchange_regions(
    sock: &UnixStream,
    ours: &Region,
    ctx: &Ctx,
    client: bool,
) -> Result<Region> {
    let io =
        |source| TransferError::Io { peer: ctx.peer.clone(), during: "sharing memory", source };
    sock.set_timeouts(ctx.remaining().max(std::time::Duration::from_millis(1))).map_err(io)?;
    let theirs = if client {
        let fd = region::recv_fd(sock).map_err(io)?;
        region::send_fd(sock, ours.fd()).map_err(io)?;
        fd
    } else {
        region::send_fd(sock, ours.fd()).map_err(io)?;
        region::recv_fd(sock).map_err(io)?
    };
    Region::from_fd(theirs)
        .map_err(|source| TransferError::Local { what: "mapping the peer's pool", source })
}

/// Binds the abstract Unix socket a same-host peer upgrades to.
pub fn bind_shm(name: &str) -> std::io::Result<std::os::unix::net::UnixListener> {
    std::os::unix::net::UnixListener::bind_addr(&abstract_addr(name)?)
}

/// This host's identity: the kernel boot id, so that two processes agree iff they share a kernel.
pub fn host_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = text.chars().filter(char::is_ascii_hexdigit).collect();
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
    id
}
