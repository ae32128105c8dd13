//! The fallback transport over real HTTP: `GET /sse` streams the same frames a WebSocket gets,
//! `POST /sse/{session}` carries client frames, and bad requests get documented errors.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::common::*;

/// An open event stream: its events as (type, data) in order.
struct EventStream {
    body: Incoming,
    buffer: String,
    session: String,
}

impl EventStream {
    async fn open(b: &TestBroker, query: &str) -> Result<EventStream, (StatusCode, Value)> {
        let stream = TcpStream::connect(b.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::get(format!("/sse{query}"))
            .header(HOST, b.addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        if status != StatusCode::OK {
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            return Err((status, serde_json::from_slice(&bytes).unwrap()));
        }
        assert_eq!(
            response.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        let mut events = EventStream {
            body: response.into_body(),
            buffer: String::new(),
            session: String::new(),
        };
        let (kind, data) = events.next().await.expect("the session event");
        assert_eq!(kind, "session");
        events.session = data["session"].as_str().unwrap().to_owned();
        assert_eq!(data["post"], format!("/sse/{}", events.session));
        Ok(events)
    }

    /// The next event (comments skipped); `None` when the stream ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut kind = "message".to_owned();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event: ") {
                        kind = value.to_owned();
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data.push_str(value);
                    }
                }
                if data.is_empty() {
                    continue; // a `: ping` comment
                }
                return Some((kind, serde_json::from_str(&data).unwrap()));
            }
            let frame = tokio::time::timeout(HANG, self.body.frame())
                .await
                .expect("the stream hung")?
                .ok()?;
            if let Ok(bytes) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }

    /// The next frame of type `kind` (others, such as `viewers`, skipped).
    async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let (_, frame) = self.next().await.expect("stream ended");
            if frame["type"] == kind {
                return frame;
            }
        }
    }
}

async fn post(b: &TestBroker, session: &str, body: impl Into<String>) -> (StatusCode, Value) {
    http(
        b.addr,
        "POST",
        &format!("/sse/{session}"),
        &[("content-type", "application/json")],
        Some(body.into()),
    )
    .await
}

#[tokio::test]
async fn an_event_stream_carries_the_same_frames_as_a_websocket() {
    let b = TestBroker::start(|_| {}).await;
    let mut events = EventStream::open(&b, &format!("?token={}", token("u1")))
        .await
        .unwrap();
    let hello = events.next_of("hello").await;
    assert_eq!(hello["user"], "u1");

    let (status, body) = post(
        &b,
        &events.session,
        json!({"type": "subscribe", "id": 1, "channel": "broadcast"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let subscribed = events.next_of("ok").await;
    assert_eq!(subscribed["id"], 1);
    assert_eq!(subscribed["result"]["kind"], "subscribed");

    let (status, _) = b
        .publish(json!({"channel": "broadcast", "event": "news", "data": {"n": 1}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let event = events.next_of("event").await;
    assert_eq!(
        (event["seq"].as_u64(), &event["data"]),
        (Some(1), &json!({"n": 1}))
    );

    // Errors come back as `error` frames on the stream, as on a WebSocket.
    post(&b, &events.session, "{\"type\":\"frobnicate\",\"id\":7}").await;
    let error = events.next_of("error").await;
    assert_eq!(
        (error["id"].as_u64(), &error["code"]),
        (Some(7), &json!("unknown_type"))
    );

    // Resubscribing with since + epoch on a new stream replays what was missed.
    let epoch = subscribed["result"]["epoch"].as_u64().unwrap();
    drop(events);
    b.publish(json!({"channel": "broadcast", "event": "news", "data": {"n": 2}}))
        .await;
    let mut again = EventStream::open(&b, &format!("?token={}", token("u1")))
        .await
        .unwrap();
    let frame =
        json!({"type": "subscribe", "id": 2, "channel": "broadcast", "since": 1, "epoch": epoch});
    post(&b, &again.session, frame.to_string()).await;
    let resubscribed = again.next_of("ok").await;
    assert_eq!(resubscribed["result"]["recovered"], true);
    assert_eq!(resubscribed["result"]["replayed"], 1);
    let replayed = again.next_of("event").await;
    assert_eq!(replayed["data"], json!({"n": 2}));
}

#[tokio::test]
async fn bad_requests_get_documented_errors_and_the_session_lives_on() {
    let b = TestBroker::start(|c| c.max_message_size = 1024).await;
    let (status, body) = EventStream::open(&b, "?token=not-a-jwt")
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::UNAUTHORIZED, &json!("token_invalid"))
    );
    // Browsers on another origin: the preflight of a POST is answered, with CORS headers.
    let (status, _, headers) = http_with_headers(
        b.addr,
        "OPTIONS",
        "/sse/0123456789abcdef",
        &[
            ("origin", "https://shop.example"),
            ("access-control-request-method", "POST"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        headers.get("access-control-allow-origin").unwrap(),
        "https://shop.example"
    );
    let (status, body) = post(&b, "0123456789abcdef", "{}").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("unknown_session"))
    );

    let mut events = EventStream::open(&b, "").await.unwrap();
    events.next_of("hello").await;
    let (status, body) = post(&b, &events.session, "x".repeat(2000)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::PAYLOAD_TOO_LARGE, &json!("message_too_big"))
    );
    let (status, body) = http(
        b.addr,
        "POST",
        &format!("/sse/{}", events.session),
        &[],
        Some(String::from_utf8_lossy(&[0xff, 0xfe]).into_owned()),
    )
    .await;
    // (from_utf8_lossy made it valid UTF-8; a frame that is not JSON is a bad_frame error.)
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let error = events.next_of("error").await;
    assert_eq!(error["code"], "bad_frame");
    // Still alive: a ping is answered.
    post(&b, &events.session, "{\"type\":\"ping\",\"id\":3}").await;
    let pong = events.next_of("ok").await;
    assert_eq!(pong["result"]["kind"], "pong");
}

#[tokio::test]
async fn shutdown_ends_an_event_stream_with_a_close_event_1001() {
    let b = TestBroker::start(|c| c.shutdown_timeout = Duration::from_secs(5)).await;
    let mut events = EventStream::open(&b, "").await.unwrap();
    events.next_of("hello").await;
    b.broker.shutdown().await;
    let close = loop {
        let (kind, data) = events.next().await.expect("a close event before the end");
        if kind == "close" {
            break data;
        }
    };
    assert_eq!(
        close,
        json!({"code": 1001, "reason": "server shutting down"})
    );
    assert!(events.next().await.is_none(), "the stream ends after it");
}

#[tokio::test]
async fn a_client_that_says_goodbye_leaves_its_rooms_at_once() {
    let b = TestBroker::start(|c| c.presence_interval = Duration::from_millis(50)).await;
    let mut events = EventStream::open(&b, "").await.unwrap();
    events.next_of("hello").await;
    post(
        &b,
        &events.session,
        json!({"type": "subscribe", "id": 1, "channel": "broadcast"}).to_string(),
    )
    .await;
    events.next_of("ok").await;
    let connections = || async {
        let (_, room) = b.get("/api/rooms/broadcast").await;
        room["connections"].as_u64()
    };
    eventually("the session counts as a viewer", || async {
        connections().await == Some(1)
    })
    .await;
    let goodbye = format!("/sse/{}", events.session);
    let (status, _) = http(b.addr, "DELETE", &goodbye, &[], None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Without waiting for a ping to find the stream gone.
    eventually("the viewer count drops", || async {
        connections().await != Some(1)
    })
    .await;
    // A viewer-count update sent before the goodbye may still come first; then the end.
    let mut after_goodbye = 0;
    while let Some((_, frame)) = events.next().await {
        assert_eq!(
            frame["type"], "viewers",
            "only a pending viewer count comes after the goodbye"
        );
        after_goodbye += 1;
        assert!(after_goodbye < 10, "the stream ended");
    }
    let (status, body) = http(b.addr, "DELETE", &goodbye, &[], None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("unknown_session"))
    );
}
