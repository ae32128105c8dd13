//! What a turn decides, before anything is durable: each command judged against the rules at
//! its arrival time (bids, admin operations), and the events and answers that follow from it.

use super::*;

impl Actor {
    /// Judges the commands in order, each at its arrival time, then lets time run to `now`.
    pub(super) fn judge(&mut self, commands: Vec<Command>, now: u64) -> Judged {
        let mut judged = Judged {
            answers: Vec::with_capacity(commands.len()),
            announcements: Vec::new(),
            bids: Vec::new(),
            webhooks: Vec::new(),
            wrote: false,
            before: self.auction.clone(),
            undo_highest: Vec::new(),
            voidable_keys: Vec::new(),
            leaderboard_dirty_before: self.leaderboard_dirty,
            leaderboard_sent_at_before: self.leaderboard_sent_at,
        };
        let mut last = self.last_stamp.min(now);
        for command in commands {
            let arrived = match &command {
                Command::Bid(bid, _) => bid.at_ms,
                Command::Admin { at_ms, .. } => *at_ms,
                Command::Refresh(_) => continue,
            };
            // On the ledger's clock, never before the previous command, never after now.
            let stamp = arrived
                .saturating_add_signed(self.offset_ms)
                .max(last)
                .min(now);
            last = stamp;
            self.advance_to(stamp, &mut judged);
            match command {
                Command::Bid(bid, reply) => self.judge_bid(bid, stamp, reply, &mut judged),
                Command::Admin { op, reply, .. } => {
                    let result = self.apply(op, stamp);
                    let result = match result {
                        Ok(changes) => {
                            self.push_changes(changes, stamp, &mut judged);
                            judged.wrote = true;
                            Ok(self.auction.snapshot(stamp))
                        }
                        Err(error) => Err(error),
                    };
                    judged.answers.push(Answer::Admin { reply, result });
                }
                Command::Refresh(_) => {}
            }
        }
        let moved = self.advance_to(now, &mut judged);
        if !judged.bids.is_empty() && self.leaderboard_due(now) {
            // Due: it rides along with the turn's bids and reaches each viewer in the same
            // write (sent on its own, it was about a quarter of all writes at 5 bids/s per
            // auction).
            judged.announcements.extend(self.leaderboard(now));
        }
        // Whatever comes later is judged after everything this turn let happen: its last
        // command, and the time it ran to when that changed the auction (a start, an end).
        // Not otherwise: in a cluster a turn's `now` is when it got the lock, and a bid that
        // arrived while it waited must still be judged at its arrival (before an end, say).
        self.last_stamp = if moved { last.max(now) } else { last };
        judged
    }

    /// Lets time run to `at`; whether that changed the auction.
    fn advance_to(&mut self, at: u64, judged: &mut Judged) -> bool {
        let grace = self.engine.ledger.close_grace_ms();
        let changes = self.auction.advance_with_grace(at, grace);
        if changes.is_empty() {
            return false;
        }
        self.push_changes(changes, at, judged);
        judged.wrote = true;
        true
    }

    fn push_changes(&mut self, changes: Vec<Change>, at: u64, judged: &mut Judged) {
        if self.leaderboard_dirty.is_some() && changes.iter().any(|c| matches!(c, Change::Ended(_)))
        {
            // The final leaderboard comes before the end.
            judged.announcements.extend(self.leaderboard(at));
        }
        let snapshot = self.auction.snapshot(at);
        self.report_end(&changes, at, judged);
        judged
            .announcements
            .extend(announce::changes(&self.id, changes, &snapshot, at));
    }

    /// `auction.ended` for the backend (with `--webhook-url`), written with the turn.
    fn report_end(&self, changes: &[Change], at: u64, judged: &mut Judged) {
        if self.engine.webhooks.is_none() {
            return;
        }
        for change in changes {
            if let Change::Ended(ended) = change {
                judged
                    .webhooks
                    .push(OutboxEntry::ended(ended, at).outboxed());
            }
        }
    }

    fn judge_bid(&mut self, bid: Bid, at: u64, reply: BidReply, judged: &mut Judged) {
        let key: Key = (bid.user, bid.request_id);
        if let Some(first) = self.outcomes.get(&key) {
            judged.answers.push(Answer::Bid {
                reply,
                answer: first.clone(),
                after_write: judged.wrote,
                retry: true,
            });
            return;
        }
        let (user, request_id) = key;
        // The auction's required role (e.g. `verified`): refused like a missing `bidder` role,
        // not remembered and not charged.
        if !self.auction.admits(bid.roles.as_deref()) {
            let role = self.auction.spec.required_role.clone().unwrap_or_default();
            let message = format!("this auction takes bids only from users with the role {role}");
            let answer = rejected(
                &self.id,
                &request_id,
                BidRejection::Forbidden,
                None,
                message,
            );
            return judged.refuse_unjudged(reply, answer);
        }
        // Charged only now, after the retry check: a retry of an answered bid costs nothing.
        if !self.engine.limiter.allow(&user, self.engine.clock.now_ms()) {
            let message = "too many bids; slow down".into();
            let answer = rejected(
                &self.id,
                &request_id,
                BidRejection::RateLimited,
                None,
                message,
            );
            return judged.refuse_unjudged(reply, answer);
        }
        // In cluster mode another node may have opened the auction on Redis's clock after
        // this bid's stamp: a bid of an open auction is never older than its opening.
        let at = if self.auction.state.status == AuctionStatus::Active {
            at.max(self.auction.spec.starts_at)
        } else {
            at
        };
        match self
            .auction
            .place_bid_with_max(&user, bid.amount, bid.max_amount, at)
        {
            Ok(accepted) => {
                let ends_at = self.auction.state.ends_at;
                let answered_with = self.auction.state.price.filter(|_| !accepted.leading);
                let records: Vec<BidRecord> = accepted
                    .placed
                    .iter()
                    .map(|placed| BidRecord {
                        seq: placed.seq,
                        user: placed.user.clone(),
                        // The buy-now price when the bid met it, else what the rules placed.
                        amount: placed.amount,
                        request_id: if placed.own {
                            request_id.clone()
                        } else {
                            String::new()
                        },
                        ts: at,
                        ends_at,
                        automatic: placed.automatic,
                        max_amount: accepted.max_amount.filter(|_| placed.own),
                        answered_with: answered_with.filter(|_| placed.own),
                    })
                    .collect();
                let answer = match records.iter().find(|r| r.has_request()) {
                    Some(own) => accepted_reply(&self.id, own, &self.auction),
                    // A leader raised their maximum: nothing placed; the answer is kept with
                    // the auction (written with this turn) for retries.
                    None => {
                        let raised = raised_max(&request_id, &accepted, &self.auction, at);
                        let reply = raised_reply(&self.id, &raised);
                        self.auction.state.raises.insert(user.clone(), raised);
                        reply
                    }
                };
                let key = (user.clone(), request_id);
                self.outcomes.remember(key.clone(), answer.clone());
                judged.voidable_keys.push(key);
                for record in &records {
                    let previous = self.highest.insert(record.user.clone(), record.amount);
                    judged.undo_highest.push((record.user.clone(), previous));
                }
                if !records.is_empty() {
                    self.leaderboard_dirty.get_or_insert(at);
                }
                let snapshot = self.auction.snapshot(at);
                judged.announcements.extend(announce::bid(
                    &self.id,
                    &accepted,
                    &records,
                    &snapshot,
                    &self.auction,
                ));
                if self.engine.webhooks.as_ref().is_some_and(|w| w.bids) {
                    for record in &records {
                        let entry = OutboxEntry::bid(&self.id, record, at);
                        judged.webhooks.push(entry.outboxed());
                    }
                }
                if !accepted.bought.is_empty() {
                    // Bought now: the auction ended with this bid (the final leaderboard
                    // before the end, as at any end: nothing follows `ended`).
                    self.push_changes(accepted.bought.clone(), at, judged);
                }
                judged.bids.extend(records);
                // A raised maximum is in the record: written too.
                judged.wrote = true;
                judged.answers.push(Answer::Bid {
                    reply,
                    answer,
                    after_write: true,
                    retry: false,
                });
            }
            Err(rejection) => {
                let answer = rejected(
                    &self.id,
                    &request_id,
                    rejection.reason,
                    rejection.min_amount,
                    rejection.message,
                );
                // The rules' rejections are final for this request id (docs/protocol.md §4.10).
                let key = (user, request_id);
                self.outcomes.remember(key.clone(), answer.clone());
                if judged.wrote {
                    judged.voidable_keys.push(key);
                }
                judged.answers.push(Answer::Bid {
                    reply,
                    answer,
                    after_write: judged.wrote,
                    retry: false,
                });
            }
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
            // In a close's grace period (a cluster) the auction's end has come, though it is
            // not closed yet: it is answered as over, as on one node, where it is closed.
            AdminOp::Pause | AdminOp::Cancel | AdminOp::EndNow if self.past_its_end(now) => {
                return Err(SpecError::WrongStatus(
                    AuctionStatus::Ended.as_str(),
                    "the auction has ended",
                )
                .into());
            }
            AdminOp::Pause => self.auction.pause(now)?,
            AdminOp::Resume => self.auction.resume(now)?,
            AdminOp::Cancel => self.auction.cancel()?,
            AdminOp::EndNow => self.auction.end_now(now)?,
        })
    }

    /// Active, with its end come (only in a cluster's close grace period).
    fn past_its_end(&self, now: u64) -> bool {
        self.auction.state.status == AuctionStatus::Active && now >= self.auction.state.ends_at
    }
}
