//! Development tokens: HS256 JWTs with the claims Gavel reads, signed with a shared secret (the
//! `gavel-broker token` command, tests, load generation). Production tokens come from the
//! application's own auth service.

use gavel_protocol::Claims;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// Why a token could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the token: {0}")]
pub struct TokenError(String);

/// Signs `claims` with HS256 and `secret`.
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> Result<String, TokenError> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| TokenError(e.to_string()))
}
