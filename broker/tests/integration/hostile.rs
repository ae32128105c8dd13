//! A hostile client throws 10,000 random and mutated messages (and raw framing garbage) at a
//! broker process while 100 viewers receive a steady stream of events: the broker stays up, its
//! memory stays bounded, and the viewers miss nothing.

use std::time::Duration;

use fastwebsockets::OpCode;
use gavel_broker::protocol::{encode, Channel, ClientFrame, Format, Reply, ServerFrame};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// A small deterministic generator (xorshift64*): the same run every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A plausible frame to start mutating from.
fn valid_frame(rng: &mut Rng) -> ClientFrame {
    let id = rng.next();
    let channel = Channel::parse(&format!("auction:h{}", rng.below(50))).unwrap();
    match rng.below(6) {
        0 => ClientFrame::Subscribe {
            id,
            channel,
            since: Some(rng.below(10)),
            epoch: None,
        },
        1 => ClientFrame::Unsubscribe { id, channel },
        2 => ClientFrame::Ping { id },
        3 => ClientFrame::PlaceBid {
            id,
            auction_id: "none".into(),
            amount: rng.next() as i64,
            request_id: "r".into(),
            max_amount: None,
        },
        4 => ClientFrame::Presence {
            id,
            channel,
            limit: Some(rng.below(2000) as u32),
        },
        _ => ClientFrame::Publish {
            id,
            channel: Channel::parse("conversation:h").unwrap(),
            data: json!({"x": rng.next()}).into(),
        },
    }
}

/// Sends `count` hostile messages, reconnecting whenever the broker closes the connection.
async fn attack(addr: std::net::SocketAddr, count: usize, seed: u64) -> usize {
    let mut rng = Rng(seed);
    let mut reconnects = 0;
    let mut sent = 0;
    while sent < count {
        // One in four rounds is raw framing garbage after a real upgrade.
        if rng.below(4) == 0 {
            if let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await {
                let request = format!(
                    "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {}\r\n\r\n",
                    token("mallory")
                );
                let _ = tcp.write_all(request.as_bytes()).await;
                for _ in 0..10 {
                    let len = rng.below(300) as usize;
                    let _ = tcp.write_all(&rng.bytes(len)).await;
                    sent += 1;
                }
            }
            reconnects += 1;
            continue;
        }
        let mut c = TestClient::connect(addr, Some("mallory"), Format::MsgPack).await;
        while sent < count {
            let message = match rng.below(5) {
                0 => {
                    let len = rng.below(200) as usize;
                    (OpCode::Binary, rng.bytes(len))
                }
                1 | 2 => {
                    let mut bytes = encode(Format::MsgPack, &valid_frame(&mut rng))
                        .unwrap()
                        .to_vec();
                    for _ in 0..=rng.below(3) {
                        let at = rng.below(bytes.len() as u64) as usize;
                        bytes[at] = rng.next() as u8;
                    }
                    bytes.truncate(bytes.len() - rng.below(3) as usize);
                    (OpCode::Binary, bytes)
                }
                3 => {
                    let len = rng.below(100) as usize;
                    (OpCode::Text, rng.bytes(len))
                }
                _ => (
                    OpCode::Binary,
                    encode(Format::MsgPack, &valid_frame(&mut rng))
                        .unwrap()
                        .to_vec(),
                ),
            };
            sent += 1;
            if c.client.send_raw(message.0, message.1).await.is_err() {
                break; // closed on us: connect again
            }
        }
        reconnects += 1;
    }
    reconnects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_messages_while_a_hundred_viewers_miss_nothing() {
    const VIEWERS: usize = 100;
    const EVENTS: u64 = 200;
    let data_dir = temp_dir("hostile");
    let (mut child, addr) = spawn_broker_process(
        &[
            "--api-key",
            API_KEY,
            "--client-rate",
            "100000",
            "--client-burst",
            "100000",
        ],
        &data_dir,
    );

    let mut readers = Vec::new();
    for _ in 0..VIEWERS {
        let mut v = TestClient::connect(addr, None, Format::MsgPack).await;
        v.subscribe("auction:steady").await;
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while seqs.len() < EVENTS as usize {
                let event = v.next_event().await;
                if event.channel.as_str() == "auction:steady" {
                    seqs.push(event.seq);
                }
            }
            seqs
        }));
    }
    let rss_before = rss_kib(child.id());

    let attackers: Vec<_> = (0..2u64)
        .map(|n| tokio::spawn(attack(addr, 5_000, 0x9E37_79B9_7F4A_7C15 ^ n)))
        .collect();
    // The steady stream, at about 100 events a second, while the attack runs.
    for i in 0..EVENTS {
        let (status, _) = api(
            addr,
            "POST",
            "/api/publish",
            Some(json!({"channel": "auction:steady", "event": "tick", "data": {"i": i}})),
        )
        .await;
        assert_eq!(status, 200, "the broker answers during the attack");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut reconnects = 0;
    for a in attackers {
        reconnects += a.await.unwrap();
    }
    let expected: Vec<u64> = (1..=EVENTS).collect();
    for reader in readers {
        assert_eq!(
            reader.await.unwrap(),
            expected,
            "a viewer missed or reordered events"
        );
    }
    assert_eq!(api(addr, "GET", "/healthz", None).await.0, 200);
    let rss_after = rss_kib(child.id());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "broker memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        reconnects > 10,
        "the attack did get connections closed ({reconnects})"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the broker is still running"
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A room holds 1,000 messages of 16 KB, and 20 connections resubscribe from its start at once
/// and read nothing for a while: each replay is streamed in pieces as its reader takes them, so
/// the broker's peak memory grows by far less than the 320 MB the replays add up to (each
/// connection used to lay its whole replay out in one write buffer up front).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_full_replays_of_a_large_history_stay_within_bounded_memory() {
    const MESSAGES: usize = 1000;
    const READERS: usize = 20;
    let data_dir = temp_dir("replays");
    let (mut child, addr) = spawn_broker_process(
        &[
            "--api-key",
            API_KEY,
            "--outbound-bytes",
            "33554432",
            "--history-size",
            "1000",
        ],
        &data_dir,
    );
    let blob = "x".repeat(16_000);
    for i in 0..MESSAGES {
        let (status, _) = api(
            addr,
            "POST",
            "/api/publish",
            Some(json!({"channel": "broadcast", "event": "big", "data": {"i": i, "blob": blob}})),
        )
        .await;
        assert_eq!(status, 200);
    }
    let mut first = TestClient::connect(addr, None, Format::MsgPack).await;
    let Reply::Subscribed { epoch, seq, .. } = first.subscribe("broadcast").await else {
        panic!()
    };
    assert_eq!(seq, MESSAGES as u64);
    let rss_before = rss_kib(child.id());
    // Every reader asks for the whole history, then does not read for a second.
    let mut readers = Vec::new();
    for id in 0..READERS {
        let mut c = TestClient::connect(addr, None, Format::MsgPack).await;
        c.send(ClientFrame::Subscribe {
            id: id as u64,
            channel: Channel::parse("broadcast").unwrap(),
            since: Some(0),
            epoch: Some(epoch),
        })
        .await;
        readers.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak_unread = peak_rss_kib(child.id());
    let mut tasks = Vec::new();
    for mut c in readers {
        tasks.push(tokio::spawn(async move {
            let ServerFrame::Ok {
                result:
                    Reply::Subscribed {
                        recovered,
                        replayed,
                        ..
                    },
                ..
            } = c.client.next_frame().await.expect("the subscribe reply")
            else {
                panic!("not a subscribed reply")
            };
            assert_eq!((recovered, replayed), (Some(true), MESSAGES as u32));
            let mut frames = 0;
            while frames < MESSAGES {
                match c.client.next_raw().await.expect("connection") {
                    Ok(_) => frames += 1,
                    Err(close) => panic!("closed during the replay: {close:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let peak = peak_rss_kib(child.id());
    assert!(
        peak_unread < rss_before + 64 * 1024 && peak < rss_before + 96 * 1024,
        "broker memory {rss_before} KiB before the replays, peak {peak_unread} KiB while \
         unread, {peak} KiB after"
    );
    assert!(child.try_wait().unwrap().is_none());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A replay larger than the connection's pending-bytes bound is not sent: the subscribe says
/// `recovered: false` and carries the snapshot to reload from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_over_the_pending_bound_is_answered_with_a_snapshot() {
    let b = TestBroker::start(|c| c.outbound_bytes = 256 * 1024).await;
    let blob = "y".repeat(10_000);
    for i in 0..50 {
        b.broker
            .publish(&channel("broadcast"), "big", json!({"i": i, "blob": blob}));
    }
    let epoch = b.broker.rooms().get(&channel("broadcast")).unwrap().epoch();
    let mut c = b.connect(None).await;
    let Reply::Subscribed {
        recovered,
        snapshot,
        seq,
        ..
    } = c.subscribe_since("broadcast", Some(0), Some(epoch)).await
    else {
        panic!()
    };
    assert_eq!((recovered, seq), (Some(false), 50));
    assert_eq!(snapshot.expect("a snapshot").seq, 50);
    // The same on JSON, whose encodings are made (frame by frame, up to the bound) to size it.
    let mut json_client = TestClient::connect(b.addr, None, Format::Json).await;
    let Reply::Subscribed { recovered, .. } = json_client
        .subscribe_since("broadcast", Some(0), Some(epoch))
        .await
    else {
        panic!()
    };
    assert_eq!(recovered, Some(false));
    // A replay that fits is still sent.
    let Reply::Subscribed {
        recovered,
        replayed,
        ..
    } = b
        .connect(None)
        .await
        .subscribe_since("broadcast", Some(45), Some(epoch))
        .await
    else {
        panic!()
    };
    assert_eq!((recovered, replayed), (Some(true), 5));
}

/// A conversation member sends 100 messages of 65,000 empty arrays (64 KiB each), which a room
/// keeps in its history. `data` is kept about as large as it is on the wire, so the broker grows
/// by far less than the 215 MB it took when each message was a JSON tree (2.2 MB each). A JSON
/// member of the same room reads every message whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tiny_values_in_data_cost_about_their_wire_size() {
    const MESSAGES: u64 = 100;
    const ITEMS: usize = 65_000;
    let data_dir = temp_dir("tiny-values");
    let (mut child, addr) = spawn_broker_process(&["--client-rate", "1000"], &data_dir);
    let conv = Channel::parse("conversation:tiny").unwrap();
    let mut sender = TestClient::connect(addr, Some("mallory"), Format::MsgPack).await;
    let mut reader = TestClient::connect(addr, Some("ann"), Format::Json).await;
    sender.subscribe("conversation:tiny").await;
    reader.subscribe("conversation:tiny").await;
    let data = gavel_broker::protocol::Data::from(json!(vec![json!([]); ITEMS]));
    assert!(encode(Format::MsgPack, &data).unwrap().len() < 65_100);
    let expected = data.clone();
    let reading = tokio::spawn(async move {
        for seq in 1..=MESSAGES {
            let event = reader.next_event().await;
            assert_eq!(event.seq, seq);
            assert_eq!(event.data, expected, "the JSON reader gets the same value");
        }
    });
    let rss_before = rss_kib(child.id());
    for _ in 0..MESSAGES {
        let reply = sender
            .request(|id| ClientFrame::Publish {
                id,
                channel: conv.clone(),
                data: data.clone(),
            })
            .await
            .expect("a member may publish");
        assert!(matches!(reply, Reply::Published { .. }), "{reply:?}");
    }
    let rss_after = rss_kib(child.id());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "broker memory grew from {rss_before} KiB to {rss_after} KiB for {MESSAGES} messages"
    );
    reading.await.unwrap();
    assert!(child.try_wait().unwrap().is_none());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
}
