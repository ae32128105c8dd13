//! Limits over real sockets: connection limits (total and per address), floods of frames,
//! endless fragments, unmasked frames and slow request heads are refused or closed with their
//! documented codes, and the broker stays up.

use std::time::Duration;

use fastwebsockets::OpCode;
use gavel_broker::protocol::{encode, ClientFrame, ErrorCode, Format, ServerFrame};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::UPGRADE;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_with_503_and_retry_after() {
    let b = TestBroker::start(|c| {
        c.max_connections = 3;
        c.max_connections_per_ip = 2;
    })
    .await;
    let _one = b.connect(None).await;
    let _two = b.connect(None).await;
    let (status, _, headers) = http_with_headers(b.addr, "GET", "/ws", &UPGRADE).await;
    assert_eq!(status, 503, "the third from one address");
    assert_eq!(headers.get("retry-after").unwrap(), "5");
    drop(_two);
    eventually("a place is free again", || async {
        http_with_headers(b.addr, "GET", "/ws", &UPGRADE).await.0 == 101
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_gets_rate_limited_then_closed_with_1008() {
    let b = TestBroker::start(|c| {
        c.client_rate = 1.0;
        c.client_burst = 5;
    })
    .await;
    let mut bystander = b.connect(None).await;
    bystander.subscribe("auction:calm").await;
    let mut flood = b.connect(None).await;
    for id in 0..5 {
        flood.send(ClientFrame::Ping { id }).await;
    }
    flood.send(ClientFrame::Ping { id: 5 }).await;
    let mut limited = false;
    for _ in 0..6 {
        if let ServerFrame::Error(e) = flood.recv().await {
            // Dropped before it is decoded: the error cannot name the request.
            assert_eq!((e.id, e.code), (None, ErrorCode::RateLimited));
            limited = true;
        }
    }
    assert!(limited);
    // Keep going: closed with 1008.
    for id in 6..40 {
        if flood.client.send(&ClientFrame::Ping { id }).await.is_err() {
            break;
        }
    }
    assert_eq!(flood.closed().await, Some(1008));
    b.broker
        .publish(&channel("auction:calm"), "still", json!(null));
    assert_eq!(bystander.next_event().await.event, "still");
}

/// What a flooding client sends: requests, WebSocket pings, or empty pongs.
#[derive(Clone, Copy, Debug)]
enum Flood {
    Requests,
    Pings,
    Pongs,
}

/// A client that keeps sending at 40 times `--client-rate` is closed with 1008, even though a
/// token trickles in now and then; so is one that floods with pings or pongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_flood_of_any_frame_is_closed_with_1008() {
    let b = TestBroker::start(|c| {
        c.client_rate = 5.0;
        c.client_burst = 50;
    })
    .await;
    for kind in [Flood::Requests, Flood::Pings, Flood::Pongs] {
        let mut flood = b.connect(None).await;
        // At most 6 s of sending at about 200 messages a second; the broker must cut it off.
        for id in 0..1200 {
            let sent = match kind {
                Flood::Requests => flood.client.send(&ClientFrame::Ping { id }).await,
                Flood::Pings => flood.client.send_raw(OpCode::Ping, Vec::new()).await,
                Flood::Pongs => flood.client.send_raw(OpCode::Pong, Vec::new()).await,
            };
            if sent.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(flood.closed().await, Some(1008), "{kind:?}");
    }
}

/// A message may not be spread over endless (empty) continuation frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_continuation_frames_close_the_connection() {
    let b = TestBroker::start(|_| {}).await;
    let mut flood = b.connect(None).await;
    let ping = encode(Format::MsgPack, &ClientFrame::Ping { id: 1 }).unwrap();
    flood
        .client
        .send_fragment(false, OpCode::Binary, ping[..2].to_vec())
        .await
        .unwrap();
    for _ in 0..200 {
        if flood
            .client
            .send_fragment(false, OpCode::Continuation, Vec::new())
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(flood.closed().await, Some(1002));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_off() {
    let b = TestBroker::start(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut slow = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(HANG, slow.read(&mut buf))
        .await
        .expect("the broker cut it off");
    // Closed (0 bytes, or a 408 answer and then close): either way it did not wait forever.
    let n = read.unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// A connection from a given loopback source address.
async fn connect_from(b: &TestBroker, source: &str) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(b.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn.with_upgrades());
    let mut request = hyper::Request::get("/ws").header("host", b.addr.to_string());
    for (name, value) in UPGRADE {
        request = request.header(name, value);
    }
    let response = sender
        .send_request(
            request
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status == 101 {
        // Keep the connection open for the rest of the test.
        tokio::spawn(async move {
            let _upgraded = hyper::upgrade::on(response).await;
            std::future::pending::<()>().await;
        });
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_connection_limit_counts_every_address() {
    let b = TestBroker::start(|c| {
        c.max_connections = 3;
        c.max_connections_per_ip = 2;
    })
    .await;
    assert_eq!(connect_from(&b, "127.0.0.1").await, 101);
    assert_eq!(connect_from(&b, "127.0.0.2").await, 101);
    assert_eq!(connect_from(&b, "127.0.0.3").await, 101);
    let (status, body, headers) = http_with_headers(b.addr, "GET", "/ws", &UPGRADE).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (503, Some("too_many_connections"))
    );
    assert_eq!(headers.get("retry-after").unwrap(), "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmasked_client_frames_are_closed_with_1002() {
    let b = TestBroker::start(|_| {}).await;
    let mut tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // A binary frame with the mask bit clear: what a server may send, never a client.
    tcp.write_all(&[0x82, 0x01, 0x90]).await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(HANG, tcp.read_to_end(&mut received))
        .await
        .expect("closed");
    // After the 101 and the hello frame comes a close frame: 0x88, length, then 1002.
    let close = received
        .windows(4)
        .any(|w| w[0] == 0x88 && w[2..4] == 1002u16.to_be_bytes());
    assert!(
        close,
        "no close 1002 in {:02x?}",
        &received[received.len().saturating_sub(40)..]
    );
}

/// With a per-address limit, plain HTTP connections count too (apart from WebSockets): one
/// address cannot hold every file descriptor with idle keep-alive connections. Beyond the limit
/// a connection's request is answered 503 with `Retry-After`, and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_count_against_the_address() {
    let b = TestBroker::start(|c| c.max_connections_per_ip = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = tokio::net::TcpStream::connect(b.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = hyper::Request::get("/healthz")
            .header("host", b.addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
        held.push(sender);
    }
    let (status, body, headers) = http_with_headers(b.addr, "GET", "/healthz", &[]).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (503, Some("too_many_connections_from_address"))
    );
    assert_eq!(headers.get("retry-after").unwrap(), "5");
    assert_eq!(headers.get("connection").unwrap(), "close");

    // One goes: a WebSocket can connect (its handshake takes the free place; a probe's
    // connection may hold it a moment after the probe), and once upgraded it holds no HTTP
    // place: with one keep-alive connection and the WebSocket open, a request still passes.
    held.pop();
    eventually("a WebSocket connects", || async {
        connect_from(&b, "127.0.0.1").await == 101
    })
    .await;
    eventually("the upgraded connection left the HTTP count", || async {
        http_with_headers(b.addr, "GET", "/healthz", &[]).await.0 == 200
    })
    .await;
}

/// When the broker process has no file descriptor left, a new connection is answered 503
/// `too_many_connections` at once, through the descriptor the broker holds in reserve for it,
/// instead of waiting unanswered in the listen queue until some connection ends. Once the idle
/// connections go, the broker serves as before, and it counted what it shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_a_new_connection_is_refused_at_once() {
    let data_dir = temp_dir("fd-limit");
    // Idle connections hold their descriptor for a minute, beyond `HANG`.
    let (mut child, addr) =
        spawn_broker_process_with(&["--handshake-timeout", "60s"], &data_dir, Some(128));
    let mut idle = Vec::new();
    for _ in 0..160 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(HANG, probe.read_to_end(&mut answer))
        .await
        .expect("answered, not left waiting")
        .expect("closed cleanly after the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("\"too_many_connections\""),
        "{answer}"
    );
    drop(idle);
    let get = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: gavel\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    };
    let served = tokio::time::timeout(HANG, async {
        loop {
            if get("/healthz").await.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        served.is_ok(),
        "the broker serves again once connections end"
    );
    let metrics = get("/metrics").await;
    let shed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gavel_connections_shed_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gavel_connections_shed_total exported");
    assert!(shed >= 1, "shed connections counted: {shed}");
    // The standard process gauges, for the alert before it comes to this: the limit as set
    // (counted every five seconds, so wait for them), the descriptors open, the memory.
    let gauge = |metrics: &str, name: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    };
    let metrics = tokio::time::timeout(HANG, async {
        loop {
            let metrics = get("/metrics").await;
            if gauge(&metrics, "process_max_fds").is_some() {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("process gauges exported");
    assert_eq!(gauge(&metrics, "process_max_fds"), Some(128.0));
    let open = gauge(&metrics, "process_open_fds").unwrap();
    assert!((4.0..=128.0).contains(&open), "open descriptors: {open}");
    assert!(gauge(&metrics, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(gauge(&metrics, "process_threads").unwrap() >= 2.0);
    assert!(gauge(&metrics, "process_start_time_seconds").unwrap() > 1.7e9);
    assert!(child.try_wait().unwrap().is_none());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Over `--max-rooms`, rooms nobody is subscribed to are dropped before their TTL (once idle
/// for a tenth of it, here 1 s), those idle longest first; a room with a subscriber stays and
/// keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_room_limit_idle_rooms_go_first() {
    let b = TestBroker::start(|c| {
        c.max_rooms = 10;
        c.history_ttl = Duration::from_secs(10);
    })
    .await;
    let mut ann = b.connect(Some("ann")).await;
    ann.subscribe("conversation:keep").await;
    // Thirty rooms with an event each and nobody in them (a user's channel while they are away).
    for n in 0..30 {
        b.broker
            .publish(&channel(&format!("user:u{n}")), "note", json!({"n": n}));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rooms = || async {
        let (status, stats) = api(b.addr, "GET", "/api/stats", None).await;
        assert_eq!(status, 200);
        stats["rooms"].as_u64().expect("rooms in the stats")
    };
    let under = tokio::time::timeout(HANG, async {
        while rooms().await > 10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(under.is_ok(), "the sweep brings the rooms under the limit");
    let status = |path: String| async move { api(b.addr, "GET", &path, None).await.0 };
    assert_eq!(status("/api/rooms/conversation:keep".into()).await, 200);
    assert_eq!(
        status("/api/rooms/user:u0".into()).await,
        404,
        "idle longest: gone"
    );
    assert_eq!(
        status("/api/rooms/user:u29".into()).await,
        200,
        "idle least: kept"
    );
    b.broker.publish(
        &channel("conversation:keep"),
        "note",
        json!({"still": "here"}),
    );
    assert_eq!(ann.next_event().await.seq, 1);
}
