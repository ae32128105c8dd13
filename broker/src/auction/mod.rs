//! Auctions: a registry of live auctions and one actor task per auction that owns its state.
//! The actor judges bids in arrival order (so acceptance is race-free without a lock), writes
//! each accepted bid to the bid log, waits for the group-commit flush, and only then answers
//! and announces through [`AuctionEvents`]. Knows nothing of WebSockets.

pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use gavel_protocol::{
    AuctionSnapshot, AuctionStatus, BidPlaced, BidRejection, Outbid, Reply, UserId,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::cluster::ledger::AuctionLedger;
use crate::cluster::{ClusterError, OutgoingEvent};
use crate::metrics as m;
use crate::ratelimit::RateLimiter;
use crate::store::{BidLog, BidRecord, Durability, GroupCommit, StorageError};
use rules::{Accepted, Auction, AuctionSpec, Change, SpecError};

/// Commands queued per auction before bids are turned away as `unavailable`.
const COMMAND_QUEUE: usize = 8192;
/// Most commands one actor turn takes (they share one flush) with group commit on; with it
/// off, a turn takes one command, so every bid gets a flush of its own.
const MAX_TURN: usize = 512;
/// The leaderboard is sent at most this often per auction.
const LEADERBOARD_INTERVAL: Duration = Duration::from_millis(500);
/// Bidders on the leaderboard.
const LEADERBOARD_SIZE: usize = 10;

/// Where auction events go: the room registry in the broker, a recorder in tests.
pub trait AuctionEvents: Send + Sync + 'static {
    /// An event in `auction:{id}`, with the auction's snapshot after it (`None`: unchanged).
    fn auction_event(&self, auction_id: &str, event: &str, data: Value, state: Option<Value>);
    /// The auction's snapshot, set without an event (creation, start-up).
    fn auction_state(&self, auction_id: &str, state: Value);
    /// A notice on `user:{id}`.
    fn user_event(&self, user: &UserId, event: &str, data: Value);
}

/// Called once with the outcome of a bid (`bid_accepted` or `bid_rejected`).
pub type BidReply = Box<dyn FnOnce(Reply) + Send>;

/// A bid as the session hands it over.
pub struct BidRequest {
    pub user: Option<UserId>,
    /// False when the user's token has roles but not `bidder` (or `admin`).
    pub may_bid: bool,
    pub auction_id: String,
    pub amount: i64,
    pub request_id: String,
}

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

impl From<ClusterError> for AdminError {
    fn from(error: ClusterError) -> AdminError {
        AdminError::Cluster(error.to_string())
    }
}

/// Where accepted bids and auction records are made durable, and who orders them.
#[derive(Clone)]
pub enum Ledger {
    /// This node alone: the bid log on local disk, flushed by group commit.
    Local {
        store: Arc<dyn BidLog>,
        durability: Durability,
    },
    /// Cluster mode: Redis orders and keeps every auction's bids (see `cluster::ledger`).
    Cluster(AuctionLedger),
}

/// Settings of the auction engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub bid_rate: f64,
    pub bid_burst: u32,
    pub group_commit: GroupCommit,
}

/// Every auction of this node.
pub struct Auctions {
    map: DashMap<String, Handle>,
    ledger: Ledger,
    events: Arc<dyn AuctionEvents>,
    clock: Clock,
    limiter: RateLimiter,
    shutdown: CancellationToken,
    creating: tokio::sync::Mutex<()>,
    group_commit: GroupCommit,
}

struct Handle {
    commands_tx: mpsc::Sender<Command>,
    /// The latest snapshot, for reads that need no actor round trip.
    view: Arc<ArcSwap<AuctionSnapshot>>,
}

enum Command {
    Bid {
        user: UserId,
        amount: i64,
        request_id: String,
        reply: BidReply,
    },
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<Result<AuctionSnapshot, AdminError>>,
    },
    /// Cluster mode: another node changed the auction (now at this version).
    Refresh(u64),
}

type AdminReply = oneshot::Sender<Result<AuctionSnapshot, AdminError>>;

/// Cluster mode: what a turn announces and answers, held until its commit.
#[derive(Default)]
struct Held {
    events: Vec<OutgoingEvent>,
    answers: Vec<Answer>,
}

enum Answer {
    Bid(BidReply, Reply),
    Admin(AdminReply, AuctionSnapshot),
}

fn encode(auction: &Auction) -> Result<Vec<u8>, StorageError> {
    rmp_serde::to_vec_named(auction).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn decode(id: &str, bytes: &[u8]) -> Result<Auction, StorageError> {
    rmp_serde::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("auction {id}: {e}")))
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn rejected(
    auction_id: &str,
    request_id: &str,
    reason: BidRejection,
    min: Option<i64>,
    message: String,
) -> Reply {
    Reply::BidRejected {
        auction_id: auction_id.to_owned(),
        request_id: request_id.to_owned(),
        reason,
        min_amount: min,
        message,
    }
}

impl Auctions {
    /// Loads every auction from `store` and starts its actor. Auctions whose end passed while
    /// the broker was down end in their actor's first turn, with their `ended` event.
    pub fn open(
        store: Arc<dyn BidLog>,
        events: Arc<dyn AuctionEvents>,
        clock: Clock,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Result<Auctions, StorageError> {
        let durability = Durability::start(Arc::clone(&store), config.group_commit);
        let auctions = Auctions::empty(
            Ledger::Local {
                store: Arc::clone(&store),
                durability,
            },
            events,
            clock,
            config,
            shutdown,
        );
        for (id, bytes) in store.auctions()? {
            let auction = decode(&id, &bytes)?;
            let last = store.last_seq(&id)?;
            if last != auction.state.last_seq {
                // A bid and its record are one atomic batch, so this means a damaged store.
                return Err(StorageError::Corrupt(format!(
                    "auction {id}: record says bid {} but the log ends at {last}",
                    auction.state.last_seq
                )));
            }
            let bids = store.bids(&id, 0, usize::MAX)?;
            auctions.spawn(auction, &bids, 0);
        }
        tracing::info!(auctions = auctions.map.len(), "auctions loaded");
        Ok(auctions)
    }

    /// Cluster mode: an empty registry; [`Auctions::load_cluster`] fills it from Redis.
    pub fn cluster(
        ledger: AuctionLedger,
        events: Arc<dyn AuctionEvents>,
        clock: Clock,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Auctions {
        Auctions::empty(Ledger::Cluster(ledger), events, clock, config, shutdown)
    }

    fn empty(
        ledger: Ledger,
        events: Arc<dyn AuctionEvents>,
        clock: Clock,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Auctions {
        Auctions {
            map: DashMap::new(),
            ledger,
            events,
            clock,
            limiter: RateLimiter::new(config.bid_rate, config.bid_burst),
            shutdown,
            creating: tokio::sync::Mutex::new(()),
            group_commit: config.group_commit,
        }
    }

    /// Cluster mode: starts an actor for every auction in Redis this node does not run yet.
    pub async fn load_cluster(&self) -> Result<usize, AdminError> {
        let Ledger::Cluster(ledger) = &self.ledger else {
            return Ok(0);
        };
        let ids = ledger.ids().await?;
        let mut loaded = 0;
        for id in &ids {
            match self.adopt(id).await {
                Ok(()) => loaded += 1,
                // One unreadable auction must not keep the others (and the node) down.
                Err(AdminError::Cluster(error)) => return Err(AdminError::Cluster(error)),
                Err(error) => {
                    tracing::error!(auction = %id, %error, "auction in Redis cannot be loaded; skipped")
                }
            }
        }
        Ok(loaded)
    }

    /// Cluster mode: starts an actor for an auction another node created.
    pub async fn adopt(&self, id: &str) -> Result<(), AdminError> {
        let Ledger::Cluster(ledger) = &self.ledger else {
            return Ok(());
        };
        let _one_at_a_time = self.creating.lock().await;
        if self.map.contains_key(id) {
            return Ok(());
        }
        let fresh = ledger.read(id, 0).await?;
        if fresh.record.is_empty() {
            return Err(AdminError::NotFound(id.to_owned()));
        }
        let auction = decode(id, &fresh.record)?;
        self.spawn(auction, &fresh.bids, fresh.version);
        Ok(())
    }

    /// Cluster mode: makes every actor catch up with Redis (after a reconnection).
    pub fn refresh_all(&self) {
        for handle in self.map.iter() {
            let _ = handle.commands_tx.try_send(Command::Refresh(u64::MAX));
        }
    }

    /// Cluster mode: tells an auction's actor that another node changed it.
    pub fn changed(&self, id: &str, version: u64) {
        if let Some(handle) = self.map.get(id) {
            let _ = handle.commands_tx.try_send(Command::Refresh(version));
        }
    }

    fn spawn(&self, auction: Auction, bids: &[BidRecord], version: u64) {
        let now = self.clock.now_ms();
        let snapshot = auction.snapshot(now);
        self.events
            .auction_state(&auction.spec.id, to_value(&snapshot));
        let view = Arc::new(ArcSwap::from_pointee(snapshot));
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let durable_seq = auction.state.last_seq;
        let mut actor = Actor {
            max_turn: match self.group_commit {
                GroupCommit::On => MAX_TURN,
                GroupCommit::Off => 1,
            },
            id: auction.spec.id.clone(),
            auction,
            commands_rx,
            ledger: self.ledger.clone(),
            version,
            stale: false,
            held: None,
            retry_at: None,
            retry_backoff_ms: 0,
            events: Arc::clone(&self.events),
            clock: self.clock,
            view: Arc::clone(&view),
            outcomes: HashMap::new(),
            highest: HashMap::new(),
            leaderboard_dirty: false,
            failed: false,
            durable_seq,
        };
        actor.learn_bids(bids);
        self.map
            .insert(actor.id.clone(), Handle { commands_tx, view });
        tokio::spawn(actor.run(self.shutdown.clone()));
    }

    /// Creates an auction; durable before it returns.
    pub async fn create(&self, spec: AuctionSpec) -> Result<AuctionSnapshot, AdminError> {
        spec.validate()?;
        // Creations are rare: one at a time, so two with the same id cannot both pass the check.
        let _one_at_a_time = self.creating.lock().await;
        if self.map.contains_key(&spec.id) {
            return Err(AdminError::Exists(spec.id));
        }
        let now = self.clock.now_ms();
        if spec.ends_at <= now {
            return Err(SpecError::Invalid("ends_at is in the past".into()).into());
        }
        let mut auction = Auction::new(spec);
        // One whose start has passed is born active: nobody can have subscribed to it yet.
        auction.advance(now);
        let snapshot = auction.snapshot(now);
        let version = match &self.ledger {
            Ledger::Local { store, durability } => {
                store.put_auction(&auction.spec.id, &encode(&auction)?)?;
                durability.sync().await?;
                0
            }
            Ledger::Cluster(ledger) => {
                let created = ledger
                    .create(&auction.spec.id, &encode(&auction)?, &to_value(&snapshot))
                    .await?;
                if !created {
                    return Err(AdminError::Exists(auction.spec.id));
                }
                1
            }
        };
        self.spawn(auction, &[], version);
        Ok(snapshot)
    }

    /// Runs an admin operation in the auction's actor (in order with its bids).
    pub async fn admin(&self, id: &str, op: AdminOp) -> Result<AuctionSnapshot, AdminError> {
        let commands_tx = self
            .map
            .get(id)
            .map(|h| h.commands_tx.clone())
            .ok_or_else(|| AdminError::NotFound(id.to_owned()))?;
        let (reply, answer) = oneshot::channel();
        commands_tx
            .send(Command::Admin { op, reply })
            .await
            .map_err(|_| AdminError::Storage(StorageError::Stopped))?;
        answer
            .await
            .unwrap_or(Err(AdminError::Storage(StorageError::Stopped)))
    }

    /// Hands a bid to its auction's actor; `reply` is called with the outcome once it is
    /// durable (accepted) or decided (rejected). Never waits.
    pub fn place_bid(&self, bid: BidRequest, reply: BidReply) {
        let reject = |reason, message: &str| {
            metrics::counter!(m::BIDS, "outcome" => BidRejection::as_str(reason)).increment(1);
            rejected(
                &bid.auction_id,
                &bid.request_id,
                reason,
                None,
                message.to_owned(),
            )
        };
        let Some(user) = bid.user.clone() else {
            return reply(reject(
                BidRejection::Unauthenticated,
                "anonymous connections cannot bid",
            ));
        };
        if !bid.may_bid {
            return reply(reject(
                BidRejection::Forbidden,
                "bidding needs the bidder role",
            ));
        }
        if let Ledger::Cluster(ledger) = &self.ledger {
            if !ledger.ready() {
                return reply(reject(
                    BidRejection::ClusterUnavailable,
                    "the cluster's Redis is unreachable; retry",
                ));
            }
        }
        let Some(commands_tx) = self.map.get(&bid.auction_id).map(|h| h.commands_tx.clone()) else {
            return reply(reject(BidRejection::UnknownAuction, "no such auction"));
        };
        if !self.limiter.allow(&user, self.clock.now_ms()) {
            return reply(reject(
                BidRejection::RateLimited,
                "too many bids; slow down",
            ));
        }
        let command = Command::Bid {
            user,
            amount: bid.amount,
            request_id: bid.request_id.clone(),
            reply,
        };
        if let Err(error) = commands_tx.try_send(command) {
            let (mpsc::error::TrySendError::Full(Command::Bid { reply, .. })
            | mpsc::error::TrySendError::Closed(Command::Bid { reply, .. })) = error
            else {
                return;
            };
            reply(reject(
                BidRejection::Unavailable,
                "the auction is overloaded; retry",
            ));
        }
    }

    pub fn get(&self, id: &str) -> Option<AuctionSnapshot> {
        self.map
            .get(id)
            .map(|h| AuctionSnapshot::clone(&h.view.load()))
    }

    /// Every auction, by id.
    pub fn list(&self) -> Vec<AuctionSnapshot> {
        let mut all: Vec<AuctionSnapshot> = self
            .map
            .iter()
            .map(|h| AuctionSnapshot::clone(&h.view.load()))
            .collect();
        all.sort_by(|a, b| a.auction_id.cmp(&b.auction_id));
        all
    }

    /// Bid history from the log.
    pub async fn bids(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BidRecord>, AdminError> {
        if !self.map.contains_key(id) {
            return Err(AdminError::NotFound(id.to_owned()));
        }
        match &self.ledger {
            Ledger::Local { store, .. } => Ok(store.bids(id, after, limit)?),
            Ledger::Cluster(ledger) => ledger
                .bids(id, after, limit)
                .await
                .map_err(AdminError::from),
        }
    }

    /// Sets the `gavel_auctions{status}` gauge.
    pub fn record_counts(&self) {
        let mut counts = [0u32; AuctionStatus::ALL.len()];
        for handle in self.map.iter() {
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
        self.limiter.prune(self.clock.now_ms());
    }

    /// Makes every write durable (at shutdown). In cluster mode every acknowledged write is
    /// already in Redis.
    pub async fn sync(&self) -> Result<(), StorageError> {
        match &self.ledger {
            Ledger::Local { durability, .. } => durability.sync().await,
            Ledger::Cluster(_) => Ok(()),
        }
    }
}

/// The `bid_accepted` reply for a logged bid, from the record alone, so a retry (even after a
/// restart) gets exactly the first answer: at acceptance the bid was the price, the next
/// minimum followed from it, and the record keeps the `ends_at` of that moment.
fn accepted_reply(auction_id: &str, bid: &BidRecord, auction: &Auction) -> Reply {
    Reply::BidAccepted {
        auction_id: auction_id.to_owned(),
        request_id: bid.request_id.clone(),
        bid_seq: bid.seq,
        amount: bid.amount,
        price: bid.amount,
        bid_count: bid.seq,
        next_min_bid: auction.next_min_bid_after(bid.amount),
        ends_at: bid.ends_at,
        server_ts: bid.ts,
    }
}

/// What a turn will announce once its writes are durable, in order. Most items are bids, so
/// boxing the large variant would only add an allocation per bid.
#[allow(clippy::large_enum_variant)]
enum Announce {
    /// Changes, with the auction's snapshot right after them (not after the whole turn).
    Changes(Vec<Change>, AuctionSnapshot),
    Bid {
        accepted: Accepted,
        record: BidRecord,
        reply: BidReply,
        answer: Reply,
        snapshot: AuctionSnapshot,
    },
    Answer(BidReply, Reply),
    /// A rejection judged while this turn had writes pending; remembered under the key (if
    /// any) once the flush succeeds.
    Rejected(BidReply, Reply, Option<(UserId, String)>),
    Admin(
        oneshot::Sender<Result<AuctionSnapshot, AdminError>>,
        AuctionSnapshot,
    ),
}

/// A judged turn, before its writes are durable.
struct Judged {
    announce: Vec<Announce>,
    wrote: bool,
    /// What to restore if the flush or commit fails (memory must not run ahead of the log).
    before_turn: Auction,
    undo_highest: Vec<(UserId, Option<i64>)>,
}

struct Actor {
    /// Commands per turn (one flush per turn).
    max_turn: usize,
    id: String,
    auction: Auction,
    commands_rx: mpsc::Receiver<Command>,
    ledger: Ledger,
    /// Cluster mode: the auction's version in Redis this actor's state reflects.
    version: u64,
    /// Cluster mode: a commit failed; the next turn reloads everything from Redis.
    stale: bool,
    /// Cluster mode: this turn's announcements, held until its commit.
    held: Option<Held>,
    /// Cluster mode: after a failed turn, when timers may try again (clock ms), and the
    /// current backoff.
    retry_at: Option<u64>,
    retry_backoff_ms: u64,
    events: Arc<dyn AuctionEvents>,
    clock: Clock,
    view: Arc<ArcSwap<AuctionSnapshot>>,
    /// Outcomes by (user, request_id), so a retry gets the first outcome again.
    outcomes: HashMap<(UserId, String), Reply>,
    /// Each bidder's highest accepted bid, for the leaderboard.
    highest: HashMap<UserId, i64>,
    leaderboard_dirty: bool,
    /// Set when the bid log failed: every later bid is `unavailable` until a restart.
    failed: bool,
    /// The last bid seq known to be flushed.
    durable_seq: u64,
}

impl Actor {
    async fn run(mut self, shutdown: CancellationToken) {
        self.turn(Vec::new()).await;
        let mut leaderboard = tokio::time::interval(LEADERBOARD_INTERVAL);
        leaderboard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // After a failed cluster turn, a deadline already due waits for the backoff (or
            // the actor would retry at Redis's round-trip speed).
            let deadline = self
                .auction
                .next_deadline()
                .map(|d| d.max(self.retry_at.unwrap_or(0)));
            let wake = self.clock.instant_at(deadline.unwrap_or(u64::MAX / 2));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                command = self.commands_rx.recv() => {
                    let Some(command) = command else { break };
                    let mut batch = vec![command];
                    while batch.len() < self.max_turn {
                        match self.commands_rx.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    let mut newest = None;
                    batch.retain(|c| match c {
                        Command::Refresh(version) => {
                            newest = newest.max(Some(*version));
                            false
                        }
                        _ => true,
                    });
                    if let Some(version) = newest {
                        self.refresh(version).await;
                    }
                    if !batch.is_empty() {
                        self.turn(batch).await;
                    }
                }
                _ = tokio::time::sleep_until(wake), if deadline.is_some() => self.turn(Vec::new()).await,
                _ = leaderboard.tick(), if self.leaderboard_dirty => self.send_leaderboard(),
            }
        }
    }

    /// One turn: apply what time made due, then each command in order; make the writes
    /// durable (one flush, or in cluster mode one commit); then answer and announce, in order.
    async fn turn(&mut self, commands: Vec<Command>) {
        match self.ledger.clone() {
            Ledger::Local { durability, .. } => self.local_turn(commands, &durability).await,
            Ledger::Cluster(ledger) => self.cluster_turn(commands, &ledger).await,
        }
    }

    async fn local_turn(&mut self, commands: Vec<Command>, durability: &Durability) {
        let now = self.clock.now_ms();
        let Judged {
            announce,
            wrote,
            before_turn,
            undo_highest,
        } = self.judge(commands, now);
        if wrote {
            if let Err(error) = durability.sync().await {
                self.auction = before_turn;
                self.undo(undo_highest);
                self.fail(announce, error);
                return;
            }
            self.durable_seq = self.auction.state.last_seq;
        }
        self.announce(announce, now);
    }

    fn undo(&mut self, undo_highest: Vec<(UserId, Option<i64>)>) {
        for (user, previous) in undo_highest.into_iter().rev() {
            match previous {
                Some(amount) => self.highest.insert(user, amount),
                None => self.highest.remove(&user),
            };
        }
    }

    /// A cluster turn: take the auction's lock in Redis, catch up with other nodes' changes,
    /// judge, then commit bids, record and room events in one compare-and-set (which also
    /// releases the lock) before anything is answered.
    async fn cluster_turn(&mut self, commands: Vec<Command>, ledger: &AuctionLedger) {
        let version = match ledger.lock(&self.id).await {
            Ok(version) => version,
            Err(error) => return self.refuse(commands, &error.to_string()),
        };
        if version != self.version || self.stale {
            if let Err(error) = self.catch_up(ledger).await {
                let _ = ledger.unlock(&self.id).await;
                return self.refuse(commands, &error.to_string());
            }
        }
        let now = self.clock.now_ms();
        let Judged {
            announce,
            wrote,
            before_turn,
            undo_highest,
        } = self.judge(commands, now);
        // The turn's accepted bids, in seq order, for the commit.
        let bids: Vec<BidRecord> = announce
            .iter()
            .filter_map(|a| match a {
                Announce::Bid { record, .. } => Some(record.clone()),
                _ => None,
            })
            .collect();
        self.held = Some(Held::default());
        self.announce(announce, now);
        let held = self.held.take().unwrap_or_default();
        if !wrote {
            if let Err(error) = ledger.unlock(&self.id).await {
                tracing::warn!(auction = %self.id, %error, "auction unlock failed (it expires)");
            }
            return self.release(held, None);
        }
        let committed = match encode(&self.auction) {
            Ok(record) => ledger
                .commit(&self.id, self.version, &record, &bids, &held.events)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match committed {
            Ok(version) => {
                self.version = version;
                self.durable_seq = self.auction.state.last_seq;
                self.retry_at = None;
                self.retry_backoff_ms = 0;
                self.release(held, None);
            }
            Err(error) => {
                self.back_off();
                tracing::warn!(auction = %self.id, %error, "cluster commit failed: nothing of the turn is acknowledged");
                self.auction = before_turn;
                self.undo(undo_highest);
                self.stale = true;
                self.view.store(Arc::new(self.auction.snapshot(now)));
                self.release(held, Some(&error));
            }
        }
    }

    /// Sends a cluster turn's held answers; after a failed commit, what the turn accepted is
    /// refused instead (nothing of it was recorded).
    fn release(&mut self, held: Held, failed: Option<&str>) {
        for answer in held.answers {
            match (answer, failed) {
                (Answer::Bid(reply, answer), None) => reply(answer),
                (Answer::Bid(reply, answer), Some(error)) => match &answer {
                    // Accepted in this turn, or rejected against this turn's bids: neither
                    // stands, since nothing of the turn was recorded.
                    Reply::BidAccepted {
                        bid_seq,
                        request_id,
                        ..
                    } if *bid_seq > self.durable_seq => {
                        metrics::counter!(m::BIDS, "outcome" => "cluster_unavailable").increment(1);
                        reply(self.cluster_refusal(
                            request_id,
                            format!("the bid could not be committed: {error}"),
                        ))
                    }
                    Reply::BidRejected { request_id, .. } => reply(self.cluster_refusal(
                        request_id,
                        format!("the turn could not be committed: {error}"),
                    )),
                    _ => reply(answer),
                },
                (Answer::Admin(reply, snapshot), None) => {
                    let _ = reply.send(Ok(snapshot));
                }
                (Answer::Admin(reply, _), Some(error)) => {
                    let _ = reply.send(Err(AdminError::Cluster(error.to_owned())));
                }
            }
        }
    }

    /// Cluster mode: a turn failed; timers wait a growing backoff before the next try.
    fn back_off(&mut self) {
        self.retry_backoff_ms = (self.retry_backoff_ms * 2).clamp(100, 5_000);
        self.retry_at = Some(self.clock.now_ms() + self.retry_backoff_ms);
    }

    /// A `bid_rejected` with `cluster_unavailable`.
    fn cluster_refusal(&self, request_id: &str, message: String) -> Reply {
        rejected(
            &self.id,
            request_id,
            BidRejection::ClusterUnavailable,
            None,
            message,
        )
    }

    /// Cluster mode: answers a turn's commands without judging them (Redis unreachable).
    fn refuse(&mut self, commands: Vec<Command>, error: &str) {
        self.back_off();
        for command in commands {
            match command {
                Command::Bid {
                    request_id, reply, ..
                } => {
                    metrics::counter!(m::BIDS, "outcome" => "cluster_unavailable").increment(1);
                    reply(self.cluster_refusal(
                        &request_id,
                        format!("the cluster cannot order bids now: {error}"),
                    ));
                }
                Command::Admin { reply, .. } => {
                    let _ = reply.send(Err(AdminError::Cluster(error.to_owned())));
                }
                Command::Refresh(_) => {}
            }
        }
    }

    /// Cluster mode: loads what other nodes committed since this actor's state (everything
    /// after a failed commit).
    async fn catch_up(&mut self, ledger: &AuctionLedger) -> Result<(), AdminError> {
        let after = if self.stale {
            0
        } else {
            self.auction.state.last_seq
        };
        let fresh = ledger.read(&self.id, after).await?;
        let auction = decode(&self.id, &fresh.record)?;
        if self.stale {
            self.outcomes.clear();
            self.highest.clear();
        }
        self.auction = auction;
        self.learn_bids(&fresh.bids);
        self.version = fresh.version;
        self.durable_seq = self.auction.state.last_seq;
        self.stale = false;
        self.view
            .store(Arc::new(self.auction.snapshot(self.clock.now_ms())));
        Ok(())
    }

    /// Takes logged bids into the idempotency table (a retry gets the first answer) and the
    /// leaderboard.
    fn learn_bids(&mut self, bids: &[BidRecord]) {
        for bid in bids {
            self.highest.insert(bid.user.clone(), bid.amount);
            self.outcomes.insert(
                (bid.user.clone(), bid.request_id.clone()),
                accepted_reply(&self.id, bid, &self.auction),
            );
        }
    }

    /// Cluster mode: another node committed a change; catch up without the lock, so this
    /// node's view and timers follow.
    async fn refresh(&mut self, version: u64) {
        let Ledger::Cluster(ledger) = self.ledger.clone() else {
            return;
        };
        if version <= self.version && !self.stale {
            return;
        }
        if let Err(error) = self.catch_up(&ledger).await {
            tracing::debug!(auction = %self.id, %error, "refresh failed; the next turn catches up");
        }
    }

    /// Judges a turn's commands against the auction, writing (local) or staging (cluster)
    /// what they change.
    fn judge(&mut self, commands: Vec<Command>, now: u64) -> Judged {
        let mut announce = Vec::new();
        let mut wrote = false;
        // What to restore if this turn's flush fails (memory must not run ahead of the disk).
        let before_turn = self.auction.clone();
        let mut undo_highest: Vec<(UserId, Option<i64>)> = Vec::new();
        if !self.failed {
            let changes = self.auction.advance(now);
            if !changes.is_empty() {
                if self.persist() {
                    wrote = true;
                    announce.push(Announce::Changes(changes, self.auction.snapshot(now)));
                } else {
                    self.auction = before_turn.clone();
                }
            }
        }
        for command in commands {
            match command {
                Command::Bid {
                    user,
                    amount,
                    request_id,
                    reply,
                } => {
                    if let Some(first) = self.outcomes.get(&(user.clone(), request_id.clone())) {
                        announce.push(Announce::Answer(reply, first.clone()));
                        continue;
                    }
                    if self.failed {
                        let answer = rejected(
                            &self.id,
                            &request_id,
                            BidRejection::Unavailable,
                            None,
                            "the bid log failed; bids are refused until the broker restarts".into(),
                        );
                        reply(answer);
                        continue;
                    }
                    let before = self.auction.clone();
                    match self.auction.place_bid(&user, amount, now) {
                        Ok(accepted) => {
                            let record = BidRecord {
                                seq: accepted.seq,
                                user: user.clone(),
                                amount,
                                request_id: request_id.clone(),
                                ts: now,
                                ends_at: self.auction.state.ends_at,
                            };
                            if let Err(error) = self.write_bid(&record) {
                                tracing::error!(auction = %self.id, %error, "bid log write failed");
                                self.auction = before;
                                self.failed = true;
                                reply(rejected(
                                    &self.id,
                                    &request_id,
                                    BidRejection::Unavailable,
                                    None,
                                    "the bid could not be recorded".into(),
                                ));
                                continue;
                            }
                            wrote = true;
                            let answer = accepted_reply(&self.id, &record, &self.auction);
                            self.outcomes
                                .insert((user.clone(), request_id), answer.clone());
                            let previous = self.highest.insert(user.clone(), amount);
                            undo_highest.push((user, previous));
                            self.leaderboard_dirty = true;
                            announce.push(Announce::Bid {
                                accepted,
                                record,
                                reply,
                                answer,
                                snapshot: self.auction.snapshot(now),
                            });
                        }
                        Err(rejection) => {
                            metrics::counter!(m::BIDS, "outcome" => rejection.reason.as_str())
                                .increment(1);
                            let answer = rejected(
                                &self.id,
                                &request_id,
                                rejection.reason,
                                rejection.min_amount,
                                rejection.message,
                            );
                            // Remembered for retries only where the answer cannot change
                            // (a status-dependent rejection is re-judged on retry).
                            let remember = matches!(
                                rejection.reason,
                                BidRejection::TooLow | BidRejection::InvalidAmount
                            );
                            let key = remember.then_some((user, request_id));
                            if wrote {
                                // Judged against bids of this turn not yet durable: answered
                                // (and remembered) only after the flush.
                                announce.push(Announce::Rejected(reply, answer, key));
                            } else {
                                if let Some(key) = key {
                                    self.outcomes.insert(key, answer.clone());
                                }
                                reply(answer);
                            }
                        }
                    }
                }
                Command::Admin { op, reply } => {
                    if self.failed {
                        let _ = reply.send(Err(AdminError::Storage(StorageError::Io(
                            "the bid log failed; restart the broker".into(),
                        ))));
                        continue;
                    }
                    let before = self.auction.clone();
                    match self.apply(op, now) {
                        Ok(changes) => {
                            if !self.persist() {
                                self.auction = before;
                                let _ = reply.send(Err(AdminError::Storage(StorageError::Io(
                                    "write failed".into(),
                                ))));
                                continue;
                            }
                            wrote = true;
                            let snapshot = self.auction.snapshot(now);
                            announce.push(Announce::Changes(changes, snapshot.clone()));
                            announce.push(Announce::Admin(reply, snapshot));
                        }
                        Err(error) => {
                            let _ = reply.send(Err(error));
                        }
                    }
                }
                Command::Refresh(_) => {}
            }
        }
        Judged {
            announce,
            wrote,
            before_turn,
            undo_highest,
        }
    }

    fn apply(&mut self, op: AdminOp, now: u64) -> Result<Vec<Change>, AdminError> {
        Ok(match op {
            AdminOp::Update(spec) => {
                if self.auction.state.status != AuctionStatus::Scheduled {
                    return Err(SpecError::WrongStatus(
                        self.auction.state.status.as_str(),
                        "only a scheduled auction can be changed",
                    )
                    .into());
                }
                if spec.ends_at <= now {
                    return Err(SpecError::Invalid("ends_at is in the past".into()).into());
                }
                self.auction.update(spec)?;
                vec![Change::Updated]
            }
            AdminOp::Pause => self.auction.pause(now)?,
            AdminOp::Resume => self.auction.resume(now)?,
            AdminOp::Cancel => self.auction.cancel()?,
            AdminOp::EndNow => self.auction.end_now(now)?,
        })
    }

    /// Writes a bid with the auction's record after it (cluster mode: stages it for the
    /// turn's commit).
    fn write_bid(&mut self, record: &BidRecord) -> Result<(), StorageError> {
        match &self.ledger {
            Ledger::Local { store, .. } => {
                encode(&self.auction).and_then(|bytes| store.append(&self.id, record, &bytes))
            }
            // Committed with the turn (the records are in its announcements).
            Ledger::Cluster(_) => Ok(()),
        }
    }

    /// Writes the auction's record; false if the write failed. In cluster mode the record
    /// goes with the turn's commit.
    fn persist(&mut self) -> bool {
        let written = match &self.ledger {
            Ledger::Local { store, .. } => {
                encode(&self.auction).and_then(|bytes| store.put_auction(&self.id, &bytes))
            }
            Ledger::Cluster(_) => Ok(()),
        };
        if let Err(error) = written {
            tracing::error!(auction = %self.id, %error, "auction record write failed");
            self.failed = true;
            return false;
        }
        true
    }

    /// The flush failed: nothing of this turn is acknowledged, and the auction stops taking
    /// bids (its in-memory state may be ahead of the disk) until a restart reloads the log.
    fn fail(&mut self, announce: Vec<Announce>, error: StorageError) {
        tracing::error!(auction = %self.id, %error, "bid log flush failed; refusing bids until restart");
        self.failed = true;
        for item in announce {
            match item {
                Announce::Bid { record, reply, .. } => {
                    self.outcomes
                        .remove(&(record.user.clone(), record.request_id.clone()));
                    reply(rejected(
                        &self.id,
                        &record.request_id,
                        BidRejection::Unavailable,
                        None,
                        "the bid could not be made durable".into(),
                    ));
                }
                Announce::Answer(reply, answer) => {
                    // A retry of a bid accepted in this very turn: that bid is not durable.
                    match &answer {
                        Reply::BidAccepted {
                            bid_seq,
                            request_id,
                            ..
                        } if *bid_seq > self.durable_seq => reply(rejected(
                            &self.id,
                            request_id,
                            BidRejection::Unavailable,
                            None,
                            "the bid could not be made durable".into(),
                        )),
                        _ => reply(answer),
                    }
                }
                Announce::Admin(reply, _) => {
                    let _ = reply.send(Err(AdminError::Storage(error.clone())));
                }
                Announce::Rejected(reply, answer, _) => {
                    let request_id = match &answer {
                        Reply::BidRejected { request_id, .. } => request_id.clone(),
                        _ => String::new(),
                    };
                    reply(rejected(
                        &self.id,
                        &request_id,
                        BidRejection::Unavailable,
                        None,
                        "the bid log failed".into(),
                    ));
                }
                Announce::Changes(..) => {}
            }
        }
    }

    fn announce(&mut self, announce: Vec<Announce>, now: u64) {
        for item in announce {
            match item {
                Announce::Changes(changes, snapshot) => {
                    let state = to_value(&snapshot);
                    for change in changes {
                        match change {
                            Change::Status { from, to } => self.emit_auction(
                                "status_changed",
                                json!({
                                    "auction_id": self.id,
                                    "status": to,
                                    "previous": from,
                                    "ends_at": snapshot.ends_at,
                                    "server_ts": now,
                                }),
                                Some(state.clone()),
                            ),
                            Change::Updated => self.emit_auction(
                                "updated",
                                json!({
                                    "auction_id": self.id,
                                    "starts_at": snapshot.starts_at,
                                    "ends_at": snapshot.ends_at,
                                    "server_ts": now,
                                }),
                                Some(state.clone()),
                            ),
                            Change::Ended(ended) => {
                                if self.leaderboard_dirty {
                                    self.send_leaderboard();
                                }
                                self.emit_auction("ended", to_value(&ended), Some(state.clone()));
                            }
                        }
                    }
                }
                Announce::Bid {
                    accepted,
                    record,
                    reply,
                    answer,
                    snapshot,
                } => {
                    metrics::counter!(m::BIDS, "outcome" => "accepted").increment(1);
                    let placed = BidPlaced {
                        auction_id: self.id.clone(),
                        bid_seq: record.seq,
                        amount: record.amount,
                        bidder: record.user.clone(),
                        bid_count: snapshot.bid_count,
                        next_min_bid: snapshot.next_min_bid,
                        ends_at: snapshot.ends_at,
                        server_ts: record.ts,
                    };
                    let state = to_value(&snapshot);
                    self.emit_auction("bid_placed", to_value(&placed), Some(state));
                    if let Some(previous_end) = accepted.extended_from {
                        self.emit_auction(
                            "extended",
                            json!({
                                "auction_id": self.id,
                                "ends_at": snapshot.ends_at,
                                "previous_ends_at": previous_end,
                                "server_ts": record.ts,
                            }),
                            None,
                        );
                    }
                    if let Some((leader, their_amount)) = accepted.outbid {
                        let notice = Outbid {
                            auction_id: self.id.clone(),
                            amount: record.amount,
                            your_amount: their_amount,
                            next_min_bid: snapshot.next_min_bid,
                            ends_at: snapshot.ends_at,
                            server_ts: record.ts,
                        };
                        self.emit_user(&leader, "outbid", to_value(&notice));
                    }
                    self.answer(reply, answer);
                }
                Announce::Answer(reply, answer) => self.answer(reply, answer),
                Announce::Rejected(reply, answer, key) => {
                    if let Some(key) = key {
                        self.outcomes.insert(key, answer.clone());
                    }
                    self.answer(reply, answer);
                }
                Announce::Admin(reply, snapshot) => self.answer_admin(reply, snapshot),
            }
        }
        self.view.store(Arc::new(self.auction.snapshot(now)));
        if matches!(
            self.auction.state.status,
            AuctionStatus::Ended | AuctionStatus::Cancelled
        ) {
            self.leaderboard_dirty = false;
        }
    }

    /// An event in the auction's room: published now, or (cluster turn) with the commit.
    fn emit_auction(&mut self, event: &str, data: Value, state: Option<Value>) {
        match &mut self.held {
            Some(held) => held
                .events
                .extend(OutgoingEvent::auction(&self.id, event, data, state)),
            None => self.events.auction_event(&self.id, event, data, state),
        }
    }

    /// A notice on a user's channel: published now, or (cluster turn) with the commit.
    fn emit_user(&mut self, user: &UserId, event: &str, data: Value) {
        match &mut self.held {
            Some(held) => held.events.push(OutgoingEvent::user(user, event, data)),
            None => self.events.user_event(user, event, data),
        }
    }

    /// An admin change's answer: sent now, or (cluster turn) once the commit succeeded.
    fn answer_admin(&mut self, reply: AdminReply, snapshot: AuctionSnapshot) {
        match &mut self.held {
            Some(held) => held.answers.push(Answer::Admin(reply, snapshot)),
            None => {
                let _ = reply.send(Ok(snapshot));
            }
        }
    }

    /// A bid's answer: sent now, or (cluster turn) once the commit succeeded.
    fn answer(&mut self, reply: BidReply, answer: Reply) {
        match &mut self.held {
            Some(held) => held.answers.push(Answer::Bid(reply, answer)),
            None => reply(answer),
        }
    }

    fn send_leaderboard(&mut self) {
        self.leaderboard_dirty = false;
        let mut top: Vec<(&UserId, &i64)> = self.highest.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        top.truncate(LEADERBOARD_SIZE);
        let top: Vec<Value> = top
            .into_iter()
            .map(|(user, amount)| json!({"user": user, "amount": amount}))
            .collect();
        self.emit_auction(
            "leaderboard",
            json!({
                "auction_id": self.id,
                "top": top,
                "ends_at": self.auction.state.ends_at,
                "server_ts": self.clock.now_ms(),
            }),
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::rules::{Increment, SoftClose};
    use super::*;
    use crate::store::MemoryLog;
    use std::sync::Mutex;

    /// Records what the engine announces.
    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<(String, String, Value)>>,
    }

    impl Recorder {
        fn named(&self, event: &str) -> Vec<Value> {
            let events = self.events.lock().unwrap();
            events
                .iter()
                .filter(|e| e.1 == event)
                .map(|e| e.2.clone())
                .collect()
        }
    }

    impl AuctionEvents for Recorder {
        fn auction_event(&self, auction_id: &str, event: &str, data: Value, _: Option<Value>) {
            self.events
                .lock()
                .unwrap()
                .push((format!("auction:{auction_id}"), event.into(), data));
        }
        fn auction_state(&self, _: &str, _: Value) {}
        fn user_event(&self, user: &UserId, event: &str, data: Value) {
            self.events
                .lock()
                .unwrap()
                .push((format!("user:{user}"), event.into(), data));
        }
    }

    const T0: u64 = 1_800_000_000_000;

    fn spec(id: &str) -> AuctionSpec {
        AuctionSpec {
            id: id.into(),
            title: "Lot".into(),
            currency: "EUR".into(),
            starting_price: 1000,
            increment: Increment::Fixed(100),
            reserve: None,
            starts_at: T0 + 1_000,
            ends_at: T0 + 60_000,
            soft_close: SoftClose {
                window_ms: 10_000,
                extend_ms: 20_000,
            },
        }
    }

    /// An engine on an empty in-memory log, and what it announces.
    fn fresh() -> (Arc<Recorder>, Auctions) {
        let events = Arc::new(Recorder::default());
        let auctions = engine(
            Arc::new(MemoryLog::default()),
            Arc::clone(&events),
            CancellationToken::new(),
        );
        (events, auctions)
    }

    fn engine(
        log: Arc<dyn BidLog>,
        events: Arc<Recorder>,
        shutdown: CancellationToken,
    ) -> Auctions {
        engine_at(Clock::tokio(T0), log, events, shutdown)
    }

    fn engine_at(
        clock: Clock,
        log: Arc<dyn BidLog>,
        events: Arc<Recorder>,
        shutdown: CancellationToken,
    ) -> Auctions {
        let config = EngineConfig {
            bid_rate: 1000.0,
            bid_burst: 1000,
            group_commit: GroupCommit::On,
        };
        Auctions::open(log, events, clock, config, shutdown).unwrap()
    }

    async fn bid(auctions: &Auctions, user: &str, amount: i64, request_id: &str) -> Reply {
        let (tx, rx) = oneshot::channel();
        auctions.place_bid(
            BidRequest {
                user: Some(UserId::parse(user).unwrap()),
                may_bid: true,
                auction_id: "a1".into(),
                amount,
                request_id: request_id.into(),
            },
            Box::new(move |reply| {
                let _ = tx.send(reply);
            }),
        );
        rx.await.unwrap()
    }

    /// Lets the actors run until they are idle (the in-memory log flushes in place, so nothing
    /// runs outside the paused runtime).
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timers_open_extend_and_close_with_the_winner() {
        let (events, auctions) = fresh();
        auctions.create(spec("a1")).await.unwrap();
        assert!(matches!(
            bid(&auctions, "ann", 1000, "r1").await,
            Reply::BidRejected {
                reason: BidRejection::NotActive,
                ..
            }
        ));

        tokio::time::sleep(Duration::from_millis(1_000)).await;
        settle().await;
        assert_eq!(events.named("status_changed")[0]["status"], "active");
        assert!(matches!(
            bid(&auctions, "ann", 1000, "r2").await,
            Reply::BidAccepted { bid_seq: 1, .. }
        ));

        // 55 s in: inside the 10 s window, so the end moves to now + 20 s.
        tokio::time::sleep(Duration::from_millis(54_000)).await;
        let Reply::BidAccepted { ends_at, .. } = bid(&auctions, "bob", 1100, "r3").await else {
            panic!()
        };
        assert_eq!(ends_at, T0 + 75_000);
        let extended = events.named("extended");
        assert_eq!(
            (
                extended[0]["ends_at"].as_u64(),
                extended[0]["previous_ends_at"].as_u64()
            ),
            (Some(T0 + 75_000), Some(T0 + 60_000))
        );
        assert_eq!(events.named("outbid")[0]["your_amount"], 1000);

        // At the original end nothing happens; at the new one, bob wins.
        tokio::time::sleep(Duration::from_millis(6_000)).await;
        settle().await;
        assert!(events.named("ended").is_empty());
        tokio::time::sleep(Duration::from_millis(14_000)).await;
        settle().await;
        let ended = events.named("ended");
        assert_eq!(ended.len(), 1);
        assert_eq!(
            (
                ended[0]["winner"].as_str(),
                ended[0]["final_price"].as_i64()
            ),
            (Some("bob"), Some(1100))
        );
        assert_eq!(ended[0]["reserve_met"], true);
        assert!(matches!(
            bid(&auctions, "ann", 5000, "r4").await,
            Reply::BidRejected {
                reason: BidRejection::Ended,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_leaderboard_is_coalesced_and_ranks_each_bidders_highest_bid() {
        let (events, auctions) = fresh();
        auctions.create(spec("a1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        for (i, (user, amount)) in [("ann", 1000), ("bob", 1100), ("ann", 1300), ("cy", 1400)]
            .into_iter()
            .enumerate()
        {
            bid(&auctions, user, amount, &format!("r{i}")).await;
        }
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        settle().await;
        let boards = events.named("leaderboard");
        // Coalesced: at most one per interval (the bids' flushes may let paused time move on
        // between bids, so there may be more than one), and the last one ranks everybody.
        assert!(!boards.is_empty() && boards.len() <= 4);
        for pair in boards.windows(2) {
            let gap =
                pair[1]["server_ts"].as_u64().unwrap() - pair[0]["server_ts"].as_u64().unwrap();
            assert!(gap >= LEADERBOARD_INTERVAL.as_millis() as u64, "{boards:?}");
        }
        assert_eq!(
            boards.last().unwrap()["top"],
            serde_json::json!([
                {"user": "cy", "amount": 1400},
                {"user": "ann", "amount": 1300},
                {"user": "bob", "amount": 1100}
            ])
        );
        let sent = boards.len();
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        settle().await;
        assert_eq!(
            events.named("leaderboard").len(),
            sent,
            "nothing new, nothing sent: {:?}",
            events.named("leaderboard")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_not_met_ends_without_a_winner() {
        let (events, auctions) = fresh();
        let mut s = spec("a1");
        s.reserve = Some(50_000);
        auctions.create(s).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        bid(&auctions, "ann", 2000, "r1").await;
        tokio::time::sleep(Duration::from_millis(60_000)).await;
        settle().await;
        let ended = events.named("ended");
        assert_eq!(
            (ended[0]["winner"].clone(), ended[0]["reserve_met"].clone()),
            (Value::Null, Value::Bool(false))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_auction_whose_end_passed_while_down_ends_at_start_up() {
        let log: Arc<dyn BidLog> = Arc::new(MemoryLog::default());
        let clock = Clock::tokio(T0);
        let first_run = CancellationToken::new();
        let first;
        {
            let events = Arc::new(Recorder::default());
            let auctions = engine_at(clock, Arc::clone(&log), events, first_run.clone());
            auctions.create(spec("a1")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            first = bid(&auctions, "ann", 1500, "r1").await;
            bid(&auctions, "bob", 1600, "r2").await;
            first_run.cancel(); // the broker goes down
        }
        tokio::time::sleep(Duration::from_millis(120_000)).await;
        let events = Arc::new(Recorder::default());
        let auctions = engine_at(
            clock,
            Arc::clone(&log),
            Arc::clone(&events),
            CancellationToken::new(),
        );
        settle().await;
        let ended = events.named("ended");
        assert_eq!(ended.len(), 1, "{:?}", events.events.lock().unwrap());
        assert_eq!(
            (
                ended[0]["winner"].as_str(),
                ended[0]["final_price"].as_i64()
            ),
            (Some("bob"), Some(1600))
        );
        assert_eq!(auctions.get("a1").unwrap().status, AuctionStatus::Ended);
        // A retry of a bid placed before the restart gets exactly its first answer again.
        assert_eq!(bid(&auctions, "ann", 1500, "r1").await, first);
        assert_eq!(log.last_seq("a1").unwrap(), 2);
    }
}
