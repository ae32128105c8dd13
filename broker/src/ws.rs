//! The WebSocket upgrade at `/ws`: checks the request, negotiates the subprotocol (format),
//! answers 101 and spawns the connection's session. It never waits on the handshake's
//! completion itself, so the HTTP accept path is never blocked.

use std::sync::Arc;

use bytes::Bytes;
use gavel_protocol::Format;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::admission::{Refused, Slot};
use crate::auth::{AuthError, Identity};
use crate::http::{error_response, query_param};
use crate::metrics as m;
use crate::outbound::Wire;
use crate::session::{self, BoxRead, BoxWrite};
use crate::PeerAddr;
use crate::Shared;

pub(crate) fn upgrade(shared: &Arc<Shared>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let refuse = |status: StatusCode, reason: &'static str, message: String| {
        debug_assert!(m::UPGRADE_REFUSALS.contains(&reason), "{reason} is listed");
        metrics::counter!(m::UPGRADES_REFUSED, "reason" => reason).increment(1);
        error_response(status, reason, &message)
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut response = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "not_websocket",
            "/ws expects a WebSocket upgrade request".into(),
        );
        response.headers_mut().insert(
            hyper::header::UPGRADE,
            HeaderValue::from_static("websocket"),
        );
        return response;
    }
    if shared.shutdown.is_cancelled() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the broker is shutting down".into(),
        );
    }
    let offered = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let format = if offered.trim().is_empty() {
        Format::MsgPack
    } else {
        match Format::negotiate(&offered) {
            Some(format) => format,
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "unsupported_subprotocol",
                    format!(
                        "none of the offered subprotocols is supported; use {} or {}",
                        Format::MSGPACK_SUBPROTOCOL,
                        Format::JSON_SUBPROTOCOL
                    ),
                )
            }
        }
    };
    if !crate::http::origin_allowed(&shared.config, req.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not open WebSockets here".into(),
        );
    }
    let identity = match identify(shared, &req, &refuse) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let slot = match admit(shared, &req, &refuse) {
        Ok(slot) => slot,
        Err(response) => return response,
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_handshake", e.to_string()),
    };
    let task_shared = Arc::clone(shared);
    shared.tracker.spawn(async move {
        let Some((read, write)) = upgraded(upgrade).await else {
            return;
        };
        // The session is a task of its own, and this one ends: awaited here, the session's
        // future would sit beside the upgrade's state in this task for the connection's
        // whole life.
        let inbound = session::Inbound::websocket(read, task_shared.config.max_message_size);
        let session = session::serve(
            Arc::clone(&task_shared),
            inbound,
            write,
            Wire::websocket(format),
            identity,
            slot,
        );
        task_shared.tracker.spawn(session);
    });

    let (mut parts, _) = response.into_parts();
    if !offered.trim().is_empty() {
        parts.headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(format.subprotocol()),
        );
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// How a refusal is answered (and counted): status, stable code, message.
pub(crate) type Refuse<'a> = &'a dyn Fn(StatusCode, &'static str, String) -> Response<Full<Bytes>>;

/// The connection's identity from its token (`Authorization: Bearer` or `?token=`), if it came
/// with one; a bad or expired token is refused with 401. (The large `Err` is the refusal, the
/// cold path: boxing it would buy nothing.)
#[allow(clippy::result_large_err)]
pub(crate) fn identify(
    shared: &Shared,
    req: &Request<Incoming>,
    refuse: Refuse<'_>,
) -> Result<Option<Identity>, Response<Full<Bytes>>> {
    let Some(token) = bearer_token(req) else {
        return Ok(None);
    };
    let Some(verifier) = &shared.verifier else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "token_invalid",
            "this broker has no JWT key configured".into(),
        ));
    };
    match verifier.verify(&token) {
        Ok(identity) => Ok(Some(identity)),
        Err(AuthError::Expired) => Err(refuse(
            StatusCode::UNAUTHORIZED,
            "token_expired",
            "the token has expired".into(),
        )),
        Err(e @ AuthError::Invalid(_)) => Err(refuse(
            StatusCode::UNAUTHORIZED,
            "token_invalid",
            e.to_string(),
        )),
    }
}

/// A place under the connection limits, or 503 with `Retry-After`.
#[allow(clippy::result_large_err)]
pub(crate) fn admit(
    shared: &Shared,
    req: &Request<Incoming>,
    refuse: Refuse<'_>,
) -> Result<Slot, Response<Full<Bytes>>> {
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    shared.admission.admit(peer).map_err(|refused| {
        let (reason, message) = refusal(refused);
        let mut response = refuse(StatusCode::SERVICE_UNAVAILABLE, reason, message.into());
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        response
    })
}

/// The error code and message of a refused connection.
fn refusal(refused: Refused) -> (&'static str, &'static str) {
    match refused {
        Refused::Full => ("too_many_connections", "the broker is full; retry shortly"),
        Refused::AddressFull => (
            "too_many_connections_from_address",
            "too many connections from your address; retry shortly",
        ),
    }
}

/// The answer to every request on a connection refused at accept (see
/// [`crate::admission`]): 503 with `Retry-After`, and the connection closes.
pub(crate) fn refused_connection(refused: Refused) -> Response<Full<Bytes>> {
    let (reason, message) = refusal(refused);
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, reason, message);
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Seconds a refused client is asked to wait (`Retry-After`).
const RETRY_AFTER_SECS: &str = "5";

/// The token from `Authorization: Bearer` or, for browsers (which cannot set headers on a
/// WebSocket), the `token` query parameter.
fn bearer_token(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query_param(req.uri(), "token"))
        .filter(|t| !t.is_empty())
}

/// The socket's two halves once the upgrade completes; `None` if it failed.
async fn upgraded(upgrade: fastwebsockets::upgrade::UpgradeFut) -> Option<(BoxRead, BoxWrite)> {
    match upgrade.await {
        Ok(ws) => Some(split(ws.into_inner())),
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            None
        }
    }
}

/// Splits the upgraded connection into owned halves: for a plain TCP stream without a lock
/// between them (keeping any bytes hyper read ahead), otherwise through `tokio::io::split`.
fn split(io: TokioIo<hyper::upgrade::Upgraded>) -> (BoxRead, BoxWrite) {
    let upgraded = io.into_inner();
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let stream = parts.io.into_inner();
            let _ = stream.set_nodelay(true);
            let (read, write) = stream.into_split();
            // Copy what hyper read ahead (usually nothing): keeping its `Bytes` would pin
            // hyper's whole read buffer for the connection's lifetime.
            let read_ahead = std::io::Cursor::new(parts.read_buf.to_vec());
            (Box::new(read_ahead.chain(read)), Box::new(write))
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            (Box::new(read), Box::new(write))
        }
    }
}
