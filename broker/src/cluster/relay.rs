//! What a node sends to Redis without a caller waiting: signals (typing, joined, left) and
//! detached publishes, each in order and pipelined, what is queued in one round trip.

use super::*;

impl Cluster {
    /// Sends detached publishes in order, what is queued in one pipelined round trip.
    pub(super) async fn detached_task(
        self: Arc<Self>,
        mut detached_rx: mpsc::Receiver<OutgoingEvent>,
        shutdown: CancellationToken,
    ) {
        let mut events = Vec::with_capacity(PIPELINE_MAX);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = detached_rx.recv_many(&mut events, PIPELINE_MAX) => if n == 0 { return },
            }
            let invocations: Vec<redis::ScriptInvocation<'_>> = events
                .iter()
                .map(|event| self.publish_invocation(event))
                .collect();
            let mut pipe = redis::pipe();
            pipe.load_script(&self.scripts.publish).ignore();
            for invocation in &invocations {
                pipe.invoke_script(invocation).ignore();
            }
            let mut conn = self.conn();
            let result: Result<(), _> = pipe.query_async(&mut conn).await;
            if let Err(error) = result {
                self.command_failed("publish", &error);
            }
            drop(invocations);
            events.clear();
        }
    }

    /// Relays signals in order, what is queued in one pipelined round trip; falls back to
    /// local delivery when Redis cannot take them.
    pub(super) async fn relay_task(
        self: Arc<Self>,
        mut relay_rx: mpsc::Receiver<(Channel, ServerFrame, Option<UserId>)>,
        shutdown: CancellationToken,
    ) {
        let mut signals = Vec::with_capacity(PIPELINE_MAX);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = relay_rx.recv_many(&mut signals, PIPELINE_MAX) => if n == 0 { return },
            }
            let mut sent = false;
            if self.pubsub_up.load(Ordering::Acquire) {
                let mut pipe = redis::pipe();
                for (channel, frame, skip_user) in &signals {
                    let message = Signal {
                        frame: frame.clone(),
                        skip_user: skip_user.clone(),
                    };
                    let payload =
                        format!("S{}", serde_json::to_string(&message).unwrap_or_default());
                    pipe.publish(self.room_channel(channel), payload).ignore();
                }
                let mut conn = self.conn();
                let result: Result<(), _> = pipe.query_async(&mut conn).await;
                match result {
                    Ok(()) => sent = true,
                    Err(error) => self.command_failed("signal", &error),
                }
            }
            for (channel, frame, skip_user) in signals.drain(..) {
                if !sent {
                    self.rooms
                        .signal(&channel, frame, Skip::from(skip_user.as_ref()));
                }
            }
        }
    }
}
