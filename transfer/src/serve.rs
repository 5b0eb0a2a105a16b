//! The serving side: accept loops (TCP, and the abstract Unix socket for same-host peers) and one
//! thread per authenticated connection answering push and pull requests.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth;
use crate::channel::{self, Channel};
use crate::config::TransportKind;
use crate::conn::{self, Ctx};
use crate::data;
use crate::engine::Inner;
use crate::error::{Result, TransferError};
use crate::manifest::TensorMeta;
use crate::wire::{Frame, read_frame, write_frame};

/// Handshakes must finish within this, whatever the peer's intentions.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn tcp_accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    accept_loop(inner, listener.incoming(), "x2v-xfer-conn", serve_tcp);
}

pub(crate) fn unix_accept_loop(inner: Arc<Inner>, listener: UnixListener) {
    accept_loop(inner, listener.incoming(), "x2v-xfer-shm", serve_unix);
}

/// Serves each accepted connection on a thread of its own until the engine shuts down.
fn accept_loop<S: Send + 'static>(
    inner: Arc<Inner>,
    incoming: impl Iterator<Item = std::io::Result<S>>,
    thread_name: &str,
    serve: fn(Arc<Inner>, S),
) {
    for stream in incoming {
        if inner.shutdown.is_cancelled() {
            break;
        }
        let Ok(stream) = stream else { continue };
        let inner = inner.clone();
        std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || serve(inner, stream))
            .map_err(|e| tracing::error!(error = %e, "cannot spawn a connection thread"))
            .ok();
    }
}

fn handshake_ctx(inner: &Inner, peer: &str) -> Ctx {
    Ctx::new(peer, Instant::now() + HANDSHAKE_TIMEOUT, inner.shutdown.clone())
}

fn serve_tcp(inner: Arc<Inner>, mut stream: TcpStream) {
    let peer = stream.peer_addr().map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    channel::tune_tcp(&stream, inner.cfg.socket_buffer);
    let ctx = handshake_ctx(&inner, &peer);
    if let Err(e) =
        auth::accept(&mut stream, &inner.cfg.secret, inner.host_id, inner.shm_name.clone(), &ctx)
    {
        tracing::warn!(%peer, error = %e, "rejected a transfer connection");
        if matches!(e, TransferError::Protocol { .. }) {
            let _ = write_frame(
                &mut stream,
                &Frame::Error { kind: e.kind(), message: e.to_string() },
                &ctx,
                "error",
            );
        }
        return;
    }
    serve(
        &inner,
        Channel { stream: Box::new(stream), kind: TransportKind::Tcp, peer_region: None },
        &peer,
    );
}

fn serve_unix(inner: Arc<Inner>, mut sock: UnixStream) {
    let peer = format!("shm:{}", inner.shm_name.as_deref().unwrap_or("?"));
    let ctx = handshake_ctx(&inner, &peer);
    let setup = auth::accept(&mut sock, &inner.cfg.secret, inner.host_id, None, &ctx)
        .and_then(|()| channel::exchange_regions(&sock, inner.pool.region(), &ctx, false));
    match setup {
        Ok(region) => {
            let ch = Channel {
                stream: Box::new(sock),
                kind: TransportKind::Shm,
                peer_region: Some(region),
            };
            serve(&inner, ch, &peer);
        }
        Err(e) => tracing::warn!(%peer, error = %e, "rejected a shared-memory connection"),
    }
}

fn serve(inner: &Inner, mut ch: Channel, peer: &str) {
    loop {
        let idle = Ctx::new(peer, Instant::now() + inner.cfg.idle_timeout, inner.shutdown.clone());
        let frame = match read_frame(ch.stream.as_mut(), &idle, "waiting for a request") {
            Ok(f) => f,
            Err(
                TransferError::Io { .. }
                | TransferError::DeadlineExceeded { .. }
                | TransferError::Cancelled { .. },
            ) => {
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "malformed request; closing the connection");
                reply_error(&mut ch, &e, &idle);
                return;
            }
        };
        let result = match frame {
            Frame::PushBegin { job, deadline_ms, chunk_crc, leaf_bytes, tensors } => {
                let ctx = op_ctx(inner, peer, deadline_ms);
                handle_push(inner, &mut ch, job, chunk_crc, leaf_bytes, tensors, &ctx)
            }
            Frame::PullRequest { job, deadline_ms, chunk_crc } => {
                handle_pull(inner, &mut ch, peer, job, deadline_ms, chunk_crc)
            }
            other => Err(TransferError::protocol(
                peer,
                format!("unexpected {} outside a transfer", other.name()),
            )),
        };
        if let Err(e) = result {
            tracing::warn!(%peer, error = %e, "transfer failed");
            // The stream may be mid-payload: report, then close rather than try to resynchronise.
            reply_error(
                &mut ch,
                &e,
                &Ctx::new(peer, Instant::now() + Duration::from_secs(1), Default::default()),
            );
            return;
        }
    }
}

fn reply_error(ch: &mut Channel, e: &TransferError, ctx: &Ctx) {
    if matches!(e, TransferError::Io { .. } | TransferError::Remote { .. }) {
        return;
    }
    let reply = Frame::Error { kind: e.kind(), message: e.to_string() };
    if write_frame(ch.stream.as_mut(), &reply, ctx, "error").is_ok() {
        conn::close_gracefully(ch.stream.as_mut(), ctx);
    }
}

fn op_ctx(inner: &Inner, peer: &str, deadline_ms: u64) -> Ctx {
    let asked = Duration::from_millis(deadline_ms).min(inner.cfg.max_deadline);
    Ctx::new(peer, Instant::now() + asked, inner.shutdown.clone())
}

fn handle_push(
    inner: &Inner,
    ch: &mut Channel,
    job: [u8; 16],
    chunk_crc: bool,
    leaf_bytes: Option<u32>,
    tensors: Vec<TensorMeta>,
    ctx: &Ctx,
) -> Result<()> {
    let job = crate::engine::job_from_wire(job)?;
    let _claim = inner.claim(job)?;
    let received = inner.receive(ch, job, leaf_bytes, tensors, chunk_crc, ctx)?;
    inner.deliver(job, received)?;
    write_frame(ch.stream.as_mut(), &Frame::Ack, ctx, "acknowledging")
}

fn handle_pull(
    inner: &Inner,
    ch: &mut Channel,
    peer: &str,
    job: [u8; 16],
    deadline_ms: u64,
    crc: bool,
) -> Result<()> {
    let ctx = op_ctx(inner, peer, deadline_ms);
    let job = crate::engine::job_from_wire(job)?;
    let payload = inner.outbox_get(job)?;
    write_frame(
        ch.stream.as_mut(),
        &Frame::Manifest { leaf_bytes: payload.leaf_bytes(), tensors: payload.manifest() },
        &ctx,
        "sending the manifest",
    )?;
    data::send(ch, &payload, inner.cfg.chunk_bytes, crc, inner.cfg.hash_threads, &ctx)?;
    inner.outbox_consumed(job);
    tracing::debug!(%peer, %job, "pulled payload delivered and verified");
    Ok(())
}
