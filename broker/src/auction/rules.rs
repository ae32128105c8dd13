//! One auction's rules as a plain state machine: what a bid must be, when the auction opens,
//! pauses, extends and closes, and who wins. Time is passed in (ms since the Unix epoch); there
//! is no IO, no clock and no locking here: one owner drives it (the actor in `auction`).

use gavel_protocol::{AuctionSnapshot, AuctionStatus, BidRejection, Ended, UserId};
use serde::{Deserialize, Serialize};

/// The largest amount accepted, in minor units (10^15: ten trillion in a two-decimal currency),
/// so sums and increments can never overflow an i64.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// The latest time an auction may end: 9999-12-31T23:59:59.999Z, in ms since the Unix epoch
/// (far from any overflow of the soft-close arithmetic and of clock offsets).
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

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

    fn step_at(&self, price: i64) -> i64 {
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

/// What changes as bids and time go by. Stored with every bid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuctionState {
    pub status: AuctionStatus,
    pub price: Option<i64>,
    pub leader: Option<UserId>,
    pub bid_count: u64,
    /// Seq of the last accepted bid: the bid log's last key.
    pub last_seq: u64,
    /// The current end (soft close moves it).
    pub ends_at: u64,
    /// While paused: how much time was left.
    pub paused_remaining_ms: Option<u64>,
    /// Set when the auction ended: the outcome, for late viewers and restarts.
    pub outcome: Option<Ended>,
}

/// An auction: its spec and its state, stored together as one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auction {
    pub spec: AuctionSpec,
    pub state: AuctionState,
}

/// A bid the rules accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub seq: u64,
    pub amount: i64,
    /// The leader this bid displaced, and their amount (for the outbid notice).
    pub outbid: Option<(UserId, i64)>,
    /// The end before this bid, if the bid extended it.
    pub extended_from: Option<u64>,
    /// The bid met the buy-now price: the auction ended with it (the changes to announce).
    pub bought: Vec<Change>,
}

/// A rejected bid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub reason: BidRejection,
    pub min_amount: Option<i64>,
    pub message: String,
}

/// A change of status caused by time or an admin, to be announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Status {
        from: AuctionStatus,
        to: AuctionStatus,
    },
    Ended(Ended),
    /// The definition changed (before the start).
    Updated,
}

impl Auction {
    pub fn new(spec: AuctionSpec) -> Auction {
        let ends_at = spec.ends_at;
        Auction {
            spec,
            state: AuctionState {
                status: AuctionStatus::Scheduled,
                price: None,
                leader: None,
                bid_count: 0,
                last_seq: 0,
                ends_at,
                paused_remaining_ms: None,
                outcome: None,
            },
        }
    }

    /// The least amount a bid may have now.
    pub fn next_min_bid(&self) -> i64 {
        match self.state.price {
            None => self.spec.starting_price,
            Some(price) => self.next_min_bid_after(price),
        }
    }

    /// The least amount a bid may have once `price` is the highest bid.
    pub fn next_min_bid_after(&self, price: i64) -> i64 {
        price.saturating_add(self.spec.step_at(price))
    }

    /// The buy-now price while it applies: set, and the next minimum bid not above it.
    pub fn buy_now_price(&self) -> Option<i64> {
        self.spec
            .buy_now
            .filter(|&price| self.next_min_bid() <= price)
            .filter(|_| {
                !matches!(
                    self.state.status,
                    AuctionStatus::Ended | AuctionStatus::Cancelled
                )
            })
    }

    /// Whether a bidder with `roles` (their token's claim; `None`: no claim) may bid here.
    pub fn admits(&self, roles: Option<&[String]>) -> bool {
        match &self.spec.required_role {
            None => true,
            Some(required) => {
                roles.is_some_and(|roles| roles.iter().any(|r| r == required || r == "admin"))
            }
        }
    }

    pub fn reserve_met(&self) -> bool {
        match self.spec.reserve {
            None => true,
            Some(reserve) => self.state.price.is_some_and(|p| p >= reserve),
        }
    }

    /// Judges a bid against the current price (call [`Auction::advance`] first) and applies it.
    pub fn place_bid(
        &mut self,
        user: &UserId,
        amount: i64,
        now: u64,
    ) -> Result<Accepted, Rejected> {
        let reject = |reason: BidRejection, message: String| Rejected {
            reason,
            min_amount: None,
            message,
        };
        match self.state.status {
            AuctionStatus::Active => {}
            AuctionStatus::Scheduled => {
                return Err(reject(
                    BidRejection::NotActive,
                    "the auction has not started".into(),
                ))
            }
            AuctionStatus::Paused => {
                return Err(reject(
                    BidRejection::NotActive,
                    "the auction is paused".into(),
                ))
            }
            AuctionStatus::Ended | AuctionStatus::Cancelled => {
                return Err(reject(
                    BidRejection::Ended,
                    format!("the auction is {}", self.state.status.as_str()),
                ))
            }
        }
        if !(1..=MAX_AMOUNT).contains(&amount) {
            return Err(reject(
                BidRejection::InvalidAmount,
                "amount must be between 1 and 10^15 minor units".into(),
            ));
        }
        let min = self.next_min_bid();
        if amount < min {
            return Err(Rejected {
                reason: BidRejection::TooLow,
                min_amount: Some(min),
                message: format!("the next bid must be at least {min}"),
            });
        }
        // At or above the buy-now price (while it applies): placed at exactly that price.
        let buy_now = self.buy_now_price().filter(|&price| amount >= price);
        let amount = buy_now.unwrap_or(amount);
        let outbid = self
            .state
            .leader
            .clone()
            .zip(self.state.price)
            .filter(|(leader, _)| leader != user);
        self.state.last_seq += 1;
        self.state.bid_count += 1;
        self.state.price = Some(amount);
        self.state.leader = Some(user.clone());
        let mut extended_from = None;
        let SoftClose {
            window_ms,
            extend_ms,
        } = self.spec.soft_close;
        let mut bought = Vec::new();
        if buy_now.is_some() {
            // Sold: the auction ends now, with this bid.
            self.state.ends_at = self.state.ends_at.min(now);
            bought = self.close(now);
        } else if window_ms > 0 && self.state.ends_at.saturating_sub(now) <= window_ms {
            let new_end = now.saturating_add(extend_ms);
            if new_end > self.state.ends_at {
                extended_from = Some(self.state.ends_at);
                self.state.ends_at = new_end;
            }
        }
        Ok(Accepted {
            seq: self.state.last_seq,
            amount,
            outbid,
            extended_from,
            bought,
        })
    }

    /// Applies what time has made due: opening at `starts_at`, closing at `ends_at`.
    pub fn advance(&mut self, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.state.status == AuctionStatus::Scheduled && now >= self.spec.starts_at {
            self.state.status = AuctionStatus::Active;
            changes.push(Change::Status {
                from: AuctionStatus::Scheduled,
                to: AuctionStatus::Active,
            });
        }
        if self.state.status == AuctionStatus::Active && now >= self.state.ends_at {
            changes.extend(self.close(now));
        }
        changes
    }

    /// When [`Auction::advance`] next has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.state.status {
            AuctionStatus::Scheduled => Some(self.spec.starts_at),
            AuctionStatus::Active => Some(self.state.ends_at),
            _ => None,
        }
    }

    fn close(&mut self, now: u64) -> Vec<Change> {
        let from = self.state.status;
        self.state.status = AuctionStatus::Ended;
        let reserve_met = self.reserve_met();
        let ended = Ended {
            auction_id: self.spec.id.clone(),
            winner: self.state.leader.clone().filter(|_| reserve_met),
            final_price: self.state.price,
            reserve_met,
            bid_count: self.state.bid_count,
            ends_at: self.state.ends_at.min(now),
            server_ts: now,
        };
        self.state.outcome = Some(ended.clone());
        vec![
            Change::Status {
                from,
                to: AuctionStatus::Ended,
            },
            Change::Ended(ended),
        ]
    }

    pub fn pause(&mut self, now: u64) -> Result<Vec<Change>, SpecError> {
        if self.state.status != AuctionStatus::Active {
            return Err(SpecError::WrongStatus(
                self.state.status.as_str(),
                "only an active auction can be paused",
            ));
        }
        self.state.paused_remaining_ms = Some(self.state.ends_at.saturating_sub(now));
        self.state.status = AuctionStatus::Paused;
        Ok(vec![Change::Status {
            from: AuctionStatus::Active,
            to: AuctionStatus::Paused,
        }])
    }

    /// Resumes with the time that was left when it was paused.
    pub fn resume(&mut self, now: u64) -> Result<Vec<Change>, SpecError> {
        if self.state.status != AuctionStatus::Paused {
            return Err(SpecError::WrongStatus(
                self.state.status.as_str(),
                "only a paused auction can be resumed",
            ));
        }
        let remaining = self.state.paused_remaining_ms.take().unwrap_or(0);
        self.state.ends_at = now.saturating_add(remaining);
        self.state.status = AuctionStatus::Active;
        Ok(vec![Change::Status {
            from: AuctionStatus::Paused,
            to: AuctionStatus::Active,
        }])
    }

    pub fn cancel(&mut self) -> Result<Vec<Change>, SpecError> {
        let from = self.state.status;
        if matches!(from, AuctionStatus::Ended | AuctionStatus::Cancelled) {
            return Err(SpecError::WrongStatus(from.as_str(), "it is already over"));
        }
        self.state.status = AuctionStatus::Cancelled;
        Ok(vec![Change::Status {
            from,
            to: AuctionStatus::Cancelled,
        }])
    }

    /// Ends now, with the current leader as winner (reserve permitting).
    pub fn end_now(&mut self, now: u64) -> Result<Vec<Change>, SpecError> {
        if !matches!(
            self.state.status,
            AuctionStatus::Active | AuctionStatus::Paused
        ) {
            return Err(SpecError::WrongStatus(
                self.state.status.as_str(),
                "only an active or paused auction can be ended",
            ));
        }
        self.state.ends_at = now;
        self.state.paused_remaining_ms = None;
        Ok(self.close(now))
    }

    /// Replaces the spec; only before the auction starts.
    pub fn update(&mut self, spec: AuctionSpec) -> Result<(), SpecError> {
        if self.state.status != AuctionStatus::Scheduled {
            return Err(SpecError::WrongStatus(
                self.state.status.as_str(),
                "only a scheduled auction can be changed",
            ));
        }
        if spec.id != self.spec.id {
            return Err(SpecError::Invalid("the id cannot change".into()));
        }
        spec.validate()?;
        self.state.ends_at = spec.ends_at;
        self.spec = spec;
        Ok(())
    }

    pub fn snapshot(&self, now: u64) -> AuctionSnapshot {
        AuctionSnapshot {
            auction_id: self.spec.id.clone(),
            title: self.spec.title.clone(),
            currency: self.spec.currency.clone(),
            status: self.state.status,
            starting_price: self.spec.starting_price,
            price: self.state.price,
            leader: self.state.leader.clone(),
            bid_count: self.state.bid_count,
            last_bid_seq: self.state.last_seq,
            next_min_bid: self.next_min_bid(),
            starts_at: self.spec.starts_at,
            ends_at: self.state.ends_at,
            reserve_met: self.reserve_met(),
            buy_now: self.buy_now_price(),
            required_role: self.spec.required_role.clone(),
            server_ts: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn spec() -> AuctionSpec {
        AuctionSpec {
            id: "a1".into(),
            title: "Lot 1".into(),
            currency: "EUR".into(),
            starting_price: 1000,
            increment: Increment::Fixed(100),
            reserve: None,
            starts_at: 1_000,
            ends_at: 100_000,
            soft_close: SoftClose::default(),
            buy_now: None,
            required_role: None,
        }
    }

    fn active(spec: AuctionSpec) -> Auction {
        let mut a = Auction::new(spec);
        a.advance(1_000);
        assert_eq!(a.state.status, AuctionStatus::Active);
        a
    }

    #[test]
    fn bids_must_meet_the_next_minimum_and_equal_amounts_lose() {
        let mut a = active(spec());
        let too_low = a.place_bid(&user("x"), 999, 2_000).unwrap_err();
        assert_eq!(
            (too_low.reason, too_low.min_amount),
            (BidRejection::TooLow, Some(1000))
        );
        assert_eq!(a.place_bid(&user("x"), 1000, 2_000).unwrap().seq, 1);
        let equal = a.place_bid(&user("y"), 1000, 2_001).unwrap_err();
        assert_eq!(
            (equal.reason, equal.min_amount),
            (BidRejection::TooLow, Some(1100))
        );
        let second = a.place_bid(&user("y"), 1100, 2_002).unwrap();
        assert_eq!(second.outbid, Some((user("x"), 1000)));
        assert_eq!(
            (a.state.bid_count, a.state.last_seq, a.state.price),
            (2, 2, Some(1100))
        );
        // Raising your own bid does not outbid yourself.
        assert_eq!(a.place_bid(&user("y"), 1200, 2_003).unwrap().outbid, None);
    }

    #[test]
    fn invalid_amounts_write_nothing() {
        let mut a = active(spec());
        for amount in [0, -5, MAX_AMOUNT + 1, i64::MAX, i64::MIN] {
            let r = a.place_bid(&user("x"), amount, 2_000).unwrap_err();
            assert_eq!(r.reason, BidRejection::InvalidAmount, "{amount}");
        }
        assert_eq!((a.state.last_seq, a.state.price), (0, None));
    }

    #[test]
    fn tiers_pick_the_step_of_the_price_band() {
        let mut s = spec();
        s.increment = Increment::Tiers(vec![
            Tier { from: 0, step: 100 },
            Tier {
                from: 5000,
                step: 500,
            },
        ]);
        s.validate().unwrap();
        let mut a = active(s);
        a.place_bid(&user("x"), 4950, 2_000).unwrap();
        assert_eq!(a.next_min_bid(), 5050);
        a.place_bid(&user("y"), 5050, 2_001).unwrap();
        assert_eq!(a.next_min_bid(), 5550);
    }

    #[test]
    fn status_gates_bids() {
        let mut a = Auction::new(spec());
        assert_eq!(
            a.place_bid(&user("x"), 5000, 500).unwrap_err().reason,
            BidRejection::NotActive
        );
        a.advance(1_000);
        a.pause(2_000).unwrap();
        assert_eq!(
            a.place_bid(&user("x"), 5000, 2_500).unwrap_err().reason,
            BidRejection::NotActive
        );
        a.resume(10_000).unwrap();
        assert_eq!(
            a.state.ends_at, 108_000,
            "the remaining 98 s are kept across the pause"
        );
        a.place_bid(&user("x"), 5000, 10_001).unwrap();
        a.end_now(20_000).unwrap();
        assert_eq!(
            a.place_bid(&user("y"), 9000, 20_001).unwrap_err().reason,
            BidRejection::Ended
        );
        assert!(a.cancel().is_err());
    }

    #[test]
    fn soft_close_extends_only_inside_the_window() {
        let mut s = spec();
        s.soft_close = SoftClose {
            window_ms: 10_000,
            extend_ms: 30_000,
        };
        let mut a = active(s);
        assert_eq!(
            a.place_bid(&user("x"), 1000, 80_000).unwrap().extended_from,
            None
        );
        let late = a.place_bid(&user("y"), 1100, 95_000).unwrap();
        assert_eq!(late.extended_from, Some(100_000));
        assert_eq!(a.state.ends_at, 125_000);
        assert_eq!(a.next_deadline(), Some(125_000));
        assert!(
            a.advance(110_000).is_empty(),
            "not over at the original end"
        );
        let changes = a.advance(125_000);
        let Some(Change::Ended(ended)) = changes.last() else {
            panic!("{changes:?}")
        };
        assert_eq!(
            (ended.winner.clone(), ended.final_price),
            (Some(user("y")), Some(1100))
        );
    }

    #[test]
    fn reserve_not_met_means_no_winner() {
        let mut s = spec();
        s.reserve = Some(5000);
        let mut a = active(s);
        a.place_bid(&user("x"), 4000, 2_000).unwrap();
        assert!(!a.reserve_met());
        let changes = a.advance(100_000);
        let Some(Change::Ended(ended)) = changes.last() else {
            panic!("{changes:?}")
        };
        assert_eq!(
            (ended.winner.clone(), ended.reserve_met, ended.final_price),
            (None, false, Some(4000))
        );
    }

    #[test]
    fn updates_only_before_the_start() {
        let mut a = Auction::new(spec());
        let mut s = spec();
        s.title = "Lot 1 (renamed)".into();
        s.ends_at = 200_000;
        a.update(s.clone()).unwrap();
        assert_eq!(a.state.ends_at, 200_000);
        a.advance(1_000);
        assert!(a.update(s).is_err());
    }

    #[test]
    fn a_bid_at_the_buy_now_price_is_placed_at_that_price_and_ends_the_auction() {
        let mut a = active(AuctionSpec {
            buy_now: Some(5_000),
            ..spec()
        });
        a.place_bid(&user("u1"), 1_000, 2_000).unwrap();
        assert_eq!(a.snapshot(2_000).buy_now, Some(5_000));
        // Above it: placed at exactly the buy-now price, and the auction is over.
        let bought = a.place_bid(&user("u2"), 9_000, 3_000).unwrap();
        assert_eq!(bought.amount, 5_000);
        assert!(matches!(
            bought.bought.as_slice(),
            [Change::Status { to: AuctionStatus::Ended, .. }, Change::Ended(ended)]
                if ended.winner == Some(user("u2")) && ended.final_price == Some(5_000)
        ));
        assert_eq!(a.state.status, AuctionStatus::Ended);
        assert_eq!(a.state.ends_at, 3_000);
        assert_eq!(a.snapshot(3_000).buy_now, None);
        let late = a.place_bid(&user("u3"), 9_500, 3_000).unwrap_err();
        assert_eq!(late.reason, BidRejection::Ended);
    }

    #[test]
    fn buy_now_lapses_once_the_bidding_passes_it() {
        let mut a = active(AuctionSpec {
            buy_now: Some(1_150),
            ..spec()
        });
        a.place_bid(&user("u1"), 1_100, 2_000).unwrap();
        // The next minimum (1200) is above the buy-now price: it no longer applies.
        assert_eq!(a.snapshot(2_000).buy_now, None);
        let normal = a.place_bid(&user("u2"), 5_000, 3_000).unwrap();
        assert_eq!((normal.amount, normal.bought.len()), (5_000, 0));
        assert_eq!(a.state.status, AuctionStatus::Active);
    }

    #[test]
    fn a_required_role_admits_only_tokens_that_carry_it_or_admin() {
        let open = active(spec());
        assert!(open.admits(None));
        let verified = active(AuctionSpec {
            required_role: Some("verified".into()),
            ..spec()
        });
        assert!(!verified.admits(None));
        assert!(!verified.admits(Some(&["bidder".to_owned()])));
        assert!(verified.admits(Some(&["bidder".to_owned(), "verified".to_owned()])));
        assert!(verified.admits(Some(&["admin".to_owned()])));
        assert_eq!(
            verified.snapshot(0).required_role.as_deref(),
            Some("verified")
        );
    }

    /// The worked example of docs/protocol.md §5.6.3, number for number.
    #[test]
    fn the_documented_tier_example_holds() {
        let a = Auction::new(AuctionSpec {
            starting_price: 9_000,
            increment: Increment::Tiers(vec![
                Tier { from: 0, step: 500 },
                Tier {
                    from: 10_000,
                    step: 1_000,
                },
                Tier {
                    from: 50_000,
                    step: 2_500,
                },
            ]),
            ..spec()
        });
        a.spec.validate().unwrap();
        assert_eq!(a.next_min_bid(), 9_000);
        for (price, next) in [
            (9_000, 9_500),
            (9_500, 10_000),
            (10_000, 11_000),
            (49_500, 50_500),
            (50_000, 52_500),
        ] {
            assert_eq!(a.next_min_bid_after(price), next, "after {price}");
        }
    }

    #[test]
    fn specs_are_validated() {
        let mut s = spec();
        s.currency = "euro".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.ends_at = s.starts_at;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.increment = Increment::Fixed(0);
        assert!(s.validate().is_err());
        let mut s = spec();
        s.buy_now = Some(s.starting_price - 1);
        assert!(s.validate().is_err(), "buy-now below the starting price");
        let mut s = spec();
        (s.reserve, s.buy_now) = (Some(5_000), Some(4_000));
        assert!(s.validate().is_err(), "buy-now below the reserve");
        let mut s = spec();
        s.required_role = Some("Verified!".into());
        assert!(s.validate().is_err());
        spec().validate().unwrap();
    }
}
