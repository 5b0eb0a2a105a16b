//! Shared memory regions: a memfd mapped once, pre-faulted, and shareable with a same-host peer by
//! passing its descriptor over a Unix socket (`SCM_RIGHTS`).
//!
//! This is one of the crate's two `unsafe` corners (mapping memory and viewing it as slices). Range
//! exclusivity is the caller's contract, enforced by the pool's allocator on the owning side and by
//! the receiver-assigned offsets on the writing side.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// A shared mapping of a memfd.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping lives until drop and is only reached through `slice`/`slice_mut`, whose callers
// promise disjoint ranges; sharing the handle between threads adds no aliasing of its own.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// A new memfd of `len` bytes with every page allocated and mapped now, so that later copies never
    /// pay first-touch faults (which cost ~10x a copy).
    pub fn create(name: &str, len: usize) -> io::Result<Region> {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        if len > 0 {
            rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, len as u64)?;
        }
        Self::map(fd, len)
    }

    /// Maps a region a peer shared with us; its size is what the descriptor says, not what we are told.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Region> {
        let len = rustix::fs::fstat(&fd)?.st_size as usize;
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Region> {
        if len == 0 {
            return Ok(Region { ptr: NonNull::dangling(), len, fd });
        }
        // SAFETY: a fresh shared mapping at a kernel-chosen address aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                &fd,
                0,
            )?
        };
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Region { ptr, len, fd })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Views `len` bytes at `off`. Panics when out of bounds (callers check first).
    ///
    /// # Safety
    /// No `slice_mut` over an overlapping range may be alive in this process.
    pub unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "region range out of bounds"
        );
        // SAFETY: in bounds of a live mapping; aliasing is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    /// Mutable view of `len` bytes at `off`. Panics when out of bounds (callers check first).
    ///
    /// # Safety
    /// The range must be exclusively owned by the caller for the lifetime of the slice.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "region range out of bounds"
        );
        // SAFETY: in bounds of a live mapping; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping our own mapping; no slice outlives `self` (they borrow it).
            let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Sends one descriptor (plus a marker byte) over a connected Unix socket.
pub fn send_fd(sock: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("control buffer too small for one descriptor"));
    }
    let n = rustix::net::sendmsg(sock, &[IoSlice::new(b"F")], &mut cmsg, SendFlags::NOSIGNAL)?;
    if n != 1 {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "descriptor message not sent"));
    }
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`]. Honours the socket's read timeout.
pub fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes != 1 || byte[0] != b'F' {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "expected a descriptor message"));
    }
    let mut got = None;
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for fd in fds {
                got.get_or_insert(fd);
            }
        }
    }
    got.ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "descriptor message carried no descriptor")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_region_is_visible_through_both_mappings() {
        let a = Region::create("x2v-test", 1 << 20).unwrap();
        let (s1, s2) = UnixStream::pair().unwrap();
        send_fd(&s1, a.fd()).unwrap();
        let b = Region::from_fd(recv_fd(&s2).unwrap()).unwrap();
        assert_eq!(b.len(), 1 << 20);
        // SAFETY: test-local regions; no other views exist.
        unsafe { a.slice_mut(4096, 3).copy_from_slice(b"x2v") };
        // SAFETY: as above.
        assert_eq!(unsafe { b.slice(4096, 3) }, b"x2v");
    }

    #[test]
    fn a_plain_byte_is_not_a_descriptor() {
        use std::io::Write;
        let (mut s1, s2) = UnixStream::pair().unwrap();
        s1.write_all(b"F").unwrap();
        assert!(recv_fd(&s2).is_err());
    }
}
