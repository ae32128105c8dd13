//! What a connection's writer sends next, in the order docs/protocol.md §4.2 promises, from its
//! two sources: its own queue (replies, signals, pongs) and the feeds of the rooms it follows.
//! An event a room appended before a queue item was queued comes out before that item; a
//! subscribe's reply and replay come out before any live event of the room.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::feed::Cursor;
use crate::outbound::{ConnHandle, Outbound, SharedFrame};
use crate::wsframe::OpCode;

/// Capacity of the item buffer kept between bursts; a larger one is freed once empty.
const SPARE_ITEMS: usize = 64;

/// A writer's reading state: items taken from its queue and its cursors in rooms' feeds.
#[derive(Default)]
pub struct Inbox {
    /// Items taken from the queue, not yet read.
    taken: VecDeque<Outbound>,
    /// A multi-frame item being read (boxed: rare, and the inbox lives in every writer).
    carry: Option<Box<Carry>>,
    /// One per room followed.
    cursors: Vec<Cursor>,
}

struct Carry {
    frames: Arc<[Arc<SharedFrame>]>,
    next: usize,
    /// The room feed to follow once these frames are out (a subscribe's).
    then: Option<Cursor>,
}

/// The next thing to send.
pub enum Next {
    /// A frame from the connection's queue: its bytes were counted against the pending bound.
    Queued(Arc<SharedFrame>),
    /// An event from a room's feed.
    Event(Arc<SharedFrame>),
    /// A control frame the reader owes the peer.
    Control(Box<(OpCode, Bytes)>),
}

impl Inbox {
    /// Takes whatever `conn` has queued; returns whether there was anything. Rooms' feeds are
    /// read after this (by [`Inbox::pop`]), which is what keeps the order.
    pub fn take(&mut self, conn: &ConnHandle) -> bool {
        conn.take_queued(&mut self.taken)
    }

    /// Adds items taken some other way (what was left when the queue shut).
    pub fn extend(&mut self, items: impl IntoIterator<Item = Outbound>) {
        self.taken.extend(items);
    }

    /// Whether anything is left to send right now.
    pub fn has_more(&self) -> bool {
        self.carry.is_some()
            || !self.taken.is_empty()
            || self.cursors.iter().any(|c| !c.left() && c.behind())
    }

    /// The next frame to send, if any. Feeds are read to their end before each queue item:
    /// the item was taken before this read, so every event appended before it was queued is
    /// sent first.
    pub fn pop(&mut self) -> Option<Next> {
        loop {
            if let Some(carry) = &mut self.carry {
                if let Some(frame) = carry.frames.get(carry.next) {
                    carry.next += 1;
                    return Some(Next::Queued(Arc::clone(frame)));
                }
                if let Some(cursor) = self.carry.take().and_then(|carry| carry.then) {
                    self.follow(cursor);
                }
            }
            if let Some(event) = self.next_event() {
                return Some(Next::Event(event));
            }
            match self.taken.pop_front() {
                None => {
                    if self.taken.capacity() > SPARE_ITEMS {
                        // A burst grew it: do not keep that much per connection.
                        self.taken = VecDeque::new();
                    }
                    return None;
                }
                Some(Outbound::Frame(frame)) => return Some(Next::Queued(frame)),
                Some(Outbound::Control(control)) => return Some(Next::Control(control)),
                Some(Outbound::Follow(follow)) => {
                    let (frames, cursor) = *follow;
                    self.carry = Some(Box::new(Carry {
                        frames,
                        next: 0,
                        then: Some(cursor),
                    }));
                }
            }
        }
    }

    fn follow(&mut self, cursor: Cursor) {
        if self.cursors.capacity() == self.cursors.len() {
            // Most connections follow one or two rooms: grow one at a time.
            self.cursors.reserve_exact(1);
        }
        self.cursors.push(cursor);
    }

    /// The next event of any followed room; drops the cursors of rooms left.
    fn next_event(&mut self) -> Option<Arc<SharedFrame>> {
        let mut i = 0;
        while i < self.cursors.len() {
            if self.cursors[i].left() {
                self.cursors.swap_remove(i);
                continue;
            }
            if let Some(event) = self.cursors[i].read() {
                return Some(event);
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::{Feed, Subscription};
    use gavel_protocol::{Channel, EventFrame, Format, Reply, ServerFrame};
    use serde_json::Value;

    fn event(seq: u64) -> Arc<SharedFrame> {
        SharedFrame::for_fan_out(ServerFrame::Event(EventFrame {
            channel: Channel::parse("broadcast").unwrap(),
            seq,
            ts: 0,
            event: "e".into(),
            from: None,
            data: Value::Null,
        }))
    }

    fn reply(id: u64) -> Arc<SharedFrame> {
        SharedFrame::new(ServerFrame::Ok {
            id,
            result: Reply::Done {},
        })
    }

    /// What the inbox sends, as seqs of events and -id of replies.
    fn drain(inbox: &mut Inbox, conn: &ConnHandle) -> Vec<i64> {
        inbox.take(conn);
        std::iter::from_fn(|| inbox.pop())
            .map(|next| match next {
                Next::Queued(f) | Next::Event(f) => match f.frame() {
                    ServerFrame::Event(e) => e.seq as i64,
                    ServerFrame::Ok { id, .. } => -(*id as i64),
                    _ => 0,
                },
                Next::Control(_) => 0,
            })
            .collect()
    }

    #[test]
    fn subscribe_reply_first_then_events_then_a_reply_queued_after_them() {
        let conn = ConnHandle::new(1, None, Format::MsgPack, 64, usize::MAX);
        let mut feed = Feed::default();
        feed.append(event(1));
        let start = feed.tail();
        let sub = Subscription::new(Arc::clone(&conn));
        sub.start_at(&start);
        // The subscribe reply (id 1) with a replay of seq 1.
        conn.offer(Outbound::Follow(Box::new((
            vec![reply(1), event(1)].into(),
            Cursor::new(Arc::clone(&sub), start),
        ))));
        // Live events 2 and 3, then a reply (id 2) queued after them.
        feed.append(event(2));
        feed.append(event(3));
        conn.offer_frame(reply(2));
        let mut inbox = Inbox::default();
        assert_eq!(drain(&mut inbox, &conn), vec![-1, 1, 2, 3, -2]);
        // After leaving, nothing more of the room is read.
        feed.append(event(4));
        sub.leave();
        conn.offer_frame(reply(3));
        assert_eq!(drain(&mut inbox, &conn), vec![-3]);
        assert!(!inbox.has_more());
    }
}
