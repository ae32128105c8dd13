//! Durable storage of auctions and their bids behind a small [`BidLog`] trait, with a sled
//! implementation ([`SledLog`]) and an in-memory one ([`MemoryLog`]), and the group-commit
//! flusher ([`Durability`]) that makes writes durable before anything is acknowledged.
//! It knows records and bytes, not auction rules.

mod faulty;
mod memory;
mod sled_log;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gavel_protocol::UserId;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::metrics as m;

pub use faulty::FaultyLog;
pub use memory::MemoryLog;
pub use sled_log::SledLog;

/// A bid as the log keeps it: everything needed to answer a retry and to audit the auction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BidRecord {
    /// Gap-free from 1 per auction.
    pub seq: u64,
    pub user: UserId,
    /// In the currency's minor unit.
    pub amount: i64,
    /// The client's idempotency key for this bid; empty for a leader's automatic bid, which
    /// answers no request (and is not in the idempotency index).
    pub request_id: String,
    /// Server time the bid was accepted, ms since the Unix epoch.
    pub ts: u64,
    /// The auction's end right after this bid (soft close included), for exact retries.
    #[serde(default)]
    pub ends_at: u64,
    /// Placed by the broker for a bidder's maximum (proxy bidding).
    #[serde(default)]
    pub automatic: bool,
    /// The bidder's maximum with this bid. Private: never in a public view of the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_amount: Option<i64>,
    /// When a leader's maximum answered this bid at once (the next seq): that answer's amount,
    /// so a retry gets the first answer again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_with: Option<i64>,
}

impl BidRecord {
    /// Whether the bid answers a request (and so belongs in the idempotency index).
    pub fn has_request(&self) -> bool {
        !self.request_id.is_empty()
    }

    /// The bid as anyone may see it (the bid log's HTTP view): no maximum.
    pub fn public_view(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq,
            "user": self.user,
            "amount": self.amount,
            "automatic": self.automatic,
            "request_id": self.request_id,
            "ts": self.ts,
            "ends_at": self.ends_at,
        })
    }
}

/// A webhook waiting in the outbox: its id and its entry as the `webhooks` module stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outboxed {
    pub id: String,
    pub entry: Vec<u8>,
}

/// A storage failure. Cloneable so one flush result can answer every bid that shared it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("storage: {0}")]
    Io(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("the storage flusher has stopped")]
    Stopped,
    /// A write failed part way and taking back its first part failed too: some of it may be
    /// in the store (and a later flush would make it durable) until it is undone.
    #[error("write failed part way and could not be taken back: {0}")]
    Torn(String),
}

/// The operations the auction engine needs from storage. Writes become durable only after
/// [`BidLog::sync`]; callers go through [`Durability`] for that.
pub trait BidLog: Send + Sync + 'static {
    /// Writes bids (with their idempotency index entries), the auction's record after them and
    /// the turn's webhooks (into the outbox), as one turn: after a crash, either all of it is
    /// there, or at most bids after the record's last seq (with their index entries), which
    /// [`BidLog::revert`] removes at start-up (a store may write the record last rather than
    /// atomically). On an error nothing of it is in the store, except with
    /// [`StorageError::Torn`], after which the caller must revert.
    fn append(
        &self,
        auction: &str,
        bids: &[BidRecord],
        record: &[u8],
        outbox: &[Outboxed],
    ) -> Result<(), StorageError>;
    /// Writes an auction's record (definition and state) on its own.
    fn put_auction(&self, auction: &str, record: &[u8]) -> Result<(), StorageError>;
    /// Makes every write so far durable. Blocking.
    fn sync(&self) -> Result<(), StorageError>;
    /// Whether `sync` does IO (and so runs on the blocking pool). An in-memory log says no:
    /// its sync then runs in place, which also keeps tests under paused Tokio time exact.
    fn sync_blocks(&self) -> bool {
        true
    }
    /// Bids of `auction` with seq > `after`, in seq order, at most `limit`.
    fn bids(&self, auction: &str, after: u64, limit: usize)
        -> Result<Vec<BidRecord>, StorageError>;
    /// The highest bid seq of `auction` (0 without bids).
    fn last_seq(&self, auction: &str) -> Result<u64, StorageError>;
    /// Every live (not archived) auction record, by id.
    fn auctions(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError>;
    /// One auction's record, live or archived.
    fn auction(&self, auction: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// The bid `user` placed with `request_id` in `auction`, if any (the idempotency index,
    /// written by `append` after the bid; an entry whose bid is another's answers `None`).
    fn find_bid(
        &self,
        auction: &str,
        user: &UserId,
        request_id: &str,
    ) -> Result<Option<BidRecord>, StorageError>;
    /// Undoes unflushed writes: removes the bids after `last_seq` (and their index entries)
    /// and the `outbox` entries of the failed turn, and puts `record` back, atomically. Used
    /// after a failed flush or torn write, so that no later flush makes durable what was
    /// answered as not placed, and at start-up for the bids of a turn a crash cut.
    fn revert(
        &self,
        auction: &str,
        last_seq: u64,
        record: &[u8],
        outbox: &[String],
    ) -> Result<(), StorageError>;
    /// Every webhook not delivered yet.
    fn outbox(&self) -> Result<Vec<Outboxed>, StorageError>;
    /// Replaces one outbox entry (after a failed attempt). Not flushed: a lost update only
    /// repeats an attempt.
    fn put_outbox(&self, id: &str, entry: &[u8]) -> Result<(), StorageError>;
    /// Removes a delivered webhook. Not flushed: a lost removal means one more delivery, which
    /// the backend dedupes by id.
    fn remove_outbox(&self, id: &str) -> Result<(), StorageError>;
    /// Moves an ended auction out of the live set: [`BidLog::auctions`] no longer lists it; its
    /// record and bids stay readable.
    fn archive(&self, auction: &str) -> Result<(), StorageError>;
}

/// Whether bids that arrive while a flush runs share the next flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupCommit {
    /// One flush makes every write queued before it durable (the default).
    On,
    /// One flush per write: for comparison in benchmarks.
    Off,
}

/// A write for the flusher to make before its next flush (see [`Durability::commit`]).
pub type Write = Box<dyn FnOnce(&dyn BidLog) -> Result<(), StorageError> + Send>;

/// Why [`Durability::commit`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitFailure {
    /// The write failed: nothing of it is in the store, except with [`StorageError::Torn`]
    /// (some of it may be; the caller reverts).
    #[error("write failed: {0}")]
    Write(StorageError),
    /// The write is in the store, but the flush after it failed: it may or may not be on disk.
    #[error("flush failed: {0}")]
    Flush(StorageError),
}

impl From<CommitFailure> for StorageError {
    /// The storage error under either failure (callers that only report it).
    fn from(failure: CommitFailure) -> StorageError {
        match failure {
            CommitFailure::Write(error) | CommitFailure::Flush(error) => error,
        }
    }
}

/// A write (or none: a flush alone) and who waits for it to be durable.
struct Job {
    write: Option<Write>,
    reply: oneshot::Sender<Result<(), CommitFailure>>,
}

/// The group-commit flusher: [`Durability::commit`] makes a write and resolves once it is
/// durable; [`Durability::sync`] resolves once everything written before the call is. Jobs
/// that arrive while a flush is running share the next one, so throughput does not fall to one
/// fsync per bid.
///
/// For a log whose writes and flushes block (sled), writes and flushes run on one thread of
/// their own, never on the runtime's workers: sled's batch write takes a process-wide lock that
/// waits for a running flush, which holds the other side of it until its IO is done, so a
/// batch written on a worker stalled that worker (one of two here) for the flush's duration.
#[derive(Clone)]
pub struct Durability {
    jobs_tx: mpsc::UnboundedSender<Job>,
}

impl Durability {
    /// Starts the flusher for `log`: a thread when `log.sync_blocks()` (it ends when the last
    /// `Durability` is dropped), a task otherwise (an in-memory log, and tests under paused
    /// time).
    pub fn start(log: Arc<dyn BidLog>, mode: GroupCommit) -> Durability {
        let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel::<Job>();
        if log.sync_blocks() {
            let spawned = std::thread::Builder::new()
                .name("gavel-flusher".into())
                .spawn(move || {
                    while let Some(first) = jobs_rx.blocking_recv() {
                        run_jobs(&*log, mode, first, &mut jobs_rx);
                    }
                });
            if let Err(error) = spawned {
                // Every commit is then answered `Stopped`: nothing is acknowledged undurable.
                tracing::error!(%error, "could not start the bid log's flusher thread");
            }
        } else {
            tokio::spawn(async move {
                while let Some(first) = jobs_rx.recv().await {
                    run_jobs(&*log, mode, first, &mut jobs_rx);
                }
            });
        }
        Durability { jobs_tx }
    }

    /// Makes `write` (in the order commits arrive) and resolves once it is durable.
    pub async fn commit(&self, write: Write) -> Result<(), CommitFailure> {
        self.submit(Some(write)).await
    }

    /// Resolves when every write made before this call is durable.
    pub async fn sync(&self) -> Result<(), StorageError> {
        self.submit(None).await.map_err(StorageError::from)
    }

    async fn submit(&self, write: Option<Write>) -> Result<(), CommitFailure> {
        let (reply, answer) = oneshot::channel();
        if self.jobs_tx.send(Job { write, reply }).is_err() {
            // The flusher is gone: nothing of this was written.
            return Err(CommitFailure::Write(StorageError::Stopped));
        }
        // Dropped unanswered (the flusher died during the job): whether the write is in the
        // store is unknown, so it counts as unflushed.
        answer
            .await
            .unwrap_or(Err(CommitFailure::Flush(StorageError::Stopped)))
    }
}

/// One flush for `first` and (with group commit) every job queued behind it: their writes in
/// order, then the flush.
fn run_jobs(
    log: &dyn BidLog,
    mode: GroupCommit,
    first: Job,
    jobs_rx: &mut mpsc::UnboundedReceiver<Job>,
) {
    let mut jobs = vec![first];
    if mode == GroupCommit::On {
        while let Ok(more) = jobs_rx.try_recv() {
            jobs.push(more);
        }
    }
    let written: Vec<Result<(), StorageError>> = jobs
        .iter_mut()
        .map(|job| job.write.take().map_or(Ok(()), |write| write(log)))
        .collect();
    let started = Instant::now();
    let flushed = log.sync();
    record_flush(started.elapsed(), jobs.len(), &flushed);
    for (job, written) in jobs.into_iter().zip(written) {
        let answer = match written {
            Err(error) => Err(CommitFailure::Write(error)),
            Ok(()) => flushed.clone().map_err(CommitFailure::Flush),
        };
        let _ = job.reply.send(answer);
    }
}

fn record_flush(took: Duration, batch: usize, result: &Result<(), StorageError>) {
    metrics::histogram!(m::BID_LOG_FLUSH_SECONDS).record(took.as_secs_f64());
    metrics::histogram!(m::BID_LOG_FLUSH_BATCH).record(batch as f64);
    if let Err(error) = result {
        metrics::counter!(m::BID_LOG_FLUSH_ERRORS).increment(1);
        tracing::error!(%error, "bid log flush failed");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn bid(seq: u64, amount: i64) -> BidRecord {
        BidRecord {
            seq,
            user: UserId::parse("u1").unwrap(),
            amount,
            request_id: format!("r{seq}"),
            ts: 1000 + seq,
            ends_at: 5000,
            automatic: false,
            max_amount: None,
            answered_with: None,
        }
    }

    /// One body, run against every implementation.
    fn behaves_like_a_bid_log(log: &dyn BidLog) {
        assert_eq!(log.last_seq("a1").unwrap(), 0);
        assert!(log.auctions().unwrap().is_empty());
        log.put_auction("a1", b"created").unwrap();
        log.put_auction("a10", b"other").unwrap();
        for seq in 1..=5 {
            let webhook = Outboxed {
                id: format!("w{seq}"),
                entry: format!("entry {seq}").into_bytes(),
            };
            log.append(
                "a1",
                &[bid(seq, 100 * seq as i64)],
                format!("after {seq}").as_bytes(),
                &[webhook],
            )
            .unwrap();
        }
        log.append("a10", &[bid(1, 7)], b"a10 after 1", &[])
            .unwrap();
        log.sync().unwrap();
        assert_eq!(log.last_seq("a1").unwrap(), 5);
        assert_eq!(log.last_seq("a10").unwrap(), 1);
        assert_eq!(
            log.last_seq("a").unwrap(),
            0,
            "prefixes do not leak between auctions"
        );
        let all = log.bids("a1", 0, 100).unwrap();
        assert_eq!(
            all,
            (1..=5).map(|s| bid(s, 100 * s as i64)).collect::<Vec<_>>()
        );
        let page = log.bids("a1", 2, 2).unwrap();
        assert_eq!(page.iter().map(|b| b.seq).collect::<Vec<_>>(), [3, 4]);
        assert!(log.bids("a1", 5, 10).unwrap().is_empty());
        let mut auctions = log.auctions().unwrap();
        auctions.sort();
        assert_eq!(
            auctions,
            [
                ("a1".to_owned(), b"after 5".to_vec()),
                ("a10".to_owned(), b"a10 after 1".to_vec())
            ]
        );

        // The idempotency index finds a bid by its user and request id.
        let u1 = UserId::parse("u1").unwrap();
        assert_eq!(log.find_bid("a1", &u1, "r3").unwrap(), Some(bid(3, 300)));
        assert_eq!(log.find_bid("a10", &u1, "r3").unwrap(), None);
        assert_eq!(
            log.find_bid("a1", &UserId::parse("u2").unwrap(), "r3")
                .unwrap(),
            None
        );

        // A revert drops the bids after a seq, their index entries, and restores the record.
        assert_eq!(log.outbox().unwrap().len(), 5);
        log.revert("a1", 3, b"after 3", &["w4".into(), "w5".into()])
            .unwrap();
        let ids: Vec<String> = log.outbox().unwrap().into_iter().map(|o| o.id).collect();
        assert_eq!(
            ids,
            vec!["w1", "w2", "w3"],
            "the reverted turns' webhooks are gone"
        );
        log.put_outbox("w1", b"attempted").unwrap();
        log.remove_outbox("w2").unwrap();
        let left = log.outbox().unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].entry, b"attempted");
        assert_eq!(log.last_seq("a1").unwrap(), 3);
        assert_eq!(log.find_bid("a1", &u1, "r4").unwrap(), None);
        assert_eq!(log.auction("a1").unwrap(), Some(b"after 3".to_vec()));

        // An archived auction is no longer live, and still readable.
        log.archive("a10").unwrap();
        let live: Vec<String> = log.auctions().unwrap().into_iter().map(|a| a.0).collect();
        assert_eq!(live, ["a1"]);
        assert_eq!(log.auction("a10").unwrap(), Some(b"a10 after 1".to_vec()));
        assert_eq!(log.bids("a10", 0, 10).unwrap().len(), 1);
        assert_eq!(log.find_bid("a10", &u1, "r1").unwrap(), Some(bid(1, 7)));
        assert_eq!(log.auction("nope").unwrap(), None);
        // What the reopening test below expects must be durable, not left to a flush at drop.
        log.sync().unwrap();
    }

    #[test]
    fn memory_log() {
        behaves_like_a_bid_log(&MemoryLog::default());
    }

    #[test]
    fn faulty_log_passes_through_until_told_to_fail() {
        let log = FaultyLog::new(Arc::new(MemoryLog::default()));
        behaves_like_a_bid_log(&log);
        log.fail_syncs(true);
        assert!(log.sync().is_err());
        log.fail_syncs(false);
        assert!(log.sync().is_ok());
    }

    #[test]
    fn sled_log_and_reopen() {
        let dir = tempdir();
        {
            let log = SledLog::open(&dir).unwrap();
            behaves_like_a_bid_log(&log);
        }
        // sled releases its file lock when its last background reference goes, which can trail
        // the drop above on a loaded machine: retry the reopen for a while.
        let log = (0..100)
            .find_map(|_| {
                SledLog::open(&dir)
                    .inspect_err(|_| std::thread::sleep(std::time::Duration::from_millis(20)))
                    .ok()
            })
            .expect("the log reopens");
        assert_eq!(
            log.last_seq("a1").unwrap(),
            3,
            "what was written is there after reopening (the body reverted a1 to bid 3)"
        );
        let u1 = UserId::parse("u1").unwrap();
        assert!(log.find_bid("a1", &u1, "r3").unwrap().is_some());
        assert!(log.find_bid("a1", &u1, "r4").unwrap().is_none());
        assert_eq!(log.auctions().unwrap().len(), 1, "a10 stays archived");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn group_commit_answers_every_waiter() {
        let log: Arc<dyn BidLog> = Arc::new(MemoryLog::default());
        for mode in [GroupCommit::On, GroupCommit::Off] {
            let durability = Durability::start(Arc::clone(&log), mode);
            let waits: Vec<_> = (0..50)
                .map(|_| {
                    let d = durability.clone();
                    tokio::spawn(async move { d.sync().await })
                })
                .collect();
            for w in waits {
                assert_eq!(w.await.unwrap(), Ok(()));
            }
        }
    }

    pub(crate) fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "gavel-store-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
