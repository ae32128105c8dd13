//! Where an auction's turns become durable and how their events get out: the [`Ledger`] trait,
//! and [`LocalLedger`], this node's bid log with group commit. The cluster's Redis ledger
//! implements the same trait in `cluster::ledger`. The actor calls one of them, chosen once at
//! start-up; it never asks which.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gavel_protocol::{Channel, Data, UserId};
use serde_json::Value;

use crate::clock::Clock;
use crate::store::{
    BidLog, BidRecord, CommitFailure, Durability, GroupCommit, Outboxed, StorageError, Write,
};

/// A ledger call in flight. Boxed: the ledger is a trait object, and there is one call per
/// turn (not per bid), so the allocation does not matter.
pub type LedgerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

/// Why a ledger call failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LedgerError {
    /// The local bid log failed: bids are refused as `unavailable`, and the auction parks until
    /// the store works again.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Cluster mode: Redis (which orders every auction) is unreachable, another node held the
    /// lock too long, or another node committed first. Bids are refused as
    /// `cluster_unavailable`; the next turn catches up.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}

/// An event an auction announces, published once the turn that made it is durable.
#[derive(Clone, Debug)]
pub struct Announcement {
    /// `auction:{id}`, or `user:{id}` for a notice to one user.
    pub channel: Channel,
    pub event: &'static str,
    pub data: Data,
    /// The auction's snapshot right after the event (`None`: unchanged).
    pub state: Option<Value>,
}

/// Where announcements are published on this node: the room registry (a recorder in tests).
pub trait AuctionEvents: Send + Sync + 'static {
    /// Publishes a turn's events (and each room's new state, if any) in their rooms, in
    /// order. Consecutive events of one room may reach its subscribers as one item.
    fn publish(&self, announcements: Vec<Announcement>);
    /// Sets an auction room's state without an event (creation, start-up), and keeps the room
    /// while the auction lives.
    fn show_state(&self, channel: &Channel, state: Value);
    /// The auction was archived: its room may go like any other.
    fn release(&self, channel: &Channel);
}

/// What a turn starts from.
#[derive(Clone, Copy, Debug)]
pub struct TurnStart {
    /// The ledger's time (ms since the Unix epoch): this node's clock, or Redis's `TIME` in
    /// cluster mode, so every node judges an auction's deadlines on one clock.
    pub now_ms: u64,
    /// The auction's version in the ledger: a version other than the actor's means another
    /// node changed it, and the actor catches up first.
    pub version: u64,
}

/// A judged turn, to be made durable.
pub struct Turn<'a> {
    pub auction: &'a str,
    /// The version the turn was judged on (compare-and-set in cluster mode).
    pub version: u64,
    /// The auction's record after the turn.
    pub record: &'a [u8],
    /// The record before the turn, and its last bid seq: what a failed commit reverts to.
    pub previous: &'a [u8],
    pub previous_seq: u64,
    /// The accepted bids, in seq order.
    pub bids: &'a [BidRecord],
    /// Webhooks the turn reports (auction ended, bids accepted), for the outbox: written with
    /// the turn, atomically.
    pub webhooks: &'a [Outboxed],
    /// The turn's events, published only once the turn is durable.
    pub announcements: Vec<Announcement>,
}

/// How a commit failed.
#[derive(Debug)]
pub enum CommitError {
    /// Nothing of the turn is recorded (or its undo is durable): answer its bids as not placed.
    NotRecorded(LedgerError),
    /// The turn's writes may still become durable (the flush failed and so did their undo):
    /// hold the answers and [`Ledger::repair`] until it succeeds.
    Unsettled(LedgerError),
}

/// An auction as the ledger holds it.
pub struct Stored {
    pub version: u64,
    pub record: Vec<u8>,
}

/// Where bids become durable, and who orders them. One per broker, chosen at start-up.
pub trait Ledger: Send + Sync + 'static {
    /// Whether turns can run now (cluster mode: Redis reachable and the node ready).
    fn ready(&self) -> bool {
        true
    }
    /// Whether [`Ledger::bids`] may return writes not yet durable (a local store between a
    /// write and its flush); then readers stop at the last seq known durable.
    fn reads_unflushed(&self) -> bool {
        false
    }
    /// How long after an auction's end its close waits (ledger ms): 0 where one task sees every
    /// bid as it arrives (one node). In a cluster, a bid that reached one node before the end
    /// may still wait for the auction's lock when another node's timer fires; the close waits
    /// this long so that it is judged in time (see [`Auction::advance_with_grace`]).
    ///
    /// [`Auction::advance_with_grace`]: super::rules::Auction::advance_with_grace
    fn close_grace_ms(&self) -> u64 {
        0
    }
    /// Starts a turn (cluster mode: takes the auction's lock).
    fn begin<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, TurnStart>;
    /// Makes a turn durable and publishes its announcements (releasing the lock).
    fn commit<'a>(
        &'a self,
        turn: Turn<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<u64, CommitError>> + Send + 'a>>;
    /// Ends a turn that wrote nothing (releases the lock).
    fn end_turn<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, ()>;
    /// Makes durable that the auction ends at `last_seq` with `record`, without the outbox
    /// entries `webhooks` (those of the failed turn being undone): the undo of a failed
    /// commit, and the probe of a failed store (a real write and flush).
    fn repair<'a>(
        &'a self,
        auction: &'a str,
        last_seq: u64,
        record: &'a [u8],
        webhooks: &'a [String],
    ) -> LedgerFuture<'a, ()>;
    /// Publishes events that need no turn (leaderboards).
    fn announce(&self, announcements: Vec<Announcement>);
    /// Shows an auction's state in its room without an event (creation, start-up).
    fn show_state(&self, auction: &str, state: Value);
    /// Creates an auction, durably; its version, or `None` if the id is taken (archived ids
    /// included).
    fn create<'a>(
        &'a self,
        auction: &'a str,
        record: &'a [u8],
        state: &'a Value,
    ) -> LedgerFuture<'a, Option<u64>>;
    /// Ids of the live (not archived) auctions.
    fn live(&self) -> LedgerFuture<'_, Vec<String>>;
    /// Whether one auction is live (not archived): by default from [`Ledger::live`]; a ledger
    /// with many auctions answers it without listing them all.
    fn is_live<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, bool> {
        Box::pin(async move { Ok(self.live().await?.iter().any(|id| id == auction)) })
    }
    /// An auction's record, live or archived.
    fn load<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, Option<Stored>>;
    /// The bids placed under these (user, request id) keys, where there are any.
    fn find_bids<'a>(
        &'a self,
        auction: &'a str,
        keys: &'a [(UserId, String)],
    ) -> LedgerFuture<'a, Vec<Option<BidRecord>>>;
    /// Bids with seq > `after`, at most `limit`.
    fn bids<'a>(
        &'a self,
        auction: &'a str,
        after: u64,
        limit: usize,
    ) -> LedgerFuture<'a, Vec<BidRecord>>;
    /// Moves an ended auction out of the live set (its record and bids stay readable).
    fn archive<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, ()>;
    /// Makes every write durable (shutdown).
    fn sync(&self) -> LedgerFuture<'_, ()>;
}

/// This node's bid log: writes go to the [`BidLog`] at commit, one group-commit flush makes them
/// durable, and only then are the turn's events published in the local rooms.
pub struct LocalLedger {
    store: Arc<dyn BidLog>,
    durability: Durability,
    events: Arc<dyn AuctionEvents>,
    clock: Clock,
    /// 0: one node sees every bid as it arrives (see [`Ledger::close_grace_ms`]).
    close_grace_ms: u64,
}

impl LocalLedger {
    pub fn new(
        store: Arc<dyn BidLog>,
        events: Arc<dyn AuctionEvents>,
        clock: Clock,
        group_commit: GroupCommit,
    ) -> LocalLedger {
        let durability = Durability::start(Arc::clone(&store), group_commit);
        LocalLedger {
            store,
            durability,
            events,
            clock,
            close_grace_ms: 0,
        }
    }

    /// With a cluster's close grace, for testing the engine's behaviour in it on one node.
    #[cfg(test)]
    pub(crate) fn with_close_grace(mut self, ms: u64) -> LocalLedger {
        self.close_grace_ms = ms;
        self
    }

    /// The bid log itself (start-up reads it synchronously).
    pub fn store(&self) -> &Arc<dyn BidLog> {
        &self.store
    }

    /// The turn's bids, record and webhooks, as one turn (see [`BidLog::append`]), for the
    /// flusher to write.
    /// Copied: the flusher runs it on its own thread (a hidden cost of a few hundred bytes per
    /// turn).
    fn write(turn: &Turn<'_>) -> Write {
        let auction = turn.auction.to_owned();
        let record = turn.record.to_vec();
        let (bids, webhooks) = (turn.bids.to_vec(), turn.webhooks.to_vec());
        Box::new(move |store: &dyn BidLog| {
            if bids.is_empty() && webhooks.is_empty() {
                store.put_auction(&auction, &record)
            } else {
                store.append(&auction, &bids, &record, &webhooks)
            }
        })
    }

    /// Undoes a turn whose flush failed (its bids after `last_seq`, its webhooks), durably.
    async fn undo(
        &self,
        auction: &str,
        last_seq: u64,
        record: &[u8],
        webhooks: &[String],
    ) -> Result<(), LedgerError> {
        let (auction, record, webhooks) = (auction.to_owned(), record.to_vec(), webhooks.to_vec());
        self.durably(Box::new(move |store| {
            store.revert(&auction, last_seq, &record, &webhooks)
        }))
        .await
    }

    /// `write`, made durable by the flusher; either failure is an error.
    async fn durably(&self, write: Write) -> Result<(), LedgerError> {
        self.durability
            .commit(write)
            .await
            .map_err(|failure| LedgerError::from(StorageError::from(failure)))
    }
}

fn ready<'a, T: Send + 'a>(value: Result<T, LedgerError>) -> LedgerFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl Ledger for LocalLedger {
    fn reads_unflushed(&self) -> bool {
        true
    }

    fn close_grace_ms(&self) -> u64 {
        self.close_grace_ms
    }

    fn begin<'a>(&'a self, _auction: &'a str) -> LedgerFuture<'a, TurnStart> {
        ready(Ok(TurnStart {
            now_ms: self.clock.now_ms(),
            version: 0,
        }))
    }

    fn commit<'a>(
        &'a self,
        turn: Turn<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<u64, CommitError>> + Send + 'a>> {
        Box::pin(async move {
            match self.durability.commit(Self::write(&turn)).await {
                Ok(()) => {}
                // A write that failed and took itself back: nothing of it is in the store.
                Err(CommitFailure::Write(error)) if !matches!(error, StorageError::Torn(_)) => {
                    return Err(CommitError::NotRecorded(error.into()))
                }
                // The writes (or some of a torn one) are in the store's memory: a later flush
                // (of any auction) would make them durable. Undo them first, durably, so the
                // disk never holds a bid that was answered as not placed.
                Err(CommitFailure::Write(error) | CommitFailure::Flush(error)) => {
                    let webhooks: Vec<String> =
                        turn.webhooks.iter().map(|w| w.id.clone()).collect();
                    let undone = self
                        .undo(turn.auction, turn.previous_seq, turn.previous, &webhooks)
                        .await;
                    return Err(match undone {
                        Ok(()) => CommitError::NotRecorded(error.into()),
                        Err(_) => CommitError::Unsettled(error.into()),
                    });
                }
            }
            self.events.publish(turn.announcements);
            Ok(0)
        })
    }

    fn end_turn<'a>(&'a self, _auction: &'a str) -> LedgerFuture<'a, ()> {
        ready(Ok(()))
    }

    fn repair<'a>(
        &'a self,
        auction: &'a str,
        last_seq: u64,
        record: &'a [u8],
        webhooks: &'a [String],
    ) -> LedgerFuture<'a, ()> {
        Box::pin(self.undo(auction, last_seq, record, webhooks))
    }

    fn announce(&self, announcements: Vec<Announcement>) {
        self.events.publish(announcements);
    }

    fn show_state(&self, auction: &str, state: Value) {
        if let Ok(channel) = Channel::auction(auction) {
            self.events.show_state(&channel, state);
        }
    }

    fn create<'a>(
        &'a self,
        auction: &'a str,
        record: &'a [u8],
        _state: &'a Value,
    ) -> LedgerFuture<'a, Option<u64>> {
        Box::pin(async move {
            if self.store.auction(auction)?.is_some() {
                return Ok(None);
            }
            // On the flusher's thread, like every other write (see `Durability`).
            let (id, record) = (auction.to_owned(), record.to_vec());
            self.durably(Box::new(move |store| store.put_auction(&id, &record)))
                .await?;
            Ok(Some(0))
        })
    }

    fn live(&self) -> LedgerFuture<'_, Vec<String>> {
        ready(
            self.store
                .auctions()
                .map(|all| all.into_iter().map(|(id, _)| id).collect())
                .map_err(LedgerError::from),
        )
    }

    fn load<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, Option<Stored>> {
        ready(
            self.store
                .auction(auction)
                .map(|r| r.map(|record| Stored { version: 0, record }))
                .map_err(LedgerError::from),
        )
    }

    fn find_bids<'a>(
        &'a self,
        auction: &'a str,
        keys: &'a [(UserId, String)],
    ) -> LedgerFuture<'a, Vec<Option<BidRecord>>> {
        ready(
            keys.iter()
                .map(|(user, request_id)| self.store.find_bid(auction, user, request_id))
                .collect::<Result<_, _>>()
                .map_err(LedgerError::from),
        )
    }

    fn bids<'a>(
        &'a self,
        auction: &'a str,
        after: u64,
        limit: usize,
    ) -> LedgerFuture<'a, Vec<BidRecord>> {
        ready(
            self.store
                .bids(auction, after, limit)
                .map_err(LedgerError::from),
        )
    }

    fn archive<'a>(&'a self, auction: &'a str) -> LedgerFuture<'a, ()> {
        Box::pin(async move {
            let id = auction.to_owned();
            self.durably(Box::new(move |store| store.archive(&id)))
                .await?;
            if let Ok(channel) = Channel::auction(auction) {
                self.events.release(&channel);
            }
            Ok(())
        })
    }

    fn sync(&self) -> LedgerFuture<'_, ()> {
        Box::pin(async move { Ok(self.durability.sync().await?) })
    }
}
