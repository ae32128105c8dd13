//! The HTTP API: health, stats, rooms, users, and the key-protected publish endpoint.

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_needs_the_key_and_reaches_every_connection_of_the_user() {
    let b = TestBroker::start(|_| {}).await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut tab = b.connect(Some("u42")).await;
        tab.subscribe("user:u42").await;
        tabs.push(tab);
    }
    let body = json!({"channel": "user:u42", "event": "booking_accepted", "data": {"booking": 7}});

    let (status, error) = http(b.addr, "POST", "/api/publish", &[], Some(body.to_string())).await;
    assert_eq!(status, 401);
    assert_eq!(error["error"]["code"], "unauthorized");
    let (status, _) = http(
        b.addr,
        "POST",
        "/api/publish",
        &[("authorization", "Bearer wrong-key-wrong-key")],
        Some(body.to_string()),
    )
    .await;
    assert_eq!(status, 401);
    // Refused calls are counted, so a backend with a wrong key shows on the dashboards.
    let (_, metrics) = http(b.addr, "GET", "/metrics", &[], None).await;
    let refused = metrics
        .as_str()
        .unwrap()
        .lines()
        .find(|line| {
            line.starts_with("gavel_http_requests_total")
                && line.contains(r#"route="refused""#)
                && line.contains(r#"status="4xx""#)
        })
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(
        refused >= Some(2.0),
        "refused requests counted: {refused:?}"
    );

    let (status, reply) = b.publish(body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["published"][0]["seq"], 1);
    assert_eq!(reply["published"][0]["delivered"], 3);
    for tab in &mut tabs {
        let event = tab.next_event().await;
        assert_eq!((event.event.as_str(), event.seq), ("booking_accepted", 1));
        assert_eq!(event.data.to_json(), json!({"booking": 7}));
        assert!(event.from.is_none());
    }

    // To a list of users, with X-Api-Key this time.
    let (status, reply) = http(
        b.addr,
        "POST",
        "/api/publish",
        &[("x-api-key", API_KEY)],
        Some(
            json!({"users": ["u42", "nobody"], "event": "payment_released", "data": 1}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["published"].as_array().unwrap().len(), 2);
    for tab in &mut tabs {
        assert_eq!(tab.next_event().await.event, "payment_released");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_bad_requests_with_reasons() {
    let b = TestBroker::start(|c| c.max_message_size = 1024).await;
    for (body, code) in [
        (
            json!({"channel": "room:1", "event": "x"}),
            "invalid_channel",
        ),
        (
            json!({"channel": "user:1", "event": "Bad Name"}),
            "invalid_event",
        ),
        (json!({"event": "x"}), "invalid_target"),
        (
            json!({"channel": "user:1", "users": ["1"], "event": "x"}),
            "invalid_target",
        ),
        (json!({"users": ["a b"], "event": "x"}), "invalid_user"),
        (
            json!({"channel": "auction:1", "event": "bid_placed", "data": {"amount": 1}}),
            "reserved_event",
        ),
        (
            json!({"users": ["u1"], "event": "outbid"}),
            "reserved_event",
        ),
        (
            json!({"channel": "user:1", "event": "x", "data": "y".repeat(2000)}),
            "too_large",
        ),
    ] {
        let (status, reply) = b.publish(body.clone()).await;
        assert!(status.is_client_error(), "{body} gave {status}");
        assert_eq!(reply["error"]["code"], code, "{body}");
    }
    let (status, reply) = http(
        b.addr,
        "POST",
        "/api/publish",
        &[("authorization", &format!("Bearer {API_KEY}"))],
        Some("{not json".into()),
    )
    .await;
    assert_eq!(
        (status.as_u16(), reply["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stats_rooms_and_users() {
    let b = TestBroker::start(|_| {}).await;
    assert_eq!(b.get("/healthz").await.0, 200);
    // Everything under /api/ names users and rooms: it needs the key.
    for path in ["/api/stats", "/api/rooms/auction:s", "/api/users/eve"] {
        let (status, body) = http(b.addr, "GET", path, &[], None).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    assert_eq!(http(b.addr, "GET", "/metrics", &[], None).await.0, 200);
    assert_eq!(b.get("/readyz").await.1, json!({"ready": true}));
    let mut c = b.connect(Some("eve")).await;
    c.subscribe("auction:s").await;
    let mut d = b.connect(None).await;
    d.subscribe("auction:s").await;

    let (_, stats) = b.get("/api/stats").await;
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["users_online"], 1);
    assert_eq!(stats["top_rooms"][0]["channel"], "auction:s");
    assert_eq!(stats["top_rooms"][0]["connections"], 2);

    let (status, room) = b.get("/api/rooms/auction:s").await;
    assert_eq!(status, 200);
    assert_eq!(
        (room["connections"].as_u64(), room["users"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(room["presence"]["users"], json!(["eve"]));
    assert_eq!(room["presence"]["anonymous"], 1);
    assert_eq!(b.get("/api/rooms/auction:none").await.0, 404);
    assert_eq!(b.get("/api/rooms/nonsense").await.0, 400);

    assert_eq!(
        b.get("/api/users/eve").await.1,
        json!({"user": "eve", "online": true, "connections": 1})
    );
    assert_eq!(b.get("/api/users/zed").await.1["online"], false);
    assert_eq!(b.get("/nope").await.0, 404);
    let (status, metrics) = b.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.as_str().unwrap().contains("gavel_connections"));
}

/// Every route answers another method with 405 and an `Allow` header naming its methods,
/// as docs/protocol.md §11 says (DELETE on an auction included); unknown paths get 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_a_wrong_method_with_405_and_allow() {
    let b = TestBroker::start(|_| {}).await;
    let key = ("x-api-key", API_KEY);
    for (method, path, allow) in [
        ("POST", "/healthz", "GET"),
        ("POST", "/readyz", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("POST", "/ws", "GET"),
        ("POST", "/sse", "GET"),
        ("GET", "/sse/0123", "POST, DELETE"),
        ("POST", "/api/stats", "GET"),
        ("GET", "/api/publish", "POST"),
        ("DELETE", "/api/rooms/broadcast", "GET"),
        ("POST", "/api/users/u1", "GET"),
        ("DELETE", "/api/auctions", "GET, POST"),
        ("DELETE", "/api/auctions/a1", "GET, PUT"),
        ("POST", "/api/auctions/a1", "GET, PUT"),
        ("GET", "/api/auctions/a1/pause", "POST"),
        ("PUT", "/api/auctions/a1/end", "POST"),
        ("POST", "/api/auctions/a1/bids", "GET"),
    ] {
        let (status, body, headers) = http_with_headers(b.addr, method, path, &[key]).await;
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert_eq!(
            body["error"]["code"], "method_not_allowed",
            "{method} {path}"
        );
        assert_eq!(headers.get("allow").unwrap(), allow, "{method} {path}");
    }
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/api/nope"),
        ("POST", "/api/auctions/a1/frobnicate"),
    ] {
        let (status, _, _) = http_with_headers(b.addr, method, path, &[key]).await;
        assert_eq!(status, 404, "{method} {path}");
    }
}
