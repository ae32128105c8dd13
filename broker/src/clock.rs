//! Time as the broker sees it: milliseconds since the Unix epoch, from the system clock, or —
//! for tests of timers under Tokio's paused time — from Tokio's clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where timestamps come from.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// The system clock (production).
    System,
    /// `base_ms` plus the Tokio time elapsed since `base`: follows `tokio::time::pause` and
    /// `advance`, so timer tests need no sleeps.
    Tokio {
        base_ms: u64,
        base: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `base_ms` now and advances with Tokio's time.
    pub fn tokio(base_ms: u64) -> Clock {
        Clock::Tokio {
            base_ms,
            base: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => now_ms(),
            Clock::Tokio { base_ms, base } => base_ms + base.elapsed().as_millis() as u64,
        }
    }

    /// The Tokio instant at which this clock will read `at_ms` (now, if that has passed).
    pub fn instant_at(&self, at_ms: u64) -> tokio::time::Instant {
        let wait = at_ms.saturating_sub(self.now_ms());
        tokio::time::Instant::now() + Duration::from_millis(wait)
    }
}
