//! Access to a room's sequence for a backplane that sequences events elsewhere (cluster mode:
//! Redis assigns seqs and epochs, and `cluster::replica` keeps each followed room in step). A
//! [`Sequence`] is the room's log under its lock: events applied through it reach the local
//! subscribers in seq order, like local publishes (woken once the lock is released).

use super::*;

/// An event sequenced elsewhere: its seq and epoch come with it.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub seq: u64,
    pub epoch: u64,
    pub ts: u64,
    pub event: String,
    pub from: Option<UserId>,
    pub data: Data,
    pub state: Option<Value>,
}

/// A room's sequence, held under the room's log lock for as long as it lives.
pub struct Sequence<'a> {
    room: &'a Room,
    log: MutexGuard<'a, RoomLog>,
    limits: RoomLimits,
    /// Whether an event went into the feed: the subscribers are woken after the lock.
    appended: bool,
}

impl Sequence<'_> {
    pub fn epoch(&self) -> u64 {
        self.room.epoch()
    }

    pub fn last_seq(&self) -> u64 {
        self.log.last_seq
    }

    /// Starts another run of seqs: a new epoch (or the same one, after a jump), the history
    /// emptied, the next event `last_seq + 1`. Current subscribers are not told: they learn
    /// it from the seqs of what follows (docs/protocol.md §6.3).
    pub fn restart(&mut self, epoch: u64, last_seq: u64) {
        self.room.epoch.store(epoch, Ordering::Relaxed);
        self.log.clear_history();
        self.log.last_seq = last_seq;
        self.room.last_seq.store(last_seq, Ordering::Relaxed);
    }

    /// Replaces the room's state (without an event).
    pub fn set_state(&mut self, state: Value) {
        self.log.state = state;
    }

    /// Appends the next event (its seq must be `last_seq + 1`) for every local subscriber
    /// (woken when the sequence is released); returns how many there are.
    pub fn append(&mut self, event: Incoming, at: Instant) -> usize {
        self.room.append(&mut self.log, event, at, self.limits);
        self.appended = true;
        self.room.subscribers.load().len()
    }

    /// Appends the next event to the history only (a subscriber gets it by replay).
    pub fn store(&mut self, event: Incoming, at: Instant) {
        self.room.store(&mut self.log, event, at, self.limits);
    }
}

impl Rooms {
    /// Follows `channel`: creates its room if needed and keeps it (it is not dropped while
    /// followed, even without subscribers).
    pub fn follow(&self, channel: &Channel) {
        loop {
            let room = self.get_or_create(channel);
            let _log = lock(&room.log);
            if room.retired.load(Ordering::Acquire) {
                continue;
            }
            room.followed.store(true, Ordering::Release);
            return;
        }
    }

    /// Stops following `channel`: its room may go like any other, and its viewer counts are
    /// this node's again.
    pub fn unfollow(&self, channel: &Channel) {
        if let Some(room) = self.get(channel) {
            let log = lock(&room.log);
            room.followed.store(false, Ordering::Release);
            drop(log);
            *lock(&room.cluster_viewers) = None;
        }
    }

    /// Runs `work` on `channel`'s sequence under the room's log lock; `None` if no room exists.
    pub fn with_sequence<R>(
        &self,
        channel: &Channel,
        work: impl FnOnce(&mut Sequence<'_>) -> R,
    ) -> Option<R> {
        let room = self.get(channel)?;
        let log = lock(&room.log);
        let mut sequence = Sequence {
            room: &room,
            log,
            limits: self.limits,
            appended: false,
        };
        let result = work(&mut sequence);
        let (appended, end) = (sequence.appended, sequence.log.feed.end());
        drop(sequence);
        if appended {
            room.wake(end);
        }
        Some(result)
    }

    /// Cluster mode: the cluster's viewer counts of a room as read when the node began to
    /// follow it, kept unless newer ones came; not sent (new subscribers' replies carry them).
    pub fn first_cluster_viewers(&self, channel: &Channel, viewers: ViewerCounts) {
        if let Some(room) = self.get(channel) {
            lock(&room.cluster_viewers).get_or_insert(viewers);
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
