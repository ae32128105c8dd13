//! The frames themselves: [`ClientFrame`] (client → broker) and [`ServerFrame`] (broker →
//! client). Both are maps tagged by a `type` field; field names are the wire names.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::channel::{Channel, UserId};
use crate::codes::ErrorCode;
use crate::data::Data;

/// Declares [`ClientFrame`] and its twin `ByType`: the same variants, read once the frame's
/// `type` is known. serde reads an internally tagged enum by first buffering the whole map as a
/// tree (a `data` of 65,000 empty arrays made 2 MiB of it); `ByType` reads the fields straight
/// from the bytes and skips unknown ones unread ([`crate::codec::decode_client`]).
macro_rules! client_frames {
    (
        $(#[$meta:meta])*
        pub enum ClientFrame {
            $(
                $(#[$variant_meta:meta])*
                $variant:ident { $( $(#[$field_meta:meta])* $field:ident : $ty:ty ),* $(,)? }
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        pub enum ClientFrame {
            $(
                $(#[$variant_meta])*
                $variant { $( $(#[$field_meta])* $field: $ty ),* }
            ),*
        }

        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub(crate) enum ByType {
            $(
                $variant { $( $(#[$field_meta])* $field: $ty ),* }
            ),*
        }

        impl From<ByType> for ClientFrame {
            fn from(frame: ByType) -> ClientFrame {
                match frame {
                    $( ByType::$variant { $($field),* } => ClientFrame::$variant { $($field),* } ),*
                }
            }
        }
    };
}

/// A client-chosen request id, echoed in the one reply (`ok` or `error`) to that request.
pub type RequestId = u64;

client_frames! {
/// Everything a client can send. Every variant is a request and gets exactly one reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Join a channel's room. With `since`, first replay the room's events after that seq.
    Subscribe {
        id: RequestId,
        channel: Channel,
        /// The last seq this client saw in the room; events after it are replayed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// The room epoch from the earlier `subscribed` reply; a different epoch means the room
        /// was recreated and `since` no longer refers to the same history.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    /// Leave a channel's room.
    Unsubscribe { id: RequestId, channel: Channel },
    /// Send a chat message into a conversation the connection is subscribed to. It becomes a
    /// `message` event with the next seq.
    Publish {
        id: RequestId,
        channel: Channel,
        data: Data,
    },
    /// Typing indicator in a conversation: delivered to the other subscribers, never stored.
    Typing {
        id: RequestId,
        channel: Channel,
        typing: bool,
    },
    /// Read receipt: the user has read the conversation up to `seq`. Becomes a `read` event.
    Read {
        id: RequestId,
        channel: Channel,
        seq: u64,
    },
    /// Who is in a room.
    Presence {
        id: RequestId,
        channel: Channel,
        /// At most this many user ids in the reply (default 100, at most 1000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Application-level round trip; the reply carries the server time.
    Ping { id: RequestId },
    /// Authenticates the connection (when the token did not come with the upgrade request) or
    /// refreshes its token before it expires. The user cannot change on a connection.
    Auth { id: RequestId, token: String },
    /// A bid on an auction. Replied with `bid_accepted` or `bid_rejected`; a retry with the same
    /// `request_id` (per user) gets the first outcome again and never places a second bid.
    PlaceBid {
        id: RequestId,
        auction_id: String,
        /// In the currency's minor unit.
        amount: i64,
        /// The client's idempotency key: 1 to 64 characters.
        request_id: String,
        /// A secret maximum (proxy bid, at least `amount`): the broker bids for this user, one
        /// increment above the competition, up to it. Never shown to anyone else.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_amount: Option<i64>,
    },
}
}

impl ClientFrame {
    pub fn id(&self) -> RequestId {
        match self {
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Publish { id, .. }
            | ClientFrame::Typing { id, .. }
            | ClientFrame::Read { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::Ping { id }
            | ClientFrame::PlaceBid { id, .. }
            | ClientFrame::Auth { id, .. } => *id,
        }
    }

    /// The wire `type`, as used in metric labels and logs.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::PlaceBid { .. } => "place_bid",
            ClientFrame::Auth { .. } => "auth",
        }
    }

    /// Every client `type`, for the decoder's error messages and the docs.
    pub const TYPES: [&'static str; 9] = [
        "auth",
        "subscribe",
        "unsubscribe",
        "publish",
        "typing",
        "read",
        "presence",
        "ping",
        "place_bid",
    ];
}

/// Live viewer counts of a room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewerCounts {
    /// Open subscriptions (one per connection).
    pub connections: u32,
    /// Distinct users among them; each anonymous connection counts as one.
    pub users: u32,
    /// Highest `connections` since the room was created.
    pub peak_connections: u32,
    /// Highest `users` since the room was created.
    pub peak_users: u32,
}

/// What a client needs to carry on when its history no longer reaches back to its `since`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomSnapshot {
    /// The room's latest seq: the next live event has `seq + 1`.
    pub seq: u64,
    pub epoch: u64,
    pub viewers: ViewerCounts,
    /// The oldest seq still in the room's history (`null` when the history is empty).
    pub oldest_seq: Option<u64>,
    /// Channel-specific state (an auction's price and leader, once auctions exist), else `null`.
    #[serde(default)]
    pub state: Value,
}

/// The body of an `ok` reply; `kind` says which request it answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// To `subscribe`. Replayed events (if any) follow this reply, then live events.
    Subscribed {
        channel: Channel,
        /// The room's latest seq when the subscription took effect.
        seq: u64,
        /// Identifies this incarnation of the room; send it back with `since`.
        epoch: u64,
        /// Only when `since` was given: `true` if every event after `since` is replayed,
        /// `false` if the history no longer reaches back (then `snapshot` is set).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// How many events are replayed right after this reply.
        replayed: u32,
        viewers: ViewerCounts,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<RoomSnapshot>,
        /// The channel's current state, on every subscribe to a channel that has one (an
        /// auction's `AuctionSnapshot`), as of `seq`.
        #[serde(default, skip_serializing_if = "Value::is_null")]
        state: Value,
    },
    /// To `unsubscribe`.
    Unsubscribed { channel: Channel },
    /// To `publish` and `read`: the seq the new event got.
    Published { channel: Channel, seq: u64 },
    /// To `typing`.
    Done {},
    /// To `presence`.
    Presence(PresenceReply),
    /// To `ping`.
    Pong { server_ts: u64 },
    /// To `auth`: who the connection is now, and until when the token is valid.
    Authenticated {
        user: UserId,
        /// Token expiry, ms since the Unix epoch.
        expires_at: u64,
        /// A refresh only: the conversations the new token no longer lists, which the
        /// connection left.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unsubscribed: Vec<Channel>,
    },
    /// To `place_bid`: the bid is durable and is (or will be) in the room as `bid_placed`.
    BidAccepted {
        auction_id: String,
        request_id: String,
        /// The bid's seq in the auction's bid log (gap-free from 1).
        bid_seq: u64,
        amount: i64,
        /// The auction's price once this bid was judged: this bid, unless a leader's maximum
        /// answered it at once (then `leading` is false).
        price: i64,
        bid_count: u64,
        next_min_bid: i64,
        ends_at: u64,
        server_ts: u64,
        /// Whether this bidder leads now.
        #[serde(default = "leading_default")]
        leading: bool,
        /// This bidder's maximum (proxy bid), if they sent one; only ever sent to them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_amount: Option<i64>,
    },
    /// To `place_bid`: nothing was placed.
    BidRejected {
        auction_id: String,
        request_id: String,
        reason: crate::auction::BidRejection,
        /// With `too_low`: the least amount that would be accepted now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_amount: Option<i64>,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceReply {
    pub channel: Channel,
    pub viewers: ViewerCounts,
    /// Identified users in the room (each once), sorted, at most the requested limit.
    pub users: Vec<UserId>,
    /// Anonymous connections in the room.
    pub anonymous: u32,
    /// `true` when `users` was cut at the limit.
    pub truncated: bool,
}

/// An error reply, or an error about a frame whose id could not be read (`id: null`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    /// For people, not programs: match on `code`.
    pub message: String,
}

/// An event stored in a room's history, with its place in the room's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventFrame {
    pub channel: Channel,
    /// Gap-free from 1 within one epoch of the room.
    pub seq: u64,
    /// Server time the event was sequenced, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// The event name: `message`, `read`, or an application's (`booking_accepted`, ...).
    pub event: String,
    /// The user who caused it (`null` for events from the HTTP API or the broker).
    #[serde(default)]
    pub from: Option<UserId>,
    #[serde(default)]
    pub data: Data,
    /// Only on seq 1: the epoch of the run of seqs this event begins, to send back with `since`.
    /// (A subscriber of a cluster room that had no event yet was told epoch 0.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// Everything the broker sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The first frame on every connection.
    Hello {
        /// `gavel.v1`.
        protocol: String,
        connection_id: u64,
        /// Who the broker thinks this connection is (`null`: anonymous).
        user: Option<UserId>,
        server_ts: u64,
        /// The broker pings this often; a connection silent for `idle_timeout_ms` is closed.
        ping_interval_ms: u64,
        idle_timeout_ms: u64,
        /// Larger messages are refused with close code 1009.
        max_message_size: u64,
    },
    /// Success reply to request `id`.
    Ok { id: RequestId, result: Reply },
    /// Failure reply (or a complaint about an unreadable frame).
    Error(ErrorFrame),
    /// A sequenced room event.
    Event(EventFrame),
    /// Coalesced viewer counts of a room (at most a few per second per room). Not sequenced.
    Viewers {
        channel: Channel,
        ts: u64,
        #[serde(flatten)]
        viewers: ViewerCounts,
    },
    /// A user started or stopped typing in a conversation. Not sequenced, not stored.
    Typing {
        channel: Channel,
        user: UserId,
        typing: bool,
        ts: u64,
    },
    /// A user's first connection joined a conversation room. Not sequenced.
    Joined {
        channel: Channel,
        user: UserId,
        ts: u64,
    },
    /// A user's last connection left a conversation room. Not sequenced.
    Left {
        channel: Channel,
        user: UserId,
        ts: u64,
    },
}

impl ServerFrame {
    /// The wire `type`, as used in metric labels and logs.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerFrame::Hello { .. } => "hello",
            ServerFrame::Ok { .. } => "ok",
            ServerFrame::Error(_) => "error",
            ServerFrame::Event(_) => "event",
            ServerFrame::Viewers { .. } => "viewers",
            ServerFrame::Typing { .. } => "typing",
            ServerFrame::Joined { .. } => "joined",
            ServerFrame::Left { .. } => "left",
        }
    }
}

/// Answers from brokers before proxy bidding had no `leading`: every accepted bid led.
fn leading_default() -> bool {
    true
}
