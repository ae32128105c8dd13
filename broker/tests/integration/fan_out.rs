//! Room isolation and fan-out to many subscribers.

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_never_sees_another_rooms_events() {
    let b = TestBroker::start(|_| {}).await;
    let mut one = b.connect(None).await;
    let mut two = b.connect(None).await;
    one.subscribe("auction:1").await;
    two.subscribe("auction:2").await;

    for i in 0..5 {
        b.broker
            .publish(&channel("auction:2"), "tick", json!({ "room": 2, "i": i }));
    }
    b.broker
        .publish(&channel("auction:1"), "tick", json!({ "room": 1 }));

    // auction:1's subscriber gets exactly its own event, seq 1, and none of the five others.
    let event = one.next_event().await;
    assert_eq!(event.channel.as_str(), "auction:1");
    assert_eq!(
        (event.seq, event.data.to_json()["room"].as_i64()),
        (1, Some(1))
    );
    for i in 0..5 {
        let event = two.next_event().await;
        assert_eq!(event.channel.as_str(), "auction:2");
        assert_eq!(event.seq, i + 1);
    }
    // A marker in auction:1 arrives next: nothing from auction:2 came in between.
    b.broker
        .publish(&channel("auction:1"), "marker", json!(null));
    let event = one.next_event().await;
    assert_eq!((event.event.as_str(), event.seq), ("marker", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_each_get_every_event_in_order() {
    const SUBSCRIBERS: usize = 1000;
    const EVENTS: u64 = 100;
    let b = TestBroker::start(|_| {}).await;
    let mut clients = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let mut c = b.connect(None).await;
        c.subscribe("auction:big").await;
        clients.push(c);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seqs = Vec::with_capacity(EVENTS as usize);
                while seqs.len() < EVENTS as usize {
                    let event = c.next_event().await;
                    assert_eq!(event.channel.as_str(), "auction:big");
                    seqs.push(event.seq);
                }
                seqs
            })
        })
        .collect();
    for i in 0..EVENTS {
        let published = b
            .broker
            .publish(&channel("auction:big"), "bid_placed", json!({ "i": i }));
        assert_eq!(
            published.delivered, SUBSCRIBERS,
            "every subscriber was queued the event"
        );
    }
    let expected: Vec<u64> = (1..=EVENTS).collect();
    for reader in readers {
        assert_eq!(
            reader.await.unwrap(),
            expected,
            "every event, in seq order, no gap"
        );
    }
}
