//! The broker's configuration: one typed struct, parsed from flags and `GAVEL_*` environment
//! variables by clap, with built-in defaults for the embedded single-node setup.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};

/// An on/off switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 250ms, 15s, 5m)"))
}

/// Gavel: a real-time broker for live auctions and marketplaces.
///
/// Every option can also be set through the environment variable shown beside it.
#[derive(Clone, Parser)]
#[command(name = "gavel-broker", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket (`/ws`) connections.
    #[arg(long, env = "GAVEL_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// Key that backends must send (`Authorization: Bearer KEY` or `X-Api-Key: KEY`) for
    /// everything under `/api/` (publish, stats, rooms, users, auctions). A JWT with the `admin`
    /// role is accepted there too; with neither configured, `/api/` answers 401.
    #[arg(long, env = "GAVEL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// How often the broker pings each client.
    #[arg(long, env = "GAVEL_PING_INTERVAL", default_value = "15s", value_parser = duration)]
    pub ping_interval: Duration,

    /// A connection from which nothing (not even a pong) arrives for this long is closed
    /// (close code 4000) and leaves its rooms.
    #[arg(long, env = "GAVEL_IDLE_TIMEOUT", default_value = "45s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// Frames queued for one connection (replies, signals), or events it may lag behind in one
    /// room, before it counts as a slow consumer and is closed (close code 4001).
    #[arg(long, env = "GAVEL_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Bytes queued for one connection (encoded frames not yet written), or of events it may lag
    /// behind in one room (their MessagePack size), before it counts as a slow consumer and is
    /// closed (4001). A `since` replay larger than this is not sent: the
    /// subscribe answers `recovered: false` with a snapshot instead.
    #[arg(long, env = "GAVEL_OUTBOUND_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub outbound_bytes: usize,

    /// A socket write that does not finish within this time marks a slow consumer; the socket
    /// is dropped without a close frame (it may have stopped mid-frame).
    #[arg(long, env = "GAVEL_WRITE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub write_timeout: Duration,

    /// Largest WebSocket message a client may send, in bytes (larger: close 1009). Also caps
    /// the `data` of an HTTP publish.
    #[arg(long, env = "GAVEL_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_message_size: usize,

    /// Rooms one connection may be subscribed to at once.
    #[arg(long, env = "GAVEL_MAX_SUBSCRIPTIONS", default_value_t = 128)]
    pub max_subscriptions: usize,

    /// Events each room keeps for `since` recovery.
    #[arg(long, env = "GAVEL_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,

    /// How long a room keeps an event for `since` recovery. A room with no subscribers is
    /// dropped once its history has aged out and this long has passed since its last
    /// subscriber left.
    #[arg(long, env = "GAVEL_HISTORY_TTL", default_value = "5m", value_parser = duration)]
    pub history_ttl: Duration,

    /// Bytes of event history kept across all rooms (each event counted as its data plus its
    /// MessagePack frame, plus 256). Checked every second: over it, histories are emptied
    /// (oldest events first) down to 90 % of it, rooms nobody is subscribed to first; a `since`
    /// into them gets a snapshot, as after `--history-ttl`. 0: no limit.
    #[arg(long, env = "GAVEL_HISTORY_MEMORY", default_value_t = 256 * 1024 * 1024)]
    pub history_memory: usize,

    /// Rooms kept in memory. Over it, rooms nobody is subscribed to and inactive for 30 s are
    /// dropped before `--history-ttl` (empty ones first, then the least recently active), their
    /// history and epoch with them; rooms with subscribers and live auctions' rooms always
    /// stay. 0: no limit.
    #[arg(long, env = "GAVEL_MAX_ROOMS", default_value_t = 100_000)]
    pub max_rooms: usize,

    /// Viewer-count updates are coalesced: at most one per room per interval.
    #[arg(long, env = "GAVEL_PRESENCE_INTERVAL", default_value = "250ms", value_parser = duration)]
    pub presence_interval: Duration,

    /// On SIGTERM/SIGINT, how long to wait for queued writes to drain before exiting anyway.
    #[arg(long, env = "GAVEL_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub shutdown_timeout: Duration,

    /// Directory of the durable bid log (sled). Created if missing.
    #[arg(long, env = "GAVEL_DATA_DIR", default_value = "gavel-data")]
    pub data_dir: PathBuf,

    /// Bids per second each user may place (token bucket refill rate).
    #[arg(long, env = "GAVEL_BID_RATE", default_value_t = 5.0)]
    pub bid_rate: f64,

    /// Bids a user may place in a burst before the rate applies.
    #[arg(long, env = "GAVEL_BID_BURST", default_value_t = 10)]
    pub bid_burst: u32,

    /// Group commit: bids arriving while the bid log flushes share the next flush. `off`
    /// flushes once per bid (slower; for comparison).
    #[arg(long, env = "GAVEL_GROUP_COMMIT", value_enum, default_value_t = Toggle::On)]
    pub group_commit: Toggle,

    /// How long an ended or cancelled auction stays live (its task, room and state in memory)
    /// before it is archived: its record and bids stay on disk, and retries and reads are
    /// answered from there.
    #[arg(long, env = "GAVEL_ARCHIVE_AFTER", default_value = "10m", value_parser = duration)]
    pub archive_after: Duration,

    /// Serve HTTPS and `wss://` with this PEM certificate chain (with --tls-key).
    #[arg(long, env = "GAVEL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "GAVEL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Shared secret for HS256 JWTs (from the `Authorization: Bearer` header, a `token` query
    /// parameter, or an `auth` frame).
    #[arg(long, env = "GAVEL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key file for RS256 or ES256 JWTs (instead of --jwt-secret).
    #[arg(long, env = "GAVEL_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    pub jwt_public_key: Option<PathBuf>,

    /// Required `iss` claim, if set: tokens without it, or with another value, are refused.
    #[arg(long, env = "GAVEL_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, if set: tokens without it, or without this value, are refused.
    #[arg(long, env = "GAVEL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Ask this backend URL (`http(s)://host:port/path`) whether a user may join a conversation
    /// their token does not list: POST `{"user", "channel"}`, 200 allows, 403 or 404 denies.
    #[arg(long, env = "GAVEL_CONVERSATION_AUTH_URL")]
    pub conversation_auth_url: Option<String>,

    /// How long the backend's answers are cached.
    #[arg(long, env = "GAVEL_CONVERSATION_AUTH_CACHE", default_value = "30s", value_parser = duration)]
    pub conversation_auth_cache: Duration,

    /// Let connections without a token in: read-only (watch auctions and broadcasts; no bids,
    /// no conversations, no personal channel).
    #[arg(long, env = "GAVEL_ALLOW_ANONYMOUS", value_parser = BoolishValueParser::new())]
    pub allow_anonymous: bool,

    /// Serve the live auction demo page at /demo/ with its development helpers: a public list of
    /// auctions and their bid logs, and a bidder token for anyone who asks (signed with
    /// --jwt-secret, which it needs). Development only: never on a broker users can reach.
    #[arg(long, env = "GAVEL_DEMO", value_parser = BoolishValueParser::new())]
    pub demo: bool,

    /// Without --allow-anonymous, a connection that has not authenticated this long after the
    /// upgrade is closed (4002).
    #[arg(long, env = "GAVEL_AUTH_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub auth_timeout: Duration,

    /// After a live connection's token expires, how long it has to send a fresh one (`auth`)
    /// before it is closed (4003).
    #[arg(long, env = "GAVEL_TOKEN_GRACE", default_value = "30s", value_parser = duration)]
    pub token_grace: Duration,

    /// Most WebSocket connections at once; more are refused with 503 and Retry-After. 0: the
    /// process's open-file limit (raised to its hard limit at start) minus 64.
    #[arg(long, env = "GAVEL_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Most WebSocket connections from one IP address (503 beyond). Plain HTTP connections
    /// (API calls, pages, the handshake before an upgrade) from one address are held to the
    /// same number, counted apart. 0: no per-address limit (the default, since clients behind
    /// a proxy or NAT share addresses).
    #[arg(long, env = "GAVEL_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Messages per second one connection may send (token bucket refill). Excess messages get
    /// `rate_limited`; a connection that keeps it up is closed with 1008.
    #[arg(long, env = "GAVEL_CLIENT_RATE", default_value_t = 50.0)]
    pub client_rate: f64,

    /// Messages one connection may send in a burst before --client-rate applies.
    #[arg(long, env = "GAVEL_CLIENT_BURST", default_value_t = 100)]
    pub client_burst: u32,

    /// How long a client may take to send its HTTP request head (slowloris guard).
    #[arg(long, env = "GAVEL_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,

    /// Origins allowed to open WebSockets and call the API from a browser (comma-separated,
    /// e.g. `https://shop.example`). Empty: any origin. Requests without `Origin` (non-browser
    /// clients) are always allowed.
    #[arg(long, env = "GAVEL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Cluster mode: the Redis every node of the cluster shares (e.g. `redis://10.0.0.5:6379/0`).
    /// Unset: a single node, nothing but local disk. Set: Redis orders room events and bids
    /// cluster-wide and holds the bid log (run it with `appendonly yes`, `appendfsync always`).
    #[arg(long, env = "GAVEL_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Cluster mode: prefix of every Redis key and channel, so clusters can share one Redis.
    #[arg(long, env = "GAVEL_CLUSTER_PREFIX", default_value = "gavel")]
    pub cluster_prefix: String,

    /// Cluster mode: this node's name in Redis. Default: the listen address plus a random
    /// suffix, new at every start.
    #[arg(long, env = "GAVEL_NODE_ID")]
    pub node_id: Option<String>,

    /// Cluster mode: a node that dies leaves the cluster's viewer counts within this time.
    /// Nodes heartbeat every quarter of it; one silent for three quarters is taken for dead.
    #[arg(long, env = "GAVEL_NODE_TTL", default_value = "10s", value_parser = duration)]
    pub node_ttl: Duration,

    /// Results to the backend: POST a signed JSON webhook (`auction.ended`: winner, price,
    /// reserve met, bid count) to this `http(s)://host:port/path` when an auction ends, from a
    /// durable outbox written with the bids, retried with exponential backoff until a 2xx
    /// answer, across restarts (in cluster mode the outbox is in Redis, and any node delivers).
    #[arg(long, env = "GAVEL_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// The key that signs webhooks (HMAC-SHA256 in the `Gavel-Signature` header), at least 16
    /// bytes. Required with --webhook-url.
    #[arg(long, env = "GAVEL_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Also send a `bid.accepted` webhook for every accepted bid (automatic ones included).
    #[arg(long, env = "GAVEL_WEBHOOK_BIDS", value_parser = BoolishValueParser::new())]
    pub webhook_bids: bool,

    /// How long one webhook attempt (connect, POST, answer) may take before it counts as failed.
    #[arg(long, env = "GAVEL_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub webhook_timeout: Duration,

    /// The longest wait between two attempts of one webhook: the first retry comes 1 s after a
    /// failure, then 2 s, 4 s, ... up to this.
    #[arg(long, env = "GAVEL_WEBHOOK_MAX_BACKOFF", default_value = "10m", value_parser = duration)]
    pub webhook_max_backoff: Duration,

    /// A PEM file of CA certificates to trust for https backend URLs (--webhook-url,
    /// --conversation-auth-url), besides the system's: for a backend behind a private CA.
    #[arg(long, env = "GAVEL_BACKEND_CA")]
    pub backend_ca: Option<PathBuf>,

    /// Webhook attempts this node makes at once (1 to 256). With --webhook-bids a receiver
    /// that answers in 20 ms takes 50 webhooks/s per attempt in flight.
    #[arg(long, env = "GAVEL_WEBHOOK_CONCURRENCY", default_value_t = 8)]
    pub webhook_concurrency: usize,

    /// Log format.
    #[arg(long, env = "GAVEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `gavel_broker=debug`).
    #[arg(long, env = "GAVEL_LOG", default_value = "info")]
    pub log: String,

    /// Check the configuration as a start would (values, key and certificate files, URLs, the
    /// data dir), print it (secrets redacted) and exit: 0 when it would start, 1 (with the
    /// reason) when not. A reachable Redis is not checked.
    #[arg(long)]
    pub check_config: bool,
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} must be {rule} (got {value})")]
    OutOfRange {
        name: &'static str,
        rule: &'static str,
        value: String,
    },
}

impl Config {
    /// The defaults, as `gavel-broker` with no flags and no environment would run.
    pub fn defaults() -> Config {
        Config::parse_from_defaults()
    }

    fn parse_from_defaults() -> Config {
        // Parsing an empty command line cannot fail: every field has a default or is optional.
        // Environment variables are not consulted here.
        let mut cmd = <Config as clap::CommandFactory>::command();
        cmd = cmd.mut_args(|a| a.env(None::<&str>));
        let matches = cmd
            .try_get_matches_from(["gavel-broker"])
            .expect("built-in defaults parse");
        <Config as clap::FromArgMatches>::from_arg_matches(&matches).expect("built-in defaults")
    }

    /// Checks values that parse but cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(name: &'static str, rule: &'static str, value: impl fmt::Debug) -> ConfigError {
            ConfigError::OutOfRange {
                name,
                rule,
                value: format!("{value:?}"),
            }
        }
        if self.outbound_queue == 0 {
            return Err(bad("--outbound-queue", "at least 1", self.outbound_queue));
        }
        if self.demo && self.jwt_secret.is_none() {
            return Err(bad(
                "--demo",
                "used with --jwt-secret (it signs the demo's tokens)",
                "no --jwt-secret",
            ));
        }
        if self.outbound_bytes < 64 * 1024 {
            return Err(bad(
                "--outbound-bytes",
                "at least 65536",
                self.outbound_bytes,
            ));
        }
        if self.max_message_size < 256 {
            return Err(bad(
                "--max-message-size",
                "at least 256 bytes",
                self.max_message_size,
            ));
        }
        if self.ping_interval.is_zero() {
            return Err(bad("--ping-interval", "above zero", self.ping_interval));
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(bad(
                "--idle-timeout",
                "longer than --ping-interval",
                self.idle_timeout,
            ));
        }
        if self.write_timeout.is_zero() {
            return Err(bad("--write-timeout", "above zero", self.write_timeout));
        }
        if self.node_ttl < Duration::from_millis(300) {
            return Err(bad("--node-ttl", "at least 300ms", self.node_ttl));
        }
        if self.cluster_prefix.is_empty() || self.cluster_prefix.contains(char::is_whitespace) {
            return Err(bad(
                "--cluster-prefix",
                "non-empty, without spaces",
                &self.cluster_prefix,
            ));
        }
        if let Some(url) = &self.webhook_url {
            if crate::backend_http::parse_url(url).is_err() {
                return Err(bad("--webhook-url", "http(s)://host:port/path", url));
            }
            if self.webhook_secret.as_ref().is_none_or(|s| s.len() < 16) {
                return Err(bad(
                    "--webhook-secret",
                    "set, at least 16 bytes, with --webhook-url",
                    "missing or short",
                ));
            }
        }
        if self.webhook_timeout.is_zero() || self.webhook_max_backoff < Duration::from_secs(1) {
            return Err(bad(
                "--webhook-timeout / --webhook-max-backoff",
                "above zero / at least 1s",
                (self.webhook_timeout, self.webhook_max_backoff),
            ));
        }
        if !(1..=256).contains(&self.webhook_concurrency) {
            return Err(bad(
                "--webhook-concurrency",
                "1 to 256",
                self.webhook_concurrency,
            ));
        }
        if self.presence_interval.is_zero() {
            return Err(bad(
                "--presence-interval",
                "above zero",
                self.presence_interval,
            ));
        }
        if self.history_size == 0 {
            return Err(bad("--history-size", "at least 1", self.history_size));
        }
        if self.max_subscriptions == 0 {
            return Err(bad(
                "--max-subscriptions",
                "at least 1",
                self.max_subscriptions,
            ));
        }
        if !(self.client_rate > 0.0 && self.client_rate.is_finite()) {
            return Err(bad("--client-rate", "a positive number", self.client_rate));
        }
        if self.client_burst == 0 {
            return Err(bad("--client-burst", "at least 1", self.client_burst));
        }
        if self.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(bad("--jwt-secret", "at least 16 characters", "<redacted>"));
        }
        if !(self.bid_rate > 0.0 && self.bid_rate.is_finite()) {
            return Err(bad("--bid-rate", "a positive number", self.bid_rate));
        }
        if self.bid_burst == 0 {
            return Err(bad("--bid-burst", "at least 1", self.bid_burst));
        }
        if self.api_key.as_deref().is_some_and(|k| k.len() < 16) {
            return Err(bad("--api-key", "at least 16 characters", "<redacted>"));
        }
        Ok(())
    }
}

/// A Redis URL without its password.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}<redacted>{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("ping_interval", &self.ping_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("outbound_queue", &self.outbound_queue)
            .field("outbound_bytes", &self.outbound_bytes)
            .field("write_timeout", &self.write_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("history_size", &self.history_size)
            .field("history_ttl", &self.history_ttl)
            .field("history_memory", &self.history_memory)
            .field("max_rooms", &self.max_rooms)
            .field("presence_interval", &self.presence_interval)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("data_dir", &self.data_dir)
            .field("bid_rate", &self.bid_rate)
            .field("bid_burst", &self.bid_burst)
            .field("group_commit", &self.group_commit)
            .field("archive_after", &self.archive_after)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("conversation_auth_url", &self.conversation_auth_url)
            .field("conversation_auth_cache", &self.conversation_auth_cache)
            .field("allow_anonymous", &self.allow_anonymous)
            .field("demo", &self.demo)
            .field("auth_timeout", &self.auth_timeout)
            .field("token_grace", &self.token_grace)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("client_rate", &self.client_rate)
            .field("client_burst", &self.client_burst)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("allowed_origins", &self.allowed_origins)
            .field(
                "redis_url",
                &self.redis_url.as_ref().map(|url| redact_url(url)),
            )
            .field("cluster_prefix", &self.cluster_prefix)
            .field("node_id", &self.node_id)
            .field("node_ttl", &self.node_ttl)
            .field("webhook_url", &self.webhook_url)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("webhook_bids", &self.webhook_bids)
            .field("webhook_timeout", &self.webhook_timeout)
            .field("webhook_max_backoff", &self.webhook_max_backoff)
            .field("webhook_concurrency", &self.webhook_concurrency)
            .field("backend_ca", &self.backend_ca)
            .field("log_format", &self.log_format)
            .field("log", &self.log)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let c = Config::defaults();
        c.validate().unwrap();
        assert!(c.listen.ip().is_loopback());
        assert!(c.api_key.is_none());
    }

    #[test]
    fn debug_redacts_the_api_key() {
        let mut c = Config::defaults();
        c.api_key = Some("super-secret-key-123".into());
        assert!(!format!("{c:?}").contains("super-secret"));
    }

    #[test]
    fn flags_parse_durations() {
        let c = Config::try_parse_from(["gavel-broker", "--ping-interval", "100ms"]).unwrap();
        assert_eq!(c.ping_interval, Duration::from_millis(100));
        assert!(Config::try_parse_from(["gavel-broker", "--ping-interval", "soon"]).is_err());
    }

    #[test]
    fn webhook_concurrency_is_1_to_256() {
        let mut c = Config::defaults();
        for (n, valid) in [(0, false), (1, true), (256, true), (257, false)] {
            c.webhook_concurrency = n;
            assert_eq!(c.validate().is_ok(), valid, "{n}");
        }
    }

    #[test]
    fn idle_timeout_must_exceed_ping_interval() {
        let mut c = Config::defaults();
        c.idle_timeout = c.ping_interval;
        assert!(c.validate().is_err());
    }
}
