//! Bid acceptance end to end through the auction engine on a real sled bid log (in a temp
//! dir), with group commit on and off: concurrent bidders, each waiting for its answer, which
//! comes only after the bid is durable. Throughput is in accepted bids.
//!
//! `cargo bench -p gavel-benches --bench bids`

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gavel_broker::auction::rules::{AuctionSpec, Increment, SoftClose};
use gavel_broker::auction::{AuctionEvents, Auctions, BidKey, BidRequest, EngineConfig};
use gavel_broker::clock::Clock;
use gavel_broker::protocol::{Reply, UserId};
use gavel_broker::rooms::{RoomLimits, Rooms};
use gavel_broker::store::{BidLog, GroupCommit, SledLog};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const BIDDERS: u64 = 64;

struct Engine {
    auctions: Arc<Auctions>,
    /// Submission order = amount order, so every bid is accepted (none is `too_low`).
    submit: Mutex<()>,
    next_amount: AtomicI64,
    _shutdown: CancellationToken,
    dir: std::path::PathBuf,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self._shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn engine(rt: &tokio::runtime::Runtime, mode: GroupCommit) -> Engine {
    let dir = std::env::temp_dir().join(format!("gavel-bench-{}-{:?}", std::process::id(), mode));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log: Arc<dyn BidLog> = Arc::new(SledLog::open(&dir).expect("sled"));
    let rooms = Arc::new(Rooms::new(RoomLimits {
        size: 1000,
        ttl: Duration::from_secs(60),
        memory: 0,
        max_rooms: 0,
    }));
    let shutdown = CancellationToken::new();
    let auctions = rt.block_on(async {
        let config = EngineConfig {
            bid_rate: 1e12,
            bid_burst: u32::MAX,
            group_commit: mode,
            archive_after: Duration::from_secs(3600),
            webhooks: None,
        };
        let events: Arc<dyn AuctionEvents> = rooms;
        let auctions =
            Auctions::open(log, events, Clock::System, config, shutdown.clone()).expect("open");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        auctions
            .create(AuctionSpec {
                id: "bench".into(),
                title: "bench".into(),
                currency: "EUR".into(),
                starting_price: 1,
                increment: Increment::Fixed(1),
                reserve: None,
                starts_at: now - 1000,
                ends_at: now + 86_400_000,
                soft_close: SoftClose::default(),
                buy_now: None,
                required_role: None,
            })
            .await
            .expect("create");
        auctions
    });
    Engine {
        auctions: Arc::new(auctions),
        submit: Mutex::new(()),
        next_amount: AtomicI64::new(1),
        _shutdown: shutdown,
        dir,
    }
}

/// Places `total` bids from `BIDDERS` concurrent bidders; returns how long that took.
async fn run(engine: &Arc<Engine>, total: u64) -> Duration {
    let started = Instant::now();
    let per_bidder = total.div_ceil(BIDDERS);
    let tasks: Vec<_> = (0..BIDDERS)
        .map(|b| {
            let engine = Arc::clone(engine);
            tokio::spawn(async move {
                let user = UserId::parse(&format!("b{b}")).expect("user");
                for i in 0..per_bidder {
                    let (tx, rx) = oneshot::channel();
                    {
                        let _in_order = engine.submit.lock().expect("lock");
                        let amount = engine.next_amount.fetch_add(1, Ordering::Relaxed);
                        engine.auctions.place_bid(
                            BidRequest {
                                user: Some(user.clone()),
                                may_bid: true,
                                roles: None,
                                auction_id: "bench".into(),
                                amount,
                                request_id: BidKey::parse(format!("{b}-{amount}-{i}"))
                                    .expect("a short key"),
                                max_amount: None,
                            },
                            Box::new(move |reply| {
                                let _ = tx.send(reply);
                            }),
                        );
                    }
                    match rx.await {
                        Ok(Reply::BidAccepted { .. }) => {}
                        other => panic!("bid not accepted: {other:?}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bidder");
    }
    started.elapsed()
}

fn bid_acceptance(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("bid_acceptance_sled");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    for (name, mode) in [
        ("group_commit_on", GroupCommit::On),
        ("group_commit_off", GroupCommit::Off),
    ] {
        let engine = Arc::new(engine(&rt, mode));
        group.bench_function(BenchmarkId::new(name, BIDDERS), |b| {
            b.iter_custom(|iters| rt.block_on(run(&engine, iters)))
        });
    }
    group.finish();
}

criterion_group!(benches, bid_acceptance);
criterion_main!(benches);
