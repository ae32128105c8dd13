//! Cluster presence: this node's viewer shares reported to Redis, heartbeats on Redis's clock,
//! and reaping of nodes that stopped beating.

use super::*;

impl Cluster {
    /// Reports the viewer counts of rooms whose local viewers changed; Redis sums the nodes'
    /// shares and publishes the totals to every node following the room.
    pub(super) async fn presence_task(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.presence_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (channel, connections, keys) in self.rooms.take_dirty_presence() {
                let node = &self.config.node_id;
                let mut invocation = self.scripts.presence.prepare_invoke();
                invocation
                    .arg(&self.config.prefix)
                    .arg(channel.as_str())
                    .arg(node)
                    .arg(connections);
                for key in keys {
                    invocation.arg(match key {
                        ViewerKey::User(user) => format!("u{user}"),
                        // Anonymous connections are unique per node.
                        ViewerKey::Anonymous(conn) => format!("~{node}:{conn}"),
                    });
                }
                let mut conn = self.conn();
                let result: Result<(u64, u64), _> = invocation.invoke_async(&mut conn).await;
                if let Err(error) = result {
                    self.command_failed("presence", &error);
                    // Reported again at the next tick (Redis may be back by then).
                    self.rooms.mark_presence_dirty(&channel);
                }
            }
        }
    }

    /// Heartbeats with a TTL, and reaping of nodes that stopped sending theirs.
    pub(super) async fn heartbeat_task(self: Arc<Self>, shutdown: CancellationToken) {
        // Beat and reap every quarter of the TTL, and take a node for dead after three quarters
        // without a beat: a dead node leaves the counts within the TTL, and a live one may
        // miss two beats in a row before it is taken for dead.
        let period = self.config.node_ttl / 4;
        let dead_after = (self.config.node_ttl * 3 / 4).as_millis() as u64;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Until one heartbeat went through: a process with a fixed `--node-id` may follow one
        // killed with it still listed, whose viewers must leave the counts now, not never.
        let mut first = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut conn = self.conn();
            let beat: Result<u64, _> = self
                .scripts
                .heartbeat
                .arg(&self.config.prefix)
                .arg(&self.config.node_id)
                .arg(if first { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await;
            match beat {
                Ok(added) => {
                    first = false;
                    if added == 1 {
                        // New to the cluster, or reaped while cut off, or Redis lost its
                        // data: report every room's viewers afresh.
                        self.rooms.mark_all_dirty();
                    }
                    if !self.heartbeat_up.swap(true, Ordering::AcqRel) {
                        tracing::info!(node = %self.config.node_id, "cluster heartbeats reach Redis");
                    }
                }
                Err(error) => {
                    if self.heartbeat_up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(%error, "cluster heartbeat failed: not ready");
                    }
                    self.command_failed("heartbeat", &error);
                }
            }
            self.update_up_metric();
            match self.reap(dead_after).await {
                Ok(dead) if !dead.is_empty() => {
                    metrics::counter!(m::CLUSTER_NODES_REAPED).increment(dead.len() as u64);
                    tracing::warn!(
                        ?dead,
                        "cluster nodes missed their heartbeats: removed from presence"
                    );
                }
                Ok(_) => {}
                Err(error) => self.command_failed("reap", &error),
            }
        }
        // Leave the cluster's counts at once on a clean shutdown: date this node's heartbeat
        // back to 0 and reap (which removes it, and only nodes that are dead anyway).
        let mut conn = self.conn();
        let _: Result<u64, _> = conn.zadd(self.key("nodes"), &self.config.node_id, 0).await;
        let _ = self.reap(dead_after).await;
    }

    /// Removes the nodes silent for `dead_after` ms, with their presence; returns them.
    pub(super) async fn reap(&self, dead_after: u64) -> Result<Vec<String>, redis::RedisError> {
        let mut conn = self.conn();
        self.scripts
            .reap
            .arg(&self.config.prefix)
            .arg(dead_after)
            .invoke_async(&mut conn)
            .await
    }
}
