//! Shared memory regions: a sparse memfd mapped once, and shareable with a same-host peer by passing
//! its descriptor over a Unix socket (`SCM_RIGHTS`).
//!
//! A region costs memory only for the pages someone wrote: creating or mapping one touches nothing,
//! and [`Region::discard`] punches pages out of the memfd, which frees them for every process that
//! maps it (an `madvise(MADV_DONTNEED)` would only drop this process's page-table entries of a shared
//! mapping and leave the memory allocated). The file size never changes, so a peer's mapping stays
//! valid: a discarded page reads as zeros and is allocated again when written.
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
    /// A new memfd of `len` bytes, none of them allocated yet: pages are allocated when first written,
    /// so an idle region costs address space only.
    pub fn create(name: &str, len: usize) -> io::Result<Region> {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
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
        // No MAP_POPULATE: on a sparse memfd it would allocate every page of the region, in the owner
        // and again through each peer's mapping of it.
        // SAFETY: a fresh shared mapping at a kernel-chosen address aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
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

    /// Bytes of the memfd backed by memory now, whichever process wrote them.
    pub fn resident_bytes(&self) -> io::Result<u64> {
        Ok(rustix::fs::fstat(&self.fd)?.st_blocks as u64 * 512)
    }

    /// Frees the memory behind `len` bytes at `off` (whole pages inside the range; partial pages at its
    /// ends keep their contents). The range reads as zeros afterwards, in every process that maps it.
    ///
    /// # Safety
    /// No slice over an overlapping range may be alive in this process: its bytes would change under it.
    pub unsafe fn discard(&self, off: usize, len: usize) -> io::Result<()> {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "region range out of bounds"
        );
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            off as u64,
            len as u64,
        )?;
        Ok(())
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

    /// Resident bytes of the mapping of `r` in this process, from `/proc/self/smaps`.
    fn mapped_rss(r: &Region) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{:08x}-", r.ptr.as_ptr() as usize);
        let entry = smaps.split_once(&format!("\n{head}")).expect("mapping listed").1;
        let rss = entry.lines().find_map(|l| l.strip_prefix("Rss:")).expect("Rss line");
        rss.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
    }

    #[test]
    fn a_new_region_allocates_nothing() {
        let r = Region::create("x2v-test", 256 << 20).unwrap();
        assert_eq!(r.resident_bytes().unwrap(), 0);
        assert_eq!(mapped_rss(&r), 0);
    }

    #[test]
    fn discarding_frees_the_pages_in_every_mapping() {
        const LEN: usize = 8 << 20;
        let a = Region::create("x2v-test", LEN).unwrap();
        let (s1, s2) = UnixStream::pair().unwrap();
        send_fd(&s1, a.fd()).unwrap();
        let b = Region::from_fd(recv_fd(&s2).unwrap()).unwrap();
        // SAFETY: test-local regions; no other views exist.
        unsafe { b.slice_mut(0, LEN).fill(7) };
        assert_eq!(a.resident_bytes().unwrap(), LEN as u64);
        assert_eq!(mapped_rss(&b), LEN as u64);

        // SAFETY: the views above are gone.
        unsafe { a.discard(0, LEN).unwrap() };
        assert_eq!(a.resident_bytes().unwrap(), 0);
        assert_eq!(mapped_rss(&a), 0);
        assert_eq!(mapped_rss(&b), 0);
        assert_eq!(b.len(), LEN, "the peer's mapping keeps its size");
        // SAFETY: as above.
        assert!(unsafe { b.slice(0, 4096) }.iter().all(|&x| x == 0));

        // The range is usable again, and shared again.
        // SAFETY: as above.
        unsafe { b.slice_mut(LEN - 3, 3).copy_from_slice(b"x2v") };
        // SAFETY: as above.
        assert_eq!(unsafe { a.slice(LEN - 3, 3) }, b"x2v");
        // Only the two pages touched since (one read, one written) hold memory.
        assert!(a.resident_bytes().unwrap() <= 2 * 4096);
    }

    #[test]
    fn a_plain_byte_is_not_a_descriptor() {
        use std::io::Write;
        let (mut s1, s2) = UnixStream::pair().unwrap();
        s1.write_all(b"F").unwrap();
        assert!(recv_fd(&s2).is_err());
    }
}
