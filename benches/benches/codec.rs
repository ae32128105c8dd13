//! The codec per frame type: decoding each client frame and encoding each server frame, in
//! MessagePack (the wire format) and JSON (the debugging mirror). Throughput is in bytes of the
//! encoded frame, so rows of different sizes compare.
//!
//! `cargo bench -p gavel-benches --bench codec`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gavel_protocol::codec::{decode, decode_client, encode, Format};
use gavel_protocol::{
    BidPlaced, BidRejection, Channel, ClientFrame, ErrorCode, ErrorFrame, EventFrame, Reply,
    ServerFrame, UserId, ViewerCounts,
};
use serde_json::json;

fn channel(name: &str) -> Channel {
    Channel::parse(name).expect("bench channel")
}

fn user(id: &str) -> UserId {
    UserId::parse(id).expect("bench user")
}

fn client_frames() -> Vec<(&'static str, ClientFrame)> {
    vec![
        ("subscribe", ClientFrame::Subscribe { id: 1, channel: channel("auction:42"), since: Some(17), epoch: Some(1795333703380369) }),
        ("unsubscribe", ClientFrame::Unsubscribe { id: 3, channel: channel("auction:42") }),
        ("publish", ClientFrame::Publish { id: 4, channel: channel("conversation:c7"), data: json!({"text": "is it still available?"}).into() }),
        ("typing", ClientFrame::Typing { id: 5, channel: channel("conversation:c7"), typing: true }),
        ("read", ClientFrame::Read { id: 6, channel: channel("conversation:c7"), seq: 18 }),
        ("presence", ClientFrame::Presence { id: 7, channel: channel("auction:42"), limit: Some(50) }),
        ("auth", ClientFrame::Auth { id: 10, token: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1NDIiLCJleHAiOjE3OTUzMzczMDN9.c2lnbmF0dXJlLXNpZ25hdHVyZQ".into() }),
        ("ping", ClientFrame::Ping { id: 8 }),
        ("place_bid", ClientFrame::PlaceBid { id: 9, auction_id: "42".into(), amount: 125_000, request_id: "7f3c-0001".into(), max_amount: None }),
    ]
}

fn server_frames() -> Vec<(&'static str, ServerFrame)> {
    let viewers = ViewerCounts {
        connections: 1204,
        users: 1187,
        peak_connections: 1311,
        peak_users: 1290,
    };
    let placed = BidPlaced {
        auction_id: "42".into(),
        bid_seq: 32,
        amount: 125_000,
        bidder: user("u42"),
        bid_count: 32,
        next_min_bid: 125_500,
        ends_at: 1795334200000,
        server_ts: 1795333703380,
        automatic: false,
    };
    vec![
        (
            "event_bid_placed",
            ServerFrame::Event(EventFrame {
                channel: channel("auction:42"),
                seq: 312,
                ts: 1795333703381,
                event: "bid_placed".into(),
                from: None,
                epoch: None,
                data: gavel_protocol::Data::encode(&placed).expect("bid_placed"),
            }),
        ),
        (
            "event_chat",
            ServerFrame::Event(EventFrame {
                channel: channel("conversation:c7"),
                seq: 18,
                ts: 1795333703381,
                event: "message".into(),
                from: Some(user("u42")),
                epoch: None,
                data: json!({"text": "is it still available?"}).into(),
            }),
        ),
        (
            "viewers",
            ServerFrame::Viewers {
                channel: channel("auction:42"),
                ts: 1795333703380,
                viewers,
            },
        ),
        (
            "typing",
            ServerFrame::Typing {
                channel: channel("conversation:c7"),
                user: user("u42"),
                typing: true,
                ts: 1795333703380,
            },
        ),
        (
            "ok_bid_accepted",
            ServerFrame::Ok {
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
                    max_amount: None,
                },
            },
        ),
        (
            "ok_bid_rejected",
            ServerFrame::Ok {
                id: 9,
                result: Reply::BidRejected {
                    auction_id: "42".into(),
                    request_id: "7f3c-0001".into(),
                    reason: BidRejection::TooLow,
                    min_amount: Some(125_500),
                    message: "the next bid must be at least 125500".into(),
                },
            },
        ),
        (
            "ok_subscribed_auction",
            ServerFrame::Ok {
                id: 1,
                result: Reply::Subscribed {
                    channel: channel("auction:42"),
                    seq: 311,
                    epoch: 1795333703380369,
                    recovered: None,
                    replayed: 0,
                    viewers,
                    snapshot: None,
                    state: json!({"auction_id": "42", "title": "Lot 42", "currency": "EUR", "status": "active",
                "price": 124_500, "leader": "u7", "bid_count": 31, "next_min_bid": 125_000,
                "starts_at": 1795333000000u64, "ends_at": 1795334200000u64, "reserve_met": true,
                "server_ts": 1795333703380u64}),
                },
            },
        ),
        (
            "error",
            ServerFrame::Error(ErrorFrame {
                id: Some(4),
                code: ErrorCode::NotSubscribed,
                message: "not subscribed to conversation:c7".into(),
            }),
        ),
    ]
}

fn formats() -> [(&'static str, Format); 2] {
    [("msgpack", Format::MsgPack), ("json", Format::Json)]
}

/// `decode`: how the broker reads client frames (`decode_client`: the type first, then the
/// variant's fields, nothing buffered); `decode_generic`: serde's internally tagged enum, which
/// buffers the whole map first (the broker's path before session 12), side by side in one run.
fn decode_client_frames(c: &mut Criterion) {
    type Decoder = fn(Format, &[u8]) -> ClientFrame;
    let decoders: [(&str, Decoder); 2] = [
        ("decode", |format, bytes| {
            decode_client(format, bytes, 1 << 20).expect("decode")
        }),
        ("decode_generic", |format, bytes| {
            decode::<ClientFrame>(format, bytes, 1 << 20).expect("decode")
        }),
    ];
    for (group_name, decoder) in decoders {
        let mut group = c.benchmark_group(group_name);
        for (format_name, format) in formats() {
            for (name, frame) in client_frames() {
                let bytes = encode(format, &frame).expect("encode");
                group.throughput(Throughput::Bytes(bytes.len() as u64));
                group.bench_with_input(BenchmarkId::new(format_name, name), &bytes, |b, bytes| {
                    b.iter(|| decoder(format, std::hint::black_box(bytes)))
                });
            }
        }
        group.finish();
    }
}

fn encode_server_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (format_name, format) in formats() {
        for (name, frame) in server_frames() {
            let size = encode(format, &frame).expect("encode").len();
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_with_input(BenchmarkId::new(format_name, name), &frame, |b, frame| {
                b.iter(|| encode(format, std::hint::black_box(frame)).expect("encode"))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = codec;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    targets = decode_client_frames, encode_server_frames
}
criterion_main!(codec);
