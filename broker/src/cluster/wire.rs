//! What travels through Redis: the bodies of sequenced events as Redis stores and relays them,
//! signals, and the parsing of pub/sub messages and room images.

use super::*;
use crate::rooms::ClusterTotals;

/// An unsequenced frame relayed to every node following its room.
#[derive(Serialize, Deserialize)]
pub(super) struct Signal {
    pub(super) frame: ServerFrame,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) skip_user: Option<UserId>,
}

/// A sequenced event's body as Redis stores and relays it (seq and epoch come from Redis).
#[derive(Deserialize)]
pub(super) struct EventBody {
    ts: u64,
    event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<UserId>,
    data: Data,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<Value>,
}

/// [`EventBody`] as a publisher writes it: borrowed, with the state already in JSON.
#[derive(Serialize)]
pub(super) struct EventBodyOut<'a> {
    ts: u64,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a UserId>,
    data: &'a Data,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a RawValue>,
}

/// A room event ready for Redis: (channel, body json, state json or empty).
#[derive(Clone, Debug)]
pub struct OutgoingEvent {
    pub channel: Channel,
    pub(super) body: String,
    pub(super) state: String,
}

impl OutgoingEvent {
    pub fn new(
        channel: Channel,
        event: &str,
        from: Option<UserId>,
        data: Data,
        state: Option<Value>,
    ) -> OutgoingEvent {
        // The state is serialized once: Redis stores it on its own and in the body.
        let state = state.and_then(|s| serde_json::value::to_raw_value(&s).ok());
        let body = EventBodyOut {
            ts: now_ms(),
            event,
            from: from.as_ref(),
            data: &data,
            state: state.as_deref(),
        };
        OutgoingEvent {
            channel,
            body: serde_json::to_string(&body).unwrap_or_default(),
            state: state.map(|s| s.get().to_owned()).unwrap_or_default(),
        }
    }
}

/// Parses `<seq> <epoch> <json>`.
pub(super) fn parse_event(bytes: &[u8]) -> Option<Incoming> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (seq, rest) = text.split_once(' ')?;
    let (epoch, body) = rest.split_once(' ')?;
    let body: EventBody = serde_json::from_str(body).ok()?;
    Some(Incoming {
        seq: seq.parse().ok()?,
        epoch: epoch.parse().ok()?,
        ts: body.ts,
        event: body.event,
        from: body.from,
        data: body.data,
        state: body.state,
    })
}

pub(super) fn parse_image(
    channel: &Channel,
    reply: Vec<Vec<u8>>,
) -> Result<RoomImage, ClusterError> {
    let bad = || ClusterError::Protocol(format!("room image of {channel}"));
    let mut items = reply.into_iter();
    let number =
        |v: Option<Vec<u8>>| -> Option<u64> { std::str::from_utf8(&v?).ok()?.parse().ok() };
    let seq = number(items.next()).ok_or_else(bad)?;
    let epoch = number(items.next()).ok_or_else(bad)?;
    let state = items.next().ok_or_else(bad)?;
    let state = if state.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&state).map_err(|_| bad())?
    };
    let viewers = items.next().ok_or_else(bad)?;
    let viewers = match viewers.strip_prefix(b"V") {
        Some(totals) => Some(parse_viewers(totals).ok_or_else(bad)?),
        None => None,
    };
    let mut history = Vec::new();
    for entry in items {
        let event = entry
            .strip_prefix(b"E")
            .and_then(parse_event)
            .ok_or_else(bad)?;
        history.push(event);
    }
    Ok(RoomImage {
        epoch,
        seq,
        state,
        viewers,
        history,
    })
}

/// Parses `<conns> <users> <peak conns> <peak users> <at>` (a `V` message without its `V`;
/// `<at>` is absent from nodes of an older version).
pub(super) fn parse_viewers(bytes: &[u8]) -> Option<ClusterTotals> {
    let numbers: Vec<u64> = std::str::from_utf8(bytes)
        .ok()?
        .split(' ')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let count = |n: u64| u32::try_from(n).ok();
    let (counts, at) = match numbers[..] {
        [c, u, pc, pu] => ([c, u, pc, pu], 0),
        [c, u, pc, pu, at] => ([c, u, pc, pu], at),
        _ => return None,
    };
    Some(ClusterTotals {
        counts: ViewerCounts {
            connections: count(counts[0])?,
            users: count(counts[1])?,
            peak_connections: count(counts[2])?,
            peak_users: count(counts[3])?,
        },
        at,
    })
}
