//! Token buckets: [`TokenBucket`] (`rate` tokens a second, up to `burst`; an action takes one),
//! and [`RateLimiter`], one bucket per user (for bids).

use dashmap::DashMap;
use gavel_protocol::UserId;

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: DashMap<UserId, TokenBucket>,
}

/// One bucket, on a millisecond clock of the caller's choosing.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    at_ms: u64,
}

impl TokenBucket {
    pub fn full(burst: f64, now_ms: u64) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            at_ms: now_ms,
        }
    }

    /// Refills for the time since the last call, then takes a token if there is one.
    pub fn take(&mut self, now_ms: u64, per_second: f64, burst: f64) -> bool {
        self.take_n(now_ms, per_second, burst, 1)
    }

    /// Refills, then takes `n` tokens (at most `burst`) if there are that many.
    pub fn take_n(&mut self, now_ms: u64, per_second: f64, burst: f64, n: u32) -> bool {
        self.refill(now_ms, per_second, burst);
        let n = f64::from(n.max(1)).min(burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Tokens left after refilling to `now_ms`.
    pub fn available(&mut self, now_ms: u64, per_second: f64, burst: f64) -> f64 {
        self.refill(now_ms, per_second, burst);
        self.tokens
    }

    fn refill(&mut self, now_ms: u64, per_second: f64, burst: f64) {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.at_ms = now_ms;
    }
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
        self.buckets
            .entry(user.clone())
            .or_insert(TokenBucket::full(self.burst, now_ms))
            .take(now_ms, self.per_second, self.burst)
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
