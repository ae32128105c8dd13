//! The cluster adapter (`--redis-url`): makes nodes that share one Redis act as one broker.
//! It owns this node's Redis connections, which rooms the node follows in Redis (only those
//! with local subscribers), the replication of their events into the local room registry,
//! cluster presence (heartbeats, per-node shares, dead-node reaping) and the node's readiness.
//! The auction ledger that orders bids cluster-wide is in [`ledger`].

pub mod ledger;
mod scripts;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use gavel_protocol::{Channel, ServerFrame, UserId, ViewerCounts};
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
use crate::rooms::{Delivery, Incoming, Published, RoomImage, Rooms, SignalRelay, Skip};

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

/// An unsequenced frame relayed to every node following its room.
#[derive(Serialize, Deserialize)]
struct Signal {
    frame: ServerFrame,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skip_user: Option<UserId>,
}

/// A sequenced event's body as Redis stores and relays it (seq and epoch come from Redis).
#[derive(Deserialize)]
struct EventBody {
    ts: u64,
    event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<UserId>,
    data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<Value>,
}

/// [`EventBody`] as a publisher writes it: borrowed, with the state already in JSON.
#[derive(Serialize)]
struct EventBodyOut<'a> {
    ts: u64,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a UserId>,
    data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a RawValue>,
}

/// A room event ready for Redis: (channel, body json, state json or empty).
#[derive(Clone, Debug)]
pub struct OutgoingEvent {
    pub channel: Channel,
    body: String,
    state: String,
}

impl OutgoingEvent {
    pub fn new(
        channel: Channel,
        event: &str,
        from: Option<UserId>,
        data: Value,
        state: Option<Value>,
    ) -> OutgoingEvent {
        // The state is serialized once: Redis stores it on its own and in the body.
        let state = state.and_then(|s| serde_json::value::to_raw_value(&s).ok());
        let body = EventBodyOut {
            ts: now_ms(),
            event,
            from: from.as_ref(),
            data: &data,
            state: state.as_deref(),
        };
        OutgoingEvent {
            channel,
            body: serde_json::to_string(&body).unwrap_or_default(),
            state: state.map(|s| s.get().to_owned()).unwrap_or_default(),
        }
    }
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
        limits: crate::rooms::HistoryLimits,
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
        self.rooms.begin_sync(channel);
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
            self.rooms.unsync(channel);
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
            let Some(generation) = self.rooms.sync_generation(channel) else {
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
            if self.rooms.install(channel, generation, image) {
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
        let (known_epoch, known_seq) = self.known(&event.channel);
        let reply: (u64, u64) = self
            .scripts
            .publish
            .arg(&self.config.prefix)
            .arg(event.channel.as_str())
            .arg(&event.body)
            .arg(&event.state)
            .arg(Cluster::new_epoch())
            .arg(ROOM_KEY_TTL.as_millis() as u64)
            .arg(self.config.history_size.max(1))
            .arg(known_epoch)
            .arg(known_seq)
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.command_failed("publish", e))?;
        Ok(reply)
    }

    /// Publishes without waiting (leaderboards, `Broker::publish`), in call order: one task
    /// sends them one after the other. Failures are logged and counted.
    pub fn publish_detached(&self, event: OutgoingEvent) {
        if self.detached_tx.try_send(event).is_err() {
            metrics::counter!(m::CLUSTER_ERRORS, "op" => "publish_queue_full").increment(1);
            tracing::warn!("cluster publish queue full: event dropped");
        }
    }

    /// Sends detached publishes in order, what is queued in one pipelined round trip.
    async fn detached_task(
        self: Arc<Self>,
        mut detached_rx: mpsc::Receiver<OutgoingEvent>,
        shutdown: CancellationToken,
    ) {
        let mut events = Vec::with_capacity(PIPELINE_MAX);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = detached_rx.recv_many(&mut events, PIPELINE_MAX) => if n == 0 { return },
            }
            let invocations: Vec<redis::ScriptInvocation<'_>> = events
                .iter()
                .map(|event| {
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
                })
                .collect();
            let mut pipe = redis::pipe();
            pipe.load_script(&self.scripts.publish).ignore();
            for invocation in &invocations {
                pipe.invoke_script(invocation).ignore();
            }
            let mut conn = self.conn();
            let result: Result<(), _> = pipe.query_async(&mut conn).await;
            if let Err(error) = result {
                self.command_failed("publish", &error);
            }
            drop(invocations);
            events.clear();
        }
    }

    /// The epoch and last seq this node's replica of `channel` has seen (0, 0 when it does not
    /// follow the room): Redis must not hand out a seq at or below it in that epoch again.
    pub(crate) fn known(&self, channel: &Channel) -> (u64, u64) {
        self.rooms.replica_position(channel).unwrap_or((0, 0))
    }

    fn command_failed(&self, op: &'static str, error: &redis::RedisError) {
        metrics::counter!(m::CLUSTER_ERRORS, "op" => op).increment(1);
        tracing::warn!(op, %error, "cluster command failed");
    }

    /// Relays signals in order, what is queued in one pipelined round trip; falls back to
    /// local delivery when Redis cannot take them.
    async fn relay_task(
        self: Arc<Self>,
        mut relay_rx: mpsc::Receiver<(Channel, ServerFrame, Option<UserId>)>,
        shutdown: CancellationToken,
    ) {
        let mut signals = Vec::with_capacity(PIPELINE_MAX);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = relay_rx.recv_many(&mut signals, PIPELINE_MAX) => if n == 0 { return },
            }
            let mut sent = false;
            if self.pubsub_up.load(Ordering::Acquire) {
                let mut pipe = redis::pipe();
                for (channel, frame, skip_user) in &signals {
                    let message = Signal {
                        frame: frame.clone(),
                        skip_user: skip_user.clone(),
                    };
                    let payload =
                        format!("S{}", serde_json::to_string(&message).unwrap_or_default());
                    pipe.publish(self.room_channel(channel), payload).ignore();
                }
                let mut conn = self.conn();
                let result: Result<(), _> = pipe.query_async(&mut conn).await;
                match result {
                    Ok(()) => sent = true,
                    Err(error) => self.command_failed("signal", &error),
                }
            }
            for (channel, frame, skip_user) in signals.drain(..) {
                if !sent {
                    self.rooms
                        .signal(&channel, frame, Skip::from(skip_user.as_ref()));
                }
            }
        }
    }

    /// Reports the viewer counts of rooms whose local viewers changed; Redis sums the nodes'
    /// shares and publishes the totals to every node following the room.
    async fn presence_task(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.presence_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (channel, connections, keys) in self.rooms.take_dirty_presence() {
                let node = &self.config.node_id;
                let mut invocation = self.scripts.presence.prepare_invoke();
                invocation
                    .arg(&self.config.prefix)
                    .arg(channel.as_str())
                    .arg(node)
                    .arg(connections);
                for key in keys {
                    invocation.arg(match key {
                        ViewerKey::User(user) => format!("u{user}"),
                        // Anonymous connections are unique per node.
                        ViewerKey::Anonymous(conn) => format!("~{node}:{conn}"),
                    });
                }
                let mut conn = self.conn();
                let result: Result<(u64, u64), _> = invocation.invoke_async(&mut conn).await;
                if let Err(error) = result {
                    self.command_failed("presence", &error);
                    // Reported again at the next tick (Redis may be back by then).
                    self.rooms.mark_presence_dirty(&channel);
                }
            }
        }
    }

    /// Heartbeats with a TTL, and reaping of nodes that stopped sending theirs.
    async fn heartbeat_task(self: Arc<Self>, shutdown: CancellationToken) {
        // Beat and reap every quarter of the TTL, and take a node for dead after three quarters
        // without a beat: a dead node leaves the counts within the TTL, and a live one may
        // miss two beats in a row before it is taken for dead.
        let period = self.config.node_ttl / 4;
        let dead_after = (self.config.node_ttl * 3 / 4).as_millis() as u64;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut conn = self.conn();
            let beat: Result<u64, _> = self
                .scripts
                .heartbeat
                .arg(&self.config.prefix)
                .arg(&self.config.node_id)
                .invoke_async(&mut conn)
                .await;
            match beat {
                Ok(added) => {
                    if added == 1 {
                        // New to the cluster, or reaped while cut off, or Redis lost its
                        // data: report every room's viewers afresh.
                        self.rooms.mark_all_dirty();
                    }
                    if !self.heartbeat_up.swap(true, Ordering::AcqRel) {
                        tracing::info!(node = %self.config.node_id, "cluster heartbeats reach Redis");
                    }
                }
                Err(error) => {
                    if self.heartbeat_up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(%error, "cluster heartbeat failed: not ready");
                    }
                    self.command_failed("heartbeat", &error);
                }
            }
            self.update_up_metric();
            match self.reap(dead_after).await {
                Ok(dead) if !dead.is_empty() => {
                    metrics::counter!(m::CLUSTER_NODES_REAPED).increment(dead.len() as u64);
                    tracing::warn!(
                        ?dead,
                        "cluster nodes missed their heartbeats: removed from presence"
                    );
                }
                Ok(_) => {}
                Err(error) => self.command_failed("reap", &error),
            }
        }
        // Leave the cluster's counts at once on a clean shutdown: date this node's heartbeat
        // back to 0 and reap (which removes it, and only nodes that are dead anyway).
        let mut conn = self.conn();
        let _: Result<u64, _> = conn.zadd(self.key("nodes"), &self.config.node_id, 0).await;
        let _ = self.reap(dead_after).await;
    }

    /// Removes the nodes silent for `dead_after` ms, with their presence; returns them.
    async fn reap(&self, dead_after: u64) -> Result<Vec<String>, redis::RedisError> {
        let mut conn = self.conn();
        self.scripts
            .reap
            .arg(&self.config.prefix)
            .arg(dead_after)
            .invoke_async(&mut conn)
            .await
    }

    /// Owns the pub/sub connection: (re)connects with backoff, subscribes to the control
    /// channel and every followed room, resyncs those rooms, then relays messages until the
    /// connection fails. Every loss and every resubscription is logged and counted.
    async fn pubsub_task(
        self: Arc<Self>,
        mut subs_rx: mpsc::Receiver<SubCommand>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut connected_before = false;
        loop {
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub()) => r,
            };
            let pubsub = match pubsub {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(error)) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cluster pub/sub cannot connect");
                    self.wait_backoff(&mut subs_rx, &mut backoff, &shutdown)
                        .await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(retry_in = ?backoff, "cluster pub/sub connect timed out");
                    self.wait_backoff(&mut subs_rx, &mut backoff, &shutdown)
                        .await;
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            let followed: Vec<Channel> = lock(&self.interest).keys().cloned().collect();
            let mut names: Vec<String> = followed.iter().map(|c| self.room_channel(c)).collect();
            names.push(self.control_channel());
            for channel in &followed {
                self.rooms.begin_sync(channel);
            }
            let mut subscribed = true;
            for chunk in names.chunks(1000) {
                match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(chunk)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "cluster pub/sub subscribe failed");
                        subscribed = false;
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("cluster pub/sub subscribe timed out");
                        subscribed = false;
                        break;
                    }
                }
            }
            if subscribed {
                let mut synced = 0usize;
                for channel in &followed {
                    match self.sync_room(channel).await {
                        Ok(()) => synced += 1,
                        Err(error) => {
                            tracing::warn!(%channel, %error, "cluster room resync failed");
                            subscribed = false;
                            break;
                        }
                    }
                }
                if subscribed {
                    // Auction notices sent before the control channel was subscribed (or while
                    // disconnected) may be missed: (re)load and refresh the auctions.
                    self.send_control(Control::Resubscribed);
                }
                if subscribed && connected_before {
                    metrics::counter!(m::CLUSTER_RESUBSCRIBES).increment(1);
                    tracing::info!(rooms = synced, "cluster pub/sub reconnected: resubscribed and resynced every followed room");
                }
            }
            if subscribed {
                connected_before = true;
                backoff = BACKOFF_MIN;
                self.pubsub_up.store(true, Ordering::Release);
                self.update_up_metric();
                metrics::gauge!(m::CLUSTER_ROOMS).set(followed.len() as f64);
                let mut ping = tokio::time::interval(PUBSUB_PING);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let reason = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        message = stream.next() => match message {
                            Some(message) => self.on_message(&message),
                            None => break "connection closed".to_owned(),
                        },
                        command = subs_rx.recv() => match command {
                            None => return,
                            Some(SubCommand::Subscribe(name, done)) => {
                                let result = match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&name)).await {
                                    Ok(result) => result.map_err(ClusterError::from),
                                    Err(_) => Err(ClusterError::Unavailable("subscribe timed out".into())),
                                };
                                let failed = result.is_err();
                                let _ = done.send(result);
                                if failed { break "subscribe failed".to_owned(); }
                                metrics::gauge!(m::CLUSTER_ROOMS).increment(1.0);
                            }
                            Some(SubCommand::Unsubscribe(channel)) => {
                                // A join that came after the leave keeps it.
                                if lock(&self.interest).contains_key(&channel) { continue; }
                                let name = self.room_channel(&channel);
                                match tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(name)).await {
                                    Ok(Ok(())) => {}
                                    _ => break "unsubscribe failed".to_owned(),
                                }
                                metrics::gauge!(m::CLUSTER_ROOMS).decrement(1.0);
                            }
                            Some(SubCommand::Reconnect) => break "a room could not be resynced".to_owned(),
                        },
                        _ = ping.tick() => {
                            let pong: Result<Result<redis::Value, _>, _> =
                                tokio::time::timeout(COMMAND_TIMEOUT, sink.ping()).await;
                            match pong {
                                Ok(Ok(_)) => {}
                                Ok(Err(error)) => break format!("ping failed: {error}"),
                                Err(_) => break "ping timed out".to_owned(),
                            }
                        }
                    }
                };
                self.pubsub_up.store(false, Ordering::Release);
                self.update_up_metric();
                metrics::counter!(m::CLUSTER_DISCONNECTS).increment(1);
                tracing::warn!(%reason, "cluster pub/sub connection lost: not ready; reconnecting");
            } else {
                metrics::counter!(m::CLUSTER_DISCONNECTS).increment(1);
            }
            self.wait_backoff(&mut subs_rx, &mut backoff, &shutdown)
                .await;
        }
    }

    /// Sleeps the backoff (doubling it), refusing follow requests meanwhile.
    async fn wait_backoff(
        &self,
        subs_rx: &mut mpsc::Receiver<SubCommand>,
        backoff: &mut Duration,
        shutdown: &CancellationToken,
    ) {
        let until = tokio::time::Instant::now() + *backoff;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(until) => return,
                command = subs_rx.recv() => {
                    if let Some(SubCommand::Subscribe(_, done)) = command {
                        let _ = done.send(Err(ClusterError::Unavailable("pub/sub connection down".into())));
                    }
                }
            }
        }
    }

    fn on_message(self: &Arc<Self>, message: &redis::Msg) {
        let name = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if name == self.control_channel() {
            self.on_control(payload);
            return;
        }
        let prefix = self.room_channel_prefix();
        let Some(channel) = name
            .strip_prefix(prefix.as_str())
            .and_then(|c| Channel::parse(c).ok())
        else {
            return;
        };
        match payload.first() {
            Some(b'E') => match parse_event(&payload[1..]) {
                Some(event) => {
                    if self.rooms.deliver(&channel, event) == Delivery::Gap {
                        tracing::warn!(%channel, "cluster event gap: resyncing the room");
                        metrics::counter!(m::CLUSTER_ERRORS, "op" => "gap").increment(1);
                        self.spawn_resync(channel);
                    }
                }
                None => tracing::warn!(%channel, "unreadable cluster event"),
            },
            Some(b'S') => match serde_json::from_slice::<Signal>(&payload[1..]) {
                Ok(signal) => {
                    let skip = Skip::from(signal.skip_user.as_ref());
                    self.rooms.signal(&channel, signal.frame, skip);
                }
                Err(error) => tracing::warn!(%channel, %error, "unreadable cluster signal"),
            },
            Some(b'V') => {
                let numbers: Vec<u32> = std::str::from_utf8(&payload[1..])
                    .unwrap_or("")
                    .split(' ')
                    .filter_map(|n| n.parse().ok())
                    .collect();
                if let [connections, users, peak_connections, peak_users] = numbers[..] {
                    self.rooms.cluster_viewers(
                        &channel,
                        ViewerCounts {
                            connections,
                            users,
                            peak_connections,
                            peak_users,
                        },
                    );
                }
            }
            _ => tracing::warn!(%channel, "unknown cluster message"),
        }
    }

    /// Queues an auction notice; when the queue is full the notice is dropped and the auctions
    /// are reloaded instead (their actors catch up from Redis).
    fn send_control(&self, control: Control) {
        if self.control_tx.try_send(control).is_err() {
            metrics::counter!(m::CLUSTER_ERRORS, "op" => "control_queue_full").increment(1);
            self.control_lost.store(true, Ordering::Release);
        }
    }

    fn room_channel_prefix(&self) -> String {
        self.key("ch:")
    }

    fn on_control(&self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let control = match text.split_at_checked(1) {
            Some(("A", id)) => Control::Created(id.to_owned()),
            Some(("C", rest)) => {
                let mut parts = rest.rsplitn(2, ' ');
                let version = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let id = parts.next().unwrap_or("").to_owned();
                Control::Changed(id, version)
            }
            _ => return,
        };
        self.send_control(control);
    }

    /// Resyncs a room after a gap, retrying with backoff for as long as the node follows it.
    /// A room that cannot be resynced for `RESYNC_GIVE_UP` forces a pub/sub reconnection
    /// (which resyncs everything, with the node unready meanwhile).
    fn spawn_resync(self: &Arc<Self>, channel: Channel) {
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut pause = BACKOFF_MIN;
            loop {
                if !lock(&cluster.interest).contains_key(&channel) {
                    return;
                }
                match cluster.sync_room(&channel).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%channel, %error, retry_in = ?pause, "cluster room resync failed");
                    }
                }
                if started.elapsed() > RESYNC_GIVE_UP {
                    tracing::error!(%channel, "cluster room still out of sync: reconnecting pub/sub");
                    let _ = cluster.subs_tx.try_send(SubCommand::Reconnect);
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF_MAX);
            }
        });
    }
}

/// Parses `<seq> <epoch> <json>`.
fn parse_event(bytes: &[u8]) -> Option<Incoming> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (seq, rest) = text.split_once(' ')?;
    let (epoch, body) = rest.split_once(' ')?;
    let body: EventBody = serde_json::from_str(body).ok()?;
    Some(Incoming {
        seq: seq.parse().ok()?,
        epoch: epoch.parse().ok()?,
        ts: body.ts,
        event: body.event,
        from: body.from,
        data: body.data,
        state: body.state,
    })
}

fn parse_image(channel: &Channel, reply: Vec<Vec<u8>>) -> Result<RoomImage, ClusterError> {
    let bad = || ClusterError::Protocol(format!("room image of {channel}"));
    let mut items = reply.into_iter();
    let number =
        |v: Option<Vec<u8>>| -> Option<u64> { std::str::from_utf8(&v?).ok()?.parse().ok() };
    let seq = number(items.next()).ok_or_else(bad)?;
    let epoch = number(items.next()).ok_or_else(bad)?;
    let state = items.next().ok_or_else(bad)?;
    let state = if state.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&state).map_err(|_| bad())?
    };
    let mut history = Vec::new();
    for entry in items {
        let event = entry
            .strip_prefix(b"E")
            .and_then(parse_event)
            .ok_or_else(bad)?;
        history.push(event);
    }
    Ok(RoomImage {
        epoch,
        seq,
        state,
        history,
    })
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

/// Keeps the auction registry in step with the cluster: after each pub/sub (re)connection,
/// once the control channel is subscribed (so no notice falls between), loads every auction,
/// retrying until Redis answers, and makes every actor catch up; in between, adopts auctions
/// other nodes create and refreshes those they change.
pub(crate) async fn follow_auctions(
    cluster: Arc<Cluster>,
    shared: Arc<crate::Shared>,
    mut control_rx: mpsc::Receiver<Control>,
) {
    let shutdown = shared.shutdown.clone();
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    lost_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let control = tokio::select! {
            _ = shutdown.cancelled() => return,
            control = control_rx.recv() => match control { Some(c) => c, None => return },
            // Notices were dropped (queue full): reload as after a reconnection.
            _ = lost_check.tick(), if cluster.control_lost.load(Ordering::Acquire) => {
                cluster.control_lost.store(false, Ordering::Release);
                Control::Resubscribed
            }
        };
        match control {
            Control::Created(id) => {
                if let Err(error) = shared.auctions.adopt(&id).await {
                    tracing::warn!(auction = %id, %error, "could not load an auction another node created");
                }
            }
            Control::Changed(id, version) => {
                if !shared.auctions.is_live(&id) {
                    let _ = shared.auctions.adopt(&id).await;
                } else {
                    shared.auctions.changed(&id, version);
                }
            }
            Control::Resubscribed => {
                loop {
                    match shared.auctions.load().await {
                        Ok(count) => {
                            tracing::info!(auctions = count, "auctions loaded from the cluster");
                            cluster.set_auctions_loaded();
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "loading auctions from the cluster failed; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                    }
                }
                // Changes announced while disconnected were missed: every actor catches up.
                shared.auctions.refresh_all();
            }
        }
    }
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
        data: Value,
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

    fn publish_detached(&self, channel: &Channel, event: &str, data: Value) -> Published {
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
