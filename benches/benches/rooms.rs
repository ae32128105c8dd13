//! The room registry alone, no sockets: one publish fanned out through `Rooms` to 1, 100 and
//! 10,000 in-process subscribers (encode once, then a non-blocking queue push per subscriber),
//! and presence-count coalescing: 100 joins and leaves in a 1,000-viewer room followed by one
//! presence tick (one `viewers` frame to each subscriber) against a tick after every change.
//! Throughput is in deliveries (fan-out) and in membership changes (presence).
//!
//! `cargo bench -p gavel-benches --bench rooms`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gavel_broker::outbound::{ConnHandle, Outbound};
use gavel_broker::protocol::{Channel, Format};
use gavel_broker::rooms::{HistoryLimits, Rooms};
use serde_json::json;
use tokio::sync::mpsc;

/// Publishes between two drains of the subscribers' queues (below the queue size, so every
/// offer is queued and none closes a connection as a slow consumer).
const BATCH: u64 = 200;
const QUEUE: usize = 256;

fn limits() -> HistoryLimits {
    HistoryLimits {
        size: 1000,
        ttl: Duration::from_secs(300),
    }
}

struct Subscribers {
    conns: Vec<Arc<ConnHandle>>,
    queues: Vec<mpsc::Receiver<Outbound>>,
}

fn subscribers(n: usize, first_id: u64) -> Subscribers {
    let mut queues = Vec::with_capacity(n);
    let conns = (0..n as u64)
        .map(|i| {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push(rx);
            ConnHandle::new(first_id + i, None, Format::MsgPack, tx, usize::MAX)
        })
        .collect();
    Subscribers { conns, queues }
}

impl Subscribers {
    fn drain(&mut self) {
        for queue in &mut self.queues {
            while queue.try_recv().is_ok() {}
        }
    }
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    let channel = Channel::parse("auction:1").expect("channel");
    for n in [1usize, 100, 10_000] {
        let rooms = Rooms::new(limits());
        let mut subs = subscribers(n, 1);
        for conn in &subs.conns {
            rooms.subscribe(conn, &channel, 1, None, None);
        }
        subs.drain();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("publish", n), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let batch = BATCH.min(iters - done);
                    let started = Instant::now();
                    for i in 0..batch {
                        rooms.publish(
                            &channel,
                            "bid_placed",
                            None,
                            json!({"amount": 100 + i, "bidder": "u1"}),
                        );
                    }
                    took += started.elapsed();
                    subs.drain();
                    done += batch;
                }
                took
            })
        });
    }
    group.finish();
}

fn presence(c: &mut Criterion) {
    let mut group = c.benchmark_group("presence");
    let channel = Channel::parse("auction:p").expect("channel");
    const VIEWERS: usize = 1000;
    const CHANGES: usize = 100;
    group.throughput(Throughput::Elements(CHANGES as u64));
    for (name, tick_every) in [("coalesced_one_tick", CHANGES), ("tick_per_change", 1)] {
        let rooms = Rooms::new(limits());
        let mut viewers = subscribers(VIEWERS, 1);
        for conn in &viewers.conns {
            rooms.subscribe(conn, &channel, 1, None, None);
        }
        let mut churn = subscribers(CHANGES / 2, 1_000_000);
        rooms.flush_presence();
        viewers.drain();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let room = rooms.get(&channel).expect("room");
                    let started = Instant::now();
                    // 50 joins then 50 leaves: 100 changes of the viewer counts.
                    for (i, conn) in churn.conns.iter().enumerate() {
                        rooms.subscribe(conn, &channel, 1, None, None);
                        if (i + 1).is_multiple_of(tick_every) {
                            rooms.flush_presence();
                        }
                    }
                    for (i, conn) in churn.conns.iter().enumerate() {
                        rooms.unsubscribe(conn, &room);
                        if (CHANGES / 2 + i + 1).is_multiple_of(tick_every) {
                            rooms.flush_presence();
                        }
                    }
                    if tick_every == CHANGES {
                        rooms.flush_presence();
                    }
                    took += started.elapsed();
                    viewers.drain();
                    churn.drain();
                }
                took
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = rooms;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = fan_out, presence
}
criterion_main!(rooms);
