//! One WebSocket connection: a reader (this task) that decodes client frames, charges them to the
//! connection's rate and acts on them (`dispatch`), and a writer task (`writer`) that owns the
//! socket's send half and drains the bounded outbound queue. They share only the [`ConnHandle`].

mod dispatch;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gavel_protocol::{
    decode_client, Channel, ClientFrame, DecodeError, ErrorCode, ErrorFrame, Format, RequestId,
    ServerFrame, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use crate::admission::Slot;
use crate::auth::Identity;
use crate::clock::now_ms;
use crate::metrics as m;
use crate::outbound::{ConnHandle, DisconnectReason, Outbound, SharedFrame, Wire};
use crate::ratelimit::TokenBucket;
use crate::rooms::Room;
use crate::wsframe::{FrameReader, Message, OpCode, ReadError};
use crate::Shared;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Where a session's client messages come from: WebSocket frames read off the socket, or the
/// bodies of `POST /sse/{session}` requests (the fallback transport, `crate::sse`), each one
/// text message. Everything after (rate limit, decoding, dispatch) is the same.
pub(crate) enum Inbound {
    /// Boxed: the reader's inline buffer would make every `Inbound` as large.
    WebSocket(Box<FrameReader<BoxRead>>),
    Posts(tokio::sync::mpsc::Receiver<Bytes>),
}

impl Inbound {
    /// A WebSocket's messages, at most `max_message` bytes each.
    pub(crate) fn websocket(read: BoxRead, max_message: usize) -> Inbound {
        Inbound::WebSocket(Box::new(FrameReader::new(read, max_message)))
    }

    /// The next message. Cancel-safe between messages only (see `FrameReader::next`).
    async fn next(&mut self) -> Result<Message, ReadError> {
        match self {
            Inbound::WebSocket(reader) => reader.next().await,
            Inbound::Posts(posts) => posts.recv().await.map(Message::Text).ok_or(ReadError::Eof),
        }
    }

    /// Frames read since the last call, each charged to the rate limit (a POST is one).
    fn take_frames(&mut self) -> u32 {
        match self {
            Inbound::WebSocket(reader) => reader.take_frames(),
            Inbound::Posts(_) => 1,
        }
    }
}

/// Opens a connection's session (registers it, offers `hello`, spawns the writer) and returns
/// the reader's future, which runs the connection to its end and then leaves every room.
///
/// Not an `async fn`: one would keep its arguments in the future beside the session for the
/// connection's whole life (1528 bytes against 1000; the future is most of an idle
/// connection's memory). Spawn the future as the connection's task.
pub(crate) fn serve(
    shared: Arc<Shared>,
    inbound: Inbound,
    write: BoxWrite,
    wire: Wire,
    identity: Option<Identity>,
    slot: Slot,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let format = match wire {
        Wire::MsgPack => Format::MsgPack,
        Wire::Json | Wire::Sse => Format::Json,
    };
    let id = shared.next_conn_id();
    let user = identity.as_ref().map(|i| i.user.clone());
    // A debug-level span: at the default `info` level it costs nothing per connection (about
    // 0.4 KiB of registry memory otherwise); warnings name the connection themselves.
    let span = tracing::debug_span!("conn", id, user = user.as_ref().map(|u| u.as_str()));
    let conn = ConnHandle::on_wire(
        id,
        user,
        format,
        wire,
        shared.config.outbound_queue,
        shared.config.outbound_bytes,
    );
    shared.live.insert(id, Arc::clone(&conn));
    // Shutdown cancels the token, then drains every registered connection: one that
    // registered too late for that sees the token.
    if shared.shutdown.is_cancelled() {
        conn.drain();
    }
    let mut session = Session::open(Arc::clone(&shared), Arc::clone(&conn), identity);
    conn.offer_frame(SharedFrame::new(ServerFrame::Hello {
        protocol: PROTOCOL_VERSION.into(),
        connection_id: id,
        user: conn.user().cloned(),
        server_ts: now_ms(),
        ping_interval_ms: shared.config.ping_interval.as_millis() as u64,
        idle_timeout_ms: shared.config.idle_timeout.as_millis() as u64,
        max_message_size: shared.config.max_message_size as u64,
    }));
    let writer = tokio::spawn(
        writer::write_loop(Arc::clone(&shared), Arc::clone(&conn), write).instrument(span.clone()),
    );
    // Only what the block captures is in the future: a `let` rebinding a capture would keep
    // the session twice.
    async move {
        session.read_loop(inbound).await;
        // Leave the rooms before the writer finishes, so counts drop as the socket closes.
        drop(session);
        let _ = writer.await;
        shared.live.remove(&id);
        let reason = conn
            .close_reason()
            .unwrap_or(DisconnectReason::ConnectionLost);
        metrics::counter!(m::DISCONNECTS, "reason" => reason.as_str()).increment(1);
        if reason.is_slow_consumer() {
            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
        }
        tracing::debug!(reason = reason.as_str(), "connection closed");
        drop(slot);
    }
    .instrument(span)
}

/// The reader's state: the connection's identity, subscriptions and inbound rate budget.
/// Dropping it leaves every room.
struct Session {
    shared: Arc<Shared>,
    conn: Arc<ConnHandle>,
    subscriptions: HashMap<Channel, Subscription>,
    /// `None` until the connection authenticates (or for good, when anonymous).
    identity: Option<Identity>,
    /// When the connection was opened (for the authentication timeout).
    opened: Instant,
    /// Set when the token expired and `token_expired` was sent: the end of the grace period.
    grace_until: Option<Instant>,
    /// Inbound messages, on a clock of milliseconds since `opened`.
    inbound: TokenBucket,
    /// Messages dropped for the rate limit since the bucket was last at least half full; past
    /// the burst size, the connection closes (a sustained flood, even one that a trickle of
    /// refilled tokens lets through now and then).
    strikes: u32,
}

/// One of the connection's subscriptions.
struct Subscription {
    room: Arc<Room>,
    /// The seq of this connection's latest publish here. In cluster mode it can be ahead of
    /// the local replica for a moment, and a read receipt for it is still valid.
    own_seq: u64,
}

/// What a deadline of the authentication state means when it passes.
enum AuthDeadline {
    /// Nothing authenticated in time (anonymous not allowed): close 4002.
    Required,
    /// The token expires now: say so and start the grace period.
    Expiry,
    /// The grace period is over: close 4003.
    GraceOver,
}

impl Session {
    fn open(shared: Arc<Shared>, conn: Arc<ConnHandle>, identity: Option<Identity>) -> Session {
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
        if let Some(user) = conn.user() {
            shared.users.connected(user);
        }
        let inbound = TokenBucket::full(f64::from(shared.config.client_burst), 0);
        Session {
            shared,
            conn,
            subscriptions: HashMap::new(),
            identity,
            opened: Instant::now(),
            grace_until: None,
            inbound,
            strikes: 0,
        }
    }

    /// Ends one subscription: the room, and in cluster mode the node's interest in it.
    fn leave(&self, channel: &Channel, room: &Arc<Room>) {
        self.shared.rooms.unsubscribe(&self.conn, room);
        self.shared.backplane.leave(channel);
    }

    /// Remembers the seq of this connection's publish (see `Subscription::own_seq`).
    fn published(&mut self, channel: &Channel, seq: u64) {
        if let Some(subscription) = self.subscriptions.get_mut(channel) {
            subscription.own_seq = subscription.own_seq.max(seq);
        }
    }

    /// The next moment the authentication state needs attention, if any.
    fn auth_deadline(&self) -> Option<(Instant, AuthDeadline)> {
        match (&self.identity, self.grace_until) {
            (None, _) if !self.shared.config.allow_anonymous => Some((
                self.opened + self.shared.config.auth_timeout,
                AuthDeadline::Required,
            )),
            (None, _) => None,
            (Some(_), Some(grace)) => Some((grace, AuthDeadline::GraceOver)),
            (Some(identity), None) => {
                let left = identity.expires_at_ms.saturating_sub(now_ms());
                Some((
                    Instant::now() + Duration::from_millis(left),
                    AuthDeadline::Expiry,
                ))
            }
        }
    }

    /// Acts on a passed authentication deadline; `Err` closes the connection.
    fn on_auth_deadline(&mut self, what: AuthDeadline) -> Result<(), DisconnectReason> {
        match what {
            AuthDeadline::Required => Err(DisconnectReason::AuthenticationRequired),
            AuthDeadline::GraceOver => Err(DisconnectReason::TokenExpired),
            AuthDeadline::Expiry => {
                let grace = self.shared.config.token_grace;
                self.grace_until = Some(Instant::now() + grace);
                self.error(
                    None,
                    ErrorCode::TokenExpired,
                    format!(
                        "your token expired: send a fresh one in an auth frame within {} s",
                        grace.as_secs()
                    ),
                );
                Ok(())
            }
        }
    }

    /// Charges `frames` WebSocket frames (a message's fragments, pings and pongs included) to
    /// the inbound bucket. `Ok(false)`: over the limit, drop the message; `Err`: a sustained
    /// flood, close with 1008.
    fn charge(&mut self, frames: u32) -> Result<bool, DisconnectReason> {
        let config = &self.shared.config;
        let (rate, burst) = (config.client_rate, f64::from(config.client_burst));
        let now_ms = self.opened.elapsed().as_millis() as u64;
        // Only a client that paused long enough for the bucket to refill halfway is forgiven:
        // one token trickling in between dropped messages is no pause.
        if self.inbound.available(now_ms, rate, burst) >= burst / 2.0 {
            self.strikes = 0;
        }
        if self.inbound.take_n(now_ms, rate, burst, frames) {
            return Ok(true);
        }
        self.strikes += 1;
        if self.strikes > config.client_burst {
            return Err(DisconnectReason::RateLimited);
        }
        Ok(false)
    }

    async fn read_loop(&mut self, mut reader: Inbound) {
        let idle_timeout = self.shared.config.idle_timeout;
        // Made once: a `cancelled()` future registers with the token's waiter list.
        let conn = Arc::clone(&self.conn);
        let closing = conn.closing().cancelled();
        tokio::pin!(closing);
        loop {
            // One read lives across authentication deadlines: the reader is not cancel-safe
            // in the middle of a frame, so only closing the connection may drop it.
            let message = {
                let next = reader.next();
                tokio::pin!(next);
                // One timer for both deadlines (the idle timeout and authentication's), made
                // per wake-up: a `Timeout` around the read would keep a second one in every
                // idle connection's future.
                let idle_at = Instant::now() + idle_timeout;
                loop {
                    let (wake, what) = match self.auth_deadline() {
                        Some((at, what)) if at < idle_at => (at, Some(what)),
                        _ => (idle_at, None),
                    };
                    tokio::select! {
                        biased;
                        _ = &mut closing => return,
                        _ = tokio::time::sleep_until(wake.into()) => {
                            let Some(what) = what else {
                                return self.conn.close(DisconnectReason::IdleTimeout);
                            };
                            if let Err(reason) = self.on_auth_deadline(what) {
                                return self.conn.close(reason);
                            }
                        }
                        read = &mut next => match read {
                            Err(error) => return self.conn.close(reason_for(&error)),
                            Ok(message) => break message,
                        },
                    }
                }
            };
            // Every frame counts against the rate, good or bad, before any work on it.
            let within_rate = match self.charge(reader.take_frames()) {
                Ok(within_rate) => within_rate,
                Err(reason) => return self.conn.close(reason),
            };
            let result = match message {
                Message::Close(_) => Err(DisconnectReason::ClientClosed),
                Message::Binary(_) | Message::Text(_) if !within_rate => {
                    self.error(
                        None,
                        ErrorCode::RateLimited,
                        "too many messages; slow down".into(),
                    );
                    Ok(())
                }
                // Over the limit: no pong (a flood of pings is not answered).
                Message::Ping(_) | Message::Pong if !within_rate => Ok(()),
                // Boxed: a request's future (dispatch, the backplane) would otherwise be part of
                // every idle connection's reader, which waits at `next()` nearly all its life
                // (1480 bytes of future against 648; about 0.5 KiB of RSS per connection).
                Message::Binary(bytes) => Box::pin(self.on_message(OpCode::Binary, &bytes)).await,
                Message::Text(bytes) => Box::pin(self.on_message(OpCode::Text, &bytes)).await,
                Message::Ping(payload) => {
                    self.conn
                        .offer(Outbound::Control(Box::new((OpCode::Pong, payload))));
                    Ok(())
                }
                Message::Pong => Ok(()),
            };
            if let Err(reason) = result {
                return self.conn.close(reason);
            }
        }
    }

    /// Handles one complete client message. Only a message over the size limit ends the
    /// connection; everything else is answered with a reply or an error frame.
    async fn on_message(&mut self, opcode: OpCode, bytes: &[u8]) -> Result<(), DisconnectReason> {
        m::writer().bytes_received.increment(bytes.len() as u64);
        let format = self.conn.format;
        let expected = match format {
            Format::MsgPack => OpCode::Binary,
            Format::Json => OpCode::Text,
        };
        if opcode != expected {
            metrics::counter!(m::MESSAGES_RECEIVED, "type" => "invalid").increment(1);
            let kind = if expected == OpCode::Binary {
                "binary"
            } else {
                "text"
            };
            self.error(
                None,
                ErrorCode::BadFrame,
                format!(
                    "this connection speaks {}: send {kind} messages",
                    format.subprotocol()
                ),
            );
            return Ok(());
        }
        if self.identity.is_none() && !self.shared.config.allow_anonymous {
            // Before authentication only `auth` and `ping` are served: any other known type is
            // refused from its envelope, without decoding (and paying for) its `data`.
            let max = self.shared.config.max_message_size;
            if let Some(envelope) = gavel_protocol::envelope(format, bytes, max) {
                let known = ClientFrame::TYPES
                    .iter()
                    .find(|t| **t == envelope.type_name);
                if let Some(&kind) = known.filter(|t| !matches!(**t, "auth" | "ping")) {
                    metrics::counter!(m::MESSAGES_RECEIVED, "type" => kind).increment(1);
                    self.error(
                        envelope.id,
                        ErrorCode::Unauthenticated,
                        UNAUTHENTICATED.into(),
                    );
                    return Ok(());
                }
            }
        }
        let frame = match decode_client(format, bytes, self.shared.config.max_message_size) {
            Ok(frame) => frame,
            Err(DecodeError::TooLarge { .. }) => return Err(DisconnectReason::MessageTooBig),
            Err(error) => {
                metrics::counter!(m::MESSAGES_RECEIVED, "type" => "invalid").increment(1);
                let code = match error {
                    DecodeError::UnknownType { .. } => ErrorCode::UnknownType,
                    DecodeError::InvalidChannel { .. } => ErrorCode::InvalidChannel,
                    _ => ErrorCode::BadFrame,
                };
                self.error(error.request_id(), code, error.to_string());
                return Ok(());
            }
        };
        metrics::counter!(m::MESSAGES_RECEIVED, "type" => frame.type_name()).increment(1);
        let id = frame.id();
        let open = matches!(frame, ClientFrame::Auth { .. } | ClientFrame::Ping { .. });
        if self.identity.is_none() && !self.shared.config.allow_anonymous && !open {
            self.error(Some(id), ErrorCode::Unauthenticated, UNAUTHENTICATED.into());
            return Ok(());
        }
        match self.dispatch(frame).await {
            Ok(Some(result)) => self.reply(ServerFrame::Ok { id, result }),
            Ok(None) => {}
            Err((code, message)) => self.error(Some(id), code, message),
        }
        Ok(())
    }
}

impl Session {
    fn reply(&self, frame: ServerFrame) {
        self.conn.offer_frame(SharedFrame::new(frame));
    }

    fn error(&self, id: Option<RequestId>, code: ErrorCode, message: String) {
        metrics::counter!(m::ERRORS_SENT, "code" => code.as_str()).increment(1);
        tracing::debug!(?id, code = code.as_str(), %message, "error reply");
        self.reply(ServerFrame::Error(ErrorFrame { id, code, message }));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for (channel, room) in std::mem::take(&mut self.subscriptions) {
            self.leave(&channel, &room.room);
        }
        if let Some(user) = self.conn.user() {
            self.shared.users.disconnected(user);
        }
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }
}

/// The message of an `unauthenticated` error.
const UNAUTHENTICATED: &str = "authenticate first: send an auth frame with your token";

fn reason_for(error: &ReadError) -> DisconnectReason {
    match error {
        ReadError::TooBig => DisconnectReason::MessageTooBig,
        ReadError::InvalidUtf8 => DisconnectReason::InvalidUtf8,
        ReadError::Protocol(what) => {
            tracing::debug!(what, "websocket protocol violation");
            DisconnectReason::ProtocolError
        }
        ReadError::Eof | ReadError::Io(_) => DisconnectReason::ConnectionLost,
    }
}
