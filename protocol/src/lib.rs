//! Gavel's wire protocol: every frame a client and the broker exchange, as serde types, and the
//! codec that turns them into WebSocket message payloads (MessagePack or a JSON mirror).
//!
//! This crate is pure: no sockets, no runtime, no clocks. `docs/protocol.md` is its prose twin.

pub mod auction;
pub mod channel;
pub mod claims;
pub mod codec;
pub mod codes;
pub mod data;
pub mod frame;

pub use auction::{AuctionSnapshot, AuctionStatus, BidPlaced, BidRejection, Ended, Outbid};
pub use channel::{Channel, ChannelError, ChannelKind, UserId};
pub use claims::Claims;
pub use codec::{
    decode, decode_client, encode, envelope, DecodeError, EncodeError, Envelope, Format,
};
pub use codes::{CloseCode, ErrorCode};
pub use data::{Data, DataError};
pub use frame::{
    ClientFrame, ErrorFrame, EventFrame, PresenceReply, Reply, RequestId, RoomSnapshot,
    ServerFrame, ViewerCounts,
};

/// The protocol generation spoken by this crate; part of every subprotocol name.
pub const PROTOCOL_VERSION: &str = "gavel.v1";
