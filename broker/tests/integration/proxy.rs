//! Proxy (maximum) bidding through whole brokers: 10,000 random bid sequences, each on its own
//! auction with a random increment table, placed over real WebSockets and checked bid by bid
//! against the reference model (`gavel_broker::auction::rules::ProxyReference`). The cluster
//! run (in `cluster::auctions`) spreads each sequence's bidders over two nodes, so the maxima
//! must live in Redis. Plus what users see: automatic bids in `bid_placed` and the bid log, and
//! maxima nowhere public.

use std::net::SocketAddr;
use std::sync::Arc;

use gavel_broker::auction::rules::{AuctionSpec, ProxyReference};
use gavel_broker::protocol::{BidRejection, ClientFrame, Format, Reply, UserId};
use serde_json::{json, Value};

use crate::common::*;

/// Sequences in the acceptance runs, and how many run at once.
pub const SEQUENCES: u64 = 10_000;
const WORKERS: u64 = 40;
const BIDDERS: usize = 5;

/// A small deterministic generator (xorshift64*), so a failure names a reproducible sequence.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Sequence `n`'s auction: open now, a random fixed or tiered increment (steps never shrink),
/// a reserve one time in three.
fn auction_for(n: u64, rng: &mut Rng) -> Value {
    let mut auction = open_auction(&format!("px{n}"), 600_000);
    auction["increment"] = match rng.below(3) {
        0 => json!({ "fixed": 1 + rng.below(300) }),
        _ => {
            let (a, b, c) = (1 + rng.below(50), 1 + rng.below(200), 1 + rng.below(300));
            let (f1, f2) = (1000 + rng.below(3000), 4000 + rng.below(10_000));
            json!({ "tiers": [
                { "from": 0, "step": a },
                { "from": f1, "step": a + b },
                { "from": f2, "step": a + b + c },
            ] })
        }
    };
    if rng.below(3) == 0 {
        auction["reserve"] = json!(1000 + rng.below(20_000));
    }
    auction
}

/// Places one bid, retrying while the answer is transient (a cluster node that has not taken up
/// a new auction within a second answers `unavailable`; a retry with the same request id is
/// safe).
async fn place(client: &mut TestClient, frame: impl Fn(u64) -> ClientFrame) -> Reply {
    for _ in 0..200 {
        let reply = client
            .request(&frame)
            .await
            .expect("place_bid is answered with ok");
        match &reply {
            Reply::BidRejected { reason, .. } if reason.is_transient() => {
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
            _ => return reply,
        }
    }
    panic!("a bid stayed unavailable for 6 s");
}

/// One sequence, bid by bid against the reference; bidder `k` talks to `nodes[k % len]`.
async fn run_sequence(n: u64, nodes: &[SocketAddr], clients: &mut [TestClient]) {
    let mut rng = Rng::new(n);
    let definition = auction_for(n, &mut rng);
    let (status, body) = api(nodes[0], "POST", "/api/auctions", Some(definition.clone())).await;
    assert_eq!(status, 201, "{body}");
    let spec: AuctionSpec = serde_json::from_value(definition).expect("an AuctionSpec");
    let auction_id = spec.id.clone();
    let mut reference = ProxyReference::new(spec);
    let steps = 1 + rng.below(12);
    for step in 0..steps {
        let who = rng.below(BIDDERS as u64) as usize;
        let user = UserId::parse(&format!("pb{who}")).unwrap();
        let min = reference.next_min_bid();
        let amount = match rng.below(6) {
            0 => min - 1 - rng.below(20) as i64,
            1 => min + rng.below(2000) as i64,
            _ => min,
        };
        let max = (rng.below(10) < 6).then(|| amount + rng.below(20_000) as i64);
        let expected = reference.bid(&user, amount, max);
        let request_id = format!("s{n}-{step}");
        let auction = auction_id.clone();
        let reply = place(&mut clients[who], |id| ClientFrame::PlaceBid {
            id,
            auction_id: auction.clone(),
            amount,
            request_id: request_id.clone(),
            max_amount: max,
        })
        .await;
        let context = format!("sequence {n} bid {step}: {user} {amount} max {max:?}");
        match reply {
            Reply::BidAccepted {
                price,
                leading,
                max_amount,
                ..
            } => {
                assert!(expected, "{context}: accepted, the reference refuses");
                assert_eq!(Some(price), reference.price, "{context}");
                assert_eq!(
                    leading,
                    reference.leader.as_ref() == Some(&user),
                    "{context}"
                );
                if leading && max.is_some() {
                    assert_eq!(max_amount, reference.max_of(&user), "{context}");
                }
            }
            Reply::BidRejected { reason, .. } => {
                assert!(
                    !expected,
                    "{context}: refused ({reason:?}), the reference accepts"
                );
                assert!(
                    matches!(reason, BidRejection::TooLow | BidRejection::InvalidAmount),
                    "{context}: {reason:?}"
                );
            }
            other => panic!("{context}: {other:?}"),
        }
    }
    // The auction as the last node shows it (in a cluster, once the commit reached it): the
    // reference's price and leader. (Every sequence on one node; every 20th in a cluster, where
    // the wait for the other node's view dominates the run.)
    if nodes.len() > 1 && !n.is_multiple_of(20) {
        return;
    }
    let last = nodes[nodes.len() - 1];
    let path = format!("/api/auctions/{auction_id}");
    let want = (reference.price, reference.leader.map(|l| l.to_string()));
    eventually(
        &format!("sequence {n} shows {want:?} on {last}"),
        || async {
            let (status, view) = api(last, "GET", &path, None).await;
            status == 200
                && (
                    view["price"].as_i64(),
                    view["leader"].as_str().map(str::to_owned),
                ) == want
        },
    )
    .await;
}

/// Runs `count` sequences over `nodes`, `WORKERS` at a time, each worker with its own bidders.
pub async fn run_sequences(nodes: Vec<SocketAddr>, count: u64) {
    let nodes = Arc::new(nodes);
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let nodes = Arc::clone(&nodes);
        workers.push(tokio::spawn(async move {
            let mut clients = Vec::new();
            for k in 0..BIDDERS {
                let addr = nodes[k % nodes.len()];
                clients.push(
                    TestClient::connect(addr, Some(&format!("pb{k}")), Format::MsgPack).await,
                );
            }
            let mut n = worker;
            while n < count {
                run_sequence(n, &nodes, &mut clients).await;
                n += WORKERS;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("a worker panicked");
    }
}

fn fast_bids(config: &mut gavel_broker::Config) {
    config.bid_rate = 1_000_000.0;
    config.bid_burst = 1_000_000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_bidding_matches_the_reference_on_one_node() {
    let broker = TestBroker::start(fast_bids).await;
    run_sequences(vec![broker.addr], SEQUENCES).await;
}

#[tokio::test]
async fn automatic_bids_are_announced_and_logged_and_maxima_stay_private() {
    let broker = TestBroker::start(fast_bids).await;
    create_auction(broker.addr, "pv1", 600_000).await;
    let mut viewer = broker.connect(None).await;
    viewer.subscribe("auction:pv1").await;
    let mut ann = broker.connect(Some("ann")).await;
    let mut bob = broker.connect(Some("bob")).await;
    let secret = 987_650;
    let first = ann
        .request(|id| ClientFrame::PlaceBid {
            id,
            auction_id: "pv1".into(),
            amount: 1000,
            request_id: "a1".into(),
            max_amount: Some(secret),
        })
        .await
        .unwrap();
    assert!(
        matches!(first, Reply::BidAccepted { leading: true, max_amount: Some(m), price: 1000, .. } if m == secret),
        "{first:?}"
    );
    // Bob's plain bid is answered at once by Ann's maximum, one increment (10) above it.
    let answer = bob.bid("pv1", 5000, "b1").await;
    assert!(
        matches!(
            answer,
            Reply::BidAccepted {
                bid_seq: 2,
                amount: 5000,
                price: 5010,
                leading: false,
                max_amount: None,
                ..
            }
        ),
        "{answer:?}"
    );
    let mut placed = Vec::new();
    while placed.len() < 3 {
        let event = viewer.next_event().await;
        if event.event == "bid_placed" {
            assert!(
                !event.data.to_json().to_string().contains("987650"),
                "{:?}",
                event.data
            );
            placed.push((
                event.data.to_json()["bidder"].as_str().unwrap().to_owned(),
                event.data.to_json()["amount"].as_i64().unwrap(),
                event.data.to_json()["automatic"].as_bool().unwrap(),
            ));
        }
    }
    assert_eq!(
        placed,
        vec![
            ("ann".into(), 1000, false),
            ("bob".into(), 5000, false),
            ("ann".into(), 5010, true),
        ]
    );
    // The log shows the automatic bid, never a maximum; the state and the API neither.
    let bids = all_bids(broker.addr, "pv1").await;
    assert_eq!(bids.len(), 3);
    assert_eq!(bids[2]["automatic"], true);
    let (_, auction) = api(broker.addr, "GET", "/api/auctions/pv1", None).await;
    for public in [Value::Array(bids), auction] {
        assert!(!public.to_string().contains("987650"), "{public}");
    }
    // A retry of Bob's bid gets the first answer again, and places nothing.
    let again = bob.bid("pv1", 5000, "b1").await;
    assert_eq!(again, answer);
    assert_eq!(all_bids(broker.addr, "pv1").await.len(), 3);
}
