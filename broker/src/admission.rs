//! Connection admission: caps on open WebSocket connections, in total and per client address,
//! and the process's open-file limit the total derives from. A [`Slot`] is held for the life of
//! a connection and gives its place back on drop; a [`SpareDescriptor`] lets the accept loop
//! refuse connections even when the process has no file descriptor left.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// File descriptors kept free for the listener, sled, logs and the HTTP API.
const RESERVED_FDS: u64 = 64;

pub struct Admission {
    max_total: usize,
    /// 0: no per-address limit.
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    AddressFull,
}

/// A connection's place; released on drop.
pub struct Slot {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Admission {
    /// `max_total` 0 means: derive it from the open-file limit.
    pub fn new(max_total: usize, max_per_ip: usize) -> Admission {
        let max_total = if max_total > 0 {
            max_total
        } else {
            open_file_limit()
                .map(|limit| limit.saturating_sub(RESERVED_FDS).max(1) as usize)
                .unwrap_or(10_000)
        };
        Admission {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
        }
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// WebSocket connections holding a place now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Takes a place for a connection from `ip` (unknown when embedded behind another server).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, Refused> {
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(Refused::Full);
        }
        let ip = ip.filter(|_| self.max_per_ip > 0);
        if let Some(ip) = ip {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                drop(count);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::AddressFull);
            }
            *count += 1;
        }
        Ok(Slot {
            admission: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.admission.per_ip.remove_if_mut(&ip, |_, count| {
                *count = count.saturating_sub(1);
                *count == 0
            });
        }
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Raises this process's soft open-file limit to its hard limit; returns the new soft limit.
pub fn raise_open_file_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
        Some(limit.rlim_cur as u64)
    }
}

fn open_file_limit() -> Option<u64> {
    raise_open_file_limit()
}

/// One file descriptor held in reserve. When an accept fails because the process has no
/// descriptor left, the reserve is given up for one accept: the waiting connection is answered
/// 503 and closed at once ([`shed`]), instead of waiting in the listen queue, unanswered, until
/// some connection ends.
pub struct SpareDescriptor(Option<std::fs::File>);

impl SpareDescriptor {
    pub fn open() -> SpareDescriptor {
        SpareDescriptor(std::fs::File::open("/dev/null").ok())
    }

    /// Gives the reserve up; false when there was none (it could not be taken back yet).
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes a descriptor back into reserve, if one is free.
    pub fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

/// Whether an accept failed for want of file descriptors (the process's or the system's).
pub fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The whole answer to a connection shed for want of file descriptors: the `too_many_connections`
/// refusal, as when `--max-connections` is reached (docs/protocol.md §2.3).
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 5\r\nconnection: close\r\ncontent-length: 87\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"the broker is full; retry shortly\"}}";

/// Answers a connection taken with the spare descriptor and closes it, without waiting: what
/// the client already sent is read (so the close is not a reset that could lose the answer), the
/// 503 is written if the socket takes it at once, and the socket is closed. Over TLS, no
/// handshake is paid for: the connection is just closed.
pub fn shed(stream: tokio::net::TcpStream, tls: bool) {
    if !tls {
        // Up to 64 KiB of request: what a client sends before it reads an answer.
        let mut request = [0u8; 4096];
        for _ in 0..16 {
            if !matches!(stream.try_read(&mut request), Ok(n) if n > 0) {
                break;
            }
        }
        let _ = stream.try_write(SHED_RESPONSE);
    }
    drop(stream);
}

/// The warning about shed connections: at most one line a second, with the count since the
/// last one (a flood of connections must not become a flood of log lines).
#[derive(Default)]
pub struct ShedLog {
    since_last: u64,
    last: Option<std::time::Instant>,
}

impl ShedLog {
    pub fn shed(&mut self) {
        self.since_last += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= std::time::Duration::from_secs(1))
        {
            tracing::warn!(
                connections = self.since_last,
                "out of file descriptors: connections answered 503 and closed (raise the \
                 open-file limit or lower --max-connections)"
            );
            self.since_last = 0;
            self.last = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shed_answer_is_a_complete_http_response() {
        let text = std::str::from_utf8(SHED_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "too_many_connections");
    }

    #[test]
    fn caps_total_and_per_address_and_gives_places_back() {
        let admission = Arc::new(Admission::new(3, 2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = admission.admit(Some(a)).unwrap();
        let _s2 = admission.admit(Some(a)).unwrap();
        assert_eq!(admission.admit(Some(a)).err(), Some(Refused::AddressFull));
        let _s3 = admission.admit(Some(b)).unwrap();
        assert_eq!(admission.admit(Some(b)).err(), Some(Refused::Full));
        drop(s1);
        assert!(admission.admit(Some(a)).is_ok());
        assert!(Admission::new(0, 0).max_total() >= 1);
    }
}
