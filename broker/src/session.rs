//! One WebSocket connection: a reader (this task) that decodes client frames and acts on them,
//! and a writer task that owns the socket's send half and drains the bounded outbound queue,
//! coalescing what is queued into one write. They share only the [`ConnHandle`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gavel_protocol::{
    decode, Channel, ChannelKind, ClientFrame, DecodeError, ErrorCode, ErrorFrame, Format, Reply,
    RequestId, ServerFrame, UserId, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::admission::Slot;
use crate::auction::BidRequest;
use crate::auth::{AuthError, Identity};
use crate::clock::now_ms;
use crate::metrics as m;
use crate::outbound::{ConnHandle, DisconnectReason, Outbound, SharedFrame};
use crate::ratelimit::TokenBucket;
use crate::rooms::Room;
use crate::wsframe::{put_frame, FrameReader, Message, OpCode, ReadError};
use crate::Shared;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Most bytes one coalesced socket write carries.
const MAX_WRITE_BATCH: usize = 256 * 1024;
/// How long a close frame may take to write before the socket is just dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default and maximum user ids in a `presence` reply.
const PRESENCE_DEFAULT_LIMIT: usize = 100;
const PRESENCE_MAX_LIMIT: usize = 1000;

/// Runs a connection to its end: spawns the writer, reads until the connection closes, then
/// leaves every room.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    read: BoxRead,
    write: BoxWrite,
    format: Format,
    identity: Option<Identity>,
    slot: Slot,
) {
    let id = shared.next_conn_id();
    let user = identity.as_ref().map(|i| i.user.clone());
    // A debug-level span: at the default `info` level it costs nothing per connection (about
    // 0.4 KiB of registry memory otherwise); warnings name the connection themselves.
    let span = tracing::debug_span!("conn", id, user = user.as_ref().map(|u| u.as_str()));
    async move {
        let (outbound_tx, outbound_rx) = mpsc::channel(shared.config.outbound_queue);
        let conn = ConnHandle::new(id, user, format, outbound_tx, shared.config.outbound_bytes);
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
            write_loop(Arc::clone(&shared), Arc::clone(&conn), outbound_rx, write)
                .in_current_span(),
        );
        session.read_loop(read).await;
        // Leave the rooms before the writer finishes, so counts drop as the socket closes.
        drop(session);
        let _ = writer.await;
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
    .await
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
        if let Some(cluster) = &self.shared.cluster {
            cluster.leave(channel);
        }
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

    async fn read_loop(&mut self, read: BoxRead) {
        let idle_timeout = self.shared.config.idle_timeout;
        let mut reader = FrameReader::new(read, self.shared.config.max_message_size);
        loop {
            // One read lives across authentication deadlines: the reader is not cancel-safe
            // in the middle of a frame, so only closing the connection may drop it.
            let message = {
                let next = tokio::time::timeout(idle_timeout, reader.next());
                tokio::pin!(next);
                loop {
                    let deadline = self.auth_deadline();
                    let wake = deadline
                        .as_ref()
                        .map_or_else(|| Instant::now() + idle_timeout, |(at, _)| *at);
                    tokio::select! {
                        biased;
                        _ = self.conn.closing().cancelled() => return,
                        _ = tokio::time::sleep_until(wake.into()), if deadline.is_some() => {
                            let Some((_, what)) = deadline else { continue };
                            if let Err(reason) = self.on_auth_deadline(what) {
                                return self.conn.close(reason);
                            }
                        }
                        read = &mut next => match read {
                            Err(_) => return self.conn.close(DisconnectReason::IdleTimeout),
                            Ok(Err(error)) => return self.conn.close(reason_for(&error)),
                            Ok(Ok(message)) => break message,
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
                Message::Binary(bytes) => self.on_message(OpCode::Binary, &bytes).await,
                Message::Text(bytes) => self.on_message(OpCode::Text, &bytes).await,
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
        metrics::counter!(m::BYTES_RECEIVED).increment(bytes.len() as u64);
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
        let frame = match decode::<ClientFrame>(format, bytes, self.shared.config.max_message_size)
        {
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
            self.error(
                Some(id),
                ErrorCode::Unauthenticated,
                "authenticate first: send an auth frame with your token".into(),
            );
            return Ok(());
        }
        match self.dispatch(frame).await {
            Ok(Some(result)) => self.reply(ServerFrame::Ok { id, result }),
            Ok(None) => {}
            Err((code, message)) => self.error(Some(id), code, message),
        }
        Ok(())
    }

    /// Acts on a request. `Ok(None)` means the reply was already queued (subscribe).
    async fn dispatch(&mut self, frame: ClientFrame) -> Result<Option<Reply>, (ErrorCode, String)> {
        match frame {
            ClientFrame::Subscribe {
                id,
                channel,
                since,
                epoch,
            } => {
                self.may_subscribe(&channel).await?;
                if let Some(cluster) = &self.shared.cluster {
                    // Boxed: the session future (alive for every idle connection) then holds a
                    // pointer here, not the Redis round trips' state.
                    Box::pin(cluster.join(&channel))
                        .await
                        .map_err(cluster_unavailable)?;
                }
                let joined = self
                    .shared
                    .rooms
                    .subscribe(&self.conn, &channel, id, since, epoch);
                tracing::debug!(%channel, ?since, recovered = ?joined.recovered, replayed = joined.replayed, "subscribed");
                self.subscriptions.insert(
                    channel,
                    Subscription {
                        room: joined.room,
                        own_seq: 0,
                    },
                );
                Ok(None)
            }
            ClientFrame::Unsubscribe { channel, .. } => {
                let room = self
                    .subscriptions
                    .remove(&channel)
                    .ok_or_else(|| not_subscribed(&channel))?;
                self.leave(&channel, &room.room);
                Ok(Some(Reply::Unsubscribed { channel }))
            }
            ClientFrame::Publish { channel, data, .. } => {
                let user = self.may_write(&channel)?;
                let published = self
                    .shared
                    .publish(&channel, "message", Some(user), data)
                    .await
                    .map_err(cluster_unavailable)?;
                self.published(&channel, published.seq);
                Ok(Some(Reply::Published {
                    channel,
                    seq: published.seq,
                }))
            }
            ClientFrame::Typing {
                channel, typing, ..
            } => {
                let user = self.may_write(&channel)?;
                let frame = ServerFrame::Typing {
                    channel: channel.clone(),
                    user: user.clone(),
                    typing,
                    ts: now_ms(),
                };
                if !self
                    .shared
                    .rooms
                    .signal_everywhere(&channel, frame, Some(user))
                {
                    return Err((
                        ErrorCode::ClusterUnavailable,
                        "the cluster is backed up; typing was not sent".into(),
                    ));
                }
                Ok(Some(Reply::Done {}))
            }
            ClientFrame::Read { channel, seq, .. } => {
                let user = self.may_write(&channel)?;
                let last = self
                    .subscriptions
                    .get(&channel)
                    .map_or(0, |s| s.room.last_seq().max(s.own_seq));
                if seq == 0 || seq > last {
                    return Err((
                        ErrorCode::InvalidRequest,
                        format!("read receipt seq {seq} is not between 1 and the room's latest seq {last}"),
                    ));
                }
                let data = serde_json::json!({ "seq": seq });
                let published = self
                    .shared
                    .publish(&channel, "read", Some(user), data)
                    .await
                    .map_err(cluster_unavailable)?;
                self.published(&channel, published.seq);
                Ok(Some(Reply::Published {
                    channel,
                    seq: published.seq,
                }))
            }
            ClientFrame::Presence { channel, limit, .. } => {
                // Who is in a room is for the room's own subscribers.
                let Some(room) = self.subscriptions.get(&channel) else {
                    return Err(not_subscribed(&channel));
                };
                let limit = limit
                    .map_or(PRESENCE_DEFAULT_LIMIT, |l| l as usize)
                    .min(PRESENCE_MAX_LIMIT);
                let reply = room.room.presence(limit);
                Ok(Some(Reply::Presence(reply)))
            }
            ClientFrame::Ping { .. } => Ok(Some(Reply::Pong {
                server_ts: now_ms(),
            })),
            ClientFrame::Auth { token, .. } => self.authenticate(&token).map(Some),
            ClientFrame::PlaceBid {
                id,
                auction_id,
                amount,
                request_id,
            } => {
                self.token_fresh()?;
                if request_id.is_empty() || request_id.len() > 64 {
                    return Err((
                        ErrorCode::InvalidRequest,
                        "request_id must be 1 to 64 bytes".to_owned(),
                    ));
                }
                let conn = Arc::clone(&self.conn);
                let reply = Box::new(move |result: Reply| {
                    conn.offer_frame(SharedFrame::new(ServerFrame::Ok { id, result }));
                });
                let bid = BidRequest {
                    user: self.identity.as_ref().map(|i| i.user.clone()),
                    may_bid: self.identity.as_ref().is_none_or(Identity::may_bid),
                    auction_id,
                    amount,
                    request_id,
                };
                self.shared.auctions.place_bid(bid, reply);
                Ok(None)
            }
        }
    }

    async fn may_subscribe(&self, channel: &Channel) -> Result<(), (ErrorCode, String)> {
        if self.subscriptions.contains_key(channel) {
            return Err((
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel}"),
            ));
        }
        if self.subscriptions.len() >= self.shared.config.max_subscriptions {
            return Err((
                ErrorCode::TooManySubscriptions,
                format!(
                    "at most {} subscriptions per connection",
                    self.shared.config.max_subscriptions
                ),
            ));
        }
        let kind = channel.kind();
        if matches!(kind, ChannelKind::Auction | ChannelKind::Broadcast) {
            return Ok(());
        }
        let Some(identity) = &self.identity else {
            return Err((
                ErrorCode::Unauthenticated,
                format!("{channel} needs an authenticated connection"),
            ));
        };
        if kind == ChannelKind::User {
            if identity.user.as_str() != channel.id() {
                return Err((
                    ErrorCode::Forbidden,
                    format!("{channel} is another user's channel"),
                ));
            }
            return Ok(());
        }
        match identity.lists(channel) {
            Some(true) => Ok(()),
            Some(false) => Err((
                ErrorCode::Forbidden,
                format!("your token's channels claim does not list {channel}"),
            )),
            None => match &self.shared.authorizer {
                None => Err((
                    ErrorCode::Forbidden,
                    "your token has no channels claim: it may join no conversation".into(),
                )),
                Some(authorizer) => match authorizer.allowed(&identity.user, channel).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err((
                        ErrorCode::Forbidden,
                        format!("the application does not let you join {channel}"),
                    )),
                    Err(error) => {
                        tracing::warn!(%error, "conversation authorization failed; denying");
                        Err((ErrorCode::Forbidden, format!("{error}; try again later")))
                    }
                },
            },
        }
    }

    /// Verifies a token from an `auth` frame: authenticates the connection, or refreshes the
    /// token of the same user.
    fn authenticate(&mut self, token: &str) -> Result<Reply, (ErrorCode, String)> {
        let Some(verifier) = &self.shared.verifier else {
            return Err((
                ErrorCode::TokenInvalid,
                "this broker has no JWT key configured".into(),
            ));
        };
        let identity = verifier.verify(token).map_err(|e| match e {
            AuthError::Expired => (ErrorCode::TokenExpired, e.to_string()),
            AuthError::Invalid(_) => (ErrorCode::TokenInvalid, e.to_string()),
        })?;
        // The verifier allows a few seconds of clock skew; a refresh must really be fresh.
        if identity.expires_at_ms <= now_ms() {
            return Err((ErrorCode::TokenExpired, "the token has expired".into()));
        }
        match &self.identity {
            Some(current) if current.user != identity.user => {
                return Err((
                    ErrorCode::Forbidden,
                    "a connection's user cannot change: open a new connection".into(),
                ))
            }
            Some(_) => {}
            None => {
                // Anonymous until now: it may have joined rooms as an anonymous viewer.
                if !self.subscriptions.is_empty() {
                    return Err((
                        ErrorCode::Forbidden,
                        "authenticate before subscribing: unsubscribe everything first".into(),
                    ));
                }
                self.conn.set_user(identity.user.clone());
                self.shared.users.connected(&identity.user);
            }
        }
        let reply = Reply::Authenticated {
            user: identity.user.clone(),
            expires_at: identity.expires_at_ms,
        };
        // A refreshed token may list fewer conversations: leave those it no longer grants.
        let revoked: Vec<Channel> = self
            .subscriptions
            .keys()
            .filter(|c| c.kind() == ChannelKind::Conversation && identity.lists(c) == Some(false))
            .cloned()
            .collect();
        for channel in revoked {
            if let Some(room) = self.subscriptions.remove(&channel) {
                self.leave(&channel, &room.room);
                self.error(
                    None,
                    ErrorCode::Forbidden,
                    format!("your new token does not list {channel}: unsubscribed"),
                );
            }
        }
        self.identity = Some(identity);
        self.grace_until = None;
        Ok(reply)
    }

    /// During the grace period after its token expired, a connection may only read.
    fn token_fresh(&self) -> Result<(), (ErrorCode, String)> {
        match self.grace_until {
            None => Ok(()),
            Some(_) => Err((
                ErrorCode::TokenExpired,
                "your token expired: send a fresh one in an auth frame first".into(),
            )),
        }
    }

    /// Checks that this connection may publish, type or send receipts in `channel`; returns
    /// the acting user.
    fn may_write(&self, channel: &Channel) -> Result<UserId, (ErrorCode, String)> {
        self.token_fresh()?;
        if channel.kind() != ChannelKind::Conversation {
            return Err((
                ErrorCode::ReadOnlyChannel,
                format!(
                    "clients cannot write to {channel}: only conversation channels accept messages"
                ),
            ));
        }
        if !self.subscriptions.contains_key(channel) {
            return Err(not_subscribed(channel));
        }
        self.identity
            .as_ref()
            .map(|i| i.user.clone())
            .ok_or_else(|| {
                (
                    ErrorCode::Unauthenticated,
                    "anonymous connections are read-only".to_owned(),
                )
            })
    }

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

fn cluster_unavailable(error: crate::cluster::ClusterError) -> (ErrorCode, String) {
    (ErrorCode::ClusterUnavailable, error.to_string())
}

fn not_subscribed(channel: &Channel) -> (ErrorCode, String) {
    (
        ErrorCode::NotSubscribed,
        format!("not subscribed to {channel}"),
    )
}

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

/// The writer: drains the outbound queue into the socket, coalescing what is queued into
/// writes of at most `MAX_WRITE_BATCH` bytes (a long replay goes out in such pieces, so no
/// connection ever holds more than one piece in its own buffer); pings on schedule; on close,
/// sends the close frame that says why.
async fn write_loop(
    shared: Arc<Shared>,
    conn: Arc<ConnHandle>,
    mut outbound_rx: mpsc::Receiver<Outbound>,
    mut write: BoxWrite,
) {
    let config = &shared.config;
    let start = tokio::time::Instant::now() + config.ping_interval;
    let mut ping = tokio::time::interval_at(start, config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // False once a write failed part-way: the stream may end mid-frame, so no close frame.
    let mut whole_frames = true;
    // Set once shutdown began: drain what is queued, then close with 1001.
    let mut draining = false;
    let mut batch = Batch::new(&conn);
    loop {
        if batch.carrying() {
            // In the middle of a long item: no waiting, but still stop when told to.
            if conn.closing().is_cancelled() {
                break;
            }
        } else if !draining {
            tokio::select! {
                biased;
                _ = conn.closing().cancelled() => break,
                _ = shared.shutdown.cancelled() => {
                    // What is queued goes out; nothing more is taken.
                    outbound_rx.close();
                    draining = true;
                }
                // Before the queue: a busy connection must still be pinged, or a client that
                // only listens would look idle.
                _ = ping.tick() => batch.control(OpCode::Ping, b"gavel"),
                item = outbound_rx.recv() => {
                    let Some(item) = item else { break };
                    batch.push(item);
                }
            }
        }
        batch.fill(&mut outbound_rx);
        let done = draining && !batch.carrying() && batch.is_empty();
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
        let mut payload = code.code().to_be_bytes().to_vec();
        payload.extend_from_slice(code.reason().as_bytes());
        let mut batch = Batch::new(&conn);
        batch.control(OpCode::Close, &payload);
        let _ = batch.write(&mut write, CLOSE_WRITE_TIMEOUT).await;
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write.shutdown()).await;
}

/// Bytes for one socket write: WebSocket frames laid end to end, at most about
/// `MAX_WRITE_BATCH`; the rest of a long item waits in `carry` for the next write.
struct Batch<'a> {
    conn: &'a ConnHandle,
    buf: Vec<u8>,
    /// Creation time of the oldest data frame in the batch.
    oldest: Option<Instant>,
    /// A multi-frame item (a subscribe reply and its replay) not yet all in `buf`, and the
    /// index of its next frame.
    carry: Option<(Box<[Arc<SharedFrame>]>, usize)>,
}

impl<'a> Batch<'a> {
    fn new(conn: &'a ConnHandle) -> Batch<'a> {
        Batch {
            conn,
            buf: Vec::new(),
            oldest: None,
            carry: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn carrying(&self) -> bool {
        self.carry.is_some()
    }

    fn full(&self) -> bool {
        self.buf.len() >= MAX_WRITE_BATCH
    }

    fn push(&mut self, item: Outbound) {
        match item {
            Outbound::Frame(frame) => self.frame(&frame),
            Outbound::Batch(frames) => {
                self.carry = Some((frames, 0));
                self.take_carried();
            }
            Outbound::Control(control) => {
                self.conn.written(control.1.len() + 2);
                self.control(control.0, &control.1);
            }
        }
    }

    /// Takes what fits: first the rest of a carried item, then whatever else is queued.
    fn fill(&mut self, outbound_rx: &mut mpsc::Receiver<Outbound>) {
        self.take_carried();
        while !self.full() && !self.carrying() {
            match outbound_rx.try_recv() {
                Ok(item) => self.push(item),
                Err(_) => break,
            }
        }
    }

    fn take_carried(&mut self) {
        let Some((frames, mut next)) = self.carry.take() else {
            return;
        };
        while next < frames.len() && !self.full() {
            self.frame(&frames[next]);
            next += 1;
        }
        if next < frames.len() {
            self.carry = Some((frames, next));
        }
    }

    fn frame(&mut self, frame: &SharedFrame) {
        let format = self.conn.format;
        self.conn.written(crate::outbound::wire_size(frame, format));
        let Some(bytes) = frame.bytes(format) else {
            return;
        };
        self.oldest.get_or_insert(frame.created);
        let opcode = match format {
            Format::MsgPack => OpCode::Binary,
            Format::Json => OpCode::Text,
        };
        put_frame(&mut self.buf, opcode, bytes);
    }

    fn control(&mut self, opcode: OpCode, payload: &[u8]) {
        put_frame(&mut self.buf, opcode, payload);
    }

    async fn write(
        &mut self,
        write: &mut BoxWrite,
        timeout: Duration,
    ) -> Result<(), DisconnectReason> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // Not abandoned when the connection is marked closing meanwhile (a full queue, say):
        // a frame cut in half would corrupt the stream, and the close frame that says why
        // must follow whole frames. The write timeout bounds each write's wait, so a large
        // replay to a slow but live reader is judged by its progress, not by its size.
        match tokio::time::timeout(timeout, write.write_all(&self.buf)).await {
            Err(_) => return Err(DisconnectReason::WriteStalled),
            Ok(Err(_)) => return Err(DisconnectReason::ConnectionLost),
            Ok(Ok(())) => {}
        }
        metrics::counter!(m::BYTES_SENT).increment(self.buf.len() as u64);
        if let Some(oldest) = self.oldest.take() {
            metrics::histogram!(m::DELIVERY_SECONDS).record(oldest.elapsed().as_secs_f64());
        }
        self.buf.clear();
        if self.buf.capacity() > 2 * MAX_WRITE_BATCH {
            // A single huge frame grew it: do not keep that much per connection.
            self.buf = Vec::new();
        }
        Ok(())
    }
}
