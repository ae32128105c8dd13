//! This node's replicas of the rooms it follows: each is a faithful copy of the room's sequence
//! in Redis. Events wait while a room syncs, apply in seq order once it is synced, and a gap or
//! a seq that went back triggers a resync. The replica's state is changed under its own lock,
//! and the room's sequence under the room's (in that order), so an event is applied once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gavel_protocol::Channel;
use serde_json::Value;

use super::lock;
use crate::clock::now_ms;
use crate::metrics as m;
use crate::rooms::{ClusterTotals, Incoming, RoomLimits, Rooms, Sequence};

/// A room's sequence as Redis holds it, read after subscribing.
#[derive(Clone, Debug)]
pub struct RoomImage {
    pub epoch: u64,
    pub seq: u64,
    pub state: Value,
    /// The cluster's viewer totals as last published, if anyone is counted.
    pub viewers: Option<ClusterTotals>,
    /// The retained events, oldest first.
    pub history: Vec<Incoming>,
}

/// What [`Replicas::deliver`] did with an event from Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Appended and queued for this many local subscribers.
    Applied(usize),
    /// Kept until the room's sync completes.
    Buffered,
    /// Already applied, or for a room this node does not follow.
    Ignored,
    /// The event skips seqs this node never saw (or repeats one): the room needs a sync.
    Gap,
}

/// How a followed room's replica relates to Redis.
enum SyncState {
    /// Subscribed in Redis, its image not installed yet: events wait here, in arrival order.
    Syncing(Vec<Incoming>),
    /// A faithful replica: events apply in seq order.
    Synced,
}

struct Replica {
    state: SyncState,
    /// Bumped each time the room starts waiting for a sync.
    generation: u64,
}

impl Replica {
    /// Starts waiting for a sync (a new generation), unless already waiting.
    fn start_syncing(&mut self, pending: Vec<Incoming>) {
        match &mut self.state {
            SyncState::Syncing(waiting) => waiting.extend(pending),
            SyncState::Synced => {
                self.state = SyncState::Syncing(pending);
                self.generation += 1;
            }
        }
    }
}

/// The replicas of every followed room.
pub struct Replicas {
    rooms: Arc<Rooms>,
    limits: RoomLimits,
    /// Followed rooms. The map's lock is held only to find or change an entry; each replica has
    /// its own lock, held while its room's sequence changes.
    map: Mutex<HashMap<Channel, Arc<Mutex<Replica>>>>,
}

/// Whether `event` skips seqs the replica has not seen.
fn is_gap(sequence: &Sequence<'_>, event: &Incoming) -> bool {
    if event.epoch != sequence.epoch() {
        event.seq != 1
    } else {
        event.seq > sequence.last_seq() + 1
    }
}

/// Applies an event in seq order.
fn apply(sequence: &mut Sequence<'_>, event: Incoming, at: Instant) -> Delivery {
    if is_gap(sequence, &event) {
        return Delivery::Gap;
    }
    if event.epoch != sequence.epoch() {
        // Seq 1 of a new epoch: the room's keys expired in Redis (or it started over after a
        // failover), so does the replica.
        sequence.restart(event.epoch, 0);
    }
    if event.seq <= sequence.last_seq() {
        return Delivery::Ignored;
    }
    Delivery::Applied(sequence.append(event, at))
}

impl Replicas {
    pub fn new(rooms: Arc<Rooms>, limits: RoomLimits) -> Replicas {
        Replicas {
            rooms,
            limits,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn replica(&self, channel: &Channel) -> Option<Arc<Mutex<Replica>>> {
        lock(&self.map).get(channel).cloned()
    }

    /// Applies an event sequenced by Redis to this node's replica of the room and queues it
    /// for the local subscribers. Events arrive in seq order from Redis; a missing seq (a
    /// pub/sub connection that dropped) or a repeated one (Redis went back) is a gap.
    pub fn deliver(&self, channel: &Channel, event: Incoming) -> Delivery {
        let Some(replica) = self.replica(channel) else {
            return Delivery::Ignored;
        };
        let started = Instant::now();
        let mut replica = lock(&replica);
        let delivery = self.rooms.with_sequence(channel, |sequence| {
            let gap = is_gap(sequence, &event);
            // In a replica in step, the same epoch never repeats a seq: one at or below the
            // last means Redis went back (a failover to a lagging replica). Resync: the sync
            // starts a new epoch there rather than let seqs be reused.
            let went_back = event.epoch == sequence.epoch() && event.seq <= sequence.last_seq();
            match &mut replica.state {
                SyncState::Syncing(pending) => {
                    if pending.len() >= self.limits.size.max(1024) * 4 {
                        // A sync that takes this long reads these from Redis's history anyway
                        // (or finds it cannot, and says so).
                        pending.clear();
                    }
                    pending.push(event);
                    Delivery::Buffered
                }
                SyncState::Synced if went_back => {
                    replica.start_syncing(Vec::new());
                    Delivery::Gap
                }
                SyncState::Synced if gap => {
                    // The event is kept: the sync that fills the gap applies it after.
                    replica.start_syncing(vec![event]);
                    Delivery::Gap
                }
                SyncState::Synced => apply(sequence, event, started),
            }
        });
        let delivery = delivery.unwrap_or(Delivery::Ignored);
        if let Delivery::Applied(delivered) = delivery {
            m::record_fan_out("event", 1, delivered, started.elapsed());
        }
        delivery
    }

    /// The epoch and last seq of a followed room's replica.
    pub fn position(&self, channel: &Channel) -> Option<(u64, u64)> {
        let replica = self.replica(channel)?;
        let _replica = lock(&replica);
        self.rooms
            .with_sequence(channel, |s| (s.epoch(), s.last_seq()))
    }

    /// Follows `channel`: from now on its events wait for [`Replicas::install`]. Called before
    /// subscribing in Redis, so nothing published after the subscription is missed.
    pub fn begin_sync(&self, channel: &Channel) {
        self.rooms.follow(channel);
        let replica = Arc::clone(lock(&self.map).entry(channel.clone()).or_insert_with(|| {
            Arc::new(Mutex::new(Replica {
                state: SyncState::Synced,
                generation: 0,
            }))
        }));
        lock(&replica).start_syncing(Vec::new());
    }

    /// The generation of the room's current sync, `None` when it is not waiting for one. Read
    /// before reading the room's image: [`Replicas::install`] takes the image only if no newer
    /// sync started meanwhile (which would have a newer image).
    pub fn sync_generation(&self, channel: &Channel) -> Option<u64> {
        let replica = self.replica(channel)?;
        let replica = lock(&replica);
        matches!(replica.state, SyncState::Syncing(_)).then_some(replica.generation)
    }

    /// Installs the room's sequence as read from Redis (after subscribing), then the events
    /// that arrived meanwhile. Events the local subscribers had not had yet are queued for them.
    /// False if the room still has a gap (the caller reads a new image).
    pub fn install(&self, channel: &Channel, generation: u64, image: RoomImage) -> bool {
        let Some(replica) = self.replica(channel) else {
            return true;
        };
        let mut replica = lock(&replica);
        if !matches!(replica.state, SyncState::Syncing(_)) || replica.generation != generation {
            // A newer sync owns the room now.
            return true;
        }
        let SyncState::Syncing(pending) = std::mem::replace(&mut replica.state, SyncState::Synced)
        else {
            return true;
        };
        if let Some(totals) = image.viewers {
            self.rooms.cluster_viewers_of_image(channel, totals);
        }
        let installed = self.rooms.with_sequence(channel, |sequence| {
            install_image(channel, sequence, image, pending)
        });
        match installed {
            None => true,
            Some(None) => true,
            Some(Some(leftover)) => {
                replica.state = SyncState::Syncing(leftover);
                false
            }
        }
    }

    /// The node stopped following `channel` (no local subscriber is left).
    pub fn unsync(&self, channel: &Channel) {
        lock(&self.map).remove(channel);
        self.rooms.unfollow(channel);
    }
}

/// Installs `image` and then the `pending` events; `Some(leftover)` when a gap remains.
fn install_image(
    channel: &Channel,
    sequence: &mut Sequence<'_>,
    image: RoomImage,
    pending: Vec<Incoming>,
) -> Option<Vec<Incoming>> {
    let now = Instant::now();
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
    sequence.set_state(image.state);
    // The replica of a room that had no event in Redis (epoch 0, seq 0): its subscribers saw
    // nothing, so a run that started meanwhile is theirs to receive, from its first event.
    let had_nothing = sequence.epoch() == 0 && sequence.last_seq() == 0;
    if had_nothing && image.epoch != 0 {
        sequence.restart(
            image.epoch,
            history.first().map_or(image.seq, |e| e.seq - 1),
        );
        for event in history {
            let at = at(event.ts);
            apply(sequence, event, at);
        }
    } else if image.epoch != sequence.epoch() || image.seq < sequence.last_seq() {
        // First sync, or another incarnation of the room: take Redis's as it is. Its history
        // is not sent to current subscribers: they had events of the old run, and seqs they
        // already saw must not come again with other contents.
        sequence.restart(
            image.epoch,
            history.first().map_or(image.seq, |e| e.seq - 1),
        );
        for event in history {
            let at = at(event.ts);
            sequence.store(event, at);
        }
    } else {
        if let Some(first) = history.first().filter(|f| f.seq > sequence.last_seq() + 1) {
            // Missed more than Redis retains: continue from Redis's oldest.
            tracing::warn!(%channel, from = sequence.last_seq(), to = first.seq, "cluster room missed more events than Redis retains");
            let epoch = sequence.epoch();
            sequence.restart(epoch, first.seq - 1);
        }
        for event in history {
            let at = at(event.ts);
            apply(sequence, event, at);
        }
    }
    let mut gap = sequence.last_seq() < image.seq;
    let mut leftover = Vec::new();
    for event in pending {
        if gap {
            leftover.push(event);
            continue;
        }
        // Leftovers of an earlier incarnation are dropped; a new one starts at seq 1.
        let wanted = event.epoch == sequence.epoch() || event.seq == 1;
        if wanted && is_gap(sequence, &event) {
            gap = true;
            leftover.push(event);
        } else if wanted {
            let at = at(event.ts);
            apply(sequence, event, at);
        }
    }
    gap.then_some(leftover)
}
