//! A room: its members (joins, leaves, viewer keys) and the fan-out of a frame to every
//! subscriber but the ones a signal skips; and when an empty room may be dropped.

use super::*;

impl Room {
    pub(super) fn new(channel: Channel, epoch: u64, retained: Arc<AtomicUsize>) -> Room {
        Room {
            channel,
            epoch: AtomicU64::new(epoch),
            cluster_viewers: Mutex::new(None),
            subscribers: ArcSwap::from_pointee(Snapshot::default()),
            log: Mutex::new(RoomLog::new(retained)),
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
            followed: AtomicBool::new(false),
        }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
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

    /// Where the room's history stands in the order of [`Rooms::trim_to_memory`]: (has
    /// subscribers, when its newest event was stored); `None` when the history is empty.
    pub(super) fn eviction_order(&self) -> Option<(bool, Instant)> {
        let newest = lock(&self.log).newest_at()?;
        Some((self.connections.load(Ordering::Relaxed) > 0, newest))
    }

    /// Drops the history's oldest events until `bytes` are freed (or it is empty); returns how
    /// many events and bytes.
    pub(super) fn drop_history(&self, bytes: usize) -> (usize, usize) {
        let mut log = lock(&self.log);
        let before = log.bytes;
        let mut dropped = 0;
        while before - log.bytes < bytes && log.drop_oldest() {
            dropped += 1;
        }
        (dropped, before - log.bytes)
    }

    /// Appends the next event (its seq is `last_seq + 1`) to the history and to the feed.
    /// Nobody is woken yet: see [`Room::wake`].
    pub(super) fn append(
        &self,
        log: &mut RoomLog,
        event: Incoming,
        at: Instant,
        limits: RoomLimits,
    ) {
        let frame = self.store(log, event, at, limits);
        log.feed.append(frame);
    }

    /// Appends the next event to the history (and its state) without offering it to anyone;
    /// returns its frame, encoded once.
    pub(super) fn store(
        &self,
        log: &mut RoomLog,
        event: Incoming,
        at: Instant,
        limits: RoomLimits,
    ) -> Arc<SharedFrame> {
        debug_assert_eq!(event.seq, log.last_seq + 1);
        let seq = event.seq;
        let frame = SharedFrame::for_fan_out(ServerFrame::Event(EventFrame {
            channel: self.channel.clone(),
            seq,
            ts: event.ts,
            event: event.event,
            from: event.from,
            // The first event of a run names its epoch (protocol §6.3).
            epoch: (seq == 1).then(|| self.epoch()),
            data: event.data,
        }));
        log.push(seq, at, Arc::clone(&frame), event.state, limits);
        self.last_seq.store(seq, Ordering::Relaxed);
        frame
    }

    /// After appending to the feed, which then ended at `end`, and with the log lock released:
    /// wakes every subscriber's writer (or closes it as a slow consumer); returns how many were
    /// woken.
    pub(super) fn wake(&self, end: (u64, u64)) -> usize {
        // Pairs with the fence in `ConnHandle::take_queued`: a writer that cleared its wake flag
        // before this point reads the new events; one that clears it after is woken below.
        std::sync::atomic::fence(Ordering::SeqCst);
        let subscribers = self.subscribers.load();
        subscribers.iter().filter(|sub| sub.wake(end)).count()
    }

    /// Offers `frame` to every subscriber but `skip` (an unsequenced signal); returns how many
    /// queued it.
    pub(super) fn fan_out(&self, frame: &Arc<SharedFrame>, skip: Skip<'_>) -> usize {
        let subscribers = self.subscribers.load();
        let mut queued = 0;
        for sub in subscribers.iter() {
            if skip.skips(&sub.conn) {
                continue;
            }
            if sub.conn.offer(Outbound::Frame(Arc::clone(frame))) == Offer::Queued {
                queued += 1;
            }
        }
        // No log line here: each slow consumer's writer logs its own disconnection, and
        // `gavel_slow_consumers_total` counts them.
        queued
    }

    pub(super) fn signal(&self, frame: ServerFrame, skip: Skip<'_>) -> usize {
        let started = Instant::now();
        let kind = frame.type_name();
        let frame = SharedFrame::for_fan_out(frame);
        let delivered = self.fan_out(&frame, skip);
        m::record_fan_out(kind, 1, delivered, started.elapsed());
        delivered
    }

    /// `joined` / `left` for a user's first / last connection in a conversation room.
    /// The joining connection itself is skipped: its `subscribed` reply says it all.
    pub(super) fn announce(&self, conn: &ConnHandle, joined: bool, relay: Option<&SignalRelay>) {
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
                    // The relay is backed up (its far end slow or gone): this node's subscribers
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

    /// Whether the room may be dropped now: nobody subscribed, no state of its own, not
    /// followed, and its TTL passed with its history gone (or a room anyone may join that never
    /// had an event). Marks it retired if so.
    pub(super) fn try_retire(&self, limits: RoomLimits, now: Instant) -> bool {
        self.retire(Some((limits, now)))
    }

    /// Over `--max-rooms`: drops the room now if nobody is subscribed and it has no state of
    /// its own and is not followed, before its TTL, its history with it.
    pub(super) fn retire_early(&self) -> bool {
        self.retire(None)
    }

    /// Where the room stands in the order of [`Rooms::trim_to_max_rooms`], if nobody is
    /// subscribed and it could be retired early (see [`Room::retire_early`]): (whether it holds
    /// history, its last activity: the later of its last subscriber leaving and its newest
    /// event).
    pub(super) fn early_drop_order(&self) -> Option<(bool, Instant)> {
        let members = lock(&self.members);
        let held = self.pinned.load(Ordering::Acquire) || self.followed.load(Ordering::Acquire);
        if !members.set.is_empty() || held {
            return None;
        }
        let newest = lock(&self.log).newest_at();
        let active = newest.map_or(members.idle_since, |at| at.max(members.idle_since));
        Some((newest.is_some(), active))
    }

    /// [`Room::try_retire`] when given the limits and the time, else [`Room::retire_early`].
    fn retire(&self, by_ttl: Option<(RoomLimits, Instant)>) -> bool {
        let members = lock(&self.members);
        let mut log = lock(&self.log);
        if let Some((limits, now)) = by_ttl {
            // Every room's history ages out, also in rooms that stay (subscribed, a live
            // auction's, followed) and have had no event since: appends alone would not do it.
            log.expire(limits, now);
        }
        if !members.set.is_empty()
            || self.pinned.load(Ordering::Acquire)
            || self.followed.load(Ordering::Acquire)
        {
            return false;
        }
        let Some((limits, now)) = by_ttl else {
            self.retired.store(true, Ordering::Release);
            return true;
        };
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
        if !(idle_long_enough || never_used) || !log.history.is_empty() {
            return false;
        }
        self.retired.store(true, Ordering::Release);
        true
    }
}

impl Members {
    /// Adds a connection's subscription; `None` if the connection is already a member, else
    /// whether it is its viewer's first in the room.
    pub(super) fn add(&mut self, sub: &Arc<Subscription>) -> Option<bool> {
        if !self.set.insert(sub) {
            return None;
        }
        let count = self.viewers.entry(sub.conn.viewer_key()).or_insert(0);
        *count += 1;
        Some(*count == 1)
    }

    /// Removes a connection; `None` if absent, else its subscription and whether it was its
    /// viewer's last.
    pub(super) fn remove(&mut self, conn: &ConnHandle) -> Option<(Arc<Subscription>, bool)> {
        let sub = self.set.remove(conn.id)?;
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
        Some((sub, last))
    }
}
