//! A room's live feed and the subscriptions that follow it. The feed is a chain of shared nodes,
//! one per event, appended in O(1) under the room's log lock; each subscriber's writer follows it
//! lock-free from its own cursor (the model of `tokio::sync::broadcast`, with an unbounded chain
//! instead of a fixed ring: a caught-up feed holds one node). A subscriber that lags more than its
//! bound is a slow consumer; the publisher checks that as it wakes each writer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::outbound::{wire_size, ConnHandle, DisconnectReason, SharedFrame, Wire};

/// One event of a feed (or the start of it: no frame).
pub struct Node {
    /// Position in the feed: 0 at its start, then +1 per event. Not the room's seq, which a
    /// cluster resync may move backwards.
    pos: u64,
    /// MessagePack bytes of every event up to this one (what the pending-bytes bound counts).
    bytes: u64,
    frame: Option<Arc<SharedFrame>>,
    next: OnceLock<Arc<Node>>,
}

impl Drop for Node {
    /// Unlinks the chain after this node one node at a time: the default drop would recurse
    /// once per node of a long chain.
    fn drop(&mut self) {
        let mut next = self.next.take();
        while let Some(node) = next {
            next = match Arc::into_inner(node) {
                Some(mut node) => node.next.take(),
                None => None,
            };
        }
    }
}

/// The writable end of a room's feed, kept under the room's log lock.
pub struct Feed {
    tail: Arc<Node>,
}

impl Default for Feed {
    fn default() -> Feed {
        Feed {
            tail: Arc::new(Node {
                pos: 0,
                bytes: 0,
                frame: None,
                next: OnceLock::new(),
            }),
        }
    }
}

impl Feed {
    /// Appends an event; every cursor at or before the old tail will read it.
    pub fn append(&mut self, frame: Arc<SharedFrame>) {
        let node = Arc::new(Node {
            pos: self.tail.pos + 1,
            bytes: self.tail.bytes + wire_size(&frame, Wire::MsgPack) as u64,
            frame: Some(frame),
            next: OnceLock::new(),
        });
        // Only the lock holder appends, so the cell is empty.
        let _ = self.tail.next.set(Arc::clone(&node));
        self.tail = node;
    }

    /// Where the feed ends now: a new subscriber's cursor starts here.
    pub fn tail(&self) -> Arc<Node> {
        Arc::clone(&self.tail)
    }

    /// Position and byte count of the newest event.
    pub fn end(&self) -> (u64, u64) {
        (self.tail.pos, self.tail.bytes)
    }
}

/// One connection's membership of one room: what the room wakes, and how far the connection's
/// writer has read the room's feed (for the lag bound).
pub struct Subscription {
    pub conn: Arc<ConnHandle>,
    taken_pos: AtomicU64,
    taken_bytes: AtomicU64,
}

impl Subscription {
    /// A subscription whose cursor starts at the feed's start (see [`Subscription::start_at`]).
    pub fn new(conn: Arc<ConnHandle>) -> Arc<Subscription> {
        Arc::new(Subscription {
            conn,
            taken_pos: AtomicU64::new(0),
            taken_bytes: AtomicU64::new(0),
        })
    }

    /// Sets where the cursor starts, before any publisher can see the subscription.
    pub fn start_at(&self, start: &Node) {
        self.taken_pos.store(start.pos, Ordering::Release);
        self.taken_bytes.store(start.bytes, Ordering::Release);
    }

    /// After an append that ended the feed at `end` (position, bytes): closes the connection as
    /// a slow consumer if it lags past its bounds, else wakes its writer. Returns whether the
    /// writer was woken (or already was).
    pub fn wake(&self, end: (u64, u64)) -> bool {
        let conn = &self.conn;
        if conn.is_closed() {
            return false;
        }
        let lag = end.0.saturating_sub(self.taken_pos.load(Ordering::Relaxed));
        let lag_bytes = end
            .1
            .saturating_sub(self.taken_bytes.load(Ordering::Relaxed));
        if lag > conn.max_items() as u64 || lag_bytes > conn.max_pending() as u64 {
            conn.close(DisconnectReason::QueueFull);
            return false;
        }
        conn.wake_writer();
        true
    }
}

/// A writer's place in one room's feed: the last node it read.
pub struct Cursor {
    sub: Arc<Subscription>,
    at: Arc<Node>,
}

impl Cursor {
    pub fn new(sub: Arc<Subscription>, at: Arc<Node>) -> Cursor {
        Cursor { sub, at }
    }

    /// Whether an event follows the cursor.
    pub fn behind(&self) -> bool {
        self.at.next.get().is_some()
    }

    /// Moves to the next event, if one was appended; its frame is then [`Cursor::frame`]. Holds
    /// one node at a time: each move is one reference-count increment and one decrement on
    /// nodes every reader of the room shares, and nothing per frame.
    pub fn advance(&mut self) -> bool {
        loop {
            let Some(next) = self.at.next.get() else {
                return false;
            };
            let next = Arc::clone(next);
            self.sub.taken_pos.store(next.pos, Ordering::Relaxed);
            self.sub.taken_bytes.store(next.bytes, Ordering::Relaxed);
            self.at = next;
            if self.at.frame.is_some() {
                return true;
            }
        }
    }

    /// The frame of the event the cursor is at (none at a feed's start).
    pub fn frame(&self) -> Option<&Arc<SharedFrame>> {
        self.at.frame.as_ref()
    }

    pub fn subscription(&self) -> &Arc<Subscription> {
        &self.sub
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_event;
    use gavel_protocol::{Format, ServerFrame};

    fn frame(seq: u64) -> Arc<SharedFrame> {
        test_event("broadcast", seq)
    }

    fn seq(frame: &SharedFrame) -> u64 {
        match frame.frame() {
            ServerFrame::Event(e) => e.seq,
            _ => 0,
        }
    }

    #[test]
    fn cursors_read_what_was_appended_after_them_in_order() {
        let mut feed = Feed::default();
        feed.append(frame(1));
        let conn = ConnHandle::new(1, None, Format::MsgPack, 8, usize::MAX);
        let start = feed.tail();
        let sub = Subscription::new(conn);
        sub.start_at(&start);
        let mut cursor = Cursor::new(Arc::clone(&sub), start);
        assert!(!cursor.behind());
        for s in 2..=5 {
            feed.append(frame(s));
        }
        let mut read = Vec::new();
        while cursor.advance() {
            read.push(seq(cursor.frame().unwrap()));
        }
        assert_eq!(read, vec![2, 3, 4, 5]);
        assert!(!cursor.advance());
        assert_eq!(sub.taken_pos.load(Ordering::Relaxed), feed.end().0);
    }

    #[test]
    fn a_subscriber_past_its_lag_bound_is_closed_as_a_slow_consumer() {
        let mut feed = Feed::default();
        let conn = ConnHandle::new(1, None, Format::MsgPack, 3, usize::MAX);
        let sub = Subscription::new(Arc::clone(&conn));
        sub.start_at(&feed.tail());
        for s in 1..=3 {
            feed.append(frame(s));
            assert!(sub.wake(feed.end()));
        }
        feed.append(frame(4));
        assert!(!sub.wake(feed.end()));
        assert_eq!(conn.close_reason(), Some(DisconnectReason::QueueFull));
    }

    #[test]
    fn a_long_chain_drops_without_recursing() {
        let mut feed = Feed::default();
        let start = feed.tail();
        for s in 0..200_000 {
            feed.append(frame(s));
        }
        drop(feed);
        drop(start);
    }
}
