//! A connection's writer task: sends what its inbox gives (its queue and the feeds of its rooms)
//! in writes of at most `MAX_WRITE_BATCH` bytes (a long replay goes out piece by piece), pings on
//! schedule, and ends with the close frame that says why.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;

use crate::inbox::{Inbox, Next};
use crate::metrics as m;
use crate::outbound::{ConnHandle, DisconnectReason, SharedFrame, Wire, WriterSignal};
use crate::wsframe::{put_frame, OpCode};
use crate::Shared;

use super::BoxWrite;

/// Most bytes one coalesced socket write carries.
const MAX_WRITE_BATCH: usize = 256 * 1024;
/// How long a close frame may take to write before the socket is just dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The writer: drains the outbound queue and the rooms' feeds into the socket, coalescing what
/// is waiting into writes of at most `MAX_WRITE_BATCH` bytes (a long replay goes out in such pieces, so no
/// connection ever holds more than one piece in its own buffer); pings on schedule; on close,
/// sends the close frame that says why.
pub(super) async fn write_loop(shared: Arc<Shared>, conn: Arc<ConnHandle>, mut write: BoxWrite) {
    let config = &shared.config;
    let mut ping = PingSchedule::new(config.ping_interval);
    // False once a write failed part-way: the stream may end mid-frame, so no close frame.
    let mut whole_frames = true;
    // Set once shutdown began: drain what is queued, then close with 1001.
    let mut draining = false;
    let mut batch = Batch::new(&conn);
    loop {
        if batch.has_more() {
            // In the middle of what was taken: no waiting, but still stop when told to.
            if conn.is_closed() {
                break;
            }
        } else if !draining {
            let signal = std::future::poll_fn(|cx| match conn.poll_writer(cx) {
                Poll::Ready(signal) => Poll::Ready(Some(signal)),
                // Nothing to send: wait for the next ping too (`None`; it is sent below).
                Poll::Pending => ping.poll_due(cx).map(|()| None),
            })
            .await;
            match signal {
                None => {}
                Some(WriterSignal::Close) => break,
                Some(WriterSignal::Drain) => {
                    // What is queued goes out (and the feeds up to their end); nothing more is
                    // taken from the queue.
                    batch.inbox.extend(conn.shut_queue());
                    draining = true;
                }
                Some(WriterSignal::Items) => {
                    batch.inbox.take(&conn);
                }
            }
        }
        // Busy or idle, a connection is pinged on schedule: a client that only listens would
        // otherwise send nothing and look idle to the reader.
        if !draining && ping.due() {
            batch.control(OpCode::Ping, b"gavel");
        }
        batch.fill();
        // More may have been queued meanwhile (the flag says so without taking the lock).
        if !batch.full() && !draining && conn.has_news() && batch.inbox.take(&conn) {
            batch.fill();
        }
        let done = draining && !batch.has_more() && batch.is_empty();
        if let Err(reason) = batch.write(&mut write, config.write_timeout).await {
            whole_frames = false;
            conn.close(reason);
            break;
        }
        if done {
            conn.close(DisconnectReason::Shutdown);
            break;
        }
    }
    // Nothing more is taken: later offers are answered `Closed`, and what was queued is freed.
    drop(conn.shut_queue());
    let reason = conn
        .close_reason()
        .unwrap_or(DisconnectReason::ConnectionLost);
    if reason.is_slow_consumer() {
        tracing::warn!(
            conn = conn.id,
            reason = reason.as_str(),
            "slow consumer disconnected"
        );
    }
    if let Some(code) = reason.close_code().filter(|_| whole_frames) {
        // The same batch (nothing in it is pending: it was written or the loop broke before
        // filling it): a second one would make every idle writer's future larger.
        batch.clear();
        batch.close(code);
        let _ = batch.write(&mut write, CLOSE_WRITE_TIMEOUT).await;
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write.shutdown()).await;
}

/// When the writer pings: every `every`, whether the connection is busy or idle. The due time is
/// checked against the clock where the writer looks anyway; the timer is registered only while
/// the writer waits, once per deadline. (A `tokio::time::Interval` polled at every wake-up
/// re-registers its waker each time: in a profile at 5 events/s per viewer, the timer's polls
/// were about 3 % of the broker's CPU.)
struct PingSchedule {
    every: Duration,
    next: tokio::time::Instant,
    timer: Pin<Box<Sleep>>,
    /// The timer is set for `next` and registered with this task.
    armed: bool,
}

impl PingSchedule {
    fn new(every: Duration) -> PingSchedule {
        let next = tokio::time::Instant::now() + every;
        PingSchedule {
            every,
            next,
            timer: Box::pin(tokio::time::sleep_until(next)),
            armed: false,
        }
    }

    /// Whether a ping is due now; if so, the next one is scheduled a period from now.
    fn due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        self.armed = false;
        true
    }

    /// Ready once a ping is due. Registers the timer the first time it is polled for a
    /// deadline; after that the timer wakes the task, and the clock says it is time.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if tokio::time::Instant::now() >= self.next {
            return Poll::Ready(());
        }
        if !self.armed {
            self.timer.as_mut().reset(self.next);
            if self.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            self.armed = true;
        }
        Poll::Pending
    }
}

/// A batch's only frame, written from where it already is.
enum Lone {
    /// A frame taken from the queue.
    Queued(Arc<SharedFrame>),
    /// The event the inbox's cursor with this index is at (no reference taken).
    Event(usize),
}

impl Lone {
    fn frame<'a>(&'a self, inbox: &'a Inbox) -> Option<&'a Arc<SharedFrame>> {
        match self {
            Lone::Queued(frame) => Some(frame),
            Lone::Event(cursor) => inbox.event(*cursor),
        }
    }

    fn framed<'a>(&'a self, inbox: &'a Inbox, wire: Wire) -> Option<&'a [u8]> {
        self.frame(inbox)?.framed(wire)
    }
}

/// Bytes for one socket write: WebSocket frames laid end to end, at most about
/// `MAX_WRITE_BATCH`; what does not fit waits in the inbox for the next write. A lone frame is
/// written straight from its shared buffer (`lone`), so a quiet connection copies nothing and
/// keeps no buffer.
struct Batch<'a> {
    conn: &'a ConnHandle,
    /// Allocated for a write of more than one frame, freed when the writer goes idle.
    buf: Vec<u8>,
    /// The batch's only frame so far, not yet copied into `buf`.
    lone: Option<Lone>,
    /// Creation time of the oldest data frame in the batch.
    oldest: Option<Instant>,
    /// What is taken and not yet in `buf`, and the rooms' feeds.
    inbox: Inbox,
}

impl<'a> Batch<'a> {
    fn new(conn: &'a ConnHandle) -> Batch<'a> {
        Batch {
            conn,
            buf: Vec::new(),
            lone: None,
            oldest: None,
            inbox: Inbox::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.lone.is_none()
    }

    /// Drops what is taken and not yet written (the loop stopped early).
    fn clear(&mut self) {
        self.buf.clear();
        self.lone = None;
        self.oldest = None;
    }

    /// The bytes of the next write.
    fn bytes(&self) -> &[u8] {
        match &self.lone {
            None => &self.buf,
            Some(lone) => lone.framed(&self.inbox, self.conn.wire).unwrap_or_default(),
        }
    }

    /// Copies the lone frame into `buf`, before anything joins it there.
    fn unlone(&mut self) {
        if let Some(lone) = self.lone.take() {
            if let Some(framed) = lone.framed(&self.inbox, self.conn.wire) {
                self.buf.extend_from_slice(framed);
            }
        }
    }

    /// Whether anything is waiting that is not yet in `buf`.
    fn has_more(&self) -> bool {
        self.inbox.has_more()
    }

    fn full(&self) -> bool {
        self.bytes().len() >= MAX_WRITE_BATCH
    }

    /// Moves what fits into `buf`, in the inbox's order.
    fn fill(&mut self) {
        while !self.full() {
            if matches!(self.lone, Some(Lone::Event(_))) {
                // The lone frame is the one a cursor is at, and the next pop may move it: copy
                // it first, but only if something is coming.
                if !self.inbox.has_more() {
                    break;
                }
                self.unlone();
            }
            match self.inbox.pop() {
                Some(Next::Queued(frame)) => {
                    // Its bytes come off the pending bound.
                    if let Some(framed) = frame.framed(self.conn.wire) {
                        self.conn.written(framed.len());
                    }
                    self.add(Lone::Queued(frame));
                }
                Some(Next::Event(cursor)) => self.add(Lone::Event(cursor)),
                Some(Next::Control(control)) => {
                    self.conn.written(control.1.len() + 2);
                    self.control(control.0, &control.1);
                }
                None => break,
            }
        }
    }

    /// Adds a frame: as the lone frame of an empty batch, written from where it is, else copied
    /// into `buf` (framed once per wire by whoever encoded it).
    fn add(&mut self, next: Lone) {
        let Some(frame) = next.frame(&self.inbox) else {
            return;
        };
        if frame.framed(self.conn.wire).is_none() {
            return;
        }
        self.oldest.get_or_insert(frame.created);
        if !self.is_empty() {
            self.unlone();
        }
        self.lone = Some(next);
        if !self.buf.is_empty() {
            self.unlone();
        }
    }

    /// A WebSocket control frame; on SSE, a ping is a comment line and a pong is not sent
    /// (SSE clients cannot ping). A close is written by [`Batch::close`].
    fn control(&mut self, opcode: OpCode, payload: &[u8]) {
        self.unlone();
        match self.conn.wire {
            Wire::Sse => {
                if opcode == OpCode::Ping {
                    self.buf.extend_from_slice(b": ping\n\n");
                }
            }
            Wire::MsgPack | Wire::Json => put_frame(&mut self.buf, opcode, payload),
        }
    }

    /// The close frame that says why; on SSE, a `close` event with the same code and reason.
    fn close(&mut self, code: gavel_protocol::CloseCode) {
        self.unlone();
        match self.conn.wire {
            Wire::Sse => {
                let event = serde_json::json!({"code": code.code(), "reason": code.reason()});
                self.buf
                    .extend_from_slice(format!("event: close\ndata: {event}\n\n").as_bytes());
            }
            Wire::MsgPack | Wire::Json => {
                let mut payload = code.code().to_be_bytes().to_vec();
                payload.extend_from_slice(code.reason().as_bytes());
                put_frame(&mut self.buf, OpCode::Close, &payload);
            }
        }
    }

    async fn write(
        &mut self,
        write: &mut BoxWrite,
        timeout: Duration,
    ) -> Result<(), DisconnectReason> {
        if self.is_empty() {
            return Ok(());
        }
        // Not abandoned when the connection is marked closing meanwhile (a full queue, say):
        // a frame cut in half would corrupt the stream, and the close frame that says why
        // must follow whole frames. The write timeout bounds each write's wait, so a large
        // replay to a slow but live reader is judged by its progress, not by its size.
        let bytes = self.bytes();
        match tokio::time::timeout(timeout, write.write_all(bytes)).await {
            Err(_) => return Err(DisconnectReason::WriteStalled),
            Ok(Err(_)) => return Err(DisconnectReason::ConnectionLost),
            Ok(Ok(())) => {}
        }
        let handles = m::writer();
        handles.bytes_sent.increment(bytes.len() as u64);
        if let Some(oldest) = self.oldest.take() {
            handles
                .delivery_seconds
                .record(oldest.elapsed().as_secs_f64());
        }
        self.lone = None;
        if self.has_more() {
            self.buf.clear();
        } else {
            // Idle until the next wake-up: an idle connection keeps no write buffer (a
            // wake-up that coalesces several frames allocates one).
            self.buf = Vec::new();
        }
        Ok(())
    }
}
