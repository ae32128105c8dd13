//! The room registry alone, no sockets: one publish fanned out through `Rooms` to 1, 100 and
//! 10,000 in-process subscribers (encode once, append to the room's feed, wake each subscriber),
//! and presence-count coalescing: 100 joins and leaves in a 1,000-viewer room followed by one
//! presence tick (one `viewers` frame to each subscriber) against a tick after every change.
//! `fan_out_woken` is the same publish with a Tokio task per subscriber reading its inbox (queue
//! and feed), as a connection's writer does: the time runs until every task has read every
//! event, so it includes the wake-ups, the polls and the reads that a real delivery costs.
//! Throughput is in deliveries (fan-out) and in membership changes (presence).
//!
//! `cargo bench -p gavel-benches --bench rooms`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gavel_broker::inbox::Inbox;
use gavel_broker::outbound::{ConnHandle, WriterSignal};
use gavel_broker::protocol::{Channel, Format};
use gavel_broker::rooms::{RoomLimits, Rooms};
use serde_json::json;

/// Publishes between two drains of the subscribers' inboxes (below the lag bound, so none
/// counts as a slow consumer).
const BATCH: u64 = 200;
const QUEUE: usize = 256;

fn limits() -> RoomLimits {
    RoomLimits {
        size: 1000,
        ttl: Duration::from_secs(300),
        memory: 0,
        max_rooms: 0,
    }
}

struct Subscribers {
    conns: Vec<Arc<ConnHandle>>,
    inboxes: Vec<Inbox>,
}

fn subscribers(n: usize, first_id: u64) -> Subscribers {
    let conns = (0..n as u64)
        .map(|i| ConnHandle::new(first_id + i, None, Format::MsgPack, QUEUE, usize::MAX))
        .collect();
    let inboxes = (0..n).map(|_| Inbox::default()).collect();
    Subscribers { conns, inboxes }
}

impl Subscribers {
    /// Reads every subscriber's inbox to its end, as the writers would.
    fn drain(&mut self) {
        for (conn, inbox) in self.conns.iter().zip(&mut self.inboxes) {
            inbox.take(conn);
            while inbox.pop().is_some() {}
        }
    }
}

/// `batch` bid events, published one after the other.
fn publish_bids(rooms: &Rooms, channel: &Channel, batch: u64) {
    for i in 0..batch {
        rooms.publish(
            channel,
            "bid_placed",
            None,
            json!({"amount": 100 + i, "bidder": "u1"}).into(),
        );
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
                    publish_bids(&rooms, &channel, batch);
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

/// Counts deliveries across the receiving tasks and wakes the bench thread when a target is
/// reached (so it sleeps instead of spinning on the cores the tasks need).
#[derive(Default)]
struct Received {
    count: std::sync::atomic::AtomicU64,
    target: std::sync::atomic::AtomicU64,
    reached: std::sync::Mutex<bool>,
    wake: std::sync::Condvar,
}

impl Received {
    fn one(&self) {
        use std::sync::atomic::Ordering;
        let now = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if now == self.target.load(Ordering::Acquire) {
            *self.reached.lock().expect("lock") = true;
            self.wake.notify_one();
        }
    }

    /// Waits until `more` deliveries beyond the current count have arrived; `start` runs once
    /// the target is set (it publishes).
    fn wait_for(&self, more: u64, start: impl FnOnce()) {
        use std::sync::atomic::Ordering;
        *self.reached.lock().expect("lock") = false;
        let target = self.count.load(Ordering::Acquire) + more;
        self.target.store(target, Ordering::Release);
        start();
        let mut reached = self.reached.lock().expect("lock");
        while !*reached && self.count.load(Ordering::Acquire) < target {
            reached = self.wake.wait(reached).expect("wait");
        }
    }
}

/// Publishes to subscribers whose queues are drained by one task each (on a 2-worker runtime),
/// timed until every task has received every event of the batch.
fn fan_out_woken(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out_woken");
    let channel = Channel::parse("auction:w").expect("channel");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    for n in [100usize, 10_000] {
        let rooms = Rooms::new(limits());
        let Subscribers { conns, .. } = subscribers(n, 1);
        let received = Arc::new(Received::default());
        for conn in &conns {
            let (received, conn) = (Arc::clone(&received), Arc::clone(conn));
            // As a writer does: wait for the signal, then read the queue and the feed.
            runtime.spawn(async move {
                let mut inbox = Inbox::default();
                while conn.writer_signal().await == WriterSignal::Items {
                    inbox.take(&conn);
                    while inbox.pop().is_some() {
                        received.one();
                    }
                }
            });
        }
        // The subscribe replies.
        received.wait_for(n as u64, || {
            for conn in &conns {
                rooms.subscribe(conn, &channel, 1, None, None);
            }
        });
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("publish", n), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    // Within the queue size, so no subscriber counts as slow.
                    let batch = (QUEUE as u64 / 2).min(iters - done);
                    let started = Instant::now();
                    received.wait_for(batch * n as u64, || {
                        publish_bids(&rooms, &channel, batch);
                    });
                    took += started.elapsed();
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
    targets = fan_out, fan_out_woken, presence
}
criterion_main!(rooms);
