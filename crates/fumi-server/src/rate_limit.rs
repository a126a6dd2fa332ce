//! Token-bucket rate limits, kept in memory per key (a device, or a client address).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// A set of token buckets: each key may spend `per_minute` requests a minute, in bursts of up to
/// `per_minute`.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_minute: u32,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter allowing `per_minute` requests a minute per key; 0 disables the limit.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Spends one token for `key`; false if none is left.
    pub fn check(&self, key: &K, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let capacity = f64::from(self.per_minute);
        let refill_per_sec = capacity / 60.0;
        let mut buckets = self.buckets.lock().expect("rate limiter lock poisoned");
        if buckets.len() > 100_000 {
            // Full buckets carry no state worth keeping.
            buckets
                .retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * refill_per_sec < capacity);
        }
        let (tokens, at) = buckets.entry(key.clone()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * refill_per_sec).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refuses_after_burst_and_refills() {
        let limiter = RateLimiter::new(60);
        let start = Instant::now();
        assert!((0..60).all(|_| limiter.check(&"a", start)));
        assert!(!limiter.check(&"a", start));
        assert!(limiter.check(&"b", start), "keys are independent");
        assert!(
            limiter.check(&"a", start + Duration::from_secs(1)),
            "one token a second"
        );
        assert!(!limiter.check(&"a", start + Duration::from_secs(1)));
    }
}
