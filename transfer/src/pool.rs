//! The receive pool: one pre-faulted shared region, carved into leases by a first-fit allocator.
//!
//! Every byte a peer sends lands in a lease, never in a fresh allocation. A full pool is backpressure:
//! a reservation waits (bounded by the operation's deadline and the configured wait) for leases to be
//! released, then fails with `Overloaded`. This is the crate's second `unsafe` corner: handing out
//! slices of the region for the ranges the allocator owns exclusively.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::conn::{Ctx, POLL};
use crate::error::{Result, TransferError};
use crate::region::Region;

/// Every tensor starts on a page boundary: good for DMA and for any dtype's alignment.
pub const ALIGN: usize = 4096;

fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A shared, pre-faulted receive pool.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    region: Region,
    free: Mutex<BTreeMap<usize, usize>>,
    released: Condvar,
}

impl Pool {
    /// Creates and pre-faults a pool of `capacity` bytes (rounded up to a page).
    pub fn new(name: &str, capacity: usize) -> io::Result<Pool> {
        let capacity = align_up(capacity);
        let region = Region::create(name, capacity)?;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Ok(Pool {
            inner: Arc::new(Inner { region, free: Mutex::new(free), released: Condvar::new() }),
        })
    }

    pub fn capacity(&self) -> usize {
        self.inner.region.len()
    }

    /// Bytes not leased right now.
    pub fn free_bytes(&self) -> usize {
        self.lock().values().sum()
    }

    pub fn region(&self) -> &Region {
        &self.inner.region
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<usize, usize>> {
        self.inner.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves one page-aligned part per size, contiguously. Waits up to `max_wait` (and never past the
    /// deadline) for room; too big for the whole pool fails at once.
    pub fn reserve(&self, sizes: &[u64], ctx: &Ctx, max_wait: Duration) -> Result<Lease> {
        let mut parts = Vec::with_capacity(sizes.len());
        let mut total = 0usize;
        for &s in sizes {
            let s = usize::try_from(s)
                .map_err(|_| TransferError::Invalid(format!("tensor of {s} bytes")))?;
            parts.push((total, s));
            total = total
                .checked_add(align_up(s).max(ALIGN))
                .ok_or_else(|| TransferError::Invalid("size overflow".into()))?;
        }
        if total > self.capacity() {
            return Err(TransferError::TooLarge {
                requested: total as u64,
                limit: self.capacity() as u64,
                what: "receive pool capacity",
            });
        }
        let start = Instant::now();
        let mut free = self.lock();
        loop {
            if let Some((&off, &len)) = free.iter().find(|&(_, &len)| len >= total) {
                free.remove(&off);
                if len > total {
                    free.insert(off + total, len - total);
                }
                return Ok(Lease { pool: self.clone(), off, len: total, parts });
            }
            let waited = start.elapsed();
            if ctx.cancel.is_cancelled() {
                return Err(TransferError::Cancelled { during: "waiting for pool space" });
            }
            if waited >= max_wait || ctx.remaining().is_zero() {
                return Err(TransferError::Overloaded {
                    needed: total as u64,
                    free: free.values().sum::<usize>() as u64,
                    capacity: self.capacity() as u64,
                    waited,
                });
            }
            let tick =
                POLL.min(max_wait - waited).min(ctx.remaining()).max(Duration::from_millis(1));
            free =
                self.inner.released.wait_timeout(free, tick).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn release(&self, off: usize, len: usize) {
        let mut free = self.lock();
        let (mut off, mut len) = (off, len);
        if let Some((&next, &next_len)) = free.range(off + len..).next()
            && next == off + len
        {
            free.remove(&next);
            len += next_len;
        }
        if let Some((&prev, &prev_len)) = free.range(..off).next_back()
            && prev + prev_len == off
        {
            free.remove(&prev);
            off = prev;
            len += prev_len;
        }
        free.insert(off, len);
        drop(free);
        self.inner.released.notify_all();
    }
}

/// An exclusive, contiguous piece of the pool holding one part per tensor. Released on drop.
#[derive(Debug)]
pub struct Lease {
    pool: Pool,
    off: usize,
    len: usize,
    parts: Vec<(usize, usize)>,
}

impl Lease {
    /// Absolute offset of part `i` in the pool region (what a shm writer is told).
    pub fn part_offset(&self, i: usize) -> usize {
        self.off + self.parts[i].0
    }

    /// Absolute offset of the whole lease.
    pub fn offset(&self) -> usize {
        self.off
    }

    /// Bytes spanned, alignment padding included.
    pub fn span(&self) -> usize {
        self.len
    }

    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Part `i`, read-only.
    pub fn part(&self, i: usize) -> &[u8] {
        let (rel, len) = self.parts[i];
        // SAFETY: the range lies inside this lease, which the allocator gave to nobody else, and `&self`
        // excludes the `&mut` views of `parts_mut`.
        unsafe { self.pool.inner.region.slice(self.off + rel, len) }
    }

    /// Every part, mutably and disjointly.
    pub fn parts_mut(&mut self) -> Vec<&mut [u8]> {
        let region = &self.pool.inner.region;
        self.parts
            .iter()
            // SAFETY: parts are disjoint ranges of this exclusively owned lease, and `&mut self` keeps
            // any other view of them from existing while these slices live.
            .map(|&(rel, len)| unsafe { region.slice_mut(self.off + rel, len) })
            .collect()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.off, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::CancelFlag;

    fn ctx(secs: u64) -> Ctx {
        Ctx::new("test", Instant::now() + Duration::from_secs(secs), CancelFlag::default())
    }

    #[test]
    fn leases_are_disjoint_and_coalesce_on_release() {
        let pool = Pool::new("x2v-pool-test", 64 * 1024).unwrap();
        let mut a = pool.reserve(&[10, 5000], &ctx(10), Duration::ZERO).unwrap();
        let b = pool.reserve(&[1], &ctx(10), Duration::ZERO).unwrap();
        assert_eq!(a.span(), 3 * ALIGN);
        assert_eq!(b.offset(), 3 * ALIGN);
        for p in a.parts_mut() {
            p.fill(9);
        }
        assert_eq!(a.part(1).len(), 5000);
        assert!(a.part(0).iter().all(|&x| x == 9));
        drop(a);
        drop(b);
        assert_eq!(pool.free_bytes(), 64 * 1024);
        let whole = pool.reserve(&[64 * 1024], &ctx(10), Duration::ZERO).unwrap();
        assert_eq!(whole.offset(), 0);
    }

    #[test]
    fn exhaustion_is_backpressure_then_overloaded() {
        let pool = Pool::new("x2v-pool-test", 8 * ALIGN).unwrap();
        let held = pool.reserve(&[(6 * ALIGN) as u64], &ctx(10), Duration::ZERO).unwrap();
        let err =
            pool.reserve(&[(4 * ALIGN) as u64], &ctx(10), Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, TransferError::Overloaded { .. }), "{err}");
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || {
            p2.reserve(&[(4 * ALIGN) as u64], &ctx(60), Duration::from_secs(60))
        });
        drop(held);
        assert_eq!(waiter.join().unwrap().unwrap().span(), 4 * ALIGN);
        let err =
            pool.reserve(&[(9 * ALIGN) as u64], &ctx(10), Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, TransferError::TooLarge { .. }), "{err}");
    }
}
