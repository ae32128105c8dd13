//! The room registry: channel → room, and per room its subscribers, sequence, bounded history
//! and viewer counts. It owns fan-out (encode once, offer the shared bytes to every subscriber)
//! and `since` recovery. It knows nothing of sockets: it only offers frames to [`ConnHandle`]s.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use gavel_protocol::{
    Channel, ChannelKind, EventFrame, PresenceReply, Reply, RequestId, RoomSnapshot, ServerFrame,
    UserId, ViewerCounts,
};
use serde_json::Value;

use crate::clock::now_ms;
use crate::metrics as m;
use crate::outbound::{wire_size, ConnHandle, ConnId, Offer, Outbound, SharedFrame, ViewerKey};
use crate::subscribers::{Snapshot, SubscriberSet};

/// Limits of every room's history.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Events kept per room.
    pub size: usize,
    /// Age after which an event is dropped.
    pub ttl: Duration,
}

/// Locks a mutex, recovering the data if a panic elsewhere poisoned it: every critical section
/// below leaves the data consistent at each step, so the data is still good.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn replay_size(frames: &[Arc<SharedFrame>], format: gavel_protocol::Format) -> usize {
    frames.iter().map(|f| wire_size(f, format)).sum()
}

/// Every room of this node.
pub struct Rooms {
    map: DashMap<Channel, Arc<Room>>,
    limits: HistoryLimits,
    /// Rooms whose viewer counts changed since the last presence tick. A plain mutex: it is
    /// taken once per room per tick (the `presence_dirty` flag filters repeats), never across
    /// an await, and never while a room lock is held.
    dirty: Mutex<Vec<Arc<Room>>>,
    /// Source of room epochs: microseconds since the Unix epoch at start, then +1 per room, so
    /// epochs differ across restarts and between incarnations of a room.
    next_epoch: AtomicU64,
    /// Cluster mode: a room is a replica of its sequence in Redis (see [`SyncState`]), and
    /// unsequenced signals that start here (joined, left) go out through the relay.
    relay: Option<SignalRelay>,
}

/// Where a clustered registry sends the signals it makes itself (joined, left), so that they
/// reach the room's subscribers on every node: (channel, frame, user to skip).
/// Bounded: when it is full, signals are delivered on this node only (and counted).
pub type SignalRelay = tokio::sync::mpsc::Sender<(Channel, ServerFrame, Option<UserId>)>;

/// A sequenced event as the cluster delivers it: seq and epoch assigned by Redis.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub seq: u64,
    pub epoch: u64,
    pub ts: u64,
    pub event: String,
    pub from: Option<UserId>,
    pub data: Value,
    pub state: Option<Value>,
}

/// A room's sequence as Redis holds it, read after subscribing.
#[derive(Clone, Debug)]
pub struct RoomImage {
    pub epoch: u64,
    pub seq: u64,
    pub state: Value,
    /// The retained events, oldest first.
    pub history: Vec<Incoming>,
}

/// What [`Rooms::deliver`] did with an event from the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Appended and queued for this many local subscribers.
    Applied(usize),
    /// Kept until the room's sync completes.
    Buffered,
    /// Already applied, or for a room this node does not follow.
    Ignored,
    /// The event skips seqs this node never saw: the room needs a sync from Redis.
    Gap,
}

/// How a room's sequence relates to the cluster's.
enum SyncState {
    /// Single-node mode: this node assigns the seqs.
    Local,
    /// Cluster mode, not followed (no local interest): events are ignored.
    Unsynced,
    /// Subscribed in Redis, its image not installed yet: events wait here, in arrival order.
    Syncing(Vec<Incoming>),
    /// A faithful replica: events apply in seq order.
    Synced,
}

/// A channel's room.
pub struct Room {
    channel: Channel,
    /// Set at creation; in cluster mode replaced (under `log`) by Redis's epoch at each sync.
    epoch: AtomicU64,
    /// Cluster mode: the cluster's viewer counts, as last published (local counts otherwise).
    cluster_viewers: Mutex<Option<ViewerCounts>>,
    /// The subscriber set publishers read: an immutable snapshot replaced whole (copy-on-write,
    /// in chunks) by joins and leaves, so a publish never waits for a join or a leave to copy.
    subscribers: ArcSwap<Snapshot>,
    /// Sequence and history. A publish holds it while it assigns the seq, appends to the history
    /// and offers the frame to each subscriber (a non-blocking queue push, no IO, no await), so
    /// every subscriber receives the room's events in seq order. Joins and leaves take it only
    /// to swap in their new snapshot and read the history tail, never to build the snapshot.
    log: Mutex<RoomLog>,
    /// Membership, for joins and leaves only (publishers never take it). Lock order: `members`
    /// before `log`.
    members: Mutex<Members>,
    /// Viewer counts, written under `members`, read lock-free by stats and presence ticks.
    connections: AtomicU32,
    users: AtomicU32,
    peak_connections: AtomicU32,
    peak_users: AtomicU32,
    last_seq: AtomicU64,
    /// Set while the room is queued for a viewer-count update.
    presence_dirty: AtomicBool,
    /// Set (under both locks) when the registry drops the room; a join or publish that finds it
    /// set retries on the room that replaces it.
    retired: AtomicBool,
    /// A room with state (an auction's) is never dropped: its state has no other home here.
    pinned: AtomicBool,
}

struct RoomLog {
    last_seq: u64,
    history: VecDeque<Stored>,
    /// The channel's state as of `last_seq` (an auction's snapshot), `null` for plain rooms.
    /// Changed only together with an event, so a subscriber's state and stream agree.
    state: Value,
    sync: SyncState,
    /// Bumped each time the room starts waiting for a sync.
    sync_gen: u64,
}

struct Stored {
    seq: u64,
    at: Instant,
    frame: Arc<SharedFrame>,
}

struct Members {
    set: SubscriberSet,
    /// Since when the room has had no subscribers (or since its creation). An empty room is
    /// kept for the history TTL after that, so a client that drops and comes back finds the
    /// same epoch even when the room had no events.
    idle_since: Instant,
    /// Connections per viewer (a user's tabs count once).
    viewers: HashMap<ViewerKey, u32>,
}

/// A successful subscribe.
pub struct Joined {
    pub room: Arc<Room>,
    pub recovered: Option<bool>,
    pub replayed: u32,
}

/// Who a signal is not sent to.
#[derive(Clone, Copy)]
pub enum Skip<'a> {
    Nobody,
    /// One connection (the one that caused the signal).
    Conn(ConnId),
    /// Every connection of one user (their own typing indicator).
    User(&'a UserId),
}

impl<'a> From<Option<&'a UserId>> for Skip<'a> {
    /// Nobody, or every connection of the user.
    fn from(user: Option<&'a UserId>) -> Skip<'a> {
        match user {
            Some(user) => Skip::User(user),
            None => Skip::Nobody,
        }
    }
}

impl Skip<'_> {
    fn skips(&self, conn: &ConnHandle) -> bool {
        match self {
            Skip::Nobody => false,
            Skip::Conn(id) => conn.id == *id,
            Skip::User(user) => conn.user() == Some(*user),
        }
    }
}

/// What a publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    /// Subscribers the event was queued for.
    pub delivered: usize,
}

/// A room's state as the HTTP API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RoomInfo {
    pub channel: Channel,
    pub epoch: u64,
    pub seq: u64,
    #[serde(flatten)]
    pub viewers: ViewerCounts,
    pub history_len: usize,
    pub oldest_seq: Option<u64>,
}

impl Rooms {
    pub fn new(limits: HistoryLimits) -> Rooms {
        Rooms::build(limits, None)
    }

    /// A registry for cluster mode: rooms replicate their sequence from Redis.
    pub fn clustered(limits: HistoryLimits, relay: SignalRelay) -> Rooms {
        Rooms::build(limits, Some(relay))
    }

    fn build(limits: HistoryLimits, relay: Option<SignalRelay>) -> Rooms {
        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Rooms {
            map: DashMap::new(),
            limits,
            dirty: Mutex::new(Vec::new()),
            next_epoch: AtomicU64::new(start_us),
            relay,
        }
    }

    /// The room for `channel`, if it exists.
    pub fn get(&self, channel: &Channel) -> Option<Arc<Room>> {
        self.map.get(channel).map(|r| Arc::clone(r.value()))
    }

    fn get_or_create(&self, channel: &Channel) -> Arc<Room> {
        if let Some(room) = self.get(channel) {
            return room;
        }
        let room = self.map.entry(channel.clone()).or_insert_with(|| {
            metrics::gauge!(m::ROOMS).increment(1.0);
            Arc::new(Room::new(
                channel.clone(),
                self.next_epoch.fetch_add(1, Ordering::Relaxed),
                self.relay.is_some(),
            ))
        });
        Arc::clone(room.value())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Subscribes `conn` and queues, as one unit, the `subscribed` reply to request `id` and
    /// the replayed events after `since`; every later event of the room follows them.
    pub fn subscribe(
        &self,
        conn: &Arc<ConnHandle>,
        channel: &Channel,
        id: RequestId,
        since: Option<u64>,
        epoch: Option<u64>,
    ) -> Joined {
        loop {
            let room = self.get_or_create(channel);
            let mut members = lock(&room.members);
            if room.retired.load(Ordering::Acquire) {
                continue;
            }
            let first_of_viewer = members.add(conn);
            room.store_counts(&members);
            // The new snapshot is built here, under `members` only: publishers do not wait.
            let subscribers = Arc::new(members.set.snapshot());

            let mut log = lock(&room.log);
            log.expire(self.limits, Instant::now());
            let (recovered, replay) = match since {
                None => (None, Vec::new()),
                Some(since) => match log.replay_after(since, epoch, room.epoch()) {
                    // A replay must fit the connection's pending-bytes bound; a larger one is
                    // answered like an aged-out history: a snapshot to reload from.
                    Some(frames) if conn.fits(replay_size(&frames, conn.format)) => {
                        (Some(true), frames)
                    }
                    _ => (Some(false), Vec::new()),
                },
            };
            let viewers = room.viewer_counts();
            let snapshot = (recovered == Some(false)).then(|| RoomSnapshot {
                seq: log.last_seq,
                epoch: room.epoch(),
                viewers,
                oldest_seq: log.history.front().map(|s| s.seq),
                state: log.state.clone(),
            });
            let replayed = replay.len() as u32;
            let reply = SharedFrame::new(ServerFrame::Ok {
                id,
                result: Reply::Subscribed {
                    channel: channel.clone(),
                    seq: log.last_seq,
                    epoch: room.epoch(),
                    recovered,
                    replayed,
                    viewers,
                    snapshot,
                    state: log.state.clone(),
                },
            });
            let item = if replay.is_empty() {
                Outbound::Frame(reply)
            } else {
                let mut batch = Vec::with_capacity(replay.len() + 1);
                batch.push(reply);
                batch.extend(replay);
                Outbound::Batch(batch.into_boxed_slice())
            };
            // Queue the reply first, then publish the new snapshot: anything offered from the
            // snapshot on (events under this lock, signals without it) comes after the reply.
            conn.offer(item);
            room.subscribers.store(subscribers);
            drop(log);
            // Still under `members`, so a user's joined and left reach everyone in the order
            // they happened (the offers do not block).
            if first_of_viewer {
                room.announce(conn, true, self.relay.as_ref());
            }
            drop(members);
            self.mark_dirty(&room);
            return Joined {
                room,
                recovered,
                replayed,
            };
        }
    }

    /// Removes `conn` from `room`. Returns false if it was not subscribed.
    pub fn unsubscribe(&self, conn: &ConnHandle, room: &Arc<Room>) -> bool {
        let mut members = lock(&room.members);
        let Some(last_of_viewer) = members.remove(conn) else {
            return false;
        };
        if members.set.is_empty() {
            members.idle_since = Instant::now();
        }
        room.store_counts(&members);
        let snapshot = Arc::new(members.set.snapshot());
        {
            // Swapped under `log` so that an event is either queued before the caller's
            // `unsubscribed` reply or not at all.
            let _log = lock(&room.log);
            room.subscribers.store(snapshot);
        }
        if last_of_viewer {
            room.announce(conn, false, self.relay.as_ref());
        }
        drop(members);
        self.mark_dirty(room);
        true
    }

    /// Appends an event to `channel`'s room (creating it if needed, so the event is kept for a
    /// subscriber who arrives within the history TTL) and queues it for every subscriber.
    pub fn publish(
        &self,
        channel: &Channel,
        event: &str,
        from: Option<UserId>,
        data: Value,
    ) -> Published {
        self.publish_with_state(channel, event, from, data, None)
    }

    /// [`Rooms::publish`], also replacing the room's state (atomically with the event, so a
    /// subscriber gets a state that matches the seq of its `subscribed` reply).
    pub fn publish_with_state(
        &self,
        channel: &Channel,
        event: &str,
        from: Option<UserId>,
        data: Value,
        state: Option<Value>,
    ) -> Published {
        let mut data = Some(data);
        let mut state = state;
        loop {
            let room = self.get_or_create(channel);
            let mut log = lock(&room.log);
            if room.retired.load(Ordering::Acquire) {
                continue;
            }
            let started = Instant::now();
            let seq = log.last_seq + 1;
            let delivered = room.append(
                &mut log,
                Incoming {
                    seq,
                    epoch: room.epoch(),
                    ts: now_ms(),
                    event: event.to_owned(),
                    from: from.clone(),
                    data: data.take().unwrap_or(Value::Null),
                    state: state.take(),
                },
                started,
                self.limits,
            );
            drop(log);
            m::record_fan_out("event", delivered, started.elapsed());
            return Published { seq, delivered };
        }
    }

    /// Cluster mode: applies an event sequenced by Redis to this node's replica of the room
    /// and queues it for the local subscribers. Events arrive in seq order from Redis; a
    /// missing seq (a pub/sub connection that dropped) is reported as a gap.
    pub fn deliver(&self, channel: &Channel, event: Incoming) -> Delivery {
        let Some(room) = self.get(channel) else {
            return Delivery::Ignored;
        };
        let started = Instant::now();
        let mut log = lock(&room.log);
        let gap = room.is_gap(&log, &event);
        let went_back = event.epoch == room.epoch() && event.seq <= log.last_seq;
        let delivery = match &mut log.sync {
            SyncState::Local | SyncState::Unsynced => Delivery::Ignored,
            SyncState::Syncing(pending) => {
                if pending.len() >= self.limits.size.max(1024) * 4 {
                    // A sync that takes this long reads these from Redis's history anyway
                    // (or finds it cannot, and says so).
                    pending.clear();
                }
                pending.push(event);
                Delivery::Buffered
            }
            // In a replica in step, the same epoch never repeats a seq: one at or below the last
            // means Redis went back (a failover to a lagging replica). Resync: the sync starts
            // a new epoch there rather than let seqs be reused.
            SyncState::Synced if went_back => {
                log.start_syncing(Vec::new());
                Delivery::Gap
            }
            SyncState::Synced if gap => {
                // The event is kept: the sync that fills the gap applies it after.
                log.start_syncing(vec![event]);
                Delivery::Gap
            }
            SyncState::Synced => room.apply_at(&mut log, event, self.limits, started),
        };
        drop(log);
        if let Delivery::Applied(delivered) = delivery {
            m::record_fan_out("event", delivered, started.elapsed());
        }
        delivery
    }

    /// Cluster mode: the epoch and last seq of the room's replica, while it is followed.
    pub fn replica_position(&self, channel: &Channel) -> Option<(u64, u64)> {
        let room = self.get(channel)?;
        let log = lock(&room.log);
        matches!(log.sync, SyncState::Synced | SyncState::Syncing(_))
            .then(|| (room.epoch(), log.last_seq))
    }

    /// Cluster mode: from now on, events for `channel` wait for [`Rooms::install`]. Called
    /// before subscribing in Redis, so nothing published after the subscription is missed.
    pub fn begin_sync(&self, channel: &Channel) {
        loop {
            let room = self.get_or_create(channel);
            let mut log = lock(&room.log);
            if room.retired.load(Ordering::Acquire) {
                continue;
            }
            log.start_syncing(Vec::new());
            return;
        }
    }

    /// Cluster mode: the generation of the room's current sync, `None` when it is not waiting
    /// for one. Read before reading the room's image: [`Rooms::install`] takes the image only
    /// if no newer sync started meanwhile (which would have a newer image).
    pub fn sync_generation(&self, channel: &Channel) -> Option<u64> {
        let room = self.get(channel)?;
        let log = lock(&room.log);
        matches!(log.sync, SyncState::Syncing(_)).then_some(log.sync_gen)
    }

    /// Cluster mode: installs the room's sequence as read from Redis (after subscribing), then
    /// the events that arrived meanwhile. Events the local subscribers had not had yet are
    /// queued for them. False if the room still has a gap (the caller reads a new image).
    pub fn install(&self, channel: &Channel, generation: u64, image: RoomImage) -> bool {
        let Some(room) = self.get(channel) else {
            return true;
        };
        let now = Instant::now();
        let mut log = lock(&room.log);
        if !matches!(log.sync, SyncState::Syncing(_)) || log.sync_gen != generation {
            // Unfollowed meanwhile, or a newer sync owns the room now.
            return true;
        }
        let SyncState::Syncing(pending) = std::mem::replace(&mut log.sync, SyncState::Synced)
        else {
            return true;
        };
        let at = |ts: u64| {
            now.checked_sub(Duration::from_millis(now_ms().saturating_sub(ts)))
                .unwrap_or(now)
        };
        // The image's own run of seqs (a history can hold the tail of an earlier epoch).
        let history: Vec<Incoming> = image
            .history
            .into_iter()
            .filter(|e| e.epoch == image.epoch)
            .collect();
        log.state = image.state;
        if image.epoch != room.epoch() || image.seq < log.last_seq {
            // First sync, or another incarnation of the room: take Redis's as it is. Its
            // history is not sent to current subscribers: they had events of the old run, and
            // seqs they already saw must not come again with other contents.
            room.epoch.store(image.epoch, Ordering::Relaxed);
            log.history.clear();
            log.last_seq = history.first().map_or(image.seq, |e| e.seq - 1);
            for event in history {
                let at = at(event.ts);
                room.store(&mut log, event, at, self.limits);
            }
        } else {
            if history
                .first()
                .is_some_and(|first| first.seq > log.last_seq + 1)
            {
                // Missed more than Redis retains: continue from Redis's oldest.
                tracing::warn!(%channel, from = log.last_seq, to = history[0].seq, "cluster room missed more events than Redis retains");
                log.history.clear();
                log.last_seq = history[0].seq - 1;
            }
            for event in history {
                let at = at(event.ts);
                room.apply_at(&mut log, event, self.limits, at);
            }
        }
        let mut gap = log.last_seq < image.seq;
        let mut leftover = Vec::new();
        for event in pending {
            if gap {
                leftover.push(event);
                continue;
            }
            // Leftovers of an earlier incarnation are dropped; a new one starts at seq 1.
            let wanted = event.epoch == room.epoch() || event.seq == 1;
            if wanted && room.is_gap(&log, &event) {
                gap = true;
                leftover.push(event);
            } else if wanted {
                let at = at(event.ts);
                room.apply_at(&mut log, event, self.limits, at);
            }
        }
        if gap {
            log.sync = SyncState::Syncing(leftover);
        }
        room.last_seq.store(log.last_seq, Ordering::Relaxed);
        !gap
    }

    /// Cluster mode: the node stopped following `channel` (no local subscriber is left).
    pub fn unsync(&self, channel: &Channel) {
        if let Some(room) = self.get(channel) {
            let mut log = lock(&room.log);
            if !matches!(log.sync, SyncState::Local) {
                log.sync = SyncState::Unsynced;
            }
            drop(log);
            *lock(&room.cluster_viewers) = None;
        }
    }

    /// Cluster mode: the cluster's viewer counts of a room, sent to its local subscribers.
    pub fn cluster_viewers(&self, channel: &Channel, viewers: ViewerCounts) {
        if let Some(room) = self.get(channel) {
            *lock(&room.cluster_viewers) = Some(viewers);
            room.send_viewers(viewers);
        }
    }

    /// Cluster mode: the rooms whose local viewers changed since the last call, each with its
    /// connection count and viewers.
    pub fn take_dirty_presence(&self) -> Vec<(Channel, u32, Vec<ViewerKey>)> {
        self.take_dirty()
            .into_iter()
            .map(|room| {
                let members = lock(&room.members);
                let keys = members.viewers.keys().cloned().collect();
                (room.channel.clone(), members.set.len() as u32, keys)
            })
            .collect()
    }

    /// The rooms queued for a viewer-count update since the last call.
    fn take_dirty(&self) -> Vec<Arc<Room>> {
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        for room in &dirty {
            room.presence_dirty.store(false, Ordering::Release);
        }
        dirty
    }

    /// Queues a viewer-count report for every room (after the cluster lost this node's share).
    pub fn mark_all_dirty(&self) {
        let rooms: Vec<Arc<Room>> = self.map.iter().map(|r| Arc::clone(r.value())).collect();
        for room in rooms {
            self.mark_dirty(&room);
        }
    }

    /// Queues a viewer-count report for one room (its last one failed).
    pub fn mark_presence_dirty(&self, channel: &Channel) {
        if let Some(room) = self.get(channel) {
            self.mark_dirty(&room);
        }
    }

    /// Sets a channel's state without an event (an auction at creation or at start-up), and pins
    /// its room so the state is never dropped with it.
    pub fn set_state(&self, channel: &Channel, state: Value) {
        loop {
            let room = self.get_or_create(channel);
            let mut log = lock(&room.log);
            if room.retired.load(Ordering::Acquire) {
                continue;
            }
            // Under `log`, which `try_retire` takes before deciding: the two cannot cross.
            room.pinned.store(true, Ordering::Release);
            log.state = state;
            return;
        }
    }

    /// Sends an unsequenced frame (typing, joined, left, viewers) to the subscribers of an
    /// existing room, except those `skip` names. Nothing is stored.
    pub fn signal(&self, channel: &Channel, frame: ServerFrame, skip: Skip<'_>) -> usize {
        match self.get(channel) {
            Some(room) => room.signal(frame, skip),
            None => 0,
        }
    }

    /// Sends an unsequenced frame (typing) to the room's subscribers: in cluster mode through
    /// the relay to every node's (the relay falls back to this node's when Redis is down).
    /// False when the relay is full: nothing was sent.
    pub fn signal_everywhere(
        &self,
        channel: &Channel,
        frame: ServerFrame,
        skip_user: Option<UserId>,
    ) -> bool {
        match &self.relay {
            Some(relay) => relay.try_send((channel.clone(), frame, skip_user)).is_ok(),
            None => {
                self.signal(channel, frame, Skip::from(skip_user.as_ref()));
                true
            }
        }
    }

    /// Queues a viewer-count update. A `user:{id}` room gets none: its only viewers are that
    /// user's own tabs.
    fn mark_dirty(&self, room: &Arc<Room>) {
        if room.channel.kind() == ChannelKind::User {
            return;
        }
        if !room.presence_dirty.swap(true, Ordering::AcqRel) {
            lock(&self.dirty).push(Arc::clone(room));
        }
    }

    /// Sends one coalesced `viewers` update to each room whose counts changed since the last
    /// call. Called every presence interval.
    pub fn flush_presence(&self) {
        for room in self.take_dirty() {
            if !room.retired.load(Ordering::Acquire) {
                room.send_viewers(room.viewer_counts());
            }
        }
    }

    /// Drops rooms with no subscribers whose history has aged out. Returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let before = self.map.len();
        self.map
            .retain(|_, room| !room.try_retire(self.limits, now));
        let dropped = before.saturating_sub(self.map.len());
        if dropped > 0 {
            metrics::gauge!(m::ROOMS).decrement(dropped as f64);
        }
        dropped
    }

    /// The `n` rooms with the most connections.
    pub fn top(&self, n: usize) -> Vec<RoomInfo> {
        let mut all: Vec<Arc<Room>> = self.map.iter().map(|r| Arc::clone(r.value())).collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.connections.load(Ordering::Relaxed)));
        all.truncate(n);
        all.iter().map(|r| r.info()).collect()
    }
}

/// Auction events go to `auction:{id}` rooms and `user:{id}` rooms.
impl crate::auction::AuctionEvents for Rooms {
    fn publish(&self, announcement: crate::auction::Announcement) {
        let crate::auction::Announcement {
            channel,
            event,
            data,
            state,
        } = announcement;
        self.publish_with_state(&channel, event, None, data, state);
    }

    fn show_state(&self, channel: &Channel, state: Value) {
        self.set_state(channel, state);
    }

    fn release(&self, channel: &Channel) {
        if let Some(room) = self.get(channel) {
            // Under `log`, like `set_state`: `try_retire` decides under it.
            let _log = lock(&room.log);
            room.pinned.store(false, Ordering::Release);
        }
    }
}

impl Room {
    fn new(channel: Channel, epoch: u64, clustered: bool) -> Room {
        Room {
            channel,
            epoch: AtomicU64::new(epoch),
            cluster_viewers: Mutex::new(None),
            subscribers: ArcSwap::from_pointee(Snapshot::default()),
            log: Mutex::new(RoomLog {
                last_seq: 0,
                history: VecDeque::new(),
                state: Value::Null,
                sync: if clustered {
                    SyncState::Unsynced
                } else {
                    SyncState::Local
                },
                sync_gen: 0,
            }),
            members: Mutex::new(Members {
                set: SubscriberSet::default(),
                idle_since: Instant::now(),
                viewers: HashMap::new(),
            }),
            connections: AtomicU32::new(0),
            users: AtomicU32::new(0),
            peak_connections: AtomicU32::new(0),
            peak_users: AtomicU32::new(0),
            last_seq: AtomicU64::new(0),
            presence_dirty: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
        }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The viewer counts clients see: the cluster's in cluster mode, else this node's.
    pub fn viewer_counts(&self) -> ViewerCounts {
        if let Some(counts) = *lock(&self.cluster_viewers) {
            return counts;
        }
        self.local_viewer_counts()
    }

    /// This node's own viewer counts.
    fn local_viewer_counts(&self) -> ViewerCounts {
        ViewerCounts {
            connections: self.connections.load(Ordering::Relaxed),
            users: self.users.load(Ordering::Relaxed),
            peak_connections: self.peak_connections.load(Ordering::Relaxed),
            peak_users: self.peak_users.load(Ordering::Relaxed),
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Relaxed)
    }

    pub fn info(&self) -> RoomInfo {
        let log = lock(&self.log);
        RoomInfo {
            channel: self.channel.clone(),
            epoch: self.epoch(),
            seq: log.last_seq,
            viewers: self.viewer_counts(),
            history_len: log.history.len(),
            oldest_seq: log.history.front().map(|s| s.seq),
        }
    }

    /// Who is in the room: identified users (sorted, at most `limit`) and anonymous connections.
    pub fn presence(&self, limit: usize) -> PresenceReply {
        let members = lock(&self.members);
        let mut users: Vec<UserId> = Vec::new();
        let mut anonymous = 0u32;
        for key in members.viewers.keys() {
            match key {
                ViewerKey::User(u) => users.push(u.clone()),
                ViewerKey::Anonymous(_) => anonymous += 1,
            }
        }
        drop(members);
        users.sort();
        let truncated = users.len() > limit;
        users.truncate(limit);
        PresenceReply {
            channel: self.channel.clone(),
            viewers: self.viewer_counts(),
            users,
            anonymous,
            truncated,
        }
    }

    /// Appends the next event (its seq is `last_seq + 1`) and offers it to every subscriber.
    fn append(
        &self,
        log: &mut RoomLog,
        event: Incoming,
        at: Instant,
        limits: HistoryLimits,
    ) -> usize {
        let frame = self.store(log, event, at, limits);
        self.fan_out(&frame, Skip::Nobody)
    }

    /// Appends the next event to the history (and its state) without offering it to anyone;
    /// returns its frame, encoded once.
    fn store(
        &self,
        log: &mut RoomLog,
        event: Incoming,
        at: Instant,
        limits: HistoryLimits,
    ) -> Arc<SharedFrame> {
        debug_assert_eq!(event.seq, log.last_seq + 1);
        if let Some(state) = event.state {
            log.state = state;
        }
        log.last_seq = event.seq;
        self.last_seq.store(event.seq, Ordering::Relaxed);
        let frame = SharedFrame::for_fan_out(ServerFrame::Event(EventFrame {
            channel: self.channel.clone(),
            seq: event.seq,
            ts: event.ts,
            event: event.event,
            from: event.from,
            data: event.data,
        }));
        log.history.push_back(Stored {
            seq: event.seq,
            at,
            frame: Arc::clone(&frame),
        });
        log.expire(limits, at);
        frame
    }

    /// Whether `event` skips seqs this replica has not seen.
    fn is_gap(&self, log: &RoomLog, event: &Incoming) -> bool {
        if event.epoch != self.epoch() {
            event.seq != 1
        } else {
            event.seq > log.last_seq + 1
        }
    }

    /// Applies an event from the cluster in seq order.
    fn apply_at(
        &self,
        log: &mut RoomLog,
        event: Incoming,
        limits: HistoryLimits,
        at: Instant,
    ) -> Delivery {
        if self.is_gap(log, &event) {
            return Delivery::Gap;
        }
        if event.epoch != self.epoch() {
            // Seq 1 of a new epoch: the room's keys expired in Redis and it started over, so
            // does the replica.
            self.epoch.store(event.epoch, Ordering::Relaxed);
            log.history.clear();
            log.last_seq = 0;
        }
        if event.seq <= log.last_seq {
            return Delivery::Ignored;
        }
        Delivery::Applied(self.append(log, event, at, limits))
    }

    /// Offers `frame` to every subscriber but `skip`; returns how many queued it. Called with
    /// `log` held for sequenced events (see the field's comment), without it for signals.
    fn fan_out(&self, frame: &Arc<SharedFrame>, skip: Skip<'_>) -> usize {
        let subscribers = self.subscribers.load();
        let mut queued = 0;
        for conn in subscribers.iter() {
            if skip.skips(conn) {
                continue;
            }
            match conn.offer_frame(Arc::clone(frame)) {
                Offer::Queued => queued += 1,
                Offer::SlowConsumer | Offer::Closed => {}
            }
        }
        // No log line here (the room's lock may be held): each slow consumer's writer logs
        // its own disconnection, and `gavel_slow_consumers_total` counts them.
        queued
    }

    /// A `viewers` frame to every subscriber.
    fn send_viewers(&self, viewers: ViewerCounts) {
        let frame = ServerFrame::Viewers {
            channel: self.channel.clone(),
            ts: now_ms(),
            viewers,
        };
        self.signal(frame, Skip::Nobody);
    }

    fn signal(&self, frame: ServerFrame, skip: Skip<'_>) -> usize {
        let started = Instant::now();
        let kind = frame.type_name();
        let frame = SharedFrame::for_fan_out(frame);
        let delivered = self.fan_out(&frame, skip);
        m::record_fan_out(kind, delivered, started.elapsed());
        delivered
    }

    /// `joined` / `left` for a user's first / last connection in a conversation room.
    /// The joining connection itself is skipped: its `subscribed` reply says it all.
    fn announce(&self, conn: &ConnHandle, joined: bool, relay: Option<&SignalRelay>) {
        let (ChannelKind::Conversation, Some(user)) = (self.channel.kind(), conn.user()) else {
            return;
        };
        let user_id = user.clone();
        let (channel, user, ts) = (self.channel.clone(), user.clone(), now_ms());
        let frame = if joined {
            ServerFrame::Joined { channel, user, ts }
        } else {
            ServerFrame::Left { channel, user, ts }
        };
        match relay {
            // Every node's subscribers hear it from the cluster (the user's own tabs excepted).
            Some(relay) => {
                if let Err(full) = relay.try_send((self.channel.clone(), frame, Some(user_id))) {
                    // The relay is backed up (Redis slow or gone): this node's subscribers
                    // still hear it.
                    metrics::counter!(m::CLUSTER_ERRORS, "op" => "relay_full").increment(1);
                    let (_, frame, _) = full.into_inner();
                    self.signal(frame, Skip::Conn(conn.id));
                }
            }
            None => {
                self.signal(frame, Skip::Conn(conn.id));
            }
        }
    }

    fn store_counts(&self, members: &Members) {
        let connections = members.set.len() as u32;
        let users = members.viewers.len() as u32;
        self.connections.store(connections, Ordering::Relaxed);
        self.users.store(users, Ordering::Relaxed);
        self.peak_connections
            .fetch_max(connections, Ordering::Relaxed);
        self.peak_users.fetch_max(users, Ordering::Relaxed);
    }

    fn try_retire(&self, limits: HistoryLimits, now: Instant) -> bool {
        let members = lock(&self.members);
        if !members.set.is_empty() {
            return false;
        }
        let mut log = lock(&self.log);
        if self.pinned.load(Ordering::Acquire)
            || matches!(log.sync, SyncState::Syncing(_) | SyncState::Synced)
        {
            return false;
        }
        // Rooms anyone may join (auctions that do not exist, broadcast) that never had an
        // event go at once: they hold no history, and keeping each for the TTL would let a
        // client fill memory by subscribing to random names. Others keep their epoch for the
        // TTL after their last subscriber leaves.
        let open_to_all = matches!(
            self.channel.kind(),
            ChannelKind::Auction | ChannelKind::Broadcast
        );
        let idle_long_enough = now.saturating_duration_since(members.idle_since) > limits.ttl;
        let never_used = open_to_all && log.last_seq == 0;
        if !(idle_long_enough || never_used) {
            return false;
        }
        log.expire(limits, now);
        if !log.history.is_empty() {
            return false;
        }
        self.retired.store(true, Ordering::Release);
        true
    }
}

impl Members {
    /// Adds a connection; returns whether it is its viewer's first in the room.
    fn add(&mut self, conn: &Arc<ConnHandle>) -> bool {
        if !self.set.insert(conn) {
            return false;
        }
        let count = self.viewers.entry(conn.viewer_key()).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Removes a connection; `None` if absent, else whether it was its viewer's last.
    fn remove(&mut self, conn: &ConnHandle) -> Option<bool> {
        if !self.set.remove(conn.id) {
            return None;
        }
        let key = conn.viewer_key();
        let last = match self.viewers.get_mut(&key) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                self.viewers.remove(&key);
                true
            }
        };
        Some(last)
    }
}

impl RoomLog {
    /// Starts waiting for a sync (a new generation), unless already waiting.
    fn start_syncing(&mut self, pending: Vec<Incoming>) {
        match &mut self.sync {
            SyncState::Syncing(waiting) => waiting.extend(pending),
            _ => {
                self.sync = SyncState::Syncing(pending);
                self.sync_gen += 1;
            }
        }
    }

    fn expire(&mut self, limits: HistoryLimits, now: Instant) {
        while self.history.len() > limits.size {
            self.history.pop_front();
        }
        while self
            .history
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > limits.ttl)
        {
            self.history.pop_front();
        }
    }

    /// The events after `since`, or `None` if the history cannot prove it has all of them:
    /// aged out, a `since` from the future, or a `since` above 0 without this room's epoch (a
    /// seq means nothing in another incarnation of the room).
    fn replay_after(
        &self,
        since: u64,
        epoch: Option<u64>,
        room_epoch: u64,
    ) -> Option<Vec<Arc<SharedFrame>>> {
        let same_room = match epoch {
            Some(epoch) => epoch == room_epoch,
            None => since == 0,
        };
        if !same_room || since > self.last_seq {
            return None;
        }
        if since == self.last_seq {
            return Some(Vec::new());
        }
        let oldest = self.history.front()?.seq;
        if oldest > since + 1 {
            return None;
        }
        let skip = (since + 1 - oldest) as usize;
        Some(
            self.history
                .iter()
                .skip(skip)
                .map(|s| Arc::clone(&s.frame))
                .collect(),
        )
    }
}
