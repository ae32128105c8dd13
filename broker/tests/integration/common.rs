//! Shared helpers: start a broker on 127.0.0.1:0, connect clients, send requests, read frames,
//! call the HTTP API. Timeouts here only guard against hangs; they are never the assertion.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gavel_broker::protocol::{
    Channel, ClientFrame, ErrorFrame, EventFrame, Format, Reply, RequestId, ServerFrame,
};
use gavel_broker::{Broker, Config};
use gavel_client::{Client, ConnectOptions, Incoming};
use http_body_util::{BodyExt, Full};
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

pub const API_KEY: &str = "test-api-key-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789";

/// A token for `user`, valid for an hour, allowed into every conversation.
pub fn token(user: &str) -> String {
    token_with(user, None, Some(vec!["conversation:*".into()]), 3600)
}

/// A token with the given roles and channels, expiring `ttl_secs` from now (negative: past).
pub fn token_with(
    user: &str,
    roles: Option<Vec<String>>,
    channels: Option<Vec<String>>,
    ttl_secs: i64,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = gavel_broker::protocol::Claims {
        sub: user.into(),
        exp: (now + ttl_secs).max(0) as u64,
        roles,
        channels,
    };
    gavel_client::token::sign_hs256(JWT_SECRET.as_bytes(), &claims).unwrap()
}
/// Guard against a hang; generous because the machine is shared and slow in debug builds.
pub const HANG: Duration = Duration::from_secs(30);

pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Broker,
    pub data_dir: std::path::PathBuf,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gavel-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl TestBroker {
    /// A broker with the default config, the test API key, and `tweak` applied.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::defaults();
        config.api_key = Some(API_KEY.into());
        config.jwt_secret = Some(JWT_SECRET.into());
        config.allow_anonymous = true;
        config.data_dir = temp_dir("broker");
        tweak(&mut config);
        let data_dir = config.data_dir.clone();
        let broker = Broker::new(config).expect("valid test config");
        let serving = broker.clone();
        tokio::spawn(async move { serving.serve(listener).await });
        TestBroker {
            addr,
            broker,
            data_dir,
        }
    }

    pub async fn connect(&self, user: Option<&str>) -> TestClient {
        TestClient::connect(self.addr, user, Format::MsgPack).await
    }

    pub async fn connect_json(&self, user: Option<&str>) -> TestClient {
        TestClient::connect(self.addr, user, Format::Json).await
    }

    /// A GET with the API key (needed under `/api/`, ignored elsewhere).
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let auth = format!("Bearer {API_KEY}");
        http(self.addr, "GET", path, &[("authorization", &auth)], None).await
    }

    pub async fn publish(&self, body: Value) -> (StatusCode, Value) {
        let auth = format!("Bearer {API_KEY}");
        http(
            self.addr,
            "POST",
            "/api/publish",
            &[("authorization", &auth)],
            Some(body.to_string()),
        )
        .await
    }
}

/// A client with request/response helpers.
pub struct TestClient {
    pub client: Client,
    pub connection_id: u64,
    /// Frames read while waiting for a reply, handed out by `recv` before anything new.
    pending: VecDeque<ServerFrame>,
}

impl TestClient {
    pub async fn connect(addr: SocketAddr, user: Option<&str>, format: Format) -> TestClient {
        TestClient::connect_with(addr, user.map(token), format).await
    }

    pub async fn connect_with(
        addr: SocketAddr,
        token: Option<String>,
        format: Format,
    ) -> TestClient {
        let options = ConnectOptions {
            format,
            token,
            ..ConnectOptions::default()
        };
        let client = tokio::time::timeout(HANG, Client::connect(addr, options))
            .await
            .expect("connect hung")
            .expect("connect");
        TestClient::after_connect(client).await
    }

    /// Reads the `hello` frame of a freshly connected client.
    pub async fn after_connect(mut client: Client) -> TestClient {
        match recv_raw(&mut client).await {
            Incoming::Frame(ServerFrame::Hello { connection_id, .. }) => TestClient {
                client,
                connection_id,
                pending: VecDeque::new(),
            },
            other => panic!("expected hello, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: ClientFrame) {
        self.client.send(&frame).await.expect("send");
    }

    /// Sends a request built from a fresh id and returns the reply (`Ok`) or error frame,
    /// keeping unrelated frames (events, signals) that arrive first for `recv`.
    pub async fn request(
        &mut self,
        make: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<Reply, ErrorFrame> {
        let id = self.client.next_id();
        self.send(make(id)).await;
        loop {
            let frame = match recv_raw(&mut self.client).await {
                Incoming::Frame(frame) => frame,
                Incoming::Closed { code, reason } => panic!("connection closed: {code} {reason}"),
            };
            match frame {
                ServerFrame::Ok { id: got, result } if got == id => return Ok(result),
                ServerFrame::Error(e) if e.id == Some(id) => return Err(e),
                other => self.pending.push_back(other),
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) -> Reply {
        self.subscribe_since(channel, None, None).await
    }

    pub async fn subscribe_since(
        &mut self,
        channel: &str,
        since: Option<u64>,
        epoch: Option<u64>,
    ) -> Reply {
        let channel = Channel::parse(channel).unwrap();
        self.request(|id| ClientFrame::Subscribe {
            id,
            channel,
            since,
            epoch,
        })
        .await
        .expect("subscribe accepted")
    }

    /// The next frame of any kind.
    pub async fn recv(&mut self) -> ServerFrame {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        match recv_raw(&mut self.client).await {
            Incoming::Frame(frame) => frame,
            Incoming::Closed { code, reason } => panic!("connection closed: {code} {reason}"),
        }
    }

    /// The next sequenced event, skipping viewer counts and other signals.
    pub async fn next_event(&mut self) -> EventFrame {
        loop {
            if let ServerFrame::Event(event) = self.recv().await {
                return event;
            }
        }
    }

    /// Reads until the broker closes the connection; returns the close code (None: the socket
    /// ended without a close frame).
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(HANG, self.client.next())
                .await
                .expect("no close")
            {
                Ok(Incoming::Closed { code, .. }) => return Some(code),
                Ok(Incoming::Frame(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}

pub async fn recv_raw(client: &mut Client) -> Incoming {
    tokio::time::timeout(HANG, client.next())
        .await
        .expect("no frame arrived")
        .expect("read failed")
}

/// Polls `check` until it returns true; panics after the hang guard.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request; the body is parsed as JSON when it is JSON, else returned as a string.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (StatusCode, Value) {
    let (status, value, _) = http_full(addr, method, path, headers, body).await;
    (status, value)
}

/// A bodiless request, with the response headers.
pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value, hyper::HeaderMap) {
    http_full(addr, method, path, headers, None).await
}

async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (StatusCode, Value, hyper::HeaderMap) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let response = tokio::time::timeout(HANG, sender.send_request(request))
        .await
        .expect("http hung")
        .expect("http request");
    let status = response.status();
    let response_headers = response.headers().clone();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return (status, Value::Null, response_headers);
    }
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value, response_headers)
}

pub fn channel(name: &str) -> Channel {
    Channel::parse(name).unwrap()
}

/// A `gavel-broker` child process on an ephemeral port, started with `args`; returns it with
/// the address it logged. Its stdout is drained in the background.
/// A child process that is killed (and reaped) when dropped, so a failing test leaves none
/// behind.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_broker_process(args: &[&str], data_dir: &std::path::Path) -> (KillOnDrop, SocketAddr) {
    spawn_broker_process_with(args, data_dir, None)
}

/// [`spawn_broker_process`], with the process's open-file limit (soft and hard) set to
/// `open_files` when given.
pub fn spawn_broker_process_with(
    args: &[&str],
    data_dir: &std::path::Path,
    open_files: Option<u64>,
) -> (KillOnDrop, SocketAddr) {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut command = Command::new(env!("CARGO_BIN_EXE_gavel-broker"));
    command
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--jwt-secret", JWT_SECRET, "--allow-anonymous"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(limit) = open_files {
        let limit = libc::rlimit {
            rlim_cur: limit as libc::rlim_t,
            rlim_max: limit as libc::rlim_t,
        };
        // SAFETY: between fork and exec, only setrlimit (async-signal-safe) runs.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command.spawn().expect("start gavel-broker");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        let entry: Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(addr) = entry["fields"]["addr"].as_str() {
            let addr = addr.parse().unwrap();
            std::thread::spawn(move || lines.for_each(drop));
            return (KillOnDrop(child), addr);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the broker never logged its address");
}

/// Creates an open auction `id` (see [`open_auction`]) through the admin API; 201 expected.
pub async fn create_auction(addr: SocketAddr, id: &str, ends_in_ms: u64) {
    let (status, body) = api(
        addr,
        "POST",
        "/api/auctions",
        Some(open_auction(id, ends_in_ms)),
    )
    .await;
    assert_eq!(status, 201, "creating {id}: {body}");
}

/// An auction definition that is open now and ends in `ends_in_ms`.
pub fn open_auction(id: &str, ends_in_ms: u64) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    serde_json::json!({
        "id": id,
        "title": format!("Lot {id}"),
        "currency": "EUR",
        "starting_price": 1000,
        "increment": {"fixed": 10},
        "starts_at": now - 1000,
        "ends_at": now + ends_in_ms,
    })
}

pub async fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let auth = format!("Bearer {API_KEY}");
    http(
        addr,
        method,
        path,
        &[("authorization", &auth)],
        body.map(|b| b.to_string()),
    )
    .await
}

/// Every bid of an auction, through the paginated API.
pub async fn all_bids(addr: SocketAddr, auction: &str) -> Vec<Value> {
    let mut bids = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = api(
            addr,
            "GET",
            &format!("/api/auctions/{auction}/bids?after={after}&limit=1000"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        let got = page["bids"].as_array().unwrap().clone();
        bids.extend(got);
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => return bids,
        }
    }
}

/// A subscribe request for `name`, for `TestClient::request`.
pub fn sub_frame(name: &str) -> impl FnOnce(RequestId) -> ClientFrame {
    let channel = Channel::parse(name).unwrap();
    move |id| ClientFrame::Subscribe {
        id,
        channel,
        since: None,
        epoch: None,
    }
}

impl TestClient {
    /// Sends an `auth` frame and returns the reply or error.
    pub async fn auth(&mut self, token: String) -> Result<Reply, ErrorFrame> {
        self.request(|id| ClientFrame::Auth { id, token }).await
    }

    /// Places a bid and returns the reply.
    pub async fn bid(&mut self, auction: &str, amount: i64, request_id: &str) -> Reply {
        let auction_id = auction.to_owned();
        let request_id = request_id.to_owned();
        self.request(|id| ClientFrame::PlaceBid {
            id,
            auction_id,
            amount,
            request_id,
            max_amount: None,
        })
        .await
        .expect("place_bid is answered with ok")
    }
}

pub use gavel_broker::testing::RedisServer;
