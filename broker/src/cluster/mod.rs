//! The cluster adapter (`--redis-url`): makes nodes that share one Redis act as one broker.
//! It owns this node's Redis connections, which rooms the node follows in Redis (only those
//! with local subscribers), the replication of their events into the local room registry,
//! cluster presence (heartbeats, per-node shares, dead-node reaping) and the node's readiness.
//! The auction ledger that orders bids cluster-wide is in [`ledger`].

mod follow;
pub mod ledger;
pub mod outbox;
mod presence;
mod pubsub;
mod relay;
mod replica;
mod scripts;
mod wire;

pub(crate) use follow::follow_auctions;
pub use wire::OutgoingEvent;
use wire::{parse_event, parse_image, parse_viewers, Signal};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use gavel_protocol::{Channel, Data, ServerFrame, UserId, ViewerCounts};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::backplane::{BackplaneError, BackplaneFuture};
use crate::clock::now_ms;
use crate::metrics as m;
use crate::outbound::ViewerKey;
use crate::rooms::{Incoming, Published, Rooms, SignalRelay, Skip};
use replica::{Delivery, Replicas, RoomImage};

/// How long a Redis command may take before the adapter counts Redis as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the pub/sub connection is pinged, to find a connection that died silently.
const PUBSUB_PING: Duration = Duration::from_secs(1);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a room may fail to resync before the whole pub/sub connection is redone.
const RESYNC_GIVE_UP: Duration = Duration::from_secs(10);
/// Bounds of the adapter's queues: past them a request is refused (`cluster_unavailable`) or,
/// for what no client waits on, counted and dropped (see each use).
const RELAY_QUEUE: usize = 4096;
const SUBSCRIPTION_QUEUE: usize = 1024;
const CONTROL_QUEUE: usize = 4096;
const DETACHED_QUEUE: usize = 4096;
/// Most signals or detached publishes sent to Redis in one pipelined round trip.
const PIPELINE_MAX: usize = 128;
/// A room's sequence keys live this long in Redis after its last event or sync.
const ROOM_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// A cluster failure as callers see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster's Redis is unreachable: {0}")]
    Unavailable(String),
    #[error("invalid --redis-url: {0}")]
    Url(String),
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
}

impl From<redis::RedisError> for ClusterError {
    fn from(error: redis::RedisError) -> ClusterError {
        ClusterError::Unavailable(error.to_string())
    }
}

/// Whether `url` is a Redis URL the adapter can use (without connecting).
pub fn check_url(url: &str) -> Result<(), ClusterError> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| ClusterError::Url(e.to_string()))
}

/// Settings of the adapter.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub url: String,
    pub prefix: String,
    pub node_id: String,
    pub node_ttl: Duration,
    pub history_size: usize,
    pub presence_interval: Duration,
}

/// Auction notices from other nodes, for the auction registry.
#[derive(Debug)]
pub enum Control {
    /// An auction was created.
    Created(String),
    /// An auction's record changed: now at this version.
    Changed(String, u64),
    /// The pub/sub connection is (again) subscribed: notices may have been missed.
    Resubscribed,
}

struct Scripts {
    publish: Script,
    sync_room: Script,
    presence: Script,
    heartbeat: Script,
    reap: Script,
    lock: Script,
    unlock: Script,
    read_auction: Script,
    commit: Script,
    create_auction: Script,
    find_bids: Script,
    update_webhook: Script,
}

impl Scripts {
    fn load() -> Scripts {
        use scripts::*;
        Scripts {
            publish: Script::new(&with_helpers(PUBLISH)),
            sync_room: Script::new(SYNC_ROOM),
            presence: Script::new(&with_helpers(PRESENCE)),
            heartbeat: Script::new(&with_helpers(HEARTBEAT)),
            reap: Script::new(&with_helpers(REAP)),
            lock: Script::new(&with_helpers(LOCK)),
            unlock: Script::new(UNLOCK),
            read_auction: Script::new(READ_AUCTION),
            commit: Script::new(&with_helpers(COMMIT)),
            create_auction: Script::new(CREATE_AUCTION),
            find_bids: Script::new(FIND_BIDS),
            update_webhook: Script::new(UPDATE_WEBHOOK),
        }
    }
}

/// Whether this node follows a room in Redis, for how many local subscriptions.
struct Interest {
    refs: u32,
    /// Set once the room is subscribed in Redis and its image installed.
    followed: Arc<OnceCell<()>>,
}

enum SubCommand {
    Subscribe(String, oneshot::Sender<Result<(), ClusterError>>),
    Unsubscribe(Channel),
    /// Drop the connection and start over (a room could not be resynced).
    Reconnect,
}

/// The adapter. One per broker in cluster mode.
pub struct Cluster {
    config: ClusterConfig,
    client: redis::Client,
    conn: ConnectionManager,
    scripts: Scripts,
    rooms: Arc<Rooms>,
    /// This node's replicas of the rooms it follows.
    replicas: Replicas,
    interest: Mutex<HashMap<Channel, Interest>>,
    subs_tx: mpsc::Sender<SubCommand>,
    detached_tx: mpsc::Sender<OutgoingEvent>,
    control_tx: mpsc::Sender<Control>,
    /// Set when a control notice was dropped (queue full): the auctions are reloaded.
    control_lost: AtomicBool,
    pubsub_up: AtomicBool,
    heartbeat_up: AtomicBool,
    auctions_loaded: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the adapter hands the broker at start.
pub struct Started {
    pub cluster: Arc<Cluster>,
    pub rooms: Arc<Rooms>,
    pub control_rx: mpsc::Receiver<Control>,
}

impl Cluster {
    /// Builds the adapter and its room registry and starts its tasks (pub/sub, heartbeats,
    /// presence, signal relay). Connects lazily: a Redis that is down at start only keeps the
    /// node unready until it is up.
    pub fn start(
        config: ClusterConfig,
        limits: crate::rooms::RoomLimits,
        shutdown: CancellationToken,
    ) -> Result<Started, ClusterError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| ClusterError::Url(e.to_string()))?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| ClusterError::Url(e.to_string()))?;
        let (relay_tx, relay_rx): (SignalRelay, _) = mpsc::channel(RELAY_QUEUE);
        let rooms = Arc::new(Rooms::clustered(limits, relay_tx));
        let (subs_tx, subs_rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (detached_tx, detached_rx) = mpsc::channel(DETACHED_QUEUE);
        let cluster = Arc::new(Cluster {
            config,
            client,
            conn,
            scripts: Scripts::load(),
            rooms: Arc::clone(&rooms),
            replicas: Replicas::new(Arc::clone(&rooms), limits),
            interest: Mutex::new(HashMap::new()),
            subs_tx,
            detached_tx,
            control_tx,
            control_lost: AtomicBool::new(false),
            pubsub_up: AtomicBool::new(false),
            heartbeat_up: AtomicBool::new(false),
            auctions_loaded: AtomicBool::new(false),
        });
        m::zero_cluster();
        tracing::info!(node = %cluster.config.node_id, prefix = %cluster.config.prefix, "cluster mode");
        tokio::spawn(Arc::clone(&cluster).pubsub_task(subs_rx, shutdown.clone()));
        tokio::spawn(Arc::clone(&cluster).heartbeat_task(shutdown.clone()));
        tokio::spawn(Arc::clone(&cluster).presence_task(shutdown.clone()));
        tokio::spawn(Arc::clone(&cluster).detached_task(detached_rx, shutdown.clone()));
        tokio::spawn(Arc::clone(&cluster).relay_task(relay_rx, shutdown));
        Ok(Started {
            cluster,
            rooms,
            control_rx,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// Whether the node can serve: pub/sub subscribed (every followed room resynced),
    /// heartbeats reaching Redis, auctions loaded. `/readyz` says not ready otherwise.
    pub fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the node is not ready, for `/readyz`.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.pubsub_up.load(Ordering::Acquire) {
            Some("cluster pub/sub connection down")
        } else if !self.heartbeat_up.load(Ordering::Acquire) {
            Some("cluster heartbeats failing")
        } else if !self.auctions_loaded.load(Ordering::Acquire) {
            Some("auctions not loaded from the cluster yet")
        } else {
            None
        }
    }

    pub(crate) fn set_auctions_loaded(&self) {
        self.auctions_loaded.store(true, Ordering::Release);
        self.update_up_metric();
    }

    fn update_up_metric(&self) {
        metrics::gauge!(m::CLUSTER_UP).set(if self.ready() { 1.0 } else { 0.0 });
    }

    pub(crate) fn key(&self, rest: &str) -> String {
        format!("{}:{}", self.config.prefix, rest)
    }

    fn room_channel(&self, channel: &Channel) -> String {
        self.key(&format!("ch:{channel}"))
    }

    fn control_channel(&self) -> String {
        self.key("control")
    }

    fn new_epoch() -> String {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            .to_string()
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Follows `channel` for one more local subscription: subscribes in Redis and installs
    /// the room's image the first time. Must be paired with [`Cluster::leave`].
    pub async fn join(&self, channel: &Channel) -> Result<(), ClusterError> {
        let followed = {
            let mut interest = lock(&self.interest);
            let entry = interest.entry(channel.clone()).or_insert_with(|| Interest {
                refs: 0,
                followed: Arc::new(OnceCell::new()),
            });
            entry.refs += 1;
            Arc::clone(&entry.followed)
        };
        let result = followed
            .get_or_try_init(|| self.follow(channel))
            .await
            .map(|_| ());
        if result.is_err() {
            self.leave(channel);
        }
        result
    }

    async fn follow(&self, channel: &Channel) -> Result<(), ClusterError> {
        if !self.pubsub_up.load(Ordering::Acquire) {
            return Err(ClusterError::Unavailable("pub/sub connection down".into()));
        }
        self.replicas.begin_sync(channel);
        let (done_tx, done_rx) = oneshot::channel();
        self.subs_tx
            .try_send(SubCommand::Subscribe(self.room_channel(channel), done_tx))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    ClusterError::Unavailable("too many subscriptions waiting for Redis".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    ClusterError::Unavailable("adapter stopped".into())
                }
            })?;
        tokio::time::timeout(COMMAND_TIMEOUT * 2, done_rx)
            .await
            .map_err(|_| ClusterError::Unavailable("subscribe timed out".into()))?
            .map_err(|_| ClusterError::Unavailable("adapter stopped".into()))??;
        self.sync_room(channel).await
    }

    /// One local subscription of `channel` ended; the last one unsubscribes in Redis.
    pub fn leave(&self, channel: &Channel) {
        let mut interest = lock(&self.interest);
        let Some(entry) = interest.get_mut(channel) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs == 0 {
            interest.remove(channel);
            // Under the interest lock, so a join that follows re-syncs after this.
            self.replicas.unsync(channel);
            if self
                .subs_tx
                .try_send(SubCommand::Unsubscribe(channel.clone()))
                .is_err()
            {
                // Left subscribed in Redis until the next reconnection: harmless, counted.
                metrics::counter!(m::CLUSTER_ERRORS, "op" => "unsubscribe_queue_full").increment(1);
            }
        }
    }

    /// Reads the room's sequence from Redis and installs it (repeating while a gap remains).
    async fn sync_room(&self, channel: &Channel) -> Result<(), ClusterError> {
        for _ in 0..5 {
            let Some(generation) = self.replicas.sync_generation(channel) else {
                // Not waiting for a sync (unfollowed, or synced by another).
                return Ok(());
            };
            let mut conn = self.conn();
            let (known_epoch, known_seq) = self.known(channel);
            let reply: Vec<Vec<u8>> = self
                .scripts
                .sync_room
                .arg(&self.config.prefix)
                .arg(channel.as_str())
                .arg(Cluster::new_epoch())
                .arg(ROOM_KEY_TTL.as_millis() as u64)
                .arg(known_epoch)
                .arg(known_seq)
                .invoke_async(&mut conn)
                .await?;
            let image = parse_image(channel, reply)?;
            if self.replicas.install(channel, generation, image) {
                return Ok(());
            }
        }
        Err(ClusterError::Protocol(format!(
            "{channel}: could not close a gap in the room's events"
        )))
    }

    /// Publishes a sequenced event through Redis: every node following the room (this one
    /// included) delivers it, in seq order. Returns the seq and how many nodes follow it.
    pub async fn publish(&self, event: OutgoingEvent) -> Result<(u64, u64), ClusterError> {
        let mut conn = self.conn();
        let reply: (u64, u64) = self
            .publish_invocation(&event)
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.command_failed("publish", e))?;
        Ok(reply)
    }

    /// The PUBLISH script's call for `event`.
    fn publish_invocation(&self, event: &OutgoingEvent) -> redis::ScriptInvocation<'_> {
        let (known_epoch, known_seq) = self.known(&event.channel);
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .arg(&self.config.prefix)
            .arg(event.channel.as_str())
            .arg(&event.body)
            .arg(&event.state)
            .arg(Cluster::new_epoch())
            .arg(ROOM_KEY_TTL.as_millis() as u64)
            .arg(self.config.history_size.max(1))
            .arg(known_epoch)
            .arg(known_seq);
        invocation
    }

    /// Publishes without waiting (leaderboards, `Broker::publish`), in call order: one task
    /// sends them one after the other. Failures are logged and counted.
    pub fn publish_detached(&self, event: OutgoingEvent) {
        if self.detached_tx.try_send(event).is_err() {
            metrics::counter!(m::CLUSTER_ERRORS, "op" => "publish_queue_full").increment(1);
            tracing::warn!("cluster publish queue full: event dropped");
        }
    }

    /// The epoch and last seq this node's replica of `channel` has seen (0, 0 when it does not
    /// follow the room): Redis must not hand out a seq at or below it in that epoch again.
    pub(crate) fn known(&self, channel: &Channel) -> (u64, u64) {
        self.replicas.position(channel).unwrap_or((0, 0))
    }

    fn command_failed(&self, op: &'static str, error: &redis::RedisError) {
        metrics::counter!(m::CLUSTER_ERRORS, "op" => op).increment(1);
        tracing::warn!(op, %error, "cluster command failed");
    }
}

/// The default node id: the listen address and a random suffix (new at every start, so a
/// restarted node is never mistaken for its dead predecessor).
pub fn default_node_id(listen: std::net::SocketAddr) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{listen}-{:08x}",
        nanos ^ std::process::id().rotate_left(16)
    )
}

/// Cluster mode's backplane: events are sequenced by Redis and reach every node following the
/// room; signals go through the relay.
impl crate::backplane::Backplane for Cluster {
    fn not_ready_reason(&self) -> Option<&'static str> {
        Cluster::not_ready_reason(self)
    }

    fn join<'a>(&'a self, channel: &'a Channel) -> BackplaneFuture<'a, ()> {
        Box::pin(async move { Cluster::join(self, channel).await.map_err(backplane_error) })
    }

    fn leave(&self, channel: &Channel) {
        Cluster::leave(self, channel)
    }

    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        event: &'a str,
        from: Option<UserId>,
        data: Data,
    ) -> BackplaneFuture<'a, Published> {
        Box::pin(async move {
            let outgoing = OutgoingEvent::new(channel.clone(), event, from, data, None);
            let (seq, nodes) = Cluster::publish(self, outgoing)
                .await
                .map_err(backplane_error)?;
            Ok(Published {
                seq,
                delivered: nodes as usize,
            })
        })
    }

    fn publish_detached(&self, channel: &Channel, event: &str, data: Data) -> Published {
        Cluster::publish_detached(
            self,
            OutgoingEvent::new(channel.clone(), event, None, data, None),
        );
        Published {
            seq: 0,
            delivered: 0,
        }
    }

    fn signal(&self, channel: &Channel, frame: ServerFrame, skip_user: Option<UserId>) -> bool {
        self.rooms.signal_everywhere(channel, frame, skip_user)
    }
}

fn backplane_error(error: ClusterError) -> BackplaneError {
    BackplaneError(error.to_string())
}
