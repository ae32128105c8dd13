//! The pages the broker serves: the JavaScript client and the admin page always, the demo page
//! and its helpers (a public auction list, tokens for anyone) only with `--demo`.

use hyper::StatusCode;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn the_demo_is_off_unless_asked_for_and_the_admin_page_needs_the_key_to_do_anything() {
    let b = TestBroker::start(|_| {}).await;
    for path in ["/demo/", "/demo/app.js", "/demo/api/auctions"] {
        let (status, body) = http(b.addr, "GET", path, &[], None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error"]["code"], "demo_disabled", "{path}");
    }
    let (status, body) = http(
        b.addr,
        "POST",
        "/demo/api/token",
        &[],
        Some(r#"{"user":"u1"}"#.into()),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("demo_disabled"))
    );
    let (status, body) = http(b.addr, "GET", "/admin/", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.as_str().unwrap().contains("API key"));
    let (status, body) = http(b.addr, "GET", "/client/gavel-client.js", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.as_str().unwrap().contains("export class GavelClient"));
    // The page itself holds no secret: without the key the API it calls still says 401.
    let (status, _) = http(b.addr, "GET", "/api/stats", &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn with_demo_a_visitor_gets_a_bidder_token_and_reads_auctions_without_the_key() {
    let b = TestBroker::start(|c| c.demo = true).await;
    let (status, _) = http(b.addr, "GET", "/demo/", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = http(
        b.addr,
        "POST",
        "/demo/api/token",
        &[],
        Some(r#"{"user":"bad user!"}"#.into()),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_user"))
    );
    let (status, body) = http(
        b.addr,
        "POST",
        "/demo/api/token",
        &[],
        Some(r#"{"user":"vis1"}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"], "vis1");
    let token = body["token"].as_str().unwrap().to_owned();

    let (status, body) = http(b.addr, "GET", "/demo/api/auctions", &[], None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["auctions"].is_array());
    // Read-only: nothing but GET goes through to the auction API.
    let (status, _) = http(b.addr, "POST", "/demo/api/auctions", &[], Some("{}".into())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The token is a bidder's: it authenticates a WebSocket connection as that user.
    let mut client = b.connect(None).await;
    let reply = client
        .auth(token)
        .await
        .expect("the demo token authenticates");
    assert!(format!("{reply:?}").contains("vis1"), "{reply:?}");
}
