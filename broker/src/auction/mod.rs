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
    store: Arc<dyn BidLog>,
    durability: Durability,
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
}

fn encode(auction: &Auction) -> Result<Vec<u8>, StorageError> {
    rmp_serde::to_vec_named(auction).map_err(|e| StorageError::Corrupt(e.to_string()))
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
        let auctions = Auctions {
            map: DashMap::new(),
            store,
            durability,
            events,
            clock,
            limiter: RateLimiter::new(config.bid_rate, config.bid_burst),
            shutdown,
            creating: tokio::sync::Mutex::new(()),
            group_commit: config.group_commit,
        };
        for (id, bytes) in auctions.store.auctions()? {
            let auction: Auction = rmp_serde::from_slice(&bytes)
                .map_err(|e| StorageError::Corrupt(format!("auction {id}: {e}")))?;
            let last = auctions.store.last_seq(&id)?;
            if last != auction.state.last_seq {
                // A bid and its record are one atomic batch, so this means a damaged store.
                return Err(StorageError::Corrupt(format!(
                    "auction {id}: record says bid {} but the log ends at {last}",
                    auction.state.last_seq
                )));
            }
            let bids = auctions.store.bids(&id, 0, usize::MAX)?;
            auctions.spawn(auction, &bids);
        }
        tracing::info!(auctions = auctions.map.len(), "auctions loaded");
        Ok(auctions)
    }

    fn spawn(&self, auction: Auction, bids: &[BidRecord]) {
        let now = self.clock.now_ms();
        let snapshot = auction.snapshot(now);
        self.events
            .auction_state(&auction.spec.id, to_value(&snapshot));
        let view = Arc::new(ArcSwap::from_pointee(snapshot));
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let mut outcomes = HashMap::new();
        let mut highest = HashMap::new();
        for bid in bids {
            highest.insert(bid.user.clone(), bid.amount);
            outcomes.insert(
                (bid.user.clone(), bid.request_id.clone()),
                accepted_reply(&auction.spec.id, bid, &auction),
            );
        }
        let durable_seq = auction.state.last_seq;
        let actor = Actor {
            max_turn: match self.group_commit {
                GroupCommit::On => MAX_TURN,
                GroupCommit::Off => 1,
            },
            id: auction.spec.id.clone(),
            auction,
            commands_rx,
            store: Arc::clone(&self.store),
            durability: self.durability.clone(),
            events: Arc::clone(&self.events),
            clock: self.clock,
            view: Arc::clone(&view),
            outcomes,
            highest,
            leaderboard_dirty: false,
            failed: false,
            durable_seq,
        };
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
        self.store
            .put_auction(&auction.spec.id, &encode(&auction)?)?;
        self.durability.sync().await?;
        let snapshot = auction.snapshot(now);
        self.spawn(auction, &[]);
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
    pub fn bids(&self, id: &str, after: u64, limit: usize) -> Result<Vec<BidRecord>, AdminError> {
        if !self.map.contains_key(id) {
            return Err(AdminError::NotFound(id.to_owned()));
        }
        Ok(self.store.bids(id, after, limit)?)
    }

    /// Forgets idle rate-limit buckets.
    pub fn prune(&self) {
        self.limiter.prune(self.clock.now_ms());
    }

    /// Makes every write durable (at shutdown).
    pub async fn sync(&self) -> Result<(), StorageError> {
        self.durability.sync().await
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

struct Actor {
    /// Commands per turn (one flush per turn).
    max_turn: usize,
    id: String,
    auction: Auction,
    commands_rx: mpsc::Receiver<Command>,
    store: Arc<dyn BidLog>,
    durability: Durability,
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
            let deadline = self.auction.next_deadline();
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
                    self.turn(batch).await;
                }
                _ = tokio::time::sleep_until(wake), if deadline.is_some() => self.turn(Vec::new()).await,
                _ = leaderboard.tick(), if self.leaderboard_dirty => self.send_leaderboard(),
            }
        }
    }

    /// One turn: apply what time made due, then each command in order; write; flush once;
    /// then answer and announce, in order.
    async fn turn(&mut self, commands: Vec<Command>) {
        let now = self.clock.now_ms();
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
                            let written = encode(&self.auction)
                                .and_then(|bytes| self.store.append(&self.id, &record, &bytes));
                            if let Err(error) = written {
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
            }
        }
        if wrote {
            if let Err(error) = self.durability.sync().await {
                self.auction = before_turn;
                for (user, previous) in undo_highest.into_iter().rev() {
                    match previous {
                        Some(amount) => self.highest.insert(user, amount),
                        None => self.highest.remove(&user),
                    };
                }
                self.fail(announce, error);
                return;
            }
            self.durable_seq = self.auction.state.last_seq;
        }
        self.announce(announce, now);
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

    /// Writes the auction's record; false if the write failed.
    fn persist(&mut self) -> bool {
        let written =
            encode(&self.auction).and_then(|bytes| self.store.put_auction(&self.id, &bytes));
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
                            Change::Status { from, to } => self.events.auction_event(
                                &self.id,
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
                            Change::Updated => self.events.auction_event(
                                &self.id,
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
                                self.events.auction_event(
                                    &self.id,
                                    "ended",
                                    to_value(&ended),
                                    Some(state.clone()),
                                );
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
                    self.events.auction_event(
                        &self.id,
                        "bid_placed",
                        to_value(&placed),
                        Some(state.clone()),
                    );
                    if let Some(previous_end) = accepted.extended_from {
                        self.events.auction_event(
                            &self.id,
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
                        self.events.user_event(&leader, "outbid", to_value(&notice));
                    }
                    reply(answer);
                }
                Announce::Answer(reply, answer) => reply(answer),
                Announce::Rejected(reply, answer, key) => {
                    if let Some(key) = key {
                        self.outcomes.insert(key, answer.clone());
                    }
                    reply(answer);
                }
                Announce::Admin(reply, snapshot) => {
                    let _ = reply.send(Ok(snapshot));
                }
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

    fn send_leaderboard(&mut self) {
        self.leaderboard_dirty = false;
        let mut top: Vec<(&UserId, &i64)> = self.highest.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        top.truncate(LEADERBOARD_SIZE);
        let top: Vec<Value> = top
            .into_iter()
            .map(|(user, amount)| json!({"user": user, "amount": amount}))
            .collect();
        self.events.auction_event(
            &self.id,
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
