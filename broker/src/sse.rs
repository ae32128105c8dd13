//! The fallback transport for networks that block WebSockets: `GET /sse` streams a connection's
//! server frames as Server-Sent Events (one `data:` line of JSON per frame), and
//! `POST /sse/{session}` carries the client's frames, one per request. A session runs the same
//! reader and writer as a WebSocket connection (`session::serve`): same frames, seqs, recovery,
//! authentication and limits.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

use crate::http::error_response;
use crate::metrics as m;
use crate::outbound::Wire;
use crate::session::{self, Inbound};
use crate::{ResponseBody, Shared};

/// Client frames a session holds before its reader takes them; a POST waits for room.
const POST_QUEUE: usize = 64;
/// How long a POST waits for room in its session's queue before it is refused (503).
const POST_WAIT: Duration = Duration::from_secs(5);
/// Bytes between the writer and the response body: what a slow reader may leave unread before
/// the writer waits (and, past `--write-timeout`, the session ends as a slow consumer).
const STREAM_BUFFER: usize = 64 * 1024;

/// Open SSE sessions: each one's queue of posted client frames, by session id.
pub(crate) type Sessions = dashmap::DashMap<String, mpsc::Sender<Bytes>>;

/// `GET /sse`: checks what a WebSocket upgrade checks (shutdown, origin, token, connection
/// limits), then answers with an event stream: first `event: session` with the id to post to,
/// then every server frame, starting with `hello`.
pub(crate) fn open(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<ResponseBody> {
    let refuse = |status: StatusCode, reason: &'static str, message: String| {
        debug_assert!(m::UPGRADE_REFUSALS.contains(&reason), "{reason} is listed");
        metrics::counter!(m::UPGRADES_REFUSED, "reason" => reason).increment(1);
        error_response(status, reason, &message)
    };
    let refused = |response: Response<Full<Bytes>>| response.map(BodyExt::boxed);
    if shared.shutdown.is_cancelled() {
        return refused(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the broker is shutting down".into(),
        ));
    }
    if !crate::http::origin_allowed(&shared.config, req.headers()) {
        return refused(refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not open event streams here".into(),
        ));
    }
    let identity = match crate::ws::identify(shared, &req, &refuse) {
        Ok(identity) => identity,
        Err(response) => return refused(response),
    };
    let slot = match crate::ws::admit(shared, &req, &refuse) {
        Ok(slot) => slot,
        Err(response) => return refused(response),
    };
    if let Some(http) = req.extensions().get::<crate::HttpSlot>() {
        http.release();
    }
    let id = session_id();
    let (posts_tx, posts_rx) = mpsc::channel(POST_QUEUE);
    shared.sse.insert(id.clone(), posts_tx);
    let (body, mut stream) = tokio::io::duplex(STREAM_BUFFER);
    let task_shared = Arc::clone(shared);
    shared.tracker.spawn(async move {
        // Out of the registry however the session ends (a panic included).
        let _registered = Registered {
            shared: Arc::clone(&task_shared),
            id: id.clone(),
        };
        let announce =
            format!("event: session\ndata: {{\"session\":\"{id}\",\"post\":\"/sse/{id}\"}}\n\n");
        if stream.write_all(announce.as_bytes()).await.is_ok() {
            Box::pin(session::serve(
                task_shared,
                Inbound::Posts(posts_rx),
                Box::new(stream),
                Wire::Sse,
                identity,
                slot,
            ))
            .await;
        }
    });
    let mut response = Response::new(SseBody { read: body }.boxed());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies such as nginx buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `POST /sse/{session}`: one client frame (JSON, as on a `gavel.v1.json` WebSocket), handed to
/// the session's reader; its reply comes on the event stream. 202 when queued.
pub(crate) async fn post(
    shared: &Shared,
    req: Request<Incoming>,
    id: &str,
) -> Response<Full<Bytes>> {
    if !crate::http::origin_allowed(&shared.config, req.headers()) {
        return error_response(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not post here",
        );
    }
    let Some(queue) = shared.sse.get(id).map(|entry| entry.value().clone()) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown_session",
            "no such event stream (it ended): open a new one with GET /sse",
        );
    };
    let limit = shared.config.max_message_size;
    let read = tokio::time::timeout(POST_WAIT, Limited::new(req.into_body(), limit).collect());
    let body = match read.await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_big",
                &format!("a client frame may have at most {limit} bytes"),
            )
        }
        Ok(Err(_)) | Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the request body could not be read in time",
            )
        }
    };
    if std::str::from_utf8(&body).is_err() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
            "the frame is not valid UTF-8 JSON",
        );
    }
    match tokio::time::timeout(POST_WAIT, queue.send(body)).await {
        Ok(Ok(())) => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"{\"queued\":true}")));
            *response.status_mut() = StatusCode::ACCEPTED;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Ok(Err(_)) => error_response(
            StatusCode::NOT_FOUND,
            "unknown_session",
            "the event stream ended: open a new one with GET /sse",
        ),
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "session_busy",
            "the session is not taking frames; slow down",
        ),
    }
}

/// Removes a session from the registry when dropped.
struct Registered {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.sse.remove(&self.id);
    }
}

/// `DELETE /sse/{session}`: the client is leaving. The session ends now (its reader sees the end
/// of its posts), so viewer counts and the connection limit do not wait for the next write to
/// a stream nobody reads. 204, or 404 `unknown_session`.
pub(crate) fn close(shared: &Shared, req: &Request<Incoming>, id: &str) -> Response<Full<Bytes>> {
    if !crate::http::origin_allowed(&shared.config, req.headers()) {
        return error_response(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not close sessions here",
        );
    }
    // Dropping the registry's sender closes the session's queue of posts: its reader ends.
    match shared.sse.remove(id) {
        Some(_) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        None => error_response(
            StatusCode::NOT_FOUND,
            "unknown_session",
            "no such event stream (it ended already)",
        ),
    }
}

/// 128 random bits, hex: the session's id, which only the stream's reader learns.
fn session_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to a hash of the time and a counter. Not expected on
        // any platform the broker runs on.
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        hasher.write_u128(now.map_or(0, |d| d.as_nanos()));
        bytes[..8].copy_from_slice(&hasher.finish().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The response body of an event stream: what the session's writer wrote into the other end of
/// an in-memory pipe. It ends when the writer shuts the pipe (the session is over); when the
/// client goes away, hyper drops it and the writer's next write fails.
struct SseBody {
    read: DuplexStream,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut buf = [0u8; 8192];
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut self.read).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(None),
            Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => {
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(read.filled())))))
            }
        }
    }
}
