//! The HTTP side: routing, the JSON API (`/healthz`, `/readyz`, `/metrics`, `/api/...`) and the
//! API-key check that guards everything under `/api/` (it names users and rooms). WebSocket
//! upgrades at `/ws` are handed to `ws`.

use std::sync::Arc;

use bytes::Bytes;
use gavel_protocol::{Channel, Data, UserId};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, AUTHORIZATION, CONTENT_TYPE, ORIGIN, VARY,
};
use hyper::{Method, Request, Response, StatusCode, Uri};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::metrics as m;
use crate::rooms::Published;
use crate::Shared;

/// Most user ids one publish may address.
pub const MAX_PUBLISH_USERS: usize = 1000;

/// Routes one request.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Response<crate::ResponseBody> {
    let path = req.uri().path();
    if path == "/sse" || path.starts_with("/sse/") {
        // The fallback transport is for browsers: it answers CORS preflights and carries the
        // CORS headers, like `/api/` (the origin check itself is in `sse`).
        let origin = req.headers().get(ORIGIN).cloned();
        let mut response = if req.method() == Method::OPTIONS {
            let mut response = Response::new(Full::new(Bytes::new()).boxed());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        } else if req.method() == Method::GET && path == "/sse" {
            crate::sse::open(shared, req)
        } else {
            route(shared, req).await.map(BodyExt::boxed)
        };
        cors(&shared.config, origin.as_ref(), &mut response);
        return response;
    }
    route(shared, req).await.map(BodyExt::boxed)
}

/// Routes a request whose response is whole.
async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if path.starts_with("/api/") {
        let origin = req.headers().get(ORIGIN).cloned();
        // Refused requests are counted too (`route="refused"`), so that a backend with a wrong
        // key or origin shows on the dashboards.
        let (route, mut response) = if req.method() == Method::OPTIONS {
            // A CORS preflight: no key is sent with it.
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            ("preflight", response)
        } else if !origin_allowed(&shared.config, req.headers()) {
            let response = error_response(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "this origin may not call the API",
            );
            ("refused", response)
        } else {
            match check_api_key(shared, &req) {
                Err(response) => ("refused", response),
                Ok(()) => api(shared, req, &path).await,
            }
        };
        metrics::counter!(m::HTTP_REQUESTS, "route" => route, "status" => status_label(response.status()))
            .increment(1);
        cors(&shared.config, origin.as_ref(), &mut response);
        return response;
    }
    let (route, response) = match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => return crate::ws::upgrade(shared, req),
        (&Method::GET, "/healthz") => (
            "healthz",
            json_response(StatusCode::OK, json!({"status": "ok"})),
        ),
        (&Method::GET, "/readyz") => ("readyz", readyz(shared)),
        (&Method::GET, "/metrics") => ("metrics", metrics_text(shared)),
        (_, p) if crate::demo::owns(p) => ("pages", crate::demo::handle(shared, req).await),
        (&Method::POST, p) if p.starts_with("/sse/") => (
            "sse_post",
            crate::sse::post(shared, req, &p["/sse/".len()..]).await,
        ),
        (_, "/ws" | "/sse" | "/healthz" | "/readyz" | "/metrics") => method_not_allowed("GET"),
        (&Method::DELETE, p) if p.starts_with("/sse/") => (
            "sse_delete",
            crate::sse::close(shared, &req, &p["/sse/".len()..]),
        ),
        (_, p) if p.starts_with("/sse/") => method_not_allowed("POST, DELETE"),
        _ => not_found(),
    };
    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "status" => status_label(response.status()))
        .increment(1);
    response
}

/// Routes an authorized request under `/api/`; returns the route label and the response.
async fn api(
    shared: &Shared,
    req: Request<Incoming>,
    path: &str,
) -> (&'static str, Response<Full<Bytes>>) {
    match (req.method(), path) {
        (&Method::GET, "/api/stats") => ("stats", stats(shared)),
        (&Method::GET, p) if p.starts_with("/api/rooms/") => {
            ("room", room(shared, &p["/api/rooms/".len()..]))
        }
        (&Method::GET, p) if p.starts_with("/api/users/") => {
            ("user", user(shared, &p["/api/users/".len()..]))
        }
        (&Method::POST, "/api/publish") => ("publish", publish(shared, req).await),
        (_, p) if p == "/api/auctions" || p.starts_with("/api/auctions/") => {
            let rest = p["/api/auctions".len()..].to_owned();
            ("auctions", crate::admin::handle(shared, req, &rest).await)
        }
        (_, "/api/stats") => method_not_allowed("GET"),
        (_, "/api/publish") => method_not_allowed("POST"),
        (_, p) if p.starts_with("/api/rooms/") || p.starts_with("/api/users/") => {
            method_not_allowed("GET")
        }
        _ => not_found(),
    }
}

fn method_not_allowed(allow: &'static str) -> (&'static str, Response<Full<Bytes>>) {
    ("method_not_allowed", method_not_allowed_response(allow))
}

/// 405 `method_not_allowed` for a known route, with the `Allow` header naming its methods.
pub(crate) fn method_not_allowed_response(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("method not allowed; this route takes {allow}"),
    );
    response.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    response
}

fn not_found() -> (&'static str, Response<Full<Bytes>>) {
    let response = error_response(StatusCode::NOT_FOUND, "not_found", "no such route");
    ("not_found", response)
}

fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

pub(crate) fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `{"error": {"code": ..., "message": ...}}` with the given status.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<Full<Bytes>> {
    json_response(status, json!({"error": {"code": code, "message": message}}))
}

/// The first value of a query parameter, percent-decoded.
pub(crate) fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1])
                .zip(hex(bytes[i + 2]))
                .map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn readyz(shared: &Shared) -> Response<Full<Bytes>> {
    if let Some(reason) = shared.not_ready_reason() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "reason": reason}),
        )
    } else {
        json_response(StatusCode::OK, json!({"ready": true}))
    }
}

fn metrics_text(shared: &Shared) -> Response<Full<Bytes>> {
    let body = shared
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn stats(shared: &Shared) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        json!({
            "connections": shared.connections(),
            "users_online": shared.users.online(),
            "rooms": shared.rooms.len(),
            "history_bytes": shared.rooms.history_bytes(),
            "top_rooms": shared.rooms.top(10),
        }),
    )
}

fn room(shared: &Shared, raw: &str) -> Response<Full<Bytes>> {
    let name = percent_decode(raw);
    let channel = match Channel::parse(&name) {
        Ok(c) => c,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, "invalid_channel", &e.to_string())
        }
    };
    let Some(room) = shared.rooms.get(&channel) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "no_such_room",
            "no such room: nobody has subscribed or published to it recently",
        );
    };
    let info = room.info();
    let presence = room.presence(1000);
    json_response(
        StatusCode::OK,
        json!({
            "channel": info.channel,
            "epoch": info.epoch,
            "seq": info.seq,
            "connections": info.viewers.connections,
            "users": info.viewers.users,
            "peak_connections": info.viewers.peak_connections,
            "peak_users": info.viewers.peak_users,
            "history_len": info.history_len,
            "oldest_seq": info.oldest_seq,
            "presence": {
                "users": presence.users,
                "anonymous": presence.anonymous,
                "truncated": presence.truncated,
            },
        }),
    )
}

fn user(shared: &Shared, raw: &str) -> Response<Full<Bytes>> {
    let user = match UserId::parse(&percent_decode(raw)) {
        Ok(u) => u,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "invalid_user", &e.to_string()),
    };
    let connections = shared.users.connections(&user);
    json_response(
        StatusCode::OK,
        json!({"user": user, "online": connections > 0, "connections": connections}),
    )
}

/// `POST /api/publish` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// One channel ...
    channel: Option<String>,
    /// ... or a list of users (each gets the event on `user:{id}`).
    users: Option<Vec<String>>,
    event: String,
    #[serde(default)]
    data: Data,
}

async fn publish(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // Room for the data at its size limit plus the envelope.
    let limit = shared.config.max_message_size + 64 * 1024;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("request body over {limit} bytes"),
            )
        }
    };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()),
    };
    if !valid_event_name(&request.event) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_event",
            "event must be 1 to 64 characters from a-z 0-9 _ . -",
        );
    }
    let data_size = request.data.json_len();
    if data_size > shared.config.max_message_size {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!(
                "data is {data_size} bytes; the limit is {}",
                shared.config.max_message_size
            ),
        );
    }
    let channels = match (request.channel, request.users) {
        (Some(channel), None) => match Channel::parse(&channel) {
            Ok(c) => vec![c],
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, "invalid_channel", &e.to_string())
            }
        },
        (None, Some(users)) if !users.is_empty() && users.len() <= MAX_PUBLISH_USERS => {
            let mut channels = Vec::with_capacity(users.len());
            for user in &users {
                match UserId::parse(user) {
                    Ok(u) => channels.push(Channel::user(&u)),
                    Err(e) => {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            "invalid_user",
                            &e.to_string(),
                        )
                    }
                }
            }
            channels.sort();
            channels.dedup();
            channels
        }
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                &format!("give exactly one of `channel` or `users` (1 to {MAX_PUBLISH_USERS} ids)"),
            )
        }
    };
    if let Some(channel) = channels.iter().find(|c| reserved_event(c, &request.event)) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "reserved_event",
            &format!(
                "{} is the auction engine's event on {channel}: it cannot be published",
                request.event
            ),
        );
    }
    let mut published: Vec<Value> = Vec::with_capacity(channels.len());
    for channel in &channels {
        match shared
            .backplane
            .publish(channel, &request.event, None, request.data.clone())
            .await
        {
            Ok(Published { seq, delivered }) => {
                published.push(json!({"channel": channel, "seq": seq, "delivered": delivered}))
            }
            Err(error) => {
                // Earlier channels of a `users` list were published; say which.
                let mut response = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster_unavailable",
                    &format!(
                        "{error}; published before the failure: {}",
                        Value::from(published)
                    ),
                );
                response.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from_static("1"),
                );
                return response;
            }
        }
    }
    json_response(StatusCode::OK, json!({ "published": published }))
}

/// Events only the auction engine may send (so nobody can fake a bid or an outcome).
fn reserved_event(channel: &Channel, event: &str) -> bool {
    match channel.kind() {
        gavel_protocol::ChannelKind::Auction => matches!(
            event,
            "bid_placed" | "extended" | "status_changed" | "ended" | "leaderboard" | "updated"
        ),
        gavel_protocol::ChannelKind::User => event == "outbid",
        _ => false,
    }
}

fn valid_event_name(event: &str) -> bool {
    !event.is_empty()
        && event.len() <= 64
        && event.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// Accepts the API key (`Authorization: Bearer KEY` or `X-Api-Key: KEY`, compared in constant
/// time) or a JWT with the `admin` role (`Authorization: Bearer TOKEN`).
#[allow(clippy::result_large_err)]
fn check_api_key(shared: &Shared, req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    let headers = req.headers();
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    let Some(given) = given else {
        return Err(unauthorized(shared, "missing API key or admin token"));
    };
    if let Some(expected) = shared.config.api_key.as_deref() {
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Ok(());
        }
    }
    if let Some(verifier) = &shared.verifier {
        if given.matches('.').count() == 2 {
            return match verifier.verify(given) {
                Ok(identity) if identity.is_admin() => Ok(()),
                Ok(_) => Err(error_response(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this token lacks the admin role",
                )),
                Err(e) => Err(error_response(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    &e.to_string(),
                )),
            };
        }
    }
    Err(unauthorized(shared, "wrong API key"))
}

fn unauthorized(shared: &Shared, message: &str) -> Response<Full<Bytes>> {
    let message = if shared.config.api_key.is_none() && shared.verifier.is_none() {
        "the API is disabled: start the broker with --api-key (or a JWT key for admin tokens)"
    } else {
        message
    };
    error_response(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Whether a request's `Origin` may use this broker: always without one (not a browser), and
/// with one when it is on `--allowed-origins` (or that list is empty).
pub(crate) fn origin_allowed(config: &crate::Config, headers: &hyper::HeaderMap) -> bool {
    match headers.get(ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            config.allowed_origins.is_empty()
                || config
                    .allowed_origins
                    .iter()
                    .any(|o| o.trim_end_matches('/') == origin)
        }
    }
}

/// CORS for the API: echo an allowed origin back, and answer preflights.
fn cors<B>(config: &crate::Config, origin: Option<&HeaderValue>, response: &mut Response<B>) {
    let Some(origin) = origin else { return };
    // The answer depends on the origin whether or not it is allowed: caches must key on it.
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("Origin"));
    let mut headers = hyper::HeaderMap::new();
    headers.insert(ORIGIN, origin.clone());
    if !origin_allowed(config, &headers) {
        return;
    }
    let h = response.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, x-api-key"),
    );
    h.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, OPTIONS"),
    );
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let uri: Uri = "/ws?x=1&user=a%2Db&y".parse().unwrap();
        assert_eq!(query_param(&uri, "user").as_deref(), Some("a-b"));
        assert_eq!(query_param(&uri, "y").as_deref(), Some(""));
        assert_eq!(query_param(&uri, "z"), None);
        let bad: Uri = "/ws?user=%zz%4".parse().unwrap();
        assert_eq!(query_param(&bad, "user").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn event_names() {
        assert!(valid_event_name("booking_accepted"));
        assert!(valid_event_name("payment.released-v2"));
        assert!(!valid_event_name(""));
        assert!(!valid_event_name("Booking"));
        assert!(!valid_event_name(&"a".repeat(65)));
    }
}
