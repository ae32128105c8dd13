//! The pure part of a room: its sequence and bounded history (size and age), and which events a
//! `since` + `epoch` resubscribe can be given. No locks, no IO: the room holds it under its log
//! lock.

use super::*;

/// Limits of the rooms: each one's history (`size`, `ttl`), every history together (`memory`),
/// and how many rooms are kept (`max_rooms`). The last two are enforced by
/// [`Rooms::sweep`](super::Rooms::sweep).
#[derive(Clone, Copy, Debug)]
pub struct RoomLimits {
    /// Events kept per room.
    pub size: usize,
    /// Age after which an event is dropped.
    pub ttl: Duration,
    /// Bytes of history kept across all rooms (0: no limit), each event counted at
    /// [`history_cost`].
    pub memory: usize,
    /// Rooms kept (0: no limit): over it, rooms nobody is subscribed to are dropped, those idle
    /// longest first, before their TTL.
    pub max_rooms: usize,
}

/// What an event in a history is counted as: its `data` and its MessagePack frame (the JSON
/// and SSE encodings, made when a client of those first reads the event, are not counted), plus
/// the bookkeeping around them.
pub fn history_cost(frame: &SharedFrame) -> usize {
    let data = match frame.frame() {
        ServerFrame::Event(event) => event.data.as_msgpack().len(),
        _ => 0,
    };
    let encoded = frame.framed(Wire::MsgPack).map_or(0, <[u8]>::len);
    data + encoded + 256
}

impl RoomLog {
    /// An empty log at seq 0, whose history is counted in `retained` (shared by every room).
    pub(super) fn new(retained: Arc<AtomicUsize>) -> RoomLog {
        RoomLog {
            last_seq: 0,
            history: VecDeque::new(),
            bytes: 0,
            retained,
            state: Value::Null,
            feed: Feed::default(),
        }
    }

    /// Appends event `seq` (the next one) with its frame, replaces the state if it carries
    /// one, and trims the history to its limits.
    pub(super) fn push(
        &mut self,
        seq: u64,
        at: Instant,
        frame: Arc<SharedFrame>,
        state: Option<Value>,
        limits: RoomLimits,
    ) {
        if let Some(state) = state {
            self.state = state;
        }
        self.last_seq = seq;
        let size = history_cost(&frame);
        self.bytes += size;
        self.retained.fetch_add(size, Ordering::Relaxed);
        self.history.push_back(Stored {
            seq,
            at,
            size,
            frame,
        });
        self.expire(limits, at);
    }

    pub(super) fn expire(&mut self, limits: RoomLimits, now: Instant) {
        while self.history.len() > limits.size {
            self.drop_oldest();
        }
        while self
            .history
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > limits.ttl)
        {
            self.drop_oldest();
        }
    }

    /// Drops the oldest event of the history; false when it is empty.
    pub(super) fn drop_oldest(&mut self) -> bool {
        let Some(oldest) = self.history.pop_front() else {
            return false;
        };
        self.bytes -= oldest.size;
        self.retained.fetch_sub(oldest.size, Ordering::Relaxed);
        true
    }

    /// Empties the history (the seq stays).
    pub(super) fn clear_history(&mut self) {
        while self.drop_oldest() {}
    }

    /// When the newest event of the history was stored, if there is one.
    pub(super) fn newest_at(&self) -> Option<Instant> {
        self.history.back().map(|s| s.at)
    }

    /// The events after `since`, or `None` if the history cannot prove it has all of them:
    /// aged out, a `since` from the future, or a `since` above 0 without this room's epoch (a
    /// seq means nothing in another incarnation of the room).
    pub(super) fn replay_after(
        &self,
        since: u64,
        epoch: Option<u64>,
        room_epoch: u64,
    ) -> Option<Vec<Arc<SharedFrame>>> {
        // No epoch, or epoch 0 (a cluster room that had no event when the client subscribed),
        // with `since` 0: the client has seen nothing of any run, so all of this one will do.
        let same_room = match epoch {
            Some(epoch) => epoch == room_epoch || (epoch == 0 && since == 0),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EPOCH: u64 = 77;

    fn frame(seq: u64) -> Arc<SharedFrame> {
        crate::outbound::test_event("broadcast", seq)
    }

    fn seqs(frames: &[Arc<SharedFrame>]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| match f.frame() {
                ServerFrame::Event(e) => e.seq,
                _ => 0,
            })
            .collect()
    }

    /// A log after `events` events, `gap_ms` apart, the last one now.
    fn log_of(events: u64, gap_ms: u64, limits: RoomLimits) -> (RoomLog, Instant) {
        let start = Instant::now();
        let mut log = RoomLog::new(Arc::default());
        for seq in 1..=events {
            log.push(
                seq,
                start + Duration::from_millis(seq * gap_ms),
                frame(seq),
                None,
                limits,
            );
        }
        (log, start + Duration::from_millis(events * gap_ms))
    }

    proptest! {
        /// The history is the last events in seq order, never more than the size limit, and a
        /// resubscribe gets exactly the events after its `since`, or `None` when the history
        /// cannot prove it has them all.
        #[test]
        fn replay_is_exactly_what_was_missed_or_nothing(
            events in 0u64..200,
            size in 1usize..64,
            since in 0u64..220,
            same_epoch in any::<bool>(),
        ) {
            let limits = RoomLimits { size, ttl: Duration::from_secs(3600), memory: 0, max_rooms: 0 };
            let (log, _) = log_of(events, 1, limits);
            prop_assert_eq!(log.last_seq, events);
            let kept: Vec<u64> = log.history.iter().map(|s| s.seq).collect();
            let first = events.saturating_sub(size as u64) + 1;
            prop_assert_eq!(kept, (first..=events).collect::<Vec<_>>());
            let epoch = if same_epoch { EPOCH } else { EPOCH + 1 };
            let replay = log.replay_after(since, Some(epoch), EPOCH);
            let recoverable = same_epoch && since <= events && since + 1 >= first;
            match replay {
                Some(frames) => {
                    prop_assert!(recoverable);
                    prop_assert_eq!(seqs(&frames), (since + 1..=events).collect::<Vec<_>>());
                }
                None => prop_assert!(!recoverable || (since < events && log.history.is_empty())),
            }
            // Without the epoch, or with epoch 0 (a cluster room that had no event yet), only
            // `since: 0` means anything: then it is all of the run, as without `since`.
            if since > 0 {
                prop_assert!(log.replay_after(since, None, EPOCH).is_none());
                prop_assert!(log.replay_after(since, Some(0), EPOCH).is_none());
            } else {
                prop_assert_eq!(
                    log.replay_after(0, Some(0), EPOCH).map(|f| seqs(&f)),
                    log.replay_after(0, None, EPOCH).map(|f| seqs(&f))
                );
            }
        }

        /// Events older than the TTL leave the history (oldest first); the seq stays.
        #[test]
        fn aged_events_leave_the_history(events in 1u64..100, ttl_ms in 0u64..150) {
            let limits = RoomLimits { size: 1000, ttl: Duration::from_millis(ttl_ms), memory: 0, max_rooms: 0 };
            let (mut log, now) = log_of(events, 1, limits);
            log.expire(limits, now);
            prop_assert_eq!(log.last_seq, events);
            for stored in &log.history {
                prop_assert!(now.saturating_duration_since(stored.at) <= limits.ttl);
            }
            let oldest = log.history.front().map_or(events + 1, |s| s.seq);
            prop_assert_eq!(log.history.len() as u64, events + 1 - oldest);
            // What the history counts for, here and in the registry's total, is what it holds.
            let held: usize = log.history.iter().map(|s| s.size).sum();
            prop_assert_eq!(log.bytes, held);
            prop_assert_eq!(log.retained.load(Ordering::Relaxed), held);
            let retained = Arc::clone(&log.retained);
            drop(log);
            prop_assert_eq!(retained.load(Ordering::Relaxed), 0, "a dropped log gives its count back");
        }
    }
}
