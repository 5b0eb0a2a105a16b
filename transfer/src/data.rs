//! Moving the bytes of one payload once both sides agreed on it: the writer waits for `Ready`, puts
//! the bytes in place (TCP chunks, or a copy into the receiver's shared pool), sends every tensor's
//! SHA-256 leaf digests (`Leaves`), says `DataDone` and waits for the receiver's `Ack`, which comes
//! only after verification.
//!
//! Hashing runs on threads of its own on both sides, leaf by leaf ([`crate::digest`]), overlapped with
//! the bytes moving:
//! - the writer of a [`crate::Payload::deferred`] starts `hash_threads` hashers over the leaves in the
//!   order it sends them, moves the bytes meanwhile, then joins the hashers on what is left;
//! - on TCP the receiver reads each chunk straight into its lease and hands every leaf it completes to
//!   `hash_threads` hashers, so SHA-256 overlaps the next reads; over shm the writer announces each
//!   piece it copied with a `Chunk` header carrying no bytes, so hashing overlaps the copy the same way.
//!
//! Once the bytes are in, the receiver compares its leaf digests with the writer's (a mismatch names
//! the tensor and the byte range) and its roots with the manifest's, where the manifest has them.
//! Every chunk header and digest frame is bounds-checked against the manifest first.
#![allow(unsafe_code)]

use std::sync::{Mutex, mpsc};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::config::TransportKind;
use crate::conn::{self, Ctx};
use crate::digest::{self, LeafQueue, Sha};
use crate::error::{Result, TransferError};
use crate::manifest::{Digests, OutTensor, Payload, TensorMeta};
use crate::pool::{ALIGN, Lease};
use crate::wire::{Frame, MAX_CHUNK, MAX_LEAVES_PER_FRAME, read_frame, write_frame};

/// Payloads with at most this many bytes to hash are hashed by the thread moving the bytes: a thread
/// hand-off costs more than it overlaps.
const INLINE_HASH_MAX: u64 = 1 << 20;

/// Hashing threads for a payload of `total` bytes: none (the thread moving the bytes hashes) up to
/// [`INLINE_HASH_MAX`], else `hash_threads`. Writer and receiver decide alike.
fn hashers_for(total: u64, hash_threads: usize) -> usize {
    if total <= INLINE_HASH_MAX { 0 } else { hash_threads }
}

/// Most bytes read from the socket at once while a chunk CRC32 is computed (read from cache).
const CRC_PIECE: usize = 512 << 10;

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
    payload: &Payload,
    chunk_bytes: usize,
    crc: bool,
    hash_threads: usize,
    ctx: &Ctx,
) -> Result<()> {
    let shm_offset = match read_frame(ch.stream.as_mut(), ctx, "waiting for the receiver")? {
        Frame::Ready { shm_offset } => shm_offset,
        other => return Err(remote_error(ctx, other, "Ready")),
    };
    match (ch.kind, shm_offset) {
        (TransportKind::Shm, Some(_)) | (TransportKind::Tcp, None) => {}
        (kind, off) => {
            return Err(TransferError::protocol(
                &ctx.peer,
                format!("Ready offset {off:?} does not fit transport {kind}"),
            ));
        }
    }
    let tensors = &payload.tensors;
    // A deferred payload's leaves, hashed alongside the bytes (by this thread alone when small).
    let queue = match payload.digests {
        Digests::OnSend { leaf_bytes } => {
            Some(LeafQueue::new(tensors.iter().map(|t| &t.data[..]), leaf_bytes))
        }
        _ => None,
    };
    let helpers = hashers_for(payload.total_bytes(), hash_threads);
    let sent = std::thread::scope(|s| {
        let hashers = queue.as_ref().map(|q| q.spawn(s, helpers));
        let moved = match shm_offset {
            Some(off) => copy_into_peer(ch, tensors, off, ctx),
            None => stream_chunks(ch, tensors, chunk_bytes.max(1), crc, ctx),
        };
        let hashed = queue.as_ref().zip(hashers).map(|(q, hashers)| {
            if moved.is_err() {
                q.stop();
            }
            q.finish(hashers)
        });
        moved?;
        match (&payload.digests, &hashed) {
            (_, Some(leaves)) => send_leaves(ch, leaves, ctx)?,
            (Digests::Known { leaves, .. }, None) => send_leaves(ch, leaves, ctx)?,
            _ => {}
        }
        write_frame(ch.stream.as_mut(), &Frame::DataDone, ctx, "finishing data")
    });
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

/// Every tensor's leaf digests, in frames of at most [`MAX_LEAVES_PER_FRAME`].
fn send_leaves(ch: &mut Channel, leaves: &[Vec<Sha>], ctx: &Ctx) -> Result<()> {
    for (tensor, digests) in leaves.iter().enumerate() {
        for (k, batch) in digests.chunks(MAX_LEAVES_PER_FRAME).enumerate() {
            let f = Frame::Leaves {
                tensor: tensor as u32,
                first: (k * MAX_LEAVES_PER_FRAME) as u32,
                digests: batch.to_vec(),
            };
            write_frame(ch.stream.as_mut(), &f, ctx, "sending digests")?;
        }
    }
    Ok(())
}

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

/// Receiver side: announce the lease, take the bytes, verify every tensor. Returns each tensor's
/// verified chunked SHA-256 root (`None` without digests). The caller acks.
pub fn recv(
    ch: &mut Channel,
    lease: &mut Lease,
    metas: &[TensorMeta],
    leaf_bytes: Option<u32>,
    crc_required: bool,
    hash_threads: usize,
    ctx: &Ctx,
) -> Result<Vec<Option<Sha>>> {
    let shm_offset = (ch.kind == TransportKind::Shm).then_some(lease.offset() as u64);
    write_frame(ch.stream.as_mut(), &Frame::Ready { shm_offset }, ctx, "accepting data")?;
    let plan = Plan { metas, leaf_bytes, hash_threads };
    let (ours, theirs) = match ch.kind {
        TransportKind::Shm => recv_chunks(ch, lease, &plan, false, true, ctx)?,
        _ => recv_chunks(ch, lease, &plan, crc_required, false, ctx)?,
    };
    let Some(leaf_bytes) = leaf_bytes else { return Ok(vec![None; metas.len()]) };
    metas
        .iter()
        .zip(ours.iter().zip(&theirs))
        .map(|(m, (ours, theirs))| verify(m, leaf_bytes, ours, theirs, ctx).map(Some))
        .collect()
}

/// Checks one tensor's leaves (ours, hashed from the lease) against the writer's, and the root they
/// make against the manifest's; returns the root.
fn verify(m: &TensorMeta, leaf_bytes: u32, ours: &[Sha], theirs: &[Sha], ctx: &Ctx) -> Result<Sha> {
    if theirs.len() != ours.len() {
        return Err(TransferError::protocol(
            &ctx.peer,
            format!(
                "the writer sent {} of the {} leaf digests of tensor `{}`",
                theirs.len(),
                ours.len(),
                m.name
            ),
        ));
    }
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        let from = i as u64 * u64::from(leaf_bytes);
        let to = (from + u64::from(leaf_bytes)).min(m.byte_len);
        return Err(TransferError::Integrity {
            tensor: m.name.clone(),
            detail: format!(
                "SHA-256 mismatch in bytes {from}..{to} (leaf {i} of {}, {leaf_bytes}-byte leaves)",
                ours.len()
            ),
        });
    }
    let root = digest::root(leaf_bytes, m.byte_len, ours);
    if m.sha256.is_some_and(|want| want != root) {
        return Err(TransferError::Integrity {
            tensor: m.name.clone(),
            detail: "SHA-256 root mismatch: the bytes received (and the writer's leaf digests) do \
                     not match the root in the manifest"
                .into(),
        });
    }
    Ok(root)
}

/// What the receiver checks the bytes against.
struct Plan<'m> {
    metas: &'m [TensorMeta],
    leaf_bytes: Option<u32>,
    hash_threads: usize,
}

/// Takes chunks until `DataDone`; returns per tensor our leaf digests and the writer's.
#[allow(clippy::type_complexity)]
fn recv_chunks(
    ch: &mut Channel,
    lease: &mut Lease,
    plan: &Plan<'_>,
    crc_required: bool,
    in_place: bool,
    ctx: &Ctx,
) -> Result<(Vec<Vec<Sha>>, Vec<Vec<Sha>>)> {
    let metas = plan.metas;
    let leaf = plan.leaf_bytes.map_or(usize::MAX, |l| l as usize);
    let mut landing: Vec<Landing<'_>> =
        lease.parts_mut().into_iter().map(|rest| Landing { rest, in_leaf: 0, leaf: 0 }).collect();
    let mut filled = vec![0u64; metas.len()];
    let mut theirs: Vec<Vec<Sha>> = vec![Vec::new(); metas.len()];
    let (tx, rx) = mpsc::channel();
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        let total: u64 = metas.iter().map(|m| m.byte_len).sum();
        let threads = hashers_for(total, plan.hash_threads);
        let mut hashing = Hashing::start(s, metas, plan.leaf_bytes, threads, tx, &rx);
        loop {
            match next_frame(ch, plan, &filled, &theirs, crc_required, ctx)? {
                Next::Chunk(c) => {
                    let dest = &mut landing[c.tensor];
                    dest.take(ch, &c, &metas[c.tensor], leaf, in_place, &mut hashing, ctx)?;
                    filled[c.tensor] += c.len as u64;
                }
                Next::Leaves { tensor, digests } => theirs[tensor].extend(digests),
                Next::Done => break,
            }
        }
        if let Some((m, got)) = metas.iter().zip(&filled).find(|(m, got)| **got != m.byte_len) {
            return Err(TransferError::OutOfBounds(format!(
                "tensor `{}` ended after {got} of {} bytes",
                m.name, m.byte_len
            )));
        }
        Ok((hashing.finish(), theirs))
    })
}

/// What is left to fill of one tensor's part of the lease.
struct Landing<'a> {
    /// From the start of the leaf being filled to the end of the tensor.
    rest: &'a mut [u8],
    /// Bytes of that leaf already in place.
    in_leaf: usize,
    /// Its index.
    leaf: usize,
}

impl<'a> Landing<'a> {
    /// Takes one chunk's bytes (over TCP; over shm the writer already put them in place), hands every
    /// leaf it completes to the hashers, and checks the chunk's CRC32. `leaf`: the leaf size
    /// (`usize::MAX` when nothing is hashed).
    #[allow(clippy::too_many_arguments)]
    fn take<'scope>(
        &mut self,
        ch: &mut Channel,
        c: &ChunkHeader,
        meta: &TensorMeta,
        leaf: usize,
        in_place: bool,
        hashing: &mut Hashing<'scope, 'a>,
        ctx: &Ctx,
    ) -> Result<()>
    where
        'a: 'scope,
    {
        let mut chunk_crc = crc32fast::Hasher::new();
        let piece = if c.crc.is_some() { CRC_PIECE } else { usize::MAX };
        let mut left = c.len;
        while left > 0 {
            let leaf_len = leaf.min(self.rest.len());
            let n = (leaf_len - self.in_leaf).min(left).min(piece);
            let dest = &mut self.rest[self.in_leaf..self.in_leaf + n];
            if !in_place {
                conn::read_exact(ch.stream.as_mut(), dest, ctx, "receiving data")?;
            }
            if c.crc.is_some() {
                chunk_crc.update(dest);
            }
            self.in_leaf += n;
            left -= n;
            if self.in_leaf == leaf_len {
                let (done, rest) = std::mem::take(&mut self.rest).split_at_mut(leaf_len);
                self.rest = rest;
                hashing.feed(c.tensor, self.leaf, done, ctx)?;
                self.leaf += 1;
                self.in_leaf = 0;
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
}

/// A chunk header that passed its checks: its bytes may go into the lease.
struct ChunkHeader {
    tensor: usize,
    offset: u64,
    len: usize,
    crc: Option<u32>,
}

/// The next thing the writer sends, checked.
enum Next {
    Chunk(ChunkHeader),
    Leaves { tensor: usize, digests: Vec<Sha> },
    Done,
}

/// Reads the next frame and checks it against the manifest and what has arrived so far: a chunk
/// header before a byte of it is taken, leaf digests before they are kept.
fn next_frame(
    ch: &mut Channel,
    plan: &Plan<'_>,
    filled: &[u64],
    theirs: &[Vec<Sha>],
    crc_required: bool,
    ctx: &Ctx,
) -> Result<Next> {
    let metas = plan.metas;
    let (tensor, offset, len, crc) = match read_frame(ch.stream.as_mut(), ctx, "receiving data")? {
        Frame::Chunk { tensor, offset, len, crc } => (tensor as usize, offset, len, crc),
        Frame::Leaves { tensor, first, digests } => {
            return leaves(plan, theirs, tensor as usize, first, digests).map_err(|reason| {
                TransferError::protocol(&ctx.peer, format!("leaf digests: {reason}"))
            });
        }
        Frame::DataDone => return Ok(Next::Done),
        other => return Err(remote_error(ctx, other, "Chunk, Leaves or DataDone")),
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
    Ok(Next::Chunk(ChunkHeader { tensor, offset, len: len as usize, crc }))
}

/// Checks a `Leaves` frame: digests announced, tensor in range, leaves in order and within the tensor.
fn leaves(
    plan: &Plan<'_>,
    theirs: &[Vec<Sha>],
    tensor: usize,
    first: u32,
    digests: Vec<Sha>,
) -> Result<Next, String> {
    let leaf_bytes = plan.leaf_bytes.ok_or("the manifest announced no digests")?;
    let meta = plan.metas.get(tensor).ok_or_else(|| format!("tensor #{tensor} out of range"))?;
    let count = digest::leaf_count(meta.byte_len, leaf_bytes);
    let have = theirs[tensor].len() as u64;
    if u64::from(first) != have || have + digests.len() as u64 > count {
        return Err(format!(
            "leaves {first}..{} of tensor `{}`: expected leaf {have} next, {count} in all",
            u64::from(first) + digests.len() as u64,
            meta.name
        ));
    }
    Ok(Next::Leaves { tensor, digests })
}

/// A leaf to hash: tensor, leaf index, bytes.
type Job<'a> = (usize, usize, &'a [u8]);

/// The leaf digests of every tensor, computed as the leaves land.
enum Hashing<'scope, 'a> {
    /// Nothing to hash.
    Off,
    /// Small payloads hash on the receiving thread: a thread hand-off costs more than it overlaps (and
    /// much more on a loaded host, where every wake-up waits for a time slice).
    Inline(Vec<Vec<Sha>>),
    /// Larger ones on `hash_threads` threads, overlapping the next reads or copies.
    Pool {
        tx: mpsc::Sender<Job<'a>>,
        workers: Vec<ScopedJoinHandle<'scope, Vec<(usize, usize, Sha)>>>,
        counts: Vec<usize>,
    },
}

impl<'scope, 'a: 'scope> Hashing<'scope, 'a> {
    fn start<'env>(
        s: &'scope Scope<'scope, 'env>,
        metas: &[TensorMeta],
        leaf_bytes: Option<u32>,
        threads: usize,
        tx: mpsc::Sender<Job<'a>>,
        rx: &'scope Mutex<mpsc::Receiver<Job<'a>>>,
    ) -> Self {
        let Some(leaf_bytes) = leaf_bytes else { return Hashing::Off };
        let counts: Vec<usize> =
            metas.iter().map(|m| digest::leaf_count(m.byte_len, leaf_bytes) as usize).collect();
        if threads == 0 {
            return Hashing::Inline(counts.iter().map(|&n| Vec::with_capacity(n)).collect());
        }
        let leaves: usize = counts.iter().sum();
        let workers = (0..threads.min(leaves))
            .map(|_| {
                s.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        // The lock is held only while waiting for the next leaf, never while hashing.
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((tensor, i, bytes)) = job else { return done };
                        done.push((tensor, i, digest::leaf(bytes)));
                    }
                })
            })
            .collect();
        Hashing::Pool { tx, workers, counts }
    }

    fn feed(&mut self, tensor: usize, i: usize, bytes: &'a [u8], ctx: &Ctx) -> Result<()> {
        match self {
            Hashing::Off => Ok(()),
            Hashing::Inline(leaves) => {
                leaves[tensor].push(digest::leaf(bytes));
                Ok(())
            }
            Hashing::Pool { tx, .. } => tx
                .send((tensor, i, bytes))
                .map_err(|_| TransferError::protocol(&ctx.peer, "hashing threads stopped")),
        }
    }

    /// Every tensor's leaf digests, in order (empty without digests).
    fn finish(self) -> Vec<Vec<Sha>> {
        match self {
            Hashing::Off => Vec::new(),
            Hashing::Inline(leaves) => leaves,
            Hashing::Pool { tx, workers, counts } => {
                drop(tx);
                let mut out: Vec<Vec<Sha>> = counts.iter().map(|&n| vec![[0; 32]; n]).collect();
                for w in workers {
                    for (tensor, i, d) in w.join().expect("a hashing thread panicked") {
                        out[tensor][i] = d;
                    }
                }
                out
            }
        }
    }
}
