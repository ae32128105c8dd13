//! Cluster mode: a room as a faithful replica of its sequence in Redis. Events wait while the
//! room syncs, apply in seq order once synced, and a gap or a seq that went back triggers a
//! resync. The state lives in the room's log (it must change under the same lock).

use super::*;

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
pub(super) enum SyncState {
    /// Single-node mode: this node assigns the seqs.
    Local,
    /// Cluster mode, not followed (no local interest): events are ignored.
    Unsynced,
    /// Subscribed in Redis, its image not installed yet: events wait here, in arrival order.
    Syncing(Vec<Incoming>),
    /// A faithful replica: events apply in seq order.
    Synced,
}

impl Rooms {
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
}

impl Room {
    /// Whether `event` skips seqs this replica has not seen.
    pub(super) fn is_gap(&self, log: &RoomLog, event: &Incoming) -> bool {
        if event.epoch != self.epoch() {
            event.seq != 1
        } else {
            event.seq > log.last_seq + 1
        }
    }

    /// Applies an event from the cluster in seq order.
    pub(super) fn apply_at(
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
}

impl RoomLog {
    /// Starts waiting for a sync (a new generation), unless already waiting.
    pub(super) fn start_syncing(&mut self, pending: Vec<Incoming>) {
        match &mut self.sync {
            SyncState::Syncing(waiting) => waiting.extend(pending),
            _ => {
                self.sync = SyncState::Syncing(pending);
                self.sync_gen += 1;
            }
        }
    }
}
