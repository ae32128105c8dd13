//! The clock of the fixed schedules (bids, chat, typing): an OS thread sleeps to each event's
//! due time and hands its index to the async task that sends it. tokio's timers have a
//! resolution of one millisecond and fire up to about two late; every latency is timed from
//! the event's due time, so that lateness would be counted against the server.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// A fixed schedule: event `k` is due at `start + k / rate`, whatever happened before.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Schedule {
    pub start: Instant,
    /// Events per second.
    pub rate: f64,
}

impl Schedule {
    /// When event `k` is due.
    pub fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(k as f64 / self.rate)
    }
}

/// The ticks of one schedule, from the pacer's thread.
pub(crate) struct Ticks {
    rx: mpsc::Receiver<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticks {
    /// The next event's index once it is due, or `None` after the last one.
    pub async fn recv(&mut self) -> Option<u64> {
        self.rx.recv().await
    }

    /// After [`Ticks::recv`] returned `None`: whether the schedule ran to its end, rather than
    /// stopping early because the pacer's thread panicked.
    pub fn finished(mut self) -> Result<(), PacerPanicked> {
        // The thread has dropped its sender, so it is past its loop: this join is short.
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Err(_)) => Err(PacerPanicked),
            _ => Ok(()),
        }
    }
}

/// The pacer's thread panicked: the schedule stopped early.
#[derive(Debug, thiserror::Error)]
#[error("the schedule's pacer thread panicked; the schedule stopped early")]
pub(crate) struct PacerPanicked;

/// Yields each of `events` (indices into `schedule`, rising) at its due time, from a thread
/// of its own (`std::thread::sleep` wakes within tens of microseconds). If the receiver falls
/// behind, the thread waits for it: the receiver sees the lag as `due(k).elapsed()`. The
/// thread ends after the last event or when the receiver is dropped.
pub(crate) fn ticks(
    schedule: Schedule,
    events: impl Iterator<Item = u64> + Send + 'static,
) -> std::io::Result<Ticks> {
    let (tx, rx) = mpsc::channel(1024);
    let thread = std::thread::Builder::new()
        .name("loadgen-pacer".into())
        .spawn(move || {
            for k in events {
                let wait = schedule.due(k).saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                if tx.blocking_send(k).is_err() {
                    return;
                }
            }
        })?;
    Ok(Ticks {
        rx,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_event_comes_once_in_order_and_never_early() {
        let schedule = Schedule {
            start: Instant::now(),
            rate: 2000.0,
        };
        let mut ticks = ticks(schedule, (0..40).filter(|k| k % 3 != 1)).unwrap();
        let mut seen = Vec::new();
        while let Some(k) = ticks.recv().await {
            assert!(Instant::now() >= schedule.due(k), "event {k} came early");
            seen.push(k);
        }
        let expected: Vec<u64> = (0..40).filter(|k| k % 3 != 1).collect();
        assert_eq!(seen, expected);
        assert!(ticks.finished().is_ok());
    }
}
