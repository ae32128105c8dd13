//! Who a connection is: verification of JWTs (HS256 with a shared secret, or RS256/ES256 with a
//! public key), the claims Gavel reads (`sub`, `exp`, `roles`, `channels`), and the questions
//! the rest of the broker asks of an identity. No IO here beyond reading the key at start-up.

use std::collections::HashSet;
use std::path::Path;

pub use gavel_protocol::Claims;
use gavel_protocol::{Channel, ChannelKind, UserId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 5;
/// The largest integer a JavaScript number holds exactly (2^53 - 1).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A verified identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// Token expiry, ms since the Unix epoch.
    pub expires_at_ms: u64,
    pub roles: Option<HashSet<String>>,
    pub channels: Option<HashSet<String>>,
}

impl Identity {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.as_ref().is_some_and(|r| r.contains(role))
    }

    /// Bidding needs the `bidder` (or `admin`) role when the token carries roles at all.
    pub fn may_bid(&self) -> bool {
        self.roles.is_none() || self.has_role("bidder") || self.has_role("admin")
    }

    pub fn is_admin(&self) -> bool {
        self.has_role("admin")
    }

    /// What the token's `channels` claim says about joining `channel`: `Some(true/false)`
    /// when it has the claim, `None` when it has none (then a callback may decide).
    pub fn lists(&self, channel: &Channel) -> Option<bool> {
        let channels = self.channels.as_ref()?;
        let wildcard = format!("{}:*", channel.kind().as_str());
        Some(channels.contains(channel.as_str()) || channels.contains(&wildcard))
    }
}

/// Why a token was refused. Each has its own error code (see `docs/security.md`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Key setup problems, reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is neither an RSA nor an EC (P-256) public key in PEM form")]
    Format { path: String },
}

/// Verifies tokens with the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Claims a token must carry: `exp` and `sub` always, `iss` and `aud` once configured
    /// (jsonwebtoken checks a configured issuer or audience only when the token has one).
    required: Vec<&'static str>,
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Verifier {
        Verifier::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// RS256 or ES256, from a PEM public key file (the algorithm follows the key type).
    pub fn from_public_key_file(path: &Path) -> Result<Verifier, KeyError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Verifier::new(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Verifier::new(key, Algorithm::ES256));
        }
        Err(KeyError::Format { path: shown })
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Verifier {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // Audience and issuer are checked only when configured.
        validation.validate_aud = false;
        Verifier {
            key,
            validation,
            required: Vec::new(),
        }
        .requiring(&["exp", "sub"])
    }

    fn requiring(mut self, claims: &[&'static str]) -> Verifier {
        self.required.extend_from_slice(claims);
        self.validation.set_required_spec_claims(&self.required);
        self
    }

    /// Requires `iss` to be present and to be `issuer`.
    pub fn with_issuer(mut self, issuer: &str) -> Verifier {
        self.validation.set_issuer(&[issuer]);
        self.requiring(&["iss"])
    }

    /// Requires `aud` to be present and to contain `audience`.
    pub fn with_audience(mut self, audience: &str) -> Verifier {
        self.validation.set_audience(&[audience]);
        self.validation.validate_aud = true;
        self.requiring(&["aud"])
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let claims = data.claims;
        let user =
            UserId::parse(&claims.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        let channels = claims.channels.map(|list| {
            list.into_iter()
                .filter(|c| {
                    c.ends_with(":*")
                        || Channel::parse(c).is_ok_and(|c| c.kind() != ChannelKind::User)
                })
                .collect()
        });
        Ok(Identity {
            user,
            // At most 2^53 - 1, as every integer the broker sends (a JavaScript number).
            expires_at_ms: claims.exp.saturating_mul(1000).min(MAX_SAFE_INTEGER),
            roles: claims.roles.map(|r| r.into_iter().collect()),
            channels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gavel_client::token::sign_hs256;
    use jsonwebtoken::{EncodingKey, Header};

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "u42".into(),
            exp,
            roles: Some(vec!["bidder".into()]),
            channels: Some(vec!["conversation:c1".into(), "user:evil".into()]),
        }
    }

    fn now() -> u64 {
        crate::clock::now_ms() / 1000
    }

    #[test]
    fn verifies_what_it_signed_and_nothing_else() {
        let v = Verifier::hs256(b"secret-secret-secret");
        let token = sign_hs256(b"secret-secret-secret", &claims(now() + 60)).unwrap();
        let id = v.verify(&token).unwrap();
        assert_eq!(id.user.as_str(), "u42");
        assert!(id.may_bid() && !id.is_admin());
        assert_eq!(
            id.lists(&Channel::parse("conversation:c1").unwrap()),
            Some(true)
        );
        assert_eq!(
            id.lists(&Channel::parse("conversation:c2").unwrap()),
            Some(false)
        );
        assert!(
            !id.channels.as_ref().unwrap().contains("user:evil"),
            "user channels are never granted by a list"
        );

        // An expiry beyond any JavaScript-safe millisecond count is sent as 2^53 - 1.
        let forever = sign_hs256(b"secret-secret-secret", &claims(u64::MAX / 2)).unwrap();
        assert_eq!(v.verify(&forever).unwrap().expires_at_ms, MAX_SAFE_INTEGER);

        let forged = sign_hs256(b"another-secret-entirely", &claims(now() + 60)).unwrap();
        assert!(matches!(v.verify(&forged), Err(AuthError::Invalid(_))));
        let expired = sign_hs256(b"secret-secret-secret", &claims(now() - 120)).unwrap();
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        assert!(matches!(v.verify("not.a.jwt"), Err(AuthError::Invalid(_))));
        let mut bad_sub = claims(now() + 60);
        bad_sub.sub = "a b".into();
        let token = sign_hs256(b"secret-secret-secret", &bad_sub).unwrap();
        assert!(matches!(v.verify(&token), Err(AuthError::Invalid(_))));
    }

    /// Signs arbitrary claims (to leave out or add `iss` / `aud`).
    fn sign_json(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn a_configured_issuer_and_audience_are_required_claims() {
        let v = Verifier::hs256(b"k")
            .with_issuer("https://shop.example")
            .with_audience("gavel");
        let exp = now() + 60;
        let token = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "u1", "exp": exp, "roles": ["admin"]});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign_json(b"k", claims)
        };
        let both = serde_json::json!({"iss": "https://shop.example", "aud": "gavel"});
        assert!(v.verify(&token(both)).is_ok());
        for (what, extra) in [
            ("no aud", serde_json::json!({"iss": "https://shop.example"})),
            ("no iss", serde_json::json!({"aud": "gavel"})),
            ("neither", serde_json::json!({})),
            (
                "wrong aud",
                serde_json::json!({"iss": "https://shop.example", "aud": "other"}),
            ),
        ] {
            assert!(
                matches!(v.verify(&token(extra)), Err(AuthError::Invalid(_))),
                "{what} must be refused"
            );
        }
        // Without the flags, neither claim is needed.
        assert!(Verifier::hs256(b"k")
            .verify(&token(serde_json::json!({})))
            .is_ok());
    }

    #[test]
    fn roles_gate_bidding_only_when_present() {
        let v = Verifier::hs256(b"k");
        let mut c = claims(now() + 60);
        c.roles = None;
        assert!(v.verify(&sign_hs256(b"k", &c).unwrap()).unwrap().may_bid());
        c.roles = Some(vec!["viewer".into()]);
        assert!(!v.verify(&sign_hs256(b"k", &c).unwrap()).unwrap().may_bid());
    }
}
