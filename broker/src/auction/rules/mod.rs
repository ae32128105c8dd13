//! One auction's rules as a plain state machine: what a bid must be, when the auction opens,
//! pauses, extends and closes, and who wins. Time is passed in (ms since the Unix epoch); there
//! is no IO, no clock and no locking here: one owner drives it (the actor in `auction`).

//!
//! Files: this one (the state machine), `spec` (what an admin defines and its validation),
//! `reference` (a reference model of proxy bidding, for tests), `tests`, `proxy_tests`.

#[cfg(test)]
mod proxy_tests;
mod reference;
mod spec;
#[cfg(test)]
mod tests;

pub use reference::ProxyReference;
pub use spec::{
    AuctionSpec, Increment, SoftClose, SpecError, Tier, MAX_AMOUNT, MAX_SOFT_CLOSE_MS, MAX_TIME_MS,
};

use std::collections::BTreeMap;

use gavel_protocol::{AuctionSnapshot, AuctionStatus, BidRejection, Ended, UserId};
use serde::{Deserialize, Serialize};

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
    /// The leader's secret maximum (proxy bid) while it is above the price. Only the leader's
    /// matters: every other maximum was used up when it was beaten.
    #[serde(default)]
    pub leader_max: Option<i64>,
    /// Each bidder's latest raise of their own maximum while leading, which places no bid and
    /// so is not in the bid log: kept here (written with the turn) so that a retry of it gets
    /// the first answer again, after a restart too. Private, like the maxima.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub raises: BTreeMap<UserId, RaisedMax>,
}

impl AuctionState {
    /// The raise that `user`'s request `request_id` was, if it was one (see
    /// [`AuctionState::raises`]): what a retry of it is answered from.
    pub fn raise_of(&self, user: &UserId, request_id: &str) -> Option<&RaisedMax> {
        self.raises
            .get(user)
            .filter(|raised| raised.request_id == request_id)
    }
}

/// The answer to a leader's raise of their maximum (see [`AuctionState::raises`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaisedMax {
    pub request_id: String,
    /// The leading bid, which the raise left as it was.
    pub bid_seq: u64,
    pub amount: i64,
    pub bid_count: u64,
    pub next_min_bid: i64,
    pub ends_at: u64,
    pub server_ts: u64,
    pub max_amount: Option<i64>,
}

/// An auction: its spec and its state, stored together as one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auction {
    pub spec: AuctionSpec,
    pub state: AuctionState,
}

/// One bid in the log, as the rules placed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub seq: u64,
    pub user: UserId,
    pub amount: i64,
    /// Placed for a maximum (proxy bidding) rather than at the amount a bidder sent.
    pub automatic: bool,
    /// The bid of the request being judged (the others are the leader's automatic bids).
    pub own: bool,
}

/// A bid the rules accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The bidder's own bid; when a leader only raised their maximum, the leading bid.
    pub seq: u64,
    pub amount: i64,
    /// The bids placed, in seq order: the bidder's own, preceded by the leader's last
    /// automatic bid when a higher maximum beat it, or followed by the leader's automatic answer
    /// when theirs was higher. Empty when a leader only raised their maximum.
    pub placed: Vec<Placed>,
    /// Whether the bidder leads now.
    pub leading: bool,
    /// The bidder's maximum, if they have one.
    pub max_amount: Option<i64>,
    /// Who no longer leads because of this bid, and their last amount (for the outbid
    /// notice): the previous leader, or the bidder when a higher maximum answered at once.
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
                leader_max: None,
                raises: BTreeMap::new(),
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

    /// The maximum the leader bids up to: their secret maximum, or the price.
    pub fn leading_max(&self) -> Option<i64> {
        let price = self.state.price?;
        Some(self.state.leader_max.map_or(price, |max| max.max(price)))
    }

    /// Judges a plain bid (no maximum); see [`Auction::place_bid_with_max`].
    pub fn place_bid(
        &mut self,
        user: &UserId,
        amount: i64,
        now: u64,
    ) -> Result<Accepted, Rejected> {
        self.place_bid_with_max(user, amount, None, now)
    }

    /// Judges a bid against the current price (call [`Auction::advance`] first) and applies it.
    /// With `max` (proxy bidding, eBay's rules): the broker bids for the bidder one increment
    /// above the competition up to `max`; the earlier of two equal maxima leads; a leader's
    /// maximum only ever rises and raising it does not move the price.
    pub fn place_bid_with_max(
        &mut self,
        user: &UserId,
        amount: i64,
        max: Option<i64>,
        now: u64,
    ) -> Result<Accepted, Rejected> {
        self.check_bid(amount, max, now)?;
        // At or above the buy-now price (while it applies): placed at exactly that price.
        if let Some(price) = self.buy_now_price().filter(|&price| amount >= price) {
            let mut accepted = self.place(user, price, price, None, now);
            self.state.ends_at = self.state.ends_at.min(now);
            accepted.extended_from = None;
            accepted.bought = self.close(now);
            return Ok(accepted);
        }
        let (Some(leader), Some(leading_max)) = (self.state.leader.clone(), self.leading_max())
        else {
            // The first bid.
            return Ok(self.place(user, amount, amount, max, now));
        };
        if &leader == user {
            let Some(max) = max else {
                // A leader's plain bid: placed as sent, their maximum kept.
                return Ok(self.place(user, amount, amount, Some(leading_max), now));
            };
            // Raising one's own maximum: nothing placed, the price stays (unless the maximum
            // now reaches the reserve: then the price rises to it).
            let max = max.max(leading_max);
            let price = self.state.price.unwrap_or(amount);
            let lifted = self.lifted(price, Some(max));
            if lifted > price {
                return Ok(self.place(user, amount, lifted, Some(max), now));
            }
            self.state.leader_max = Some(max).filter(|&m| Some(m) > self.state.price);
            return Ok(Accepted {
                seq: self.state.last_seq,
                amount: self.state.price.unwrap_or(amount),
                placed: Vec::new(),
                leading: true,
                max_amount: Some(max),
                outbid: None,
                extended_from: None,
                bought: Vec::new(),
            });
        }
        let bid_max = max.unwrap_or(amount);
        if bid_max > leading_max {
            // The bidder's maximum wins: the leader's last automatic bid (at their maximum, if
            // above the price), then this bid, one increment above it (capped by the maximum).
            let defended = (Some(leading_max) > self.state.price)
                .then(|| self.log_bid(&leader, leading_max, true, false));
            let price = amount.max(bid_max.min(self.next_min_bid_after(leading_max)));
            let mut accepted = self.place(user, amount, price, max, now);
            accepted.placed.splice(0..0, defended);
            accepted.outbid = Some((leader, leading_max));
            return Ok(accepted);
        }
        // The leader's maximum answers at once: this bid at the bidder's maximum, then the
        // leader's automatic bid one increment above it (the earlier maximum wins a tie).
        // (No reserve lift here: a leading maximum at or above the reserve lifted the price
        // when it was placed or raised.)
        let own = self.log_bid(user, bid_max, bid_max != amount, true);
        let answer = if bid_max < leading_max {
            leading_max.min(self.next_min_bid_after(bid_max))
        } else {
            leading_max
        };
        let defence = self.log_bid(&leader, answer, true, false);
        self.state.leader_max = Some(leading_max).filter(|&m| m > answer);
        let extended_from = self.soft_close(now);
        Ok(Accepted {
            seq: own.seq,
            amount: own.amount,
            placed: vec![own, defence],
            leading: false,
            max_amount: max,
            outbid: Some((user.clone(), bid_max)),
            extended_from,
            bought: Vec::new(),
        })
    }

    /// Whether a bid may be judged at all: the auction is open (and its end has not come,
    /// which matters in a close's grace period, see [`Auction::advance_with_grace`]), the
    /// amounts are in range and the amount is at least the next minimum.
    fn check_bid(&self, amount: i64, max: Option<i64>, now: u64) -> Result<(), Rejected> {
        let reject = |reason: BidRejection, message: String| Rejected {
            reason,
            min_amount: None,
            message,
        };
        match self.state.status {
            AuctionStatus::Active if now >= self.state.ends_at => {
                return Err(reject(BidRejection::Ended, "the auction has ended".into()))
            }
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
        if max.is_some_and(|max| !(amount..=MAX_AMOUNT).contains(&max)) {
            return Err(reject(
                BidRejection::InvalidAmount,
                "max_amount must be at least amount and at most 10^15 minor units".into(),
            ));
        }
        let min = self.next_min_bid();
        if amount < min {
            let message = if min > MAX_AMOUNT {
                // The price is within one increment of the cap: no bid can beat it.
                format!("no higher bid is possible: the next bid would have to be at least {min}, above 10^15, the largest amount accepted")
            } else {
                format!("the next bid must be at least {min}")
            };
            return Err(Rejected {
                reason: BidRejection::TooLow,
                min_amount: Some(min),
                message,
            });
        }
        Ok(())
    }

    /// Appends a bid to the state (seq, count, price, leader) without judging it.
    fn log_bid(&mut self, user: &UserId, amount: i64, automatic: bool, own: bool) -> Placed {
        self.state.last_seq += 1;
        self.state.bid_count += 1;
        self.state.price = Some(amount);
        self.state.leader = Some(user.clone());
        Placed {
            seq: self.state.last_seq,
            user: user.clone(),
            amount,
            automatic,
            own,
        }
    }

    /// Places the bidder's own bid as the new leader at `price` (automatic unless it is the
    /// amount they `sent`), with their maximum.
    fn place(
        &mut self,
        user: &UserId,
        sent: i64,
        price: i64,
        max: Option<i64>,
        now: u64,
    ) -> Accepted {
        let price = self.lifted(price, max);
        let previous = self
            .state
            .leader
            .clone()
            .zip(self.state.price)
            .filter(|(leader, _)| leader != user);
        let own = self.log_bid(user, price, price != sent, true);
        self.state.leader_max = max.filter(|&max| max > price);
        let extended_from = self.soft_close(now);
        Accepted {
            seq: own.seq,
            amount: own.amount,
            placed: vec![own],
            leading: true,
            max_amount: max.filter(|&max| max >= price),
            outbid: previous,
            extended_from,
            bought: Vec::new(),
        }
    }

    /// eBay's reserve rule: a leading maximum that reaches the reserve lifts the price to the
    /// reserve at once (else the item would go unsold to a bidder willing to pay it).
    fn lifted(&self, price: i64, max: Option<i64>) -> i64 {
        match (self.spec.reserve, max) {
            (Some(reserve), Some(max)) if max >= reserve && price < reserve => reserve,
            _ => price,
        }
    }

    /// Soft close: a bid in the last `window_ms` moves the end to `extend_ms` from now. The
    /// end it replaced, if it moved.
    fn soft_close(&mut self, now: u64) -> Option<u64> {
        let SoftClose {
            window_ms,
            extend_ms,
        } = self.spec.soft_close;
        if window_ms > 0 && self.state.ends_at.saturating_sub(now) <= window_ms {
            // Never past the latest end a spec may have: every time stays within 53 bits.
            let new_end = now.saturating_add(extend_ms).min(MAX_TIME_MS);
            if new_end > self.state.ends_at {
                let previous = self.state.ends_at;
                self.state.ends_at = new_end;
                return Some(previous);
            }
        }
        None
    }

    /// Applies what time has made due: opening at `starts_at`, closing at `ends_at`.
    pub fn advance(&mut self, now: u64) -> Vec<Change> {
        self.advance_with_grace(now, 0)
    }

    /// [`Auction::advance`], but an active auction closes only `grace_ms` after its end. Until
    /// then bids that arrived before the end and reach the auction late (queued on another
    /// node of a cluster while one node closes) are still judged in time, and may extend a
    /// soft close; bids that arrived at or after the end are refused as `ended` meanwhile.
    pub fn advance_with_grace(&mut self, now: u64, grace_ms: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.state.status == AuctionStatus::Scheduled && now >= self.spec.starts_at {
            self.state.status = AuctionStatus::Active;
            changes.push(Change::Status {
                from: AuctionStatus::Scheduled,
                to: AuctionStatus::Active,
            });
        }
        if self.state.status == AuctionStatus::Active
            && now >= self.state.ends_at.saturating_add(grace_ms)
        {
            changes.extend(self.close(now));
        }
        changes
    }

    /// When [`Auction::advance_with_grace`] next has something to do.
    pub fn next_deadline(&self, grace_ms: u64) -> Option<u64> {
        match self.state.status {
            AuctionStatus::Scheduled => Some(self.spec.starts_at),
            AuctionStatus::Active => Some(self.state.ends_at.saturating_add(grace_ms)),
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
