//! `since` recovery: replay exactly the missed events, or say `recovered: false` with a snapshot.

use gavel_broker::protocol::Reply;
use serde_json::json;

use crate::common::*;

fn subscribed(
    reply: Reply,
) -> (
    u64,
    u64,
    Option<bool>,
    u32,
    Option<gavel_broker::protocol::RoomSnapshot>,
) {
    match reply {
        Reply::Subscribed {
            seq,
            epoch,
            recovered,
            replayed,
            snapshot,
            ..
        } => (seq, epoch, recovered, replayed, snapshot),
        other => panic!("expected subscribed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_replays_exactly_the_missed_events_then_goes_live() {
    let b = TestBroker::start(|_| {}).await;
    let room = channel("conversation:r1");
    let mut first = b.connect(Some("ann")).await;
    let (seq, epoch, recovered, _, _) = subscribed(first.subscribe("conversation:r1").await);
    assert_eq!((seq, recovered), (0, None));
    for i in 1..=3 {
        b.broker.publish(&room, "note", json!({ "n": i }));
    }
    let mut last_seen = 0;
    for _ in 0..3 {
        last_seen = first.next_event().await.seq;
    }
    assert_eq!(last_seen, 3);
    drop(first); // the connection drops

    for i in 4..=10 {
        b.broker.publish(&room, "note", json!({ "n": i }));
    }
    let mut again = b.connect(Some("ann")).await;
    let (seq, _, recovered, replayed, snapshot) = subscribed(
        again
            .subscribe_since("conversation:r1", Some(last_seen), Some(epoch))
            .await,
    );
    assert_eq!((seq, recovered, replayed), (10, Some(true), 7));
    assert!(snapshot.is_none());
    for expected in 4..=10u64 {
        let event = again.next_event().await;
        assert_eq!(event.seq, expected);
        assert_eq!(event.data.to_json()["n"], json!(expected));
    }
    // Then the live stream continues with no gap and no duplicate.
    b.broker.publish(&room, "note", json!({ "n": 11 }));
    assert_eq!(again.next_event().await.seq, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_beyond_the_history_gives_recovered_false_and_the_snapshot() {
    let b = TestBroker::start(|c| c.history_size = 5).await;
    let room = channel("auction:h");
    let mut watcher = b.connect(None).await;
    let (_, epoch, _, _, _) = subscribed(watcher.subscribe("auction:h").await);
    for i in 1..=20 {
        b.broker
            .publish(&room, "bid_placed", json!({ "amount": i }));
    }
    let mut late = b.connect(None).await;
    let (seq, _, recovered, replayed, snapshot) = subscribed(
        late.subscribe_since("auction:h", Some(2), Some(epoch))
            .await,
    );
    assert_eq!((seq, recovered, replayed), (20, Some(false), 0));
    let snapshot = snapshot.expect("a snapshot comes with recovered: false");
    assert_eq!(
        (snapshot.seq, snapshot.oldest_seq, snapshot.epoch),
        (20, Some(16), epoch)
    );
    assert_eq!(snapshot.viewers.connections, 2);
    // Nothing is replayed: the next event is the next live one.
    b.broker
        .publish(&room, "bid_placed", json!({ "amount": 21 }));
    assert_eq!(late.next_event().await.seq, 21);

    // Within the history it still recovers.
    let mut recent = b.connect(None).await;
    let (_, _, recovered, replayed, _) = subscribed(
        recent
            .subscribe_since("auction:h", Some(17), Some(epoch))
            .await,
    );
    assert_eq!((recovered, replayed), (Some(true), 4));
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recent.next_event().await.seq);
    }
    assert_eq!(got, [18, 19, 20, 21]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_epoch_or_a_future_seq_is_not_recovered() {
    let b = TestBroker::start(|_| {}).await;
    let room = channel("auction:e");
    let mut c = b.connect(None).await;
    let (_, epoch, _, _, _) = subscribed(c.subscribe("auction:e").await);
    b.broker.publish(&room, "x", json!(1));
    let mut other = b.connect(None).await;
    let (_, _, recovered, _, snapshot) = subscribed(
        other
            .subscribe_since("auction:e", Some(0), Some(epoch + 1))
            .await,
    );
    assert_eq!(
        recovered,
        Some(false),
        "a different epoch is a different history"
    );
    assert_eq!(snapshot.unwrap().seq, 1);
    let mut future = b.connect(None).await;
    let (_, _, recovered, _, _) =
        subscribed(future.subscribe_since("auction:e", Some(99), None).await);
    assert_eq!(
        recovered,
        Some(false),
        "a since beyond the room's seq cannot be trusted"
    );
    let mut no_epoch = b.connect(None).await;
    let (_, _, recovered, _, _) =
        subscribed(no_epoch.subscribe_since("auction:e", Some(1), None).await);
    assert_eq!(
        recovered,
        Some(false),
        "a seq without its epoch cannot be trusted"
    );
    let mut fresh = b.connect(None).await;
    let (_, _, recovered, replayed, _) = subscribed(
        fresh
            .subscribe_since("auction:e", Some(0), Some(epoch))
            .await,
    );
    assert_eq!((recovered, replayed), (Some(true), 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_without_events_keeps_its_epoch_while_its_subscriber_is_away() {
    let b = TestBroker::start(|_| {}).await;
    let mut tab = b.connect(Some("kim")).await;
    let (seq, epoch, _, _, _) = subscribed(tab.subscribe("user:kim").await);
    assert_eq!(seq, 0);
    drop(tab);
    eventually("kim gone", || async {
        b.broker
            .user_connections(&gavel_broker::protocol::UserId::parse("kim").unwrap())
            == 0
    })
    .await;
    // Longer than the sweeper's period: the empty room must not be dropped and recreated.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    b.broker.publish(
        &channel("user:kim"),
        "payout_completed",
        json!({"amount": 5}),
    );
    let mut back = b.connect(Some("kim")).await;
    let (_, again, recovered, replayed, _) =
        subscribed(back.subscribe_since("user:kim", Some(0), Some(epoch)).await);
    assert_eq!((again, recovered, replayed), (epoch, Some(true), 1));
    assert_eq!(back.next_event().await.event, "payout_completed");
}

/// Histories are held under `--history-memory`: the oldest events of rooms nobody is subscribed
/// to go first, so a room with a subscriber keeps its recovery while idle ones lose theirs (a
/// `since` into what went gets `recovered: false` and a snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_stay_under_their_memory_limit_idle_rooms_first() {
    const BUDGET: u64 = 1024 * 1024;
    let b = TestBroker::start(|c| c.history_memory = BUDGET as usize).await;
    let blob = "x".repeat(20_000);
    // The subscribed room's events are the oldest of all: age alone would take them first.
    let mut ann = b.connect(Some("ann")).await;
    let (_, live_epoch, _, _, _) = subscribed(ann.subscribe("conversation:live").await);
    for i in 0..10 {
        b.broker.publish(
            &channel("conversation:live"),
            "note",
            json!({"i": i, "blob": blob}),
        );
        ann.next_event().await;
    }
    // 8 MB in ten idle rooms.
    for room in 0..10 {
        for i in 0..20 {
            let idle = channel(&format!("conversation:idle{room}"));
            b.broker
                .publish(&idle, "note", json!({"i": i, "blob": blob}));
        }
    }
    let history_bytes = || async {
        let (status, stats) = api(b.addr, "GET", "/api/stats", None).await;
        assert_eq!(status, 200);
        stats["history_bytes"]
            .as_u64()
            .expect("history_bytes in the stats")
    };
    let under = tokio::time::timeout(HANG, async {
        while history_bytes().await > BUDGET {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        under.is_ok(),
        "the sweep brings the histories under the limit"
    );
    assert!(
        history_bytes().await > BUDGET / 2,
        "no more is dropped than needed"
    );

    let mut again = b.connect(Some("ann")).await;
    let (_, _, recovered, replayed, _) = subscribed(
        again
            .subscribe_since("conversation:live", Some(0), Some(live_epoch))
            .await,
    );
    assert_eq!(
        (recovered, replayed),
        (Some(true), 10),
        "the subscribed room kept all"
    );

    let (_, info) = api(b.addr, "GET", "/api/rooms/conversation:idle0", None).await;
    let idle_epoch = info["epoch"].as_u64().expect("the idle room's epoch");
    let mut bob = b.connect(Some("bob")).await;
    let (seq, _, recovered, replayed, snapshot) = subscribed(
        bob.subscribe_since("conversation:idle0", Some(0), Some(idle_epoch))
            .await,
    );
    assert_eq!((seq, recovered, replayed), (20, Some(false), 0));
    assert_eq!(
        snapshot.map(|s| s.seq),
        Some(20),
        "the snapshot to carry on from"
    );
}

/// A room's events leave its history after `--history-ttl` even when no event follows them
/// and the room stays (it has a subscriber): a `since` into them is no longer recovered, while
/// a client that missed nothing still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_rooms_events_age_out_while_it_is_subscribed() {
    let b = TestBroker::start(|c| c.history_ttl = std::time::Duration::from_millis(300)).await;
    let room = channel("conversation:quiet");
    let mut watcher = b.connect(Some("ann")).await;
    let (_, epoch, _, _, _) = subscribed(watcher.subscribe("conversation:quiet").await);
    for i in 1..=3 {
        b.broker.publish(&room, "note", json!({ "n": i }));
        watcher.next_event().await;
    }
    eventually("the quiet room's history is empty", || async {
        b.get("/api/stats").await.1["history_bytes"] == json!(0)
    })
    .await;
    let mut late = b.connect(Some("ann")).await;
    let (seq, _, recovered, replayed, snapshot) = subscribed(
        late.subscribe_since("conversation:quiet", Some(1), Some(epoch))
            .await,
    );
    assert_eq!((seq, recovered, replayed), (3, Some(false), 0));
    assert!(snapshot.is_some());
    let mut current = b.connect(Some("ann")).await;
    let (_, _, recovered, _, _) = subscribed(
        current
            .subscribe_since("conversation:quiet", Some(3), Some(epoch))
            .await,
    );
    assert_eq!(recovered, Some(true));
}
