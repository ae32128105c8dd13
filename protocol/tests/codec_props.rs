//! Property tests for the codec: every frame type round-trips in both formats, and arbitrary or
//! mutated bytes decode to a typed error, never a panic.

use gavel_protocol::*;
use proptest::prelude::*;
use serde_json::Value;

fn id_string() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn channel() -> impl Strategy<Value = Channel> {
    prop_oneof![
        id_string().prop_map(|id| Channel::parse(&format!("auction:{id}")).unwrap()),
        id_string().prop_map(|id| Channel::parse(&format!("user:{id}")).unwrap()),
        id_string().prop_map(|id| Channel::parse(&format!("conversation:{id}")).unwrap()),
        Just(Channel::broadcast()),
    ]
}

fn user() -> impl Strategy<Value = UserId> {
    id_string().prop_map(|id| UserId::parse(&id).unwrap())
}

/// JSON values as an application would publish them (finite floats only: JSON has no NaN).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12f64).prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn viewers() -> impl Strategy<Value = ViewerCounts> {
    (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(c, u, pc, pu)| {
        ViewerCounts {
            connections: c,
            users: u,
            peak_connections: pc,
            peak_users: pu,
        }
    })
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (
            any::<u64>(),
            channel(),
            any::<Option<u64>>(),
            any::<Option<u64>>()
        )
            .prop_map(|(id, channel, since, epoch)| ClientFrame::Subscribe {
                id,
                channel,
                since,
                epoch
            }),
        (any::<u64>(), channel())
            .prop_map(|(id, channel)| ClientFrame::Unsubscribe { id, channel }),
        (any::<u64>(), channel(), json_value()).prop_map(|(id, channel, data)| {
            ClientFrame::Publish {
                id,
                channel,
                data: data.into(),
            }
        }),
        (any::<u64>(), channel(), any::<bool>()).prop_map(|(id, channel, typing)| {
            ClientFrame::Typing {
                id,
                channel,
                typing,
            }
        }),
        (any::<u64>(), channel(), any::<u64>()).prop_map(|(id, channel, seq)| ClientFrame::Read {
            id,
            channel,
            seq
        }),
        (any::<u64>(), channel(), any::<Option<u32>>())
            .prop_map(|(id, channel, limit)| ClientFrame::Presence { id, channel, limit }),
        any::<u64>().prop_map(|id| ClientFrame::Ping { id }),
        (any::<u64>(), ".{0,200}").prop_map(|(id, token)| ClientFrame::Auth { id, token }),
        (
            any::<u64>(),
            id_string(),
            any::<i64>(),
            id_string(),
            any::<Option<i64>>()
        )
            .prop_map(|(id, auction_id, amount, request_id, max_amount)| {
                ClientFrame::PlaceBid {
                    id,
                    auction_id,
                    amount,
                    request_id,
                    max_amount,
                }
            }),
    ]
}

fn snapshot() -> impl Strategy<Value = RoomSnapshot> {
    (
        any::<u64>(),
        any::<u64>(),
        viewers(),
        any::<Option<u64>>(),
        json_value(),
    )
        .prop_map(|(seq, epoch, viewers, oldest_seq, state)| RoomSnapshot {
            seq,
            epoch,
            viewers,
            oldest_seq,
            state,
        })
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (
            channel(),
            any::<u64>(),
            any::<u64>(),
            any::<Option<bool>>(),
            any::<u32>(),
            viewers(),
            prop::option::of(snapshot()),
            json_value()
        )
            .prop_map(
                |(channel, seq, epoch, recovered, replayed, viewers, snapshot, state)| {
                    Reply::Subscribed {
                        channel,
                        seq,
                        epoch,
                        recovered,
                        replayed,
                        viewers,
                        snapshot,
                        state,
                    }
                }
            ),
        channel().prop_map(|channel| Reply::Unsubscribed { channel }),
        (channel(), any::<u64>()).prop_map(|(channel, seq)| Reply::Published { channel, seq }),
        Just(Reply::Done {}),
        (
            channel(),
            viewers(),
            prop::collection::vec(user(), 0..5),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(|(channel, viewers, users, anonymous, truncated)| {
                Reply::Presence(PresenceReply {
                    channel,
                    viewers,
                    users,
                    anonymous,
                    truncated,
                })
            }),
        any::<u64>().prop_map(|server_ts| Reply::Pong { server_ts }),
        (user(), any::<u64>()).prop_map(|(user, expires_at)| Reply::Authenticated {
            user,
            expires_at,
            unsubscribed: Vec::new(),
        }),
        (
            id_string(),
            id_string(),
            any::<[u64; 4]>(),
            any::<[i64; 3]>(),
            (any::<bool>(), any::<Option<i64>>())
        )
            .prop_map(
                |(
                    auction_id,
                    request_id,
                    [bid_seq, bid_count, ends_at, server_ts],
                    [amount, price, next_min_bid],
                    (leading, max_amount),
                )| {
                    Reply::BidAccepted {
                        auction_id,
                        request_id,
                        bid_seq,
                        amount,
                        price,
                        bid_count,
                        next_min_bid,
                        ends_at,
                        server_ts,
                        leading,
                        max_amount,
                    }
                }
            ),
        (
            id_string(),
            id_string(),
            prop::sample::select(BidRejection::ALL.to_vec()),
            any::<Option<i64>>(),
            ".{0,20}"
        )
            .prop_map(|(auction_id, request_id, reason, min_amount, message)| {
                Reply::BidRejected {
                    auction_id,
                    request_id,
                    reason,
                    min_amount,
                    message,
                }
            }),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (
            any::<u64>(),
            prop::option::of(user()),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(connection_id, user, server_ts, ping, idle, max)| {
                ServerFrame::Hello {
                    protocol: PROTOCOL_VERSION.into(),
                    connection_id,
                    user,
                    server_ts,
                    ping_interval_ms: ping,
                    idle_timeout_ms: idle,
                    max_message_size: max,
                }
            }),
        (any::<u64>(), reply()).prop_map(|(id, result)| ServerFrame::Ok { id, result }),
        (any::<Option<u64>>(), error_code(), ".{0,40}").prop_map(|(id, code, message)| {
            ServerFrame::Error(ErrorFrame { id, code, message })
        }),
        (
            channel(),
            any::<u64>(),
            any::<u64>(),
            "[a-z_]{1,20}",
            prop::option::of(user()),
            json_value(),
            prop::option::of(any::<u64>()),
        )
            .prop_map(|(channel, seq, ts, event, from, data, epoch)| {
                ServerFrame::Event(EventFrame {
                    channel,
                    seq,
                    ts,
                    event,
                    from,
                    data: data.into(),
                    epoch,
                })
            }),
        (channel(), any::<u64>(), viewers()).prop_map(|(channel, ts, viewers)| {
            ServerFrame::Viewers {
                channel,
                ts,
                viewers,
            }
        }),
        (channel(), user(), any::<bool>(), any::<u64>()).prop_map(|(channel, user, typing, ts)| {
            ServerFrame::Typing {
                channel,
                user,
                typing,
                ts,
            }
        }),
        (channel(), user(), any::<u64>()).prop_map(|(channel, user, ts)| ServerFrame::Joined {
            channel,
            user,
            ts
        }),
        (channel(), user(), any::<u64>()).prop_map(|(channel, user, ts)| ServerFrame::Left {
            channel,
            user,
            ts
        }),
    ]
}

const MAX: usize = 1 << 20;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_frames_round_trip(frame in client_frame()) {
        for format in [Format::MsgPack, Format::Json] {
            let bytes = encode(format, &frame).unwrap();
            let back: ClientFrame = decode(format, &bytes, MAX).unwrap();
            prop_assert_eq!(&back, &frame);
            prop_assert_eq!(&decode_client(format, &bytes, MAX).unwrap(), &frame);
        }
    }

    /// The envelope of any client frame is its type and id, in both formats.
    #[test]
    fn the_envelope_is_the_frames_type_and_id(frame in client_frame()) {
        for format in [Format::MsgPack, Format::Json] {
            let bytes = encode(format, &frame).unwrap();
            let envelope = gavel_protocol::envelope(format, &bytes, MAX).unwrap();
            prop_assert_eq!(envelope.type_name.as_str(), frame.type_name());
            prop_assert_eq!(envelope.id, Some(frame.id()));
        }
    }

    /// `data` carries any JSON value unchanged, whichever format it comes in or goes out in.
    #[test]
    fn data_carries_any_json_value(value in json_value()) {
        let data = Data::from(&value);
        prop_assert_eq!(data.to_json(), value.clone());
        let json = serde_json::to_vec(&data).unwrap();
        prop_assert_eq!(data.json_len(), json.len());
        prop_assert_eq!(&serde_json::from_slice::<Data>(&json).unwrap(), &data);
        let msgpack = rmp_serde::to_vec_named(&data).unwrap();
        prop_assert_eq!(&msgpack[..], data.as_msgpack());
        prop_assert_eq!(&rmp_serde::from_slice::<Data>(&msgpack).unwrap(), &data);
        prop_assert_eq!(msgpack, rmp_serde::to_vec_named(&value).unwrap(), "as a JSON tree encodes");
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        for format in [Format::MsgPack, Format::Json] {
            let bytes = encode(format, &frame).unwrap();
            let back: ServerFrame = decode(format, &bytes, MAX).unwrap();
            prop_assert_eq!(&back, &frame);
        }
    }

    #[test]
    fn arbitrary_bytes_give_a_typed_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for format in [Format::MsgPack, Format::Json] {
            // Whatever comes back, it came back: no panic, and an error is one of ours.
            if let Err(e) = decode::<ClientFrame>(format, &bytes, MAX) {
                prop_assert!(!e.to_string().is_empty());
            }
            // And both readings agree on it.
            let (direct, generic) = (decode_client(format, &bytes, MAX), decode::<ClientFrame>(format, &bytes, MAX));
            prop_assert_eq!(direct.is_ok(), generic.is_ok());
        }
    }

    #[test]
    fn mutated_frames_give_a_typed_error(
        frame in client_frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        for format in [Format::MsgPack, Format::Json] {
            let mut bytes = encode(format, &frame).unwrap().to_vec();
            for (at, byte) in &flips {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            let end = cut.index(bytes.len() + 1);
            for bytes in [&bytes[..], &bytes[..end]] {
                // The direct reading and the generic one agree on every input.
                let direct = decode_client(format, bytes, MAX);
                let generic = decode::<ClientFrame>(format, bytes, MAX);
                prop_assert_eq!(direct.is_ok(), generic.is_ok(), "{:?} vs {:?}", direct, generic);
                if let (Ok(direct), Ok(generic)) = (&direct, &generic) {
                    prop_assert_eq!(direct, generic);
                }
            }
        }
    }

    #[test]
    fn oversized_input_is_refused_before_decoding(frame in client_frame()) {
        let bytes = encode(Format::MsgPack, &frame).unwrap();
        let max = bytes.len() - 1;
        let err = decode::<ClientFrame>(Format::MsgPack, &bytes, max);
        prop_assert_eq!(err, Err(DecodeError::TooLarge { size: bytes.len(), max }));
    }
}

#[test]
fn deeply_nested_input_is_an_error_not_a_stack_overflow() {
    // 100k nested single-element arrays: MessagePack 0x91 repeated, JSON '[' repeated.
    let msgpack = vec![0x91u8; 100_000];
    assert!(decode::<ClientFrame>(Format::MsgPack, &msgpack, MAX).is_err());
    assert!(decode_client(Format::MsgPack, &msgpack, MAX).is_err());
    let json = vec![b'['; 100_000];
    assert!(decode::<ClientFrame>(Format::Json, &json, MAX).is_err());
    assert!(decode_client(Format::Json, &json, MAX).is_err());
}

/// Around the nesting limit, in `data` or in a field the broker does not know, in either
/// format, the broker's reading (`decode_client`) takes exactly what the generic one takes, and
/// refuses the rest with the same kind of error and request id.
#[test]
fn both_readings_draw_the_nesting_limit_at_the_same_depth() {
    fn nested(depth: usize) -> serde_json::Value {
        (0..depth).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]))
    }
    for field in ["data", "unknown"] {
        for depth in 120..136 {
            let frame = serde_json::json!({"type": "publish", "id": 7, "channel": "conversation:x", "data": null, field: nested(depth)});
            for format in [Format::MsgPack, Format::Json] {
                let bytes = encode(format, &frame).unwrap();
                let direct = decode_client(format, &bytes, MAX);
                let generic = decode::<ClientFrame>(format, &bytes, MAX);
                assert_eq!(
                    direct.is_ok(),
                    generic.is_ok(),
                    "{field} at {depth} in {format:?}: {direct:?} vs {generic:?}"
                );
                if let (Err(direct), Err(generic)) = (&direct, &generic) {
                    assert_eq!(
                        direct.request_id(),
                        generic.request_id(),
                        "{field} at {depth} in {format:?}: {direct:?} vs {generic:?}"
                    );
                    assert_eq!(
                        std::mem::discriminant(direct),
                        std::mem::discriminant(generic)
                    );
                }
            }
        }
    }
}

/// Both formats take `data` nested to the same depth: what a MessagePack client may send, a
/// JSON client of the same room can read.
#[test]
fn data_nests_equally_deep_in_both_formats() {
    fn nested(depth: usize) -> serde_json::Value {
        (0..depth).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]))
    }
    let frame = |depth| serde_json::json!({"type": "publish", "id": 1, "channel": "conversation:x", "data": nested(depth)});
    for format in [Format::MsgPack, Format::Json] {
        let shallow = encode(format, &frame(100)).unwrap();
        assert!(
            decode::<ClientFrame>(format, &shallow, MAX).is_ok(),
            "{format:?}"
        );
        let deep = encode(format, &frame(200)).unwrap();
        assert!(
            decode::<ClientFrame>(format, &deep, MAX).is_err(),
            "{format:?}"
        );
    }
}
