//! Per-key token-bucket rate limiting and constant-time API-key checks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;
use x2v_core::Secret;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::state::Caller;

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
        if !buckets.contains_key(key) {
            buckets.insert(key.to_owned(), (self.burst, now));
        }
        let (tokens, last) = buckets.get_mut(key).expect("inserted above");
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

/// The configured API keys, as digests made once, and the caller each key names.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    callers: Vec<Caller>,
    anonymous: Caller,
}

impl ApiKeys {
    pub fn new(keys: &[Secret]) -> Self {
        ApiKeys {
            digests: keys.iter().map(|k| Sha256::digest(k.expose().as_bytes()).into()).collect(),
            callers: (0..keys.len()).map(|i| Caller(format!("key{i}").into())).collect(),
            anonymous: Caller("anonymous".into()),
        }
    }

    /// Whether no key is configured (authentication is off).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The caller when authentication is off.
    pub fn anonymous(&self) -> &Caller {
        &self.anonymous
    }

    /// Index of the configured key equal to `given`, compared in constant time (digests, so
    /// lengths leak nothing, and every key is compared).
    pub fn find(&self, given: &str) -> Option<usize> {
        let g = Sha256::digest(given.as_bytes());
        let mut found = None;
        for (i, k) in self.digests.iter().enumerate() {
            if bool::from(k.ct_eq(g.as_slice())) {
                found = Some(i);
            }
        }
        found
    }

    /// The caller the key at `index` names.
    pub fn caller(&self, index: usize) -> &Caller {
        &self.callers[index]
    }
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
        let keys = ApiKeys::new(&[Secret::from("sk-one"), Secret::from("sk-two")]);
        assert_eq!(keys.find("sk-two"), Some(1));
        assert_eq!(keys.find("sk-tw"), None);
        assert_eq!(keys.find(""), None);
        assert_eq!(keys.caller(1).0.as_ref(), "key1");
    }
}
