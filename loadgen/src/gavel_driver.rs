//! The Gavel driver's roles: a viewer (connect, subscribe, time each `bid_placed` or published
//! `tick`, resubscribe with `since` after a reconnect), a bidder (send the scheduled bids, time
//! each answer) and, with `--publish`, a publisher (the schedule's events over the HTTP API).

use super::*;

/// Where a resubscription resumes: the room's epoch and the last seq seen.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Resume {
    epoch: Option<u64>,
    seq: Option<u64>,
}

/// Connects, reads the hello, and subscribes (if `channel`); records connect and subscribe
/// latency.
pub(crate) async fn open(
    ctx: &Ctx,
    n: usize,
    token: String,
    channel: Option<&Channel>,
) -> Option<Client> {
    open_resuming(ctx, n, token, channel, &mut Resume::default()).await
}

/// [`open`], resubscribing from `resume` (and recording the room's epoch into it).
pub(crate) async fn open_resuming(
    ctx: &Ctx,
    n: usize,
    token: String,
    channel: Option<&Channel>,
    resume: &mut Resume,
) -> Option<Client> {
    let addr = ctx.scenario.urls[n % ctx.scenario.urls.len()];
    let started = Instant::now();
    let options = ConnectOptions {
        token: Some(token),
        source: ctx.source(n),
        ..ConnectOptions::default()
    };
    let mut client = match Client::connect(addr, options).await {
        Ok(c) => c,
        Err(error) => {
            ctx.connect_failed();
            stats::Stats::count(&ctx.stats.errors, format!("connect: {error}"));
            return None;
        }
    };
    if !matches!(
        client.next().await,
        Ok(Incoming::Frame(ServerFrame::Hello { .. }))
    ) {
        ctx.connect_failed();
        return None;
    }
    ctx.record(Metric::Connect, n, started.elapsed());
    if let Some(channel) = channel {
        let started = Instant::now();
        let frame = ClientFrame::Subscribe {
            id: 1,
            channel: channel.clone(),
            since: resume.seq,
            epoch: resume.epoch.filter(|_| resume.seq.is_some()),
        };
        if client.send(&frame).await.is_err() {
            return None;
        }
        loop {
            match client.next().await {
                Ok(Incoming::Frame(ServerFrame::Ok { id: 1, result })) => {
                    if let Reply::Subscribed {
                        epoch, recovered, ..
                    } = result
                    {
                        resume.epoch = Some(epoch);
                        match recovered {
                            Some(true) => ctx.stats.recovered.fetch_add(1, Ordering::Relaxed),
                            Some(false) => ctx.stats.not_recovered.fetch_add(1, Ordering::Relaxed),
                            None => 0,
                        };
                    }
                    break;
                }
                Ok(Incoming::Frame(ServerFrame::Error(e))) => {
                    ctx.error("subscribe", format!("subscribe: {:?}", e.code));
                    return None;
                }
                Ok(Incoming::Frame(_)) => continue,
                _ => return None,
            }
        }
        ctx.record(Metric::Subscribe, n, started.elapsed());
    }
    Some(client)
}

/// The fields of a server frame a viewer looks at; the rest is skipped without allocating.
#[derive(serde::Deserialize)]
pub(crate) struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    seq: Option<u64>,
    /// Only on seq 1: the epoch of the run it begins.
    epoch: Option<u64>,
    #[serde(borrow)]
    event: Option<&'a str>,
    data: Option<ProbeData>,
}

#[derive(serde::Deserialize)]
pub(crate) struct ProbeData {
    amount: Option<i64>,
}

/// A viewer: checks the room's seq and times every bid_placed against its intended send time.
/// When it is one of the `--reconnect-fraction` chosen ones, it drops its connection at
/// `--reconnect-at`, waits a jittered backoff, and resubscribes with `since` and `epoch`.
pub(crate) async fn watch(
    ctx: Arc<Ctx>,
    n: usize,
    auction: usize,
    mut client: Client,
    mut resume: Resume,
) {
    let scenario = &ctx.scenario;
    // A fixed pseudo-random choice per viewer, so the fraction is exact over many viewers.
    let hash = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    let chosen = (hash as f64 / (1u64 << 53) as f64) < scenario.reconnect_fraction;
    let mut reconnect_pending = chosen;
    loop {
        let reconnect_at = ctx
            .start
            .get()
            .map(|s| *s + scenario.reconnect_at.unwrap_or(scenario.duration / 2));
        let read = tokio::select! {
            read = client.next_raw() => read,
            _ = async {
                match reconnect_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }, if reconnect_pending => {
                if reconnect_at.is_none_or(|at| Instant::now() < at) {
                    continue;
                }
                reconnect_pending = false;
                let _ = client.close(1000).await;
                drop(client);
                let jitter = Duration::from_millis(hash % 500);
                tokio::time::sleep(jitter).await;
                ctx.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                let channel = Channel::auction(&ctx.auction_ids[auction]).ok();
                let token = token(&scenario.jwt_secret, &format!("lgv{n}"), None);
                match open_resuming(&ctx, n, token, channel.as_ref(), &mut resume).await {
                    Some(again) => client = again,
                    None => return,
                }
                continue;
            }
        };
        match read {
            Ok(Ok(bytes)) => {
                let Ok(probe) = rmp_serde::from_slice::<Probe<'_>>(&bytes) else {
                    ctx.error("undecodable", "undecodable frame".to_owned());
                    continue;
                };
                if probe.kind != "event" {
                    continue;
                }
                let seq = probe.seq.unwrap_or(0);
                if let Some(last) = resume.seq {
                    if seq != last + 1 {
                        ctx.stats.gaps.fetch_add(1, Ordering::Relaxed);
                        if ctx.export {
                            metrics::counter!("gavel_loadgen_seq_gaps_total").increment(1);
                        }
                    }
                }
                resume.seq = Some(seq);
                if probe.epoch.is_some() {
                    // A room that had no event when it was subscribed (cluster) names its
                    // epoch with the first one.
                    resume.epoch = probe.epoch;
                }
                // Bids' announcements, or the events of a `--publish` run.
                if !matches!(probe.event, Some("bid_placed" | PUBLISHED_EVENT)) {
                    continue;
                }
                ctx.stats.deliveries.fetch_add(1, Ordering::Relaxed);
                let amount = probe.data.and_then(|d| d.amount).unwrap_or(0);
                if let Some(at) = ctx.due_of(auction, amount) {
                    ctx.record(Metric::Delivery, n, at.elapsed());
                    if ctx.export {
                        metrics::counter!("gavel_loadgen_deliveries_total").increment(1);
                    }
                }
            }
            Ok(Err((code, _))) => {
                stats::Stats::count(&ctx.stats.disconnects, code);
                return;
            }
            Err(_) => {
                stats::Stats::count(&ctx.stats.disconnects, 1006);
                return;
            }
        }
    }
}

/// A bidder: sends what the schedule gives it at once, and times the answers.
pub(crate) async fn bid(
    ctx: Arc<Ctx>,
    n: usize,
    client: Client,
    mut bids: tokio::sync::mpsc::Receiver<Bid>,
) {
    let (mut reader, writer) = client.split();
    let reading = {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            while let Ok(incoming) = reader.next().await {
                let Incoming::Frame(ServerFrame::Ok { result, .. }) = incoming else {
                    continue;
                };
                match result {
                    Reply::BidAccepted {
                        auction_id,
                        request_id,
                        ..
                    } => {
                        match ctx.auction_ids.iter().position(|a| *a == auction_id) {
                            Some(index) => ctx.accepted(index),
                            None => {
                                ctx.stats.bids_accepted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        let index = request_id.rsplit('-').next().and_then(|i| i.parse().ok());
                        if let Some(at) = index.and_then(|i| ctx.due(i)) {
                            ctx.record(Metric::BidAck, n, at.elapsed());
                        }
                    }
                    Reply::BidRejected { reason, .. } => {
                        stats::Stats::count(&ctx.stats.rejections, reason.as_str().to_owned());
                        if ctx.export {
                            metrics::counter!("gavel_loadgen_bids_rejected_total", "reason" => reason.as_str())
                                .increment(1);
                        }
                    }
                    _ => {}
                }
            }
        })
    };
    let mut id = 0;
    while let Some(bid) = bids.recv().await {
        id += 1;
        let frame = ClientFrame::PlaceBid {
            id,
            auction_id: ctx.auction_ids[bid.auction].clone(),
            amount: bid.amount,
            request_id: bid.request_id,
            max_amount: None,
        };
        if writer.send(&frame).await.is_err() {
            break;
        }
    }
    // Give the last answers time to arrive, then stop reading.
    tokio::time::sleep(ctx.scenario.cooldown).await;
    reading.abort();
}

/// The event a `--publish` run publishes: `data.amount` numbers it like a bid's amount.
pub(crate) const PUBLISHED_EVENT: &str = "tick";

/// A publisher (`--publish`): posts each scheduled event to its auction's room with
/// `POST /api/publish` on one keep-alive HTTP/1.1 connection, one request at a time, and times
/// each answer from the event's intended send time (as `bid_ack`).
pub(crate) async fn publish(
    ctx: Arc<Ctx>,
    n: usize,
    addr: std::net::SocketAddr,
    mut events: tokio::sync::mpsc::Receiver<Bid>,
) {
    use http_body_util::{BodyExt, Full};
    let connect = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await.ok()?;
        tokio::spawn(connection);
        Some(sender)
    };
    let Some(mut sender) = connect.await else {
        ctx.connect_failed();
        return;
    };
    while let Some(event) = events.recv().await {
        let body = serde_json::json!({
            "channel": format!("auction:{}", ctx.auction_ids[event.auction]),
            "event": PUBLISHED_EVENT,
            "data": {"amount": event.amount},
        });
        let request = hyper::Request::post("/api/publish")
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", ctx.scenario.api_key),
            )
            .body(Full::new(bytes::Bytes::from(body.to_string())));
        let Ok(request) = request else { continue };
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                ctx.error("publish", format!("publisher {n}: {error}"));
                return;
            }
        };
        let status = response.status();
        let _ = response.into_body().collect().await;
        if !status.is_success() {
            stats::Stats::count(&ctx.stats.rejections, format!("http_{}", status.as_u16()));
            continue;
        }
        ctx.accepted(event.auction);
        let index = event
            .request_id
            .rsplit('-')
            .next()
            .and_then(|i| i.parse().ok());
        if let Some(at) = index.and_then(|i| ctx.due(i)) {
            ctx.record(Metric::BidAck, n, at.elapsed());
        }
    }
    // Give the viewers time to receive the last events (the run ends when publishers do).
    tokio::time::sleep(ctx.scenario.cooldown).await;
}
