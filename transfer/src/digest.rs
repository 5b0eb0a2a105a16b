//! The chunked SHA-256 that checks every tensor end to end, and the thread pool that computes it.
//!
//! A tensor of `byte_len` bytes is cut into leaves of `leaf_bytes` (the last one shorter, a tensor of
//! zero bytes has no leaf). Each leaf's digest is plain SHA-256 of its bytes, so leaves can be hashed
//! on as many cores as there are, in any order, as soon as their bytes are in place. The tensor's
//! **root** binds them together:
//!
//! ```text
//! leaf[i] = SHA-256(bytes[i*L .. min((i+1)*L, byte_len)])
//! root    = SHA-256("x2v-transfer/chunked-sha256/v1" | u64le L | u64le byte_len | leaf[0] | leaf[1] | …)
//! ```
//!
//! The domain tag keeps a root from ever being mistaken for the plain SHA-256 of some bytes; the leaf
//! size and length make the leaf list unambiguous. The leaf size travels with the manifest (wire field
//! `leaf_bytes`, between [`MIN_LEAF_BYTES`] and [`MAX_LEAF_BYTES`], a power of two), so it can change
//! without breaking peers; writers use [`LEAF_BYTES`].

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{Scope, ScopedJoinHandle};

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Sha = [u8; 32];

/// Leaf size writers use: large enough that a thread hand-off is noise next to hashing it, small
/// enough that a Phase1/Phase2 payload (a few MiB) spreads over every core.
pub const LEAF_BYTES: u32 = 1 << 20;
/// Smallest leaf size a receiver accepts (bounds the work and the digest list a writer can demand).
pub const MIN_LEAF_BYTES: u32 = 4 << 10;
/// Largest leaf size a receiver accepts.
pub const MAX_LEAF_BYTES: u32 = 64 << 20;

/// Domain-separation tag at the start of every root's input.
const ROOT_TAG: &[u8] = b"x2v-transfer/chunked-sha256/v1";

/// Checks a leaf size announced by a peer.
pub fn check_leaf_bytes(leaf_bytes: u32) -> Result<(), String> {
    if !leaf_bytes.is_power_of_two() || !(MIN_LEAF_BYTES..=MAX_LEAF_BYTES).contains(&leaf_bytes) {
        return Err(format!(
            "leaf size {leaf_bytes} is not a power of two in {MIN_LEAF_BYTES}..={MAX_LEAF_BYTES}"
        ));
    }
    Ok(())
}

/// How many leaves a tensor of `byte_len` bytes has.
pub fn leaf_count(byte_len: u64, leaf_bytes: u32) -> u64 {
    byte_len.div_ceil(u64::from(leaf_bytes))
}

/// SHA-256 of one leaf.
pub fn leaf(bytes: &[u8]) -> Sha {
    Sha256::digest(bytes).into()
}

/// The root over a tensor's leaf digests, in order.
pub fn root(leaf_bytes: u32, byte_len: u64, leaves: &[Sha]) -> Sha {
    let mut h = Sha256::new();
    h.update(ROOT_TAG);
    h.update(u64::from(leaf_bytes).to_le_bytes());
    h.update(byte_len.to_le_bytes());
    for l in leaves {
        h.update(l);
    }
    h.finalize().into()
}

/// Every leaf digest of `bytes`, on this thread.
pub fn leaves(bytes: &[u8], leaf_bytes: u32) -> Vec<Sha> {
    bytes.chunks(leaf_bytes as usize).map(leaf).collect()
}

/// The root of `bytes`, on this thread.
pub fn chunked_sha256(bytes: &[u8], leaf_bytes: u32) -> Sha {
    root(leaf_bytes, bytes.len() as u64, &leaves(bytes, leaf_bytes))
}

/// Threads to hash on when nothing says otherwise: every core the process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// The leaves of several tensors hashed on up to `threads` threads (this one included): `out[t][i]`
/// is leaf `i` of `tensors[t]`.
pub fn leaves_parallel(tensors: &[&[u8]], leaf_bytes: u32, threads: usize) -> Vec<Vec<Sha>> {
    let queue = LeafQueue::new(tensors.iter().copied(), leaf_bytes);
    std::thread::scope(|s| {
        let helpers = queue.spawn(s, threads.saturating_sub(1));
        queue.finish(helpers)
    })
}

/// A fixed list of leaves, in the order their bytes move, that any number of threads hash together:
/// each takes the next unclaimed leaf, so hashers run alongside the writer (or the reader) instead
/// of waiting for it.
pub(crate) struct LeafQueue<'a> {
    /// `(tensor, bytes)` per leaf, tensor by tensor, leaves in order.
    jobs: Vec<(usize, &'a [u8])>,
    tensors: usize,
    next: AtomicUsize,
    stop: AtomicBool,
}

/// A hashing thread's work: `(leaf job index, digest)`.
type Done = Vec<(usize, Sha)>;

impl<'a> LeafQueue<'a> {
    pub fn new(tensors: impl ExactSizeIterator<Item = &'a [u8]>, leaf_bytes: u32) -> Self {
        let n = tensors.len();
        let jobs = tensors
            .enumerate()
            .flat_map(|(t, data)| data.chunks(leaf_bytes as usize).map(move |b| (t, b)))
            .collect();
        LeafQueue { jobs, tensors: n, next: AtomicUsize::new(0), stop: AtomicBool::new(false) }
    }

    /// Starts `threads` hashers (never more than there are leaves).
    pub fn spawn<'scope, 'env>(
        &'scope self,
        s: &'scope Scope<'scope, 'env>,
        threads: usize,
    ) -> Vec<ScopedJoinHandle<'scope, Done>>
    where
        'a: 'scope,
    {
        (0..threads.min(self.jobs.len())).map(|_| s.spawn(|| self.work())).collect()
    }

    /// Hashes unclaimed leaves until none is left (or [`LeafQueue::stop`]).
    fn work(&self) -> Done {
        let mut done = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(_, bytes)) = self.jobs.get(i) else { break };
            done.push((i, leaf(bytes)));
        }
        done
    }

    /// Makes every hasher stop after its current leaf (the transfer failed).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Helps with what is left on this thread, waits for the hashers, and returns every tensor's
    /// leaf digests (incomplete if stopped).
    pub fn finish(&self, helpers: Vec<ScopedJoinHandle<'_, Done>>) -> Vec<Vec<Sha>> {
        let mut all = vec![None; self.jobs.len()];
        let mine = self.work();
        for (i, d) in helpers
            .into_iter()
            .flat_map(|h| h.join().expect("a hashing thread panicked"))
            .chain(mine)
        {
            all[i] = Some(d);
        }
        let mut out = vec![Vec::new(); self.tensors];
        for ((t, _), d) in self.jobs.iter().zip(all) {
            if let Some(d) = d {
                out[*t].push(d);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: Sha) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)).collect()
    }

    /// The definition spelled out with bare SHA-256 calls, independently of the code under test.
    fn by_hand(data: &[u8], leaf_bytes: usize) -> Sha {
        let mut input = b"x2v-transfer/chunked-sha256/v1".to_vec();
        input.extend_from_slice(&(leaf_bytes as u64).to_le_bytes());
        input.extend_from_slice(&(data.len() as u64).to_le_bytes());
        let mut at = 0;
        while at < data.len() {
            let end = (at + leaf_bytes).min(data.len());
            input.extend_from_slice(&Sha256::digest(&data[at..end]));
            at = end;
        }
        Sha256::digest(&input).into()
    }

    #[test]
    fn known_answers() {
        // Computed with Python's hashlib from the definition in the module documentation.
        let cases: [(&[u8], u32, &str); 5] = [
            (
                b"abc",
                LEAF_BYTES,
                "c45fdb4751c86c1f84645d8454f11dce687f987ff591b4564801d4e4a79bff3b",
            ),
            (&[], 4096, "fde0720ecfb2e83d8c7d6115140dc97444a1c12b3f224da85e73294215943d23"),
            (
                &pattern(4096),
                4096,
                "1c7f54ce19095360a62e344bdd6155968198399c7561559b9e12e45561451561",
            ),
            (
                &pattern(4097),
                4096,
                "9f59cd7d55cc5cbeb72f095737d2ff1abde645fe9a4179f246e89da64bc8ecab",
            ),
            (
                &pattern(3 * 4096 + 5),
                4096,
                "ab4df951128f9f05360b8739a41fc4b70088e13c7b9b0a2f2ca5f6db31f89370",
            ),
        ];
        for (data, leaf_bytes, want) in cases {
            assert_eq!(hex(chunked_sha256(data, leaf_bytes)), want, "{} bytes", data.len());
            assert_eq!(chunked_sha256(data, leaf_bytes), by_hand(data, leaf_bytes as usize));
        }
    }

    #[test]
    fn leaf_boundaries() {
        let l = 4096u32;
        for (n, count) in [(0, 0), (1, 1), (4095, 1), (4096, 1), (4097, 2), (8192, 2), (8193, 3)] {
            let data = pattern(n);
            assert_eq!(leaf_count(n as u64, l), count, "{n} bytes");
            let ls = leaves(&data, l);
            assert_eq!(ls.len() as u64, count);
            // The last leaf covers only what is left.
            if let Some(last) = ls.last() {
                let tail = (n - 1) / l as usize * l as usize;
                assert_eq!(*last, leaf(&data[tail..]));
            }
            assert_eq!(chunked_sha256(&data, l), by_hand(&data, l as usize));
        }
        // One leaf is not the plain SHA-256 of the bytes, and the leaf size is part of the root.
        let one = pattern(100);
        assert_ne!(chunked_sha256(&one, l), leaf(&one));
        assert_ne!(chunked_sha256(&one, l), chunked_sha256(&one, 2 * l));
        // Moving a byte across a leaf boundary changes the root.
        let mut moved = pattern(8192);
        moved.swap(4095, 4096);
        assert_ne!(chunked_sha256(&moved, l), chunked_sha256(&pattern(8192), l));
    }

    #[test]
    fn parallel_equals_sequential() {
        let a = pattern(5 * 4096 + 17);
        let b = pattern(1);
        let c: Vec<u8> = Vec::new();
        let d = pattern(64 * 4096);
        let tensors: [&[u8]; 4] = [&a, &b, &c, &d];
        for threads in [0, 1, 2, 3, 8, 200] {
            let got = leaves_parallel(&tensors, 4096, threads);
            let want: Vec<Vec<Sha>> = tensors.iter().map(|t| leaves(t, 4096)).collect();
            assert_eq!(got, want, "{threads} threads");
        }
    }

    #[test]
    fn a_stopped_queue_ends_early() {
        let data = pattern(64 * 4096);
        let queue = LeafQueue::new([&data[..]].into_iter(), 4096);
        queue.stop();
        let out = std::thread::scope(|s| {
            let helpers = queue.spawn(s, 4);
            queue.finish(helpers)
        });
        assert!(out[0].is_empty());
    }

    #[test]
    fn leaf_sizes_are_bounded() {
        for ok in [MIN_LEAF_BYTES, LEAF_BYTES, MAX_LEAF_BYTES] {
            assert!(check_leaf_bytes(ok).is_ok(), "{ok}");
        }
        for bad in [0, 1, MIN_LEAF_BYTES / 2, MIN_LEAF_BYTES + 1, 3 << 20, MAX_LEAF_BYTES * 2] {
            assert!(check_leaf_bytes(bad).is_err(), "{bad}");
        }
        assert!(default_threads() >= 1);
    }
}
