//! An auction's end of life: shutdown answers what is queued, ended auctions are archived (and
//! still answer from the log), paused ones are not.

use super::*;

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

/// An engine that archives an auction a second after it ends, with auction `a1` created and
/// open (under paused time).
async fn open_a1_archived_a_second_after_it_ends() -> Auctions {
    let mut short = config();
    short.archive_after = Duration::from_secs(1);
    let (_, auctions) = fresh_with(short);
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    auctions
}

/// A leader's raise of their maximum places no bid, so an archived auction answers its retry
/// from the record, with the first answer, not as a new bid (`ended`).
#[tokio::test(start_paused = true)]
async fn an_archived_auction_answers_a_raises_retry_with_its_first_answer() {
    let auctions = open_a1_archived_a_second_after_it_ends().await;
    bid_with_max_to(&auctions, "a1", "ann", 1000, 3000, "x1").await;
    let raised = bid_with_max_to(&auctions, "a1", "ann", 1100, 5000, "x2").await;
    assert!(
        matches!(
            raised,
            Reply::BidAccepted {
                max_amount: Some(5000),
                ..
            }
        ),
        "{raised:?}"
    );
    auctions.admin("a1", AdminOp::EndNow).await.unwrap();
    for _ in 0..100 {
        if auctions.live_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(auctions.live_count(), 0, "archived");
    let retry = bid_with_max_to(&auctions, "a1", "ann", 1100, 5000, "x2").await;
    assert_eq!(retry, raised);
    let late = bid_with_max_to(&auctions, "a1", "ann", 1200, 6000, "x3").await;
    assert_eq!(reason(&late), Some(BidRejection::Ended));
}

/// A paused auction is not over: it is never archived, however long the pause.
#[tokio::test(start_paused = true)]
async fn a_paused_auction_is_not_archived() {
    let auctions = open_a1_archived_a_second_after_it_ends().await;
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

/// In a close's grace period (a cluster's; here a local ledger is given one), the auction's end
/// has come though it is not closed yet: an admin pause, cancel or end is refused as
/// `wrong_status`, as on one node, and a bid as `ended`. The close then keeps the winner.
#[tokio::test(start_paused = true)]
async fn in_a_close_grace_the_auction_is_over_for_admins_and_bidders() {
    let events = Arc::new(Recorder::default());
    let clock = Clock::tokio(T0);
    let store = Arc::new(MemoryLog::default());
    let ledger = LocalLedger::new(
        store,
        Arc::clone(&events) as Arc<dyn AuctionEvents>,
        clock,
        GroupCommit::On,
    )
    .with_close_grace(1_000);
    let auctions = Auctions::new(Arc::new(ledger), clock, config(), CancellationToken::new());
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(matches!(
        bid(&auctions, "ann", 1000, "r1").await,
        Reply::BidAccepted { .. }
    ));
    // Half-way through the grace: T0 + 60,500 ms, the end being T0 + 60,000.
    tokio::time::sleep(Duration::from_millis(59_500)).await;
    for op in [AdminOp::Pause, AdminOp::Cancel, AdminOp::EndNow] {
        let name = format!("{op:?}");
        let refused = auctions.admin("a1", op).await;
        assert!(
            matches!(refused, Err(AdminError::Spec(SpecError::WrongStatus(..)))),
            "{name} in the grace: {refused:?}"
        );
    }
    let late = bid(&auctions, "bob", 2000, "r2").await;
    assert_eq!(reason(&late), Some(BidRejection::Ended));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    settle().await;
    let ended = events.named("ended");
    assert_eq!(ended.len(), 1, "closed once, after the grace");
    assert_eq!(ended[0]["winner"], "ann");
    assert_eq!(ended[0]["final_price"], 1000);
}
