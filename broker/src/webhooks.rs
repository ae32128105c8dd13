//! Results to the backend: signed JSON webhooks (`auction.ended`, and `bid.accepted` with
//! `--webhook-bids`) from a durable outbox in the bid log's store. The auction engine only makes
//! [`OutboxEntry`]s, written in the same atomic batch as the turn that caused them; the
//! [`Deliverer`] POSTs them, at least once, with exponential backoff, across restarts.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use gavel_protocol::Ended;
use hmac::{Hmac, Mac};
use hyper::Uri;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::metrics as m;
use crate::store::{BidLog, BidRecord, Outboxed, StorageError};

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "gavel-signature";
/// The webhook's id, the same on every attempt: what the backend dedupes on.
pub const ID_HEADER: &str = "idempotency-key";
/// The first retry comes this long after a failure; each next one twice as long after.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How often the outbox is looked at when nothing wakes the deliverer.
const POLL: Duration = Duration::from_secs(1);

/// Where and how webhooks go (`--webhook-*`).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub url: Uri,
    pub secret: String,
    /// Also one webhook per accepted bid.
    pub bids: bool,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// The HTTP(S) client.
    pub backend: crate::backend_http::Backend,
}

/// What the auction engine needs to know of webhooks: whether accepted bids are reported too,
/// what wakes the deliverer after a turn wrote some, and where they wait.
#[derive(Clone)]
pub struct Reporting {
    pub bids: bool,
    pub wake: Arc<Notify>,
    pub outbox: Arc<dyn Outbox>,
}

impl std::fmt::Debug for Reporting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporting")
            .field("bids", &self.bids)
            .finish()
    }
}

/// An outbox call in flight.
pub type OutboxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Where webhooks wait until delivered: the bid log's store on one node ([`LocalOutbox`]),
/// Redis in a cluster. The turns that cause them write them (through the ledger); the
/// deliverer reads, updates and removes them here.
pub trait Outbox: Send + Sync + 'static {
    /// Every webhook not delivered yet whose turn is durable.
    fn pending(&self) -> OutboxFuture<'_, Vec<Outboxed>>;
    /// The turn that wrote `webhooks` is durable (its commit returned): they may go out. An
    /// outbox whose writes are readable only once durable (Redis, where the turn's script
    /// writes them with everything else) needs nothing here.
    fn committed(&self, _webhooks: &[Outboxed]) {}
    /// Takes the right to attempt `id` now. One node: always. A cluster: one node at a time,
    /// for a while (a lease), so nodes do not deliver the same webhook together.
    fn claim<'a>(&'a self, _id: &'a str) -> OutboxFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(true)))
    }
    /// Records a failed attempt (unless the webhook was delivered meanwhile).
    fn update<'a>(&'a self, webhook: &'a Outboxed) -> OutboxFuture<'a, ()>;
    /// Removes a delivered webhook.
    fn delivered<'a>(&'a self, id: &'a str) -> OutboxFuture<'a, ()>;
}

/// The outbox of a single node: in the bid log (written there by the turns, atomically).
///
/// The store shows a turn's writes before the flush that makes them durable, and a turn whose
/// flush fails is undone; so only webhooks known durable go out: those in the outbox at start
/// (what the store recovered is on disk) and those of turns whose commit returned
/// ([`Outbox::committed`]). Otherwise a webhook could report a bid that a crash or a failed
/// flush then took back, and its id (the auction and seq) would go to another bid.
pub struct LocalOutbox {
    log: Arc<dyn BidLog>,
    durable: Mutex<HashSet<String>>,
}

impl LocalOutbox {
    /// The outbox in `log`: what it holds now is durable (call before any turn runs).
    pub fn open(log: Arc<dyn BidLog>) -> Result<LocalOutbox, StorageError> {
        let durable = log.outbox()?.into_iter().map(|w| w.id).collect();
        Ok(LocalOutbox {
            log,
            durable: Mutex::new(durable),
        })
    }

    fn is_durable(&self, id: &str) -> bool {
        self.durable.lock().is_ok_and(|ids| ids.contains(id))
    }
}

impl Outbox for LocalOutbox {
    fn pending(&self) -> OutboxFuture<'_, Vec<Outboxed>> {
        let pending = self
            .log
            .outbox()
            .map(|all| all.into_iter().filter(|w| self.is_durable(&w.id)).collect())
            .map_err(|e| e.to_string());
        Box::pin(std::future::ready(pending))
    }

    fn committed(&self, webhooks: &[Outboxed]) {
        if let Ok(mut ids) = self.durable.lock() {
            ids.extend(webhooks.iter().map(|w| w.id.clone()));
        }
    }

    fn update<'a>(&'a self, webhook: &'a Outboxed) -> OutboxFuture<'a, ()> {
        // Only a webhook still pending: one delivered meanwhile is not written back.
        let updated = if self.is_durable(&webhook.id) {
            self.log.put_outbox(&webhook.id, &webhook.entry)
        } else {
            Ok(())
        };
        Box::pin(std::future::ready(updated.map_err(|e| e.to_string())))
    }

    fn delivered<'a>(&'a self, id: &'a str) -> OutboxFuture<'a, ()> {
        let removed = self.log.remove_outbox(id);
        if removed.is_ok() {
            if let Ok(mut ids) = self.durable.lock() {
                ids.remove(id);
            }
        }
        Box::pin(std::future::ready(removed.map_err(|e| e.to_string())))
    }
}

/// One webhook waiting in the outbox (stored as JSON under its id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// `auction.ended/{auction}` or `bid.accepted/{auction}/{bid_seq}`: stable across retries
    /// and restarts, sent as `Idempotency-Key`.
    pub id: String,
    pub auction_id: String,
    /// The exact body POSTed on every attempt.
    pub body: String,
    pub attempts: u32,
    /// When the next attempt is due (ms since the Unix epoch; 0: now).
    pub next_attempt_at: u64,
    pub last_error: Option<String>,
}

impl OutboxEntry {
    fn new(id: String, auction_id: &str, kind: &str, now: u64, data: Value) -> OutboxEntry {
        let body = json!({ "id": id, "type": kind, "created_at": now, "data": data }).to_string();
        OutboxEntry {
            id,
            auction_id: auction_id.to_owned(),
            body,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
        }
    }

    /// `auction.ended`: winner, final price, reserve met or not, bid count.
    pub fn ended(ended: &Ended, now: u64) -> OutboxEntry {
        let id = format!("auction.ended/{}", ended.auction_id);
        let data = serde_json::to_value(ended).unwrap_or(Value::Null);
        OutboxEntry::new(id, &ended.auction_id, "auction.ended", now, data)
    }

    /// `bid.accepted`: one durable bid (automatic ones included; never a maximum).
    pub fn bid(auction_id: &str, bid: &BidRecord, now: u64) -> OutboxEntry {
        let id = format!("bid.accepted/{auction_id}/{}", bid.seq);
        let data = json!({
            "auction_id": auction_id,
            "bid_seq": bid.seq,
            "amount": bid.amount,
            "bidder": bid.user,
            "automatic": bid.automatic,
            "server_ts": bid.ts,
        });
        OutboxEntry::new(id, auction_id, "bid.accepted", now, data)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The entry as the store keeps it.
    pub fn outboxed(&self) -> Outboxed {
        Outboxed {
            id: self.id.clone(),
            entry: self.encode(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<OutboxEntry> {
        serde_json::from_slice(bytes).ok()
    }

    /// What `GET /api/auctions/{id}` shows of a webhook not delivered yet.
    pub fn status_view(&self) -> Value {
        json!({
            "id": self.id,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
        })
    }
}

/// The `Gavel-Signature` value for `body` sent at `t` (unix seconds).
pub fn signature(secret: &[u8], t: u64, body: &str) -> String {
    format!("t={t},v1={}", hex(&mac(secret, t, body)))
}

/// Checks a `Gavel-Signature` value against `body`, as a backend would (without the freshness
/// check of `t`, which is the backend's policy).
pub fn verify(secret: &[u8], header: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(mut check) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    check.update(format!("{t}.{body}").as_bytes());
    let Some(expected) = unhex(v1) else {
        return false;
    };
    check.verify_slice(&expected).is_ok()
}

fn mac(secret: &[u8], t: u64, body: &str) -> Vec<u8> {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    text.len()
        .is_multiple_of(2)
        .then(|| {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten()
}

/// The wait before attempt `attempts + 1`, after `attempts` failures.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(max)
}

/// Delivers the outbox: woken after every durable turn that added webhooks, and once a second.
pub struct Deliverer {
    outbox: Arc<dyn Outbox>,
    config: WebhookConfig,
    clock: Clock,
    wake: Arc<Notify>,
}

impl Deliverer {
    /// Starts delivering in the background until `stop`; the returned `Notify` wakes it.
    pub fn start(
        outbox: Arc<dyn Outbox>,
        config: WebhookConfig,
        clock: Clock,
        stop: CancellationToken,
    ) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        let deliverer = Deliverer {
            outbox,
            config,
            clock,
            wake: Arc::clone(&wake),
        };
        tokio::spawn(async move { deliverer.run(stop).await });
        wake
    }

    /// Keeps up to `concurrency` attempts in flight, so one slow answer (or an attempt waiting
    /// out its timeout) holds up no other webhook; reads the outbox again when a turn wrote
    /// webhooks (`wake`) and every [`POLL`] (for retries whose backoff is over). Webhooks
    /// carry no order between them: a failed one is retried later anyway.
    async fn run(&self, stop: CancellationToken) {
        let mut due: VecDeque<OutboxEntry> = VecDeque::new();
        let mut in_flight = FuturesUnordered::new();
        let mut flying: HashSet<String> = HashSet::new();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut look = true;
        loop {
            if look {
                look = false;
                due = self.due(&flying).await;
            }
            while in_flight.len() < self.config.concurrency.max(1) {
                let Some(entry) = due.pop_front() else { break };
                flying.insert(entry.id.clone());
                in_flight.push(self.deliver(entry));
            }
            tokio::select! {
                () = stop.cancelled() => return,
                Some(id) = in_flight.next(), if !in_flight.is_empty() => {
                    flying.remove(&id);
                }
                () = self.wake.notified() => look = true,
                _ = poll.tick() => look = true,
            }
        }
    }

    /// The outbox's entries that are due and not in flight here, oldest attempt first.
    async fn due(&self, flying: &HashSet<String>) -> VecDeque<OutboxEntry> {
        let entries = match self.outbox.pending().await {
            Ok(entries) => entries
                .iter()
                .filter_map(|stored| OutboxEntry::decode(&stored.entry))
                .collect::<Vec<_>>(),
            Err(error) => {
                tracing::error!(%error, "cannot read the webhook outbox");
                return VecDeque::new();
            }
        };
        metrics::gauge!(m::WEBHOOK_PENDING).set(entries.len() as f64);
        let now = self.clock.now_ms();
        let mut due: Vec<OutboxEntry> = entries
            .into_iter()
            .filter(|e| e.next_attempt_at <= now && !flying.contains(&e.id))
            .collect();
        due.sort_by_key(|e| e.next_attempt_at);
        due.into()
    }

    /// One attempt at `entry`, if this node wins its claim; the outcome recorded. Returns the
    /// entry's id.
    async fn deliver(&self, mut entry: OutboxEntry) -> String {
        match self.outbox.claim(&entry.id).await {
            Ok(true) => {}
            // Another node is attempting it.
            Ok(false) => return entry.id,
            Err(error) => {
                tracing::warn!(%error, "cannot claim a webhook");
                return entry.id;
            }
        }
        let started = Instant::now();
        let result = self.attempt(&entry).await;
        metrics::histogram!(m::WEBHOOK_SECONDS).record(started.elapsed());
        let outcome = match result {
            Ok(()) => {
                if let Err(error) = self.outbox.delivered(&entry.id).await {
                    tracing::error!(%error, id = entry.id, "cannot clear a delivered webhook");
                }
                "delivered"
            }
            Err(error) => {
                entry.attempts = entry.attempts.saturating_add(1);
                let wait = backoff(entry.attempts, self.config.max_backoff);
                entry.next_attempt_at = self.clock.now_ms() + wait.as_millis() as u64;
                tracing::warn!(id = entry.id, attempts = entry.attempts, %error, ?wait,
                    "webhook delivery failed; retrying later");
                entry.last_error = Some(error);
                if let Err(error) = self.outbox.update(&entry.outboxed()).await {
                    tracing::error!(%error, id = entry.id, "cannot record a webhook attempt");
                }
                "failed"
            }
        };
        metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => outcome).increment(1);
        entry.id
    }

    /// One POST; `Ok` on any 2xx answer.
    async fn attempt(&self, entry: &OutboxEntry) -> Result<(), String> {
        let t = self.clock.now_ms() / 1000;
        let headers = [
            (
                SIGNATURE_HEADER,
                signature(self.config.secret.as_bytes(), t, &entry.body),
            ),
            (ID_HEADER, entry.id.clone()),
            ("user-agent", format!("gavel/{}", env!("CARGO_PKG_VERSION"))),
        ];
        let call = (self.config.backend).post_json(&self.config.url, &headers, entry.body.clone());
        match tokio::time::timeout(self.config.timeout, call).await {
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
            Ok(Err(error)) => Err(error),
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, _))) => Err(format!("status {}", status.as_u16())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_does_not() {
        let header = signature(b"whsec-test", 1_795_333_703, r#"{"id":"x"}"#);
        assert!(header.starts_with("t=1795333703,v1="));
        assert!(verify(b"whsec-test", &header, r#"{"id":"x"}"#));
        assert!(!verify(b"whsec-test", &header, r#"{"id":"y"}"#));
        assert!(!verify(b"other-secret", &header, r#"{"id":"x"}"#));
        assert!(!verify(b"whsec-test", "t=1,v1=zz", r#"{"id":"x"}"#));
    }

    /// The test vector of docs/protocol.md §11 (Webhooks).
    #[test]
    fn the_documented_test_vector_holds() {
        let body = r#"{"id":"auction.ended/42","type":"auction.ended","created_at":1795334200012,"data":{"auction_id":"42","winner":"u7","final_price":125000,"reserve_met":true,"bid_count":33,"ends_at":1795334200000,"server_ts":1795334200012}}"#;
        assert_eq!(
            signature(b"whsec-test-0123456789", 1_795_334_201, body),
            "t=1795334201,v1=a3e69d5f7783b34e022063d97044773525af55dd71d429f3662fa775a1fb598e"
        );
    }

    /// What the store shows before a turn's flush returns is not sent: only what was there at
    /// start and what turns committed. An undone turn's webhook is never sent nor written back.
    #[tokio::test]
    async fn only_webhooks_of_durable_turns_go_out() {
        let dir = crate::store::tests::tempdir();
        let log: Arc<dyn BidLog> = Arc::new(crate::store::SledLog::open(&dir).unwrap());
        let webhook = |id: &str| Outboxed {
            id: id.to_owned(),
            entry: id.as_bytes().to_vec(),
        };
        let ids = |pending: Result<Vec<Outboxed>, String>| {
            let mut ids: Vec<String> = pending.unwrap().into_iter().map(|w| w.id).collect();
            ids.sort();
            ids
        };
        log.append("a", &[], b"one", &[webhook("recovered")])
            .unwrap();
        let outbox = LocalOutbox::open(Arc::clone(&log)).unwrap();

        // A turn written whose commit has not returned (its flush runs, or failed).
        log.append("a", &[], b"two", &[webhook("flushing")])
            .unwrap();
        assert_eq!(ids(outbox.pending().await), ["recovered"]);
        outbox.committed(&[webhook("flushing")]);
        assert_eq!(ids(outbox.pending().await), ["flushing", "recovered"]);

        // A turn undone after its flush failed: a late failed attempt does not write it back.
        log.append("a", &[], b"three", &[webhook("undone")])
            .unwrap();
        log.revert("a", 0, b"two", &["undone".to_owned()]).unwrap();
        outbox.update(&webhook("undone")).await.unwrap();
        assert!(log.outbox().unwrap().iter().all(|w| w.id != "undone"));

        outbox.delivered("recovered").await.unwrap();
        assert_eq!(ids(outbox.pending().await), ["flushing"]);
        drop(outbox);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cap = Duration::from_secs(60);
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
