//! Auctions over real sockets: concurrent bidding, outbid notices, bad bids, the admin API,
//! snapshots on subscribe, and durability across kill -9.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gavel_broker::protocol::{BidRejection, Format, Reply, ServerFrame};
use serde_json::{json, Value};

use crate::common::*;

pub(crate) fn fast_bidding(c: &mut gavel_broker::Config) {
    c.bid_rate = 1_000_000.0;
    c.bid_burst = 1_000_000;
}

/// What one bidder saw acknowledged: bid seq -> amount.
pub(crate) type Acks = BTreeMap<u64, i64>;

/// `bids` bids by one user, each just above the last known minimum.
pub(crate) async fn bidder(
    mut c: TestClient,
    auction: String,
    user: String,
    bids: usize,
    seed: u64,
) -> Acks {
    let mut acks = Acks::new();
    let mut next_min = 1000;
    for i in 0..bids {
        let amount = next_min + ((seed * 7 + i as u64 * 13) % 40) as i64;
        match c.bid(&auction, amount, &format!("{user}-{i}")).await {
            Reply::BidAccepted {
                bid_seq,
                amount: got,
                next_min_bid,
                ..
            } => {
                assert_eq!(got, amount);
                acks.insert(bid_seq, amount);
                next_min = next_min_bid;
            }
            Reply::BidRejected {
                reason: BidRejection::TooLow,
                min_amount,
                ..
            } => {
                next_min = min_amount.expect("too_low carries the minimum");
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    acks
}

/// The log is gap-free from 1 with strictly increasing amounts, every acknowledgement is in it,
/// and the auction's state is its last bid.
pub(crate) async fn check_log(
    addr: std::net::SocketAddr,
    auction: &str,
    acks: &HashMap<String, Acks>,
) -> usize {
    let log = all_bids(addr, auction).await;
    for (i, bid) in log.iter().enumerate() {
        assert_eq!(bid["seq"].as_u64(), Some(i as u64 + 1), "gap-free seq");
        if i > 0 {
            assert!(
                bid["amount"].as_i64() > log[i - 1]["amount"].as_i64(),
                "amounts strictly increase in seq order"
            );
        }
    }
    let mut acked = 0;
    for (user, user_acks) in acks {
        for (seq, amount) in user_acks {
            let entry = &log[*seq as usize - 1];
            assert_eq!(
                (entry["user"].as_str(), entry["amount"].as_i64()),
                (Some(user.as_str()), Some(*amount)),
                "ack {seq} agrees with the log"
            );
            acked += 1;
        }
    }
    assert_eq!(
        acked,
        log.len(),
        "every logged bid was acknowledged to its bidder"
    );
    let (_, state) = api(addr, "GET", &format!("/api/auctions/{auction}"), None).await;
    let last = log.last().expect("some bids");
    assert_eq!(state["bid_count"].as_u64(), Some(log.len() as u64));
    assert_eq!(state["price"], last["amount"]);
    assert_eq!(state["leader"], last["user"]);
    log.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_bidders_two_thousand_bids_and_a_parallel_auction() {
    let b = TestBroker::start(fast_bidding).await;
    for id in ["hot", "side"] {
        create_auction(b.addr, id, 600_000).await;
    }
    let mut tasks = Vec::new();
    for (auction, bidders, per) in [("hot", 50, 40), ("side", 10, 40)] {
        for n in 0..bidders {
            let user = format!("{auction}-u{n}");
            let c = b.connect(Some(&user)).await;
            tasks.push((
                auction,
                user.clone(),
                tokio::spawn(bidder(c, auction.to_owned(), user, per, n as u64)),
            ));
        }
    }
    let mut acks: HashMap<&str, HashMap<String, Acks>> = HashMap::new();
    for (auction, user, task) in tasks {
        acks.entry(auction)
            .or_default()
            .insert(user, task.await.unwrap());
    }
    let hot = check_log(b.addr, "hot", &acks["hot"]).await;
    let side = check_log(b.addr, "side", &acks["side"]).await;
    assert!(
        hot > 50 && side > 10,
        "bids were accepted: {hot} and {side}"
    );
    // Independent: every bid in each log is by that auction's own bidders.
    for (auction, prefix) in [("hot", "hot-"), ("side", "side-")] {
        assert!(all_bids(b.addr, auction)
            .await
            .iter()
            .all(|bid| bid["user"].as_str().unwrap().starts_with(prefix)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_the_snapshot_then_bids_and_the_old_leader_is_told_on_every_tab() {
    let b = TestBroker::start(fast_bidding).await;
    create_auction(b.addr, "lot7", 600_000).await;
    let mut viewer = b.connect(None).await;
    let Reply::Subscribed { state, .. } = viewer.subscribe("auction:lot7").await else {
        panic!()
    };
    assert_eq!(
        (state["status"].as_str(), state["next_min_bid"].as_i64()),
        (Some("active"), Some(1000))
    );
    assert!(state["server_ts"].as_u64().is_some() && state["ends_at"].as_u64().is_some());

    let mut ann_tabs = Vec::new();
    for _ in 0..3 {
        let mut tab = b.connect(Some("ann")).await;
        tab.subscribe("user:ann").await;
        ann_tabs.push(tab);
    }
    let mut ann = b.connect(Some("ann")).await;
    let mut bob = b.connect(Some("bob")).await;
    assert!(matches!(
        ann.bid("lot7", 1000, "a1").await,
        Reply::BidAccepted { bid_seq: 1, .. }
    ));
    assert!(matches!(
        bob.bid("lot7", 1500, "b1").await,
        Reply::BidAccepted {
            bid_seq: 2,
            price: 1500,
            ..
        }
    ));

    for tab in &mut ann_tabs {
        let event = tab.next_event().await;
        assert_eq!(event.event, "outbid");
        assert_eq!(
            (
                event.data.to_json()["amount"].as_i64(),
                event.data.to_json()["your_amount"].as_i64()
            ),
            (Some(1500), Some(1000))
        );
    }
    for (seq, bidder, amount) in [(1, "ann", 1000), (2, "bob", 1500)] {
        let event = loop {
            let event = viewer.next_event().await;
            if event.event == "bid_placed" {
                break event;
            }
        };
        assert_eq!(event.data.to_json()["bid_seq"], seq);
        assert_eq!(
            (
                event.data.to_json()["bidder"].as_str(),
                event.data.to_json()["amount"].as_i64()
            ),
            (Some(bidder), Some(amount))
        );
    }
    // A late subscriber's snapshot already has both bids.
    let mut late = b.connect(None).await;
    let Reply::Subscribed { state, .. } = late.subscribe("auction:lot7").await else {
        panic!()
    };
    assert_eq!(
        (
            state["price"].as_i64(),
            state["leader"].as_str(),
            state["bid_count"].as_u64()
        ),
        (Some(1500), Some("bob"), Some(2))
    );
    assert_eq!(state["next_min_bid"], 1510);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bids_get_their_documented_outcome_and_write_nothing() {
    let b = TestBroker::start(|c| {
        c.bid_rate = 0.001;
        c.bid_burst = 12;
    })
    .await;
    create_auction(b.addr, "x", 600_000).await;
    let mut c = b.connect(Some("carol")).await;
    let reason = |r: Reply| match r {
        Reply::BidRejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    };
    // A request id is 1 to 64 bytes: otherwise an error, before the bid limiter or the log.
    for request_id in [String::new(), "k".repeat(65)] {
        let err = c
            .request(|id| gavel_broker::protocol::ClientFrame::PlaceBid {
                id,
                auction_id: "x".into(),
                amount: 5000,
                request_id,
                max_amount: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, gavel_broker::protocol::ErrorCode::InvalidRequest);
    }
    assert_eq!(
        reason(c.bid("x", 0, "z").await),
        BidRejection::InvalidAmount
    );
    assert_eq!(
        reason(c.bid("x", -500, "n").await),
        BidRejection::InvalidAmount
    );
    assert_eq!(
        reason(c.bid("x", 1_000_000_000_000_001, "big").await),
        BidRejection::InvalidAmount
    );
    assert_eq!(
        reason(c.bid("nope", 5000, "u").await),
        BidRejection::UnknownAuction
    );
    let Reply::BidRejected {
        reason: r,
        min_amount,
        ..
    } = c.bid("x", 999, "low").await
    else {
        panic!()
    };
    assert_eq!((r, min_amount), (BidRejection::TooLow, Some(1000)));

    // A retry with the same request id gets the first outcome and places nothing new.
    let first = c.bid("x", 1200, "dup").await;
    assert!(matches!(first, Reply::BidAccepted { bid_seq: 1, .. }));
    assert_eq!(c.bid("x", 5000, "dup").await, first);

    api(b.addr, "POST", "/api/auctions/x/pause", None).await;
    assert_eq!(reason(c.bid("x", 2000, "p").await), BidRejection::NotActive);
    api(b.addr, "POST", "/api/auctions/x/resume", None).await;
    let (_, ended) = api(b.addr, "POST", "/api/auctions/x/end", None).await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(reason(c.bid("x", 3000, "e").await), BidRejection::Ended);

    let mut anon = b.connect(None).await;
    assert_eq!(
        reason(anon.bid("x", 3000, "a").await),
        BidRejection::Unauthenticated
    );
    // The bucket held 12: carol's seven judged bids on `x` and the one on the unknown auction
    // took eight (the retry of `dup` took none, nor does an anonymous bid). Four more pass the
    // limiter (the auction is over), then the limiter says no.
    for i in 0..4 {
        assert_eq!(
            reason(c.bid("x", 4000, &format!("r{i}")).await),
            BidRejection::Ended
        );
    }
    assert_eq!(
        reason(c.bid("x", 4000, "rl").await),
        BidRejection::RateLimited
    );

    let log = all_bids(b.addr, "x").await;
    assert_eq!(
        log.len(),
        1,
        "only the one accepted bid was written: {log:?}"
    );
    assert_eq!(log[0]["amount"], 1200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_lifecycle_and_errors() {
    let b = TestBroker::start(fast_bidding).await;
    let mut spec = open_auction("adm", 600_000);
    let (status, _) = http(b.addr, "POST", "/api/auctions", &[], Some(spec.to_string())).await;
    assert_eq!(status, 401);
    spec["currency"] = json!("euros");
    assert_eq!(
        api(b.addr, "POST", "/api/auctions", Some(spec.clone()))
            .await
            .1["error"]["code"],
        "invalid_auction"
    );
    spec["currency"] = json!("EUR");
    // Scheduled for later: it can be changed until it starts.
    let start = spec["starts_at"].as_u64().unwrap() + 3_600_000;
    spec["starts_at"] = json!(start);
    spec["ends_at"] = json!(start + 60_000);
    assert_eq!(
        api(b.addr, "POST", "/api/auctions", Some(spec.clone()))
            .await
            .0,
        201
    );
    assert_eq!(
        api(b.addr, "POST", "/api/auctions", Some(spec.clone()))
            .await
            .0,
        409
    );
    let mut early = b.connect(None).await;
    early.subscribe("auction:adm").await;
    spec["title"] = json!("Renamed");
    let (status, updated) = api(b.addr, "PUT", "/api/auctions/adm", Some(spec.clone())).await;
    assert_eq!(
        (
            status.as_u16(),
            updated["title"].as_str(),
            updated["status"].as_str()
        ),
        (200, Some("Renamed"), Some("scheduled"))
    );
    let event = early.next_event().await;
    assert_eq!(event.event, "updated", "subscribers hear of the change");
    let mut fresh = b.connect(None).await;
    let Reply::Subscribed { state, .. } = fresh.subscribe("auction:adm").await else {
        panic!()
    };
    assert_eq!(
        state["title"], "Renamed",
        "and new subscribers get the new definition"
    );
    let mut past = spec.clone();
    past["ends_at"] = json!(1);
    assert_eq!(
        api(b.addr, "PUT", "/api/auctions/adm", Some(past)).await.1["error"]["code"],
        "invalid_auction"
    );
    assert_eq!(
        api(b.addr, "POST", "/api/auctions/adm/pause", None).await.1["error"]["code"],
        "wrong_status"
    );
    let mut watcher = b.connect(None).await;
    watcher.subscribe("auction:adm").await;
    let (_, cancelled) = api(b.addr, "POST", "/api/auctions/adm/cancel", None).await;
    assert_eq!(cancelled["status"], "cancelled");
    let event = watcher.next_event().await;
    assert_eq!(
        (
            event.event.as_str(),
            event.data.to_json()["status"].as_str()
        ),
        ("status_changed", Some("cancelled"))
    );
    assert_eq!(
        api(b.addr, "PUT", "/api/auctions/adm", Some(spec)).await.0,
        409
    );

    let (_, list) = api(b.addr, "GET", "/api/auctions", None).await;
    assert_eq!(list["auctions"][0]["auction_id"], "adm");
    assert_eq!(api(b.addr, "GET", "/api/auctions/none", None).await.0, 404);
    assert_eq!(
        api(b.addr, "GET", "/api/auctions/adm/bids?limit=0", None)
            .await
            .0,
        400
    );

    // Pagination of the bid history.
    create_auction(b.addr, "pg", 600_000).await;
    let mut c = b.connect(Some("dan")).await;
    for i in 0..5 {
        c.bid("pg", 1000 + i * 10, &format!("r{i}")).await;
    }
    let (_, page) = api(b.addr, "GET", "/api/auctions/pg/bids?after=1&limit=2", None).await;
    let seqs: Vec<u64> = page["bids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["seq"].as_u64().unwrap())
        .collect();
    assert_eq!((seqs, page["next_after"].as_u64()), (vec![2, 3], Some(3)));
    let (_, rest) = api(b.addr, "GET", "/api/auctions/pg/bids?after=3", None).await;
    assert_eq!(
        (
            rest["bids"].as_array().unwrap().len(),
            rest["next_after"].clone()
        ),
        (2, Value::Null)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_bids_survive_kill_9() {
    let data_dir = temp_dir("crash");
    let args = [
        "--api-key",
        API_KEY,
        "--bid-rate",
        "1000000",
        "--bid-burst",
        "1000000",
        "--client-rate",
        "1000000",
        "--client-burst",
        "1000000",
    ];
    let (mut child, addr) = spawn_broker_process(&args, &data_dir);
    assert_eq!(
        api(
            addr,
            "POST",
            "/api/auctions",
            Some(open_auction("crash", 600_000))
        )
        .await
        .0,
        201
    );

    // Twenty bidders bid as fast as they are answered; every acknowledgement is recorded the
    // moment it arrives.
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..20u64 {
        let user = format!("c{n}");
        let acked = Arc::clone(&acked);
        let mut c = TestClient::connect(addr, Some(&user), Format::MsgPack).await;
        tasks.push(tokio::spawn(async move {
            let mut acks = Acks::new();
            let mut next_min = 1000;
            for i in 0.. {
                let request_id = format!("{user}-{i}");
                let amount = next_min + (n as i64 % 7);
                c.send(gavel_broker::protocol::ClientFrame::PlaceBid {
                    id: i,
                    auction_id: "crash".into(),
                    amount,
                    request_id,
                    max_amount: None,
                })
                .await;
                let reply = loop {
                    match tokio::time::timeout(HANG, c.client.next()).await {
                        Ok(Ok(gavel_client::Incoming::Frame(ServerFrame::Ok { id, result })))
                            if id == i =>
                        {
                            break result
                        }
                        Ok(Ok(gavel_client::Incoming::Frame(ServerFrame::Error(e)))) => {
                            panic!("error frame: {e:?}")
                        }
                        Ok(Ok(gavel_client::Incoming::Frame(_))) => continue,
                        _ => return (user, acks), // the broker died
                    }
                };
                match reply {
                    Reply::BidAccepted {
                        bid_seq,
                        next_min_bid,
                        ..
                    } => {
                        acks.insert(bid_seq, amount);
                        acked.fetch_add(1, Ordering::Relaxed);
                        next_min = next_min_bid;
                    }
                    Reply::BidRejected {
                        min_amount, reason, ..
                    } => {
                        assert_eq!(reason, BidRejection::TooLow, "unexpected rejection");
                        next_min = min_amount.unwrap_or(next_min)
                    }
                    other => panic!("{other:?}"),
                }
            }
            (user, acks)
        }));
    }
    eventually("bids are flowing", || {
        let acked = Arc::clone(&acked);
        async move { acked.load(Ordering::Relaxed) >= 300 }
    })
    .await;
    child.kill().expect("SIGKILL"); // kill -9, mid-stream
    let _ = child.wait();
    let mut acks = HashMap::new();
    for task in tasks {
        let (user, user_acks) = task.await.unwrap();
        acks.insert(user, user_acks);
    }
    let total: usize = acks.values().map(|a| a.len()).sum();

    let (mut child, addr) = spawn_broker_process(&args, &data_dir);
    let log = all_bids(addr, "crash").await;
    assert!(
        log.len() >= total,
        "the log ({}) holds at least every acknowledged bid ({total})",
        log.len()
    );
    for (user, user_acks) in &acks {
        for (seq, amount) in user_acks {
            let entry = &log[*seq as usize - 1];
            assert_eq!(
                (entry["user"].as_str(), entry["amount"].as_i64()),
                (Some(user.as_str()), Some(*amount)),
                "acknowledged bid {seq} survived"
            );
        }
    }
    for (i, bid) in log.iter().enumerate() {
        assert_eq!(bid["seq"].as_u64(), Some(i as u64 + 1));
    }
    let (_, state) = api(addr, "GET", "/api/auctions/crash", None).await;
    let last = log.last().unwrap();
    assert_eq!(
        (
            state["bid_count"].as_u64(),
            &state["price"],
            &state["leader"]
        ),
        (Some(log.len() as u64), &last["amount"], &last["user"])
    );
    // And bidding goes on from there.
    let mut c = TestClient::connect(addr, Some("after"), Format::MsgPack).await;
    let min = state["next_min_bid"].as_i64().unwrap();
    assert!(
        matches!(c.bid("crash", min, "after-1").await, Reply::BidAccepted { bid_seq, .. } if bid_seq == log.len() as u64 + 1)
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A retry gets the first answer whatever happened since: a `not_active` from a paused auction
/// stays `not_active` after it resumes (no bid is placed), and retries take no token of the
/// bidder's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_resume_gets_the_same_rejection_and_costs_no_token() {
    let b = TestBroker::start(|c| {
        c.bid_rate = 0.001;
        c.bid_burst = 3;
    })
    .await;
    create_auction(b.addr, "y", 600_000).await;
    let mut c = b.connect(Some("dan")).await;
    api(b.addr, "POST", "/api/auctions/y/pause", None).await;
    let paused = c.bid("y", 1000, "while-paused").await;
    assert!(matches!(
        paused,
        Reply::BidRejected {
            reason: BidRejection::NotActive,
            ..
        }
    ));
    api(b.addr, "POST", "/api/auctions/y/resume", None).await;
    for _ in 0..5 {
        assert_eq!(c.bid("y", 1000, "while-paused").await, paused);
    }
    // Two tokens are left of three: the retries took none.
    assert!(matches!(
        c.bid("y", 1000, "a").await,
        Reply::BidAccepted { bid_seq: 1, .. }
    ));
    assert!(matches!(
        c.bid("y", 1100, "b").await,
        Reply::BidAccepted { bid_seq: 2, .. }
    ));
    assert!(matches!(
        c.bid("y", 1200, "c").await,
        Reply::BidRejected {
            reason: BidRejection::RateLimited,
            ..
        }
    ));
    assert_eq!(all_bids(b.addr, "y").await.len(), 2);
}

#[tokio::test]
async fn buy_now_ends_the_auction_at_its_price_and_a_required_role_keeps_others_out() {
    let b = TestBroker::start(fast_bidding).await;
    let mut spec = open_auction("bn", 600_000);
    spec["buy_now"] = json!(5000);
    spec["required_role"] = json!("verified");
    let (status, body) = api(b.addr, "POST", "/api/auctions", Some(spec)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (&body["buy_now"], &body["required_role"]),
        (&json!(5000), &json!("verified"))
    );

    // A bidder without the role is refused (and nothing is written).
    let plain = token_with("plain", Some(vec!["bidder".into()]), None, 3600);
    let mut outsider = TestClient::connect_with(b.addr, Some(plain), Format::MsgPack).await;
    match outsider.bid("bn", 2000, "o1").await {
        Reply::BidRejected {
            reason, message, ..
        } => {
            assert_eq!(reason, BidRejection::Forbidden);
            assert!(message.contains("verified"), "{message}");
        }
        other => panic!("expected forbidden, got {other:?}"),
    }

    let verified = token_with(
        "vera",
        Some(vec!["bidder".into(), "verified".into()]),
        None,
        3600,
    );
    let mut vera = TestClient::connect_with(b.addr, Some(verified), Format::MsgPack).await;
    let mut watcher = b.connect(Some("watcher")).await;
    watcher.subscribe("auction:bn").await;
    // Above the buy-now price: placed at exactly that price, and the auction ends at once.
    match vera.bid("bn", 7000, "v1").await {
        Reply::BidAccepted { amount, price, .. } => assert_eq!((amount, price), (5000, 5000)),
        other => panic!("expected the buy-now bid accepted, got {other:?}"),
    }
    let mut seen = Vec::new();
    while !seen.contains(&"ended".to_owned()) {
        let event = watcher.next_event().await;
        if event.event == "ended" {
            assert_eq!(event.data.to_json()["winner"], "vera");
            assert_eq!(event.data.to_json()["final_price"], 5000);
        }
        seen.push(event.event);
    }
    // The final leaderboard comes before the end, as at any end: nothing follows `ended`.
    assert_eq!(
        seen,
        ["bid_placed", "leaderboard", "status_changed", "ended"],
        "the buy-now turn's events"
    );
    let (_, auction) = api(b.addr, "GET", "/api/auctions/bn", None).await;
    assert_eq!(auction["status"], "ended");
    assert!(
        auction.get("buy_now").is_none(),
        "no buy-now once ended: {auction}"
    );
    match vera.bid("bn", 8000, "v2").await {
        Reply::BidRejected { reason, .. } => assert_eq!(reason, BidRejection::Ended),
        other => panic!("expected ended, got {other:?}"),
    }
}

/// `GET /api/auctions/{id}` is the auction's snapshot at its last change: a rejected bid writes
/// nothing and moves nothing, `server_ts` included (docs/protocol.md §5.6.1).
#[tokio::test]
async fn a_rejected_bid_leaves_the_snapshot_as_it_was() {
    let b = TestBroker::start(fast_bidding).await;
    create_auction(b.addr, "ts1", 600_000).await;
    let mut ann = b.connect(Some("ann")).await;
    assert!(matches!(
        ann.bid("ts1", 1000, "a1").await,
        Reply::BidAccepted { .. }
    ));
    let (_, before) = api(b.addr, "GET", "/api/auctions/ts1", None).await;
    // Let the clock move, so that a snapshot taken now would differ.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    match ann.bid("ts1", 1000, "a2").await {
        Reply::BidRejected { reason, .. } => assert_eq!(reason, BidRejection::TooLow),
        other => panic!("expected too_low, got {other:?}"),
    }
    let (_, after) = api(b.addr, "GET", "/api/auctions/ts1", None).await;
    assert_eq!(after, before);
}
