//! Auction frames' payloads: the snapshot a subscriber to `auction:{id}` gets, the data of each
//! auction event, and the outcomes of `place_bid`. Amounts are integers in the currency's minor
//! unit (cents), never floats.

use serde::{Deserialize, Serialize};

use crate::channel::UserId;

/// Where an auction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuctionStatus {
    /// Created; opens at `starts_at`.
    Scheduled,
    /// Taking bids until `ends_at`.
    Active,
    /// Stopped by an admin; the remaining time is kept and resumes with it.
    Paused,
    /// Closed at `ends_at` (or ended early by an admin); the winner is final.
    Ended,
    /// Called off by an admin; no winner.
    Cancelled,
}

impl AuctionStatus {
    /// Every status, for metrics and documentation.
    pub const ALL: [AuctionStatus; 5] = [
        AuctionStatus::Scheduled,
        AuctionStatus::Active,
        AuctionStatus::Paused,
        AuctionStatus::Ended,
        AuctionStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuctionStatus::Scheduled => "scheduled",
            AuctionStatus::Active => "active",
            AuctionStatus::Paused => "paused",
            AuctionStatus::Ended => "ended",
            AuctionStatus::Cancelled => "cancelled",
        }
    }
}

/// An auction as a viewer sees it: the `state` of the `subscribed` reply to `auction:{id}`,
/// and the body of `GET /api/auctions/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuctionSnapshot {
    pub auction_id: String,
    pub title: String,
    pub currency: String,
    pub status: AuctionStatus,
    pub starting_price: i64,
    /// The highest accepted bid (`null` before the first bid).
    pub price: Option<i64>,
    /// Who placed it.
    pub leader: Option<UserId>,
    pub bid_count: u64,
    /// The seq of the last accepted bid (0 before the first).
    pub last_bid_seq: u64,
    /// The least amount a bid may have now.
    pub next_min_bid: i64,
    pub starts_at: u64,
    /// The current end, soft-close extensions included.
    pub ends_at: u64,
    /// Whether the price has reached the (secret) reserve; `true` when there is none.
    pub reserve_met: bool,
    /// The buy-now price, while it still applies (the price is below it); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buy_now: Option<i64>,
    /// The role a bidder's token must carry to bid here (e.g. `verified`); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_role: Option<String>,
    pub server_ts: u64,
}

/// Why a bid was not accepted. Serialized as the snake_case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BidRejection {
    /// Below the next minimum bid (`min_amount` says what that is).
    TooLow,
    /// The auction has not started yet, or is paused.
    NotActive,
    /// The auction has ended or was cancelled.
    Ended,
    /// This user is bidding faster than the broker allows.
    RateLimited,
    /// Anonymous connections cannot bid.
    Unauthenticated,
    /// The token carries roles, and not `bidder` (or `admin`).
    Forbidden,
    /// Zero, negative, or above the largest amount the broker accepts.
    InvalidAmount,
    /// No auction has this id.
    UnknownAuction,
    /// The bid could not be made durable (storage failure); it was not placed. Retry later.
    Unavailable,
    /// Cluster mode only: the broker cannot reach the Redis that orders bids cluster-wide, so
    /// it refuses the bid rather than accept it unsafely. Nothing was placed; retry (with the
    /// same `request_id`) later, or on another node.
    ClusterUnavailable,
}

impl BidRejection {
    /// Every reason, for metric initialisation and documentation.
    pub const ALL: [BidRejection; 10] = [
        BidRejection::TooLow,
        BidRejection::NotActive,
        BidRejection::Ended,
        BidRejection::RateLimited,
        BidRejection::Unauthenticated,
        BidRejection::Forbidden,
        BidRejection::InvalidAmount,
        BidRejection::UnknownAuction,
        BidRejection::Unavailable,
        BidRejection::ClusterUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BidRejection::TooLow => "too_low",
            BidRejection::NotActive => "not_active",
            BidRejection::Ended => "ended",
            BidRejection::RateLimited => "rate_limited",
            BidRejection::Unauthenticated => "unauthenticated",
            BidRejection::Forbidden => "forbidden",
            BidRejection::InvalidAmount => "invalid_amount",
            BidRejection::UnknownAuction => "unknown_auction",
            BidRejection::Unavailable => "unavailable",
            BidRejection::ClusterUnavailable => "cluster_unavailable",
        }
    }

    /// Transient rejections are not remembered for idempotent retries: a retry gets a new try.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            BidRejection::RateLimited
                | BidRejection::Unavailable
                | BidRejection::ClusterUnavailable
        )
    }
}

/// `bid_placed` event data.
///
/// The fields of the event data below are declared in byte order of their names: that is the
/// order on the wire, the same as when the broker built event data as sorted JSON maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BidPlaced {
    pub amount: i64,
    pub auction_id: String,
    /// Placed by the broker for a bidder's maximum (proxy bidding), not typed by them.
    #[serde(default)]
    pub automatic: bool,
    pub bid_count: u64,
    pub bid_seq: u64,
    pub bidder: UserId,
    pub ends_at: u64,
    pub next_min_bid: i64,
    pub server_ts: u64,
}

/// `outbid` event data, on the previous leader's `user:{id}` channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbid {
    /// The new highest bid.
    pub amount: i64,
    pub auction_id: String,
    pub ends_at: u64,
    pub next_min_bid: i64,
    pub server_ts: u64,
    /// The bid of yours it beat.
    pub your_amount: i64,
}

/// `ended` event data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    pub auction_id: String,
    pub bid_count: u64,
    /// When it ended.
    pub ends_at: u64,
    pub final_price: Option<i64>,
    pub reserve_met: bool,
    pub server_ts: u64,
    /// `null` without bids or when the reserve was not met.
    pub winner: Option<UserId>,
}
