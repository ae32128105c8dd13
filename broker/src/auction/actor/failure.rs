//! When a turn cannot be made durable: memory goes back to the turn's start, its answers are
//! voided, and the actor parks (a failed store: bids refused, timers stopped, probes with a
//! growing pause) or backs off (the cluster's Redis). Also the answers given without judging.

use super::*;

/// A store failure the actor waits out.
pub(super) struct Parked {
    pub(super) probe_at: tokio::time::Instant,
    pub(super) backoff: Duration,
    /// Answers held until the undo is durable (so none says "not placed" while it may be).
    pub(super) held: Vec<Answer>,
    /// The outbox entries of the turn whose undo failed: the probe's repair removes them too
    /// (else the repair's flush would make them durable, and the next start would send them).
    pub(super) webhooks: Vec<String>,
}

impl Actor {
    /// A commit failed: memory goes back to the turn's start, and nothing the turn did is
    /// acknowledged. A store failure parks the actor; a cluster failure backs off.
    pub(super) fn failed(&mut self, judged: Judged, error: CommitError) {
        let (error, unsettled) = match error {
            CommitError::NotRecorded(error) => (error, false),
            CommitError::Unsettled(error) => (error, true),
        };
        let now = self.ledger_now();
        let webhooks: Vec<String> = judged.webhooks.iter().map(|w| w.id.clone()).collect();
        self.auction = judged.before;
        for (user, previous) in judged.undo_highest.into_iter().rev() {
            match previous {
                Some(amount) => self.highest.insert(user, amount),
                None => self.highest.remove(&user),
            };
        }
        for key in &judged.voidable_keys {
            self.outcomes.forget(key);
        }
        self.leaderboard_dirty = judged.leaderboard_dirty_before;
        self.leaderboard_sent_at = judged.leaderboard_sent_at_before;
        self.view.store(Arc::new(self.auction.snapshot(now)));
        let durable = self.durable_seq.load(Ordering::Acquire);
        let (reason, message) = refusal(&error);
        let answers: Vec<Answer> = judged
            .answers
            .into_iter()
            .map(|answer| match answer {
                Answer::Bid {
                    reply,
                    answer,
                    after_write,
                    retry,
                } => {
                    let void = after_write
                        || matches!(&answer, Reply::BidAccepted { bid_seq, .. } if *bid_seq > durable);
                    let (answer, retry) = if void {
                        let refused =
                            rejected(&self.id, request_id(&answer), reason, None, message.clone());
                        (refused, false)
                    } else {
                        (answer, retry)
                    };
                    Answer::Bid {
                        reply,
                        answer,
                        after_write,
                        retry,
                    }
                }
                Answer::Admin { reply, result } => Answer::Admin {
                    reply,
                    result: result.and_then(|_| Err(admin_error(&error))),
                },
            })
            .collect();
        match error {
            LedgerError::Storage(_) => {
                tracing::error!(auction = %self.id, %error, unsettled, "bid log failed: refusing bids until it works again");
                // The pause grows across failures until a commit succeeds, so a store that
                // passes probes but fails turns is not retried every 100 ms.
                let mut parked = Parked {
                    probe_at: tokio::time::Instant::now() + self.probe_backoff,
                    backoff: self.probe_backoff,
                    held: Vec::new(),
                    webhooks: Vec::new(),
                };
                if unsettled {
                    parked.held = answers;
                    parked.webhooks = webhooks;
                } else {
                    self.send(answers);
                }
                self.parked = Some(parked);
            }
            LedgerError::Unavailable(_) => {
                tracing::warn!(auction = %self.id, %error, "cluster commit failed: nothing of the turn is acknowledged");
                self.stale = true;
                self.back_off();
                self.send(answers);
            }
        }
    }

    /// Answers commands without judging them: the ledger could not start the turn.
    pub(super) fn refuse(&mut self, commands: Vec<Command>, error: &LedgerError) {
        // Whatever the failure, timers wait before the next try (no hot loop on a deadline
        // that has passed).
        self.back_off();
        let (reason, message) = refusal(error);
        let answers = commands
            .into_iter()
            .filter_map(|command| match command {
                Command::Bid(bid, reply) => Some(Answer::Bid {
                    answer: rejected(&self.id, &bid.request_id, reason, None, message.clone()),
                    reply,
                    after_write: false,
                    retry: false,
                }),
                Command::Admin { reply, .. } => Some(Answer::Admin {
                    reply,
                    result: Err(admin_error(error)),
                }),
                Command::Refresh(_) => None,
            })
            .collect();
        self.send(answers);
    }

    /// While parked: retries of remembered bids get their answer, everything else is refused.
    pub(super) fn answer_parked(&mut self, commands: Vec<Command>) {
        let error = LedgerError::Storage(crate::store::StorageError::Io(
            "the bid log is failing; retry later".into(),
        ));
        let (reason, message) = refusal(&error);
        let answers = commands
            .into_iter()
            .filter_map(|command| match command {
                Command::Bid(bid, reply) => {
                    let key = (bid.user, bid.request_id);
                    let (answer, retry) = match self.outcomes.get(&key) {
                        Some(first) => (first.clone(), true),
                        None => (
                            rejected(&self.id, &key.1, reason, None, message.clone()),
                            false,
                        ),
                    };
                    Some(Answer::Bid {
                        reply,
                        answer,
                        after_write: false,
                        retry,
                    })
                }
                Command::Admin { reply, .. } => Some(Answer::Admin {
                    reply,
                    result: Err(admin_error(&error)),
                }),
                Command::Refresh(_) => None,
            })
            .collect();
        self.send(answers);
    }

    /// Parked: checks whether the store works again (undoing a failed turn first if needed);
    /// if so, sends the held answers and unparks.
    pub(super) async fn probe(&mut self) {
        if self.parked.is_none() {
            return;
        }
        let ledger = Arc::clone(&self.engine.ledger);
        let webhooks = self
            .parked
            .as_ref()
            .map(|p| p.webhooks.clone())
            .unwrap_or_default();
        // A real write and flush of the durable record (also the undo of a turn whose writes
        // may still be in the store): a store that flushes but cannot write fails it.
        let result = ledger
            .repair(
                &self.id,
                self.auction.state.last_seq,
                &self.durable_record,
                &webhooks,
            )
            .await;
        let Some(parked) = self.parked.as_mut() else {
            return;
        };
        match result {
            Ok(()) => {
                tracing::info!(auction = %self.id, "bid log works again: taking bids");
                if let Some(parked) = self.parked.take() {
                    self.send(parked.held);
                }
            }
            Err(error) => {
                parked.backoff = (parked.backoff * 2).min(PROBE_MAX);
                parked.probe_at = tokio::time::Instant::now() + parked.backoff;
                self.probe_backoff = parked.backoff;
                tracing::debug!(auction = %self.id, %error, retry_in = ?parked.backoff, "bid log still failing");
            }
        }
    }

    /// Cluster mode: a turn failed; timers wait a growing backoff before the next try.
    pub(super) fn back_off(&mut self) {
        self.backoff_ms = (self.backoff_ms * 2).clamp(100, 5_000);
        self.retry_at = Some(self.ledger_now() + self.backoff_ms);
    }
}

/// The rejection a ledger failure gives a bid.
fn refusal(error: &LedgerError) -> (BidRejection, String) {
    match error {
        LedgerError::Storage(error) => (
            BidRejection::Unavailable,
            format!("the bid could not be recorded ({error}); retry later"),
        ),
        LedgerError::Unavailable(error) => (
            BidRejection::ClusterUnavailable,
            format!("the bid could not be committed: {error}"),
        ),
    }
}

fn admin_error(error: &LedgerError) -> AdminError {
    match error {
        LedgerError::Storage(error) => AdminError::Storage(error.clone()),
        LedgerError::Unavailable(error) => AdminError::Cluster(error.clone()),
    }
}

fn request_id(reply: &Reply) -> &str {
    match reply {
        Reply::BidAccepted { request_id, .. } | Reply::BidRejected { request_id, .. } => request_id,
        _ => "",
    }
}
