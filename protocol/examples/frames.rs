//! Prints one example of every frame in both encodings: the JSON text and a hex dump of the
//! MessagePack bytes. `docs/protocol.md` quotes its output; regenerate with
//! `cargo run -p gavel-protocol --example frames`.

use gavel_protocol::*;
use serde_json::json;

fn channel(name: &str) -> Channel {
    Channel::parse(name).expect("example channel")
}

fn user(id: &str) -> UserId {
    UserId::parse(id).expect("example user")
}

fn hexdump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (row, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "{:08x}  {:<47}  |{}|\n",
            row * 16,
            hex.join(" "),
            ascii
        ));
    }
    out
}

fn show<T: serde::Serialize>(title: &str, frame: &T) {
    let json = encode(Format::Json, frame).expect("json");
    let msgpack = encode(Format::MsgPack, frame).expect("msgpack");
    println!("### {title}\n");
    println!(
        "JSON (`gavel.v1.json`, text message):\n\n```json\n{}\n```\n",
        String::from_utf8_lossy(&json)
    );
    println!(
        "MessagePack (`gavel.v1.msgpack`, binary message, {} bytes):\n\n```\n{}```\n",
        msgpack.len(),
        hexdump(&msgpack)
    );
}

fn main() {
    let viewers = ViewerCounts {
        connections: 1204,
        users: 987,
        peak_connections: 1310,
        peak_users: 1022,
    };
    println!("## Client → broker\n");
    show(
        "subscribe",
        &ClientFrame::Subscribe {
            id: 1,
            channel: channel("auction:42"),
            since: None,
            epoch: None,
        },
    );
    show(
        "subscribe with since (recovery)",
        &ClientFrame::Subscribe {
            id: 2,
            channel: channel("conversation:c7"),
            since: Some(17),
            epoch: Some(1795333703380369),
        },
    );
    show(
        "unsubscribe",
        &ClientFrame::Unsubscribe {
            id: 3,
            channel: channel("auction:42"),
        },
    );
    show(
        "publish",
        &ClientFrame::Publish {
            id: 4,
            channel: channel("conversation:c7"),
            data: json!({"text": "is it still available?"}).into(),
        },
    );
    show(
        "typing",
        &ClientFrame::Typing {
            id: 5,
            channel: channel("conversation:c7"),
            typing: true,
        },
    );
    show(
        "read",
        &ClientFrame::Read {
            id: 6,
            channel: channel("conversation:c7"),
            seq: 18,
        },
    );
    show(
        "presence",
        &ClientFrame::Presence {
            id: 7,
            channel: channel("auction:42"),
            limit: Some(50),
        },
    );
    show(
        "auth",
        &ClientFrame::Auth {
            id: 10,
            token: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1NDIiLCJleHAiOjE3OTUzMzczMDN9.sig".into(),
        },
    );
    show("ping", &ClientFrame::Ping { id: 8 });
    show(
        "place_bid",
        &ClientFrame::PlaceBid {
            id: 9,
            auction_id: "42".into(),
            amount: 125_000,
            request_id: "7f3c-0001".into(),
            max_amount: Some(150_000),
        },
    );

    println!("## Broker → client\n");
    show(
        "hello",
        &ServerFrame::Hello {
            protocol: PROTOCOL_VERSION.into(),
            connection_id: 5120,
            user: Some(user("u42")),
            server_ts: 1795333703380,
            ping_interval_ms: 15000,
            idle_timeout_ms: 45000,
            max_message_size: 65536,
        },
    );
    show(
        "ok: subscribed",
        &ServerFrame::Ok {
            id: 1,
            result: Reply::Subscribed {
                channel: channel("auction:42"),
                seq: 311,
                epoch: 1795333703380369,
                recovered: None,
                replayed: 0,
                viewers,
                snapshot: None,
                state: serde_json::Value::Null,
            },
        },
    );
    show(
        "ok: subscribed, not recovered (with snapshot)",
        &ServerFrame::Ok {
            id: 2,
            result: Reply::Subscribed {
                channel: channel("conversation:c7"),
                seq: 2400,
                epoch: 1795333703380369,
                recovered: Some(false),
                replayed: 0,
                viewers: ViewerCounts {
                    connections: 2,
                    users: 2,
                    peak_connections: 3,
                    peak_users: 2,
                },
                snapshot: Some(RoomSnapshot {
                    seq: 2400,
                    epoch: 1795333703380369,
                    viewers: ViewerCounts {
                        connections: 2,
                        users: 2,
                        peak_connections: 3,
                        peak_users: 2,
                    },
                    oldest_seq: Some(1401),
                    state: serde_json::Value::Null,
                }),
                state: serde_json::Value::Null,
            },
        },
    );
    show(
        "ok: unsubscribed",
        &ServerFrame::Ok {
            id: 3,
            result: Reply::Unsubscribed {
                channel: channel("auction:42"),
            },
        },
    );
    show(
        "ok: published",
        &ServerFrame::Ok {
            id: 4,
            result: Reply::Published {
                channel: channel("conversation:c7"),
                seq: 19,
            },
        },
    );
    show(
        "ok: done",
        &ServerFrame::Ok {
            id: 5,
            result: Reply::Done {},
        },
    );
    show(
        "ok: presence",
        &ServerFrame::Ok {
            id: 7,
            result: Reply::Presence(PresenceReply {
                channel: channel("auction:42"),
                viewers,
                users: vec![user("u1"), user("u42")],
                anonymous: 217,
                truncated: true,
            }),
        },
    );
    show(
        "ok: pong",
        &ServerFrame::Ok {
            id: 8,
            result: Reply::Pong {
                server_ts: 1795333703380,
            },
        },
    );
    show(
        "ok: authenticated",
        &ServerFrame::Ok {
            id: 10,
            result: Reply::Authenticated {
                user: user("u42"),
                expires_at: 1795337303000,
                unsubscribed: Vec::new(),
            },
        },
    );
    let auction = AuctionSnapshot {
        auction_id: "42".into(),
        title: "1967 Fender Stratocaster".into(),
        currency: "EUR".into(),
        status: AuctionStatus::Active,
        starting_price: 100_000,
        price: Some(124_000),
        leader: Some(user("u7")),
        bid_count: 31,
        last_bid_seq: 31,
        next_min_bid: 124_500,
        starts_at: 1795333000000,
        ends_at: 1795334200000,
        reserve_met: true,
        buy_now: None,
        required_role: None,
        server_ts: 1795333703380,
    };
    show(
        "ok: subscribed to an auction (with its state)",
        &ServerFrame::Ok {
            id: 1,
            result: Reply::Subscribed {
                channel: channel("auction:42"),
                seq: 311,
                epoch: 1795333703380369,
                recovered: None,
                replayed: 0,
                viewers,
                snapshot: None,
                state: serde_json::to_value(&auction).expect("snapshot"),
            },
        },
    );
    show(
        "ok: bid_accepted",
        &ServerFrame::Ok {
            id: 9,
            result: Reply::BidAccepted {
                auction_id: "42".into(),
                request_id: "7f3c-0001".into(),
                bid_seq: 32,
                amount: 125_000,
                price: 125_000,
                bid_count: 32,
                next_min_bid: 125_500,
                ends_at: 1795334200000,
                server_ts: 1795333703380,
                leading: true,
                max_amount: Some(150_000),
            },
        },
    );
    show(
        "ok: bid_rejected",
        &ServerFrame::Ok {
            id: 9,
            result: Reply::BidRejected {
                auction_id: "42".into(),
                request_id: "7f3c-0001".into(),
                reason: BidRejection::TooLow,
                min_amount: Some(125_500),
                message: "the next bid must be at least 125500".into(),
            },
        },
    );
    show(
        "event: bid_placed",
        &ServerFrame::Event(EventFrame {
            channel: channel("auction:42"),
            seq: 312,
            ts: 1795333703381,
            event: "bid_placed".into(),
            from: None,
            epoch: None,
            data: Data::encode(&BidPlaced {
                auction_id: "42".into(),
                bid_seq: 32,
                amount: 125_000,
                bidder: user("u42"),
                bid_count: 32,
                next_min_bid: 125_500,
                ends_at: 1795334200000,
                server_ts: 1795333703380,
                automatic: false,
            })
            .expect("bid_placed"),
        }),
    );
    show(
        "event: outbid (on user:u7)",
        &ServerFrame::Event(EventFrame {
            channel: channel("user:u7"),
            seq: 12,
            ts: 1795333703381,
            event: "outbid".into(),
            from: None,
            epoch: None,
            data: Data::encode(&Outbid {
                auction_id: "42".into(),
                amount: 125_000,
                your_amount: 124_000,
                next_min_bid: 125_500,
                ends_at: 1795334200000,
                server_ts: 1795333703380,
            })
            .expect("outbid"),
        }),
    );
    show(
        "event: ended",
        &ServerFrame::Event(EventFrame {
            channel: channel("auction:42"),
            seq: 420,
            ts: 1795334200001,
            event: "ended".into(),
            from: None,
            epoch: None,
            data: Data::encode(&Ended {
                auction_id: "42".into(),
                winner: Some(user("u42")),
                final_price: Some(131_000),
                reserve_met: true,
                bid_count: 44,
                ends_at: 1795334200000,
                server_ts: 1795334200000,
            })
            .expect("ended"),
        }),
    );
    show(
        "error",
        &ServerFrame::Error(ErrorFrame {
            id: Some(9),
            code: ErrorCode::NotSubscribed,
            message: "not subscribed to conversation:c9".into(),
        }),
    );
    show(
        "event",
        &ServerFrame::Event(EventFrame {
            channel: channel("user:u42"),
            seq: 5,
            ts: 1795333703380,
            event: "booking_accepted".into(),
            from: None,
            epoch: None,
            data: json!({"booking_id": 991, "starts": "2026-12-01"}).into(),
        }),
    );
    show(
        "event: a chat message",
        &ServerFrame::Event(EventFrame {
            channel: channel("conversation:c7"),
            seq: 19,
            ts: 1795333703380,
            event: "message".into(),
            from: Some(user("u42")),
            epoch: None,
            data: json!({"text": "is it still available?"}).into(),
        }),
    );
    show(
        "viewers",
        &ServerFrame::Viewers {
            channel: channel("auction:42"),
            ts: 1795333703380,
            viewers,
        },
    );
    show(
        "typing",
        &ServerFrame::Typing {
            channel: channel("conversation:c7"),
            user: user("u42"),
            typing: true,
            ts: 1795333703380,
        },
    );
    show(
        "joined",
        &ServerFrame::Joined {
            channel: channel("conversation:c7"),
            user: user("u7"),
            ts: 1795333703380,
        },
    );
    show(
        "left",
        &ServerFrame::Left {
            channel: channel("conversation:c7"),
            user: user("u7"),
            ts: 1795333703380,
        },
    );
}
