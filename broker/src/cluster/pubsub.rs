//! The pub/sub connection: subscribes to the rooms this node follows and the control channel,
//! resubscribes and resyncs after a reconnection, applies each message to the local replica,
//! and resyncs a room after a gap.

use super::*;

impl Cluster {
    /// Owns the pub/sub connection: (re)connects with backoff, subscribes to the control
    /// channel and every followed room, resyncs those rooms, then relays messages until the
    /// connection fails. Every loss and every resubscription is logged and counted.
    pub(super) async fn pubsub_task(
        self: Arc<Self>,
        mut subs_rx: mpsc::Receiver<SubCommand>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut connected_before = false;
        loop {
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub()) => r,
            };
            let pubsub = match pubsub {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(error)) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cluster pub/sub cannot connect");
                    self.wait_backoff(&mut subs_rx, &mut backoff, &shutdown)
                        .await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(retry_in = ?backoff, "cluster pub/sub connect timed out");
                    self.wait_backoff(&mut subs_rx, &mut backoff, &shutdown)
                        .await;
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            let followed: Vec<Channel> = lock(&self.interest).keys().cloned().collect();
            let mut names: Vec<String> = followed.iter().map(|c| self.room_channel(c)).collect();
            names.push(self.control_channel());
            for channel in &followed {
                self.replicas.begin_sync(channel);
            }
            let mut subscribed = true;
            for chunk in names.chunks(1000) {
                match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(chunk)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "cluster pub/sub subscribe failed");
                        subscribed = false;
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("cluster pub/sub subscribe timed out");
                        subscribed = false;
                        break;
                    }
                }
            }
            if subscribed {
                let mut synced = 0usize;
                for channel in &followed {
                    match self.sync_room(channel).await {
                        Ok(()) => synced += 1,
                        Err(error) => {
                            tracing::warn!(%channel, %error, "cluster room resync failed");
                            subscribed = false;
                            break;
                        }
                    }
                }
                if subscribed {
                    // Auction notices sent before the control channel was subscribed (or while
                    // disconnected) may be missed: (re)load and refresh the auctions.
                    self.send_control(Control::Resubscribed);
                }
                if subscribed && connected_before {
                    metrics::counter!(m::CLUSTER_RESUBSCRIBES).increment(1);
                    tracing::info!(rooms = synced, "cluster pub/sub reconnected: resubscribed and resynced every followed room");
                }
            }
            if subscribed {
                connected_before = true;
                backoff = BACKOFF_MIN;
                self.pubsub_up.store(true, Ordering::Release);
                self.update_up_metric();
                metrics::gauge!(m::CLUSTER_ROOMS).set(followed.len() as f64);
                let mut ping = tokio::time::interval(PUBSUB_PING);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let reason = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        message = stream.next() => match message {
                            Some(message) => self.on_message(&message),
                            None => break "connection closed".to_owned(),
                        },
                        command = subs_rx.recv() => match command {
                            None => return,
                            Some(SubCommand::Subscribe(name, done)) => {
                                let result = match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&name)).await {
                                    Ok(result) => result.map_err(ClusterError::from),
                                    Err(_) => Err(ClusterError::Unavailable("subscribe timed out".into())),
                                };
                                let failed = result.is_err();
                                let _ = done.send(result);
                                if failed { break "subscribe failed".to_owned(); }
                                metrics::gauge!(m::CLUSTER_ROOMS).increment(1.0);
                            }
                            Some(SubCommand::Unsubscribe(channel)) => {
                                // A join that came after the leave keeps it.
                                if lock(&self.interest).contains_key(&channel) { continue; }
                                let name = self.room_channel(&channel);
                                match tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(name)).await {
                                    Ok(Ok(())) => {}
                                    _ => break "unsubscribe failed".to_owned(),
                                }
                                metrics::gauge!(m::CLUSTER_ROOMS).decrement(1.0);
                            }
                            Some(SubCommand::Reconnect) => break "a room could not be resynced".to_owned(),
                        },
                        _ = ping.tick() => {
                            let pong: Result<Result<redis::Value, _>, _> =
                                tokio::time::timeout(COMMAND_TIMEOUT, sink.ping()).await;
                            match pong {
                                Ok(Ok(_)) => {}
                                Ok(Err(error)) => break format!("ping failed: {error}"),
                                Err(_) => break "ping timed out".to_owned(),
                            }
                        }
                    }
                };
                self.pubsub_up.store(false, Ordering::Release);
                self.update_up_metric();
                metrics::counter!(m::CLUSTER_DISCONNECTS).increment(1);
                tracing::warn!(%reason, "cluster pub/sub connection lost: not ready; reconnecting");
            } else {
                metrics::counter!(m::CLUSTER_DISCONNECTS).increment(1);
            }
            self.wait_backoff(&mut subs_rx, &mut backoff, &shutdown)
                .await;
        }
    }

    /// Sleeps the backoff (doubling it), refusing follow requests meanwhile.
    pub(super) async fn wait_backoff(
        &self,
        subs_rx: &mut mpsc::Receiver<SubCommand>,
        backoff: &mut Duration,
        shutdown: &CancellationToken,
    ) {
        let until = tokio::time::Instant::now() + *backoff;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(until) => return,
                command = subs_rx.recv() => {
                    if let Some(SubCommand::Subscribe(_, done)) = command {
                        let _ = done.send(Err(ClusterError::Unavailable("pub/sub connection down".into())));
                    }
                }
            }
        }
    }

    pub(super) fn on_message(self: &Arc<Self>, message: &redis::Msg) {
        let name = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if name == self.control_channel() {
            self.on_control(payload);
            return;
        }
        let prefix = self.room_channel_prefix();
        let Some(channel) = name
            .strip_prefix(prefix.as_str())
            .and_then(|c| Channel::parse(c).ok())
        else {
            return;
        };
        match payload.first() {
            Some(b'E') => match parse_event(&payload[1..]) {
                Some(event) => {
                    if self.replicas.deliver(&channel, event) == Delivery::Gap {
                        tracing::warn!(%channel, "cluster event gap: resyncing the room");
                        metrics::counter!(m::CLUSTER_ERRORS, "op" => "gap").increment(1);
                        self.spawn_resync(channel);
                    }
                }
                None => tracing::warn!(%channel, "unreadable cluster event"),
            },
            Some(b'S') => match serde_json::from_slice::<Signal>(&payload[1..]) {
                Ok(signal) => {
                    let skip = Skip::from(signal.skip_user.as_ref());
                    self.rooms.signal(&channel, signal.frame, skip);
                }
                Err(error) => tracing::warn!(%channel, %error, "unreadable cluster signal"),
            },
            Some(b'V') => match parse_viewers(&payload[1..]) {
                Some(totals) => self.rooms.cluster_viewers(&channel, totals),
                None => tracing::warn!(%channel, "unreadable cluster viewer totals"),
            },
            _ => tracing::warn!(%channel, "unknown cluster message"),
        }
    }

    /// Queues an auction notice; when the queue is full the notice is dropped and the auctions
    /// are reloaded instead (their actors catch up from Redis).
    pub(super) fn send_control(&self, control: Control) {
        if self.control_tx.try_send(control).is_err() {
            metrics::counter!(m::CLUSTER_ERRORS, "op" => "control_queue_full").increment(1);
            self.control_lost.store(true, Ordering::Release);
        }
    }

    pub(super) fn room_channel_prefix(&self) -> String {
        self.key("ch:")
    }

    pub(super) fn on_control(&self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let control = match text.split_at_checked(1) {
            Some(("A", id)) => Control::Created(id.to_owned()),
            Some(("C", rest)) => {
                let mut parts = rest.rsplitn(2, ' ');
                let version = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let id = parts.next().unwrap_or("").to_owned();
                Control::Changed(id, version)
            }
            _ => return,
        };
        self.send_control(control);
    }

    /// Resyncs a room after a gap, retrying with backoff for as long as the node follows it.
    /// A room that cannot be resynced for `RESYNC_GIVE_UP` forces a pub/sub reconnection
    /// (which resyncs everything, with the node unready meanwhile).
    pub(super) fn spawn_resync(self: &Arc<Self>, channel: Channel) {
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut pause = BACKOFF_MIN;
            loop {
                if !lock(&cluster.interest).contains_key(&channel) {
                    return;
                }
                match cluster.sync_room(&channel).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%channel, %error, retry_in = ?pause, "cluster room resync failed");
                    }
                }
                if started.elapsed() > RESYNC_GIVE_UP {
                    tracing::error!(%channel, "cluster room still out of sync: reconnecting pub/sub");
                    let _ = cluster.subs_tx.try_send(SubCommand::Reconnect);
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF_MAX);
            }
        });
    }
}
