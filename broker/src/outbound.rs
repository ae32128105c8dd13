//! What the rest of the broker holds of a connection: [`ConnHandle`], its bounded outbound queue
//! (offered to without waiting, taken whole by the writer) plus a way to close it with a reason;
//! and [`SharedFrame`], a server frame encoded once and shared by every connection it reaches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use gavel_protocol::{encode, CloseCode, Format, ServerFrame, UserId};
use tokio_util::sync::CancellationToken;

use crate::feed::{Cursor, Subscription};
use crate::wsframe::OpCode;

/// Process-unique connection number (also in logs and the `hello` frame).
pub type ConnId = u64;

/// How a connection's frames are laid out on its transport: WebSocket messages in one of the two
/// encodings, or Server-Sent Events (`data: {JSON}` and a blank line) for the fallback transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    MsgPack,
    Json,
    Sse,
}

impl Wire {
    /// The wire of a WebSocket connection speaking `format`.
    pub fn websocket(format: Format) -> Wire {
        match format {
            Format::MsgPack => Wire::MsgPack,
            Format::Json => Wire::Json,
        }
    }
}

/// A server frame with its encodings, computed at most once per wire and shared between all
/// recipients (`Arc`): a publish to 10,000 subscribers encodes once and hands out 10,000
/// pointers. Each encoding is kept already framed (the WebSocket header or the SSE field, then the
/// payload), so a writer copies it as it is.
pub struct SharedFrame {
    frame: ServerFrame,
    msgpack: OnceLock<Option<Framed>>,
    json: OnceLock<Option<Framed>>,
    sse: OnceLock<Option<Framed>>,
    /// When the frame was created, for the delivery-delay histogram.
    pub created: Instant,
}

/// One encoding as written: `bytes[header..header + len]` is the payload.
struct Framed {
    bytes: Bytes,
    header: usize,
    len: usize,
}

impl SharedFrame {
    pub fn new(frame: ServerFrame) -> Arc<SharedFrame> {
        Arc::new(SharedFrame {
            frame,
            msgpack: OnceLock::new(),
            json: OnceLock::new(),
            sse: OnceLock::new(),
            created: Instant::now(),
        })
    }

    /// A frame for many recipients: encoded for MessagePack now, once, by the publisher,
    /// rather than by the first writer to need it (while others wait on it).
    pub fn for_fan_out(frame: ServerFrame) -> Arc<SharedFrame> {
        let shared = SharedFrame::new(frame);
        let _ = shared.framed(Wire::MsgPack);
        shared
    }

    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }

    /// The encoded frame for `format`, without the WebSocket header; `None` only if encoding
    /// failed (logged once).
    pub fn bytes(&self, format: Format) -> Option<&[u8]> {
        self.encoded(Wire::websocket(format))
            .map(|f| &f.bytes[f.header..f.header + f.len])
    }

    /// The frame as written on `wire` (WebSocket header and payload, or the SSE event).
    pub fn framed(&self, wire: Wire) -> Option<&[u8]> {
        self.encoded(wire).map(|f| &f.bytes[..])
    }

    fn encoded(&self, wire: Wire) -> Option<&Framed> {
        let (cell, format) = match wire {
            Wire::MsgPack => (&self.msgpack, Format::MsgPack),
            Wire::Json => (&self.json, Format::Json),
            Wire::Sse => (&self.sse, Format::Json),
        };
        cell.get_or_init(|| match encode(format, &self.frame) {
            Ok(payload) => {
                let mut framed = Vec::with_capacity(payload.len() + 10);
                match wire {
                    Wire::MsgPack => {
                        crate::wsframe::put_frame(&mut framed, OpCode::Binary, &payload)
                    }
                    Wire::Json => crate::wsframe::put_frame(&mut framed, OpCode::Text, &payload),
                    // Compact JSON has no raw line breaks, so one `data:` line holds the frame.
                    Wire::Sse => {
                        framed.extend_from_slice(b"data: ");
                        framed.extend_from_slice(&payload);
                        framed.extend_from_slice(b"\n\n");
                    }
                }
                let header = match wire {
                    Wire::Sse => 6,
                    _ => framed.len() - payload.len(),
                };
                Some(Framed {
                    header,
                    len: payload.len(),
                    bytes: framed.into(),
                })
            }
            Err(error) => {
                tracing::error!(%error, frame = self.frame.type_name(), "cannot encode frame");
                None
            }
        })
        .as_ref()
    }
}

/// A room event with no data, for unit tests of what carries frames.
#[cfg(test)]
pub(crate) fn test_event(channel: &str, seq: u64) -> Arc<SharedFrame> {
    SharedFrame::for_fan_out(ServerFrame::Event(gavel_protocol::EventFrame {
        channel: gavel_protocol::Channel::parse(channel).expect("a valid channel"),
        seq,
        ts: seq,
        event: "e".into(),
        from: None,
        epoch: None,
        data: gavel_protocol::Data::null(),
    }))
}

/// One item of a connection's outbound queue.
pub enum Outbound {
    Frame(Arc<SharedFrame>),
    /// A control frame the reader owes the peer (a pong). Boxed: rare, and it keeps every
    /// queue slot small.
    Control(Box<(OpCode, Bytes)>),
    /// A subscribe's reply and its replay (one queue slot, so a long replay cannot overflow the
    /// queue by itself), then the room's live events from the cursor on: the writer starts
    /// reading the room's feed once these frames are out.
    Follow(Box<Follow>),
    /// An unsubscribe: the writer stops reading the room's feed here (everything the room
    /// appended before goes out first), before the `unsubscribed` reply queued after it.
    Unfollow(Arc<Subscription>),
}

/// A subscribe's queue item: the frames to send first, then where to start reading the room's
/// feed (`None` when the connection already had a cursor there).
pub struct Follow {
    pub frames: Arc<[Arc<SharedFrame>]>,
    pub cursor: Option<Cursor>,
}

/// Bytes a frame takes on the wire.
pub fn wire_size(frame: &SharedFrame, wire: Wire) -> usize {
    frame.framed(wire).map_or(0, <[u8]>::len)
}

impl Outbound {
    /// Bytes the item takes on `wire` (what counts against the pending bound).
    pub fn wire_size(&self, wire: Wire) -> usize {
        match self {
            Outbound::Frame(frame) => wire_size(frame, wire),
            Outbound::Follow(follow) => follow.frames.iter().map(|f| wire_size(f, wire)).sum(),
            Outbound::Control(control) => control.1.len() + 2,
            Outbound::Unfollow(_) => 0,
        }
    }
}

/// Why a connection ended; labels logs and the `gavel_disconnects_total` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent a close frame or closed the socket.
    ClientClosed,
    /// The broker is shutting down (close 1001).
    Shutdown,
    /// Nothing arrived within the idle timeout (close 4000).
    IdleTimeout,
    /// The outbound queue was full (close 4001).
    QueueFull,
    /// A socket write stalled past the write timeout (no close frame: the socket is dropped).
    WriteStalled,
    /// A message over the size limit (close 1009).
    MessageTooBig,
    /// A text frame with invalid UTF-8 (close 1007).
    InvalidUtf8,
    /// Any other WebSocket protocol violation (close 1002).
    ProtocolError,
    /// The socket failed or the peer vanished without a close frame.
    ConnectionLost,
    /// No authentication within the authentication timeout (close 4002).
    AuthenticationRequired,
    /// The token expired and no fresh one came within the grace period (close 4003).
    TokenExpired,
    /// The connection kept sending over its rate limit (close 1008).
    RateLimited,
}

impl DisconnectReason {
    /// Every reason, for metric initialisation and documentation.
    pub const ALL: [DisconnectReason; 12] = [
        DisconnectReason::ClientClosed,
        DisconnectReason::Shutdown,
        DisconnectReason::IdleTimeout,
        DisconnectReason::QueueFull,
        DisconnectReason::WriteStalled,
        DisconnectReason::MessageTooBig,
        DisconnectReason::InvalidUtf8,
        DisconnectReason::ProtocolError,
        DisconnectReason::ConnectionLost,
        DisconnectReason::AuthenticationRequired,
        DisconnectReason::TokenExpired,
        DisconnectReason::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::IdleTimeout => "idle_timeout",
            DisconnectReason::QueueFull => "slow_consumer_queue_full",
            DisconnectReason::WriteStalled => "slow_consumer_write_stalled",
            DisconnectReason::MessageTooBig => "message_too_big",
            DisconnectReason::InvalidUtf8 => "invalid_utf8",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::AuthenticationRequired => "authentication_required",
            DisconnectReason::TokenExpired => "token_expired",
            DisconnectReason::RateLimited => "rate_limited",
        }
    }

    /// The close code sent to the client, if a close frame is sent at all.
    pub fn close_code(self) -> Option<CloseCode> {
        match self {
            DisconnectReason::ClientClosed => Some(CloseCode::Normal),
            DisconnectReason::Shutdown => Some(CloseCode::GoingAway),
            DisconnectReason::IdleTimeout => Some(CloseCode::IdleTimeout),
            DisconnectReason::QueueFull => Some(CloseCode::SlowConsumer),
            DisconnectReason::WriteStalled => None,
            DisconnectReason::MessageTooBig => Some(CloseCode::MessageTooBig),
            DisconnectReason::InvalidUtf8 => Some(CloseCode::InvalidPayload),
            DisconnectReason::ProtocolError => Some(CloseCode::ProtocolError),
            DisconnectReason::ConnectionLost => None,
            DisconnectReason::AuthenticationRequired => Some(CloseCode::AuthenticationRequired),
            DisconnectReason::TokenExpired => Some(CloseCode::TokenExpired),
            DisconnectReason::RateLimited => Some(CloseCode::PolicyViolation),
        }
    }

    pub fn is_slow_consumer(self) -> bool {
        matches!(
            self,
            DisconnectReason::QueueFull | DisconnectReason::WriteStalled
        )
    }
}

/// Who a connection counts as in presence: a user, or itself when anonymous (so each anonymous
/// connection is one viewer).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ViewerKey {
    User(UserId),
    Anonymous(ConnId),
}

/// The broker's handle on one connection, shared by every room it is subscribed to.
pub struct ConnHandle {
    pub id: ConnId,
    /// Set once, when the connection authenticates (at the upgrade or by an `auth` frame).
    user: OnceLock<UserId>,
    pub format: Format,
    /// How its frames are written: a WebSocket encoding, or SSE.
    pub wire: Wire,
    /// Items offered and not yet taken by the writer. A short mutex per offer and per writer
    /// wake-up (the writer takes everything at once, swapping buffers); the buffer is allocated
    /// on the first item, so an idle connection holds none.
    queue: Mutex<Queue>,
    /// Most items queued at once; past it the connection is a slow consumer.
    max_items: usize,
    /// Bytes queued and not yet handed to the socket, and their bound: past it the connection
    /// is a slow consumer, whatever the number of items (one item can be a long replay).
    pending: AtomicUsize,
    max_pending: usize,
    /// Whether the writer was woken since it last took the queue: later offers do not wake it
    /// again, so a burst of N offers costs one wake-up, not N.
    writer_woken: AtomicBool,
    /// Set once, by whoever ends the connection first.
    reason: OnceLock<DisconnectReason>,
    /// Cancelled when the connection must end; the reader watches it.
    closing: CancellationToken,
    /// Set with `closing`: read on every offer without the token's lock
    /// (`CancellationToken::is_cancelled` takes a mutex).
    closed: AtomicBool,
    /// Set at shutdown: the writer sends what is queued, then closes with 1001.
    draining: AtomicBool,
    /// The writer's waker, for new items, `closed` and `draining`. The writer looks at all
    /// three on every wake-up: an atomic waker costs two uncontended atomics, where a token's
    /// `cancelled()` future takes the token's mutex (and the broker-wide shutdown token's
    /// mutex was one lock for every writer).
    writer_signal: AtomicWaker,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Outbound>,
    /// False once the writer stopped taking items (it drains or has ended).
    shut: bool,
}

/// What wakes the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterSignal {
    /// Items are queued: take them with [`ConnHandle::take_queued`].
    Items,
    /// End now (the reason is in [`ConnHandle::close_reason`]).
    Close,
    /// Shutdown: send what is queued, then close with 1001.
    Drain,
}

/// The result of offering a frame to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// The queue was full: the connection is being closed as a slow consumer.
    SlowConsumer,
    /// The connection is already gone.
    Closed,
}

impl ConnHandle {
    /// A WebSocket connection whose queue holds at most `max_items` items and `max_pending`
    /// bytes.
    pub fn new(
        id: ConnId,
        user: Option<UserId>,
        format: Format,
        max_items: usize,
        max_pending: usize,
    ) -> Arc<ConnHandle> {
        Self::on_wire(
            id,
            user,
            format,
            Wire::websocket(format),
            max_items,
            max_pending,
        )
    }

    /// A connection whose frames are written as `wire` (SSE, or a WebSocket encoding).
    pub fn on_wire(
        id: ConnId,
        user: Option<UserId>,
        format: Format,
        wire: Wire,
        max_items: usize,
        max_pending: usize,
    ) -> Arc<ConnHandle> {
        let cell = OnceLock::new();
        if let Some(user) = user {
            let _ = cell.set(user);
        }
        Arc::new(ConnHandle {
            id,
            user: cell,
            format,
            wire,
            queue: Mutex::new(Queue::default()),
            max_items: max_items.max(1),
            pending: AtomicUsize::new(0),
            max_pending,
            writer_woken: AtomicBool::new(false),
            reason: OnceLock::new(),
            closing: CancellationToken::new(),
            closed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            writer_signal: AtomicWaker::new(),
        })
    }

    /// Who the connection is, once authenticated.
    pub fn user(&self) -> Option<&UserId> {
        self.user.get()
    }

    /// Records who the connection is. Returns false if it already was someone.
    pub fn set_user(&self, user: UserId) -> bool {
        self.user.set(user).is_ok()
    }

    pub fn viewer_key(&self) -> ViewerKey {
        match self.user.get() {
            Some(user) => ViewerKey::User(user.clone()),
            None => ViewerKey::Anonymous(self.id),
        }
    }

    /// Queues an item without waiting. A full queue closes the connection as a slow consumer:
    /// the publisher never blocks and never drops silently.
    pub fn offer(&self, item: Outbound) -> Offer {
        // Once closing, nothing more is queued: a frame after one that overflowed would reach
        // the client past a gap it could not see.
        if self.closed.load(Ordering::Acquire) {
            return Offer::Closed;
        }
        let size = item.wire_size(self.wire);
        let before = self.pending.fetch_add(size, Ordering::AcqRel);
        if before.saturating_add(size) > self.max_pending {
            self.pending.fetch_sub(size, Ordering::AcqRel);
            self.close(DisconnectReason::QueueFull);
            return Offer::SlowConsumer;
        }
        {
            let mut queue = lock(&self.queue);
            if queue.shut {
                drop(queue);
                self.pending.fetch_sub(size, Ordering::AcqRel);
                return Offer::Closed;
            }
            if queue.items.len() >= self.max_items {
                drop(queue);
                self.pending.fetch_sub(size, Ordering::AcqRel);
                self.close(DisconnectReason::QueueFull);
                return Offer::SlowConsumer;
            }
            queue.items.push_back(item);
        }
        // The first offer since the writer last took the queue wakes it; the others find it
        // woken. (The writer clears the flag before it takes, so nothing queued after its take
        // goes unnoticed.)
        self.wake_writer();
        Offer::Queued
    }

    /// For the writer (or an in-process consumer): ready when items are queued, or when the
    /// connection must close or drain. Lock-free unless items may be waiting.
    pub fn poll_writer(&self, cx: &mut Context<'_>) -> Poll<WriterSignal> {
        // Registered before anything is read, so an offer or a close in between still wakes us.
        self.writer_signal.register(cx.waker());
        if self.closed.load(Ordering::Acquire) {
            return Poll::Ready(WriterSignal::Close);
        }
        if self.draining.load(Ordering::Acquire) {
            return Poll::Ready(WriterSignal::Drain);
        }
        if self.writer_woken.load(Ordering::Acquire) {
            return Poll::Ready(WriterSignal::Items);
        }
        Poll::Pending
    }

    /// Waits for [`ConnHandle::poll_writer`].
    pub async fn writer_signal(&self) -> WriterSignal {
        std::future::poll_fn(|cx| self.poll_writer(cx)).await
    }

    /// Wakes the writer for something other than a queued item (a room's feed grew); a writer
    /// already woken is not woken again.
    pub fn wake_writer(&self) {
        if !self.writer_woken.load(Ordering::Acquire)
            && !self.writer_woken.swap(true, Ordering::AcqRel)
        {
            self.writer_signal.wake();
        }
    }

    /// Whether anything was offered (or appended to a followed room) since the writer last took
    /// its queue: one atomic load.
    pub fn has_news(&self) -> bool {
        self.writer_woken.load(Ordering::Acquire)
    }

    /// Most items (or, in each room, events) the connection may lag before it is a slow
    /// consumer.
    pub fn max_items(&self) -> usize {
        self.max_items
    }

    /// Most bytes the connection may lag (in its queue, or in each room) before it is a slow
    /// consumer.
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// Moves every queued item to the end of `into`; returns whether there were any. Swaps
    /// buffers when `into` is empty, so neither side allocates once both have grown. Whoever
    /// reads rooms' feeds reads them after this: the fence pairs with the publisher's (see
    /// `Rooms::wake`), so an event appended before the flag was cleared is read now or wakes
    /// the writer again.
    pub fn take_queued(&self, into: &mut VecDeque<Outbound>) -> bool {
        self.writer_woken.store(false, Ordering::Release);
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut queue = lock(&self.queue);
        if queue.items.is_empty() {
            return false;
        }
        if into.is_empty() {
            std::mem::swap(&mut queue.items, into);
        } else {
            into.extend(queue.items.drain(..));
        }
        true
    }

    /// The writer takes no more items: later offers are answered `Closed`. Returns what is
    /// still queued (to send, when draining).
    pub fn shut_queue(&self) -> VecDeque<Outbound> {
        let mut queue = lock(&self.queue);
        queue.shut = true;
        std::mem::take(&mut queue.items)
    }

    /// The writer took `bytes` of queued output into a socket write.
    pub fn written(&self, bytes: usize) {
        self.pending.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Whether `bytes` more would fit under the bound right now (a replay is sized up front).
    pub fn fits(&self, bytes: usize) -> bool {
        self.pending.load(Ordering::Acquire).saturating_add(bytes) <= self.max_pending
    }

    pub fn offer_frame(&self, frame: Arc<SharedFrame>) -> Offer {
        self.offer(Outbound::Frame(frame))
    }

    /// Asks the connection to end. The first reason given wins.
    pub fn close(&self, reason: DisconnectReason) {
        let _ = self.reason.set(reason);
        self.closed.store(true, Ordering::Release);
        self.closing.cancel();
        self.writer_signal.wake();
    }

    /// Asks the writer to send what is queued and then close with 1001 (broker shutdown).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.writer_signal.wake();
    }

    pub fn close_reason(&self) -> Option<DisconnectReason> {
        self.reason.get().copied()
    }

    /// Whether the connection was asked to end (lock-free).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }
}

/// Locks the queue, recovering it if a panic elsewhere poisoned the mutex: each critical section
/// leaves it consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
