//! What a run measured: latency histograms (HdrHistogram, microseconds, sharded so thousands
//! of tasks can record without contending), counters, and the report built from them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::scenario::{Metric, Scenario, Slo, Stat};

/// Shards per histogram.
const SHARDS: usize = 16;
/// Largest latency recorded (longer ones are clamped): one minute.
const MAX_MICROS: u64 = 60_000_000;

/// One latency metric, recorded from many tasks.
pub struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latency {
    fn new() -> Latency {
        Latency {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(
                        Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("histogram bounds"),
                    )
                })
                .collect(),
        }
    }

    /// Records one latency; `shard` spreads writers (any number).
    pub fn record(&self, shard: usize, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        if let Ok(mut h) = self.shards[shard % SHARDS].lock() {
            let _ = h.record(micros);
        }
    }

    /// Records `count` latencies of `micros` (merging another process's histogram).
    pub fn record_n(&self, micros: u64, count: u64) {
        if let Ok(mut h) = self.shards[0].lock() {
            let _ = h.record_n(micros.clamp(1, MAX_MICROS), count);
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("histogram bounds");
        for shard in &self.shards {
            if let Ok(h) = shard.lock() {
                let _ = all.add(&*h);
            }
        }
        all
    }
}

/// Everything counted during a run.
pub struct Stats {
    pub connect: Latency,
    pub subscribe: Latency,
    pub bid_ack: Latency,
    pub delivery: Latency,
    pub chat: Latency,
    pub chat_sent: AtomicU64,
    pub chat_published: AtomicU64,
    pub chat_received: AtomicU64,
    pub typing_sent: AtomicU64,
    pub typing_received: AtomicU64,
    pub viewers_connected: AtomicU64,
    pub bidders_connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub bids_sent: AtomicU64,
    pub bids_accepted: AtomicU64,
    pub deliveries: AtomicU64,
    pub gaps: AtomicU64,
    /// Bids sent more than 1 ms after their due time: the loadgen itself was behind.
    pub behind_schedule: AtomicU64,
    pub reconnects: AtomicU64,
    pub recovered: AtomicU64,
    pub not_recovered: AtomicU64,
    /// The latest a bid was sent after its due time.
    pub max_lag_micros: AtomicU64,
    pub rejections: Mutex<BTreeMap<String, u64>>,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub disconnects: Mutex<BTreeMap<u16, u64>>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            connect: Latency::new(),
            subscribe: Latency::new(),
            bid_ack: Latency::new(),
            delivery: Latency::new(),
            chat: Latency::new(),
            chat_sent: AtomicU64::new(0),
            chat_published: AtomicU64::new(0),
            chat_received: AtomicU64::new(0),
            typing_sent: AtomicU64::new(0),
            typing_received: AtomicU64::new(0),
            viewers_connected: AtomicU64::new(0),
            bidders_connected: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            bids_sent: AtomicU64::new(0),
            bids_accepted: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            behind_schedule: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            not_recovered: AtomicU64::new(0),
            max_lag_micros: AtomicU64::new(0),
            rejections: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            disconnects: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn latency(&self, metric: Metric) -> &Latency {
        match metric {
            Metric::Connect => &self.connect,
            Metric::Subscribe => &self.subscribe,
            Metric::BidAck => &self.bid_ack,
            Metric::Delivery => &self.delivery,
            Metric::Chat => &self.chat,
        }
    }

    pub fn count<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
        if let Ok(mut m) = map.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn stat_of(h: &Histogram<u64>, stat: Stat) -> Option<u64> {
    if h.is_empty() {
        return None;
    }
    Some(match stat {
        Stat::Quantile(q) => h.value_at_quantile(q),
        Stat::Max => h.max(),
    })
}

fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
        // The merged histogram itself: [value in µs, count] for every recorded value.
        "buckets_us": h.iter_recorded().map(|v| json!([v.value_iterated_to(), v.count_at_value()])).collect::<Vec<_>>(),
    })
}

/// A finished run.
pub struct Report {
    pub json: Value,
    pub table: String,
    pub slo_met: bool,
}

/// Viewers and accepted bids per auction: what deliveries are due.
#[derive(Clone, Debug, Default)]
pub struct Parts {
    pub watching: Vec<u64>,
    pub accepted: Vec<u64>,
}

impl Parts {
    /// Every accepted bid of an auction is due to every viewer of that auction.
    pub fn expected(&self) -> u64 {
        self.watching
            .iter()
            .zip(&self.accepted)
            .map(|(w, a)| w * a)
            .sum()
    }
}

/// Builds the report.
pub fn report(scenario: &Scenario, stats: &Stats, elapsed: Duration, parts: &Parts) -> Report {
    let expected = parts.expected();
    let histograms: Vec<(Metric, Histogram<u64>)> = Metric::ALL
        .into_iter()
        .map(|m| (m, stats.latency(m).merged()))
        .collect();
    let mut slo_results = Vec::new();
    let mut slo_met = true;
    for Slo {
        text,
        metric,
        stat,
        limit,
    } in &scenario.slos
    {
        let h = &histograms
            .iter()
            .find(|(m, _)| m == metric)
            .expect("every metric")
            .1;
        let value = stat_of(h, *stat);
        // No data is a miss: an objective is never met by measuring nothing.
        let pass = value.is_some_and(|v| v <= limit.as_micros() as u64);
        slo_met &= pass;
        slo_results.push(json!({"slo": text, "value_ms": value.map(ms), "pass": pass}));
    }
    let received = stats.deliveries.load(Ordering::Relaxed);
    let gaps = stats.gaps.load(Ordering::Relaxed);
    let lock = |m: &Mutex<BTreeMap<String, u64>>| m.lock().map(|m| m.clone()).unwrap_or_default();
    let disconnects: BTreeMap<String, u64> = stats
        .disconnects
        .lock()
        .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
        .unwrap_or_default();
    let json = json!({
        "scenario": {
            "urls": scenario.urls.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
            "auctions": scenario.auctions,
            "viewers": scenario.viewers,
            "zipf": scenario.zipf,
            "bidders": scenario.bidders,
            "bid_rate": scenario.bid_rate,
            "duration_s": scenario.duration.as_secs_f64(),
        },
        "elapsed_s": elapsed.as_secs_f64(),
        "connections": {
            "viewers": stats.viewers_connected.load(Ordering::Relaxed),
            "bidders": stats.bidders_connected.load(Ordering::Relaxed),
            "connect_errors": stats.connect_errors.load(Ordering::Relaxed),
        },
        "bids": {
            "sent": stats.bids_sent.load(Ordering::Relaxed),
            "accepted": stats.bids_accepted.load(Ordering::Relaxed),
            "rejected": lock(&stats.rejections),
            "behind_schedule": stats.behind_schedule.load(Ordering::Relaxed),
            "max_schedule_lag_ms": ms(stats.max_lag_micros.load(Ordering::Relaxed)),
        },
        "deliveries": {
            "expected": expected,
            "received": received,
            "missing": expected.saturating_sub(received),
            "seq_gaps": gaps,
            "per_second": received as f64 / scenario.duration.as_secs_f64().max(0.001),
        },
        "chat": {
            "sent": stats.chat_sent.load(Ordering::Relaxed),
            "published": stats.chat_published.load(Ordering::Relaxed),
            "received": stats.chat_received.load(Ordering::Relaxed),
            "typing_sent": stats.typing_sent.load(Ordering::Relaxed),
            "typing_received": stats.typing_received.load(Ordering::Relaxed),
        },
        "reconnects": {
            "reconnected": stats.reconnects.load(Ordering::Relaxed),
            "recovered": stats.recovered.load(Ordering::Relaxed),
            "not_recovered": stats.not_recovered.load(Ordering::Relaxed),
        },
        "errors": lock(&stats.errors),
        "disconnects_by_close_code": disconnects,
        "latency": histograms.iter().map(|(m, h)| (m.name().to_owned(), summary(h))).collect::<serde_json::Map<_, _>>(),
        "slo": slo_results,
        "pass": slo_met,
        "parts": {"watching": parts.watching, "accepted": parts.accepted},
    });
    let mut table = String::new();
    table.push_str(&format!(
        "{:<10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "latency", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    ));
    for (metric, h) in &histograms {
        let q = |x: f64| {
            if h.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.3}", ms(h.value_at_quantile(x)))
            }
        };
        let max = if h.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.3}", ms(h.max()))
        };
        table.push_str(&format!(
            "{:<10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            metric.name(),
            h.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            max
        ));
    }
    table.push_str(&format!(
        "bids: {} sent, {} accepted; deliveries: {received} of {expected} expected, {gaps} seq gaps, {:.0}/s\n",
        stats.bids_sent.load(Ordering::Relaxed),
        stats.bids_accepted.load(Ordering::Relaxed),
        received as f64 / scenario.duration.as_secs_f64().max(0.001),
    ));
    let chat_sent = stats.chat_sent.load(Ordering::Relaxed);
    let typing_sent = stats.typing_sent.load(Ordering::Relaxed);
    if chat_sent + typing_sent > 0 {
        table.push_str(&format!(
            "chat: {} sent, {} published, {} received by the other member; typing: {typing_sent} sent, {} received\n",
            chat_sent,
            stats.chat_published.load(Ordering::Relaxed),
            stats.chat_received.load(Ordering::Relaxed),
            stats.typing_received.load(Ordering::Relaxed),
        ));
    }
    for result in &slo_results {
        table.push_str(&format!(
            "SLO {}: {} ({})\n",
            result["slo"].as_str().unwrap_or(""),
            if result["pass"] == true {
                "PASS"
            } else {
                "FAIL"
            },
            result["value_ms"]
                .as_f64()
                .map_or("no data".to_owned(), |v| format!("{v:.3} ms")),
        ));
    }
    Report {
        json,
        table,
        slo_met,
    }
}
