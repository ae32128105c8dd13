//! The cluster's webhook outbox in Redis: `P:webhooks` (hash webhook id → entry), written by the
//! commit script in the same step as the turn's bids; every node's deliverer reads it, and a
//! lease per attempt (`P:webhook-lease:ID`) keeps two nodes from delivering one webhook at once.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;

use super::Cluster;
use crate::store::Outboxed;
use crate::webhooks::{Outbox, OutboxFuture};

/// The outbox; cheap to clone.
#[derive(Clone)]
pub struct RedisOutbox {
    cluster: Arc<Cluster>,
    /// How long a node holds a webhook it is attempting (longer than one attempt may take).
    lease: Duration,
}

impl RedisOutbox {
    pub fn new(cluster: Arc<Cluster>, attempt_timeout: Duration) -> RedisOutbox {
        RedisOutbox {
            cluster,
            lease: attempt_timeout + Duration::from_secs(5),
        }
    }

    fn key(&self) -> String {
        format!("{}:webhooks", self.cluster.config.prefix)
    }

    fn lease_key(&self, id: &str) -> String {
        format!("{}:webhook-lease:{id}", self.cluster.config.prefix)
    }

    fn failed(&self, op: &'static str, error: redis::RedisError) -> String {
        self.cluster.command_failed(op, &error);
        error.to_string()
    }
}

impl Outbox for RedisOutbox {
    fn pending(&self) -> OutboxFuture<'_, Vec<Outboxed>> {
        Box::pin(async move {
            let mut conn = self.cluster.conn();
            let all: Vec<(String, Vec<u8>)> = conn
                .hgetall(self.key())
                .await
                .map_err(|e| self.failed("webhooks", e))?;
            Ok(all
                .into_iter()
                .map(|(id, entry)| Outboxed { id, entry })
                .collect())
        })
    }

    fn claim<'a>(&'a self, id: &'a str) -> OutboxFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.cluster.conn();
            let taken: Option<String> = redis::cmd("SET")
                .arg(self.lease_key(id))
                .arg(self.cluster.node_id())
                .arg("NX")
                .arg("PX")
                .arg(self.lease.as_millis() as u64)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed("webhooks", e))?;
            Ok(taken.is_some())
        })
    }

    fn update<'a>(&'a self, webhook: &'a Outboxed) -> OutboxFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.cluster.conn();
            let _: i64 = self
                .cluster
                .scripts
                .update_webhook
                .key(self.key())
                .arg(&webhook.id)
                .arg(&webhook.entry)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.failed("webhooks", e))?;
            // The next attempt may come from any node once it is due.
            let _: i64 = conn
                .del(self.lease_key(&webhook.id))
                .await
                .map_err(|e| self.failed("webhooks", e))?;
            Ok(())
        })
    }

    fn delivered<'a>(&'a self, id: &'a str) -> OutboxFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.cluster.conn();
            let _: (i64, i64) = redis::pipe()
                .atomic()
                .hdel(self.key(), id)
                .del(self.lease_key(id))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed("webhooks", e))?;
            Ok(())
        })
    }
}
