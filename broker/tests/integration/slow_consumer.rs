//! A subscriber that stops reading is disconnected as a slow consumer, and nobody else notices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gavel_client::{Client, ConnectOptions};
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_is_cut_off_while_a_hundred_others_get_everything() {
    const OTHERS: usize = 100;
    const BATCH: u64 = 25;
    const MAX_EVENTS: u64 = 4000;
    let b = TestBroker::start(|c| {
        c.outbound_queue = 32;
        c.write_timeout = Duration::from_secs(2);
    })
    .await;
    let room = channel("auction:slow");

    // The slow one: a tiny receive buffer, subscribed, then it never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(b.addr).await.unwrap();
    let client = Client::handshake(stream, b.addr, ConnectOptions::default())
        .await
        .unwrap();
    let mut slow = TestClient::after_connect(client).await;
    slow.subscribe("auction:slow").await;

    // A hundred readers that record the last seq seen and check order as they go.
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..OTHERS).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::new();
    for i in 0..OTHERS {
        let mut c = b.connect(None).await;
        c.subscribe("auction:slow").await;
        let progress = Arc::clone(&progress);
        readers.push(tokio::spawn(async move {
            let mut last = 0;
            loop {
                let event = c.next_event().await;
                assert_eq!(event.seq, last + 1, "reader {i} saw a gap or reordering");
                last = event.seq;
                progress[i].store(last, Ordering::Release);
                if event.event == "done" {
                    return last;
                }
            }
        }));
    }

    // Publish 8 KB events in batches, letting the healthy readers keep up, until the broker
    // has cut the slow reader off.
    let payload = "x".repeat(8 * 1024);
    let mut published = 0;
    while published < MAX_EVENTS {
        for _ in 0..BATCH {
            b.broker
                .publish(&room, "bid_placed", json!({ "pad": payload }));
            published += 1;
        }
        let target = published;
        eventually("healthy readers keep up", || {
            let progress = Arc::clone(&progress);
            async move { progress.iter().all(|p| p.load(Ordering::Acquire) >= target) }
        })
        .await;
        let room_info = b.broker.rooms().get(&room).unwrap().viewer_counts();
        if room_info.connections as usize == OTHERS {
            break;
        }
    }
    assert!(
        published < MAX_EVENTS,
        "the slow reader was never disconnected"
    );

    let last = b.broker.publish(&room, "done", json!(null)).seq;
    for reader in readers {
        assert_eq!(
            reader.await.unwrap(),
            last,
            "every healthy reader got every event"
        );
    }
    // The slow reader's stream ends: with close code 4001 if it could still be written, or
    // cut without one when its socket was stalled.
    let code = slow.closed().await;
    assert!(matches!(code, Some(4001) | None), "got close code {code:?}");
    let (_, metrics) = b.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gavel_slow_consumer_disconnects_total") && !l.ends_with(" 0")),
        "the disconnect is counted"
    );
}
