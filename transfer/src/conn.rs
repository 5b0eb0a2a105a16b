//! Blocking stream I/O that honours a deadline and a cancel flag.
//!
//! Data moves on plain blocking sockets driven by dedicated threads (never the async executor). Each
//! read or write waits at most [`POLL`] before re-checking the deadline and the cancel flag, so a
//! stalled peer costs at most the deadline and a cancel takes effect within a tick.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Result, TransferError};

/// Longest single blocking wait before deadline and cancel are re-checked.
pub const POLL: Duration = Duration::from_millis(50);

/// A byte stream the engine can talk over (TCP, or a Unix socket for the shm control channel).
pub trait Stream: Read + Write + Send + AsFd {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Stream for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// A cancel switch shared between the caller and the thread doing the I/O.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Deadline, cancel flag and peer name for one operation.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub deadline: Instant,
    pub cancel: CancelFlag,
    pub peer: String,
}

impl Ctx {
    pub fn new(peer: impl Into<String>, deadline: Instant, cancel: CancelFlag) -> Self {
        Ctx { deadline, cancel, peer: peer.into() }
    }

    /// Fails if the operation was cancelled or ran out of time.
    pub fn check(&self, during: &'static str) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(TransferError::Cancelled { during });
        }
        if Instant::now() >= self.deadline {
            return Err(TransferError::DeadlineExceeded { during });
        }
        Ok(())
    }

    /// Time left, saturating at zero.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn tick(&self) -> Duration {
        self.remaining().clamp(Duration::from_millis(1), POLL)
    }

    fn io_err(&self, during: &'static str, source: io::Error) -> TransferError {
        TransferError::Io { peer: self.peer.clone(), during, source }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// The longest [`close_gracefully`] keeps reading.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Half-closes the write side, then reads and discards what the peer still sends until it closes,
/// errs, or `ctx` runs out. Closing a socket with unread input makes the kernel reset the connection,
/// which can destroy a reply (an error frame) the peer has not read yet; draining avoids that.
pub fn close_gracefully<S: Stream + ?Sized>(s: &mut S, ctx: &Ctx) {
    if socket2::SockRef::from(&s.as_fd()).shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    // Never hold a connection thread for long on a peer that keeps sending.
    let ctx = Ctx::new(
        ctx.peer.clone(),
        Instant::now() + ctx.remaining().min(DRAIN_LIMIT),
        ctx.cancel.clone(),
    );
    let mut sink = [0u8; 64 * 1024];
    while ctx.check("draining").is_ok() {
        if s.set_timeouts(ctx.tick()).is_err() {
            return;
        }
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// Fills `buf` completely, or fails on EOF, error, deadline or cancel.
pub fn read_exact<S: Stream + ?Sized>(
    s: &mut S,
    mut buf: &mut [u8],
    ctx: &Ctx,
    during: &'static str,
) -> Result<()> {
    while !buf.is_empty() {
        ctx.check(during)?;
        s.set_timeouts(ctx.tick()).map_err(|e| ctx.io_err(during, e))?;
        match s.read(buf) {
            Ok(0) => return Err(ctx.io_err(during, io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(ctx.io_err(during, e)),
        }
    }
    Ok(())
}

/// Writes every byte of `parts` in order (one `writev` where the kernel takes it all).
pub fn write_all<S: Stream + ?Sized>(
    s: &mut S,
    parts: &[&[u8]],
    ctx: &Ctx,
    during: &'static str,
) -> Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        if off == parts[idx].len() {
            idx += 1;
            off = 0;
            continue;
        }
        ctx.check(during)?;
        s.set_timeouts(ctx.tick()).map_err(|e| ctx.io_err(during, e))?;
        let slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&parts[idx][off..]))
            .chain(parts[idx + 1..].iter().map(|p| IoSlice::new(p)))
            .collect();
        match s.write_vectored(&slices) {
            Ok(0) => return Err(ctx.io_err(during, io::ErrorKind::WriteZero.into())),
            Ok(mut n) => {
                while n > 0 {
                    let left = parts[idx].len() - off;
                    if n < left {
                        off += n;
                        n = 0;
                    } else {
                        n -= left;
                        idx += 1;
                        off = 0;
                    }
                }
            }
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(ctx.io_err(during, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_times_out_and_cancels() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        let ctx = Ctx::new("p", Instant::now() + Duration::from_millis(120), CancelFlag::default());
        let err = read_exact(&mut a, &mut [0u8; 4], &ctx, "test read").unwrap_err();
        assert!(matches!(err, TransferError::DeadlineExceeded { during: "test read" }), "{err}");
        let ctx = Ctx::new("p", Instant::now() + Duration::from_secs(60), CancelFlag::default());
        ctx.cancel.cancel();
        assert!(matches!(
            read_exact(&mut a, &mut [0u8; 4], &ctx, "x"),
            Err(TransferError::Cancelled { .. })
        ));
    }

    #[test]
    fn vectored_write_round_trips_and_eof_is_an_error() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let ctx = Ctx::new("p", Instant::now() + Duration::from_secs(60), CancelFlag::default());
        let big = vec![7u8; 1 << 20];
        let writer = std::thread::spawn(move || {
            write_all(&mut a, &[b"head", &big, b"", b"tail"], &ctx, "w").unwrap();
        });
        let ctx = Ctx::new("p", Instant::now() + Duration::from_secs(60), CancelFlag::default());
        let mut got = vec![0u8; 8 + (1 << 20)];
        read_exact(&mut b, &mut got, &ctx, "r").unwrap();
        writer.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[got.len() - 4..], b"tail");
        assert!(got[4..got.len() - 4].iter().all(|&x| x == 7));
        let err = read_exact(&mut b, &mut [0u8; 1], &ctx, "r").unwrap_err();
        assert!(matches!(err, TransferError::Io { .. }), "{err}");
    }
}
