//! Asking the application's backend whether a user may join a conversation: an HTTP POST to
//! `--conversation-auth-url` with `{"user", "channel"}`, answered 200 (allow, unless the JSON
//! body says `"allow": false`) or 403/404 (deny). Answers are cached for a short time; a backend
//! that fails or times out means deny (fail closed) and is not cached.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use gavel_protocol::{Channel, UserId};
use hyper::{StatusCode, Uri};

use crate::backend_http::Backend;

/// How long one call to the backend may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries kept before the cache is cleared (it refills from the backend).
const CACHE_MAX: usize = 100_000;

pub struct Authorizer {
    url: Uri,
    backend: Backend,
    ttl: Duration,
    cache: DashMap<(UserId, Channel), (bool, Instant)>,
}

/// Why the backend gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("the authorization backend did not answer in time")]
    Timeout,
    #[error("the authorization backend failed: {0}")]
    Failed(String),
}

impl Authorizer {
    /// `url` must be `http(s)://host:port/path`.
    pub fn new(url: &str, ttl: Duration, backend: Backend) -> Result<Authorizer, String> {
        let url = crate::backend_http::parse_url(url)?;
        Ok(Authorizer {
            url,
            backend,
            ttl,
            cache: DashMap::new(),
        })
    }

    /// May `user` join `channel`? From the cache, or the backend.
    pub async fn allowed(&self, user: &UserId, channel: &Channel) -> Result<bool, AuthorizeError> {
        let key = (user.clone(), channel.clone());
        if let Some(entry) = self.cache.get(&key) {
            if entry.1.elapsed() < self.ttl {
                return Ok(entry.0);
            }
        }
        let allowed = tokio::time::timeout(CALL_TIMEOUT, self.ask(user, channel))
            .await
            .map_err(|_| AuthorizeError::Timeout)??;
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(key, (allowed, Instant::now()));
        Ok(allowed)
    }

    async fn ask(&self, user: &UserId, channel: &Channel) -> Result<bool, AuthorizeError> {
        let body = serde_json::json!({ "user": user, "channel": channel }).to_string();
        let (status, bytes) = self
            .backend
            .post_json(&self.url, &[], body)
            .await
            .map_err(AuthorizeError::Failed)?;
        match status {
            StatusCode::OK => {
                let verdict: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
                Ok(verdict
                    .and_then(|v| v.get("allow").and_then(|a| a.as_bool()))
                    .unwrap_or(true))
            }
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Ok(false),
            other => Err(AuthorizeError::Failed(format!("status {other}"))),
        }
    }
}
