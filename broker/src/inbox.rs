//! What a connection's writer sends next, in the order docs/protocol.md §4.2 promises, from its
//! two sources: its own queue (replies, signals, pongs) and the feeds of the rooms it follows.
//! An event a room appended before a queue item was queued comes out before that item; a
//! subscribe's reply and replay come out before any live event of the room.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::feed::Cursor;
use crate::outbound::{ConnHandle, Follow, Outbound, SharedFrame};
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
    /// An event from a room's feed: the frame the cursor with this index is at now, read with
    /// [`Inbox::event`] before the next [`Inbox::pop`] (the cursor holds it; nothing is cloned).
    Event(usize),
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
        self.carry.is_some() || !self.taken.is_empty() || self.cursors.iter().any(Cursor::behind)
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
            if let Some(cursor) = self.cursors.iter_mut().position(Cursor::advance) {
                return Some(Next::Event(cursor));
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
                    let Follow { frames, cursor } = *follow;
                    self.carry = Some(Box::new(Carry {
                        frames,
                        next: 0,
                        then: cursor,
                    }));
                }
                Some(Outbound::Unfollow(sub)) => {
                    // The feeds were just read to their end, this one included.
                    self.cursors
                        .retain(|cursor| !Arc::ptr_eq(cursor.subscription(), &sub));
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

    /// The frame of the event that [`Next::Event`]`(cursor)` named.
    pub fn event(&self, cursor: usize) -> Option<&Arc<SharedFrame>> {
        self.cursors.get(cursor)?.frame()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::{Feed, Subscription};
    use crate::outbound::test_event;
    use gavel_protocol::{Format, Reply, ServerFrame};
    use proptest::prelude::*;

    fn event(seq: u64) -> Arc<SharedFrame> {
        event_in(0, seq)
    }

    fn event_in(room: usize, seq: u64) -> Arc<SharedFrame> {
        test_event(&format!("conversation:c{room}"), seq)
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
        let mut sent = Vec::new();
        while let Some(next) = inbox.pop() {
            let frame = match next {
                Next::Queued(f) => f,
                Next::Event(i) => Arc::clone(inbox.event(i).unwrap()),
                Next::Control(_) => continue,
            };
            sent.push(match frame.frame() {
                ServerFrame::Event(e) => e.seq as i64,
                ServerFrame::Ok { id, .. } => -(*id as i64),
                _ => 0,
            });
        }
        sent
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
        conn.offer(Outbound::Follow(Box::new(Follow {
            frames: vec![reply(1), event(1)].into(),
            cursor: Some(Cursor::new(Arc::clone(&sub), start)),
        })));
        // Live events 2 and 3, then a reply (id 2) queued after them.
        feed.append(event(2));
        feed.append(event(3));
        conn.offer_frame(reply(2));
        let mut inbox = Inbox::default();
        assert_eq!(drain(&mut inbox, &conn), vec![-1, 1, 2, 3, -2]);
        // Leaving: what was appended before still goes out, then nothing more of the room.
        feed.append(event(4));
        conn.offer(Outbound::Unfollow(sub));
        conn.offer_frame(reply(3));
        assert_eq!(drain(&mut inbox, &conn), vec![4, -3]);
        feed.append(event(5));
        assert_eq!(drain(&mut inbox, &conn), Vec::<i64>::new());
        assert!(!inbox.has_more());
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// An event appended to room r.
        Append(usize),
        /// A reply queued.
        Reply,
        /// Subscribe to room r (if not subscribed): reply, cursor.
        Subscribe(usize),
        /// Unsubscribe from room r (if subscribed): leave, then the reply.
        Unsubscribe(usize),
        /// The writer takes its queue and sends up to n frames.
        Send(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize).prop_map(Op::Append),
            2 => Just(Op::Reply),
            2 => (0..3usize).prop_map(Op::Subscribe),
            1 => (0..3usize).prop_map(Op::Unsubscribe),
            3 => (0..6usize).prop_map(Op::Send),
        ]
    }

    /// What a reply was, for the checks.
    enum Kind {
        Subscribed {
            room: usize,
            seq: u64,
        },
        Unsubscribed {
            room: usize,
        },
        /// A plain reply, and per room the last seq it must follow (rooms subscribed then).
        Plain {
            after: Vec<Option<u64>>,
        },
    }

    enum Sent {
        Event(usize, u64),
        Reply(u64),
    }

    fn sent(inbox: &Inbox, next: Next) -> Sent {
        let frame = match next {
            Next::Queued(f) => f,
            Next::Event(i) => Arc::clone(inbox.event(i).unwrap()),
            Next::Control(_) => panic!("no control frames here"),
        };
        match frame.frame() {
            ServerFrame::Event(e) => {
                let room = e.channel.as_str()["conversation:c".len()..]
                    .parse()
                    .unwrap();
                Sent::Event(room, e.seq)
            }
            ServerFrame::Ok { id, .. } => Sent::Reply(*id),
            other => panic!("unexpected {other:?}"),
        }
    }

    proptest! {
        /// Whatever the interleaving of publishes, replies, subscribes, unsubscribes and partial
        /// sends: a room's events come after its `subscribed` reply, in seq order from the
        /// reply's seq + 1 without gaps, and none after its `unsubscribed` reply; a reply comes
        /// after every event its connection's rooms had when it was queued.
        #[test]
        fn the_inbox_keeps_the_protocols_order(ops in prop::collection::vec(op(), 0..120)) {
            let conn = ConnHandle::new(1, None, Format::MsgPack, 10_000, usize::MAX);
            let mut feeds: Vec<Feed> = (0..3).map(|_| Feed::default()).collect();
            let mut seqs = [0u64; 3];
            let mut subs: Vec<Option<Arc<Subscription>>> = vec![None, None, None];
            let mut kinds = Vec::new();
            let mut inbox = Inbox::default();
            let mut out = Vec::new();
            for op in ops.into_iter().chain([Op::Send(usize::MAX)]) {
                match op {
                    Op::Append(room) => {
                        seqs[room] += 1;
                        feeds[room].append(event_in(room, seqs[room]));
                    }
                    Op::Reply => {
                        let after = (0..3).map(|r| subs[r].as_ref().map(|_| seqs[r])).collect();
                        kinds.push(Kind::Plain { after });
                        conn.offer_frame(reply(kinds.len() as u64 - 1));
                    }
                    Op::Subscribe(room) if subs[room].is_none() => {
                        let sub = Subscription::new(Arc::clone(&conn));
                        let start = feeds[room].tail();
                        sub.start_at(&start);
                        kinds.push(Kind::Subscribed { room, seq: seqs[room] });
                        conn.offer(Outbound::Follow(Box::new(Follow {
                            frames: vec![reply(kinds.len() as u64 - 1)].into(),
                            cursor: Some(Cursor::new(Arc::clone(&sub), start)),
                        })));
                        subs[room] = Some(sub);
                    }
                    Op::Unsubscribe(room) => {
                        if let Some(sub) = subs[room].take() {
                            conn.offer(Outbound::Unfollow(sub));
                            kinds.push(Kind::Unsubscribed { room });
                            conn.offer_frame(reply(kinds.len() as u64 - 1));
                        }
                    }
                    Op::Subscribe(_) => {}
                    Op::Send(n) => {
                        inbox.take(&conn);
                        for _ in 0..n {
                            match inbox.pop() {
                                Some(next) => out.push(sent(&inbox, next)),
                                None => break,
                            }
                        }
                    }
                }
            }
            prop_assert!(!inbox.has_more());
            // Per room: the next seq expected while subscribed.
            let mut expect: [Option<u64>; 3] = [None; 3];
            let mut replies = 0;
            for sent in out {
                match sent {
                    Sent::Event(room, seq) => {
                        prop_assert_eq!(expect[room], Some(seq), "room {} event {}", room, seq);
                        expect[room] = Some(seq + 1);
                    }
                    Sent::Reply(id) => {
                        prop_assert_eq!(id, replies, "replies in the order queued");
                        replies += 1;
                        match &kinds[id as usize] {
                            Kind::Subscribed { room, seq } => expect[*room] = Some(seq + 1),
                            Kind::Unsubscribed { room } => expect[*room] = None,
                            Kind::Plain { after } => {
                                for (room, last) in after.iter().enumerate() {
                                    if let Some(last) = last {
                                        prop_assert!(
                                            expect[room].is_some_and(|next| next > *last),
                                            "reply {} before event {} of room {}", id, last, room
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(replies as usize, kinds.len());
        }
    }
}
