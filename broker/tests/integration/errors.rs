//! Bad input gets a documented error frame or close code; the connection (or the broker) stays.

use fastwebsockets::OpCode;
use gavel_broker::protocol::{ClientFrame, ErrorCode, Reply, ServerFrame};
use serde_json::json;

use crate::common::*;

async fn expect_error(c: &mut TestClient) -> gavel_broker::protocol::ErrorFrame {
    loop {
        if let ServerFrame::Error(e) = c.recv().await {
            return e;
        }
    }
}

async fn still_answers(c: &mut TestClient) {
    let pong = c.request(|id| ClientFrame::Ping { id }).await.unwrap();
    assert!(matches!(pong, Reply::Pong { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_unknown_frames_get_error_frames_and_the_connection_stays() {
    let b = TestBroker::start(|_| {}).await;
    let mut c = b.connect(Some("mallory")).await;

    c.client
        .send_raw(OpCode::Binary, vec![0xc1, 0xff, 0x00])
        .await
        .unwrap();
    let e = expect_error(&mut c).await;
    assert_eq!((e.id, e.code), (None, ErrorCode::BadFrame));
    still_answers(&mut c).await;

    let unknown = rmp_serde::to_vec_named(&json!({"type": "teleport", "id": 5})).unwrap();
    c.client.send_raw(OpCode::Binary, unknown).await.unwrap();
    let e = expect_error(&mut c).await;
    assert_eq!((e.id, e.code), (Some(5), ErrorCode::UnknownType));

    let bad_channel =
        rmp_serde::to_vec_named(&json!({"type": "subscribe", "id": 6, "channel": "room:1"}))
            .unwrap();
    c.client
        .send_raw(OpCode::Binary, bad_channel)
        .await
        .unwrap();
    let e = expect_error(&mut c).await;
    assert_eq!((e.id, e.code), (Some(6), ErrorCode::InvalidChannel));

    let missing = rmp_serde::to_vec_named(&json!({"type": "read", "id": 7})).unwrap();
    c.client.send_raw(OpCode::Binary, missing).await.unwrap();
    let e = expect_error(&mut c).await;
    assert_eq!((e.id, e.code), (Some(7), ErrorCode::BadFrame));

    c.client
        .send_raw(OpCode::Text, b"{\"type\":\"ping\",\"id\":1}".to_vec())
        .await
        .unwrap();
    let e = expect_error(&mut c).await;
    assert_eq!(e.code, ErrorCode::BadFrame, "text on a msgpack connection");
    still_answers(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_per_channel_kind() {
    let b = TestBroker::start(|_| {}).await;
    let mut c = b.connect(Some("ann")).await;
    let mut anon = b.connect(None).await;
    assert_eq!(
        c.request(sub_frame("user:bob")).await.unwrap_err().code,
        ErrorCode::Forbidden
    );
    assert!(c.request(sub_frame("user:ann")).await.is_ok());
    assert_eq!(
        c.request(sub_frame("user:ann")).await.unwrap_err().code,
        ErrorCode::AlreadySubscribed
    );
    assert_eq!(
        anon.request(sub_frame("user:ann")).await.unwrap_err().code,
        ErrorCode::Unauthenticated
    );
    assert!(anon.request(sub_frame("broadcast")).await.is_ok());

    let publish = |name: &str| {
        let channel = channel(name);
        move |id| ClientFrame::Publish {
            id,
            channel,
            data: json!("hi").into(),
        }
    };
    c.subscribe("auction:1").await;
    assert_eq!(
        c.request(publish("auction:1")).await.unwrap_err().code,
        ErrorCode::ReadOnlyChannel
    );
    assert_eq!(
        c.request(publish("broadcast")).await.unwrap_err().code,
        ErrorCode::ReadOnlyChannel
    );
    assert_eq!(
        c.request(publish("conversation:x")).await.unwrap_err().code,
        ErrorCode::NotSubscribed
    );
    assert_eq!(
        anon.request(sub_frame("conversation:x"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Unauthenticated,
        "anonymous connections join no conversation"
    );
    let unsub = |name: &str| {
        let channel = channel(name);
        move |id| ClientFrame::Unsubscribe { id, channel }
    };
    assert_eq!(
        c.request(unsub("auction:2")).await.unwrap_err().code,
        ErrorCode::NotSubscribed
    );
    assert!(matches!(
        c.request(unsub("auction:1")).await.unwrap(),
        Reply::Unsubscribed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_limit() {
    let b = TestBroker::start(|c| c.max_subscriptions = 2).await;
    let mut c = b.connect(None).await;
    c.subscribe("auction:1").await;
    c.subscribe("auction:2").await;
    let err = c.request(sub_frame("auction:3")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::TooManySubscriptions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_closed_with_1009_and_others_carry_on() {
    let b = TestBroker::start(|c| c.max_message_size = 1024).await;
    let mut bystander = b.connect(None).await;
    bystander.subscribe("auction:1").await;

    let mut big = b.connect(None).await;
    big.client
        .send_raw(OpCode::Binary, vec![0x90; 1025])
        .await
        .unwrap();
    assert_eq!(big.closed().await, Some(1009));

    // A message assembled from fragments is capped like a single frame.
    let mut fragmented = b.connect(None).await;
    fragmented
        .client
        .send_fragment(false, OpCode::Binary, vec![0x90; 400])
        .await
        .ok();
    for _ in 0..2 {
        fragmented
            .client
            .send_fragment(false, OpCode::Continuation, vec![0x90; 400])
            .await
            .ok();
    }
    fragmented
        .client
        .send_fragment(true, OpCode::Continuation, vec![0x90; 10])
        .await
        .ok();
    assert_eq!(fragmented.closed().await, Some(1009));

    // A fragmented message under the limit is fine.
    let mut ok = b.connect(None).await;
    let ping = rmp_serde::to_vec_named(&ClientFrame::Ping { id: 77 }).unwrap();
    let (head, tail) = ping.split_at(3);
    ok.client
        .send_fragment(false, OpCode::Binary, head.to_vec())
        .await
        .unwrap();
    ok.client
        .send_fragment(true, OpCode::Continuation, tail.to_vec())
        .await
        .unwrap();
    loop {
        if let ServerFrame::Ok { id: 77, .. } = ok.recv().await {
            break;
        }
    }

    b.broker
        .publish(&channel("auction:1"), "still_here", json!(null));
    assert_eq!(bystander.next_event().await.event, "still_here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mirror_works_and_invalid_utf8_closes_with_1007() {
    let b = TestBroker::start(|_| {}).await;
    let mut c = b.connect_json(Some("jo")).await;
    c.subscribe("auction:j").await;
    b.broker
        .publish(&channel("auction:j"), "hello", json!({"x": 1}));
    let event = c.next_event().await;
    assert_eq!(
        (event.event.as_str(), event.data.to_json()),
        ("hello", json!({"x": 1}))
    );

    c.client
        .send_raw(OpCode::Text, b"{\"type\":\"ping\"".to_vec())
        .await
        .unwrap();
    assert_eq!(expect_error(&mut c).await.code, ErrorCode::BadFrame);
    c.client
        .send_raw(OpCode::Text, vec![b'"', 0xff, 0xfe, b'"'])
        .await
        .unwrap();
    assert_eq!(c.closed().await, Some(1007));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_subprotocols_and_plain_requests_are_refused() {
    let b = TestBroker::start(|_| {}).await;
    let (status, body) = http(
        b.addr,
        "GET",
        "/ws",
        &[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "gavel.v9.msgpack"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "unsupported_subprotocol");
    let (status, _) = http(b.addr, "GET", "/ws", &[], None).await;
    assert_eq!(status, 426);
    let (status, body) = http(
        b.addr,
        "GET",
        "/ws?token=not.a.token",
        &[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
        None,
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (401, Some("token_invalid"))
    );
}

/// Before authentication a frame other than `auth` or `ping` is refused from its `type` and
/// `id` alone: a publish whose `data` is 60,000 nested values gets `unauthenticated` with its
/// id, an unknown type still gets `unknown_type`, and the connection can then authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_authentication_frames_are_refused_from_their_envelope() {
    let b = TestBroker::start(|c| c.allow_anonymous = false).await;
    let mut c = b.connect(None).await;
    let heavy = json!({
        "type": "publish",
        "id": 9,
        "channel": "conversation:x",
        "data": vec![json!([]); 60_000],
    });
    c.client
        .send_raw(OpCode::Binary, rmp_serde::to_vec_named(&heavy).unwrap())
        .await
        .unwrap();
    let e = expect_error(&mut c).await;
    assert_eq!((e.id, e.code), (Some(9), ErrorCode::Unauthenticated));

    let unknown = rmp_serde::to_vec_named(&json!({"type": "teleport", "id": 5})).unwrap();
    c.client.send_raw(OpCode::Binary, unknown).await.unwrap();
    let e = expect_error(&mut c).await;
    assert_eq!((e.id, e.code), (Some(5), ErrorCode::UnknownType));

    still_answers(&mut c).await;
    c.auth(token("nia")).await.unwrap();
    c.subscribe("user:nia").await;
}
