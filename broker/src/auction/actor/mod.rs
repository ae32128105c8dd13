//! One auction's actor: the task that owns the auction's state and judges its commands in
//! arrival order, each at the time it arrived. A turn takes what is queued, judges it, makes it
//! durable through the [`Ledger`] (one commit), and only then answers. A store that fails parks
//! the actor (no timers, bids refused) until a probe finds it working again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use gavel_protocol::{AuctionSnapshot, AuctionStatus, BidRejection, Reply, UserId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::announce;
use super::idempotency::{Key, Outcomes};
use super::ledger::{Announcement, CommitError, LedgerError, Turn};
use super::rules::{Auction, Change, SpecError};
use super::{
    accepted_reply, decode, encode, raised_max, raised_reply, rejected, AdminError, AdminOp,
    AdminReply, BidReply, Engine,
};
use crate::metrics as m;

mod failure;
mod judge;

use crate::store::{BidRecord, Outboxed};
use crate::webhooks::OutboxEntry;
use failure::Parked;

/// The leaderboard is sent at most this often per auction.
pub const LEADERBOARD_INTERVAL: Duration = Duration::from_millis(LEADERBOARD_INTERVAL_MS);
/// [`LEADERBOARD_INTERVAL`] in the ledger's milliseconds.
const LEADERBOARD_INTERVAL_MS: u64 = 500;
/// First and longest wait between probes of a failed store.
const PROBE_MIN: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(30);

/// A bid as it reached the auction.
pub struct Bid {
    pub user: UserId,
    /// The bidder's token roles (`None`: no roles claim), for the auction's `required_role`.
    pub roles: Option<Vec<String>>,
    pub amount: i64,
    /// A secret maximum (proxy bid).
    pub max_amount: Option<i64>,
    pub request_id: String,
    /// When the broker received it (this node's clock, ms): the time it is judged at.
    pub at_ms: u64,
}

pub enum Command {
    Bid(Bid, BidReply),
    Admin {
        op: AdminOp,
        at_ms: u64,
        reply: AdminReply,
    },
    /// Cluster mode: another node changed the auction (now at this version).
    Refresh(u64),
}

/// An answer, sent once the turn is settled.
enum Answer {
    Bid {
        reply: BidReply,
        answer: Reply,
        /// Judged after one of the turn's writes (it depends on them).
        after_write: bool,
        /// A retry answered from the remembered outcomes (not counted again in metrics).
        retry: bool,
    },
    Admin {
        reply: AdminReply,
        result: Result<AuctionSnapshot, AdminError>,
    },
}

/// A judged turn, before its writes are durable.
struct Judged {
    answers: Vec<Answer>,
    announcements: Vec<Announcement>,
    bids: Vec<BidRecord>,
    /// Webhooks for the outbox, written with the turn.
    webhooks: Vec<Outboxed>,
    wrote: bool,
    /// What to restore if the commit fails (memory must not run ahead of the ledger).
    before: Auction,
    undo_highest: Vec<(UserId, Option<i64>)>,
    /// Outcomes remembered in this turn whose answers a failed commit voids (accepted bids,
    /// and rejections judged after a write): forgotten if it fails.
    voidable_keys: Vec<Key>,
    /// The leaderboard's state at the turn's start: a leaderboard taken in a failed turn was
    /// not sent (or, when a cluster commit's answer was lost after it ran, was sent), so the
    /// next one must not wait an interval for it (at worst it comes early).
    leaderboard_dirty_before: Option<u64>,
    leaderboard_sent_at_before: u64,
}

impl Judged {
    /// Answers a bid the rules never saw (no role, over the rate): nothing written, nothing
    /// remembered, answered at once.
    fn refuse_unjudged(&mut self, reply: BidReply, answer: Reply) {
        self.answers.push(Answer::Bid {
            reply,
            answer,
            after_write: false,
            retry: false,
        });
    }
}

pub struct Actor {
    engine: Arc<Engine>,
    id: String,
    auction: Auction,
    /// The auction's version in the ledger this state reflects (cluster mode).
    version: u64,
    commands_rx: mpsc::Receiver<Command>,
    view: Arc<ArcSwap<AuctionSnapshot>>,
    /// The last bid seq known durable, shared with the registry (the bids API reads up to it).
    durable_seq: Arc<AtomicU64>,
    /// The auction's record as the ledger holds it (last commit or load): what a failed commit
    /// reverts to and a probe writes again, kept rather than encoded again every turn.
    durable_record: Vec<u8>,
    /// Each bidder's highest accepted bid, for the leaderboard.
    highest: HashMap<UserId, i64>,
    outcomes: Outcomes,
    /// Since when (ledger ms) accepted bids changed the leaderboard without one sent.
    leaderboard_dirty: Option<u64>,
    /// When (ledger ms) the last leaderboard was taken.
    leaderboard_sent_at: u64,
    /// Cluster mode: a commit failed; the next turn reloads the auction first.
    stale: bool,
    /// The stamp of the last command judged: stamps never go back.
    last_stamp: u64,
    /// The ledger's clock minus this node's, at the last turn (0 on one node).
    offset_ms: i64,
    /// Cluster mode: after a failed turn, when timers may try again (ledger ms), and the backoff.
    retry_at: Option<u64>,
    backoff_ms: u64,
    parked: Option<Parked>,
    /// The pause before the next probe of a failed store; reset by a successful commit.
    probe_backoff: Duration,
    /// Since when (ledger ms) the auction is over; it is archived `archive_after` later.
    over_since: Option<u64>,
    archived: bool,
}

impl Actor {
    /// An actor for `auction`, at `version` in the ledger, with its bidders' highest bids.
    pub fn new(
        engine: Arc<Engine>,
        auction: Auction,
        version: u64,
        commands_rx: mpsc::Receiver<Command>,
        view: Arc<ArcSwap<AuctionSnapshot>>,
        durable_seq: Arc<AtomicU64>,
        highest: HashMap<UserId, i64>,
    ) -> Actor {
        let now = engine.clock.now_ms();
        let durable_record = encode(&auction).unwrap_or_default();
        Actor {
            durable_record,
            engine,
            id: auction.spec.id.clone(),
            version,
            commands_rx,
            view,
            durable_seq,
            highest,
            outcomes: Outcomes::default(),
            leaderboard_dirty: None,
            leaderboard_sent_at: 0,
            stale: false,
            last_stamp: 0,
            offset_ms: 0,
            retry_at: None,
            backoff_ms: 0,
            parked: None,
            probe_backoff: PROBE_MIN,
            over_since: is_over(&auction).then_some(now),
            archived: false,
            auction,
        }
    }

    pub async fn run(mut self, stop: CancellationToken) {
        self.turn(Vec::new()).await;
        while !self.archived {
            let wake = self.next_wake();
            let board_at = self.leaderboard_at();
            tokio::select! {
                _ = stop.cancelled() => {
                    // Shutdown: take no more, answer what is queued, then stop.
                    self.commands_rx.close();
                    let mut rest = Vec::new();
                    while let Some(command) = self.commands_rx.recv().await {
                        rest.push(command);
                    }
                    self.turn(rest).await;
                    break;
                }
                command = self.commands_rx.recv() => {
                    let Some(command) = command else { break };
                    let batch = self.take_batch(vec![command]);
                    self.turn(batch).await;
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(far_future)), if wake.is_some() => {
                    let batch = self.take_batch(Vec::new());
                    if self.parked.is_some() {
                        self.probe().await;
                        self.turn(batch).await;
                    } else if batch.is_empty() && self.archive_due() {
                        self.archive().await;
                    } else {
                        self.turn(batch).await;
                    }
                }
                _ = tokio::time::sleep_until(board_at.unwrap_or_else(far_future)),
                    if board_at.is_some() && self.parked.is_none() => {
                    self.send_leaderboard();
                }
            }
        }
    }

    /// Adds what is queued (up to a turn's worth) to `batch`.
    fn take_batch(&mut self, mut batch: Vec<Command>) -> Vec<Command> {
        while batch.len() < self.engine.max_turn {
            match self.commands_rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        batch
    }

    /// When the actor must wake without a command: a probe while parked, else the auction's
    /// next deadline (after a cluster backoff), else its archiving.
    fn next_wake(&self) -> Option<tokio::time::Instant> {
        if let Some(parked) = &self.parked {
            return Some(parked.probe_at);
        }
        let ledger_ms = match self
            .auction
            .next_deadline(self.engine.ledger.close_grace_ms())
        {
            Some(deadline) => deadline.max(self.retry_at.unwrap_or(0)),
            None => {
                let over = self.over_since.filter(|_| is_over(&self.auction))?;
                over.saturating_add(self.engine.archive_after.as_millis() as u64)
                    .max(self.retry_at.unwrap_or(0))
            }
        };
        Some(self.instant_at(ledger_ms))
    }

    /// The local instant of a moment on the ledger's clock.
    fn instant_at(&self, ledger_ms: u64) -> tokio::time::Instant {
        let local_ms = ledger_ms.saturating_add_signed(-self.offset_ms);
        self.engine.clock.instant_at(local_ms)
    }

    fn ledger_now(&self) -> u64 {
        (self.engine.clock.now_ms() as i64 + self.offset_ms).max(0) as u64
    }

    /// Keeps `over_since` in step with the status: set when the auction is over (ended or
    /// cancelled), cleared otherwise.
    fn note_over(&mut self, now: u64) {
        if !is_over(&self.auction) {
            self.over_since = None;
        } else if self.over_since.is_none() {
            self.over_since = Some(now);
        }
    }

    fn archive_due(&self) -> bool {
        is_over(&self.auction)
            && self.over_since.is_some_and(|over| {
                self.ledger_now()
                    >= over.saturating_add(self.engine.archive_after.as_millis() as u64)
            })
    }

    /// One turn: catch up (cluster), look up retries, judge every command at its arrival time
    /// and time up to now, commit, answer.
    async fn turn(&mut self, commands: Vec<Command>) {
        let mut newest = None;
        let mut commands: Vec<Command> = commands
            .into_iter()
            .filter(|c| match c {
                Command::Refresh(version) => {
                    newest = newest.max(Some(*version));
                    false
                }
                _ => true,
            })
            .collect();
        if let Some(version) = newest {
            self.refresh(version).await;
            if commands.is_empty() {
                // Another node's change: nothing to judge, no turn (and no lock) needed.
                return;
            }
        }
        if self.parked.is_some() {
            if commands.iter().any(|c| matches!(c, Command::Admin { .. })) {
                // An admin acts: try the store now rather than at the next probe.
                self.probe().await;
            }
            if self.parked.is_some() {
                return self.answer_parked(commands);
            }
        }
        let ledger = Arc::clone(&self.engine.ledger);
        let start = match ledger.begin(&self.id).await {
            Ok(start) => start,
            Err(error) => return self.refuse(commands, &error),
        };
        self.offset_ms = start.now_ms as i64 - self.engine.clock.now_ms() as i64;
        if start.version != self.version || self.stale {
            if let Err(error) = self.catch_up().await {
                self.end_turn().await;
                return self.refuse(commands, &error);
            }
        }
        let keys: Vec<Key> = commands
            .iter()
            .filter_map(|c| match c {
                Command::Bid(bid, _) => Some((bid.user.clone(), bid.request_id.clone())),
                _ => None,
            })
            .collect();
        if let Err(error) = self.look_up(keys).await {
            self.end_turn().await;
            return self.refuse(std::mem::take(&mut commands), &error);
        }
        let now = start.now_ms;
        let mut judged = self.judge(commands, now);
        if !judged.wrote {
            // Nothing changed: the view (and its `server_ts`, the time of the last change)
            // stays as it is.
            self.end_turn().await;
            return self.send(judged.answers);
        }
        let record = match encode(&self.auction) {
            Ok(record) => record,
            Err(error) => {
                self.end_turn().await;
                return self.failed(judged, CommitError::NotRecorded(error.into()));
            }
        };
        let turn = Turn {
            auction: &self.id,
            version: self.version,
            record: &record,
            previous: &self.durable_record,
            previous_seq: judged.before.state.last_seq,
            bids: &judged.bids,
            webhooks: &judged.webhooks,
            announcements: std::mem::take(&mut judged.announcements),
        };
        match ledger.commit(turn).await {
            Ok(version) => {
                if let (false, Some(webhooks)) = (judged.webhooks.is_empty(), &self.engine.webhooks)
                {
                    webhooks.outbox.committed(&judged.webhooks);
                    webhooks.wake.notify_one();
                }
                self.version = version;
                self.durable_record = record;
                self.durable_seq
                    .store(self.auction.state.last_seq, Ordering::Release);
                self.retry_at = None;
                self.backoff_ms = 0;
                self.probe_backoff = PROBE_MIN;
                self.note_over(now);
                self.view.store(Arc::new(self.auction.snapshot(now)));
                self.send(judged.answers);
            }
            Err(error) => {
                if matches!(
                    &error,
                    CommitError::NotRecorded(LedgerError::Unavailable(_))
                ) {
                    // The script did not run to its end: release the lock rather than make
                    // other nodes wait out its TTL.
                    self.end_turn().await;
                }
                self.failed(judged, error)
            }
        }
    }

    async fn end_turn(&mut self) {
        if let Err(error) = self.engine.ledger.end_turn(&self.id).await {
            tracing::warn!(auction = %self.id, %error, "ending a turn failed (the lock expires)");
        }
    }

    /// Finds in the ledger the bids behind retries this actor does not remember, so a retry of
    /// an old bid gets its first answer.
    async fn look_up(&mut self, mut keys: Vec<Key>) -> Result<(), LedgerError> {
        keys.retain(|key| !self.outcomes.contains(key));
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Ok(());
        }
        let found = self.engine.ledger.find_bids(&self.id, &keys).await?;
        for (key, bid) in keys.into_iter().zip(found) {
            let reply = match bid {
                Some(bid) => accepted_reply(&self.id, &bid, &self.auction),
                // Not a bid: perhaps a raise of the bidder's maximum (kept in the state).
                None => match self.auction.state.raise_of(&key.0, &key.1) {
                    Some(raised) => raised_reply(&self.id, raised),
                    None => continue,
                },
            };
            self.outcomes.remember(key, reply);
        }
        Ok(())
    }

    /// Sends answers, counting each bid's outcome.
    fn send(&self, answers: Vec<Answer>) {
        for answer in answers {
            match answer {
                Answer::Bid {
                    reply,
                    answer,
                    retry,
                    ..
                } => {
                    if !retry {
                        let outcome = match &answer {
                            Reply::BidRejected { reason, .. } => reason.as_str(),
                            _ => "accepted",
                        };
                        metrics::counter!(m::BIDS, "outcome" => outcome).increment(1);
                    }
                    reply(answer);
                }
                Answer::Admin { reply, result } => {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Reloads the auction from the ledger: everything after a failed commit, else what other
    /// nodes committed since this actor's state.
    async fn catch_up(&mut self) -> Result<(), LedgerError> {
        let ledger = Arc::clone(&self.engine.ledger);
        let stored = ledger
            .load(&self.id)
            .await?
            .ok_or_else(|| LedgerError::Unavailable(format!("auction {} vanished", self.id)))?;
        let auction = decode(&self.id, &stored.record)?;
        // The outcomes stay: a failed turn already forgot the answers it voided.
        let after = if self.stale {
            self.highest.clear();
            0
        } else {
            self.auction.state.last_seq
        };
        for bid in ledger.bids(&self.id, after, usize::MAX).await? {
            self.highest.insert(bid.user, bid.amount);
        }
        self.auction = auction;
        self.durable_record = stored.record;
        self.version = stored.version;
        self.durable_seq
            .store(self.auction.state.last_seq, Ordering::Release);
        self.stale = false;
        self.note_over(self.ledger_now());
        self.view
            .store(Arc::new(self.auction.snapshot(self.ledger_now())));
        Ok(())
    }

    /// Cluster mode: another node committed a change; catch up without the lock, so this
    /// node's view and timers follow.
    async fn refresh(&mut self, version: u64) {
        if version <= self.version && !self.stale {
            return;
        }
        if let Err(error) = self.catch_up().await {
            tracing::debug!(auction = %self.id, %error, "refresh failed; the next turn catches up");
        }
    }

    /// Archives the auction: its record and bids stay in the ledger, its task, queue and room
    /// go. Later bids and retries are answered from the ledger by the registry.
    async fn archive(&mut self) {
        if let Err(error) = self.engine.ledger.archive(&self.id).await {
            tracing::warn!(auction = %self.id, %error, "archiving failed; retrying later");
            self.back_off();
            return;
        }
        self.engine.map.remove(&self.id);
        self.commands_rx.close();
        let mut rest = Vec::new();
        while let Ok(command) = self.commands_rx.try_recv() {
            rest.push(command);
        }
        if !rest.is_empty() {
            self.turn(rest).await;
        }
        tracing::debug!(auction = %self.id, "archived");
        self.archived = true;
    }

    fn leaderboard(&mut self, now: u64) -> Option<Announcement> {
        self.leaderboard_dirty = None;
        self.leaderboard_sent_at = now;
        let state = &self.auction.state;
        announce::leaderboard(
            &self.id,
            &self.highest,
            state.leader.as_ref(),
            state.ends_at,
            now,
        )
    }

    /// Whether a leaderboard may go out at `now` (ledger ms): bids changed it, and the last
    /// one is at least [`LEADERBOARD_INTERVAL`] old.
    fn leaderboard_due(&self, now: u64) -> bool {
        self.leaderboard_dirty.is_some()
            && now >= self.leaderboard_sent_at + LEADERBOARD_INTERVAL_MS
    }

    /// When the timer sends a pending leaderboard that no turn with bids took along: an
    /// interval after the change (and after the last one sent).
    fn leaderboard_at(&self) -> Option<tokio::time::Instant> {
        let since = self.leaderboard_dirty?.max(self.leaderboard_sent_at);
        Some(self.instant_at(since + LEADERBOARD_INTERVAL_MS))
    }

    fn send_leaderboard(&mut self) {
        let now = self.ledger_now();
        let board = self.leaderboard(now);
        self.engine.ledger.announce(board.into_iter().collect());
    }
}

fn is_over(auction: &Auction) -> bool {
    matches!(
        auction.state.status,
        AuctionStatus::Ended | AuctionStatus::Cancelled
    )
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}
