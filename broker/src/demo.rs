//! The pages the broker serves itself: the JavaScript client at `/client/gavel-client.js`, the
//! admin page at `/admin/` (static; it calls `/api/` with the key the operator types in), and,
//! with `--demo`, the live auction page at `/demo/` with its development helpers: a public list of
//! auctions and their bid logs, and a token for whoever asks. All files are compiled in.

use bytes::Bytes;
use gavel_protocol::{Claims, UserId};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::http::{error_response, json_response};
use crate::Shared;

/// Lifetime of a demo token.
const DEMO_TOKEN_TTL_SECS: u64 = 12 * 3600;

/// A compiled-in file: path, content type, body.
struct Asset(&'static str, &'static str, &'static str);

/// The JavaScript client's modules (`clients/js/src`), under the names its imports use.
const CLIENT: [Asset; 7] = [
    Asset(
        "/client/gavel-client.js",
        JS,
        include_str!("../../clients/js/src/index.js"),
    ),
    Asset(
        "/client/bids.js",
        JS,
        include_str!("../../clients/js/src/bids.js"),
    ),
    Asset(
        "/client/codes.js",
        JS,
        include_str!("../../clients/js/src/codes.js"),
    ),
    Asset(
        "/client/codec.js",
        JS,
        include_str!("../../clients/js/src/codec.js"),
    ),
    Asset(
        "/client/sse.js",
        JS,
        include_str!("../../clients/js/src/sse.js"),
    ),
    Asset(
        "/client/subscription.js",
        JS,
        include_str!("../../clients/js/src/subscription.js"),
    ),
    Asset(
        "/client/tokens.js",
        JS,
        include_str!("../../clients/js/src/tokens.js"),
    ),
];
const JS: &str = "text/javascript; charset=utf-8";
const ADMIN: [Asset; 2] = [
    Asset(
        "/admin/",
        "text/html; charset=utf-8",
        include_str!("../static/admin/index.html"),
    ),
    Asset(
        "/admin/admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/admin/admin.js"),
    ),
];
const DEMO: [Asset; 3] = [
    Asset(
        "/demo/",
        "text/html; charset=utf-8",
        include_str!("../static/demo/index.html"),
    ),
    Asset(
        "/demo/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/demo/app.js"),
    ),
    Asset(
        "/demo/style.css",
        "text/css; charset=utf-8",
        include_str!("../static/demo/style.css"),
    ),
];

/// Whether `path` is one of these pages' (so the router sends it here).
pub(crate) fn owns(path: &str) -> bool {
    path.starts_with("/demo/") || path.starts_with("/admin/") || path.starts_with("/client/")
}

/// Answers a request for a page, a compiled-in file or a demo helper.
pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let demo = shared.config.demo;
    if let Some(api) = path.strip_prefix("/demo/api/") {
        if !demo {
            return not_enabled();
        }
        return match (req.method(), api) {
            (&Method::POST, "token") => token(shared, req).await,
            (_, "token") => crate::http::method_not_allowed_response("POST"),
            // Read-only views of the auction API, without the key: the list, one auction,
            // its bid log.
            (&Method::GET, rest) if rest == "auctions" || rest.starts_with("auctions/") => {
                crate::admin::handle(shared, req, &rest["auctions".len()..]).await
            }
            _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such demo route"),
        };
    }
    if req.method() != Method::GET {
        return crate::http::method_not_allowed_response("GET");
    }
    let assets: &[Asset] = if path.starts_with("/demo/") {
        if !demo {
            return not_enabled();
        }
        &DEMO
    } else if path.starts_with("/admin/") {
        &ADMIN
    } else {
        &CLIENT
    };
    let wanted = path.strip_suffix("index.html").unwrap_or(&path);
    match assets.iter().find(|asset| asset.0 == wanted) {
        Some(Asset(_, content_type, body)) => {
            let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        None => error_response(StatusCode::NOT_FOUND, "not_found", "no such file"),
    }
}

fn not_enabled() -> Response<Full<Bytes>> {
    error_response(
        StatusCode::NOT_FOUND,
        "demo_disabled",
        "the demo page is off: start the broker with --demo (development only)",
    )
}

/// `POST /demo/api/token` `{"user": "alice"}`: a bidder token for anyone who asks, signed with
/// `--jwt-secret`. Development only: `--demo` says so at start-up.
async fn token(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(secret) = &shared.config.jwt_secret else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_jwt_secret",
            "--demo hands out tokens signed with --jwt-secret, which is not set",
        );
    };
    let body = match Limited::new(req.into_body(), 1024).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error_response(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "at most 1 KiB")
        }
    };
    let user = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["user"].as_str().map(str::to_owned))
        .and_then(|u| UserId::parse(&u).ok());
    let Some(user) = user else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_user",
            "send {\"user\": NAME}: 1 to 64 of A-Z a-z 0-9 - _ .",
        );
    };
    let claims = Claims {
        sub: user.to_string(),
        exp: crate::clock::now_ms() / 1000 + DEMO_TOKEN_TTL_SECS,
        roles: Some(vec!["bidder".into()]),
        channels: None,
    };
    match gavel_client::token::sign_hs256(secret.as_bytes(), &claims) {
        Ok(token) => json_response(StatusCode::OK, json!({"user": user, "token": token})),
        Err(error) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("cannot sign: {error}"),
        ),
    }
}
