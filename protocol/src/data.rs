//! An event's `data`: any value with a JSON equivalent, held as its canonical MessagePack bytes
//! instead of as a tree of allocations. Decoding checks the value and writes it out in one pass
//! (nil, bool, integer, finite float, str, array, map with str keys); encoding walks the bytes
//! into any serde serializer, so one [`Data`] goes out as MessagePack or as JSON.

use std::cell::Cell;
use std::fmt;

use bytes::Bytes;
use rmp::Marker;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess};
use serde::ser::{self, SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// A value with a JSON equivalent, stored as MessagePack: about as large as it is on the wire,
/// cheap to clone (shared bytes) and the same value whichever format it arrived in.
///
/// The encoding is canonical: integers in their smallest encoding (non-negative ones as uint
/// types), floats as float64 (NaN and ±Infinity become nil, as JSON has no such numbers), map
/// entries in the order they came. Two `Data` are equal when their encodings are.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Data(Bytes);

/// Why a value cannot be `data`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("{0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

const NIL: u8 = 0xc0;

impl Data {
    /// nil / `null`.
    pub fn null() -> Data {
        Data(Bytes::from_static(&[NIL]))
    }

    pub fn is_null(&self) -> bool {
        self.0.as_ref() == [NIL]
    }

    /// Any serializable value whose fields are named (structs as maps) and whose map keys are
    /// strings. Fails for anything without a JSON equivalent (byte strings, non-string keys).
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Data, DataError> {
        let bytes = rmp_serde::to_vec_named(value)?;
        let mut deserializer = rmp_serde::Deserializer::from_read_ref(&bytes);
        Ok(Data::deserialize(&mut deserializer)?)
    }

    /// Reads the value as a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DataError> {
        Ok(rmp_serde::from_slice(&self.0)?)
    }

    /// The value as a JSON tree, for inspecting it (tests, logs); the broker never builds one.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The MessagePack encoding.
    pub fn as_msgpack(&self) -> &[u8] {
        &self.0
    }

    /// The size of the JSON encoding, in bytes, without writing it anywhere.
    pub fn json_len(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        let _ = serde_json::to_writer(&mut count, self);
        count.0
    }
}

impl Default for Data {
    fn default() -> Data {
        Data::null()
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(json) => write!(f, "Data({json})"),
            Err(_) => write!(f, "Data({:02x?})", self.0.as_ref()),
        }
    }
}

/// Every JSON value is valid data (one whose array or map has 2^32 items or more, which no frame
/// can carry, becomes null).
impl From<&serde_json::Value> for Data {
    fn from(value: &serde_json::Value) -> Data {
        Data::encode(value).unwrap_or_default()
    }
}

impl From<serde_json::Value> for Data {
    fn from(value: serde_json::Value) -> Data {
        Data::from(&value)
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Data, D::Error> {
        let mut out = Vec::new();
        Writer(&mut out).deserialize(deserializer)?;
        // Kept for as long as the event is: no spare capacity.
        out.shrink_to_fit();
        Ok(Data(out.into()))
    }
}

/// Writes the value it visits into the buffer as canonical MessagePack.
struct Writer<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Writer<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

// Writing to a `Vec` cannot fail: the results of `rmp::encode` are ignored.
impl<'de> de::Visitor<'de> for Writer<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value with a JSON equivalent")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        let _ = rmp::encode::write_bool(self.0, v);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        let _ = match u64::try_from(v) {
            Ok(v) => rmp::encode::write_uint(self.0, v),
            Err(_) => rmp::encode::write_sint(self.0, v),
        };
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        let _ = rmp::encode::write_uint(self.0, v);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            let _ = rmp::encode::write_f64(self.0, v);
        } else {
            self.0.push(NIL);
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        let _ = rmp::encode::write_str(self.0, v);
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.push(NIL);
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.0;
        let container = Container::open(out, seq.size_hint(), Kind::Array);
        let mut count = 0;
        while seq.next_element_seed(Writer(out))?.is_some() {
            count += 1;
        }
        container.close(out, count)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        let container = Container::open(out, map.size_hint(), Kind::Map);
        let mut count = 0;
        while map.next_key_seed(Key(out))?.is_some() {
            map.next_value_seed(Writer(out))?;
            count += 1;
        }
        container.close(out, count)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Array,
    Map,
}

/// An array or map being written: its header goes first, so when the input does not say how
/// many items follow (JSON), it is put in front of them once they are counted.
struct Container {
    kind: Kind,
    start: usize,
    announced: Option<usize>,
}

impl Container {
    fn open(out: &mut Vec<u8>, size_hint: Option<usize>, kind: Kind) -> Container {
        let start = out.len();
        if let Some(len) = size_hint {
            Container::header(out, kind, len);
        }
        Container {
            kind,
            start,
            announced: size_hint,
        }
    }

    fn close<E: de::Error>(self, out: &mut Vec<u8>, count: usize) -> Result<(), E> {
        if u32::try_from(count).is_err() {
            return Err(E::custom("more than 2^32 - 1 items in one array or map"));
        }
        if self.announced == Some(count) {
            return Ok(());
        }
        let mut header = Vec::with_capacity(5);
        Container::header(&mut header, self.kind, count);
        let old_header = match self.announced {
            Some(len) => {
                let mut old = Vec::with_capacity(5);
                Container::header(&mut old, self.kind, len);
                old.len()
            }
            None => 0,
        };
        out.splice(self.start..self.start + old_header, header);
        Ok(())
    }

    fn header(out: &mut Vec<u8>, kind: Kind, len: usize) {
        // Counts over 2^32 - 1 cannot be written; `close` refuses them first.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let _ = match kind {
            Kind::Array => rmp::encode::write_array_len(out, len),
            Kind::Map => rmp::encode::write_map_len(out, len),
        };
    }
}

/// A map key: only strings, as in JSON.
struct Key<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> de::Visitor<'de> for Key<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string map key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        Writer(self.0).visit_str(v)
    }
}

impl Serialize for Data {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let cursor = Cursor {
            bytes: &self.0,
            at: Cell::new(0),
        };
        Item(&cursor).serialize(serializer)
    }
}

/// Reads the encoding front to back while the value is serialized.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: Cell<usize>,
}

impl<'a> Cursor<'a> {
    fn take<E: ser::Error>(&self, n: usize) -> Result<&'a [u8], E> {
        let at = self.at.get();
        let taken = at
            .checked_add(n)
            .and_then(|end| self.bytes.get(at..end))
            .ok_or_else(|| E::custom("data ends early"))?;
        self.at.set(at + n);
        Ok(taken)
    }

    fn array<const N: usize, E: ser::Error>(&self) -> Result<[u8; N], E> {
        let bytes = self.take(N)?;
        let mut array = [0; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn length<E: ser::Error>(&self, width: usize) -> Result<usize, E> {
        Ok(match width {
            1 => usize::from(self.array::<1, E>()?[0]),
            2 => usize::from(u16::from_be_bytes(self.array::<2, E>()?)),
            _ => u32::from_be_bytes(self.array::<4, E>()?) as usize,
        })
    }
}

/// The next value at the cursor.
struct Item<'c, 'a>(&'c Cursor<'a>);

impl Serialize for Item<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let marker = Marker::from_u8(c.array::<1, S::Error>()?[0]);
        match marker {
            Marker::Null => serializer.serialize_unit(),
            Marker::True => serializer.serialize_bool(true),
            Marker::False => serializer.serialize_bool(false),
            Marker::FixPos(v) => serializer.serialize_u64(v.into()),
            Marker::FixNeg(v) => serializer.serialize_i64(v.into()),
            Marker::U8 => serializer.serialize_u64(c.array::<1, S::Error>()?[0].into()),
            Marker::U16 => serializer.serialize_u64(u16::from_be_bytes(c.array()?).into()),
            Marker::U32 => serializer.serialize_u64(u32::from_be_bytes(c.array()?).into()),
            Marker::U64 => serializer.serialize_u64(u64::from_be_bytes(c.array()?)),
            Marker::I8 => serializer.serialize_i64(i8::from_be_bytes(c.array()?).into()),
            Marker::I16 => serializer.serialize_i64(i16::from_be_bytes(c.array()?).into()),
            Marker::I32 => serializer.serialize_i64(i32::from_be_bytes(c.array()?).into()),
            Marker::I64 => serializer.serialize_i64(i64::from_be_bytes(c.array()?)),
            Marker::F32 => serializer.serialize_f64(f32::from_be_bytes(c.array()?).into()),
            Marker::F64 => serializer.serialize_f64(f64::from_be_bytes(c.array()?)),
            Marker::FixStr(len) => str(c, usize::from(len), serializer),
            Marker::Str8 => str(c, c.length(1)?, serializer),
            Marker::Str16 => str(c, c.length(2)?, serializer),
            Marker::Str32 => str(c, c.length(4)?, serializer),
            Marker::FixArray(len) => array(c, usize::from(len), serializer),
            Marker::Array16 => array(c, c.length(2)?, serializer),
            Marker::Array32 => array(c, c.length(4)?, serializer),
            Marker::FixMap(len) => map(c, usize::from(len), serializer),
            Marker::Map16 => map(c, c.length(2)?, serializer),
            Marker::Map32 => map(c, c.length(4)?, serializer),
            _ => Err(ser::Error::custom(
                "data holds a value without a JSON equivalent",
            )),
        }
    }
}

fn str<S: Serializer>(c: &Cursor<'_>, len: usize, serializer: S) -> Result<S::Ok, S::Error> {
    let text = std::str::from_utf8(c.take(len)?).map_err(ser::Error::custom)?;
    serializer.serialize_str(text)
}

fn array<S: Serializer>(c: &Cursor<'_>, len: usize, serializer: S) -> Result<S::Ok, S::Error> {
    let mut seq = serializer.serialize_seq(Some(len))?;
    for _ in 0..len {
        seq.serialize_element(&Item(c))?;
    }
    seq.end()
}

fn map<S: Serializer>(c: &Cursor<'_>, len: usize, serializer: S) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(len))?;
    for _ in 0..len {
        map.serialize_entry(&Item(c), &Item(c))?;
    }
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from_json(text: &str) -> Result<Data, serde_json::Error> {
        serde_json::from_str(text)
    }

    fn from_msgpack(bytes: &[u8]) -> Result<Data, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }

    #[test]
    fn key_order_is_kept_and_json_reads_back_unchanged() {
        let text = r#"{"z":1,"a":[true,null,-3,2.5,"x",{}],"m":{"b":[],"a":18446744073709551615}}"#;
        let data = from_json(text).unwrap();
        assert_eq!(serde_json::to_string(&data).unwrap(), text);
        assert_eq!(data.json_len(), text.len());
    }

    #[test]
    fn integers_are_written_in_their_smallest_encoding() {
        // int16 holding 300 and int64 holding -1, as another library might write them.
        let data = from_msgpack(&[
            0x92, 0xd1, 0x01, 0x2c, 0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ])
        .unwrap();
        assert_eq!(data.as_msgpack(), [0x92, 0xcd, 0x01, 0x2c, 0xff]);
        assert_eq!(data, Data::from(json!([300, -1])));
    }

    #[test]
    fn float32_becomes_float64_and_non_finite_floats_become_nil() {
        let data = from_msgpack(&[
            0x92, 0xca, 0x3f, 0xc0, 0x00, 0x00, 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0,
        ])
        .unwrap();
        assert_eq!(serde_json::to_string(&data).unwrap(), "[1.5,null]");
    }

    #[test]
    fn values_without_a_json_equivalent_are_refused() {
        assert!(from_msgpack(&[0xc4, 0x01, 0x00]).is_err(), "bin");
        assert!(from_msgpack(&[0xd4, 0x01, 0x00]).is_err(), "ext");
        assert!(from_msgpack(&[0x81, 0x01, 0x02]).is_err(), "integer key");
        assert!(
            from_msgpack(&[0x81, 0xa1, b'k', 0xc4, 0x00]).is_err(),
            "nested bin"
        );
    }

    #[test]
    fn a_hostile_shape_costs_about_its_own_size() {
        // 65,000 empty arrays in one array: ~2 MiB as a JSON tree, ~65 KiB here.
        let mut msgpack = vec![0xdc];
        msgpack.extend_from_slice(&65_000u16.to_be_bytes());
        msgpack.extend(std::iter::repeat_n(0x90, 65_000));
        let data = from_msgpack(&msgpack).unwrap();
        assert_eq!(data.as_msgpack(), msgpack);
        let json = serde_json::to_string(&data).unwrap();
        assert_eq!(
            from_json(&json).unwrap(),
            data,
            "the JSON form reads back the same"
        );
    }

    #[test]
    fn structs_encode_as_maps_and_decode_back() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Bid {
            amount: i64,
            bidder: Option<String>,
        }
        let bid = Bid {
            amount: 125_000,
            bidder: None,
        };
        let data = Data::encode(&bid).unwrap();
        assert_eq!(data.to_json(), json!({"amount": 125000, "bidder": null}));
        assert_eq!(data.decode::<Bid>().unwrap(), bid);
        assert!(Data::default().is_null());
    }
}
