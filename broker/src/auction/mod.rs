//! Auctions: the registry of live auctions ([`Auctions`]), one actor task per auction that owns
//! its state (`actor`), what they announce (`announce`), the bounded memory of answers for
//! retries (`idempotency`), the answers to bids (`replies`), and where turns become durable ([`ledger::Ledger`]: this node's bid
//! log, or the cluster's Redis). Knows nothing of WebSockets, rooms or Redis.

mod actor;
pub mod announce;
mod bid_request;
pub mod idempotency;
pub mod ledger;
mod replies;
pub mod rules;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use gavel_protocol::{AuctionSnapshot, AuctionStatus, BidRejection, Reply};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::metrics as m;
use crate::ratelimit::RateLimiter;
use crate::store::{BidLog, BidRecord, GroupCommit, StorageError};
use actor::{Actor, Bid, Command};
use ledger::{Ledger, LedgerError, LocalLedger};
use replies::{accepted_reply, raised_max, raised_reply, rejected};
use rules::{Auction, AuctionSpec, SpecError};

pub use actor::LEADERBOARD_INTERVAL;
pub use bid_request::{BidKey, BidRequest, InvalidBidKey};
pub use ledger::{Announcement, AuctionEvents};

/// Commands queued per auction before bids are turned away as `unavailable`.
const COMMAND_QUEUE: usize = 8192;
/// Most commands one actor turn takes (they share one commit) with group commit on; with it
/// off, a turn takes one command, so every bid gets a flush of its own.
const MAX_TURN: usize = 512;
/// How long shutdown waits for the actors to answer what is queued.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Called once with the outcome of a bid (`bid_accepted` or `bid_rejected`).
pub type BidReply = Box<dyn FnOnce(Reply) + Send>;
type AdminReply = oneshot::Sender<Result<AuctionSnapshot, AdminError>>;

/// An admin operation on an existing auction.
#[derive(Clone, Debug)]
pub enum AdminOp {
    Update(AuctionSpec),
    Pause,
    Resume,
    Cancel,
    EndNow,
}

/// Why an admin request failed; `http` maps each to a status.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no auction {0:?}")]
    NotFound(String),
    #[error("auction {0:?} already exists")]
    Exists(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Cluster mode: Redis, which orders every auction change, is unreachable.
    #[error("cluster unavailable: {0}")]
    Cluster(String),
}

impl From<LedgerError> for AdminError {
    fn from(error: LedgerError) -> AdminError {
        match error {
            LedgerError::Storage(error) => AdminError::Storage(error),
            LedgerError::Unavailable(error) => AdminError::Cluster(error),
        }
    }
}

/// Settings of the auction engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub bid_rate: f64,
    pub bid_burst: u32,
    pub group_commit: GroupCommit,
    /// How long an ended auction stays live (task, room, state) before it is archived.
    pub archive_after: Duration,
    /// Results to the backend (`--webhook-url`): which webhooks turns write to the outbox, and
    /// how the deliverer hears of them. `None`: no webhooks.
    pub webhooks: Option<crate::webhooks::Reporting>,
}

/// What every actor shares.
pub(crate) struct Engine {
    ledger: Arc<dyn Ledger>,
    limiter: RateLimiter,
    clock: Clock,
    map: DashMap<String, Handle>,
    max_turn: usize,
    archive_after: Duration,
    webhooks: Option<crate::webhooks::Reporting>,
}

struct Handle {
    commands_tx: mpsc::Sender<Command>,
    /// The latest snapshot, for reads that need no actor round trip.
    view: Arc<ArcSwap<AuctionSnapshot>>,
    /// The last bid seq known durable: reads of the bid log stop there.
    durable_seq: Arc<AtomicU64>,
}

/// Every live auction of this node.
pub struct Auctions {
    engine: Arc<Engine>,
    /// Cancelled at shutdown: actors answer what is queued, then stop.
    stop: CancellationToken,
    tasks: TaskTracker,
    creating: tokio::sync::Mutex<()>,
}

pub(crate) fn encode(auction: &Auction) -> Result<Vec<u8>, StorageError> {
    rmp_serde::to_vec_named(auction).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub(crate) fn decode(id: &str, bytes: &[u8]) -> Result<Auction, StorageError> {
    rmp_serde::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("auction {id}: {e}")))
}

impl Auctions {
    /// A registry over `ledger`, with no auction yet: [`Auctions::load`] (or `adopt`) fills it.
    pub fn new(
        ledger: Arc<dyn Ledger>,
        clock: Clock,
        config: EngineConfig,
        stop: CancellationToken,
    ) -> Auctions {
        Auctions {
            engine: Arc::new(Engine {
                ledger,
                limiter: RateLimiter::new(config.bid_rate, config.bid_burst),
                clock,
                map: DashMap::new(),
                max_turn: match config.group_commit {
                    GroupCommit::On => MAX_TURN,
                    GroupCommit::Off => 1,
                },
                archive_after: config.archive_after,
                webhooks: config.webhooks.clone(),
            }),
            stop,
            tasks: TaskTracker::new(),
            creating: tokio::sync::Mutex::new(()),
        }
    }

    /// One node: a registry over the local bid log `store`, with every live auction loaded and
    /// its actor started (archived auctions stay on disk). Auctions whose end passed while the
    /// broker was down end in their actor's first turn, with their `ended` event.
    pub fn open(
        store: Arc<dyn BidLog>,
        events: Arc<dyn AuctionEvents>,
        clock: Clock,
        config: EngineConfig,
        stop: CancellationToken,
    ) -> Result<Auctions, StorageError> {
        let ledger = LocalLedger::new(Arc::clone(&store), events, clock, config.group_commit);
        let auctions = Auctions::new(Arc::new(ledger), clock, config, stop);
        for (id, bytes) in store.auctions()? {
            let auction = decode(&id, &bytes)?;
            let last = store.last_seq(&id)?;
            if last > auction.state.last_seq {
                // A turn cut by a crash before its record was written (see `BidLog::append`):
                // its bids were never acknowledged.
                tracing::warn!(auction = %id, from = auction.state.last_seq + 1, to = last,
                    "removing bids of a turn a crash cut short (never acknowledged)");
                store.revert(&id, auction.state.last_seq, &bytes, &[])?;
                store.sync()?;
            } else if last < auction.state.last_seq {
                return Err(StorageError::Corrupt(format!(
                    "auction {id}: record says bid {} but the log ends at {last}",
                    auction.state.last_seq
                )));
            }
            let bids = store.bids(&id, 0, usize::MAX)?;
            auctions.spawn(auction, &bids, 0);
        }
        tracing::info!(auctions = auctions.engine.map.len(), "live auctions loaded");
        Ok(auctions)
    }

    /// Starts an actor for every live auction in the ledger this node does not run yet
    /// (cluster mode, after each (re)connection). Returns how many it loaded.
    pub async fn load(&self) -> Result<usize, AdminError> {
        let ids = self.engine.ledger.live().await?;
        let mut loaded = 0;
        for id in &ids {
            match self.adopt_live(id).await {
                Ok(()) => loaded += 1,
                Err(AdminError::Cluster(error)) => return Err(AdminError::Cluster(error)),
                // One unreadable auction must not keep the others (and the node) down.
                Err(error) => {
                    tracing::error!(auction = %id, %error, "auction cannot be loaded; skipped")
                }
            }
        }
        Ok(loaded)
    }

    /// Starts an actor for an auction the ledger has and this node does not run (cluster
    /// mode: one another node created). Archived auctions are left alone.
    pub async fn adopt(&self, id: &str) -> Result<(), AdminError> {
        if !self.engine.ledger.is_live(id).await? {
            return Ok(());
        }
        self.adopt_live(id).await
    }

    /// [`Auctions::adopt`] for an id known to be live.
    async fn adopt_live(&self, id: &str) -> Result<(), AdminError> {
        let _one_at_a_time = self.creating.lock().await;
        if self.engine.map.contains_key(id) {
            return Ok(());
        }
        let ledger = &self.engine.ledger;
        let stored = ledger
            .load(id)
            .await?
            .ok_or_else(|| AdminError::NotFound(id.to_owned()))?;
        let auction = decode(id, &stored.record)?;
        let bids = ledger.bids(id, 0, usize::MAX).await?;
        self.spawn(auction, &bids, stored.version);
        Ok(())
    }

    /// Cluster mode: makes every actor catch up with the ledger (after a reconnection).
    pub fn refresh_all(&self) {
        for handle in self.engine.map.iter() {
            let _ = handle.commands_tx.try_send(Command::Refresh(u64::MAX));
        }
    }

    /// Cluster mode: tells an auction's actor that another node changed it.
    pub fn changed(&self, id: &str, version: u64) {
        if let Some(handle) = self.engine.map.get(id) {
            let _ = handle.commands_tx.try_send(Command::Refresh(version));
        }
    }

    /// Whether this node runs the auction.
    pub fn is_live(&self, id: &str) -> bool {
        self.engine.map.contains_key(id)
    }

    fn spawn(&self, auction: Auction, bids: &[BidRecord], version: u64) {
        let now = self.engine.clock.now_ms();
        let snapshot = auction.snapshot(now);
        self.engine
            .ledger
            .show_state(&auction.spec.id, announce::to_value(&snapshot));
        let view = Arc::new(ArcSwap::from_pointee(snapshot));
        let durable_seq = Arc::new(AtomicU64::new(auction.state.last_seq));
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let mut highest = HashMap::new();
        for bid in bids {
            highest.insert(bid.user.clone(), bid.amount);
        }
        let id = auction.spec.id.clone();
        let actor = Actor::new(
            Arc::clone(&self.engine),
            auction,
            version,
            commands_rx,
            Arc::clone(&view),
            Arc::clone(&durable_seq),
            highest,
        );
        self.engine.map.insert(
            id,
            Handle {
                commands_tx,
                view,
                durable_seq,
            },
        );
        self.tasks.spawn(actor.run(self.stop.clone()));
    }

    /// Creates an auction; durable before it returns.
    pub async fn create(&self, spec: AuctionSpec) -> Result<AuctionSnapshot, AdminError> {
        spec.validate()?;
        // Creations are rare: one at a time, so two with the same id cannot both pass the check.
        let _one_at_a_time = self.creating.lock().await;
        if self.engine.map.contains_key(&spec.id) {
            return Err(AdminError::Exists(spec.id));
        }
        let now = self.engine.clock.now_ms();
        if spec.ends_at <= now {
            return Err(SpecError::Invalid("ends_at is in the past".into()).into());
        }
        let mut auction = Auction::new(spec);
        // One whose start has passed is born active: nobody can have subscribed to it yet.
        auction.advance(now);
        let snapshot = auction.snapshot(now);
        let record = encode(&auction)?;
        let state = announce::to_value(&snapshot);
        let Some(version) = self
            .engine
            .ledger
            .create(&auction.spec.id, &record, &state)
            .await?
        else {
            return self.create_again(auction).await;
        };
        self.spawn(auction, &[], version);
        Ok(snapshot)
    }

    /// The id is taken in the ledger but no actor runs it here. The same definition, not over:
    /// a create whose flush failed (its record may have reached the disk after all), or one
    /// another node made a moment ago; run it and answer as a create would. Else `Exists`.
    async fn create_again(&self, auction: Auction) -> Result<AuctionSnapshot, AdminError> {
        let id = auction.spec.id.clone();
        let exists = || AdminError::Exists(id.clone());
        let stored = self.engine.ledger.load(&id).await?.ok_or_else(exists)?;
        let existing = decode(&id, &stored.record)?;
        let over = matches!(
            existing.state.status,
            AuctionStatus::Ended | AuctionStatus::Cancelled
        );
        if existing.spec != auction.spec || over || existing.state.bid_count > 0 {
            return Err(exists());
        }
        let snapshot = existing.snapshot(self.engine.clock.now_ms());
        self.spawn(existing, &[], stored.version);
        Ok(snapshot)
    }

    /// Runs an admin operation in the auction's actor (in order with its bids).
    pub async fn admin(&self, id: &str, op: AdminOp) -> Result<AuctionSnapshot, AdminError> {
        let Some(commands_tx) = self.engine.map.get(id).map(|h| h.commands_tx.clone()) else {
            return match self.archived(id).await? {
                Some(snapshot) => Err(SpecError::WrongStatus(
                    snapshot.status.as_str(),
                    "it is over and archived",
                )
                .into()),
                None => Err(AdminError::NotFound(id.to_owned())),
            };
        };
        let (reply, answer) = oneshot::channel();
        let command = Command::Admin {
            op,
            at_ms: self.engine.clock.now_ms(),
            reply,
        };
        commands_tx
            .send(command)
            .await
            .map_err(|_| AdminError::Storage(StorageError::Stopped))?;
        answer
            .await
            .unwrap_or(Err(AdminError::Storage(StorageError::Stopped)))
    }

    /// Hands a bid to its auction's actor, stamped with its arrival time; `reply` is called
    /// with the outcome once it is durable (accepted) or decided (rejected). Never waits.
    pub fn place_bid(&self, bid: BidRequest, reply: BidReply) {
        let BidRequest {
            user,
            may_bid,
            roles,
            auction_id,
            amount,
            request_id,
            max_amount,
        } = bid;
        let refuse = |reply: BidReply, reason: BidRejection, message: &str| {
            metrics::counter!(m::BIDS, "outcome" => reason.as_str()).increment(1);
            reply(rejected(
                &auction_id,
                request_id.as_str(),
                reason,
                None,
                message.to_owned(),
            ))
        };
        let Some(user) = user else {
            return refuse(
                reply,
                BidRejection::Unauthenticated,
                "anonymous connections cannot bid",
            );
        };
        if !may_bid {
            return refuse(
                reply,
                BidRejection::Forbidden,
                "bidding needs the bidder role",
            );
        }
        if !self.engine.ledger.ready() {
            return refuse(
                reply,
                BidRejection::ClusterUnavailable,
                "the cluster's Redis is unreachable; retry",
            );
        }
        let at_ms = self.engine.clock.now_ms();
        let bid = Bid {
            user,
            roles,
            amount,
            max_amount,
            request_id: request_id.as_str().to_owned(),
            at_ms,
        };
        let commands_tx = self
            .engine
            .map
            .get(&auction_id)
            .map(|h| h.commands_tx.clone());
        let (bid, reply) = match commands_tx {
            None => (bid, reply),
            Some(commands_tx) => match commands_tx.try_send(Command::Bid(bid, reply)) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(Command::Bid(_, reply))) => {
                    return refuse(
                        reply,
                        BidRejection::Unavailable,
                        "the auction is overloaded; retry",
                    );
                }
                // Archived meanwhile: answered from the ledger like any archived auction.
                Err(mpsc::error::TrySendError::Closed(Command::Bid(bid, reply))) => (bid, reply),
                Err(_) => return,
            },
        };
        // Not live here: an archived auction (answered from the ledger), or none at all. Each
        // such bid reads the ledger, so it is charged to the bidder's rate first.
        if !self.engine.limiter.allow(&bid.user, at_ms) {
            return refuse(reply, BidRejection::RateLimited, "too many bids; slow down");
        }
        let engine = Arc::clone(&self.engine);
        tokio::spawn(async move {
            let answer = match answer_archived(&engine, &auction_id, bid).await {
                Ok(answer) => answer,
                Err(bid) => match wait_for_actor(&engine, &auction_id).await {
                    // Adopted meanwhile: judged like any bid (and counted by the actor).
                    Some(commands_tx) => match commands_tx.try_send(Command::Bid(bid, reply)) {
                        Ok(()) => return,
                        Err(
                            mpsc::error::TrySendError::Full(Command::Bid(bid, reply))
                            | mpsc::error::TrySendError::Closed(Command::Bid(bid, reply)),
                        ) => {
                            let answer = not_here(&auction_id, &bid);
                            metrics::counter!(m::BIDS, "outcome" => "unavailable").increment(1);
                            return reply(answer);
                        }
                        Err(_) => return,
                    },
                    None => not_here(&auction_id, &bid),
                },
            };
            let outcome = match &answer {
                Reply::BidRejected { reason, .. } => reason.as_str(),
                _ => "accepted",
            };
            metrics::counter!(m::BIDS, "outcome" => outcome).increment(1);
            reply(answer);
        });
    }

    /// A live auction's snapshot.
    pub fn get(&self, id: &str) -> Option<AuctionSnapshot> {
        self.engine
            .map
            .get(id)
            .map(|h| AuctionSnapshot::clone(&h.view.load()))
    }

    /// An auction's snapshot, live or archived.
    pub async fn find(&self, id: &str) -> Result<Option<AuctionSnapshot>, AdminError> {
        match self.get(id) {
            Some(snapshot) => Ok(Some(snapshot)),
            None => self.archived(id).await,
        }
    }

    /// An archived auction's final snapshot, read from the ledger.
    async fn archived(&self, id: &str) -> Result<Option<AuctionSnapshot>, AdminError> {
        let Some(stored) = self.engine.ledger.load(id).await? else {
            return Ok(None);
        };
        let auction = decode(id, &stored.record)?;
        Ok(Some(auction.snapshot(self.engine.clock.now_ms())))
    }

    /// Every live auction, by id.
    pub fn list(&self) -> Vec<AuctionSnapshot> {
        let mut all: Vec<AuctionSnapshot> = self
            .engine
            .map
            .iter()
            .map(|h| AuctionSnapshot::clone(&h.view.load()))
            .collect();
        all.sort_by(|a, b| a.auction_id.cmp(&b.auction_id));
        all
    }

    /// How many auctions this node runs (live, with an actor).
    pub fn live_count(&self) -> usize {
        self.engine.map.len()
    }

    /// With webhooks on: the auction's webhooks not delivered yet, as `GET /api/auctions/{id}`
    /// shows them.
    pub async fn pending_webhooks(&self, id: &str) -> Option<Vec<serde_json::Value>> {
        let outbox = &self.engine.webhooks.as_ref()?.outbox;
        let pending = outbox.pending().await.unwrap_or_default();
        Some(
            pending
                .iter()
                .filter_map(|w| crate::webhooks::OutboxEntry::decode(&w.entry))
                .filter(|entry| entry.auction_id == id)
                .map(|entry| entry.status_view())
                .collect(),
        )
    }

    /// Bid history from the ledger: only durable bids (a bid being flushed is not shown).
    pub async fn bids(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BidRecord>, AdminError> {
        let ledger = &self.engine.ledger;
        let durable = self
            .engine
            .map
            .get(id)
            .map(|handle| handle.durable_seq.load(Ordering::Acquire));
        let limit = match durable {
            Some(durable) if ledger.reads_unflushed() => {
                limit.min(durable.saturating_sub(after) as usize)
            }
            Some(_) => limit,
            None if ledger.load(id).await?.is_some() => limit,
            None => return Err(AdminError::NotFound(id.to_owned())),
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        Ok(ledger.bids(id, after, limit).await?)
    }

    /// Sets the `gavel_auctions{status}` gauge.
    pub fn record_counts(&self) {
        let mut counts = [0u32; AuctionStatus::ALL.len()];
        for handle in self.engine.map.iter() {
            let status = handle.view.load().status;
            if let Some(i) = AuctionStatus::ALL.iter().position(|s| *s == status) {
                counts[i] += 1;
            }
        }
        for (status, count) in AuctionStatus::ALL.iter().zip(counts) {
            metrics::gauge!(m::AUCTIONS, "status" => status.as_str()).set(count as f64);
        }
    }

    /// Forgets idle rate-limit buckets.
    pub fn prune(&self) {
        self.engine.limiter.prune(self.engine.clock.now_ms());
    }

    /// Makes every write durable.
    pub async fn sync(&self) -> Result<(), AdminError> {
        Ok(self.engine.ledger.sync().await?)
    }

    /// Shutdown: every actor answers the bids already queued (so no acknowledged bid's reply is
    /// lost while connections are still open), then stops; then a final flush.
    pub async fn shut_down(&self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("auction actors still busy at the shutdown deadline");
        }
        if let Err(error) = self.sync().await {
            tracing::error!(%error, "final bid log flush failed");
        }
    }
}

/// A bid for an auction this node does not run: a retry of a logged bid gets its first answer,
/// anything else on an archived auction is `ended`, and an id the ledger does not know is
/// `unknown_auction`.
/// How long a bid waits for this node to take up an auction that is live in the ledger but not
/// run here yet (cluster mode: another node created it a moment ago).
const ADOPTION_WAIT: Duration = Duration::from_secs(1);

/// The actor of `auction_id` once this node runs it, waiting up to [`ADOPTION_WAIT`].
async fn wait_for_actor(engine: &Engine, auction_id: &str) -> Option<mpsc::Sender<Command>> {
    let deadline = tokio::time::Instant::now() + ADOPTION_WAIT;
    loop {
        if let Some(handle) = engine.map.get(auction_id) {
            return Some(handle.commands_tx.clone());
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bid on a live auction this node does not run (yet): retry, with the same request id.
fn not_here(auction_id: &str, bid: &Bid) -> Reply {
    rejected(
        auction_id,
        &bid.request_id,
        BidRejection::Unavailable,
        None,
        "the auction is not taking bids on this node right now; retry".into(),
    )
}

/// The answer to a bid on an auction this node does not run: from the ledger when it is
/// archived or unknown; `Err` (the bid back) when it is live there but not run here.
async fn answer_archived(engine: &Engine, auction_id: &str, bid: Bid) -> Result<Reply, Bid> {
    let request_id = bid.request_id.clone();
    let refused = |error: LedgerError| {
        let (reason, message) = match error {
            LedgerError::Storage(e) => (BidRejection::Unavailable, e.to_string()),
            LedgerError::Unavailable(e) => (BidRejection::ClusterUnavailable, e),
        };
        Ok(rejected(auction_id, &request_id, reason, None, message))
    };
    let stored = match engine.ledger.load(auction_id).await {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            return Ok(rejected(
                auction_id,
                &request_id,
                BidRejection::UnknownAuction,
                None,
                "no such auction".into(),
            ))
        }
        Err(error) => return refused(error),
    };
    let auction = match decode(auction_id, &stored.record) {
        Ok(auction) => auction,
        Err(error) => return refused(error.into()),
    };
    let over = matches!(
        auction.state.status,
        AuctionStatus::Ended | AuctionStatus::Cancelled
    );
    let keys = [(bid.user.clone(), bid.request_id.clone())];
    match engine.ledger.find_bids(auction_id, &keys).await {
        Ok(found) => match found.into_iter().next().flatten() {
            Some(logged) => Ok(accepted_reply(auction_id, &logged, &auction)),
            // Not a bid: perhaps the bidder's raise of their maximum (kept in the record).
            None => match auction.state.raise_of(&bid.user, &bid.request_id) {
                Some(raised) => Ok(raised_reply(auction_id, raised)),
                // Not over, yet not run here: being created or loaded (cluster: another node
                // made it a moment ago), or the broker is shutting down.
                None if !over => Err(bid),
                None => Ok(rejected(
                    auction_id,
                    &request_id,
                    BidRejection::Ended,
                    None,
                    format!("the auction is {}", auction.state.status.as_str()),
                )),
            },
        },
        Err(error) => refused(error),
    }
}

#[cfg(test)]
mod tests;
