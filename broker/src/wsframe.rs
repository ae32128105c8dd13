//! RFC 6455 framing for the server side: [`FrameReader`] reads client messages (masked frames,
//! fragments reassembled under one size cap, control frames checked, text validated as UTF-8)
//! holding no heap buffer while idle; [`put_frame`] lays out unmasked server frames.
//!
//! fastwebsockets 0.10 still does the upgrade handshake and the client side; its reader is not
//! used here because it accepts unmasked client frames, does not cap a message reassembled from
//! fragments, and preallocates 8 KiB per connection (see `docs/architecture.md`).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close code, if it sent one.
    Close(Option<u16>),
}

/// Why reading stopped. Each maps to a close code in `session`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed without a close frame")]
    Eof,
    #[error("socket error: {0}")]
    Io(std::io::ErrorKind),
    #[error("message over the size limit")]
    TooBig,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e.kind())
    }
}

/// Most frames one fragmented message may have: every frame costs the sender a token of its
/// rate limit, and this bounds how many a reader takes before it returns to be charged.
pub const MAX_FRAGMENTS: u32 = 64;

/// Frames this small are read through the inline buffer without touching the heap.
const INLINE: usize = 256;
/// Longest frame header: 2 + 8 (length) + 4 (mask).
const MAX_HEADER: usize = 14;

/// Reads client messages from `R`.
pub struct FrameReader<R> {
    read: R,
    /// Bytes read but not consumed live in `inline[start..end]`.
    inline: [u8; INLINE],
    start: usize,
    end: usize,
    max_message: usize,
    /// A fragmented message in progress: its opcode and bytes so far.
    partial: Option<(OpCode, BytesMut)>,
    /// Frames read since the last [`FrameReader::take_frames`] (fragments and control frames
    /// included), so the session charges every frame to the rate limit, not only messages.
    frames: u32,
    /// Frames of the fragmented message in progress.
    fragments: u32,
}

struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(read: R, max_message: usize) -> FrameReader<R> {
        FrameReader {
            read,
            inline: [0; INLINE],
            start: 0,
            end: 0,
            max_message,
            partial: None,
            frames: 0,
            fragments: 0,
        }
    }

    /// How many frames were read since the last call (at least one per message returned).
    pub fn take_frames(&mut self) -> u32 {
        std::mem::take(&mut self.frames)
    }

    /// The next complete message. Cancel-safe between messages only: dropping the future in the
    /// middle of a frame loses that frame (the caller closes the connection in that case).
    pub async fn next(&mut self) -> Result<Message, ReadError> {
        loop {
            let header = self.header().await?;
            self.frames = self.frames.saturating_add(1);
            if header.opcode.is_control() {
                if !header.fin {
                    return Err(ReadError::Protocol("fragmented control frame"));
                }
                if header.len > 125 {
                    return Err(ReadError::Protocol("control frame over 125 bytes"));
                }
            }
            let so_far = self.partial.as_ref().map_or(0, |(_, b)| b.len());
            let data = !header.opcode.is_control();
            if data && so_far.saturating_add(header.len) > self.max_message {
                return Err(ReadError::TooBig);
            }
            let payload = self.payload(&header).await?;
            match header.opcode {
                OpCode::Ping => return Ok(Message::Ping(payload.freeze())),
                OpCode::Pong => return Ok(Message::Pong),
                OpCode::Close => return close(&payload).map(Message::Close),
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol("new message inside a fragmented one"));
                    }
                    if header.fin {
                        return finish(header.opcode, payload);
                    }
                    self.fragments = 1;
                    self.partial = Some((header.opcode, payload));
                }
                OpCode::Continuation => {
                    let Some((opcode, mut buf)) = self.partial.take() else {
                        return Err(ReadError::Protocol("continuation without a message"));
                    };
                    buf.extend_from_slice(&payload);
                    self.fragments += 1;
                    if self.fragments > MAX_FRAGMENTS {
                        return Err(ReadError::Protocol("a message of too many fragments"));
                    }
                    if header.fin {
                        return finish(opcode, buf);
                    }
                    self.partial = Some((opcode, buf));
                }
            }
        }
    }

    /// Makes at least `n` (≤ INLINE) unconsumed bytes available in `inline`.
    async fn fill(&mut self, n: usize) -> Result<(), ReadError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.start + n > INLINE {
            self.inline.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        while self.end - self.start < n {
            let read = self.read.read(&mut self.inline[self.end..]).await?;
            if read == 0 {
                return Err(ReadError::Eof);
            }
            self.end += read;
        }
        Ok(())
    }

    async fn header(&mut self) -> Result<Header, ReadError> {
        self.fill(2).await?;
        let (b0, b1) = (self.inline[self.start], self.inline[self.start + 1]);
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol(
                "reserved bits set (no extension was negotiated)",
            ));
        }
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(ReadError::Protocol("unknown opcode"))?;
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let extra = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        self.fill(2 + extra + 4).await?;
        let at = self.start + 2;
        let len = match extra {
            0 => u64::from(b1 & 0x7F),
            2 => u64::from(u16::from_be_bytes([self.inline[at], self.inline[at + 1]])),
            _ => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&self.inline[at..at + 8]);
                u64::from_be_bytes(be)
            }
        };
        if len >> 63 != 0 {
            return Err(ReadError::Protocol("payload length with the high bit set"));
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&self.inline[at + extra..at + extra + 4]);
        self.start = at + extra + 4;
        debug_assert!(self.start <= self.end && 2 + extra + 4 <= MAX_HEADER);
        Ok(Header {
            fin: b0 & 0x80 != 0,
            opcode,
            mask,
            // A length that does not fit usize is over any limit; it is refused before reading.
            len: usize::try_from(len).unwrap_or(usize::MAX),
        })
    }

    /// Reads and unmasks the payload. The caller has checked `len` against the limits.
    async fn payload(&mut self, header: &Header) -> Result<BytesMut, ReadError> {
        let mut payload = BytesMut::with_capacity(header.len);
        let buffered = (self.end - self.start).min(header.len);
        payload.extend_from_slice(&self.inline[self.start..self.start + buffered]);
        self.start += buffered;
        if payload.len() < header.len {
            let mut rest = (&mut self.read).take((header.len - payload.len()) as u64);
            while payload.len() < header.len {
                if rest.read_buf(&mut payload).await? == 0 {
                    return Err(ReadError::Eof);
                }
            }
        }
        unmask(&mut payload, header.mask);
        Ok(payload)
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

fn finish(opcode: OpCode, payload: BytesMut) -> Result<Message, ReadError> {
    if opcode == OpCode::Text {
        if std::str::from_utf8(&payload).is_err() {
            return Err(ReadError::InvalidUtf8);
        }
        return Ok(Message::Text(payload.freeze()));
    }
    Ok(Message::Binary(payload.freeze()))
}

/// Parses a close frame's payload (RFC 6455 §5.5.1, §7.4).
fn close(payload: &[u8]) -> Result<Option<u16>, ReadError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ReadError::Protocol("close frame with a one-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !allowed {
                return Err(ReadError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// Appends one unmasked server frame (header, then payload) to `buf`.
pub fn put_frame(buf: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let len = payload.len();
    buf.reserve(10 + len);
    buf.push(0x80 | opcode as u8);
    if len < 126 {
        buf.push(len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(126);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(127);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame as a client library would send it.
    fn client_frame(fin: bool, opcode: u8, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(fin as u8) << 7 | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 65535 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn read_all(bytes: &[u8], max: usize) -> (Vec<Message>, ReadError) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut reader = FrameReader::new(bytes, max);
            let mut out = Vec::new();
            loop {
                match reader.next().await {
                    Ok(m) => out.push(m),
                    Err(e) => return (out, e),
                }
            }
        })
    }

    #[test]
    fn reads_messages_pings_and_close() {
        let mut wire = client_frame(true, 2, [1, 2, 3, 4], b"hello");
        wire.extend(client_frame(true, 9, [9, 9, 9, 9], b"p"));
        wire.extend(client_frame(false, 1, [5, 6, 7, 8], "hé".as_bytes()));
        wire.extend(client_frame(true, 0, [0, 0, 0, 1], "llo".as_bytes()));
        wire.extend(client_frame(true, 8, [3, 3, 3, 3], &[0x03, 0xe8]));
        let (messages, end) = read_all(&wire, 1024);
        assert_eq!(
            messages,
            [
                Message::Binary(Bytes::from_static(b"hello")),
                Message::Ping(Bytes::from_static(b"p")),
                Message::Text(Bytes::from("héllo")),
                Message::Close(Some(1000)),
            ]
        );
        assert_eq!(end, ReadError::Eof);
    }

    #[test]
    fn every_frame_is_counted_and_fragments_are_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // A ping, then a message in three fragments: four frames.
        let mut wire = client_frame(true, 9, [1, 1, 1, 1], b"");
        wire.extend(client_frame(false, 2, [1, 2, 3, 4], b"a"));
        wire.extend(client_frame(false, 0, [1, 2, 3, 4], b""));
        wire.extend(client_frame(true, 0, [1, 2, 3, 4], b"b"));
        rt.block_on(async {
            let mut reader = FrameReader::new(&wire[..], 64);
            assert_eq!(reader.next().await, Ok(Message::Ping(Bytes::new())));
            assert_eq!(reader.take_frames(), 1);
            assert_eq!(
                reader.next().await,
                Ok(Message::Binary(Bytes::from_static(b"ab")))
            );
            assert_eq!(reader.take_frames(), 3);
        });
        // Empty continuation frames without end: refused after MAX_FRAGMENTS.
        let mut wire = client_frame(false, 2, [1, 2, 3, 4], b"a");
        for _ in 0..MAX_FRAGMENTS + 10 {
            wire.extend(client_frame(false, 0, [1, 2, 3, 4], b""));
        }
        let (messages, end) = read_all(&wire, 1024);
        assert!(messages.is_empty());
        assert_eq!(end, ReadError::Protocol("a message of too many fragments"));
    }

    #[test]
    fn refuses_what_rfc_6455_forbids() {
        let unmasked = [0x82, 0x01, b'x'];
        assert_eq!(
            read_all(&unmasked, 64).1,
            ReadError::Protocol("client frames must be masked")
        );
        let rsv = client_frame(true, 0x40 | 2, [0; 4], b"x");
        assert!(matches!(read_all(&rsv, 64).1, ReadError::Protocol(_)));
        let opcode = client_frame(true, 3, [0; 4], b"x");
        assert!(matches!(read_all(&opcode, 64).1, ReadError::Protocol(_)));
        let fragmented_ping = client_frame(false, 9, [0; 4], b"x");
        assert!(matches!(
            read_all(&fragmented_ping, 64).1,
            ReadError::Protocol(_)
        ));
        let lone_continuation = client_frame(true, 0, [0; 4], b"x");
        assert!(matches!(
            read_all(&lone_continuation, 64).1,
            ReadError::Protocol(_)
        ));
        let bad_close = client_frame(true, 8, [0; 4], &[0x03, 0xed]); // 1005 may not be sent
        assert!(matches!(read_all(&bad_close, 64).1, ReadError::Protocol(_)));
        let bad_text = client_frame(true, 1, [7; 4], &[0xff, 0xfe]);
        assert_eq!(read_all(&bad_text, 64).1, ReadError::InvalidUtf8);
    }

    #[test]
    fn caps_single_frames_and_reassembled_messages() {
        let big = client_frame(true, 2, [1; 4], &[0; 65]);
        assert_eq!(read_all(&big, 64).1, ReadError::TooBig);
        let exact = client_frame(true, 2, [1; 4], &[0; 64]);
        assert_eq!(read_all(&exact, 64).0.len(), 1);
        let mut pieces = client_frame(false, 2, [1; 4], &[0; 40]);
        pieces.extend(client_frame(true, 0, [1; 4], &[0; 40]));
        assert_eq!(read_all(&pieces, 64).1, ReadError::TooBig);
        // A huge declared length is refused from the header alone.
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(read_all(&huge, 1 << 20).1, ReadError::TooBig);
    }

    #[test]
    fn server_frame_headers() {
        for (len, head) in [
            (5usize, vec![0x82, 5]),
            (126, vec![0x82, 126, 0, 126]),
            (70000, vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]),
        ] {
            let mut buf = Vec::new();
            put_frame(&mut buf, OpCode::Binary, &vec![7; len]);
            assert_eq!(&buf[..head.len()], &head[..]);
            assert_eq!(buf.len(), head.len() + len);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any message, cut into any fragments with any masks, arriving in one stream, reads
        /// back as the same message.
        #[test]
        fn fragmented_masked_messages_round_trip(
            payload in prop::collection::vec(any::<u8>(), 0..3000),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
            masks in prop::collection::vec(any::<[u8; 4]>(), 6),
            binary in any::<bool>(),
        ) {
            let source = if binary {
                payload
            } else {
                String::from_utf8_lossy(&payload).into_owned().into_bytes()
            };
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(source.len() + 1)).collect();
            points.push(source.len());
            points.sort_unstable();
            points.dedup();
            let mut wire = Vec::new();
            let mut from = 0;
            for (i, &to) in points.iter().enumerate() {
                let opcode = match (i, binary) { (0, true) => 2, (0, false) => 1, _ => 0 };
                let fin = i + 1 == points.len();
                wire.extend(client_frame(fin, opcode, masks[i % masks.len()], &source[from..to]));
                from = to;
            }
            let (messages, end) = read_all(&wire, 1 << 20);
            prop_assert_eq!(end, ReadError::Eof);
            let expected = if binary {
                Message::Binary(Bytes::from(source))
            } else {
                Message::Text(Bytes::from(source))
            };
            prop_assert_eq!(messages, vec![expected]);
        }

        /// Arbitrary bytes end in an error, never a panic, and never a message over the limit.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let (messages, _) = read_all(&bytes, 128);
            for m in messages {
                if let Message::Binary(b) | Message::Text(b) = m {
                    prop_assert!(b.len() <= 128);
                }
            }
        }
    }
}
