//! What an auction tells its room and its bidders: the [`Announcement`]s for status changes, an
//! accepted bid (`bid_placed`, `extended`, `outbid`) and the leaderboard. Pure: building them
//! publishes nothing; the ledger does that once the turn is durable.

use std::collections::HashMap;

use gavel_protocol::{AuctionSnapshot, BidPlaced, Channel, Data, Outbid, UserId};
use serde_json::{json, Value};

use super::ledger::Announcement;
use super::rules::{Accepted, Auction, Change};
use crate::store::BidRecord;

/// Bidders on the leaderboard.
pub const LEADERBOARD_SIZE: usize = 10;

pub fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Event data from one of our payload types (which always encode).
fn to_data<T: serde::Serialize>(v: &T) -> Data {
    Data::encode(v).unwrap_or_else(|error| {
        tracing::error!(%error, "event data did not encode");
        Data::null()
    })
}

/// The channel of auction `id` (ids are checked at creation, so this does not fail in practice).
fn room(id: &str) -> Option<Channel> {
    match Channel::auction(id) {
        Ok(channel) => Some(channel),
        Err(error) => {
            tracing::error!(auction_id = id, %error, "auction id is not a channel id");
            None
        }
    }
}

fn in_room(
    id: &str,
    event: &'static str,
    data: Data,
    state: Option<Value>,
) -> Option<Announcement> {
    room(id).map(|channel| Announcement {
        channel,
        event,
        data,
        state,
    })
}

/// Status changes and definition updates, each with the snapshot right after them.
pub fn changes(
    id: &str,
    changes: Vec<Change>,
    snapshot: &AuctionSnapshot,
    now: u64,
) -> Vec<Announcement> {
    let state = to_value(snapshot);
    changes
        .into_iter()
        .filter_map(|change| match change {
            Change::Status { from, to } => in_room(
                id,
                "status_changed",
                Data::from(json!({
                    "auction_id": id,
                    "status": to,
                    "previous": from,
                    "ends_at": snapshot.ends_at,
                    "server_ts": now,
                })),
                Some(state.clone()),
            ),
            Change::Updated => in_room(
                id,
                "updated",
                Data::from(json!({
                    "auction_id": id,
                    "starts_at": snapshot.starts_at,
                    "ends_at": snapshot.ends_at,
                    "server_ts": now,
                })),
                Some(state.clone()),
            ),
            Change::Ended(ended) => in_room(id, "ended", to_data(&ended), Some(state.clone())),
        })
        .collect()
}

/// An accepted bid: a `bid_placed` per bid it placed (the room's state rides on the last),
/// then `extended` if it moved the end, then `outbid` to whoever stopped leading.
pub fn bid(
    id: &str,
    accepted: &Accepted,
    records: &[BidRecord],
    snapshot: &AuctionSnapshot,
    auction: &Auction,
) -> Vec<Announcement> {
    let mut out = Vec::with_capacity(records.len() + 2);
    for (n, record) in records.iter().enumerate() {
        let last = n + 1 == records.len();
        let placed = BidPlaced {
            auction_id: id.to_owned(),
            bid_seq: record.seq,
            amount: record.amount,
            bidder: record.user.clone(),
            bid_count: record.seq,
            next_min_bid: if last {
                snapshot.next_min_bid
            } else {
                auction.next_min_bid_after(record.amount)
            },
            ends_at: snapshot.ends_at,
            server_ts: record.ts,
            automatic: record.automatic,
        };
        let state = last.then(|| to_value(snapshot));
        out.extend(in_room(id, "bid_placed", to_data(&placed), state));
    }
    let Some(record) = records.last() else {
        return out;
    };
    if let Some(previous_end) = accepted.extended_from {
        out.extend(in_room(
            id,
            "extended",
            Data::from(json!({
                "auction_id": id,
                "ends_at": snapshot.ends_at,
                "previous_ends_at": previous_end,
                "server_ts": record.ts,
            })),
            None,
        ));
    }
    if let Some((leader, their_amount)) = &accepted.outbid {
        let notice = Outbid {
            auction_id: id.to_owned(),
            amount: record.amount,
            your_amount: *their_amount,
            next_min_bid: snapshot.next_min_bid,
            ends_at: snapshot.ends_at,
            server_ts: record.ts,
        };
        out.push(Announcement {
            channel: Channel::user(leader),
            event: "outbid",
            data: to_data(&notice),
            state: None,
        });
    }
    out
}

/// The leaderboard: each bidder's highest bid, best first (at equal amounts the leader, who
/// bid it first, then by user id), at most [`LEADERBOARD_SIZE`].
pub fn leaderboard(
    id: &str,
    highest: &HashMap<UserId, i64>,
    leader: Option<&UserId>,
    ends_at: u64,
    now: u64,
) -> Option<Announcement> {
    let mut top: Vec<(&UserId, &i64)> = highest.iter().collect();
    let is_leader = |user: &UserId| leader == Some(user);
    top.sort_by(|a, b| {
        b.1.cmp(a.1)
            .then_with(|| is_leader(b.0).cmp(&is_leader(a.0)))
            .then_with(|| a.0.cmp(b.0))
    });
    top.truncate(LEADERBOARD_SIZE);
    /// Fields in byte order of their names, as on the wire before (see `BidPlaced`).
    #[derive(serde::Serialize)]
    struct Board<'a> {
        auction_id: &'a str,
        ends_at: u64,
        server_ts: u64,
        top: Vec<Place<'a>>,
    }
    #[derive(serde::Serialize)]
    struct Place<'a> {
        amount: i64,
        user: &'a UserId,
    }
    let board = Board {
        auction_id: id,
        ends_at,
        server_ts: now,
        top: top
            .into_iter()
            .map(|(user, &amount)| Place { amount, user })
            .collect(),
    };
    in_room(id, "leaderboard", to_data(&board), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two bidders at one amount (the earlier maximum leads): the leader comes first.
    #[test]
    fn the_leader_tops_a_tie() {
        let (amy, zed) = (UserId::parse("amy").unwrap(), UserId::parse("zed").unwrap());
        let highest = HashMap::from([(amy.clone(), 5000), (zed.clone(), 5000)]);
        let board = leaderboard("a1", &highest, Some(&zed), 0, 0).unwrap();
        let data = board.data.to_json();
        assert_eq!(data["top"][0]["user"], "zed");
        assert_eq!(data["top"][1]["user"], "amy");
        let board = leaderboard("a1", &highest, None, 0, 0).unwrap();
        assert_eq!(
            board.data.to_json()["top"][0]["user"],
            "amy",
            "no leader: by user id"
        );
    }
}
