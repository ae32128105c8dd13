//! Graceful shutdown: every client gets close code 1001 after its queued frames.

use std::process::Command;

use gavel_broker::protocol::Format;
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
    let mut child = child;

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = TestClient::connect(addr, None, Format::MsgPack).await;
        c.subscribe("broadcast").await;
        clients.push(c);
    }
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
    let _ = std::fs::remove_dir_all(&data_dir);
}
