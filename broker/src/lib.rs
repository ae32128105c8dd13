//! Gavel's broker as a library. The map:
//!
//! - [`config`]: the typed configuration (clap flags and `GAVEL_*` variables).
//! - `http`: routing and the JSON API; `ws`: the `/ws` upgrade.
//! - `session`: one connection's reader and writer tasks; `wsframe`: RFC 6455 framing.
//! - [`rooms`]: the room registry: seq, history, fan-out, viewer counts; `subscribers`: a
//!   room's copy-on-write subscriber set.
//! - [`cluster`]: the Redis adapter of cluster mode (`--redis-url`) and its auction ledger.
//! - `users`: who is online. [`outbound`]: a connection's queue and shared encoded frames.
//!
//! [`run`] serves an already-bound listener until a shutdown future resolves; [`Broker`] is the
//! same thing for applications that embed Gavel beside their own routes.

mod admin;
pub mod admission;
pub mod auction;
pub mod auth;
mod authorize;
pub mod backend_http;
pub mod backplane;
pub mod clock;
pub mod cluster;
pub mod config;
mod demo;
pub mod feed;
mod http;
pub mod inbox;
pub mod metrics;
pub mod outbound;
mod ratelimit;
pub mod rooms;
mod session;
mod sse;
pub mod store;
mod subscribers;
pub mod testing;
pub mod tls;
mod users;
pub mod webhooks;
mod ws;
mod wsframe;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gavel_protocol::{Channel, Data, UserId};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics as m;
use admission::Refused;

pub use config::Config;
pub use gavel_protocol as protocol;
pub use rooms::Published;

/// How often empty rooms are looked at for dropping.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Errors that stop the broker from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("listener failed: {0}")]
    Listener(#[from] std::io::Error),
    #[error("bid log: {0}")]
    Storage(#[from] store::StorageError),
    #[error("JWT key: {0}")]
    Key(#[from] auth::KeyError),
    #[error("--conversation-auth-url: {0}")]
    AuthorizeUrl(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cluster unavailable: {0}")]
    Backplane(#[from] backplane::BackplaneError),
}

/// The client address of a request, as the accept loop saw it (absent when an embedding
/// application serves Gavel's routes itself).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// A plain HTTP connection's place under the per-address count (see `serve_connection`),
/// reachable from its requests: an SSE stream, which holds its connection and takes a place of
/// its own, gives this one back, as an upgrade does.
#[derive(Clone)]
pub(crate) struct HttpSlot(Arc<std::sync::Mutex<Option<admission::Slot>>>);

impl HttpSlot {
    pub(crate) fn release(&self) {
        if let Ok(mut slot) = self.0.lock() {
            slot.take();
        }
    }
}

/// The body of every response the broker makes: most are whole (`Full`), an SSE event stream
/// is not.
pub type ResponseBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// State shared by every task of one broker.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) rooms: Arc<rooms::Rooms>,
    pub(crate) auctions: auction::Auctions,
    /// Verifies JWTs; `None` when no key is configured (then only anonymous access works).
    pub(crate) verifier: Option<auth::Verifier>,
    pub(crate) admission: Arc<admission::Admission>,
    /// Plain HTTP connections per address (`--max-connections-per-ip`, counted apart from
    /// WebSockets): taken at accept, given back when the connection ends or is upgraded.
    pub(crate) http_admission: Arc<admission::Admission>,
    /// The application's backend, for conversations a token does not list.
    pub(crate) authorizer: Option<authorize::Authorizer>,
    /// Set when the broker terminates TLS itself.
    tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) users: users::Users,
    /// Cancelled when shutdown begins: stops accepting, closes every connection with 1001.
    pub(crate) shutdown: CancellationToken,
    /// Every connection's tasks, so shutdown can wait for their queues to drain.
    pub(crate) tracker: TaskTracker,
    /// Every open connection, so shutdown can tell each writer to drain and close (writers do
    /// not watch the shutdown token: its mutex would be one lock for all of them).
    pub(crate) live: dashmap::DashMap<outbound::ConnId, Arc<outbound::ConnHandle>>,
    /// Open SSE sessions (the fallback transport), by the id their POSTs name.
    pub(crate) sse: sse::Sessions,
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// How room events travel between nodes: the local registry, or the cluster's Redis.
    pub(crate) backplane: Arc<dyn backplane::Backplane>,
    next_conn_id: AtomicU64,
}

impl Shared {
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn connections(&self) -> u64 {
        self.admission.open() as u64
    }

    /// Why `/readyz` says not ready, if it does.
    pub(crate) fn not_ready_reason(&self) -> Option<&'static str> {
        if self.shutdown.is_cancelled() {
            return Some("shutting down");
        }
        self.backplane.not_ready_reason()
    }
}

/// A running broker. Cheap to clone; every clone is the same broker.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

impl Broker {
    /// Builds a broker and starts its background tasks (presence updates, room sweeping,
    /// metrics upkeep). Must be called inside a Tokio runtime.
    pub fn new(config: Config) -> Result<Broker, Error> {
        config.validate()?;
        if config.redis_url.is_some() {
            // Cluster mode keeps bids in Redis: the local log is not used.
            return Broker::with_store(
                config,
                Arc::new(store::MemoryLog::default()),
                clock::Clock::System,
            );
        }
        std::fs::create_dir_all(&config.data_dir)?;
        let log: Arc<dyn store::BidLog> = Arc::new(store::SledLog::open(&config.data_dir)?);
        Broker::with_store(config, log, clock::Clock::System)
    }

    /// [`Broker::new`] with a given bid log (e.g. [`store::MemoryLog`]) and clock. In cluster
    /// mode (`redis_url` set) the log is not used: Redis holds the bids.
    pub fn with_store(
        config: Config,
        log: Arc<dyn store::BidLog>,
        clock: clock::Clock,
    ) -> Result<Broker, Error> {
        config.validate()?;
        let backend = backend_client(&config)?;
        let metrics = metrics::install();
        let shutdown = CancellationToken::new();
        let limits = rooms::RoomLimits {
            size: config.history_size,
            ttl: config.history_ttl,
            memory: config.history_memory,
            max_rooms: config.max_rooms,
        };
        let engine = auction::EngineConfig {
            bid_rate: config.bid_rate,
            bid_burst: config.bid_burst,
            group_commit: match config.group_commit {
                config::Toggle::On => store::GroupCommit::On,
                config::Toggle::Off => store::GroupCommit::Off,
            },
            archive_after: config.archive_after,
            webhooks: None,
        };
        // Stopped first at shutdown, so every queued bid is answered while its connection
        // can still carry the answer.
        let auctions_stop = CancellationToken::new();
        // The one place that knows which mode runs: the rest sees the two seams (a Ledger
        // for the auctions, a Backplane for the rooms).
        let (rooms, auctions, backplane, follow) = match &config.redis_url {
            None => {
                let rooms = Arc::new(rooms::Rooms::new(limits));
                let mut engine = engine;
                engine.webhooks = reporting(
                    &config,
                    Arc::new(webhooks::LocalOutbox::open(Arc::clone(&log))?),
                    backend.clone(),
                    clock,
                    &shutdown,
                );
                let auctions = auction::Auctions::open(
                    log,
                    Arc::clone(&rooms) as Arc<dyn auction::AuctionEvents>,
                    clock,
                    engine,
                    auctions_stop,
                )?;
                let backplane: Arc<dyn backplane::Backplane> =
                    Arc::new(backplane::LocalBackplane::new(Arc::clone(&rooms)));
                (rooms, auctions, backplane, None)
            }
            Some(url) => {
                let started = cluster::Cluster::start(
                    cluster::ClusterConfig {
                        url: url.clone(),
                        prefix: config.cluster_prefix.clone(),
                        node_id: config
                            .node_id
                            .clone()
                            .unwrap_or_else(|| cluster::default_node_id(config.listen)),
                        node_ttl: config.node_ttl,
                        history_size: config.history_size,
                        presence_interval: config.presence_interval,
                    },
                    limits,
                    shutdown.child_token(),
                )?;
                let mut engine = engine;
                engine.webhooks = reporting(
                    &config,
                    Arc::new(cluster::outbox::RedisOutbox::new(
                        Arc::clone(&started.cluster),
                        config.webhook_timeout,
                    )),
                    backend.clone(),
                    clock,
                    &shutdown,
                );
                let auctions = auction::Auctions::new(
                    Arc::new(cluster::ledger::RedisLedger::new(Arc::clone(
                        &started.cluster,
                    ))),
                    clock,
                    engine,
                    auctions_stop,
                );
                let backplane: Arc<dyn backplane::Backplane> = Arc::clone(&started.cluster) as _;
                (
                    started.rooms,
                    auctions,
                    backplane,
                    Some((started.cluster, started.control_rx)),
                )
            }
        };
        let verifier = verifier(&config)?;
        if verifier.is_none() {
            tracing::warn!("no --jwt-secret or --jwt-public-key: nobody can authenticate");
        }
        if config.demo {
            tracing::warn!(
                "--demo: /demo/ is on and hands a bidder token to anyone who asks; development only"
            );
        }
        let admission = Arc::new(admission::Admission::new(
            config.max_connections,
            config.max_connections_per_ip,
        ));
        tracing::info!(max_connections = admission.max_total(), "connection limit");
        let authorizer = config
            .conversation_auth_url
            .as_deref()
            .map(|url| {
                authorize::Authorizer::new(url, config.conversation_auth_cache, backend.clone())
            })
            .transpose()
            .map_err(Error::AuthorizeUrl)?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let shared = Arc::new(Shared {
            rooms,
            auctions,
            verifier,
            admission,
            http_admission: Arc::new(admission::Admission::new(
                usize::MAX,
                config.max_connections_per_ip,
            )),
            authorizer,
            tls,
            users: users::Users::default(),
            shutdown,
            tracker: TaskTracker::new(),
            live: dashmap::DashMap::new(),
            sse: sse::Sessions::new(),
            metrics,
            backplane,
            next_conn_id: AtomicU64::new(1),
            config,
        });
        if let Some((cluster, control_rx)) = follow {
            tokio::spawn(cluster::follow_auctions(
                cluster,
                Arc::clone(&shared),
                control_rx,
            ));
        }
        if let Some(handle) = &shared.metrics {
            metrics::spawn_upkeep(handle.clone(), shared.shutdown.clone());
        }
        spawn_every(&shared, shared.config.presence_interval, |s| {
            s.backplane.presence_tick()
        });
        spawn_every(&shared, SWEEP_INTERVAL, |s| {
            s.rooms.sweep();
            s.auctions.prune();
            s.auctions.record_counts();
            crate::metrics::record_process();
            let ready = s.not_ready_reason().is_none();
            ::metrics::gauge!(crate::metrics::READY).set(if ready { 1.0 } else { 0.0 });
        });
        Ok(Broker { shared })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Accepts connections on `listener` until [`Broker::shutdown`] begins.
    pub async fn serve(&self, listener: TcpListener) -> Result<(), Error> {
        let shutdown = self.shared.shutdown.clone();
        let mut spare = admission::SpareDescriptor::open();
        let mut shed_log = admission::ShedLog::default();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) if admission::out_of_descriptors(&error) && spare.release() => {
                        // The waiting connection gets the reserve descriptor, a 503 and a close.
                        let waiting = Duration::from_millis(100);
                        let accepted = tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            accepted = tokio::time::timeout(waiting, listener.accept()) => accepted,
                        };
                        if let Ok(Ok((stream, _))) = accepted {
                            ::metrics::counter!(m::CONNECTIONS_SHED).increment(1);
                            shed_log.shed();
                            admission::shed(stream, self.shared.tls.is_some());
                        }
                        spare.refill();
                        continue;
                    }
                    Err(error) => {
                        // Out of file descriptors with no reserve left, and the like: back off,
                        // keep serving.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        spare.refill();
                        continue;
                    }
                },
            };
            let broker = self.clone();
            self.shared.tracker.spawn(async move {
                broker.serve_connection(stream, peer).await;
            });
        }
    }

    async fn serve_connection(&self, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        let _ = stream.set_nodelay(true);
        // With a per-address limit, plain HTTP connections count too (apart from WebSockets,
        // whose upgrade takes a place of its own): otherwise one address could hold every
        // file descriptor with idle keep-alive connections. The place is held until the
        // connection ends (or is upgraded: the WebSocket's place takes over).
        let admitted = (self.shared.config.max_connections_per_ip > 0)
            .then(|| self.shared.http_admission.admit(Some(peer.ip())));
        let (slot, refused) = match admitted {
            Some(Ok(slot)) => (Some(slot), None),
            Some(Err(refused)) => (None, Some(refused)),
            None => (None, None),
        };
        // An SSE stream takes a place of its own and gives this one back (see `HttpSlot`).
        let slot = HttpSlot(Arc::new(std::sync::Mutex::new(slot)));
        match &self.shared.tls {
            None => self.serve_http(stream, peer, refused, slot).await,
            // Refused: no TLS handshake to pay for (and to hold the socket through).
            Some(_) if refused.is_some() => {}
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                match tokio::time::timeout(self.shared.config.handshake_timeout, handshake).await {
                    Ok(Ok(stream)) => self.serve_http(stream, peer, refused, slot).await,
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
    }

    /// Serves HTTP on `io`; with `refused`, one request only, answered 503.
    async fn serve_http<I>(
        &self,
        io: I,
        peer: std::net::SocketAddr,
        refused: Option<Refused>,
        slot: HttpSlot,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let broker = self.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            req.extensions_mut().insert(slot.clone());
            let broker = broker.clone();
            async move {
                Ok::<_, Infallible>(match refused {
                    None => broker.handle(req).await,
                    Some(refused) => {
                        ::metrics::counter!(m::HTTP_REQUESTS, "route" => "refused", "status" => "5xx")
                            .increment(1);
                        ws::refused_connection(refused).map(BodyExt::boxed)
                    }
                })
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .keep_alive(refused.is_none())
            .header_read_timeout(match refused {
                None => self.shared.config.handshake_timeout,
                // A refused connection gets little time to say what it wanted.
                Some(_) => Duration::from_secs(1),
            });
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        let shutdown = self.shared.shutdown.clone();
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "http connection ended with an error");
                }
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// Answers one HTTP request: `/ws` upgrades, `/sse` event streams, the JSON API,
    /// `/metrics`. Use it to serve Gavel's routes from an application's own hyper server.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        http::handle(&self.shared, req).await
    }

    /// Publishes an event into `channel`'s room, as `POST /api/publish` does. On a single
    /// node the event is queued for every subscriber before this returns. In cluster mode it
    /// goes out through Redis in the background and the returned seq is 0: use
    /// [`Broker::publish_event`] there.
    pub fn publish(&self, channel: &Channel, event: &str, data: impl Into<Data>) -> Published {
        self.shared
            .backplane
            .publish_detached(channel, event, data.into())
    }

    /// Publishes an event and returns its seq, on a single node or through the cluster.
    pub async fn publish_event(
        &self,
        channel: &Channel,
        event: &str,
        data: impl Into<Data>,
    ) -> Result<Published, Error> {
        Ok(self
            .shared
            .backplane
            .publish(channel, event, None, data.into())
            .await?)
    }

    /// Publishes an event to one user's `user:{id}` channel (every connection of theirs).
    pub fn publish_to_user(&self, user: &UserId, event: &str, data: impl Into<Data>) -> Published {
        self.publish(&Channel::user(user), event, data)
    }

    /// The auctions, for applications that manage them in-process.
    pub fn auctions(&self) -> &auction::Auctions {
        &self.shared.auctions
    }

    /// The room registry, for inspection (viewer counts, seq, presence).
    pub fn rooms(&self) -> &rooms::Rooms {
        &self.shared.rooms
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> u64 {
        self.shared.connections()
    }

    /// Open connections of `user` on this node.
    pub fn user_connections(&self, user: &UserId) -> u32 {
        self.shared.users.connections(user)
    }

    /// Shuts down: stops accepting, sends close 1001 to every client after its queued frames,
    /// and waits (at most the configured shutdown timeout) for every connection to finish.
    pub async fn shutdown(&self) {
        tracing::info!("shutting down");
        ::metrics::gauge!(crate::metrics::READY).set(0.0);
        // Auctions first: each answers the bids already queued and makes them durable, while
        // the connections that wait for those answers are still open.
        self.shared.auctions.shut_down().await;
        self.shared.shutdown.cancel();
        for conn in self.shared.live.iter() {
            conn.drain();
        }
        self.shared.tracker.close();
        let timeout = self.shared.config.shutdown_timeout;
        if tokio::time::timeout(timeout, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(?timeout, "connections still open at the shutdown deadline");
        }
        tracing::info!("shut down");
    }
}

fn verifier(config: &Config) -> Result<Option<auth::Verifier>, Error> {
    let verifier = match (&config.jwt_secret, &config.jwt_public_key) {
        (Some(secret), _) => auth::Verifier::hs256(secret.as_bytes()),
        (None, Some(path)) => auth::Verifier::from_public_key_file(path)?,
        (None, None) => return Ok(None),
    };
    let verifier = match &config.jwt_issuer {
        Some(issuer) => verifier.with_issuer(issuer),
        None => verifier,
    };
    Ok(Some(match &config.jwt_audience {
        Some(audience) => verifier.with_audience(audience),
        None => verifier,
    }))
}

/// Runs `work` on `shared` every `period` until shutdown.
fn spawn_every(shared: &Arc<Shared>, period: Duration, work: fn(&Shared)) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => work(&shared),
                _ = shared.shutdown.cancelled() => break,
            }
        }
    });
}

/// Checks `config` as a start would, without starting anything: its values and rules, the JWT
/// key file, the TLS certificate and key, the backend CA, the URLs (`--redis-url`,
/// `--conversation-auth-url`) and that `--data-dir` can be created. What only a running node
/// can find (a reachable Redis, a bid log not locked by another process) is left to the start.
pub fn check(config: &Config) -> Result<(), Error> {
    config.validate()?;
    backend_client(config)?;
    verifier(config)?;
    if let Some(url) = &config.conversation_auth_url {
        backend_http::parse_url(url).map_err(Error::AuthorizeUrl)?;
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        tls::acceptor(cert, key)?;
    }
    match &config.redis_url {
        Some(url) => cluster::check_url(url)?,
        None => std::fs::create_dir_all(&config.data_dir)?,
    }
    Ok(())
}

/// Serves `listener` with `config` until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let broker = Broker::new(config)?;
    tracing::info!(addr = %listener.local_addr()?, "gavel broker listening");
    tokio::select! {
        result = broker.serve(listener) => result?,
        _ = shutdown => {}
    }
    broker.shutdown().await;
    Ok(())
}

/// The client for calls to the backend (webhooks, conversation authorization): TLS is set up
/// when one of their URLs is https or `--backend-ca` is given, and a bad CA file stops start-up.
fn backend_client(config: &Config) -> Result<backend_http::Backend, Error> {
    let urls = [&config.webhook_url, &config.conversation_auth_url];
    let https = urls
        .into_iter()
        .flatten()
        .any(|url| backend_http::parse_url(url).is_ok_and(|url| url.scheme_str() == Some("https")));
    if !https && config.backend_ca.is_none() {
        return Ok(backend_http::Backend::new(None));
    }
    let tls = tls::client_config(config.backend_ca.as_deref())?;
    Ok(backend_http::Backend::new(Some(tls)))
}

/// With `--webhook-url` (validated before): starts the deliverer over `outbox` and tells the
/// auction engine what to report.
fn reporting(
    config: &Config,
    outbox: Arc<dyn webhooks::Outbox>,
    backend: backend_http::Backend,
    clock: clock::Clock,
    shutdown: &CancellationToken,
) -> Option<webhooks::Reporting> {
    let url = backend_http::parse_url(config.webhook_url.as_deref()?).ok()?;
    let settings = webhooks::WebhookConfig {
        url,
        secret: config.webhook_secret.clone()?,
        bids: config.webhook_bids,
        timeout: config.webhook_timeout,
        max_backoff: config.webhook_max_backoff,
        concurrency: config.webhook_concurrency,
        backend,
    };
    let wake =
        webhooks::Deliverer::start(Arc::clone(&outbox), settings, clock, shutdown.child_token());
    Some(webhooks::Reporting {
        bids: config.webhook_bids,
        wake,
        outbox,
    })
}
