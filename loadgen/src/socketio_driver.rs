//! The Socket.IO driver's roles, for the peer comparison: a viewer that joins an auction and
//! times its bids, and a bidder that emits the scheduled bids and times the acknowledgements.

use super::*;

/// A Socket.IO viewer: connect, then `join-auction` (acknowledged), each timed.
pub(crate) async fn sio_join(ctx: &Ctx, n: usize, auction: usize) -> Option<socketio::Reader> {
    let addr = ctx.scenario.urls[n % ctx.scenario.urls.len()];
    let started = Instant::now();
    let Ok((mut reader, writer)) = socketio::connect(addr, ctx.source(n), &format!("lgv{n}")).await
    else {
        ctx.connect_failed();
        return None;
    };
    ctx.record(Metric::Connect, n, started.elapsed());
    let started = Instant::now();
    let join = json!({ "auctionId": ctx.auction_ids[auction] });
    writer.emit("join-auction", &join, 0).await.ok()?;
    loop {
        match reader.next().await {
            socketio::Packet::Ack(0, _) => break,
            socketio::Packet::Closed => return None,
            _ => continue,
        }
    }
    ctx.record(Metric::Subscribe, n, started.elapsed());
    Some(reader)
}

/// A Socket.IO viewer: times every `bid-placed` (Socket.IO has no seq: gaps are not measured).
pub(crate) async fn sio_watch(
    ctx: Arc<Ctx>,
    n: usize,
    auction: usize,
    mut reader: socketio::Reader,
) {
    loop {
        match reader.next().await {
            socketio::Packet::Event(name, data) if name == "bid-placed" => {
                ctx.stats.deliveries.fetch_add(1, Ordering::Relaxed);
                let amount = data["amount"].as_i64().unwrap_or(0);
                if let Some(at) = ctx.due_of(auction, amount) {
                    ctx.record(Metric::Delivery, n, at.elapsed());
                }
            }
            socketio::Packet::Closed => {
                stats::Stats::count(&ctx.stats.disconnects, 1006);
                return;
            }
            _ => {}
        }
    }
}

/// A Socket.IO bidder: `place-bid` with the schedule index as the acknowledgement id.
pub(crate) async fn sio_bid(
    ctx: Arc<Ctx>,
    n: usize,
    mut reader: socketio::Reader,
    writer: socketio::Writer,
    mut bids: tokio::sync::mpsc::Receiver<Bid>,
) {
    let reading = {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            loop {
                match reader.next().await {
                    socketio::Packet::Ack(id, data) => {
                        let at = ctx.due(id);
                        if data["ok"] == true {
                            ctx.accepted(id as usize % ctx.auction_ids.len());
                            if let Some(at) = at {
                                ctx.record(Metric::BidAck, n, at.elapsed());
                            }
                        } else {
                            let reason = data["reason"].as_str().unwrap_or("rejected").to_owned();
                            stats::Stats::count(&ctx.stats.rejections, reason);
                        }
                    }
                    socketio::Packet::Closed => return,
                    socketio::Packet::Event(..) => {}
                }
            }
        })
    };
    while let Some(bid) = bids.recv().await {
        let Ok(ack) = bid.request_id.parse::<u64>() else {
            continue;
        };
        let data = json!({ "auctionId": ctx.auction_ids[bid.auction], "amount": bid.amount });
        if writer.emit("place-bid", &data, ack).await.is_err() {
            break;
        }
    }
    tokio::time::sleep(ctx.scenario.cooldown).await;
    reading.abort();
}
