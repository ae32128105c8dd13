//! Graceful shutdown: every client gets close code 1001 after its queued frames. Also the
//! binary's own runtime (`--worker-threads`).

use std::process::Command;

use gavel_broker::protocol::{ClientFrame, Format, ServerFrame};
use gavel_client::Incoming;
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_shutdown_drains_then_closes_with_1001() {
    let b = TestBroker::start(|_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = b.connect(None).await;
        c.subscribe("auction:bye").await;
        clients.push(c);
    }
    for i in 0..50 {
        b.broker
            .publish(&channel("auction:bye"), "last_words", json!(i));
    }
    b.broker.shutdown().await;
    for mut c in clients {
        for expected in 1..=50 {
            assert_eq!(
                c.next_event().await.seq,
                expected,
                "queued events are drained first"
            );
        }
        assert_eq!(c.closed().await, Some(1001));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001_and_exits_zero() {
    let data_dir = temp_dir("sigterm");
    let (child, addr) = spawn_broker_process(&[], &data_dir);

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = TestClient::connect(addr, None, Format::MsgPack).await;
        c.subscribe("broadcast").await;
        clients.push(c);
    }
    terminate(child, clients).await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// SIGTERM to a broker process: each of `clients` gets close code 1001, and the process exits 0.
async fn terminate(mut child: KillOnDrop, clients: Vec<TestClient>) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for mut c in clients {
        assert_eq!(c.closed().await, Some(1001));
    }
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

/// `--worker-threads 1`: the binary runs one tokio worker, serves on it, and shuts down as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_on_as_many_workers_as_it_is_told() {
    let data_dir = temp_dir("one-worker");
    let (child, addr) =
        spawn_broker_process(&["--worker-threads", "1", "--api-key", API_KEY], &data_dir);
    // tokio's blocking-pool threads share the workers' name, but the broker starts none (it
    // has no `spawn_blocking` and no `tokio::fs`): every thread so named is a worker.
    let workers = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("tokio-rt-worker"))
        .count();
    assert_eq!(workers, 1, "tokio worker threads");

    let mut viewer = TestClient::connect(addr, None, Format::MsgPack).await;
    viewer.subscribe("broadcast").await;
    let (status, body) = api(
        addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": "broadcast", "event": "hello", "data": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(viewer.next_event().await.event, "hello");

    terminate(child, vec![viewer]).await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Bids queued when shutdown begins are all answered before the connection closes with 1001:
/// the auctions drain first, while the connections that wait for the answers are open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_queued_bid_before_closing() {
    let b = TestBroker::start(|c| {
        c.bid_rate = 1e6;
        c.bid_burst = 1_000_000;
        c.client_rate = 1e6;
        c.client_burst = 10_000;
    })
    .await;
    create_auction(b.addr, "last", 600_000).await;
    let mut bidder = b.connect(Some("ann")).await;
    const BIDS: u64 = 300;
    for i in 0..BIDS {
        bidder
            .send(ClientFrame::PlaceBid {
                id: i,
                auction_id: "last".into(),
                amount: 1000 + 10 * i as i64,
                request_id: format!("r{i}"),
                max_amount: None,
            })
            .await;
    }
    // A ping after the bids: once its pong is back, the broker has read every bid (a
    // connection's requests are read in order) and handed it to the auction.
    bidder.send(ClientFrame::Ping { id: BIDS }).await;
    let mut answered = 0;
    loop {
        match tokio::time::timeout(HANG, bidder.client.next())
            .await
            .expect("hang")
        {
            Ok(Incoming::Frame(ServerFrame::Ok { id, .. })) if id == BIDS => break,
            Ok(Incoming::Frame(ServerFrame::Ok { .. })) => answered += 1,
            Ok(Incoming::Frame(_)) => {}
            other => panic!("before shutdown: {other:?}"),
        }
    }
    b.broker.shutdown().await;
    loop {
        match tokio::time::timeout(HANG, bidder.client.next())
            .await
            .expect("hang")
        {
            Ok(Incoming::Frame(ServerFrame::Ok { .. })) => answered += 1,
            Ok(Incoming::Frame(_)) => {}
            Ok(Incoming::Closed { code, .. }) => {
                assert_eq!(code, 1001);
                break;
            }
            Err(error) => panic!("connection lost without a close: {error}"),
        }
    }
    assert_eq!(
        answered, BIDS,
        "every bid sent before shutdown was answered"
    );
}
