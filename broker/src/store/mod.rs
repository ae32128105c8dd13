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
}

/// The operations the auction engine needs from storage. Writes become durable only after
/// [`BidLog::sync`]; callers go through [`Durability`] for that.
pub trait BidLog: Send + Sync + 'static {
    /// Writes bids (with their idempotency index entries), the auction's record after them and
    /// the turn's webhooks (into the outbox), in one atomic batch.
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
    /// written by `append` in the same batch as the bid).
    fn find_bid(
        &self,
        auction: &str,
        user: &UserId,
        request_id: &str,
    ) -> Result<Option<BidRecord>, StorageError>;
    /// Undoes unflushed writes: removes the bids after `last_seq` (and their index entries)
    /// and the `outbox` entries of the failed turn, and puts `record` back, atomically. Used
    /// after a failed flush, so that no later flush makes durable what was answered as not
    /// placed.
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

type Waiter = oneshot::Sender<Result<(), StorageError>>;

/// The group-commit flusher: [`Durability::sync`] resolves once everything written before the
/// call is durable. Calls that arrive while a flush is running are answered together by the
/// next one, so throughput does not fall to one fsync per bid.
#[derive(Clone)]
pub struct Durability {
    waiters_tx: mpsc::UnboundedSender<Waiter>,
}

impl Durability {
    /// Starts the flusher task for `log`.
    pub fn start(log: Arc<dyn BidLog>, mode: GroupCommit) -> Durability {
        let (waiters_tx, mut waiters_rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            while let Some(first) = waiters_rx.recv().await {
                let mut waiters = vec![first];
                if mode == GroupCommit::On {
                    while let Ok(more) = waiters_rx.try_recv() {
                        waiters.push(more);
                    }
                }
                let started = Instant::now();
                let result = if log.sync_blocks() {
                    let log = Arc::clone(&log);
                    tokio::task::spawn_blocking(move || log.sync())
                        .await
                        .unwrap_or_else(|e| Err(StorageError::Io(format!("flush task: {e}"))))
                } else {
                    log.sync()
                };
                record_flush(started.elapsed(), waiters.len(), &result);
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        Durability { waiters_tx }
    }

    /// Resolves when every write made before this call is durable.
    pub async fn sync(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.waiters_tx
            .send(tx)
            .map_err(|_| StorageError::Stopped)?;
        rx.await.unwrap_or(Err(StorageError::Stopped))
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
mod tests {
    use super::*;

    fn bid(seq: u64, amount: i64) -> BidRecord {
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
