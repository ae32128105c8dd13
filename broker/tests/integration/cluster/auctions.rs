//! Auctions across a cluster: one bid order for every node, bids refused while Redis is gone,
//! buy-now ending an auction everywhere, and proxy bidding with its maxima in Redis.

use super::*;
use crate::auctions::{bidder, check_log, Acks};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_bidders_on_three_nodes_bid_in_one_cluster_wide_order() {
    let cluster = Cluster::start(3).await;
    // Created on node 0; every node knows it.
    cluster.create_auction(0, "shared").await;
    let mut viewers = Vec::new();
    for node in 0..3 {
        let mut v = cluster.connect(node, None).await;
        v.subscribe("auction:shared").await;
        viewers.push(v);
    }
    let mut tasks = Vec::new();
    for n in 0..30 {
        let user = format!("b{n}");
        let c = cluster.connect(n % 3, Some(&user)).await;
        tasks.push((
            user.clone(),
            tokio::spawn(bidder(c, "shared".to_owned(), user, 8, n as u64)),
        ));
    }
    let mut acks: HashMap<String, Acks> = HashMap::new();
    for (user, task) in tasks {
        acks.insert(user, task.await.unwrap());
    }
    // The log (read through any node) is gap-free and strictly increasing, every ack is in it.
    let accepted = check_log(cluster.addr(1), "shared", &acks).await;
    // How many get in depends on the interleaving (26 seen on a loaded machine, against 30 or
    // more usually). What is certain: each of a bidder's bids after its first either is
    // accepted or was outbid by one accepted after its previous bid was judged, so at least 7
    // of one bidder's 8 bids account for distinct accepted bids.
    assert!(accepted >= 7, "bids were accepted: {accepted}");
    assert_eq!(all_bids(cluster.addr(2), "shared").await.len(), accepted);
    // Every node's viewers saw the same bids, in seq order, with rising amounts.
    let mut streams = Vec::new();
    for v in viewers.iter_mut() {
        let mut bids = Vec::new();
        while bids.len() < accepted {
            let e = v.next_event().await;
            if e.event == "bid_placed" {
                bids.push((
                    e.data.to_json()["bid_seq"].as_u64().unwrap(),
                    e.data.to_json()["amount"].as_i64().unwrap(),
                ));
            }
        }
        assert!(bids
            .windows(2)
            .all(|w| w[0].0 + 1 == w[1].0 && w[0].1 < w[1].1));
        streams.push(bids);
    }
    assert!(streams.iter().all(|s| *s == streams[0]));
    // An idempotent retry on another node gets exactly the first answer.
    let (user, user_acks) = acks.iter().find(|(_, a)| !a.is_empty()).unwrap();
    let (seq, amount) = user_acks.iter().next().map(|(s, a)| (*s, *a)).unwrap();
    let n: usize = user[1..].parse().unwrap();
    let log = all_bids(cluster.addr(0), "shared").await;
    let request_id = log[seq as usize - 1]["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut retry = cluster.connect((n + 1) % 3, Some(user)).await;
    match retry.bid("shared", amount, &request_id).await {
        Reply::BidAccepted {
            bid_seq,
            amount: got,
            ..
        } => assert_eq!((bid_seq, got), (seq, amount)),
        other => panic!("a retry got {other:?}"),
    }
    assert_eq!(
        all_bids(cluster.addr(0), "shared").await.len(),
        accepted,
        "the retry added nothing"
    );
    // One winner, the same on every node.
    api(cluster.addr(2), "POST", "/api/auctions/shared/end", None).await;
    let last = log.last().unwrap();
    for node in 0..3 {
        eventually("the end reaches every node", || async {
            let (_, state) = api(cluster.addr(node), "GET", "/api/auctions/shared", None).await;
            state["status"] == "ended" && state["leader"] == last["user"]
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_bids_are_refused_and_nodes_unready_until_it_returns() {
    let mut cluster = Cluster::start(3).await;
    cluster.create_auction(0, "outage").await;
    let mut viewer = cluster.connect(2, None).await;
    viewer.subscribe("auction:outage").await;
    let mut bidder = cluster.connect(1, Some("steady")).await;
    let Reply::BidAccepted { bid_seq: 1, .. } = bidder.bid("outage", 1000, "r1").await else {
        panic!("first bid")
    };

    cluster.redis.kill();
    for node in 0..3 {
        cluster.wait_ready(node, false).await;
    }
    match bidder.bid("outage", 1100, "r2").await {
        Reply::BidRejected {
            reason: BidRejection::ClusterUnavailable,
            ..
        } => {}
        other => panic!("a bid without Redis got {other:?}"),
    }
    let (status, body) = cluster
        .publish(0, "auction:outage", "note", json!({"n": 1}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("cluster_unavailable"))
    );
    // Local operations still work: the connection answers pings.
    let reply = bidder
        .request(|id| ClientFrame::Ping { id })
        .await
        .expect("pong");
    assert!(matches!(reply, Reply::Pong { .. }));

    cluster.redis.restart();
    for node in 0..3 {
        cluster.wait_ready(node, true).await;
    }
    // The bid acknowledged before the outage survived (Redis's append-only file).
    let log = all_bids(cluster.addr(0), "outage").await;
    assert_eq!(log.len(), 1);
    // Bidding works again, without restarting a broker, and the viewer (resubscribed by its
    // node) sees it.
    let Reply::BidAccepted { bid_seq: 2, .. } = bidder.bid("outage", 1100, "r3").await else {
        panic!("a bid after the outage")
    };
    loop {
        let e = viewer.next_event().await;
        if e.event == "bid_placed" && e.data.to_json()["bid_seq"] == 2 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buy_now_on_one_node_ends_the_auction_on_every_node() {
    let cluster = Cluster::start(2).await;
    let mut spec = open_auction("bn", 600_000);
    spec["buy_now"] = json!(5000);
    let (status, body) = api(cluster.addr(0), "POST", "/api/auctions", Some(spec)).await;
    assert_eq!(status, 201, "{body}");
    eventually("the auction reaches node 1", || async {
        api(cluster.addr(1), "GET", "/api/auctions/bn", None)
            .await
            .0
            == 200
    })
    .await;
    let mut buyer = cluster.connect(1, Some("buyer")).await;
    // Until node 1 has taken the auction up it answers `unavailable`: retry with the same
    // request id, as a client does (docs/protocol.md §4.10).
    let mut tries = 0;
    loop {
        match buyer.bid("bn", 9000, "b1").await {
            Reply::BidAccepted { amount, .. } => {
                assert_eq!(amount, 5000);
                break;
            }
            Reply::BidRejected {
                reason: BidRejection::Unavailable,
                ..
            } if tries < 100 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => panic!("expected the buy-now bid accepted, got {other:?}"),
        }
    }
    for node in 0..2 {
        eventually("the sale reaches every node", || async {
            let (_, state) = api(cluster.addr(node), "GET", "/api/auctions/bn", None).await;
            state["status"] == "ended" && state["leader"] == "buyer" && state["price"] == 5000
        })
        .await;
    }
    let mut late = cluster.connect(0, Some("late")).await;
    for tries in 0.. {
        match late.bid("bn", 9500, "l1").await {
            Reply::BidRejected {
                reason: BidRejection::Unavailable,
                ..
            } if tries < 100 => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            Reply::BidRejected { reason, .. } => {
                assert_eq!(reason, BidRejection::Ended);
                break;
            }
            other => panic!("expected ended, got {other:?}"),
        }
    }
}

/// Proxy bidding's acceptance in a cluster: 2,000 random sequences, each sequence's bidders
/// split over two nodes (the maxima live in the auction record in Redis), checked bid by bid
/// against the reference model and read back from the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_bidding_matches_the_reference_across_two_nodes() {
    let cluster = Cluster::start(2).await;
    // A fifth of the one-node test's sequences: what this adds is the second node (every
    // sequence alternates its bidders between them), and each costs Redis round trips; at the
    // full count it was the suite's longest test (about 150-270 s on two busy cores).
    crate::proxy::run_sequences(
        vec![cluster.addr(0), cluster.addr(1)],
        crate::proxy::SEQUENCES / 5,
    )
    .await;
}

/// Webhooks in a cluster: the outbox is in Redis, written with the turn that ended the auction,
/// so a webhook outlives the node that wrote it (killed with SIGKILL while the receiver was
/// down) and another node delivers it, signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_auctions_webhook_outlives_the_node_that_wrote_it() {
    use crate::webhooks::{receiver_not_yet_listening, webhook_flags, Receiver, SECRET};
    let (port, url) = receiver_not_yet_listening();
    let flags = webhook_flags(&url);
    let mut cluster = Cluster::start_with(2, &flags).await;
    create_auction(cluster.addr(0), "cw1", 1_500).await;
    let mut ann = cluster.connect(0, Some("ann")).await;
    assert!(matches!(
        ann.bid("cw1", 1200, "a1").await,
        Reply::BidAccepted { .. }
    ));
    eventually("cw1 ended and its webhook failed once", || async {
        let view = api(cluster.addr(0), "GET", "/api/auctions/cw1", None)
            .await
            .1;
        view["status"] == "ended" && view["webhooks"]["pending"][0]["attempts"].as_u64() >= Some(1)
    })
    .await;
    cluster.nodes[0].0.kill().expect("SIGKILL");
    let receiver = Receiver::start(tokio::net::TcpListener::bind(port).await.unwrap(), 0).await;
    eventually("node 1 delivers it", || async {
        receiver.delivered().contains_key("auction.ended/cw1")
    })
    .await;
    let got = receiver.got();
    assert!(gavel_broker::webhooks::verify(
        SECRET.as_bytes(),
        &got[0].signature,
        &got[0].body
    ));
    let end: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(
        (
            end["data"]["winner"].clone(),
            end["data"]["final_price"].clone()
        ),
        (json!("ann"), json!(1200))
    );
    eventually("nothing pending on node 1", || async {
        api(cluster.addr(1), "GET", "/api/auctions/cw1", None)
            .await
            .1["webhooks"]["pending"]
            == json!([])
    })
    .await;
}
