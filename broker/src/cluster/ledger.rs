//! The cluster's [`Ledger`]: Redis as the single sequencer of every auction's bids. A turn takes
//! the auction's lock in Redis (which also reads Redis's clock), the actor catches up with what
//! other nodes committed and judges with the single-node rules, and the commit is a
//! compare-and-set on the auction's version that appends the bids (with their idempotency
//! index), stores the record and publishes the turn's room events, in one atomic script.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gavel_protocol::UserId;
use redis::AsyncCommands;
use serde_json::Value;

use super::{Cluster, ClusterError, OutgoingEvent, ROOM_KEY_TTL};
use crate::auction::ledger::{
    Announcement, CommitError, Ledger, LedgerError, LedgerFuture, Stored, Turn, TurnStart,
};
use crate::metrics as m;
use crate::store::BidRecord;

/// How long one turn may wait for an auction's lock before its bids are refused.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// A lock not released (its node died mid-turn) expires after this.
const LOCK_TTL: Duration = Duration::from_secs(5);
/// How long after its end an auction closes in a cluster: a bid that reached any node before
/// the end and gets the auction's lock within this is judged in time (and may extend a soft
/// close), rather than refused as `ended` because another node's timer closed first.
pub const CLOSE_GRACE_MS: u64 = 1_000;

impl From<ClusterError> for LedgerError {
    fn from(error: ClusterError) -> LedgerError {
        LedgerError::Unavailable(error.to_string())
    }
}

/// The ledger; cheap to clone.
#[derive(Clone)]
pub struct RedisLedger {
    cluster: Arc<Cluster>,
}

fn decode_bid(bytes: &[u8]) -> Result<BidRecord, ClusterError> {
    rmp_serde::from_slice(bytes).map_err(|e| ClusterError::Protocol(format!("bid record: {e}")))
}

/// A bid's field in the auction's idempotency hash.
fn request_key(user: &UserId, request_id: &str) -> String {
    format!("{user}\0{request_id}")
}

fn outgoing(announcement: Announcement) -> OutgoingEvent {
    OutgoingEvent::new(
        announcement.channel,
        announcement.event,
        None,
        announcement.data,
        announcement.state,
    )
}

impl RedisLedger {
    pub fn new(cluster: Arc<Cluster>) -> RedisLedger {
        RedisLedger { cluster }
    }

    fn prefix(&self) -> &str {
        &self.cluster.config.prefix
    }

    /// Takes the auction's lock for one turn, waiting while another node holds it.
    async fn lock(&self, auction: &str) -> Result<TurnStart, ClusterError> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(500);
        loop {
            let mut conn = self.cluster.conn();
            let (held, version, now_ms): (u8, u64, u64) = self
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
                return Ok(TurnStart { now_ms, version });
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

    async fn unlock(&self, auction: &str) -> Result<(), ClusterError> {
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

    async fn commit_turn(&self, turn: Turn<'_>) -> Result<u64, ClusterError> {
        let mut invocation = self.cluster.scripts.commit.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(turn.auction)
            .arg(self.cluster.node_id())
            .arg(turn.version)
            .arg(turn.record)
            .arg(Cluster::new_epoch())
            .arg(ROOM_KEY_TTL.as_millis() as u64)
            .arg(self.cluster.config.history_size.max(1))
            .arg(turn.bids.len());
        for bid in turn.bids {
            let bytes = rmp_serde::to_vec_named(bid)
                .map_err(|e| ClusterError::Protocol(format!("bid record: {e}")))?;
            // A leader's automatic bid answers no request: no index entry.
            let key = if bid.has_request() {
                request_key(&bid.user, &bid.request_id)
            } else {
                String::new()
            };
            invocation.arg(bytes).arg(key);
        }
        invocation.arg(turn.webhooks.len());
        for webhook in turn.webhooks {
            invocation.arg(&webhook.id).arg(&webhook.entry);
        }
        invocation.arg(turn.announcements.len());
        for event in turn.announcements.into_iter().map(outgoing) {
            let (known_epoch, known_seq) = self.cluster.known(&event.channel);
            invocation
                .arg(event.channel.as_str())
                .arg(&event.body)
                .arg(&event.state)
                .arg(known_epoch)
                .arg(known_seq);
        }
        let mut conn = self.cluster.conn();
        let started = Instant::now();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.cluster.command_failed("commit", e))?;
        metrics::histogram!(m::CLUSTER_COMMIT_SECONDS).record(started.elapsed());
        match reply.first() {
            Some(-1) => Err(ClusterError::Unavailable(
                "the auction's lock expired before the commit".into(),
            )),
            Some(-2) => Err(ClusterError::Unavailable(
                "another node changed the auction first".into(),
            )),
            Some(&v) if v > 0 => Ok(v as u64),
            _ => Err(ClusterError::Protocol("commit reply".into())),
        }
    }

    async fn read(&self, auction: &str) -> Result<Option<Stored>, ClusterError> {
        let mut conn = self.cluster.conn();
        // Reads no bids: the after-seq is past any list (and exact as a Lua number).
        let reply: Vec<redis::Value> = self
            .cluster
            .scripts
            .read_auction
            .arg(self.prefix())
            .arg(auction)
            .arg(1u64 << 40)
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
        Ok((!record.is_empty()).then_some(Stored { version, record }))
    }

    async fn create_auction(
        &self,
        auction: &str,
        record: &[u8],
        state: &Value,
    ) -> Result<Option<u64>, ClusterError> {
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
        Ok((created == 1).then_some(1))
    }

    async fn find(
        &self,
        auction: &str,
        keys: &[(UserId, String)],
    ) -> Result<Vec<Option<BidRecord>>, ClusterError> {
        let mut invocation = self.cluster.scripts.find_bids.prepare_invoke();
        invocation.arg(self.prefix()).arg(auction);
        for (user, request_id) in keys {
            invocation.arg(request_key(user, request_id));
        }
        let mut conn = self.cluster.conn();
        let found: Vec<Vec<u8>> = invocation
            .invoke_async(&mut conn)
            .await
            .inspect_err(|e| self.cluster.command_failed("find_bids", e))?;
        found
            .iter()
            .map(|bytes| {
                if bytes.is_empty() {
                    Ok(None)
                } else {
                    decode_bid(bytes).map(Some)
                }
            })
            .collect()
    }

    async fn live_ids(&self) -> Result<Vec<String>, ClusterError> {
        let mut conn = self.cluster.conn();
        let ids: Vec<String> = conn
            .smembers(self.cluster.key("auctions"))
            .await
            .inspect_err(|e| self.cluster.command_failed("list_auctions", e))?;
        Ok(ids)
    }

    async fn bid_page(
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

    async fn archive_auction(&self, auction: &str) -> Result<(), ClusterError> {
        let mut conn = self.cluster.conn();
        let _: u8 = conn
            .smove(
                self.cluster.key("auctions"),
                self.cluster.key("archived"),
                auction,
            )
            .await
            .inspect_err(|e| self.cluster.command_failed("archive", e))?;
        Ok(())
    }
}

fn boxed<'a, T: Send + 'a>(
    future: impl Future<Output = Result<T, ClusterError>> + Send + 'a,
) -> LedgerFuture<'a, T> {
    Box::pin(async move { future.await.map_err(LedgerError::from) })
}

impl Ledger for RedisLedger {
    fn ready(&self) -> bool {
        self.cluster.ready()
    }

    fn close_grace_ms(&self) -> u64 {
        CLOSE_GRACE_MS
    }

    fn begin<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, TurnStart> {
        boxed(self.lock(auction))
    }

    fn commit<'a>(
        &'a self,
        turn: Turn<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<u64, CommitError>> + Send + 'a>> {
        // A commit is one atomic script: when it fails nothing of it happened, or (a reply lost
        // on the way back) all of it did, and a retry with the same request id finds the bid.
        Box::pin(async move {
            self.commit_turn(turn)
                .await
                .map_err(|e| CommitError::NotRecorded(e.into()))
        })
    }

    fn end_turn<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, ()> {
        boxed(self.unlock(auction))
    }

    fn repair<'a>(
        &'a self,
        _: &'a str,
        _: u64,
        _: &'a [u8],
        _: &'a [String],
    ) -> LedgerFuture<'a, ()> {
        // Nothing to undo: a failed commit wrote nothing.
        boxed(async { Ok(()) })
    }

    fn announce(&self, announcements: Vec<Announcement>) {
        for announcement in announcements {
            self.cluster.publish_detached(outgoing(announcement));
        }
    }

    /// The state lives in Redis (set at creation and by every commit).
    fn show_state(&self, _auction: &str, _state: Value) {}

    fn create<'a>(
        &'a self,
        auction: &'a str,
        record: &'a [u8],
        state: &'a Value,
    ) -> LedgerFuture<'a, Option<u64>> {
        boxed(self.create_auction(auction, record, state))
    }

    fn live(&self) -> LedgerFuture<'_, Vec<String>> {
        boxed(self.live_ids())
    }

    fn is_live<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, bool> {
        boxed(async move {
            let mut conn = self.cluster.conn();
            let live: bool = conn
                .sismember(self.cluster.key("auctions"), auction)
                .await
                .inspect_err(|e| self.cluster.command_failed("list_auctions", e))?;
            Ok(live)
        })
    }

    fn load<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, Option<Stored>> {
        boxed(self.read(auction))
    }

    fn find_bids<'a>(
        &'a self,
        auction: &'a str,
        keys: &'a [(UserId, String)],
    ) -> LedgerFuture<'a, Vec<Option<BidRecord>>> {
        boxed(self.find(auction, keys))
    }

    fn bids<'a>(
        &'a self,
        auction: &'a str,
        after: u64,
        limit: usize,
    ) -> LedgerFuture<'a, Vec<BidRecord>> {
        boxed(self.bid_page(auction, after, limit))
    }

    fn archive<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, ()> {
        boxed(self.archive_auction(auction))
    }

    fn sync(&self) -> LedgerFuture<'_, ()> {
        // Every acknowledged write is already in Redis.
        boxed(async { Ok(()) })
    }
}
