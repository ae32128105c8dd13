//! `gavel-client`: a small async Gavel client over fastwebsockets (connect, send requests, read
//! frames) and development token signing ([`token`]). Used by the broker's tests and examples and
//! by load generation; clients in other languages follow `docs/protocol.md`.

pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError};
use gavel_protocol::{decode, encode, ClientFrame, Format, RequestId, ServerFrame};
use http_body_util::Empty;
use hyper::header::{AUTHORIZATION, CONNECTION, HOST, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("websocket: {0}")]
    WebSocket(#[from] WebSocketError),
    #[error("http: {0}")]
    Http(#[from] hyper::http::Error),
    #[error("decode: {0}")]
    Decode(#[from] gavel_protocol::DecodeError),
    #[error("encode: {0}")]
    Encode(#[from] gavel_protocol::EncodeError),
}

/// What arrived from the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(ServerFrame),
    /// The broker closed the connection with this code and reason.
    Closed {
        code: u16,
        reason: String,
    },
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub format: Format,
    /// A JWT, sent as `Authorization: Bearer` with the upgrade request. Without one the
    /// connection is anonymous until it sends an `auth` frame.
    pub token: Option<String>,
    /// Extra query string appended to `/ws?` (already encoded).
    pub query: Option<String>,
    /// Local address to connect from (spreads many connections over loopback addresses).
    pub source: Option<std::net::IpAddr>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            format: Format::MsgPack,
            token: None,
            query: None,
            source: None,
        }
    }
}

/// One connection to a broker.
pub struct Client {
    ws: WebSocket<TokioIo<Upgraded>>,
    format: Format,
    next_id: RequestId,
    max_size: usize,
    answer_pings: bool,
}

/// Runs hyper's client connection tasks on Tokio (for `fastwebsockets::handshake::client`).
pub struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

impl Client {
    /// Opens a connection to `ws://{addr}/ws` with the given options.
    pub async fn connect(addr: SocketAddr, options: ConnectOptions) -> Result<Client, ClientError> {
        let stream = connect_tcp(addr, options.source).await?;
        stream.set_nodelay(true)?;
        Client::handshake(stream, addr, options).await
    }

    /// Runs the WebSocket handshake on an already-connected TCP stream.
    pub async fn handshake(
        stream: TcpStream,
        addr: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Client, ClientError> {
        Client::handshake_over(stream, &addr.to_string(), options).await
    }

    /// Runs the WebSocket handshake over any stream (a TLS stream for `wss://`); `host` is
    /// the `Host` header.
    pub async fn handshake_over<S>(
        stream: S,
        host: &str,
        options: ConnectOptions,
    ) -> Result<Client, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let uri = match &options.query {
            None => "/ws".to_owned(),
            Some(query) => format!("/ws?{query}"),
        };
        let mut request = Request::builder();
        if let Some(token) = &options.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .method("GET")
            .uri(uri)
            .header(HOST, host)
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13")
            .header(SEC_WEBSOCKET_PROTOCOL, options.format.subprotocol())
            .body(Empty::<Bytes>::new())?;
        let (mut ws, _response) =
            fastwebsockets::handshake::client(&SpawnExecutor, request, stream).await?;
        // Pongs and close replies are sent by `next`, which ignores a failed write: the
        // library's own would turn a write error into a read error and hide a close frame.
        ws.set_auto_pong(false);
        ws.set_auto_close(false);
        Ok(Client {
            ws,
            format: options.format,
            next_id: 1,
            max_size: 64 << 20,
            answer_pings: true,
        })
    }

    /// Whether reading answers the broker's pings (on by default).
    pub fn set_auto_pong(&mut self, on: bool) {
        self.answer_pings = on;
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = encode(self.format, frame)?;
        let opcode = match self.format {
            Format::MsgPack => OpCode::Binary,
            Format::Json => OpCode::Text,
        };
        self.send_raw(opcode, bytes.to_vec()).await
    }

    /// Sends an arbitrary message (for tests of hostile input).
    pub async fn send_raw(&mut self, opcode: OpCode, payload: Vec<u8>) -> Result<(), ClientError> {
        self.ws
            .write_frame(Frame::new(true, opcode, None, Payload::Owned(payload)))
            .await?;
        Ok(())
    }

    /// Sends a raw frame with an explicit FIN bit (fragmentation tests).
    pub async fn send_fragment(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: Vec<u8>,
    ) -> Result<(), ClientError> {
        self.ws
            .write_frame(Frame::new(fin, opcode, None, Payload::Owned(payload)))
            .await?;
        Ok(())
    }

    /// Reads the next data frame or the close; answers pings on the way.
    pub async fn next(&mut self) -> Result<Incoming, ClientError> {
        match self.next_raw().await? {
            Ok(bytes) => Ok(Incoming::Frame(decode(self.format, &bytes, self.max_size)?)),
            Err((code, reason)) => Ok(Incoming::Closed { code, reason }),
        }
    }

    /// Reads the next data message undecoded (`Ok(Err((code, reason)))` for a close): for
    /// clients that decode only the fields they need, such as load generators.
    pub async fn next_raw(&mut self) -> Result<Result<Bytes, (u16, String)>, ClientError> {
        loop {
            let frame = match self.ws.read_frame().await {
                Ok(frame) => frame,
                Err(WebSocketError::ConnectionClosed) => continue,
                Err(e) => return Err(e.into()),
            };
            match frame.opcode {
                OpCode::Binary | OpCode::Text => {
                    return Ok(Ok(Bytes::copy_from_slice(&frame.payload)));
                }
                OpCode::Ping => {
                    if self.answer_pings {
                        let pong = Frame::pong(Payload::Owned(frame.payload.to_vec()));
                        let _ = self.ws.write_frame(pong).await;
                    }
                }
                OpCode::Close => {
                    let (code, reason) = close_payload(&frame.payload);
                    let _ = self.ws.write_frame(Frame::close(code.min(4999), b"")).await;
                    return Ok(Err((code, reason)));
                }
                _ => continue,
            }
        }
    }

    /// Reads the next frame, treating a close as an error.
    pub async fn next_frame(&mut self) -> Result<ServerFrame, ClientError> {
        match self.next().await? {
            Incoming::Frame(frame) => Ok(frame),
            Incoming::Closed { .. } => {
                Err(ClientError::WebSocket(WebSocketError::ConnectionClosed))
            }
        }
    }

    /// Sends a close frame with `code`.
    pub async fn close(&mut self, code: u16) -> Result<(), ClientError> {
        self.ws.write_frame(Frame::close(code, b"")).await?;
        Ok(())
    }

    /// Splits the connection so one task can read while others send (load generation). The
    /// reader answers pings through the shared writer.
    pub fn split(self) -> (ClientReader, ClientWriter) {
        let format = self.format;
        let (read, write) = self.ws.split(tokio::io::split);
        let writer = ClientWriter {
            write: Arc::new(tokio::sync::Mutex::new(write)),
            format,
        };
        let reader = ClientReader {
            read,
            writer: writer.clone(),
            max_size: self.max_size,
        };
        (reader, writer)
    }
}

type Io = TokioIo<Upgraded>;

/// The sending half of a split [`Client`]; cheap to clone.
#[derive(Clone)]
pub struct ClientWriter {
    write: Arc<tokio::sync::Mutex<fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<Io>>>>,
    format: Format,
}

impl ClientWriter {
    pub async fn send(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = encode(self.format, frame)?;
        let opcode = match self.format {
            Format::MsgPack => OpCode::Binary,
            Format::Json => OpCode::Text,
        };
        self.write
            .lock()
            .await
            .write_frame(Frame::new(
                true,
                opcode,
                None,
                Payload::Owned(bytes.to_vec()),
            ))
            .await?;
        Ok(())
    }
}

/// The reading half of a split [`Client`].
pub struct ClientReader {
    read: fastwebsockets::WebSocketRead<tokio::io::ReadHalf<Io>>,
    writer: ClientWriter,
    max_size: usize,
}

impl ClientReader {
    /// The next data frame or the close.
    pub async fn next(&mut self) -> Result<Incoming, ClientError> {
        let writer = self.writer.clone();
        let mut owed = move |frame: Frame<'static>| {
            let writer = writer.clone();
            async move { writer.write.lock().await.write_frame(frame).await }
        };
        loop {
            let frame = self.read.read_frame(&mut owed).await?;
            match frame.opcode {
                OpCode::Binary | OpCode::Text => {
                    return Ok(Incoming::Frame(decode(
                        self.writer.format,
                        &frame.payload,
                        self.max_size,
                    )?));
                }
                OpCode::Close => {
                    let (code, reason) = close_payload(&frame.payload);
                    return Ok(Incoming::Closed { code, reason });
                }
                OpCode::Ping => {
                    let pong = Frame::pong(Payload::Owned(frame.payload.to_vec()));
                    let _ = self.writer.write.lock().await.write_frame(pong).await;
                }
                _ => continue,
            }
        }
    }
}

/// The code (1005 when absent) and reason of a close frame's payload.
fn close_payload(payload: &[u8]) -> (u16, String) {
    let code = match payload {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 1005,
    };
    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
    (code, reason)
}

/// A TCP connection to `addr`, from `source` when given.
pub async fn connect_tcp(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    #[cfg(target_os = "linux")]
    port_at_connect(&socket);
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Asks Linux to choose the source port at `connect`, from the whole address four-tuple, and
/// not at `bind` (`IP_BIND_ADDRESS_NO_PORT`). At `bind` a port still in TIME_WAIT from an earlier
/// run cannot be reused, and with most of the range held each `bind` searches longer: a load
/// test's connect storm then crawls. Best effort: without it, `bind` works as before.
#[cfg(target_os = "linux")]
fn port_at_connect(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is the open socket `socket` owns; the option is an int, passed
    // by pointer with its size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
