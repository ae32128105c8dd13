//! How room events travel between nodes: the [`Backplane`] trait, with [`LocalBackplane`] (one
//! node: straight into the room registry) and the cluster adapter's Redis implementation
//! (`cluster::Cluster`), chosen once at start-up. Sessions, the HTTP API and the embedding API
//! publish, follow rooms and send signals through it and never ask which one runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gavel_protocol::{Channel, Data, ServerFrame, UserId};

use crate::rooms::{Published, Rooms, Skip};

/// A backplane call in flight (boxed: a session's future, alive per connection, then holds a
/// pointer, not the Redis round trips' state).
pub type BackplaneFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, BackplaneError>> + Send + 'a>>;

/// Why the backplane could not do something now (cluster mode: Redis unreachable, or a queue
/// towards it full). Clients see `cluster_unavailable`.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackplaneError(pub String);

/// How room events travel between nodes.
pub trait Backplane: Send + Sync + 'static {
    /// Why this node cannot serve right now, if it cannot (`/readyz`).
    fn not_ready_reason(&self) -> Option<&'static str> {
        None
    }
    /// Before one more local subscription of `channel`: makes sure this node receives the
    /// room's events (cluster mode: follows the room in Redis and syncs its replica).
    fn join<'a>(&'a self, channel: &'a Channel) -> BackplaneFuture<'a, ()>;
    /// One local subscription of `channel` ended.
    fn leave(&self, channel: &Channel);
    /// Publishes a sequenced event in `channel`'s room and returns its seq.
    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        event: &'a str,
        from: Option<UserId>,
        data: Data,
    ) -> BackplaneFuture<'a, Published>;
    /// Publishes without waiting, in call order. On one node the event is queued for every
    /// subscriber before this returns; in cluster mode it goes out in the background (seq 0).
    fn publish_detached(&self, channel: &Channel, event: &str, data: Data) -> Published;
    /// Sends an unsequenced frame (typing) to the room's subscribers on every node but the
    /// connections of `skip_user`. False when it cannot be sent now.
    fn signal(&self, channel: &Channel, frame: ServerFrame, skip_user: Option<UserId>) -> bool;
    /// Called every presence interval: one node sends its coalesced viewer counts here (the
    /// cluster adapter reports them to Redis on its own schedule instead).
    fn presence_tick(&self) {}
}

/// One node: every event is sequenced and delivered by the local room registry.
pub struct LocalBackplane {
    rooms: Arc<Rooms>,
}

impl LocalBackplane {
    pub fn new(rooms: Arc<Rooms>) -> LocalBackplane {
        LocalBackplane { rooms }
    }
}

impl Backplane for LocalBackplane {
    fn join<'a>(&'a self, _channel: &'a Channel) -> BackplaneFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn leave(&self, _channel: &Channel) {}

    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        event: &'a str,
        from: Option<UserId>,
        data: Data,
    ) -> BackplaneFuture<'a, Published> {
        let published = self.rooms.publish(channel, event, from, data);
        Box::pin(std::future::ready(Ok(published)))
    }

    fn publish_detached(&self, channel: &Channel, event: &str, data: Data) -> Published {
        self.rooms.publish(channel, event, None, data)
    }

    fn signal(&self, channel: &Channel, frame: ServerFrame, skip_user: Option<UserId>) -> bool {
        self.rooms
            .signal(channel, frame, Skip::from(skip_user.as_ref()));
        true
    }

    fn presence_tick(&self) {
        self.rooms.flush_presence();
    }
}
