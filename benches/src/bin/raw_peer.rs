//! The floor for the Socket.IO comparison: the least work a tokio server can do for the same
//! traffic. It speaks the subset of Socket.IO v4 (engine.io over WebSocket, text packets) that
//! `gavel-loadgen --driver socketio` uses (`join-auction`, `place-bid` with acknowledgements,
//! `bid-placed` to the room) with no durability, no auth, no limits and no metrics. A broadcast is
//! formatted once; each recipient's frame is appended to its pending buffer and its writer task,
//! woken only when the buffer was empty, writes everything pending with one syscall.
//!
//! Usage: `raw_peer [ADDR]` (default 127.0.0.1:7792; loopback only). Not for production.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// One connection's pending output and the wake-up of its writer.
struct Conn {
    pending: Mutex<Vec<u8>>,
    wake: Notify,
}

impl Conn {
    /// Appends one text frame; wakes the writer if nothing was pending.
    fn send(&self, text: &[u8]) {
        let was_empty = {
            let mut pending = lock(&self.pending);
            let was_empty = pending.is_empty();
            put_text_frame(&mut pending, text);
            was_empty
        };
        if was_empty {
            self.wake.notify_one();
        }
    }
}

#[derive(Default)]
struct Auction {
    price: i64,
    bids: u64,
}

#[derive(Default)]
struct Peer {
    rooms: Mutex<HashMap<String, Vec<Arc<Conn>>>>,
    auctions: Mutex<HashMap<String, Auction>>,
    next_sid: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An unmasked server text frame (RFC 6455 §5.2).
fn put_text_frame(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.push(0x81);
    match payload.len() {
        n @ 0..=125 => buf.push(n as u8),
        n @ 126..=0xFFFF => {
            buf.push(126);
            buf.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            buf.push(127);
            buf.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    buf.extend_from_slice(payload);
}

/// The next client frame's opcode and unmasked payload; `None` at the end or on a bad frame.
async fn read_frame<R: AsyncRead + Unpin>(read: &mut R) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    read.read_exact(&mut head).await.ok()?;
    let len = match head[1] & 0x7F {
        126 => u64::from(read.read_u16().await.ok()?),
        127 => read.read_u64().await.ok()?,
        n => u64::from(n),
    };
    if len > 1 << 20 {
        return None;
    }
    let mut mask = [0u8; 4];
    if head[1] & 0x80 != 0 {
        read.read_exact(&mut mask).await.ok()?;
    }
    let mut payload = vec![0u8; len as usize];
    read.read_exact(&mut payload).await.ok()?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Some((head[0] & 0x0F, payload))
}

/// `42<ack>["event", data]` → (ack, event, data).
fn parse_event(text: &str) -> Option<(Option<u64>, String, Value)> {
    let rest = text.strip_prefix("42")?;
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    let ack = rest[..digits].parse().ok();
    let Value::Array(mut parts) = serde_json::from_str(&rest[digits..]).ok()? else {
        return None;
    };
    if parts.len() < 2 {
        return None;
    }
    let data = parts.swap_remove(1);
    Some((ack, parts[0].as_str()?.to_owned(), data))
}

fn ack_text(ack: Option<u64>, data: Value) -> Option<Vec<u8>> {
    ack.map(|id| format!("43{id}{}", json!([data])).into_bytes())
}

async fn serve_socket(peer: Arc<Peer>, stream: TcpStream, read_ahead: Vec<u8>, user: String) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut read = std::io::Cursor::new(read_ahead).chain(read);
    let conn = Arc::new(Conn {
        pending: Mutex::new(Vec::new()),
        wake: Notify::new(),
    });
    let sid = peer.next_sid.fetch_add(1, Ordering::Relaxed);
    conn.send(
        format!(
            r#"0{{"sid":"raw{sid}","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}}"#
        )
        .as_bytes(),
    );
    let writer = {
        let conn = Arc::clone(&conn);
        tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                conn.wake.notified().await;
                std::mem::swap(&mut out, &mut *lock(&conn.pending));
                if out.is_empty() {
                    continue;
                }
                if write.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        })
    };
    let mut joined: Vec<String> = Vec::new();
    while let Some((opcode, payload)) = read_frame(&mut read).await {
        match opcode {
            0x8 => break,
            0x1 => {}
            _ => continue,
        }
        let Ok(text) = std::str::from_utf8(&payload) else {
            break;
        };
        if text == "40" {
            conn.send(format!(r#"40{{"sid":"raw{sid}"}}"#).as_bytes());
            continue;
        }
        let Some((ack, event, data)) = parse_event(text) else {
            continue;
        };
        let auction_id = data["auctionId"].as_str().unwrap_or_default().to_owned();
        match event.as_str() {
            "join-auction" => {
                let room = format!("auction:{auction_id}");
                lock(&peer.rooms)
                    .entry(room.clone())
                    .or_default()
                    .push(Arc::clone(&conn));
                joined.push(room);
                let (price, bids) = {
                    let auctions = lock(&peer.auctions);
                    auctions
                        .get(&auction_id)
                        .map_or((0, 0), |a| (a.price, a.bids))
                };
                if let Some(text) =
                    ack_text(ack, json!({ "ok": true, "price": price, "bids": bids }))
                {
                    conn.send(&text);
                }
            }
            "place-bid" => {
                let amount = data["amount"].as_i64().unwrap_or(0);
                let accepted = {
                    let mut auctions = lock(&peer.auctions);
                    let a = auctions.entry(auction_id.clone()).or_default();
                    if amount > a.price {
                        a.price = amount;
                        a.bids += 1;
                        Some(a.bids)
                    } else {
                        None
                    }
                };
                let Some(bids) = accepted else {
                    if let Some(text) = ack_text(ack, json!({ "ok": false, "reason": "too_low" })) {
                        conn.send(&text);
                    }
                    continue;
                };
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let event = format!(
                    "42{}",
                    json!(["bid-placed", { "auctionId": auction_id, "amount": amount,
                        "bidder": user, "bids": bids, "ts": ts }])
                );
                let room = format!("auction:{auction_id}");
                if let Some(members) = lock(&peer.rooms).get(&room) {
                    for member in members {
                        member.send(event.as_bytes());
                    }
                }
                if let Some(text) =
                    ack_text(ack, json!({ "ok": true, "amount": amount, "bids": bids }))
                {
                    conn.send(&text);
                }
            }
            _ => {}
        }
    }
    {
        let mut rooms = lock(&peer.rooms);
        for room in joined {
            if let Some(members) = rooms.get_mut(&room) {
                members.retain(|m| !Arc::ptr_eq(m, &conn));
            }
        }
    }
    writer.abort();
}

fn query_user(req: &Request<Incoming>) -> String {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("user="))
        .unwrap_or("anonymous")
        .to_owned()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7792".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if !addr.ip().is_loopback() {
        eprintln!("raw_peer: binds loopback addresses only");
        std::process::exit(2);
    }
    let listener = TcpListener::bind(addr).await?;
    println!("raw tokio peer on {addr}");
    let peer = Arc::new(Peer::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let peer = Arc::clone(&peer);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let peer = Arc::clone(&peer);
                async move {
                    let user = query_user(&req);
                    let Ok((response, upgrade)) = fastwebsockets::upgrade::upgrade(&mut req) else {
                        return Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(400)
                                .body(Empty::<Bytes>::new())
                                .unwrap_or_default(),
                        );
                    };
                    tokio::spawn(async move {
                        let Ok(ws) = upgrade.await else { return };
                        let upgraded = ws.into_inner().into_inner();
                        if let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() {
                            let stream = parts.io.into_inner();
                            serve_socket(peer, stream, parts.read_buf.to_vec(), user).await;
                        }
                    });
                    let (parts, _) = response.into_parts();
                    Ok(Response::from_parts(parts, Empty::new()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}
