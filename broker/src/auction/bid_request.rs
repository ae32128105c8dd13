//! What a bidder hands the auction engine: the bid ([`BidRequest`]) and its idempotency key
//! ([`BidKey`]), checked once here for every caller (the session and library users alike).

use gavel_protocol::UserId;

/// A bid as the session hands it over.
pub struct BidRequest {
    pub user: Option<UserId>,
    /// False when the user's token has roles but not `bidder` (or `admin`).
    pub may_bid: bool,
    /// The token's roles claim (`None`: the token has none), for an auction's `required_role`.
    pub roles: Option<Vec<String>>,
    pub auction_id: String,
    pub amount: i64,
    pub request_id: BidKey,
    /// A secret maximum (proxy bid).
    pub max_amount: Option<i64>,
}

/// A bid's idempotency key (`request_id`), chosen by the bidder: 1 to 64 bytes. A retry with
/// the same key gets the first answer. Never empty: the log marks the broker's own automatic
/// bids by an empty key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BidKey(String);

/// A `request_id` that is empty or longer than [`BidKey::MAX_LEN`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request_id must be 1 to 64 bytes")]
pub struct InvalidBidKey;

impl BidKey {
    pub const MAX_LEN: usize = 64;

    pub fn parse(key: impl Into<String>) -> Result<BidKey, InvalidBidKey> {
        let key = key.into();
        if key.is_empty() || key.len() > Self::MAX_LEN {
            return Err(InvalidBidKey);
        }
        Ok(BidKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
