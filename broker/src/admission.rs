//! Connection admission: caps on open WebSocket connections, in total and per client address,
//! and the process's open-file limit the total derives from. A [`Slot`] is held for the life of
//! a connection and gives its place back on drop.

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

#[cfg(test)]
mod tests {
    use super::*;

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
