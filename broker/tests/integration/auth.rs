//! Authentication, permissions and origins: each rule's allowed and denied side, over real
//! sockets. (Connection limits and floods are in `limits`.)

use std::time::Duration;

use gavel_broker::protocol::{BidRejection, ClientFrame, ErrorCode, Format, Reply, ServerFrame};
use serde_json::json;

use crate::common::*;

pub const UPGRADE: [(&str, &str); 4] = [
    ("upgrade", "websocket"),
    ("connection", "upgrade"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-version", "13"),
];

async fn upgrade_status(
    b: &TestBroker,
    path: &str,
    extra: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut headers = UPGRADE.to_vec();
    headers.extend_from_slice(extra);
    let (status, body) = http(b.addr, "GET", path, &headers, None).await;
    (status.as_u16(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_header_the_query_or_an_auth_frame() {
    let b = TestBroker::start(|_| {}).await;
    // Header (what TestClient does).
    let mut header = b.connect(Some("hal")).await;
    assert!(matches!(
        header.subscribe("user:hal").await,
        Reply::Subscribed { .. }
    ));
    // Query parameter, as browsers do.
    let (status, _) = upgrade_status(&b, &format!("/ws?token={}", token("qin")), &[]).await;
    assert_eq!(status, 101);
    // An auth frame on an anonymous connection.
    let mut late = b.connect(None).await;
    let reply = late.auth(token("fay")).await.unwrap();
    let Reply::Authenticated {
        user, expires_at, ..
    } = reply
    else {
        panic!("{reply:?}")
    };
    assert_eq!(user.as_str(), "fay");
    assert!(expires_at > gavel_broker::clock::now_ms());
    late.subscribe("user:fay").await;
    assert_eq!(b.broker.user_connections(&user), 1);
    // The user of a connection cannot change.
    let err = late.auth(token("mal")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_expired_tokens_are_refused_with_their_codes() {
    let b = TestBroker::start(|_| {}).await;
    let forged = {
        let claims = gavel_broker::protocol::Claims {
            sub: "eve".into(),
            exp: 4_000_000_000,
            roles: None,
            channels: None,
        };
        gavel_client::token::sign_hs256(b"some-other-secret-entirely", &claims).unwrap()
    };
    let expired = token_with("old", None, None, -600);
    let bearer = |t: &str| format!("Bearer {t}");
    let (status, body) = upgrade_status(&b, "/ws", &[("authorization", &bearer(&forged))]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("token_invalid"))
    );
    let (status, body) = upgrade_status(&b, "/ws", &[("authorization", &bearer(&expired))]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("token_expired"))
    );
    let mut c = b.connect(None).await;
    let err = c.auth(forged.clone()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::TokenInvalid);
    let err = c.auth(expired.clone()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::TokenExpired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_anonymous_access_a_connection_must_authenticate_in_time() {
    let b = TestBroker::start(|c| {
        c.allow_anonymous = false;
        c.auth_timeout = Duration::from_millis(500);
    })
    .await;
    // In time: fine.
    let mut good = b.connect(None).await;
    let err = good.request(sub_frame("auction:1")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unauthenticated, "nothing before auth");
    good.auth(token("gus")).await.unwrap();
    good.subscribe("auction:1").await;
    // Never: closed with 4002.
    let mut silent = b.connect(None).await;
    assert_eq!(silent.closed().await, Some(4002));
    // The authenticated one is still there.
    assert!(matches!(
        good.request(|id| ClientFrame::Ping { id }).await.unwrap(),
        Reply::Pong { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connections_are_read_only() {
    let b = TestBroker::start(fast_bids).await;
    create_auction(b.addr, "ro", 600_000).await;
    let mut anon = b.connect(None).await;
    anon.subscribe("auction:ro").await;
    anon.subscribe("broadcast").await;
    let Reply::BidRejected { reason, .. } = anon.bid("ro", 5000, "a").await else {
        panic!()
    };
    assert_eq!(reason, BidRejection::Unauthenticated);
    for name in ["user:x", "conversation:x"] {
        let err = anon
            .request(|id| ClientFrame::Subscribe {
                id,
                channel: channel(name),
                since: None,
                epoch: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthenticated, "{name}");
    }
}

fn fast_bids(c: &mut gavel_broker::Config) {
    c.bid_rate = 1000.0;
    c.bid_burst = 1000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_need_the_channels_claim_and_bids_the_bidder_role() {
    let b = TestBroker::start(fast_bids).await;
    let listed = token_with("ivy", None, Some(vec!["conversation:c1".into()]), 3600);
    let mut ivy = TestClient::connect_with(b.addr, Some(listed), Format::MsgPack).await;
    assert!(ivy.request(sub_frame("conversation:c1")).await.is_ok());
    assert_eq!(
        ivy.request(sub_frame("conversation:c2"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    let none = token_with("jon", None, None, 3600);
    let mut jon = TestClient::connect_with(b.addr, Some(none), Format::MsgPack).await;
    assert_eq!(
        jon.request(sub_frame("conversation:c1"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );

    create_auction(b.addr, "roles", 600_000).await;
    let viewer = token_with("kit", Some(vec!["viewer".into()]), None, 3600);
    let mut kit = TestClient::connect_with(b.addr, Some(viewer), Format::MsgPack).await;
    let Reply::BidRejected { reason, .. } = kit.bid("roles", 5000, "k").await else {
        panic!()
    };
    assert_eq!(reason, BidRejection::Forbidden);
    let bidder = token_with("lee", Some(vec!["bidder".into()]), None, 3600);
    let mut lee = TestClient::connect_with(b.addr, Some(bidder), Format::MsgPack).await;
    assert!(matches!(
        lee.bid("roles", 5000, "l").await,
        Reply::BidAccepted { .. }
    ));
    // No roles claim at all: no role checks.
    assert!(matches!(
        jon.bid("roles", 6000, "j").await,
        Reply::BidAccepted { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_gets_a_warning_and_a_grace_period() {
    let b = TestBroker::start(|c| c.token_grace = Duration::from_millis(300)).await;
    // Tokens expiring in about a second: one connection refreshes in time, one does not.
    let mut refresher = TestClient::connect_with(
        b.addr,
        Some(token_with("nia", None, None, 1)),
        Format::MsgPack,
    )
    .await;
    let mut lapser = TestClient::connect_with(
        b.addr,
        Some(token_with("oto", None, None, 1)),
        Format::MsgPack,
    )
    .await;
    loop {
        if let ServerFrame::Error(e) = refresher.recv().await {
            assert_eq!((e.id, e.code), (None, ErrorCode::TokenExpired));
            break;
        }
    }
    let reply = refresher.auth(token("nia")).await.unwrap();
    assert!(matches!(reply, Reply::Authenticated { .. }));
    assert_eq!(lapser.closed().await, Some(4003));
    // The refreshed connection lives on past the grace period.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(matches!(
        refresher
            .request(|id| ClientFrame::Ping { id })
            .await
            .unwrap(),
        Reply::Pong { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_takes_the_key_or_an_admin_token() {
    let b = TestBroker::start(|_| {}).await;
    let admin = token_with("root", Some(vec!["admin".into()]), None, 3600);
    let user = token_with("usr", Some(vec!["bidder".into()]), None, 3600);
    let get = |t: String| {
        let addr = b.addr;
        async move {
            http(
                addr,
                "GET",
                "/api/stats",
                &[("authorization", &format!("Bearer {t}"))],
                None,
            )
            .await
            .0
        }
    };
    assert_eq!(get(admin).await, 200);
    assert_eq!(get(user).await, 403);
    assert_eq!(get(API_KEY.into()).await, 200);
    assert_eq!(get("nope".into()).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_and_cors_answers_the_allowed_ones() {
    let b = TestBroker::start(|c| c.allowed_origins = vec!["https://shop.example".into()]).await;
    assert_eq!(
        upgrade_status(&b, "/ws", &[("origin", "https://evil.example")])
            .await
            .0,
        403
    );
    assert_eq!(
        upgrade_status(&b, "/ws", &[("origin", "https://shop.example")])
            .await
            .0,
        101
    );
    assert_eq!(
        upgrade_status(&b, "/ws", &[]).await.0,
        101,
        "no Origin: not a browser"
    );

    let preflight = http(
        b.addr,
        "OPTIONS",
        "/api/stats",
        &[("origin", "https://shop.example")],
        None,
    )
    .await;
    assert_eq!(preflight.0, 204);
    let (status, _, headers) = http_with_headers(
        b.addr,
        "GET",
        "/api/stats",
        &[("origin", "https://shop.example"), ("x-api-key", API_KEY)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("access-control-allow-origin").unwrap(),
        "https://shop.example"
    );
    let (status, _, headers) = http_with_headers(
        b.addr,
        "GET",
        "/api/stats",
        &[("origin", "https://evil.example"), ("x-api-key", API_KEY)],
    )
    .await;
    assert_eq!(status, 403);
    assert!(headers.get("access-control-allow-origin").is_none());
}

/// A stand-in for the application's backend: allows `ann` into `conversation:x`, denies the
/// rest, and counts the questions it is asked.
async fn authorization_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let counter = Arc::clone(&counter);
                        async move {
                            use http_body_util::BodyExt;
                            counter.fetch_add(1, Ordering::SeqCst);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let ask: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let allow = ask == json!({"user": "ann", "channel": "conversation:x"});
                            let status = if allow { 200 } else { 403 };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_decides_conversations_a_token_does_not_list_with_a_cache() {
    use std::sync::atomic::Ordering;
    let (backend, asked) = authorization_backend().await;
    let b = TestBroker::start(|c| {
        c.conversation_auth_url = Some(format!("http://{backend}/authorize"));
        c.conversation_auth_cache = Duration::from_secs(60);
    })
    .await;
    let mut ann = TestClient::connect_with(
        b.addr,
        Some(token_with("ann", None, None, 3600)),
        Format::MsgPack,
    )
    .await;
    assert!(ann.request(sub_frame("conversation:x")).await.is_ok());
    assert_eq!(
        ann.request(sub_frame("conversation:y"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    let mut bob = TestClient::connect_with(
        b.addr,
        Some(token_with("bob", None, None, 3600)),
        Format::MsgPack,
    )
    .await;
    assert_eq!(
        bob.request(sub_frame("conversation:x"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    // A second tab of ann: answered from the cache.
    let mut tab = TestClient::connect_with(
        b.addr,
        Some(token_with("ann", None, None, 3600)),
        Format::MsgPack,
    )
    .await;
    assert!(tab.request(sub_frame("conversation:x")).await.is_ok());
    assert_eq!(asked.load(Ordering::SeqCst), 3, "cached");
    // A token that lists its conversations is not asked about.
    let mut cy = TestClient::connect_with(
        b.addr,
        Some(token_with(
            "cy",
            None,
            Some(vec!["conversation:x".into()]),
            3600,
        )),
        Format::MsgPack,
    )
    .await;
    assert!(cy.request(sub_frame("conversation:x")).await.is_ok());
    assert_eq!(asked.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_means_deny() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let b =
        TestBroker::start(|c| c.conversation_auth_url = Some(format!("http://{addr}/authorize")))
            .await;
    let mut ann = TestClient::connect_with(
        b.addr,
        Some(token_with("ann", None, None, 3600)),
        Format::MsgPack,
    )
    .await;
    let err = ann.request(sub_frame("conversation:x")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_verify_against_a_public_key_file() {
    let key = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
    let dir = temp_dir("es256");
    let public = dir.join("public.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let b = TestBroker::start(|c| {
        c.jwt_secret = None;
        c.jwt_public_key = Some(public.clone());
    })
    .await;
    let claims = gavel_broker::protocol::Claims {
        sub: "ecdsa".into(),
        exp: gavel_broker::clock::now_ms() / 1000 + 3600,
        roles: None,
        channels: None,
    };
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &signing,
    )
    .unwrap();
    let mut c = TestClient::connect_with(b.addr, Some(good), Format::MsgPack).await;
    assert!(matches!(
        c.subscribe("user:ecdsa").await,
        Reply::Subscribed { .. }
    ));
    // An HS256 token (the shared-secret kind) is refused by a public-key broker.
    let (status, body) = upgrade_status(
        &b,
        "/ws",
        &[("authorization", &format!("Bearer {}", token("ecdsa")))],
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("token_invalid"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_that_lists_fewer_conversations_leaves_them() {
    let b = TestBroker::start(|_| {}).await;
    let both = vec!["conversation:a".to_string(), "conversation:b".to_string()];
    let mut c = TestClient::connect_with(
        b.addr,
        Some(token_with("rex", None, Some(both), 3600)),
        Format::MsgPack,
    )
    .await;
    c.subscribe("conversation:a").await;
    c.subscribe("conversation:b").await;
    let narrower = token_with("rex", None, Some(vec!["conversation:a".into()]), 3600);
    let Reply::Authenticated { unsubscribed, .. } = c.auth(narrower).await.unwrap() else {
        panic!("expected authenticated")
    };
    // The reply lists what was left, for clients that keep subscriptions.
    assert_eq!(unsubscribed, vec![channel("conversation:b")]);
    // Told, unsubscribed from b, still in a.
    let ServerFrame::Error(notice) = c.recv().await else {
        panic!("expected the notice")
    };
    assert_eq!((notice.id, notice.code), (None, ErrorCode::Forbidden));
    let room_b = b.broker.rooms().get(&channel("conversation:b")).unwrap();
    assert_eq!(room_b.viewer_counts().connections, 0);
    let room_a = b.broker.rooms().get(&channel("conversation:a")).unwrap();
    assert_eq!(room_a.viewer_counts().connections, 1);
    assert_eq!(
        http(
            b.addr,
            "DELETE",
            "/api/auctions",
            &[("x-api-key", API_KEY)],
            None
        )
        .await
        .0,
        405
    );
}
