//! Calls from the broker to the application's backend over plain HTTP/1.1: one POST of a JSON
//! body on a fresh connection, with the caller's headers. Used by the conversation
//! authorization check (`authorize`) and by webhooks (`webhooks`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

/// Parses a backend URL: `http://host:port/path` (no TLS: put the backend, or a TLS proxy, on
/// a private network).
pub fn parse_url(url: &str) -> Result<Uri, String> {
    let parsed: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if parsed.scheme_str() != Some("http") || parsed.host().is_none() {
        return Err(format!("{url}: expected http://host:port/path"));
    }
    Ok(parsed)
}

/// POSTs `body` as JSON to `url` with `headers`; the status and the whole response body. No
/// timeout here: callers put their own around it.
pub async fn post_json(
    url: &Uri,
    headers: &[(&'static str, String)],
    body: String,
) -> Result<(StatusCode, Bytes), String> {
    let failed = |e: &dyn std::fmt::Display| e.to_string();
    let host = url.host().unwrap_or("127.0.0.1");
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| failed(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(conn);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::post(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| failed(&e))?;
    let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    Ok((status, bytes))
}
