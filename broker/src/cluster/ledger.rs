//! The cluster's auction ledger: Redis as the single sequencer of every auction's bids.
//! A node's auction actor takes the auction's lock in Redis, catches up with what other nodes
//! committed, judges its bids with the same rules as a single node, and commits them with a
//! compare-and-set on the auction's version that also publishes the resulting room events,
//! all in one atomic script. Knows records and bytes, not auction rules.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::{Cluster, ClusterError, OutgoingEvent, ROOM_KEY_TTL};
use crate::metrics as m;
use crate::store::BidRecord;

/// How long one turn may wait for an auction's lock before its bids are refused.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// A lock not released (its node died mid-turn) expires after this.
const LOCK_TTL: Duration = Duration::from_secs(5);

/// An auction as Redis holds it.
pub struct Fresh {
    pub version: u64,
    pub record: Vec<u8>,
    /// Bids after the seq the caller asked from, in seq order.
    pub bids: Vec<BidRecord>,
}

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("the auction's lock expired before the commit")]
    LostLock,
    #[error("another node changed the auction first")]
    Conflict,
}

/// The ledger; cheap to clone.
#[derive(Clone)]
pub struct AuctionLedger {
    cluster: Arc<Cluster>,
}

fn decode_bid(bytes: &[u8]) -> Result<BidRecord, ClusterError> {
    rmp_serde::from_slice(bytes).map_err(|e| ClusterError::Protocol(format!("bid record: {e}")))
}

impl AuctionLedger {
    pub fn new(cluster: Arc<Cluster>) -> AuctionLedger {
        AuctionLedger { cluster }
    }

    pub fn ready(&self) -> bool {
        self.cluster.ready()
    }

    fn prefix(&self) -> &str {
        &self.cluster.config.prefix
    }

    /// Takes the auction's lock for one turn, waiting while another node holds it. Returns
    /// the auction's current version.
    pub async fn lock(&self, auction: &str) -> Result<u64, ClusterError> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(500);
        loop {
            let mut conn = self.cluster.conn();
            let (held, version): (u8, u64) = self
                .cluster
                .scripts
                .lock
                .arg(self.prefix())
                .arg(auction)
                .arg(self.cluster.node_id())
                .arg(LOCK_TTL.as_millis() as u64)
                .invoke_async(&mut conn)
                .await
                .inspect_err(|e| self.cluster.command_failed("lock", e))?;
            if held == 1 {
                metrics::histogram!(m::CLUSTER_LOCK_WAIT_SECONDS).record(started.elapsed());
                return Ok(version);
            }
            if started.elapsed() > LOCK_WAIT {
                return Err(ClusterError::Unavailable(format!(
                    "auction {auction} stayed locked by another node for {LOCK_WAIT:?}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(8));
        }
    }

    /// Releases the lock after a turn that wrote nothing.
    pub async fn unlock(&self, auction: &str) -> Result<(), ClusterError> {
        let mut conn = self.cluster.conn();
        let _: u8 = self
            .cluster
            .scripts
            .unlock
            .arg(self.prefix())
            .arg(auction)
            .arg(self.cluster.node_id())
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.cluster.command_failed("unlock", e))?;
        Ok(())
    }

    /// The auction's record and its bids after `after_seq`.
    pub async fn read(&self, auction: &str, after_seq: u64) -> Result<Fresh, ClusterError> {
        let mut conn = self.cluster.conn();
        let reply: Vec<redis::Value> = self
            .cluster
            .scripts
            .read_auction
            .arg(self.prefix())
            .arg(auction)
            .arg(after_seq)
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.cluster.command_failed("read_auction", e))?;
        let mut items = reply.into_iter();
        fn value<T: redis::FromRedisValue>(v: Option<redis::Value>) -> Result<T, ClusterError> {
            let v = v.ok_or_else(|| ClusterError::Protocol("short auction read".into()))?;
            redis::from_redis_value(v).map_err(|e| ClusterError::Protocol(e.to_string()))
        }
        let version: u64 = value(items.next())?;
        let record: Vec<u8> = value(items.next())?;
        let mut bids = Vec::new();
        for item in items {
            let bytes: Vec<u8> = value(Some(item))?;
            bids.push(decode_bid(&bytes)?);
        }
        Ok(Fresh {
            version,
            record,
            bids,
        })
    }

    /// Commits a turn: appends `bids`, stores `record`, publishes `events` in their rooms,
    /// bumps the version and releases the lock, atomically, if this node still holds the
    /// lock and `version` is still current. Returns the new version.
    pub async fn commit(
        &self,
        auction: &str,
        version: u64,
        record: &[u8],
        bids: &[BidRecord],
        events: &[OutgoingEvent],
    ) -> Result<u64, CommitError> {
        let mut invocation = self.cluster.scripts.commit.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(auction)
            .arg(self.cluster.node_id())
            .arg(version)
            .arg(record)
            .arg(Cluster::new_epoch())
            .arg(ROOM_KEY_TTL.as_millis() as u64)
            .arg(self.cluster.config.history_size.max(1))
            .arg(bids.len());
        for bid in bids {
            let bytes = rmp_serde::to_vec_named(bid)
                .map_err(|e| ClusterError::Protocol(format!("bid record: {e}")))?;
            invocation.arg(bytes);
        }
        invocation.arg(events.len());
        for event in events {
            invocation
                .arg(event.channel.as_str())
                .arg(&event.body)
                .arg(&event.state);
        }
        let mut conn = self.cluster.conn();
        let started = Instant::now();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.cluster.command_failed("commit", e))
            .map_err(ClusterError::from)?;
        metrics::histogram!(m::CLUSTER_COMMIT_SECONDS).record(started.elapsed());
        match reply.first() {
            Some(-1) => Err(CommitError::LostLock),
            Some(-2) => Err(CommitError::Conflict),
            Some(&v) if v > 0 => Ok(v as u64),
            _ => Err(ClusterError::Protocol("commit reply".into()).into()),
        }
    }

    /// Creates an auction cluster-wide; false if the id is taken.
    pub async fn create(
        &self,
        auction: &str,
        record: &[u8],
        state: &serde_json::Value,
    ) -> Result<bool, ClusterError> {
        let mut conn = self.cluster.conn();
        let created: u8 = self
            .cluster
            .scripts
            .create_auction
            .arg(self.prefix())
            .arg(auction)
            .arg(record)
            .arg(state.to_string())
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.cluster.command_failed("create_auction", e))?;
        Ok(created == 1)
    }

    /// Every auction id of the cluster.
    pub async fn ids(&self) -> Result<Vec<String>, ClusterError> {
        let mut conn = self.cluster.conn();
        let ids: Vec<String> = conn
            .smembers(self.cluster.key("auctions"))
            .await
            .inspect_err(|e| self.cluster.command_failed("list_auctions", e))?;
        Ok(ids)
    }

    /// Bids of `auction` with seq > `after`, at most `limit`.
    pub async fn bids(
        &self,
        auction: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BidRecord>, ClusterError> {
        // LRANGE takes signed indexes: a page past the end of any possible list is empty.
        let Ok(start) = isize::try_from(after) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stop = start.saturating_add(limit.min(1 << 40) as isize) - 1;
        let mut conn = self.cluster.conn();
        let raw: Vec<Vec<u8>> = conn
            .lrange(
                self.cluster.key(&format!("auction:{auction}:bids")),
                start,
                stop,
            )
            .await
            .inspect_err(|e| self.cluster.command_failed("bids", e))?;
        raw.iter().map(|b| decode_bid(b)).collect()
    }
}
