//! Viewer counts: connections vs unique users, peaks, coalesced updates, heartbeat cleanup.

use std::time::{Duration, Instant};

use gavel_broker::protocol::{Reply, ServerFrame, UserId};
use serde_json::{json, Value};

use crate::common::*;

async fn counts(b: &TestBroker, room: &str) -> (u64, u64) {
    let (status, body) = b.get(&format!("/api/rooms/{room}")).await;
    if status != 200 {
        return (0, 0);
    }
    let get = |k: &str| body[k].as_u64().unwrap_or(0);
    (get("connections"), get("users"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_tabs_of_one_user_are_one_viewer_until_they_close() {
    let b = TestBroker::start(|_| {}).await;
    let mut watcher = b.connect(Some("bob")).await;
    watcher.subscribe("auction:9").await;
    let mut tabs = Vec::new();
    for _ in 0..5 {
        let mut tab = b.connect(Some("alice")).await;
        tab.subscribe("auction:9").await;
        tabs.push(tab);
    }
    assert_eq!(counts(&b, "auction:9").await, (6, 2));

    // The watcher sees coalesced viewer updates that settle on 6 connections / 2 users.
    loop {
        if let ServerFrame::Viewers { viewers, .. } = watcher.recv().await {
            if (viewers.connections, viewers.users) == (6, 2) {
                assert_eq!(viewers.peak_users, 2);
                break;
            }
        }
    }
    // Presence lists each user once.
    let presence = watcher
        .request(|id| gavel_broker::protocol::ClientFrame::Presence {
            id,
            channel: channel("auction:9"),
            limit: None,
        })
        .await
        .unwrap();
    let Reply::Presence(p) = presence else {
        panic!("{presence:?}")
    };
    let users: Vec<&str> = p.users.iter().map(|u| u.as_str()).collect();
    assert_eq!(users, ["alice", "bob"]);

    // Four tabs close: alice is still there.
    for mut tab in tabs.drain(1..) {
        tab.client.close(1000).await.unwrap();
        assert_eq!(tab.closed().await, Some(1000));
    }
    eventually("four tabs gone", || async {
        counts(&b, "auction:9").await == (2, 2)
    })
    .await;
    // The last one closes: alice is gone.
    let mut last = tabs.pop().unwrap();
    last.client.close(1000).await.unwrap();
    last.closed().await;
    eventually("alice gone", || async {
        counts(&b, "auction:9").await == (1, 1)
    })
    .await;
    let (_, body) = b.get("/api/rooms/auction:9").await;
    assert_eq!(body["peak_connections"], Value::from(6));
}

/// Pings every 100 ms; a connection silent for 500 ms is closed.
fn fast_heartbeat(c: &mut gavel_broker::Config) {
    c.ping_interval = Duration::from_millis(100);
    c.idle_timeout = Duration::from_millis(500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_dropped_after_the_heartbeat_timeout() {
    let b = TestBroker::start(fast_heartbeat).await;
    // A live viewer that keeps reading (and so answers pings).
    let mut live = b.connect(Some("bob")).await;
    live.subscribe("auction:hb").await;
    let live_reader = tokio::spawn(async move {
        loop {
            live.recv().await;
        }
    });
    // Five tabs of alice that go silent: their sockets stay open but nothing is read or sent,
    // like a laptop that lost its network without closing anything.
    let mut silent = Vec::new();
    for _ in 0..5 {
        let mut tab = b.connect(Some("alice")).await;
        tab.subscribe("auction:hb").await;
        silent.push(tab);
    }
    assert_eq!(counts(&b, "auction:hb").await, (6, 2));
    eventually("silent tabs dropped", || async {
        counts(&b, "auction:hb").await == (1, 1)
    })
    .await;
    assert_eq!(
        b.broker.user_connections(&UserId::parse("alice").unwrap()),
        0
    );
    assert!(
        !live_reader.is_finished(),
        "the live viewer stayed connected"
    );
    // The silent tabs, when they do read, find the idle-timeout close code.
    for mut tab in silent {
        // Answering the queued pings now would only race the close.
        tab.client.set_auto_pong(false);
        assert_eq!(tab.closed().await, Some(4000));
    }
    live_reader.abort();
}

/// A client that only listens, on a connection that is never quiet for long (an event every
/// couple of milliseconds), is still pinged on schedule: its pongs keep it alive well past the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_listener_is_still_pinged_and_stays_connected() {
    let b = TestBroker::start(fast_heartbeat).await;
    let mut listener = b.connect(Some("bob")).await;
    listener.subscribe("broadcast").await;
    // It never sends anything but the pongs its client library answers pings with.
    let reader = tokio::spawn(async move {
        let mut last = 0;
        loop {
            let event = listener.next_event().await;
            assert_eq!(event.seq, last + 1, "no gap");
            last = event.seq;
            if event.event == "done" {
                return last;
            }
        }
    });
    let room = channel("broadcast");
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        b.broker.publish(&room, "tick", json!({}));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let last = b.broker.publish(&room, "done", json!(null)).seq;
    assert_eq!(reader.await.expect("still connected"), last);
}
