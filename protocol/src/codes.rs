//! Stable error codes (sent in `error` frames) and WebSocket close codes. Their string and number
//! values are part of the protocol: never renumber or rename one, only add.

use serde::{Deserialize, Serialize};

/// Why a request failed. Serialized as the snake_case string shown on each variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// `bad_frame`: the message is not a decodable frame (invalid MessagePack or JSON, not a map,
    /// a missing or mistyped field). The connection stays open.
    BadFrame,
    /// `unknown_type`: the frame's `type` is not one this protocol version knows.
    UnknownType,
    /// `invalid_channel`: the channel name is not `auction:ID`, `user:ID`, `conversation:ID` or
    /// `broadcast`.
    InvalidChannel,
    /// `invalid_request`: well-formed but not acceptable (a read receipt for a seq the room
    /// does not have). The message says why.
    InvalidRequest,
    /// `forbidden`: this connection may not do this (another user's channel, a conversation its
    /// token does not list, a user change on `auth`, an admin call without the admin role).
    Forbidden,
    /// `read_only_channel`: clients cannot publish, type or send receipts on this channel kind;
    /// only conversations accept client messages.
    ReadOnlyChannel,
    /// `not_subscribed`: the operation needs a subscription to the channel first.
    NotSubscribed,
    /// `already_subscribed`: this connection is already subscribed to the channel.
    AlreadySubscribed,
    /// `too_many_subscriptions`: the per-connection subscription limit is reached.
    TooManySubscriptions,
    /// `unauthenticated`: this needs an authenticated connection (send `auth` first, or connect
    /// with a token).
    Unauthenticated,
    /// `token_invalid`: the token's signature, form, issuer, audience or `sub` is wrong.
    TokenInvalid,
    /// `token_expired`: the token has expired. Sent unprompted (with `id: null`) when a live
    /// connection's token expires: send a fresh `auth` within the grace period or be closed.
    TokenExpired,
    /// `rate_limited`: this connection sends faster than the broker allows; the message was
    /// dropped. Sustained, it is closed with 1008.
    RateLimited,
    /// `cluster_unavailable`: in cluster mode the broker cannot reach its Redis right now, so
    /// it cannot order this request cluster-wide (a publish, or a subscribe to a room this
    /// node does not follow yet). Nothing was done; retry later, or reconnect (the load
    /// balancer drains a node in this state, since its `/readyz` says not ready).
    ClusterUnavailable,
    /// `internal`: reserved for a failure inside the broker; the request may be retried. This
    /// version has no path that sends it.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ReadOnlyChannel => "read_only_channel",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ClusterUnavailable => "cluster_unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::Unauthenticated,
        ErrorCode::TokenInvalid,
        ErrorCode::TokenExpired,
        ErrorCode::RateLimited,
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::InvalidChannel,
        ErrorCode::InvalidRequest,
        ErrorCode::Forbidden,
        ErrorCode::ReadOnlyChannel,
        ErrorCode::NotSubscribed,
        ErrorCode::AlreadySubscribed,
        ErrorCode::TooManySubscriptions,
        ErrorCode::ClusterUnavailable,
        ErrorCode::Internal,
    ];
}

/// WebSocket close codes the broker sends. 1000–1011 are RFC 6455's; 4000–4999 are Gavel's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure (the client asked to close).
    Normal,
    /// 1001: the broker is shutting down; reconnect (to another node) with `since`.
    GoingAway,
    /// 1002: a WebSocket protocol violation (bad opcode, reserved bits, fragmented control frame).
    ProtocolError,
    /// 1007: a text frame that is not valid UTF-8.
    InvalidPayload,
    /// 1008: policy violation: the connection kept sending faster than its rate limit.
    PolicyViolation,
    /// 1009: a message larger than the broker's maximum message size.
    MessageTooBig,
    /// 1011: an internal error in the broker.
    InternalError,
    /// 4000: nothing was received from the client (not even a pong) within the idle timeout.
    IdleTimeout,
    /// 4002: no valid authentication arrived within the authentication timeout (and anonymous
    /// connections are not allowed).
    AuthenticationRequired,
    /// 4003: the token expired and no fresh one arrived within the grace period.
    TokenExpired,
    /// 4001: the client did not read fast enough: its outbound queue filled up. (A write that
    /// stalls past the write timeout drops the socket without a close frame.) Reconnect and
    /// resubscribe with `since` and `epoch`.
    SlowConsumer,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::AuthenticationRequired => 4002,
            CloseCode::TokenExpired => 4003,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::IdleTimeout => 4000,
            CloseCode::SlowConsumer => 4001,
        }
    }

    /// The short reason text sent in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "server shutting down",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidPayload => "invalid utf-8",
            CloseCode::PolicyViolation => "rate limit exceeded",
            CloseCode::AuthenticationRequired => "authentication required",
            CloseCode::TokenExpired => "token expired",
            CloseCode::MessageTooBig => "message too big",
            CloseCode::InternalError => "internal error",
            CloseCode::IdleTimeout => "idle timeout",
            CloseCode::SlowConsumer => "slow consumer",
        }
    }

    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    pub const ALL: [CloseCode; 11] = [
        CloseCode::PolicyViolation,
        CloseCode::AuthenticationRequired,
        CloseCode::TokenExpired,
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidPayload,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::IdleTimeout,
        CloseCode::SlowConsumer,
    ];
}
