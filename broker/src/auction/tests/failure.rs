//! When the ledger fails or is slow: parking without spinning, undone writes, answers that
//! stand or are voided, and bids judged at their arrival while a commit waits.

use std::future::Future;
use std::pin::Pin;

use super::super::ledger::{CommitError, LedgerFuture, Stored, Turn, TurnStart};
use super::*;

/// Creates auction `a1`, waits for it to open and has ann's bid of 1000 accepted as its first.
async fn open_with_a_first_bid(auctions: &Auctions) {
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(matches!(
        bid(auctions, "ann", 1000, "r1").await,
        Reply::BidAccepted { bid_seq: 1, .. }
    ));
}

/// A bid log that stops flushing: bids are refused, the actor waits with growing pauses
/// (no busy loop), nothing answered "not placed" stays in the log, and once the log works
/// the auction takes bids and ends on time.
#[tokio::test(start_paused = true)]
async fn a_failing_store_parks_the_auction_without_spinning_and_it_recovers() {
    let (log, events, auctions) = faulty();
    open_with_a_first_bid(&auctions).await;

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
    the_held_bid_is_refused_once_a_probe_works(&log, held).await;
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

/// A write that failed part way and could not take itself back is undone like a failed
/// flush: answered unavailable, and nothing of it stays in the log.
#[tokio::test(start_paused = true)]
async fn a_torn_write_is_undone_before_the_bid_is_refused() {
    let (log, _, auctions) = faulty();
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    log.tear_appends(true);
    assert_eq!(
        reason(&bid(&auctions, "ann", 1000, "r1").await),
        Some(BidRejection::Unavailable)
    );
    assert_eq!(
        log.last_seq("a1").unwrap(),
        0,
        "the torn turn was taken back"
    );
    let ann = UserId::parse("ann").unwrap();
    assert_eq!(log.find_bid("a1", &ann, "r1").unwrap(), None);
    log.tear_appends(false);
    tokio::time::sleep(LEADERBOARD_INTERVAL).await;
    assert!(matches!(
        bid(&auctions, "ann", 1000, "r1").await,
        Reply::BidAccepted { bid_seq: 1, .. }
    ));
}

/// A crash between a turn's bids and its record (a store that writes the record last) leaves
/// bids after the record's last seq. They were never acknowledged: start-up removes them, and
/// their seq and request ids are free again.
#[tokio::test(start_paused = true)]
async fn bids_of_a_turn_cut_by_a_crash_are_removed_at_start_up() {
    let log: Arc<dyn BidLog> = Arc::new(MemoryLog::default());
    let first_run = CancellationToken::new();
    {
        let auctions = engine(Arc::clone(&log), Arc::default(), first_run.clone());
        auctions.create(spec("a1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        bid(&auctions, "ann", 1000, "r1").await;
        first_run.cancel();
    }
    // What the crash left: bob's bid 2 without the record after it.
    let record = log.auction("a1").unwrap().unwrap();
    let mut cut = log.bids("a1", 0, 1).unwrap().remove(0);
    (cut.seq, cut.user, cut.amount, cut.request_id) =
        (2, UserId::parse("bob").unwrap(), 1100, "r2".into());
    log.append("a1", &[cut], &record, &[]).unwrap();

    let auctions = engine(Arc::clone(&log), Arc::default(), CancellationToken::new());
    assert_eq!(log.last_seq("a1").unwrap(), 1);
    let bob = UserId::parse("bob").unwrap();
    assert_eq!(log.find_bid("a1", &bob, "r2").unwrap(), None);
    assert!(matches!(
        bid(&auctions, "bob", 1100, "r2").await,
        Reply::BidAccepted { bid_seq: 2, .. }
    ));
}

/// A leaderboard taken in a turn whose write failed was never sent: the next accepted bid's
/// turn carries one at once, rather than an interval after the failure.
#[tokio::test(start_paused = true)]
async fn a_leaderboard_lost_with_a_failed_write_does_not_delay_the_next() {
    let (log, events, auctions) = faulty();
    auctions.create(spec("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    bid(&auctions, "ann", 1000, "r1").await;
    settle().await;
    assert_eq!(events.named("leaderboard").len(), 1);

    // An interval later, a leaderboard is due with the next bid, whose write fails.
    tokio::time::sleep(LEADERBOARD_INTERVAL + Duration::from_millis(100)).await;
    log.fail_writes(true);
    assert_eq!(
        reason(&bid(&auctions, "bob", 1100, "r2").await),
        Some(BidRejection::Unavailable)
    );
    log.fail_writes(false);
    // Past the first probe of the store, well within an interval of the failed turn.
    tokio::time::sleep(LEADERBOARD_INTERVAL / 2).await;
    settle().await;
    assert!(matches!(
        bid(&auctions, "cy", 1200, "r3").await,
        Reply::BidAccepted { .. }
    ));
    settle().await;
    let boards = events.named("leaderboard");
    assert_eq!(boards.len(), 2, "{boards:?}");
    assert_eq!(
        boards[1]["top"],
        serde_json::json!([
            {"user": "cy", "amount": 1200},
            {"user": "ann", "amount": 1000}
        ])
    );
    let batches = events.batches.lock().unwrap();
    let last = batches.last().unwrap();
    assert!(
        last.contains(&"bid_placed".to_owned()) && last.ends_with(&["leaderboard".to_owned()]),
        "the leaderboard rides with cy's bid: {batches:?}"
    );
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
        webhooks: &'a [String],
    ) -> LedgerFuture<'a, ()> {
        self.inner.repair(auction, last_seq, record, webhooks)
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

/// A turn whose flush and undo both failed leaves its webhook in the store; the probe's repair
/// takes it out with the bids, so a later start does not send a webhook for a bid never placed.
#[tokio::test(start_paused = true)]
async fn a_repair_takes_out_the_webhooks_of_the_turn_it_undoes() {
    let (log, _, auctions) = faulty_with(|log, config| {
        config.webhooks = Some(crate::webhooks::Reporting {
            bids: true,
            wake: Arc::new(tokio::sync::Notify::new()),
            outbox: Arc::new(crate::webhooks::LocalOutbox::open(log).unwrap()),
        });
    });
    open_with_a_first_bid(&auctions).await;
    log.fail_syncs(true);
    log.fail_reverts(true);
    let held = send_bid(&auctions, "bob", 1100, "r2");
    settle().await;
    let ids = |log: &FaultyLog| -> Vec<String> {
        log.outbox().unwrap().into_iter().map(|w| w.id).collect()
    };
    assert!(
        ids(&log).contains(&"bid.accepted/a1/2".to_owned()),
        "left by the failed undo"
    );
    log.fail_syncs(false);
    log.fail_reverts(false);
    the_held_bid_is_refused_once_a_probe_works(&log, held).await;
    assert!(
        !ids(&log).contains(&"bid.accepted/a1/2".to_owned()),
        "the repair took the undone turn's webhook out: {:?}",
        ids(&log)
    );
}

/// After a store failure is over: the probe (at most 30 s later) undoes the held turn, its bid
/// is refused as `unavailable`, and the log holds the first bid only.
async fn the_held_bid_is_refused_once_a_probe_works(
    log: &FaultyLog,
    held: tokio::sync::oneshot::Receiver<Reply>,
) {
    tokio::time::sleep(Duration::from_secs(31)).await;
    settle().await;
    assert_eq!(
        reason(&held.await.unwrap()),
        Some(BidRejection::Unavailable)
    );
    assert_eq!(log.last_seq("a1").unwrap(), 1);
}
