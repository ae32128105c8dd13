//! The codec: one WebSocket message carries one frame, as a MessagePack map (`gavel.v1.msgpack`,
//! binary messages) or as a JSON object (`gavel.v1.json`, text messages, for debugging).
//! Size limits are checked before any decoding work.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use serde::de::value::StrDeserializer;
use serde::de::{
    DeserializeSeed, EnumAccess, IgnoredAny, IntoDeserializer, VariantAccess, Visitor,
};

use crate::frame::{ByType, ClientFrame, RequestId};

/// The encoding negotiated for a connection through `Sec-WebSocket-Protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `gavel.v1.msgpack`: binary WebSocket messages, each one MessagePack map.
    MsgPack,
    /// `gavel.v1.json`: text WebSocket messages, each one JSON object with the same fields.
    Json,
}

impl Format {
    pub const MSGPACK_SUBPROTOCOL: &'static str = "gavel.v1.msgpack";
    pub const JSON_SUBPROTOCOL: &'static str = "gavel.v1.json";

    pub fn subprotocol(self) -> &'static str {
        match self {
            Format::MsgPack => Format::MSGPACK_SUBPROTOCOL,
            Format::Json => Format::JSON_SUBPROTOCOL,
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Format> {
        match name.trim() {
            Format::MSGPACK_SUBPROTOCOL => Some(Format::MsgPack),
            Format::JSON_SUBPROTOCOL => Some(Format::Json),
            _ => None,
        }
    }

    /// Picks the first supported protocol from a `Sec-WebSocket-Protocol` header value
    /// (a comma-separated list in the client's order of preference).
    pub fn negotiate(header: &str) -> Option<Format> {
        header.split(',').find_map(Format::from_subprotocol)
    }
}

/// Why bytes are not a valid client frame. Every variant maps to an `error` frame (the
/// connection stays open) except `TooLarge`, which the broker answers with close code 1009.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("not a frame: {reason}")]
    Malformed { reason: String },
    #[error("unknown frame type {type_name:?}; known types: {known}", known = ClientFrame::TYPES.join(", "))]
    UnknownType {
        id: Option<RequestId>,
        type_name: String,
    },
    #[error("invalid {type_name} frame: {reason}")]
    InvalidChannel {
        id: Option<RequestId>,
        type_name: String,
        reason: String,
    },
    #[error("invalid {type_name} frame: {reason}")]
    Invalid {
        id: Option<RequestId>,
        type_name: String,
        reason: String,
    },
}

impl DecodeError {
    /// The request id, when it could be read despite the error.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            DecodeError::UnknownType { id, .. }
            | DecodeError::InvalidChannel { id, .. }
            | DecodeError::Invalid { id, .. } => *id,
            _ => None,
        }
    }
}

/// Why a frame could not be encoded. Our own frame types always encode; this exists for the
/// generic [`encode`] on caller-supplied types.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("msgpack: {0}")]
    MsgPack(#[from] rmp_serde::encode::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes a frame in the given format. MessagePack frames are maps keyed by field name
/// (`rmp_serde::to_vec_named`), so any MessagePack library can read them without a schema.
pub fn encode<T: Serialize>(format: Format, frame: &T) -> Result<Bytes, EncodeError> {
    Ok(match format {
        Format::MsgPack => rmp_serde::to_vec_named(frame)?.into(),
        Format::Json => serde_json::to_vec(frame)?.into(),
    })
}

/// The checks before any decoding work: the size, and that the message is one map/object.
fn check_shape(format: Format, bytes: &[u8], max_size: usize) -> Result<(), DecodeError> {
    if bytes.len() > max_size {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: max_size,
        });
    }
    if let Some(found) = not_a_map(format, bytes) {
        return Err(DecodeError::Malformed {
            reason: format!("a frame is one {}, not {found}", format.container()),
        });
    }
    Ok(())
}

/// Decodes a frame of type `T` (a [`ClientFrame`] on the broker, a `ServerFrame` on a client),
/// refusing messages over `max_size` bytes before looking at them.
pub fn decode<T: DeserializeOwned>(
    format: Format,
    bytes: &[u8],
    max_size: usize,
) -> Result<T, DecodeError> {
    check_shape(format, bytes, max_size)?;
    match parse::<T>(format, bytes) {
        Ok(frame) => Ok(frame),
        Err(reason) => Err(classify(format, bytes, reason)),
    }
}

impl Format {
    /// What one frame is in this encoding.
    fn container(self) -> &'static str {
        match self {
            Format::MsgPack => "MessagePack map",
            Format::Json => "JSON object",
        }
    }
}

/// What the message is when it is not a map (MessagePack) or an object (JSON): serde would
/// otherwise read a struct from an array of its fields in order, which the protocol does not
/// allow (§1.1: one frame is one map/object).
fn not_a_map(format: Format, bytes: &[u8]) -> Option<&'static str> {
    match format {
        Format::MsgPack => match bytes.first()? {
            0x80..=0x8f | 0xde | 0xdf => None,
            0x90..=0x9f | 0xdc | 0xdd => Some("an array"),
            _ => Some("another value"),
        },
        Format::Json => match bytes.iter().find(|b| !b.is_ascii_whitespace())? {
            b'{' => None,
            b'[' => Some("an array"),
            _ => Some("another value"),
        },
    }
}

/// Decodes a [`ClientFrame`], as [`decode`] does, without buffering the frame first: its `type`
/// is read in a first pass that skips every other field unread, then that variant's fields are
/// read straight from the bytes (unknown fields skipped unread). `data` is thus written once,
/// into its [`crate::Data`], and a large unknown field costs a skip, not a tree. Errors are
/// those of [`decode`], found without building a tree either.
pub fn decode_client(
    format: Format,
    bytes: &[u8],
    max_size: usize,
) -> Result<ClientFrame, DecodeError> {
    check_shape(format, bytes, max_size)?;
    // serde_json skips unknown fields without counting their depth (rmp_serde counts it).
    if format == Format::Json && json_nests_deeper(bytes, MAX_DEPTH) {
        let reason = format!("maps and arrays nest more than {} deep", MAX_DEPTH - 1);
        return Err(classify(format, bytes, reason));
    }
    let known = parse::<Envelope>(format, bytes)
        .ok()
        .filter(|e| ClientFrame::TYPES.contains(&e.type_name.as_str()));
    let Some(Envelope { type_name, .. }) = known else {
        // No `type`, not a string, or not a frame type: the probe says which.
        return Err(classify(
            format,
            bytes,
            "`type` must name a frame type".into(),
        ));
    };
    let variant = ByTypeName(&type_name);
    let read = match format {
        Format::MsgPack => {
            let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
            deserializer.set_max_depth(MAX_DEPTH);
            variant.read(&mut deserializer).map_err(|e| e.to_string())
        }
        Format::Json => {
            let mut deserializer = serde_json::Deserializer::from_slice(bytes);
            variant
                .read(&mut deserializer)
                .and_then(|frame| deserializer.end().map(|()| frame))
                .map_err(|e| e.to_string())
        }
    };
    read.map(ClientFrame::from)
        .map_err(|reason| classify(format, bytes, reason))
}

/// Whether a JSON text has maps and arrays nested `limit` deep or more (serde_json refuses
/// those when it builds them), counting brackets outside strings.
fn json_nests_deeper(bytes: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in bytes {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth >= limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Reads a frame map as the variant `.0` of [`ByType`]: an enum access whose variant is known
/// beforehand and whose content is the map itself.
struct ByTypeName<'a>(&'a str);

impl ByTypeName<'_> {
    fn read<'de, D: serde::Deserializer<'de>>(self, map: D) -> Result<ByType, D::Error> {
        ByType::deserialize(KnownVariant { name: self.0, map })
    }
}

struct KnownVariant<'a, D> {
    name: &'a str,
    map: D,
}

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for KnownVariant<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

impl<'de, D: serde::Deserializer<'de>> EnumAccess<'de> for KnownVariant<'_, D> {
    type Error = D::Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), D::Error> {
        let name: StrDeserializer<'_, D::Error> = self.name.into_deserializer();
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de, D: serde::Deserializer<'de>> VariantAccess<'de> for KnownVariant<'_, D> {
    type Error = D::Error;

    fn unit_variant(self) -> Result<(), D::Error> {
        Err(serde::de::Error::custom("client frames have fields"))
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _: S) -> Result<S::Value, D::Error> {
        Err(serde::de::Error::custom("client frames have fields"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, D::Error> {
        Err(serde::de::Error::custom("client frames have fields"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.map.deserialize_struct("ClientFrame", fields, visitor)
    }
}

/// How deeply maps and arrays may nest in a frame, in either format: serde_json's own limit,
/// so that whatever a MessagePack client may send, a JSON client can read.
pub const MAX_DEPTH: usize = 128;

fn parse<T: DeserializeOwned>(format: Format, bytes: &[u8]) -> Result<T, String> {
    match format {
        Format::MsgPack => {
            let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
            deserializer.set_max_depth(MAX_DEPTH);
            T::deserialize(&mut deserializer).map_err(|e| e.to_string())
        }
        Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    }
}

/// A frame's `type` and `id`, read without building the rest: every other field is skipped
/// unread (no tree is built of `data`, however it is nested). For refusing a frame before
/// paying for its decoding (e.g. before authentication). `None` when the message is not a
/// map or object, is over `max_size`, or these two fields cannot be read.
pub fn envelope(format: Format, bytes: &[u8], max_size: usize) -> Option<Envelope> {
    if bytes.len() > max_size || not_a_map(format, bytes).is_some() {
        return None;
    }
    parse::<Envelope>(format, bytes).ok()
}

/// What [`envelope`] reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub type_name: String,
    /// `None` when absent or not a request id (then skipped unread).
    #[serde(default, deserialize_with = "lenient_id")]
    pub id: Option<RequestId>,
}

/// The fields every frame has, read on the error path to say which request failed and why.
/// Nothing in it is built from a value of an unexpected shape: such values are skipped unread.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "type")]
    type_name: Option<String>,
    #[serde(default, deserialize_with = "lenient_id")]
    id: Option<RequestId>,
    /// Whether it is a valid channel name is checked separately.
    #[serde(default, deserialize_with = "lenient_channel")]
    channel: Option<ChannelField>,
}

/// A frame's `channel`, as the probe reads it.
enum ChannelField {
    Name(String),
    /// Not a string.
    Other,
}

/// A request id if the value is one (a non-negative integer), else `None`, the value skipped.
fn lenient_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RequestId>, D::Error> {
    Ok(match d.deserialize_any(Skipping)? {
        Shape::Unsigned(id) => Some(id),
        _ => None,
    })
}

/// A channel field: its name if it is a string; `None` for nil/null.
fn lenient_channel<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ChannelField>, D::Error> {
    Ok(match d.deserialize_any(Skipping)? {
        Shape::Text(name) => Some(ChannelField::Name(name)),
        Shape::Nil => None,
        _ => Some(ChannelField::Other),
    })
}

/// What [`Skipping`] found: the two shapes the probe cares about; anything else skipped.
enum Shape {
    Unsigned(u64),
    Text(String),
    Nil,
    Other,
}

/// Reads an unsigned integer or a string; skips anything else unread (maps and arrays with
/// `IgnoredAny`).
struct Skipping;

impl<'de> Visitor<'de> for Skipping {
    type Value = Shape;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Shape, E> {
        Ok(u64::try_from(v).map_or(Shape::Other, Shape::Unsigned))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Shape, E> {
        Ok(Shape::Unsigned(v))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_str<E>(self, v: &str) -> Result<Shape, E> {
        Ok(Shape::Text(v.to_owned()))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_none<E>(self) -> Result<Shape, E> {
        Ok(Shape::Nil)
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Nil)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(Skipping)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::Other)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Shape::Other)
    }
}

fn classify(format: Format, bytes: &[u8], reason: String) -> DecodeError {
    let Ok(probe) = parse::<Probe>(format, bytes) else {
        return DecodeError::Malformed { reason };
    };
    match probe.type_name {
        None => DecodeError::Malformed {
            reason: "missing field `type`".into(),
        },
        Some(type_name) if !ClientFrame::TYPES.contains(&type_name.as_str()) => {
            DecodeError::UnknownType {
                id: probe.id,
                type_name: type_name.chars().take(40).collect(),
            }
        }
        Some(type_name) if probe.channel.as_ref().is_some_and(not_a_channel) => {
            DecodeError::InvalidChannel {
                id: probe.id,
                type_name,
                reason,
            }
        }
        Some(type_name) => DecodeError::Invalid {
            id: probe.id,
            type_name,
            reason,
        },
    }
}

/// A `channel` field that is not a valid channel name (a string that fails to parse, or no
/// string at all).
fn not_a_channel(field: &ChannelField) -> bool {
    match field {
        ChannelField::Name(name) => crate::Channel::parse(name).is_err(),
        ChannelField::Other => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Channel, ServerFrame};

    #[test]
    fn negotiates_in_client_order() {
        assert_eq!(
            Format::negotiate("gavel.v1.json, gavel.v1.msgpack"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::negotiate("chat, gavel.v1.msgpack"),
            Some(Format::MsgPack)
        );
        assert_eq!(Format::negotiate("gavel.v2.msgpack"), None);
    }

    #[test]
    fn unknown_type_keeps_the_request_id() {
        let bytes = encode(
            Format::MsgPack,
            &serde_json::json!({"type": "bid", "id": 9}),
        )
        .unwrap();
        let err = decode::<ClientFrame>(Format::MsgPack, &bytes, 1024).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownType {
                id: Some(9),
                type_name: "bid".into()
            }
        );
    }

    #[test]
    fn bad_channel_is_invalid_with_id() {
        let err = decode::<ClientFrame>(
            Format::Json,
            br#"{"type":"subscribe","id":3,"channel":"room:1"}"#,
            1024,
        )
        .unwrap_err();
        assert!(
            matches!(err, DecodeError::InvalidChannel { id: Some(3), .. }),
            "{err:?}"
        );
        let err =
            decode::<ClientFrame>(Format::Json, br#"{"type":"read","id":4}"#, 1024).unwrap_err();
        assert!(
            matches!(err, DecodeError::Invalid { id: Some(4), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn arrays_are_not_frames() {
        // serde would read `["ping", 3]` as a struct from its fields in order.
        for (format, bytes) in [
            (Format::Json, br#"["ping", 3]"#.to_vec()),
            (Format::Json, br#" [{"type":"ping","id":3}]"#.to_vec()),
            (Format::MsgPack, b"\x92\xa4ping\x03".to_vec()),
            (Format::MsgPack, b"\x03".to_vec()),
            (Format::Json, b"3".to_vec()),
        ] {
            let err = decode::<ClientFrame>(format, &bytes, 1024).unwrap_err();
            assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
        }
    }

    #[test]
    fn size_is_checked_first() {
        let err = decode::<ClientFrame>(Format::Json, &[b' '; 100], 99).unwrap_err();
        assert_eq!(err, DecodeError::TooLarge { size: 100, max: 99 });
    }

    #[test]
    fn msgpack_frames_are_maps_keyed_by_name() {
        let frame = ClientFrame::Ping { id: 1 };
        let bytes = encode(Format::MsgPack, &frame).unwrap();
        // fixmap of 2 entries, "type" => "ping", "id" => 1
        assert_eq!(
            &bytes[..],
            b"\x82\xa4type\xa4ping\xa2id\x01",
            "{:02x?}",
            &bytes[..]
        );
        let event = ServerFrame::Event(crate::EventFrame {
            channel: Channel::parse("user:7").unwrap(),
            seq: 1,
            ts: 2,
            event: "x".into(),
            from: None,
            epoch: None,
            data: crate::Data::null(),
        });
        let back: ServerFrame = decode(
            Format::MsgPack,
            &encode(Format::MsgPack, &event).unwrap(),
            1 << 20,
        )
        .unwrap();
        assert_eq!(back, event);
    }
}
