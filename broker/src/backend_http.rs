//! Calls from the broker to the application's backend over HTTP/1.1, plain or over TLS: one
//! POST of a JSON body on a fresh connection, with the caller's headers. Used by the
//! conversation authorization check (`authorize`) and by webhooks (`webhooks`).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

/// The largest answer read from a backend (webhook receiver, conversation authorizer).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Parses a backend URL: `http://host:port/path` or `https://host:port/path`.
pub fn parse_url(url: &str) -> Result<Uri, String> {
    let parsed: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
    if !scheme_ok || parsed.host().is_none() {
        return Err(format!("{url}: expected http(s)://host:port/path"));
    }
    Ok(parsed)
}

/// The broker's client for its backend: TLS for `https` URLs when built with a client
/// configuration (the system's roots plus `--backend-ca`, see `tls::client_config`).
#[derive(Clone, Default)]
pub struct Backend {
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Backend {
    pub fn new(tls: Option<Arc<ClientConfig>>) -> Backend {
        Backend {
            tls: tls.map(TlsConnector::from),
        }
    }

    /// POSTs `body` as JSON to `url` with `headers`; the status and the whole response body.
    /// No timeout here: callers put their own around it.
    pub async fn post_json(
        &self,
        url: &Uri,
        headers: &[(&'static str, String)],
        body: String,
    ) -> Result<(StatusCode, Bytes), String> {
        let host = url.host().unwrap_or("127.0.0.1");
        let https = url.scheme_str() == Some("https");
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let request = request(url, host, port, headers, body)?;
        if !https {
            return send(stream, request).await;
        }
        let Some(connector) = &self.tls else {
            return Err("https is not set up in this broker".into());
        };
        // An IP address in brackets (IPv6) is named without them.
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| e.to_string())?;
        let tls = connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(tls, request).await
    }
}

fn request(
    url: &Uri,
    host: &str,
    port: u16,
    headers: &[(&'static str, String)],
    body: String,
) -> Result<Request<Full<Bytes>>, String> {
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::post(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())
}

async fn send<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    // The backend is trusted, but a runaway answer must not fill the broker's memory.
    let bytes = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}
