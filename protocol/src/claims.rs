//! The JWT claims Gavel reads (docs/protocol.md §2.1): part of the contract between the
//! application that issues tokens and the broker that verifies them. Data only: signing is in
//! `gavel-client`, verification in the broker.

use serde::{Deserialize, Serialize};

/// The claims Gavel reads. Other claims are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// e.g. `bidder`, `admin`. Absent: no role checks for this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// The conversations this user may join (`conversation:ID`, or `conversation:*` for all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
}
