//! A Socket.IO v4 client (engine.io v4 over WebSocket, text packets) for the comparison peer:
//! connect to the default namespace, emit events with acknowledgements, receive events, and
//! answer engine.io pings. Only what the auction scenario needs.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketRead, WebSocketWrite};
use gavel_client::SpawnExecutor;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{ReadHalf, WriteHalf};

type Io = TokioIo<Upgraded>;

/// What arrives from a Socket.IO server.
pub enum Packet {
    /// `42["name", data]`
    Event(String, Value),
    /// `43N[data]`
    Ack(u64, Value),
    Closed,
}

#[derive(Clone)]
pub struct Writer {
    write: Arc<tokio::sync::Mutex<WebSocketWrite<WriteHalf<Io>>>>,
}

impl Writer {
    async fn send_text(&self, text: String) -> Result<(), String> {
        self.write
            .lock()
            .await
            .write_frame(Frame::text(Payload::Owned(text.into_bytes())))
            .await
            .map_err(|e| e.to_string())
    }

    /// Emits `event` with `data`, asking for acknowledgement `ack`.
    pub async fn emit(&self, event: &str, data: &Value, ack: u64) -> Result<(), String> {
        self.send_text(format!("42{ack}{}", serde_json::json!([event, data])))
            .await
    }
}

pub struct Reader {
    read: WebSocketRead<ReadHalf<Io>>,
    writer: Writer,
}

impl Reader {
    /// The next event or acknowledgement; answers pings on the way.
    pub async fn next(&mut self) -> Packet {
        let writer = self.writer.clone();
        let mut owed = move |frame: Frame<'static>| {
            let writer = writer.clone();
            async move { writer.write.lock().await.write_frame(frame).await }
        };
        loop {
            let Ok(frame) = self.read.read_frame(&mut owed).await else {
                return Packet::Closed;
            };
            match frame.opcode {
                OpCode::Close => return Packet::Closed,
                OpCode::Text => {}
                _ => continue,
            }
            let text = String::from_utf8_lossy(&frame.payload).into_owned();
            if text == "2" {
                let _ = self.writer.send_text("3".into()).await;
                continue;
            }
            if let Some(rest) = text.strip_prefix("42") {
                if let Ok(Value::Array(mut parts)) = serde_json::from_str::<Value>(rest) {
                    if parts.len() >= 2 {
                        let data = parts.swap_remove(1);
                        if let Some(name) = parts[0].as_str() {
                            return Packet::Event(name.to_owned(), data);
                        }
                    }
                }
                continue;
            }
            if let Some(rest) = text.strip_prefix("43") {
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                let Ok(id) = digits.parse() else { continue };
                let data = serde_json::from_str::<Value>(&rest[digits.len()..])
                    .ok()
                    .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
                    .unwrap_or(Value::Null);
                return Packet::Ack(id, data);
            }
        }
    }
}

/// Connects as `user` and joins the default namespace.
pub async fn connect(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    user: &str,
) -> Result<(Reader, Writer), String> {
    let stream = gavel_client::connect_tcp(addr, source)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let request = hyper::Request::get(format!("/socket.io/?EIO=4&transport=websocket&user={user}"))
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
        .await
        .map_err(|e| e.to_string())?;
    let (read, write) = ws.split(tokio::io::split);
    let writer = Writer {
        write: Arc::new(tokio::sync::Mutex::new(write)),
    };
    let mut reader = Reader {
        read,
        writer: writer.clone(),
    };
    // engine.io open packet ("0{...}"), then connect to "/" and wait for "40".
    let mut opened = false;
    loop {
        let frame = reader
            .read
            .read_frame(&mut |_: Frame<'static>| async { Ok::<(), std::io::Error>(()) })
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&frame.payload).into_owned();
        if text.starts_with('0') && !opened {
            opened = true;
            writer.send_text("40".into()).await?;
        } else if text.starts_with("40") && opened {
            return Ok((reader, writer));
        } else if text.starts_with("44") {
            return Err(format!("connect refused: {text}"));
        }
    }
}
