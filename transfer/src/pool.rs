//! The receive pool: one shared region, carved into leases by a first-fit allocator.
//!
//! Every byte a peer sends lands in a lease, never in a fresh allocation. The region is sparse: a page
//! costs memory from the moment a transfer writes it until the pool gives it back to the kernel after
//! its lease is released, so a process holds about as much pool memory as it holds received payloads.
//! A full pool is backpressure: a reservation waits (bounded by the operation's deadline and the
//! configured wait) for leases to be released, then fails with `Overloaded`. This is the crate's second `unsafe` corner: handing out
//! slices of the region for the ranges the allocator owns exclusively.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::conn::{Ctx, POLL};
use crate::error::{Result, TransferError};
use crate::region::Region;

/// Every tensor starts on a page boundary: good for DMA and for any dtype's alignment.
pub const ALIGN: usize = 4096;

/// Longest a pool that keeps pages warm waits before it checks whether it went quiet.
const TRIM_TICK: Duration = Duration::from_millis(250);

fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A shared receive pool whose memory follows the leases it has out.
///
/// Released pages can be kept warm: a fresh page costs a fault and zeroing, several times the copy that
/// fills it, so back-to-back transfers reuse the pages of the last one. They are given back once the
/// pool has seen no reservation or release for `keep_warm` (or at once when it is zero).
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    region: Region,
    state: Mutex<State>,
    released: Condvar,
    keep_warm: Duration,
}

#[derive(Debug)]
struct State {
    /// Free ranges, offset to length, coalesced.
    free: BTreeMap<usize, usize>,
    /// Some free range may still hold memory.
    warm: bool,
    /// Last reservation or release: warm pages are kept while the pool is this busy.
    last_activity: Instant,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives back the memory of every free range. The lock keeps the free list from changing meanwhile.
    fn discard_free(&self, state: &mut State) {
        for (&off, &len) in &state.free {
            // SAFETY: a free range belongs to no lease, so no slice of it exists in this process, and
            // holding the lock keeps it from being leased until this returns.
            if let Err(e) = unsafe { self.region.discard(off, len) } {
                tracing::warn!(error = %e, bytes = len, "cannot give free pool pages back");
            }
        }
        state.warm = false;
    }
}

impl Pool {
    /// Creates a pool of `capacity` bytes (rounded up to a page). No memory is allocated until a lease
    /// is written; released pages stay allocated until the pool has been quiet for `keep_warm`.
    pub fn new(name: &str, capacity: usize, keep_warm: Duration) -> io::Result<Pool> {
        let capacity = align_up(capacity);
        let region = Region::create(name, capacity)?;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        let state = State { free, warm: false, last_activity: Instant::now() };
        let inner = Arc::new(Inner {
            region,
            state: Mutex::new(state),
            released: Condvar::new(),
            keep_warm,
        });
        if !keep_warm.is_zero() {
            spawn_trimmer(Arc::downgrade(&inner))?;
        }
        Ok(Pool { inner })
    }

    pub fn capacity(&self) -> usize {
        self.inner.region.len()
    }

    /// Bytes not leased right now.
    pub fn free_bytes(&self) -> usize {
        self.lock().free.values().sum()
    }

    /// Bytes of the pool backed by memory now: leased pages that were written, plus released pages kept
    /// warm.
    pub fn resident_bytes(&self) -> u64 {
        self.inner.region.resident_bytes().unwrap_or(0)
    }

    /// Gives back the memory of every page not leased right now, without waiting for the pool to go
    /// quiet.
    pub fn trim(&self) {
        let mut state = self.lock();
        self.inner.discard_free(&mut state);
    }

    pub fn region(&self) -> &Region {
        &self.inner.region
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Reserves one page-aligned part per size, contiguously. Waits up to `max_wait` (and never past the
    /// deadline) for room; too big for the whole pool fails at once.
    pub fn reserve(&self, sizes: &[u64], ctx: &Ctx, max_wait: Duration) -> Result<Lease> {
        let (parts, total) = self.layout(sizes)?;
        let start = Instant::now();
        let mut state = self.lock();
        loop {
            // First fit from the lowest offset: successive transfers land on the pages the last one
            // warmed.
            if let Some((&off, &len)) = state.free.iter().find(|&(_, &len)| len >= total) {
                state.free.remove(&off);
                if len > total {
                    state.free.insert(off + total, len - total);
                }
                state.last_activity = Instant::now();
                return Ok(Lease { pool: self.clone(), off, len: total, parts });
            }
            let waited = start.elapsed();
            if ctx.cancel.is_cancelled() {
                return Err(TransferError::Cancelled { during: "waiting for pool space" });
            }
            if waited >= max_wait || ctx.remaining().is_zero() {
                return Err(TransferError::Overloaded {
                    needed: total as u64,
                    free: state.free.values().sum::<usize>() as u64,
                    capacity: self.capacity() as u64,
                    waited,
                });
            }
            let tick =
                POLL.min(max_wait - waited).min(ctx.remaining()).max(Duration::from_millis(1));
            state =
                self.inner.released.wait_timeout(state, tick).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Where each part goes relative to the lease, and the lease's span; too big for the pool is an
    /// error.
    fn layout(&self, sizes: &[u64]) -> Result<(Vec<(usize, usize)>, usize)> {
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
        Ok((parts, total))
    }

    fn release(&self, off: usize, len: usize) {
        if self.inner.keep_warm.is_zero() {
            // Before the range is free again: afterwards a new lease could already be receiving into it.
            // SAFETY: called only from `Lease::drop`, so the lease's views of this range are gone, and
            // the allocator gives the range to nobody else until it is back in the free list below.
            if let Err(e) = unsafe { self.inner.region.discard(off, len) } {
                tracing::warn!(error = %e, bytes = len, "cannot give released pool pages back");
            }
        }
        let mut state = self.lock();
        state.warm |= !self.inner.keep_warm.is_zero();
        state.last_activity = Instant::now();
        let free = &mut state.free;
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
        drop(state);
        self.inner.released.notify_all();
    }
}

/// Gives warm pages back once the pool has been quiet for its `keep_warm`; ends with the pool.
fn spawn_trimmer(pool: Weak<Inner>) -> io::Result<()> {
    std::thread::Builder::new().name("x2v-pool-trim".into()).spawn(move || {
        loop {
            let Some(inner) = pool.upgrade() else { return };
            let tick = TRIM_TICK.min(inner.keep_warm);
            {
                let mut state = inner.lock();
                if state.warm && state.last_activity.elapsed() >= inner.keep_warm {
                    inner.discard_free(&mut state);
                }
            }
            drop(inner);
            std::thread::sleep(tick);
        }
    })?;
    Ok(())
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
        let pool = Pool::new("x2v-pool-test", 64 * 1024, Duration::ZERO).unwrap();
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
        let pool = Pool::new("x2v-pool-test", 8 * ALIGN, Duration::ZERO).unwrap();
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

    /// Writes every byte of every part, as a transfer does.
    fn fill(lease: &mut Lease) {
        for p in lease.parts_mut() {
            p.fill(1);
        }
    }

    #[test]
    fn memory_follows_the_leases_not_the_capacity() {
        let pool = Pool::new("x2v-pool-test", 256 << 20, Duration::ZERO).unwrap();
        assert_eq!(pool.resident_bytes(), 0, "an unused pool holds no memory");
        let mut a = pool.reserve(&[(64 << 20) - 100], &ctx(10), Duration::ZERO).unwrap();
        assert_eq!(pool.resident_bytes(), 0, "reserving alone allocates nothing");
        fill(&mut a);
        assert_eq!(pool.resident_bytes(), 64 << 20);
        let mut b = pool.reserve(&[1 << 20], &ctx(10), Duration::ZERO).unwrap();
        fill(&mut b);
        drop(a);
        assert_eq!(pool.resident_bytes(), 1 << 20, "a dropped lease gives its pages back");
        drop(b);
        assert_eq!(pool.resident_bytes(), 0);
    }

    #[test]
    fn warm_pages_are_reused_until_trimmed() {
        let pool = Pool::new("x2v-pool-test", 64 << 20, Duration::from_secs(3600)).unwrap();
        let mut a = pool.reserve(&[8 << 20], &ctx(10), Duration::ZERO).unwrap();
        fill(&mut a);
        drop(a);
        assert_eq!(pool.resident_bytes(), 8 << 20, "released pages stay warm");
        let mut again = pool.reserve(&[8 << 20], &ctx(10), Duration::ZERO).unwrap();
        assert_eq!(again.offset(), 0, "the next lease lands on the warm pages");
        assert!(again.part(0).iter().all(|&x| x == 1), "warm pages were not given back");
        fill(&mut again);
        assert_eq!(pool.resident_bytes(), 8 << 20, "reuse allocates nothing more");
        pool.trim();
        assert_eq!(pool.resident_bytes(), 8 << 20, "a live lease is never trimmed");
        drop(again);
        pool.trim();
        assert_eq!(pool.resident_bytes(), 0);
    }

    #[test]
    fn a_quiet_pool_gives_its_warm_pages_back() {
        let pool = Pool::new("x2v-pool-test", 16 << 20, Duration::from_millis(20)).unwrap();
        let mut a = pool.reserve(&[4 << 20], &ctx(10), Duration::ZERO).unwrap();
        fill(&mut a);
        drop(a);
        // Bounded by a generous limit, not timed: the trimmer runs every 20 ms once the pool is quiet.
        let limit = Instant::now() + Duration::from_secs(30);
        while pool.resident_bytes() > 0 && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pool.resident_bytes(), 0);
    }
}
