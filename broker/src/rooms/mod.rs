//! The room registry: channel → room, and per room its subscribers, sequence, bounded history,
//! live feed and viewer counts. It owns fan-out (encode once, append to the room's feed, wake
//! each subscriber's writer) and `since` recovery. It knows nothing of sockets: it wakes and
//! offers frames to [`ConnHandle`]s.
//!
//! Files: this one (the registry: subscribe, unsubscribe, publish, sweep), `room` (a room's
//! members and fan-out), `log` (the pure seq/history log, property-tested), `presence`
//! (viewer counts and their coalesced updates), `sequence` (access to a room's sequence for a
//! backplane that sequences events elsewhere: the cluster's replicas, in `cluster::replica`).

mod log;
mod presence;
mod room;
mod sequence;

pub use log::RoomLimits;
pub use sequence::{ClusterTotals, Incoming, Sequence};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use gavel_protocol::{
    Channel, ChannelKind, Data, EventFrame, PresenceReply, Reply, RequestId, RoomSnapshot,
    ServerFrame, UserId, ViewerCounts,
};
use serde_json::Value;

use crate::clock::now_ms;
use crate::feed::{Cursor, Feed, Subscription};
use crate::metrics as m;
use crate::outbound::{
    wire_size, ConnHandle, ConnId, Follow, Offer, Outbound, SharedFrame, ViewerKey, Wire,
};
use crate::subscribers::{Snapshot, SubscriberSet};

/// Locks a mutex, recovering the data if a panic elsewhere poisoned it: every critical section
/// below leaves the data consistent at each step, so the data is still good.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `frames` fit the connection's pending-bytes bound. Sized frame by frame, stopping
/// at the first that goes over: a JSON or SSE connection's encodings are made here (under the
/// room's lock), so a replay far over the bound costs no more than the bound's worth of them.
fn replay_fits(conn: &ConnHandle, frames: &[Arc<SharedFrame>]) -> bool {
    let mut size = 0usize;
    frames.iter().all(|frame| {
        size = size.saturating_add(wire_size(frame, conn.wire));
        conn.fits(size)
    })
}

/// One event of a producer's turn, for [`Rooms::publish_all`].
pub struct TurnEvent {
    pub event: String,
    pub data: Data,
    /// The room's state right after the event (`None`: unchanged).
    pub state: Option<Value>,
}

/// How long a room without subscribers is kept at least, even over `--max-rooms` (unless a
/// tenth of the TTL is shorter): long enough for a reload or a brief network drop to recover.
pub const EARLY_DROP_GRACE: Duration = Duration::from_secs(30);

/// Every room of this node.
pub struct Rooms {
    map: DashMap<Channel, Arc<Room>>,
    limits: RoomLimits,
    /// Every room's history, counted ([`log::history_cost`]); held under
    /// `limits.memory` by [`Rooms::sweep`].
    retained: Arc<AtomicUsize>,
    /// Rooms whose viewer counts changed since the last presence tick. A plain mutex: it is
    /// taken once per room per tick (the `presence_dirty` flag filters repeats), never across
    /// an await, and never while a room lock is held.
    dirty: Mutex<Vec<Arc<Room>>>,
    /// Source of room epochs: microseconds since the Unix epoch at start, then +1 per room, so
    /// epochs differ across restarts and between incarnations of a room.
    next_epoch: AtomicU64,
    /// Cluster mode: unsequenced signals that start here (joined, left) go out through the
    /// relay to every node.
    relay: Option<SignalRelay>,
}

/// Where a clustered registry sends the signals it makes itself (joined, left), so that they
/// reach the room's subscribers on every node: (channel, frame, user to skip).
/// Bounded: when it is full, signals are delivered on this node only (and counted).
pub type SignalRelay = tokio::sync::mpsc::Sender<(Channel, ServerFrame, Option<UserId>)>;

/// A channel's room.
pub struct Room {
    channel: Channel,
    /// Set at creation; for a followed room, replaced (under `log`) by the sequencer's epoch
    /// through [`Sequence::restart`].
    epoch: AtomicU64,
    /// Cluster mode: the cluster's viewer counts, as last published (local counts otherwise).
    cluster_viewers: Mutex<Option<ClusterTotals>>,
    /// The subscriber set publishers read: an immutable snapshot replaced whole (copy-on-write,
    /// in chunks) by joins and leaves, so a publish never waits for a join or a leave to copy.
    subscribers: ArcSwap<Snapshot>,
    /// Sequence, history and feed. A publish holds it while it assigns the seq and appends to
    /// the history and the feed (O(1) per event); it wakes the subscribers after releasing it.
    /// Each subscriber's writer reads the feed in order, so it receives the room's events in
    /// seq order. Joins and leaves take it only to swap in their new snapshot and read the
    /// history and the feed's tail, never to build the snapshot.
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
    /// Cluster mode: the room is followed (a replica of a sequence kept elsewhere): never
    /// dropped while followed. Set and cleared under `log`.
    followed: AtomicBool,
}

struct RoomLog {
    last_seq: u64,
    history: VecDeque<Stored>,
    /// What the history counts for ([`log::history_cost`]), here and in `retained`.
    bytes: usize,
    /// Every room's history, counted (shared by every room of the registry).
    retained: Arc<AtomicUsize>,
    /// The channel's state as of `last_seq` (an auction's snapshot), `null` for plain rooms.
    /// Changed only together with an event, so a subscriber's state and stream agree.
    state: Value,
    /// The live events, for the subscribers' writers to read.
    feed: Feed,
}

struct Stored {
    seq: u64,
    at: Instant,
    /// [`log::history_cost`] of the frame when it was stored.
    size: usize,
    frame: Arc<SharedFrame>,
}

impl Drop for RoomLog {
    fn drop(&mut self) {
        self.retained.fetch_sub(self.bytes, Ordering::Relaxed);
    }
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
    pub fn new(limits: RoomLimits) -> Rooms {
        Rooms::build(limits, None)
    }

    /// A registry whose rooms' signals (joined, left) also go out through `relay` (cluster
    /// mode); their sequences are kept by whoever follows them (see [`Sequence`]).
    pub fn clustered(limits: RoomLimits, relay: SignalRelay) -> Rooms {
        Rooms::build(limits, Some(relay))
    }

    fn build(limits: RoomLimits, relay: Option<SignalRelay>) -> Rooms {
        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Rooms {
            map: DashMap::new(),
            limits,
            retained: Arc::default(),
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
                Arc::clone(&self.retained),
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
            let sub = Subscription::new(Arc::clone(conn));
            // `None`: already subscribed (the session refuses that first). The reply still
            // goes out, without a second cursor.
            let added = members.add(&sub);
            room.store_counts(&members);
            // The new snapshot is built here, under `members` only: publishers do not wait.
            let subscribers = Arc::new(members.set.snapshot());

            let mut log = lock(&room.log);
            log.expire(self.limits, Instant::now());
            let start = log.feed.tail();
            sub.start_at(&start);
            let cursor = added.map(|_| Cursor::new(sub, start));
            let (recovered, replay) = match since {
                None => (None, Vec::new()),
                Some(since) => match log.replay_after(since, epoch, room.epoch()) {
                    // A replay must fit the connection's pending-bytes bound; a larger one is
                    // answered like an aged-out history: a snapshot to reload from.
                    Some(frames) if replay_fits(conn, &frames) => (Some(true), frames),
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
            let mut frames = Vec::with_capacity(replay.len() + 1);
            frames.push(reply);
            frames.extend(replay);
            // Queue the reply and the cursor first, then publish the new snapshot: anything
            // appended from here on is read after the reply, and signals offered from the
            // snapshot on come after it.
            conn.offer(Outbound::Follow(Box::new(Follow {
                frames: frames.into(),
                cursor,
            })));
            room.subscribers.store(subscribers);
            drop(log);
            // Still under `members`, so a user's joined and left reach everyone in the order
            // they happened (the offers do not block).
            if added == Some(true) {
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
        let Some((sub, last_of_viewer)) = members.remove(conn) else {
            return false;
        };
        if members.set.is_empty() {
            members.idle_since = Instant::now();
        }
        room.store_counts(&members);
        let snapshot = Arc::new(members.set.snapshot());
        {
            // The writer reads the room's feed up to this item, which comes before the
            // caller's `unsubscribed` reply: no event of the room follows that reply.
            let _log = lock(&room.log);
            conn.offer(Outbound::Unfollow(sub));
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
        data: Data,
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
        data: Data,
        state: Option<Value>,
    ) -> Published {
        self.publish_all(
            channel,
            from,
            std::iter::once(TurnEvent {
                event: event.to_owned(),
                data,
                state,
            }),
        )
    }

    /// Appends several events to `channel`'s room in order, under one lock, then wakes each
    /// subscriber once: one wake-up and one socket write per subscriber for a producer's whole
    /// turn, instead of one per event. Returns the last event's seq.
    pub fn publish_all(
        &self,
        channel: &Channel,
        from: Option<UserId>,
        events: impl IntoIterator<Item = TurnEvent>,
    ) -> Published {
        let mut events: VecDeque<TurnEvent> = events.into_iter().collect();
        loop {
            let room = self.get_or_create(channel);
            let mut log = lock(&room.log);
            if room.retired.load(Ordering::Acquire) {
                continue;
            }
            let started = Instant::now();
            let mut count = 0;
            while let Some(TurnEvent { event, data, state }) = events.pop_front() {
                let incoming = Incoming {
                    seq: log.last_seq + 1,
                    epoch: room.epoch(),
                    ts: now_ms(),
                    event,
                    from: from.clone(),
                    data,
                    state,
                };
                room.append(&mut log, incoming, started, self.limits);
                count += 1;
            }
            let seq = log.last_seq;
            let end = log.feed.end();
            drop(log);
            let delivered = if count == 0 { 0 } else { room.wake(end) };
            // Frames, not wake-ups: a turn's events reach each subscriber in one wake-up.
            m::record_fan_out("event", count, delivered * count, started.elapsed());
            return Published { seq, delivered };
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
    /// the relay to every node's (the relay falls back to this node's when it cannot send).
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

    /// Drops rooms with no subscribers whose history has aged out, then holds the histories
    /// under their memory limit ([`Rooms::trim_to_memory`]). Returns how many rooms it dropped.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut dropped = 0;
        self.map.retain(|_, room| {
            let retire = room.try_retire(self.limits, now);
            dropped += usize::from(retire);
            !retire
        });
        if dropped > 0 {
            metrics::gauge!(m::ROOMS).decrement(dropped as f64);
        }
        // Rooms first: a room dropped takes its history with it.
        let dropped_early = self.trim_to_max_rooms(now);
        if dropped_early > 0 {
            metrics::gauge!(m::ROOMS).decrement(dropped_early as f64);
            metrics::counter!(m::ROOMS_DROPPED_EARLY).increment(dropped_early as u64);
        }
        let evicted = self.trim_to_memory();
        if evicted > 0 {
            metrics::counter!(m::HISTORY_EVICTED).increment(evicted as u64);
        }
        metrics::gauge!(m::HISTORY_BYTES).set(self.history_bytes() as f64);
        dropped + dropped_early
    }

    /// Over `--max-rooms`: drops rooms nobody is subscribed to (live auctions' rooms and
    /// followed ones excepted) before their TTL, down to 90 % of it: rooms with no history
    /// first, then those whose last activity (their last subscriber leaving, or their newest
    /// event) is oldest. A room active in the last [`EARLY_DROP_GRACE`] (or a tenth of the TTL,
    /// if shorter) stays, so a reload or a brief drop still recovers. A client returning to a dropped room
    /// finds a new epoch (`recovered: false`). Returns how many it dropped.
    pub fn trim_to_max_rooms(&self, now: Instant) -> usize {
        let cap = self.limits.max_rooms;
        if cap == 0 || self.map.len() <= cap {
            return 0;
        }
        let target = cap / 10 * 9;
        let grace = EARLY_DROP_GRACE.min(self.limits.ttl / 10);
        // Collected first: no room lock is taken under the map's.
        let rooms: Vec<Arc<Room>> = self.map.iter().map(|r| Arc::clone(r.value())).collect();
        let mut idle: Vec<((bool, Instant), Arc<Room>)> = rooms
            .into_iter()
            .filter_map(|room| room.early_drop_order().map(|order| (order, room)))
            .filter(|((_, active), _)| now.saturating_duration_since(*active) >= grace)
            .collect();
        idle.sort_by_key(|(order, _)| *order);
        let mut dropped = 0;
        for (_, room) in idle {
            if self.map.len() <= target {
                break;
            }
            let channel = room.channel().clone();
            if self
                .map
                .remove_if(&channel, |_, current| {
                    Arc::ptr_eq(current, &room) && room.retire_early()
                })
                .is_some()
            {
                dropped += 1;
            }
        }
        dropped
    }

    /// What every room's history counts for, in bytes ([`log::history_cost`] of each event).
    pub fn history_bytes(&self) -> usize {
        self.retained.load(Ordering::Relaxed)
    }

    /// Over `--history-memory`: empties the histories of the rooms nobody is subscribed to, then
    /// of the others, in each group the rooms whose newest event is oldest first (each from its
    /// oldest event), until the total is down to 90 % of the limit (so that the next publishes
    /// do not put it over again at once). A `since` into what was dropped is answered with a
    /// snapshot, as after the TTL. Returns how many events it dropped.
    pub fn trim_to_memory(&self) -> usize {
        let budget = self.limits.memory;
        let total = self.history_bytes();
        if budget == 0 || total <= budget {
            return 0;
        }
        // Decided once: rooms created while this runs do not make it take more.
        let mut to_free = total - budget / 10 * 9;
        // Collected first: no room lock is taken under the map's.
        let rooms: Vec<Arc<Room>> = self.map.iter().map(|r| Arc::clone(r.value())).collect();
        let mut by_age: Vec<((bool, Instant), Arc<Room>)> = rooms
            .into_iter()
            .filter_map(|room| room.eviction_order().map(|order| (order, room)))
            .collect();
        by_age.sort_by_key(|(order, _)| *order);
        let mut evicted = 0;
        for (_, room) in by_age {
            let (events, freed) = room.drop_history(to_free);
            evicted += events;
            to_free = to_free.saturating_sub(freed);
            if to_free == 0 {
                break;
            }
        }
        evicted
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
    /// Consecutive announcements to one room go out together (see [`Rooms::publish_all`]).
    fn publish(&self, announcements: Vec<crate::auction::Announcement>) {
        let mut announcements = announcements.into_iter().peekable();
        while let Some(first) = announcements.next() {
            let channel = first.channel.clone();
            let mut group = vec![first];
            while let Some(next) = announcements.next_if(|a| a.channel == channel) {
                group.push(next);
            }
            self.publish_all(
                &channel,
                None,
                group.into_iter().map(|a| TurnEvent {
                    event: a.event.to_owned(),
                    data: a.data,
                    state: a.state,
                }),
            );
        }
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
