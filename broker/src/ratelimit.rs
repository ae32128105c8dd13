//! Per-user token buckets (for bids): `rate` tokens a second, up to `burst`; a bid takes one.

use dashmap::DashMap;
use gavel_protocol::UserId;

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: DashMap<UserId, Bucket>,
}

struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: DashMap::new(),
        }
    }

    /// Takes a token for `user` at `now_ms`; false when the bucket is empty.
    pub fn allow(&self, user: &UserId, now_ms: u64) -> bool {
        let mut bucket = self.buckets.entry(user.clone()).or_insert(Bucket {
            tokens: self.burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at_ms = now_ms;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled completely: they behave exactly like new ones.
    pub fn prune(&self, now_ms: u64) {
        let refill_ms = (self.burst / self.per_second.max(f64::MIN_POSITIVE) * 1000.0) as u64;
        self.buckets
            .retain(|_, b| now_ms.saturating_sub(b.at_ms) < refill_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let u = UserId::parse("u").unwrap();
        assert!((0..3).all(|_| limiter.allow(&u, 1000)));
        assert!(!limiter.allow(&u, 1000));
        assert!(
            limiter.allow(&u, 1500),
            "one token back after half a second at 2/s"
        );
        assert!(!limiter.allow(&u, 1500));
        let other = UserId::parse("v").unwrap();
        assert!(limiter.allow(&other, 1500), "buckets are per user");
        limiter.prune(100_000);
        assert!(limiter.buckets.is_empty());
    }
}
