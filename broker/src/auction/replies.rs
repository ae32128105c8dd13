//! The answers to bids (`bid_accepted`, `bid_rejected`) built from what the rules decided or
//! from the bid log alone, so that a retry, even after a restart, gets the first answer again.

use gavel_protocol::{BidRejection, Reply};

use super::rules::{self, Auction};
use crate::store::BidRecord;

pub(crate) fn rejected(
    auction_id: &str,
    request_id: &str,
    reason: BidRejection,
    min: Option<i64>,
    message: String,
) -> Reply {
    Reply::BidRejected {
        auction_id: auction_id.to_owned(),
        request_id: request_id.to_owned(),
        reason,
        min_amount: min,
        message,
    }
}

/// The `bid_accepted` reply for a logged bid, from the record alone, so a retry (even after a
/// restart) gets exactly the first answer: at acceptance the bid was the price (or a leader's
/// maximum answered it at once with the next seq, `answered_with`), the next minimum followed
/// from it, and the record keeps the `ends_at` of that moment.
pub(crate) fn accepted_reply(auction_id: &str, bid: &BidRecord, auction: &Auction) -> Reply {
    let (price, bid_count) = match bid.answered_with {
        Some(answer) => (answer, bid.seq + 1),
        None => (bid.amount, bid.seq),
    };
    Reply::BidAccepted {
        auction_id: auction_id.to_owned(),
        request_id: bid.request_id.clone(),
        bid_seq: bid.seq,
        amount: bid.amount,
        price,
        bid_count,
        next_min_bid: auction.next_min_bid_after(price),
        ends_at: bid.ends_at,
        server_ts: bid.ts,
        leading: bid.answered_with.is_none(),
        max_amount: bid.max_amount,
    }
}

/// What a leader's raise of their maximum answers: nothing placed, the leading bid and the
/// price unchanged. Kept in the auction's state, so that a retry gets it again (see
/// [`rules::AuctionState::raises`]).
pub(crate) fn raised_max(
    request_id: &str,
    accepted: &rules::Accepted,
    auction: &Auction,
    now: u64,
) -> rules::RaisedMax {
    rules::RaisedMax {
        request_id: request_id.to_owned(),
        bid_seq: accepted.seq,
        amount: accepted.amount,
        bid_count: auction.state.bid_count,
        next_min_bid: auction.next_min_bid(),
        ends_at: auction.state.ends_at,
        server_ts: now,
        max_amount: accepted.max_amount,
    }
}

/// The `bid_accepted` reply of a raise.
pub(crate) fn raised_reply(auction_id: &str, raised: &rules::RaisedMax) -> Reply {
    Reply::BidAccepted {
        auction_id: auction_id.to_owned(),
        request_id: raised.request_id.clone(),
        bid_seq: raised.bid_seq,
        amount: raised.amount,
        price: raised.amount,
        bid_count: raised.bid_count,
        next_min_bid: raised.next_min_bid,
        ends_at: raised.ends_at,
        server_ts: raised.server_ts,
        leading: true,
        max_amount: raised.max_amount,
    }
}
