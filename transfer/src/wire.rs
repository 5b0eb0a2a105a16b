//! The wire protocol: little-endian, length-prefixed control frames; chunk bytes follow their header.
//!
//! Envelope: `u32 body_len | u8 tag | body`. `body_len` never exceeds [`MAX_BODY`], so a hostile or
//! broken peer cannot make us allocate more than that for a control frame. A [`Frame::Chunk`] header is
//! followed on the stream by exactly `len` raw bytes, which the receiver reads straight into its pool.
//! Decoding never panics: every malformed input is an `Err` with a reason.
//!
//! Digests (version 2): `PushBegin` and `Manifest` announce the payload's leaf size (`0`: no digests)
//! next to each tensor's optional chunked SHA-256 root; after the bytes the writer sends every
//! tensor's leaf digests in [`Frame::Leaves`] frames, then `DataDone`. See [`crate::digest`].

use x2v_core::ErrorKind;

use crate::conn::{self, Ctx, Stream};
use crate::digest::{Sha, check_leaf_bytes};
use crate::error::{Result, TransferError};
use crate::manifest::{Dtype, MAX_NAME_LEN, MAX_RANK, MAX_TENSORS, TensorMeta};

/// First bytes of every Hello and Auth body.
pub const MAGIC: [u8; 4] = *b"X2VT";
/// Protocol version; peers must match exactly.
pub const VERSION: u16 = 2;
/// Largest control-frame body.
pub const MAX_BODY: u32 = 1 << 20;
/// Largest chunk a receiver accepts.
pub const MAX_CHUNK: u32 = 64 << 20;
/// Most leaf digests in one [`Frame::Leaves`] (512 KiB of body).
pub const MAX_LEAVES_PER_FRAME: usize = 16 << 10;

/// Every message on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Server → client, first frame: a fresh nonce, the host identity and the shm socket, if any.
    Hello { nonce: [u8; 32], host_id: [u8; 16], shm: Option<String> },
    /// Client → server: HMAC over both nonces proves the client holds the secret.
    Auth { nonce: [u8; 32], mac: [u8; 32] },
    /// Server → client: HMAC proving the server holds the secret too.
    AuthOk { mac: [u8; 32] },
    /// Writer → receiver: announce a payload and ask for room.
    /// `leaf_bytes`: the digests' leaf size; `None`: the payload carries no digests.
    PushBegin {
        job: [u8; 16],
        deadline_ms: u64,
        chunk_crc: bool,
        leaf_bytes: Option<u32>,
        tensors: Vec<TensorMeta>,
    },
    /// Receiver → owner of an outbox: send me this job.
    PullRequest { job: [u8; 16], deadline_ms: u64, chunk_crc: bool },
    /// Outbox owner → puller: what will come.
    Manifest { leaf_bytes: Option<u32>, tensors: Vec<TensorMeta> },
    /// Receiver → writer: room reserved; for shm, the byte offset in the receiver's shared pool.
    Ready { shm_offset: Option<u64> },
    /// Writer → receiver: `len` bytes of tensor `tensor` at `offset` follow this header.
    Chunk { tensor: u32, offset: u64, len: u32, crc: Option<u32> },
    /// Writer → receiver: the SHA-256 of leaves `first..first + digests.len()` of tensor `tensor`.
    Leaves { tensor: u32, first: u32, digests: Vec<Sha> },
    /// Writer → receiver: all bytes written (streamed, or copied into shared memory).
    DataDone,
    /// Receiver → writer: every tensor verified and handed to the consumer.
    Ack,
    /// Either way: the operation failed; the connection may be reused after it.
    Error { kind: ErrorKind, message: String },
}

const T_HELLO: u8 = 1;
const T_AUTH: u8 = 2;
const T_AUTH_OK: u8 = 3;
const T_PUSH: u8 = 4;
const T_PULL: u8 = 5;
const T_MANIFEST: u8 = 6;
const T_READY: u8 = 7;
const T_CHUNK: u8 = 8;
const T_DONE: u8 = 9;
const T_ACK: u8 = 10;
const T_ERROR: u8 = 11;
const T_LEAVES: u8 = 12;

impl Frame {
    /// The envelope plus body, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&[0; 5]);
        let tag = match self {
            Frame::Hello { nonce, host_id, shm } => {
                b.extend_from_slice(&MAGIC);
                b.extend_from_slice(&VERSION.to_le_bytes());
                b.extend_from_slice(nonce);
                b.extend_from_slice(host_id);
                put_str(&mut b, shm.as_deref().unwrap_or(""));
                T_HELLO
            }
            Frame::Auth { nonce, mac } => {
                b.extend_from_slice(&MAGIC);
                b.extend_from_slice(&VERSION.to_le_bytes());
                b.extend_from_slice(nonce);
                b.extend_from_slice(mac);
                T_AUTH
            }
            Frame::AuthOk { mac } => {
                b.extend_from_slice(mac);
                T_AUTH_OK
            }
            Frame::PushBegin { job, deadline_ms, chunk_crc, leaf_bytes, tensors } => {
                b.extend_from_slice(job);
                b.extend_from_slice(&deadline_ms.to_le_bytes());
                b.push(u8::from(*chunk_crc));
                b.extend_from_slice(&leaf_bytes.unwrap_or(0).to_le_bytes());
                put_tensors(&mut b, tensors);
                T_PUSH
            }
            Frame::PullRequest { job, deadline_ms, chunk_crc } => {
                b.extend_from_slice(job);
                b.extend_from_slice(&deadline_ms.to_le_bytes());
                b.push(u8::from(*chunk_crc));
                T_PULL
            }
            Frame::Manifest { leaf_bytes, tensors } => {
                b.extend_from_slice(&leaf_bytes.unwrap_or(0).to_le_bytes());
                put_tensors(&mut b, tensors);
                T_MANIFEST
            }
            Frame::Ready { shm_offset } => {
                b.push(u8::from(shm_offset.is_some()));
                b.extend_from_slice(&shm_offset.unwrap_or(0).to_le_bytes());
                T_READY
            }
            Frame::Chunk { tensor, offset, len, crc } => {
                b.extend_from_slice(&tensor.to_le_bytes());
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
                b.push(u8::from(crc.is_some()));
                b.extend_from_slice(&crc.unwrap_or(0).to_le_bytes());
                T_CHUNK
            }
            Frame::Leaves { tensor, first, digests } => {
                b.reserve(12 + digests.len() * 32);
                b.extend_from_slice(&tensor.to_le_bytes());
                b.extend_from_slice(&first.to_le_bytes());
                b.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    b.extend_from_slice(d);
                }
                T_LEAVES
            }
            Frame::DataDone => T_DONE,
            Frame::Ack => T_ACK,
            Frame::Error { kind, message } => {
                let idx = ErrorKind::ALL
                    .iter()
                    .position(|k| k == kind)
                    .unwrap_or(ErrorKind::ALL.len() - 1);
                b.push(idx as u8);
                put_str(&mut b, &message[..message.floor_char_boundary(4096)]);
                T_ERROR
            }
        };
        let body_len = (b.len() - 5) as u32;
        b[..4].copy_from_slice(&body_len.to_le_bytes());
        b[4] = tag;
        b
    }

    /// Decodes one frame from `tag` and `body` (the envelope already split off).
    pub fn decode(tag: u8, body: &[u8]) -> Result<Frame, String> {
        let mut d = Dec(body);
        let f = match tag {
            T_HELLO => {
                d.magic()?;
                Frame::Hello {
                    nonce: d.arr()?,
                    host_id: d.arr()?,
                    shm: Some(d.str()?).filter(|s| !s.is_empty()),
                }
            }
            T_AUTH => {
                d.magic()?;
                Frame::Auth { nonce: d.arr()?, mac: d.arr()? }
            }
            T_AUTH_OK => Frame::AuthOk { mac: d.arr()? },
            T_PUSH => Frame::PushBegin {
                job: d.arr()?,
                deadline_ms: d.u64()?,
                chunk_crc: d.bool()?,
                leaf_bytes: d.leaf_bytes()?,
                tensors: d.tensors()?,
            },
            T_PULL => {
                Frame::PullRequest { job: d.arr()?, deadline_ms: d.u64()?, chunk_crc: d.bool()? }
            }
            T_MANIFEST => Frame::Manifest { leaf_bytes: d.leaf_bytes()?, tensors: d.tensors()? },
            T_READY => {
                let some = d.bool()?;
                let off = d.u64()?;
                Frame::Ready { shm_offset: some.then_some(off) }
            }
            T_CHUNK => {
                let (tensor, offset, len) = (d.u32()?, d.u64()?, d.u32()?);
                let some = d.bool()?;
                let crc = d.u32()?;
                Frame::Chunk { tensor, offset, len, crc: some.then_some(crc) }
            }
            T_LEAVES => {
                let (tensor, first, n) = (d.u32()?, d.u32()?, d.u32()? as usize);
                if n == 0 || n > MAX_LEAVES_PER_FRAME {
                    return Err(format!("{n} leaf digests in a frame, 1..={MAX_LEAVES_PER_FRAME}"));
                }
                let digests = (0..n).map(|_| d.arr()).collect::<Result<Vec<_>, _>>()?;
                Frame::Leaves { tensor, first, digests }
            }
            T_DONE => Frame::DataDone,
            T_ACK => Frame::Ack,
            T_ERROR => {
                let idx = d.u8()? as usize;
                let kind =
                    *ErrorKind::ALL.get(idx).ok_or_else(|| format!("unknown error kind {idx}"))?;
                Frame::Error { kind, message: d.str()? }
            }
            other => return Err(format!("unknown frame tag {other}")),
        };
        if !d.0.is_empty() {
            return Err(format!("{} trailing bytes after frame tag {tag}", d.0.len()));
        }
        Ok(f)
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Auth { .. } => "Auth",
            Frame::AuthOk { .. } => "AuthOk",
            Frame::PushBegin { .. } => "PushBegin",
            Frame::PullRequest { .. } => "PullRequest",
            Frame::Manifest { .. } => "Manifest",
            Frame::Ready { .. } => "Ready",
            Frame::Chunk { .. } => "Chunk",
            Frame::Leaves { .. } => "Leaves",
            Frame::DataDone => "DataDone",
            Frame::Ack => "Ack",
            Frame::Error { .. } => "Error",
        }
    }
}

/// Reads one frame, enforcing [`MAX_BODY`].
pub fn read_frame<S: Stream + ?Sized>(s: &mut S, ctx: &Ctx, during: &'static str) -> Result<Frame> {
    let mut head = [0u8; 5];
    conn::read_exact(s, &mut head, ctx, during)?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    if len > MAX_BODY {
        return Err(TransferError::protocol(
            &ctx.peer,
            format!("frame body of {len} bytes exceeds {MAX_BODY}"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    conn::read_exact(s, &mut body, ctx, during)?;
    Frame::decode(head[4], &body).map_err(|r| TransferError::protocol(&ctx.peer, r))
}

/// Writes one frame.
pub fn write_frame<S: Stream + ?Sized>(
    s: &mut S,
    f: &Frame,
    ctx: &Ctx,
    during: &'static str,
) -> Result<()> {
    conn::write_all(s, &[&f.encode()], ctx, during)
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_tensors(b: &mut Vec<u8>, tensors: &[TensorMeta]) {
    b.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for t in tensors {
        put_str(b, &t.name);
        b.push(t.dtype.code());
        b.push(t.shape.len() as u8);
        for d in &t.shape {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&t.byte_len.to_le_bytes());
        b.push(u8::from(t.sha256.is_some()));
        b.extend_from_slice(&t.sha256.unwrap_or([0; 32]));
    }
}

struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err(format!("frame truncated: wanted {n} more bytes, {} left", self.0.len()));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("boolean byte {v}")),
        }
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn magic(&mut self) -> Result<(), String> {
        if self.arr::<4>()? != MAGIC {
            return Err("bad magic: not an x2v-transfer peer".into());
        }
        let v = u16::from_le_bytes(self.arr()?);
        if v != VERSION {
            return Err(format!("protocol version {v}, this build speaks {VERSION}"));
        }
        Ok(())
    }
    /// A leaf size, `0` meaning no digests.
    fn leaf_bytes(&mut self) -> Result<Option<u32>, String> {
        match self.u32()? {
            0 => Ok(None),
            n => check_leaf_bytes(n).map(|()| Some(n)),
        }
    }
    fn str(&mut self) -> Result<String, String> {
        let n = u16::from_le_bytes(self.arr()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
    fn tensors(&mut self) -> Result<Vec<TensorMeta>, String> {
        let n = self.u32()? as usize;
        if n > MAX_TENSORS {
            return Err(format!("{n} tensors, at most {MAX_TENSORS}"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.str()?;
            if name.len() > MAX_NAME_LEN {
                return Err(format!("tensor name of {} bytes", name.len()));
            }
            let code = self.u8()?;
            let dtype =
                Dtype::from_code(code).ok_or_else(|| format!("unknown dtype code {code}"))?;
            let rank = self.u8()? as usize;
            if rank > MAX_RANK {
                return Err(format!("rank {rank}, at most {MAX_RANK}"));
            }
            let shape = (0..rank).map(|_| self.u64()).collect::<Result<Vec<_>, _>>()?;
            let byte_len = self.u64()?;
            let has = self.bool()?;
            let digest = self.arr::<32>()?;
            out.push(TensorMeta { name, dtype, shape, byte_len, sha256: has.then_some(digest) });
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
