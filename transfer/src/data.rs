//! Moving the bytes of one payload once both sides agreed on it: the writer waits for `Ready`, puts
//! the bytes in place (TCP chunks, or a copy into the receiver's shared pool), says `DataDone` and
//! waits for the receiver's `Ack`, which comes only after verification.
//!
//! On TCP the receiver reads each chunk straight into its lease and hands it to a hashing thread, so
//! SHA-256 overlaps the next read. Over shm the writer announces each piece it copied with a `Chunk`
//! header carrying no bytes, so hashing overlaps the copy the same way. Every chunk header is bounds-checked against the manifest before a
//! byte is read into the pool.
#![allow(unsafe_code)]

use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::channel::Channel;
use crate::config::TransportKind;
use crate::conn::{self, Ctx};
use crate::error::{Result, TransferError};
use crate::manifest::{OutTensor, TensorMeta};
use crate::pool::{ALIGN, Lease};
use crate::wire::{Frame, MAX_CHUNK, read_frame, write_frame};

/// Payloads with at most this many bytes to hash are hashed on the receiving thread.
const INLINE_HASH_MAX: u64 = 8 << 20;

/// Granularity at which received bytes are handed to the hashing thread.
const HASH_PIECE: usize = 512 << 10;

/// How a writer lays tensors out in a lease: page-aligned, in manifest order (mirrors `Pool::reserve`).
fn layout(sizes: impl Iterator<Item = u64>) -> (Vec<u64>, u64) {
    let mut total = 0u64;
    let offs = sizes
        .map(|s| {
            let at = total;
            total += s.div_ceil(ALIGN as u64).max(1) * ALIGN as u64;
            at
        })
        .collect();
    (offs, total)
}

fn remote_error(ctx: &Ctx, f: Frame, expected: &str) -> TransferError {
    match f {
        Frame::Error { kind, message } => {
            TransferError::Remote { peer: ctx.peer.clone(), kind, message }
        }
        other => {
            TransferError::protocol(&ctx.peer, format!("expected {expected}, got {}", other.name()))
        }
    }
}

/// Writer side: everything after the receiver accepted the manifest, up to and including its `Ack`.
pub fn send(
    ch: &mut Channel,
    tensors: &[OutTensor],
    chunk_bytes: usize,
    crc: bool,
    ctx: &Ctx,
) -> Result<()> {
    let shm_offset = match read_frame(ch.stream.as_mut(), ctx, "waiting for the receiver")? {
        Frame::Ready { shm_offset } => shm_offset,
        other => return Err(remote_error(ctx, other, "Ready")),
    };
    let sent = match (ch.kind, shm_offset) {
        (TransportKind::Shm, Some(off)) => copy_into_peer(ch, tensors, off, ctx),
        (TransportKind::Tcp, None) => stream_chunks(ch, tensors, chunk_bytes.max(1), crc, ctx),
        (kind, off) => {
            return Err(TransferError::protocol(
                &ctx.peer,
                format!("Ready offset {off:?} does not fit transport {kind}"),
            ));
        }
    }
    .and_then(|()| write_frame(ch.stream.as_mut(), &Frame::DataDone, ctx, "finishing data"));
    if let Err(e @ TransferError::Io { .. }) = sent {
        return Err(explained_by_receiver(ch, ctx).unwrap_or(e));
    }
    sent?;
    match read_frame(ch.stream.as_mut(), ctx, "waiting for the verified ack")? {
        Frame::Ack => Ok(()),
        other => Err(remote_error(ctx, other, "Ack")),
    }
}

/// After a failed write: the receiver usually stopped the transfer on purpose (a checksum that did
/// not match, a bound it refused) and said why in an error frame before closing. Reads that reason,
/// waiting at most a moment; `None` when the connection simply broke.
fn explained_by_receiver(ch: &mut Channel, ctx: &Ctx) -> Option<TransferError> {
    let brief = Ctx::new(
        ctx.peer.clone(),
        Instant::now() + ctx.remaining().min(REASON_WAIT),
        ctx.cancel.clone(),
    );
    match read_frame(ch.stream.as_mut(), &brief, "reading the receiver's reason") {
        Ok(f @ Frame::Error { .. }) => Some(remote_error(ctx, f, "Error")),
        _ => None,
    }
}

/// How long a sender whose write failed waits for the receiver's error frame.
const REASON_WAIT: Duration = Duration::from_secs(2);

fn stream_chunks(
    ch: &mut Channel,
    tensors: &[OutTensor],
    chunk: usize,
    crc: bool,
    ctx: &Ctx,
) -> Result<()> {
    for (i, t) in tensors.iter().enumerate() {
        for (k, piece) in t.data.chunks(chunk).enumerate() {
            let header = Frame::Chunk {
                tensor: i as u32,
                offset: (k * chunk) as u64,
                len: piece.len() as u32,
                crc: crc.then(|| crc32fast::hash(piece)),
            };
            conn::write_all(ch.stream.as_mut(), &[&header.encode(), piece], ctx, "sending data")?;
        }
    }
    Ok(())
}

/// Copies straight into the receiver's pool at the offset it assigned, after checking it fits.
fn copy_into_peer(ch: &mut Channel, tensors: &[OutTensor], base: u64, ctx: &Ctx) -> Result<()> {
    let region = ch
        .peer_region
        .as_ref()
        .ok_or_else(|| TransferError::protocol(&ctx.peer, "shm without a region"))?;
    let (offs, span) = layout(tensors.iter().map(|t| t.meta.byte_len));
    if base.checked_add(span).is_none_or(|end| end > region.len() as u64) {
        return Err(TransferError::OutOfBounds(format!(
            "peer assigned offset {base} + {span} bytes in a shared pool of {} bytes",
            region.len()
        )));
    }
    const PIECE: usize = 4 << 20;
    for (i, (t, off)) in tensors.iter().zip(offs).enumerate() {
        for (k, piece) in t.data.chunks(PIECE).enumerate() {
            ctx.check("copying into shared memory")?;
            let at = (base + off) as usize + k * PIECE;
            // SAFETY: bounds checked above; the receiver leased this range to this transfer alone and no
            // Rust reference into the peer's region exists in this process besides this one.
            unsafe { region.slice_mut(at, piece.len()) }.copy_from_slice(piece);
            // A header without bytes means "this range is in place": the receiver hashes while we copy on.
            let done = Frame::Chunk {
                tensor: i as u32,
                offset: (k * PIECE) as u64,
                len: piece.len() as u32,
                crc: None,
            };
            write_frame(ch.stream.as_mut(), &done, ctx, "copying into shared memory")?;
        }
    }
    Ok(())
}

/// Receiver side: announce the lease, take the bytes, verify every tensor. The caller acks.
pub fn recv(
    ch: &mut Channel,
    lease: &mut Lease,
    metas: &[TensorMeta],
    crc_required: bool,
    ctx: &Ctx,
) -> Result<()> {
    let shm_offset = (ch.kind == TransportKind::Shm).then_some(lease.offset() as u64);
    write_frame(ch.stream.as_mut(), &Frame::Ready { shm_offset }, ctx, "accepting data")?;
    let digests = match ch.kind {
        TransportKind::Shm => recv_chunks(ch, lease, metas, false, true, ctx)?,
        _ => recv_chunks(ch, lease, metas, crc_required, false, ctx)?,
    };
    for (m, d) in metas.iter().zip(digests) {
        if let (Some(want), Some(got)) = (m.sha256, d)
            && want != got
        {
            return Err(TransferError::Integrity {
                tensor: m.name.clone(),
                detail: "SHA-256 mismatch".into(),
            });
        }
    }
    Ok(())
}

fn recv_chunks(
    ch: &mut Channel,
    lease: &mut Lease,
    metas: &[TensorMeta],
    crc_required: bool,
    in_place: bool,
    ctx: &Ctx,
) -> Result<Vec<Option<[u8; 32]>>> {
    let mut rest: Vec<&mut [u8]> = lease.parts_mut();
    let mut filled = vec![0u64; metas.len()];
    std::thread::scope(|s| {
        let mut hashing = Hashing::start(s, metas);
        while let Some(c) = next_chunk(ch, metas, &filled, crc_required, ctx)? {
            let (head, tail) = std::mem::take(&mut rest[c.tensor]).split_at_mut(c.len);
            rest[c.tensor] = tail;
            take_chunk(ch, head, &c, &metas[c.tensor], in_place, &mut hashing, ctx)?;
            filled[c.tensor] += c.len as u64;
        }
        if let Some((m, got)) = metas.iter().zip(&filled).find(|(m, got)| **got != m.byte_len) {
            return Err(TransferError::OutOfBounds(format!(
                "tensor `{}` ended after {got} of {} bytes",
                m.name, m.byte_len
            )));
        }
        Ok(hashing.finish().into_iter().map(|h| h.map(|h| h.finalize().into())).collect())
    })
}

/// A chunk header that passed its checks: its bytes may go into the lease.
struct ChunkHeader {
    tensor: usize,
    offset: u64,
    len: usize,
    crc: Option<u32>,
}

/// Reads the next chunk header, `None` at `DataDone`, and checks it against the manifest and what has
/// arrived so far before a byte of it is taken.
fn next_chunk(
    ch: &mut Channel,
    metas: &[TensorMeta],
    filled: &[u64],
    crc_required: bool,
    ctx: &Ctx,
) -> Result<Option<ChunkHeader>> {
    let (tensor, offset, len, crc) = match read_frame(ch.stream.as_mut(), ctx, "receiving data")? {
        Frame::Chunk { tensor, offset, len, crc } => (tensor as usize, offset, len, crc),
        Frame::DataDone => return Ok(None),
        other => return Err(remote_error(ctx, other, "Chunk or DataDone")),
    };
    let Some(meta) = metas.get(tensor) else {
        return Err(TransferError::OutOfBounds(format!(
            "chunk for tensor #{tensor} of {}",
            metas.len()
        )));
    };
    if len == 0
        || len > MAX_CHUNK
        || offset != filled[tensor]
        || offset + len as u64 > meta.byte_len
    {
        return Err(TransferError::OutOfBounds(format!(
            "chunk of tensor `{}` at offset {offset} with {len} bytes: expected offset {}, at most {} \
             bytes per chunk and {} bytes in the tensor",
            meta.name, filled[tensor], MAX_CHUNK, meta.byte_len
        )));
    }
    if crc_required && crc.is_none() {
        return Err(TransferError::protocol(&ctx.peer, "chunk without the CRC32 that was agreed"));
    }
    Ok(Some(ChunkHeader { tensor, offset, len: len as usize, crc }))
}

/// Takes one chunk's bytes into `dest` (over TCP; over shm the writer already put them there), feeds
/// them to the hashers and checks the chunk's CRC32.
fn take_chunk<'scope, 'a: 'scope>(
    ch: &mut Channel,
    dest: &'a mut [u8],
    c: &ChunkHeader,
    meta: &TensorMeta,
    in_place: bool,
    hashing: &mut Hashing<'scope, 'a>,
    ctx: &Ctx,
) -> Result<()> {
    let mut chunk_crc = crc32fast::Hasher::new();
    // Hand the hasher small pieces as they land, so that it reads them from cache, not DRAM.
    let piece_len = if meta.sha256.is_some() || c.crc.is_some() { HASH_PIECE } else { dest.len() };
    for piece in dest.chunks_mut(piece_len.max(1)) {
        if !in_place {
            conn::read_exact(ch.stream.as_mut(), piece, ctx, "receiving data")?;
        }
        if c.crc.is_some() {
            chunk_crc.update(piece);
        }
        if meta.sha256.is_some() {
            hashing.feed(c.tensor, piece, ctx)?;
        }
    }
    if let Some(want) = c.crc
        && chunk_crc.finalize() != want
    {
        return Err(TransferError::Integrity {
            tensor: meta.name.clone(),
            detail: format!("CRC32 mismatch in the chunk at offset {}", c.offset),
        });
    }
    Ok(())
}

/// The SHA-256 of every tensor that has a digest, computed as its bytes land.
enum Hashing<'scope, 'a> {
    /// Small payloads hash on the receiving thread: a thread hand-off costs more than it overlaps (and
    /// much more on a loaded host, where every wake-up waits for a time slice).
    Inline(Vec<Option<Sha256>>),
    /// Larger ones on a thread of their own, overlapping the next reads or copies.
    Thread(mpsc::SyncSender<(usize, &'a [u8])>, ScopedJoinHandle<'scope, Vec<Option<Sha256>>>),
}

impl<'scope, 'a: 'scope> Hashing<'scope, 'a> {
    fn start<'env>(s: &'scope Scope<'scope, 'env>, metas: &[TensorMeta]) -> Self {
        let mut hashers = metas.iter().map(|m| m.sha256.map(|_| Sha256::new())).collect::<Vec<_>>();
        let hashed: u64 = metas.iter().filter(|m| m.sha256.is_some()).map(|m| m.byte_len).sum();
        if hashed <= INLINE_HASH_MAX {
            return Hashing::Inline(hashers);
        }
        let (tx, rx) = mpsc::sync_channel::<(usize, &[u8])>(64);
        let thread = s.spawn(move || {
            for (i, bytes) in rx {
                if let Some(h) = hashers[i].as_mut() {
                    h.update(bytes);
                }
            }
            hashers
        });
        Hashing::Thread(tx, thread)
    }

    fn feed(&mut self, tensor: usize, bytes: &'a [u8], ctx: &Ctx) -> Result<()> {
        match self {
            Hashing::Inline(hashers) => {
                if let Some(h) = hashers[tensor].as_mut() {
                    h.update(bytes);
                }
                Ok(())
            }
            Hashing::Thread(tx, _) => tx
                .send((tensor, bytes))
                .map_err(|_| TransferError::protocol(&ctx.peer, "hashing thread stopped")),
        }
    }

    fn finish(self) -> Vec<Option<Sha256>> {
        match self {
            Hashing::Inline(hashers) => hashers,
            Hashing::Thread(tx, thread) => {
                drop(tx);
                thread.join().expect("hashing thread panicked")
            }
        }
    }
}
