//! Channel names (`auction:{id}`, `user:{id}`, `conversation:{id}`, `broadcast`) and user ids:
//! validated newtypes, so a string that reaches the broker's room registry is always well formed.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id accepted after a channel prefix, and for a user id.
pub const MAX_ID_LEN: usize = 64;

/// What a channel is for; decides who may subscribe and publish (see `docs/protocol.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// `auction:{id}`: an auction's bids, status and viewers. Anyone may watch.
    Auction,
    /// `user:{id}`: personal notifications for one user, on every one of their connections.
    User,
    /// `conversation:{id}`: chat between users: messages, typing, read receipts, joins.
    Conversation,
    /// `broadcast`: system-wide announcements.
    Broadcast,
}

impl ChannelKind {
    /// The prefix before the colon (or the whole name for `broadcast`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Auction => "auction",
            ChannelKind::User => "user",
            ChannelKind::Conversation => "conversation",
            ChannelKind::Broadcast => "broadcast",
        }
    }
}

/// Why a string is not a channel name or a user id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid channel {0:?}: expected auction:ID, user:ID, conversation:ID or broadcast")]
    UnknownKind(String),
    #[error("invalid id {0:?}: 1 to 64 characters from A-Z a-z 0-9 - _ .")]
    InvalidId(String),
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A validated channel name. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel {
    name: Arc<str>,
}

impl Channel {
    /// Parses and validates a channel name.
    pub fn parse(name: &str) -> Result<Channel, ChannelError> {
        if name == "broadcast" {
            return Ok(Channel { name: name.into() });
        }
        let Some((kind, id)) = name.split_once(':') else {
            return Err(ChannelError::UnknownKind(truncate(name)));
        };
        if !matches!(kind, "auction" | "user" | "conversation") {
            return Err(ChannelError::UnknownKind(truncate(name)));
        }
        if !valid_id(id) {
            return Err(ChannelError::InvalidId(truncate(id)));
        }
        Ok(Channel { name: name.into() })
    }

    /// `user:{id}` for a user id.
    pub fn user(user: &UserId) -> Channel {
        Channel {
            name: format!("user:{}", user.as_str()).into(),
        }
    }

    /// `auction:{id}`; the id must be valid.
    pub fn auction(id: &str) -> Result<Channel, ChannelError> {
        Channel::parse(&format!("auction:{id}"))
    }

    /// The `broadcast` channel.
    pub fn broadcast() -> Channel {
        Channel {
            name: "broadcast".into(),
        }
    }

    pub fn kind(&self) -> ChannelKind {
        match self.name.split_once(':').map(|(k, _)| k) {
            Some("auction") => ChannelKind::Auction,
            Some("user") => ChannelKind::User,
            Some("conversation") => ChannelKind::Conversation,
            _ => ChannelKind::Broadcast,
        }
    }

    /// The part after the colon (`""` for `broadcast`).
    pub fn id(&self) -> &str {
        self.name.split_once(':').map(|(_, id)| id).unwrap_or("")
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

/// Error messages echo at most this much of a bad input.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({})", self.name)
    }
}

impl Serialize for Channel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for Channel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Channel::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A user id as the application knows it (the JWT `sub` once authentication is on).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId {
    id: Arc<str>,
}

impl UserId {
    pub fn parse(id: &str) -> Result<UserId, ChannelError> {
        if valid_id(id) {
            Ok(UserId { id: id.into() })
        } else {
            Err(ChannelError::InvalidId(truncate(id)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.id)
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        UserId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        for (name, kind, id) in [
            ("auction:42", ChannelKind::Auction, "42"),
            ("user:u-1", ChannelKind::User, "u-1"),
            ("conversation:a.b_c", ChannelKind::Conversation, "a.b_c"),
            ("broadcast", ChannelKind::Broadcast, ""),
        ] {
            let c = Channel::parse(name).unwrap();
            assert_eq!(c.kind(), kind);
            assert_eq!(c.id(), id);
            assert_eq!(c.as_str(), name);
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "auction",
            "auction:",
            "room:1",
            "user:a b",
            "user:ä",
            "broadcast:1",
            &format!("user:{}", "x".repeat(65)),
        ] {
            assert!(Channel::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
