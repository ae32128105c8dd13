//! What a connection's requests do: subscribe (with permissions and `since` recovery), publish,
//! typing, read receipts, presence, auth refresh and bids, each answered with a reply or a
//! typed error. Runs on the reader task; never touches the socket.

use std::sync::Arc;

use gavel_protocol::{
    Channel, ChannelKind, ClientFrame, Data, ErrorCode, Reply, ServerFrame, UserId,
};

use crate::auction::{BidKey, BidRequest};
use crate::auth::{AuthError, Identity};
use crate::clock::now_ms;
use crate::outbound::SharedFrame;

use super::{Session, Subscription};

/// Default and maximum user ids in a `presence` reply.
const PRESENCE_DEFAULT_LIMIT: usize = 100;
const PRESENCE_MAX_LIMIT: usize = 1000;

impl Session {
    /// Acts on a request. `Ok(None)` means the reply was already queued (subscribe).
    pub(super) async fn dispatch(
        &mut self,
        frame: ClientFrame,
    ) -> Result<Option<Reply>, (ErrorCode, String)> {
        match frame {
            ClientFrame::Subscribe {
                id,
                channel,
                since,
                epoch,
            } => {
                self.may_subscribe(&channel).await?;
                self.shared
                    .backplane
                    .join(&channel)
                    .await
                    .map_err(cluster_unavailable)?;
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
                self.publish_as(user, channel, "message", data).await
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
                if !self.shared.backplane.signal(&channel, frame, Some(user)) {
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
                let data = Data::from(serde_json::json!({ "seq": seq }));
                self.publish_as(user, channel, "read", data).await
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
                max_amount,
            } => {
                self.token_fresh()?;
                let request_id = BidKey::parse(request_id)
                    .map_err(|invalid| (ErrorCode::InvalidRequest, invalid.to_string()))?;
                let conn = Arc::clone(&self.conn);
                let reply = Box::new(move |result: Reply| {
                    conn.offer_frame(SharedFrame::new(ServerFrame::Ok { id, result }));
                });
                let bid = BidRequest {
                    user: self.identity.as_ref().map(|i| i.user.clone()),
                    may_bid: self.identity.as_ref().is_none_or(Identity::may_bid),
                    roles: self
                        .identity
                        .as_ref()
                        .and_then(|i| i.roles.as_ref())
                        .map(|roles| roles.iter().cloned().collect()),
                    auction_id,
                    amount,
                    request_id,
                    max_amount,
                };
                self.shared.auctions.place_bid(bid, reply);
                Ok(None)
            }
        }
    }

    /// A sequenced event from `user` in `channel` (a message, a read receipt).
    async fn publish_as(
        &mut self,
        user: UserId,
        channel: Channel,
        event: &str,
        data: Data,
    ) -> Result<Option<Reply>, (ErrorCode, String)> {
        let published = self
            .shared
            .backplane
            .publish(&channel, event, Some(user), data)
            .await
            .map_err(cluster_unavailable)?;
        self.published(&channel, published.seq);
        Ok(Some(Reply::Published {
            channel,
            seq: published.seq,
        }))
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
        // A refreshed token may list fewer conversations: leave those it no longer grants.
        let revoked: Vec<Channel> = self
            .subscriptions
            .keys()
            .filter(|c| c.kind() == ChannelKind::Conversation && identity.lists(c) == Some(false))
            .cloned()
            .collect();
        for channel in &revoked {
            if let Some(room) = self.subscriptions.remove(channel) {
                self.leave(channel, &room.room);
                self.error(
                    None,
                    ErrorCode::Forbidden,
                    format!("your new token does not list {channel}: unsubscribed"),
                );
            }
        }
        let reply = Reply::Authenticated {
            user: identity.user.clone(),
            expires_at: identity.expires_at_ms,
            unsubscribed: revoked,
        };
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
}

fn cluster_unavailable(error: crate::backplane::BackplaneError) -> (ErrorCode, String) {
    (ErrorCode::ClusterUnavailable, error.to_string())
}

fn not_subscribed(channel: &Channel) -> (ErrorCode, String) {
    (
        ErrorCode::NotSubscribed,
        format!("not subscribed to {channel}"),
    )
}
