//! The engine's tests: timers under paused Tokio time, idempotency, a failing and a slow
//! ledger, shutdown and archiving, on the in-memory bid log.
use super::ledger::{CommitError, LedgerFuture, Stored, Turn, TurnStart};
use super::rules::{Increment, SoftClose};
use super::*;
use crate::store::{FaultyLog, MemoryLog};
use gavel_protocol::Channel;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

/// Records what the engine announces.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, String, Value)>>,
    released: Mutex<Vec<Channel>>,
}

impl Recorder {
    fn named(&self, event: &str) -> Vec<Value> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e.1 == event)
            .map(|e| e.2.clone())
            .collect()
    }
}

impl AuctionEvents for Recorder {
    fn publish(&self, a: Announcement) {
        self.events
            .lock()
            .unwrap()
            .push((a.channel.to_string(), a.event.into(), a.data));
    }
    fn show_state(&self, _: &Channel, _: Value) {}
    fn release(&self, channel: &Channel) {
        self.released.lock().unwrap().push(channel.clone());
    }
}

const T0: u64 = 1_800_000_000_000;

fn spec(id: &str) -> AuctionSpec {
    AuctionSpec {
        id: id.into(),
        title: "Lot".into(),
        currency: "EUR".into(),
        starting_price: 1000,
        increment: Increment::Fixed(100),
        reserve: None,
        starts_at: T0 + 1_000,
        ends_at: T0 + 60_000,
        soft_close: SoftClose {
            window_ms: 10_000,
            extend_ms: 20_000,
        },
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        bid_rate: 1000.0,
        bid_burst: 1000,
        group_commit: GroupCommit::On,
        archive_after: Duration::from_secs(3600),
    }
}

/// An engine with `config` on an empty in-memory log, and what it announces.
fn fresh_with(config: EngineConfig) -> (Arc<Recorder>, Auctions) {
    let events = Arc::new(Recorder::default());
    let auctions = Auctions::open(
        Arc::new(MemoryLog::default()),
        Arc::clone(&events) as Arc<dyn AuctionEvents>,
        Clock::tokio(T0),
        config,
        CancellationToken::new(),
    )
    .unwrap();
    (events, auctions)
}

/// An engine on an in-memory log that fails on demand, and what it announces.
fn faulty() -> (Arc<FaultyLog>, Arc<Recorder>, Auctions) {
    let log = Arc::new(FaultyLog::new(Arc::new(MemoryLog::default())));
    let events = Arc::new(Recorder::default());
    let auctions = engine(
        Arc::clone(&log) as Arc<dyn BidLog>,
        Arc::clone(&events),
        CancellationToken::new(),
    );
    (log, events, auctions)
}

/// An engine on an empty in-memory log, and what it announces.
fn fresh() -> (Arc<Recorder>, Auctions) {
    let events = Arc::new(Recorder::default());
    let auctions = engine(
        Arc::new(MemoryLog::default()),
        Arc::clone(&events),
        CancellationToken::new(),
    );
    (events, auctions)
}

fn engine(log: Arc<dyn BidLog>, events: Arc<Recorder>, shutdown: CancellationToken) -> Auctions {
    engine_at(Clock::tokio(T0), log, events, shutdown)
}

fn engine_at(
    clock: Clock,
    log: Arc<dyn BidLog>,
    events: Arc<Recorder>,
    shutdown: CancellationToken,
) -> Auctions {
    Auctions::open(log, events, clock, config(), shutdown).unwrap()
}

fn request(user: &str, auction: &str, amount: i64, request_id: &str) -> BidRequest {
    BidRequest {
        user: Some(UserId::parse(user).unwrap()),
        may_bid: true,
        auction_id: auction.into(),
        amount,
        request_id: request_id.into(),
    }
}

/// Places a bid on `a1` and hands back the receiver of its reply, without waiting for it.
fn send_bid(
    auctions: &Auctions,
    user: &str,
    amount: i64,
    request_id: &str,
) -> oneshot::Receiver<Reply> {
    send_bid_to(auctions, "a1", user, amount, request_id)
}

/// [`send_bid`] on any auction.
fn send_bid_to(
    auctions: &Auctions,
    auction: &str,
    user: &str,
    amount: i64,
    request_id: &str,
) -> oneshot::Receiver<Reply> {
    let (tx, rx) = oneshot::channel();
    auctions.place_bid(
        request(user, auction, amount, request_id),
        Box::new(move |reply| {
            let _ = tx.send(reply);
        }),
    );
    rx
}

async fn bid(auctions: &Auctions, user: &str, amount: i64, request_id: &str) -> Reply {
    send_bid(auctions, user, amount, request_id).await.unwrap()
}

fn reason(reply: &Reply) -> Option<BidRejection> {
    match reply {
        Reply::BidRejected { reason, .. } => Some(*reason),
        _ => None,
    }
}

/// Lets the actors run until they are idle (the in-memory log flushes in place, so nothing
/// runs outside the paused runtime).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn timers_open_extend_and_close_with_the_winner() {
    let (events, auctions) = fresh();
    auctions.create(spec("a1")).await.unwrap();
    assert_eq!(
        reason(&bid(&auctions, "ann", 1000, "r1").await),
        Some(BidRejection::NotActive)
    );

    tokio::time::sleep(Duration::from_millis(1_000)).await;
    settle().await;
    assert_eq!(events.named("status_changed")[0]["status"], "active");
    assert!(matches!(
        bid(&auctions, "ann", 1000, "r2").await,
        Reply::BidAccepted { bid_seq: 1, .. }
    ));

    // 55 s in: inside the 10 s window, so the end moves to now + 20 s.
    tokio::time::sleep(Duration::from_millis(54_000)).await;
    let Reply::BidAccepted { ends_at, .. } = bid(&auctions, "bob", 1100, "r3").await else {
        panic!()
    };
    assert_eq!(ends_at, T0 + 75_000);
    let extended = events.named("extended");
    assert_eq!(
        (
            extended[0]["ends_at"].as_u64(),
            extended[0]["previous_ends_at"].as_u64()
        ),
        (Some(T0 + 75_000), Some(T0 + 60_000))
    );
    assert_eq!(events.named("outbid")[0]["your_amount"], 1000);

    // At the original end nothing happens; at the new one, bob wins.
    tokio::time::sleep(Duration::from_millis(6_000)).await;
    settle().await;
    assert!(events.named("ended").is_empty());
    tokio::time::sleep(Duration::from_millis(14_000)).await;
    settle().await;
    let ended = events.named("ended");
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (
            ended[0]["winner"].as_str(),
            ended[0]["final_price"].as_i64()
        ),
        (Some("bob"), Some(1100))
    );
    assert_eq!(ended[0]["reserve_met"], true);
    assert_eq!(
        reason(&bid(&auctions, "ann", 5000, "r4").await),
        Some(BidRejection::Ended)
    );
}

#[tokio::test(start_paused = true)]
async fn the_leaderboard_is_coalesced_and_ranks_each_bidders_highest_bid() {
    let (events, auctions) = fresh();
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    for (i, (user, amount)) in [("ann", 1000), ("bob", 1100), ("ann", 1300), ("cy", 1400)]
        .into_iter()
        .enumerate()
    {
        bid(&auctions, user, amount, &format!("r{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    settle().await;
    let boards = events.named("leaderboard");
    // Coalesced: at most one per interval (the bids' flushes may let paused time move on
    // between bids, so there may be more than one), and the last one ranks everybody.
    assert!(!boards.is_empty() && boards.len() <= 4);
    for pair in boards.windows(2) {
        let gap = pair[1]["server_ts"].as_u64().unwrap() - pair[0]["server_ts"].as_u64().unwrap();
        assert!(gap >= LEADERBOARD_INTERVAL.as_millis() as u64, "{boards:?}");
    }
    assert_eq!(
        boards.last().unwrap()["top"],
        serde_json::json!([
            {"user": "cy", "amount": 1400},
            {"user": "ann", "amount": 1300},
            {"user": "bob", "amount": 1100}
        ])
    );
    let sent = boards.len();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    settle().await;
    assert_eq!(
        events.named("leaderboard").len(),
        sent,
        "nothing new, nothing sent: {:?}",
        events.named("leaderboard")
    );
}

#[tokio::test(start_paused = true)]
async fn reserve_not_met_ends_without_a_winner() {
    let (events, auctions) = fresh();
    let mut s = spec("a1");
    s.reserve = Some(50_000);
    auctions.create(s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    bid(&auctions, "ann", 2000, "r1").await;
    tokio::time::sleep(Duration::from_millis(60_000)).await;
    settle().await;
    let ended = events.named("ended");
    assert_eq!(
        (ended[0]["winner"].clone(), ended[0]["reserve_met"].clone()),
        (Value::Null, Value::Bool(false))
    );
}

#[tokio::test(start_paused = true)]
async fn an_auction_whose_end_passed_while_down_ends_at_start_up() {
    let log: Arc<dyn BidLog> = Arc::new(MemoryLog::default());
    let clock = Clock::tokio(T0);
    let first_run = CancellationToken::new();
    let first;
    {
        let events = Arc::new(Recorder::default());
        let auctions = engine_at(clock, Arc::clone(&log), events, first_run.clone());
        auctions.create(spec("a1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        first = bid(&auctions, "ann", 1500, "r1").await;
        bid(&auctions, "bob", 1600, "r2").await;
        first_run.cancel(); // the broker goes down
    }
    tokio::time::sleep(Duration::from_millis(120_000)).await;
    let events = Arc::new(Recorder::default());
    let auctions = engine_at(
        clock,
        Arc::clone(&log),
        Arc::clone(&events),
        CancellationToken::new(),
    );
    settle().await;
    let ended = events.named("ended");
    assert_eq!(ended.len(), 1, "{:?}", events.events.lock().unwrap());
    assert_eq!(
        (
            ended[0]["winner"].as_str(),
            ended[0]["final_price"].as_i64()
        ),
        (Some("bob"), Some(1600))
    );
    assert_eq!(auctions.get("a1").unwrap().status, AuctionStatus::Ended);
    // A retry of a bid placed before the restart gets exactly its first answer again,
    // from the bid log (the new actor never saw it).
    assert_eq!(bid(&auctions, "ann", 1500, "r1").await, first);
    assert_eq!(log.last_seq("a1").unwrap(), 2);
}

/// Every rejection docs/protocol.md §4.10 marks as remembered comes back the same for a
/// retry, even after the auction opened, resumed or the amount became enough.
#[tokio::test(start_paused = true)]
async fn remembered_rejections_are_answered_the_same_on_retry() {
    let (_, auctions) = fresh();
    auctions.create(spec("a1")).await.unwrap();
    let scheduled = bid(&auctions, "ann", 1000, "early").await;
    assert_eq!(reason(&scheduled), Some(BidRejection::NotActive));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    settle().await;
    // Open now: the retry still gets not_active, and places nothing.
    assert_eq!(bid(&auctions, "ann", 1000, "early").await, scheduled);

    auctions.admin("a1", AdminOp::Pause).await.unwrap();
    let paused = bid(&auctions, "bob", 1000, "while-paused").await;
    assert_eq!(reason(&paused), Some(BidRejection::NotActive));
    auctions.admin("a1", AdminOp::Resume).await.unwrap();
    assert_eq!(bid(&auctions, "bob", 1000, "while-paused").await, paused);

    let invalid = bid(&auctions, "cy", 0, "zero").await;
    assert_eq!(reason(&invalid), Some(BidRejection::InvalidAmount));
    assert_eq!(bid(&auctions, "cy", 5000, "zero").await, invalid);

    assert!(matches!(
        bid(&auctions, "ann", 2000, "ok").await,
        Reply::BidAccepted { bid_seq: 1, .. }
    ));
    let low = bid(&auctions, "cy", 1500, "low").await;
    assert_eq!(reason(&low), Some(BidRejection::TooLow));
    assert_eq!(bid(&auctions, "cy", 9000, "low").await, low);

    auctions.admin("a1", AdminOp::EndNow).await.unwrap();
    let ended = bid(&auctions, "dee", 9000, "late").await;
    assert_eq!(reason(&ended), Some(BidRejection::Ended));
    assert_eq!(bid(&auctions, "dee", 9000, "late").await, ended);
    assert_eq!(auctions.get("a1").unwrap().bid_count, 1);
}

/// A retry of an answered bid is answered before the rate limit is consulted: it costs
/// the bidder no token.
#[tokio::test(start_paused = true)]
async fn retries_are_not_charged_to_the_bid_rate() {
    let mut slow = config();
    slow.bid_rate = 0.001;
    slow.bid_burst = 2;
    let (_, auctions) = fresh_with(slow);
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let first = bid(&auctions, "ann", 1000, "r1").await;
    assert!(matches!(first, Reply::BidAccepted { .. }));
    for _ in 0..5 {
        assert_eq!(bid(&auctions, "ann", 1000, "r1").await, first);
    }
    assert!(matches!(
        bid(&auctions, "ann", 1100, "r2").await,
        Reply::BidAccepted { bid_seq: 2, .. }
    ));
    assert_eq!(
        reason(&bid(&auctions, "ann", 1200, "r3").await),
        Some(BidRejection::RateLimited)
    );
}

/// A bid log that stops flushing: bids are refused, the actor waits with growing pauses
/// (no busy loop), nothing answered "not placed" stays in the log, and once the log works
/// the auction takes bids and ends on time.
#[tokio::test(start_paused = true)]
async fn a_failing_store_parks_the_auction_without_spinning_and_it_recovers() {
    let (log, events, auctions) = faulty();
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(matches!(
        bid(&auctions, "ann", 1000, "r1").await,
        Reply::BidAccepted { bid_seq: 1, .. }
    ));

    log.fail_syncs(true);
    let mut held = send_bid(&auctions, "bob", 1100, "r2");
    settle().await;
    // Its flush failed and so did the flush of its undo: the answer waits until the
    // store can say for sure that the bid is not there.
    assert!(
        held.try_recv().is_err(),
        "no answer while the log is unsettled"
    );
    assert_eq!(log.last_seq("a1").unwrap(), 1, "the bid was taken back out");
    assert_eq!(
        log.find_bid("a1", &UserId::parse("bob").unwrap(), "r2")
            .unwrap(),
        None
    );
    // Meanwhile bids are refused at once.
    assert_eq!(
        reason(&bid(&auctions, "cy", 1200, "r3").await),
        Some(BidRejection::Unavailable)
    );
    // No busy loop: over 20 s of failure the actor probes a handful of times.
    let before = log.sync_attempts();
    tokio::time::sleep(Duration::from_secs(20)).await;
    settle().await;
    let probes = log.sync_attempts() - before;
    assert!((1..=10).contains(&probes), "{probes} probes in 20 s");

    log.fail_syncs(false);
    tokio::time::sleep(Duration::from_secs(31)).await;
    settle().await;
    assert_eq!(
        reason(&held.await.unwrap()),
        Some(BidRejection::Unavailable)
    );
    assert_eq!(log.last_seq("a1").unwrap(), 1);
    // Taking bids again; a retry of the refused bid is a new try.
    assert!(matches!(
        bid(&auctions, "bob", 1100, "r2").await,
        Reply::BidAccepted { bid_seq: 2, .. }
    ));
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    let ended = events.named("ended");
    assert_eq!(ended.len(), 1, "the auction ends on time");
    assert_eq!(ended[0]["winner"], "bob");
}

/// A flush failure whose undo succeeds answers at once, and leaves nothing in the log.
#[tokio::test(start_paused = true)]
async fn a_failed_write_is_answered_unavailable_and_leaves_nothing_behind() {
    let (log, _, auctions) = faulty();
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    log.fail_writes(true);
    assert_eq!(
        reason(&bid(&auctions, "ann", 1000, "r1").await),
        Some(BidRejection::Unavailable)
    );
    log.fail_writes(false);
    assert_eq!(log.last_seq("a1").unwrap(), 0);
    assert_eq!(auctions.get("a1").unwrap().bid_count, 0);
    assert!(auctions.bids("a1", 0, 10).await.unwrap().is_empty());
}

/// A ledger whose commits take `delay`: a slow disk, or a slow Redis.
struct SlowLedger {
    inner: Arc<dyn Ledger>,
    delay: Duration,
}

impl Ledger for SlowLedger {
    fn begin<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, TurnStart> {
        self.inner.begin(auction)
    }
    fn commit<'a>(
        &'a self,
        turn: Turn<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<u64, CommitError>> + Send + 'a>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.commit(turn).await
        })
    }
    fn end_turn<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, ()> {
        self.inner.end_turn(auction)
    }
    fn repair<'a>(
        &'a self,
        auction: &'a str,
        last_seq: u64,
        record: &'a [u8],
    ) -> LedgerFuture<'a, ()> {
        self.inner.repair(auction, last_seq, record)
    }
    fn announce(&self, announcements: Vec<Announcement>) {
        self.inner.announce(announcements)
    }
    fn show_state(&self, auction: &str, state: Value) {
        self.inner.show_state(auction, state)
    }
    fn create<'a>(
        &'a self,
        auction: &'a str,
        record: &'a [u8],
        state: &'a Value,
    ) -> LedgerFuture<'a, Option<u64>> {
        self.inner.create(auction, record, state)
    }
    fn live(&self) -> LedgerFuture<'_, Vec<String>> {
        self.inner.live()
    }
    fn load<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, Option<Stored>> {
        self.inner.load(auction)
    }
    fn find_bids<'a>(
        &'a self,
        auction: &'a str,
        keys: &'a [(UserId, String)],
    ) -> LedgerFuture<'a, Vec<Option<BidRecord>>> {
        self.inner.find_bids(auction, keys)
    }
    fn bids<'a>(
        &'a self,
        auction: &'a str,
        after: u64,
        limit: usize,
    ) -> LedgerFuture<'a, Vec<BidRecord>> {
        self.inner.bids(auction, after, limit)
    }
    fn archive<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, ()> {
        self.inner.archive(auction)
    }
    fn sync(&self) -> LedgerFuture<'_, ()> {
        self.inner.sync()
    }
}

/// A bid that arrives 1 ms before the end while the previous turn still waits on a slow
/// commit is judged at its arrival: accepted, and the soft close extends from then.
#[tokio::test(start_paused = true)]
async fn bids_are_judged_at_arrival_not_when_their_turn_comes() {
    let clock = Clock::tokio(T0);
    let events = Arc::new(Recorder::default());
    let local = LocalLedger::new(
        Arc::new(MemoryLog::default()),
        events,
        clock,
        GroupCommit::On,
    );
    let ledger = SlowLedger {
        inner: Arc::new(local),
        delay: Duration::from_millis(100),
    };
    let auctions = Auctions::new(Arc::new(ledger), clock, config(), CancellationToken::new());
    let mut s = spec("a1");
    s.soft_close = SoftClose {
        window_ms: 10,
        extend_ms: 20_000,
    };
    auctions.create(s).await.unwrap();
    let end = T0 + 60_000;
    tokio::time::sleep(Duration::from_millis(end - 60 - clock.now_ms())).await;
    // Outside the 10 ms window: no extension; its commit runs until end + 40.
    let first = send_bid(&auctions, "ann", 1000, "r1");
    tokio::time::sleep(Duration::from_millis(59)).await;
    assert_eq!(clock.now_ms(), end - 1);
    let last_moment = send_bid(&auctions, "bob", 1100, "r2");
    assert!(matches!(
        first.await.unwrap(),
        Reply::BidAccepted { ends_at, .. } if ends_at == end
    ));
    match last_moment.await.unwrap() {
        Reply::BidAccepted {
            ends_at, server_ts, ..
        } => {
            assert_eq!(server_ts, end - 1, "stamped when it arrived");
            assert_eq!(ends_at, end - 1 + 20_000, "extended from its arrival");
        }
        other => panic!("a bid before the end was refused: {other:?}"),
    }
}

/// Shutdown answers every bid already queued before the actors stop.
#[tokio::test(start_paused = true)]
async fn shutdown_answers_every_queued_bid() {
    let (_, auctions) = fresh();
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let pending: Vec<_> = (0..200)
        .map(|i| send_bid(&auctions, "ann", 1000 + 100 * i, &format!("r{i}")))
        .collect();
    auctions.shut_down().await;
    for reply in pending {
        assert!(
            matches!(reply.await, Ok(Reply::BidAccepted { .. })),
            "every queued bid is answered"
        );
    }
}

/// Ended auctions are archived after the grace period: their actors, queues, rooms and
/// memory go, their record and bids stay, and bids or retries on them are answered from
/// the log. 10,000 created-and-ended auctions leave nothing behind.
#[tokio::test(start_paused = true)]
async fn ten_thousand_ended_auctions_leave_nothing_live_behind() {
    let events = Arc::new(Recorder::default());
    let mut short = config();
    short.archive_after = Duration::from_secs(1);
    let log: Arc<dyn BidLog> = Arc::new(MemoryLog::default());
    let clock = Clock::tokio(T0);
    let auctions = Auctions::open(
        Arc::clone(&log),
        Arc::clone(&events) as Arc<dyn AuctionEvents>,
        clock,
        short,
        CancellationToken::new(),
    )
    .unwrap();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    const N: usize = 10_000;
    for i in 0..N {
        let mut s = spec(&format!("x{i}"));
        s.starts_at = T0;
        s.ends_at = clock.now_ms() + 2_000;
        auctions.create(s).await.unwrap();
    }
    assert_eq!(auctions.live_count(), N);
    let rx = send_bid_to(&auctions, "x7", "ann", 1000, "keep");
    let kept = rx.await.unwrap();
    assert!(matches!(kept, Reply::BidAccepted { .. }));
    // Paused time moves on while the creations wait on each other, so the last ones end
    // later than the first: wait (in paused time) until every one has ended and gone.
    for _ in 0..600 {
        if auctions.live_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle().await;
    assert_eq!(auctions.live_count(), 0, "every ended auction is archived");
    assert_eq!(events.named("ended").len(), N);
    assert_eq!(events.released.lock().unwrap().len(), N, "rooms released");
    assert!(
        log.auctions().unwrap().is_empty(),
        "none is loaded at start"
    );
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks_after <= tasks_before,
        "actor tasks are gone: {tasks_before} before, {tasks_after} after"
    );
    // Archived, still answerable: the retry gets its first answer, a new bid `ended`.
    let rx = send_bid_to(&auctions, "x7", "ann", 1000, "keep");
    assert_eq!(rx.await.unwrap(), kept);
    let rx = send_bid_to(&auctions, "x7", "bob", 5000, "late");
    assert_eq!(reason(&rx.await.unwrap()), Some(BidRejection::Ended));
    let archived = auctions.find("x7").await.unwrap().unwrap();
    assert_eq!(archived.status, AuctionStatus::Ended);
    assert_eq!(auctions.bids("x7", 0, 10).await.unwrap().len(), 1);
}

/// A paused auction is not over: it is never archived, however long the pause.
#[tokio::test(start_paused = true)]
async fn a_paused_auction_is_not_archived() {
    let mut short = config();
    short.archive_after = Duration::from_secs(1);
    let (_, auctions) = fresh_with(short);
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    auctions.admin("a1", AdminOp::Pause).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    assert_eq!(auctions.live_count(), 1);
    auctions.admin("a1", AdminOp::Resume).await.unwrap();
    assert!(matches!(
        bid(&auctions, "ann", 1000, "r1").await,
        Reply::BidAccepted { .. }
    ));
}

/// A rejection given before a turn's write stands when that write fails: a retry after the
/// auction opened still gets it.
#[tokio::test(start_paused = true)]
async fn a_rejection_answered_before_a_failed_write_is_still_remembered() {
    let (log, _, auctions) = faulty();
    auctions.create(spec("a1")).await.unwrap();
    log.fail_writes(true);
    // One turn: the bid (not_active, judged before any write), then a change that fails.
    let early = send_bid(&auctions, "ann", 1000, "early");
    let mut changed = spec("a1");
    changed.title = "Renamed".into();
    assert!(auctions
        .admin("a1", AdminOp::Update(changed))
        .await
        .is_err());
    let first = early.await.unwrap();
    assert_eq!(reason(&first), Some(BidRejection::NotActive));
    log.fail_writes(false);
    tokio::time::sleep(Duration::from_secs(40)).await;
    settle().await;
    assert_eq!(auctions.get("a1").unwrap().status, AuctionStatus::Active);
    assert_eq!(bid(&auctions, "ann", 1000, "early").await, first);
}
