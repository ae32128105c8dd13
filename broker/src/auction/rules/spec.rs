//! What an admin defines for an auction (`AuctionSpec`: prices, increments by price band,
//! reserve, times, soft close, buy-now, required role) and the checks it must pass.

use serde::{Deserialize, Serialize};

/// The largest amount accepted, in minor units (10^15: ten trillion in a two-decimal currency),
/// so sums and increments can never overflow an i64.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// The latest time an auction may end: 9999-12-31T23:59:59.999Z, in ms since the Unix epoch
/// (far from any overflow of the soft-close arithmetic and of clock offsets).
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// The longest soft-close window and extension: a day.
pub const MAX_SOFT_CLOSE_MS: u64 = 86_400_000;

/// How much a bid must exceed the current price by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Increment {
    /// The same step at every price.
    Fixed(i64),
    /// A step per price band: the step of the last tier whose `from` is at most the price.
    Tiers(Vec<Tier>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub from: i64,
    pub step: i64,
}

/// Soft close: a bid within the last `window_ms` moves the end to now + `extend_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftClose {
    /// 0 disables soft close.
    pub window_ms: u64,
    pub extend_ms: u64,
}

/// What an admin defines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuctionSpec {
    pub id: String,
    pub title: String,
    /// ISO 4217 code, e.g. `EUR`; amounts are in its minor unit.
    pub currency: String,
    pub starting_price: i64,
    pub increment: Increment,
    /// Below this final price there is no winner. Never shown to bidders, only whether it is met.
    #[serde(default)]
    pub reserve: Option<i64>,
    pub starts_at: u64,
    pub ends_at: u64,
    #[serde(default)]
    pub soft_close: SoftClose,
    /// A bid of at least this much, while the next minimum bid is not above it, is placed at
    /// exactly this price and ends the auction at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buy_now: Option<i64>,
    /// Only bidders whose token carries this role (or `admin`) may bid, e.g. `verified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_role: Option<String>,
}

/// Why a spec or an admin operation is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Invalid(String),
    #[error("the auction is {0}: {1}")]
    WrongStatus(&'static str, &'static str),
}

impl AuctionSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: &str| Err(SpecError::Invalid(m.to_owned()));
        if gavel_protocol::Channel::auction(&self.id).is_err() {
            return bad("id must be 1 to 64 characters from A-Z a-z 0-9 - _ .");
        }
        if self.title.is_empty() || self.title.len() > 200 {
            return bad("title must be 1 to 200 bytes");
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad("currency must be an ISO 4217 code such as EUR");
        }
        if !(1..=MAX_AMOUNT).contains(&self.starting_price) {
            return bad("starting_price must be between 1 and 10^15 minor units");
        }
        match &self.increment {
            Increment::Fixed(step) if !(1..=MAX_AMOUNT).contains(step) => {
                return bad("the increment must be between 1 and 10^15");
            }
            Increment::Tiers(tiers) => {
                if tiers.is_empty() || tiers.len() > 64 {
                    return bad("give 1 to 64 increment tiers");
                }
                if tiers[0].from > self.starting_price {
                    return bad("the first tier must start at or below the starting price");
                }
                if tiers.windows(2).any(|w| w[0].from >= w[1].from) {
                    return bad("tiers must be in increasing order of `from`");
                }
                if tiers.iter().any(|t| !(1..=MAX_AMOUNT).contains(&t.step)) {
                    return bad("every tier's step must be between 1 and 10^15");
                }
            }
            Increment::Fixed(_) => {}
        }
        if self.reserve.is_some_and(|r| !(1..=MAX_AMOUNT).contains(&r)) {
            return bad("reserve must be between 1 and 10^15");
        }
        if self.ends_at <= self.starts_at {
            return bad("ends_at must be after starts_at");
        }
        if self.ends_at > MAX_TIME_MS {
            return bad("ends_at must be before the year 10000");
        }
        if self.soft_close.window_ms > 0 && self.soft_close.extend_ms == 0 {
            return bad("a soft-close window needs an extend_ms above 0");
        }
        if self.soft_close.window_ms > MAX_SOFT_CLOSE_MS
            || self.soft_close.extend_ms > MAX_SOFT_CLOSE_MS
        {
            return bad("window_ms and extend_ms must be at most 86400000 (a day)");
        }
        if let Some(buy_now) = self.buy_now {
            if buy_now < self.starting_price || buy_now > MAX_AMOUNT {
                return bad("buy_now must be between the starting price and 10^15");
            }
            if self.reserve.is_some_and(|r| buy_now < r) {
                return bad("buy_now must be at or above the reserve");
            }
        }
        if let Some(role) = &self.required_role {
            let valid =
                |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
            if role.is_empty() || role.len() > 64 || !role.bytes().all(valid) {
                return bad("required_role must be 1 to 64 of a-z 0-9 _ -");
            }
        }
        Ok(())
    }

    pub(super) fn step_at(&self, price: i64) -> i64 {
        match &self.increment {
            Increment::Fixed(step) => *step,
            Increment::Tiers(tiers) => tiers
                .iter()
                .rev()
                .find(|t| t.from <= price)
                .or(tiers.first())
                .map_or(1, |t| t.step),
        }
    }
}
