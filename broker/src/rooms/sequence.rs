//! Access to a room's sequence for a backplane that sequences events elsewhere (cluster mode:
//! Redis assigns seqs and epochs, and `cluster::replica` keeps each followed room in step). A
//! [`Sequence`] is the room's log under its lock: events applied through it reach the local
//! subscribers in seq order, like local publishes (woken once the lock is released).

use super::*;

/// Cluster mode: a room's viewer counts across the nodes, as Redis published them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterTotals {
    pub counts: ViewerCounts,
    /// When Redis computed them (its clock, µs): of two, the later wins, whichever arrives
    /// last. 0 from a node of an older version (always taken).
    pub at: u64,
}

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

    /// Cluster mode: the cluster's viewer counts of a room as read with its image (when the
    /// node begins to follow it, or resyncs it), unless later ones came. Sent to the local
    /// subscribers only on a resync: at a first follow, the new subscribers' replies carry them
    /// (and nothing may reach them before).
    pub fn cluster_viewers_of_image(&self, channel: &Channel, totals: ClusterTotals) {
        if let Some(room) = self.get(channel) {
            let resync = lock(&room.cluster_viewers).is_some();
            if room.take_cluster_totals(totals) && resync {
                room.send_viewers(totals.counts);
            }
        }
    }

    /// Cluster mode: the cluster's viewer counts of a followed room, sent to its local
    /// subscribers, unless later ones came already (or the room is no longer followed).
    pub fn cluster_viewers(&self, channel: &Channel, totals: ClusterTotals) {
        if let Some(room) = self.get(channel) {
            if room.take_cluster_totals(totals) {
                room.send_viewers(totals.counts);
            }
        }
    }
}

impl Room {
    /// Keeps `totals` if the room is followed and they are not older than what it has.
    fn take_cluster_totals(&self, totals: ClusterTotals) -> bool {
        // Checked under the lock: `Rooms::unfollow` clears the totals after it unsets
        // `followed`, so totals taken here are either cleared by it or refused.
        let mut current = lock(&self.cluster_viewers);
        if !self.followed.load(Ordering::Acquire) {
            return false;
        }
        if current.is_some_and(|c| totals.at != 0 && c.at > totals.at) {
            return false;
        }
        *current = Some(totals);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(connections: u32, at: u64) -> ClusterTotals {
        ClusterTotals {
            counts: ViewerCounts {
                connections,
                users: connections,
                peak_connections: connections,
                peak_users: connections,
            },
            at,
        }
    }

    fn shown(rooms: &Rooms, channel: &Channel) -> u32 {
        rooms.get(channel).unwrap().viewer_counts().connections
    }

    /// Totals arrive from Redis's pub/sub and with room images, in either order: the later
    /// ones (by Redis's clock) stay, and a room no longer followed takes none.
    #[test]
    fn the_latest_cluster_totals_win_whatever_order_they_arrive_in() {
        let limits = RoomLimits {
            size: 10,
            ttl: Duration::from_secs(60),
            memory: 0,
            max_rooms: 0,
        };
        let rooms = Rooms::new(limits);
        let channel = Channel::parse("auction:a").unwrap();
        rooms.follow(&channel);
        rooms.cluster_viewers(&channel, totals(7, 200));
        // An image read before that message was published: older, ignored.
        rooms.cluster_viewers_of_image(&channel, totals(5, 100));
        assert_eq!(shown(&rooms, &channel), 7);
        // A resync's image, newer than anything received (a `V` lost in an outage): taken.
        rooms.cluster_viewers_of_image(&channel, totals(9, 300));
        assert_eq!(shown(&rooms, &channel), 9);
        // A `V` from a node of an older version carries no time: taken as it comes.
        rooms.cluster_viewers(&channel, totals(4, 0));
        assert_eq!(shown(&rooms, &channel), 4);
        // Not followed any more: a `V` still in flight changes nothing (local counts show).
        rooms.unfollow(&channel);
        rooms.cluster_viewers(&channel, totals(8, 400));
        assert_eq!(shown(&rooms, &channel), 0);
    }
}
