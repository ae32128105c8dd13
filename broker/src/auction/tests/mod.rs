//! The engine's tests: timers under paused Tokio time, idempotency, a failing and a slow
//! ledger, shutdown and archiving, on the in-memory bid log.

mod failure;
mod lifecycle;

use super::rules::{Increment, SoftClose};
use super::*;
use crate::store::{FaultyLog, MemoryLog};
use gavel_protocol::{Channel, UserId};
use serde_json::Value;
use std::sync::Mutex;

/// Records what the engine announces.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, String, Value)>>,
    /// The event names of each `publish` call: one call reaches a viewer as one write.
    batches: Mutex<Vec<Vec<String>>>,
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
    fn publish(&self, announcements: Vec<Announcement>) {
        let names = announcements.iter().map(|a| a.event.to_string()).collect();
        self.batches.lock().unwrap().push(names);
        let mut events = self.events.lock().unwrap();
        for a in announcements {
            events.push((a.channel.to_string(), a.event.into(), a.data.to_json()));
        }
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
        buy_now: None,
        required_role: None,
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        bid_rate: 1000.0,
        bid_burst: 1000,
        group_commit: GroupCommit::On,
        archive_after: Duration::from_secs(3600),
        webhooks: None,
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
    faulty_with(|_, _| {})
}

/// [`faulty`], with the engine's configuration changed by `configure` (given the log).
fn faulty_with(
    configure: impl FnOnce(Arc<dyn BidLog>, &mut EngineConfig),
) -> (Arc<FaultyLog>, Arc<Recorder>, Auctions) {
    let log = Arc::new(FaultyLog::new(Arc::new(MemoryLog::default())));
    let events = Arc::new(Recorder::default());
    let mut engine_config = config();
    configure(Arc::clone(&log) as Arc<dyn BidLog>, &mut engine_config);
    let auctions = Auctions::open(
        Arc::clone(&log) as Arc<dyn BidLog>,
        Arc::clone(&events) as Arc<dyn AuctionEvents>,
        Clock::tokio(T0),
        engine_config,
        CancellationToken::new(),
    )
    .unwrap();
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
        roles: None,
        auction_id: auction.into(),
        amount,
        request_id: BidKey::parse(request_id).unwrap(),
        max_amount: None,
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

/// A bid with a secret maximum (a raise of it, when the bidder leads).
async fn bid_with_max_to(
    auctions: &Auctions,
    auction: &str,
    user: &str,
    amount: i64,
    max: i64,
    id: &str,
) -> Reply {
    let mut request = request(user, auction, amount, id);
    request.max_amount = Some(max);
    let (tx, rx) = oneshot::channel();
    auctions.place_bid(
        request,
        Box::new(move |reply| {
            let _ = tx.send(reply);
        }),
    );
    rx.await.unwrap()
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
    // After a quiet spell the next bid's turn carries the leaderboard itself (one write to
    // each viewer), with no wait for a timer.
    bid(&auctions, "bob", 1500, "r9").await;
    settle().await;
    let boards = events.named("leaderboard");
    assert_eq!(boards.len(), sent + 1, "{boards:?}");
    assert_eq!(
        boards.last().unwrap()["top"][0],
        serde_json::json!({"user": "bob", "amount": 1500})
    );
    let batches = events.batches.lock().unwrap();
    let last = batches.last().unwrap();
    assert!(
        last.contains(&"bid_placed".to_owned()) && last.ends_with(&["leaderboard".to_owned()]),
        "{batches:?}"
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

#[test]
fn a_bid_key_is_one_to_64_bytes() {
    // An empty key marks the broker's own automatic bids in the log: no bidder may send one,
    // through the WebSocket or through the library.
    assert_eq!(BidKey::parse(""), Err(InvalidBidKey));
    assert_eq!(BidKey::parse("x".repeat(65)), Err(InvalidBidKey));
    assert_eq!(BidKey::parse("r").unwrap().as_str(), "r");
    assert_eq!(
        BidKey::parse("x".repeat(64)).unwrap().as_str(),
        "x".repeat(64)
    );
}

/// A leader's raise of their maximum places no bid, yet a retry of it, after a restart and
/// after being outbid, gets exactly its first answer (kept with the auction's record).
#[tokio::test(start_paused = true)]
async fn a_raised_maximum_answers_its_retry_after_a_restart() {
    let log: Arc<dyn BidLog> = Arc::new(MemoryLog::default());
    let clock = Clock::tokio(T0);
    let first_run = CancellationToken::new();
    let raised;
    {
        let events = Arc::new(Recorder::default());
        let auctions = engine_at(clock, Arc::clone(&log), events, first_run.clone());
        auctions.create(spec("a1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        bid_with_max_to(&auctions, "a1", "ann", 1000, 3000, "x1").await;
        raised = bid_with_max_to(&auctions, "a1", "ann", 1100, 5000, "x2").await;
        assert!(
            matches!(
                raised,
                Reply::BidAccepted {
                    leading: true,
                    max_amount: Some(5000),
                    ..
                }
            ),
            "{raised:?}"
        );
        assert!(matches!(
            bid(&auctions, "bob", 6000, "b1").await,
            Reply::BidAccepted { .. }
        ));
        first_run.cancel();
    }
    let auctions = engine_at(
        clock,
        Arc::clone(&log),
        Arc::new(Recorder::default()),
        CancellationToken::new(),
    );
    settle().await;
    assert_eq!(
        bid_with_max_to(&auctions, "a1", "ann", 1100, 5000, "x2").await,
        raised
    );
}
