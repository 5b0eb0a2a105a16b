//! Per-key token-bucket rate limiting and constant-time API-key checks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;
use x2v_core::Secret;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Token buckets, one per caller.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` requests per second sustained, `burst` at once; a rate of 0 disables limiting.
    pub fn new(rate: f64, burst: u32) -> Self {
        RateLimiter { rate, burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// Takes a token for `key`, or says how many whole seconds until one is available.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// Index of the configured key equal to `given`, compared in constant time (digests, so lengths
/// leak nothing, and every key is compared).
pub fn match_key(keys: &[Secret], given: &str) -> Option<usize> {
    let g = Sha256::digest(given.as_bytes());
    let mut found = None;
    for (i, k) in keys.iter().enumerate() {
        if bool::from(Sha256::digest(k.expose().as_bytes()).ct_eq(&g)) {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let l = RateLimiter::new(0.5, 2);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        assert_eq!(l.check("a"), Err(2));
        assert!(l.check("b").is_ok(), "buckets are per key");
        assert!(RateLimiter::new(0.0, 0).check("a").is_ok());
    }

    #[test]
    fn keys_match_exactly() {
        let keys = vec![Secret::from("sk-one"), Secret::from("sk-two")];
        assert_eq!(match_key(&keys, "sk-two"), Some(1));
        assert_eq!(match_key(&keys, "sk-tw"), None);
        assert_eq!(match_key(&keys, ""), None);
    }
}
