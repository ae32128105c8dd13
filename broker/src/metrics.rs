//! Prometheus metrics: the names the broker exports, the process-wide recorder behind
//! `GET /metrics`, and small helpers for the hot paths. Label values come from small fixed sets
//! (frame types, disconnect reasons), never from user ids or room names.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "gavel_connections";
pub const PROCESS_CPU_SECONDS: &str = "gavel_process_cpu_seconds";
// The standard process metrics (Prometheus client libraries' names), Linux only.
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_THREADS: &str = "process_threads";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
pub const CONNECTIONS_OPENED: &str = "gavel_connections_opened_total";
pub const USERS_ONLINE: &str = "gavel_users_online";
pub const ROOMS: &str = "gavel_rooms";
pub const HISTORY_BYTES: &str = "gavel_history_bytes";
pub const HISTORY_EVICTED: &str = "gavel_history_evicted_total";
pub const ROOMS_DROPPED_EARLY: &str = "gavel_rooms_dropped_early_total";
pub const MESSAGES_RECEIVED: &str = "gavel_messages_received_total";
pub const BYTES_RECEIVED: &str = "gavel_received_bytes_total";
pub const MESSAGES_SENT: &str = "gavel_messages_sent_total";
pub const BYTES_SENT: &str = "gavel_sent_bytes_total";
pub const ERRORS_SENT: &str = "gavel_errors_sent_total";
pub const DISCONNECTS: &str = "gavel_disconnects_total";
pub const SLOW_CONSUMERS: &str = "gavel_slow_consumer_disconnects_total";
pub const PUBLISHES: &str = "gavel_publishes_total";
pub const FAN_OUT_SECONDS: &str = "gavel_fan_out_duration_seconds";
pub const DELIVERY_SECONDS: &str = "gavel_delivery_delay_seconds";
pub const HTTP_REQUESTS: &str = "gavel_http_requests_total";
pub const UPGRADES_REFUSED: &str = "gavel_upgrades_refused_total";
pub const CONNECTIONS_SHED: &str = "gavel_connections_shed_total";
pub const BID_LOG_FLUSH_SECONDS: &str = "gavel_bid_log_flush_duration_seconds";
pub const BID_LOG_FLUSH_BATCH: &str = "gavel_bid_log_flush_batch_size";
pub const BID_LOG_FLUSH_ERRORS: &str = "gavel_bid_log_flush_errors_total";
pub const BIDS: &str = "gavel_bids_total";
pub const AUCTIONS: &str = "gavel_auctions";
pub const READY: &str = "gavel_ready";
pub const CLUSTER_COMMIT_SECONDS: &str = "gavel_cluster_commit_duration_seconds";
pub const CLUSTER_UP: &str = "gavel_cluster_up";
pub const CLUSTER_DISCONNECTS: &str = "gavel_cluster_disconnects_total";
pub const CLUSTER_RESUBSCRIBES: &str = "gavel_cluster_resubscribes_total";
pub const CLUSTER_ERRORS: &str = "gavel_cluster_errors_total";
pub const CLUSTER_ROOMS: &str = "gavel_cluster_rooms";
pub const CLUSTER_NODES_REAPED: &str = "gavel_cluster_nodes_reaped_total";
pub const CLUSTER_LOCK_WAIT_SECONDS: &str = "gavel_cluster_lock_wait_seconds";
pub const WEBHOOK_DELIVERIES: &str = "gavel_webhook_attempts_total";
pub const WEBHOOK_PENDING: &str = "gavel_webhook_outbox_pending";
pub const WEBHOOK_SECONDS: &str = "gavel_webhook_attempt_duration_seconds";

/// Bids per group-commit flush: 1 up to the 512 of a full actor turn (and more when the
/// flusher merges turns of several auctions).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Histogram buckets from 50 µs to 2.5 s: fine enough around the 1–50 ms that matter.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for this process, once. Returns `None` when the embedding
/// application installed a recorder of its own first (Gavel's metrics then go to that one).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(BID_LOG_FLUSH_BATCH.into()), BATCH_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    if let Ok(since_epoch) = std::time::UNIX_EPOCH.elapsed() {
                        metrics::gauge!(PROCESS_START_TIME).set(since_epoch.as_secs_f64());
                    }
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("a metrics recorder is already installed; /metrics is empty");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS, "Open WebSocket connections.");
    describe_gauge!(
        PROCESS_CPU_SECONDS,
        Unit::Seconds,
        "CPU time (user + system) this process has used since it started."
    );
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY,
        Unit::Bytes,
        "Resident memory size of this process."
    );
    describe_gauge!(PROCESS_OPEN_FDS, "Open file descriptors of this process.");
    describe_gauge!(
        PROCESS_MAX_FDS,
        "The open-file limit of this process (its soft limit)."
    );
    describe_gauge!(PROCESS_THREADS, "Threads of this process.");
    describe_gauge!(
        PROCESS_START_TIME,
        Unit::Seconds,
        "When this process started (its metrics recorder), in seconds since the Unix epoch."
    );
    describe_counter!(CONNECTIONS_OPENED, "WebSocket connections accepted.");
    describe_gauge!(
        USERS_ONLINE,
        "Distinct identified users with at least one connection."
    );
    describe_gauge!(
        ROOMS,
        "Rooms in memory (with subscribers or retained history)."
    );
    describe_counter!(MESSAGES_RECEIVED, "Client frames received, by type.");
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "Client message bytes received."
    );
    describe_counter!(MESSAGES_SENT, "Frames queued for clients, by type.");
    describe_counter!(BYTES_SENT, Unit::Bytes, "Bytes written to client sockets.");
    describe_counter!(ERRORS_SENT, "Error replies sent, by code.");
    describe_counter!(DISCONNECTS, "Connections ended, by reason.");
    describe_counter!(
        SLOW_CONSUMERS,
        "Connections closed because they did not keep up."
    );
    describe_counter!(
        PUBLISHES,
        "Room publishes (sequenced events and signals), by type."
    );
    describe_histogram!(
        FAN_OUT_SECONDS,
        Unit::Seconds,
        "Time for one publish to queue its frame for every subscriber of the room."
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "Time from a frame's creation to the end of the socket write that carried it."
    );
    describe_counter!(HTTP_REQUESTS, "HTTP API requests, by route and status.");
    describe_counter!(
        UPGRADES_REFUSED,
        "WebSocket upgrades and SSE streams refused, by reason."
    );
    describe_gauge!(
        HISTORY_BYTES,
        Unit::Bytes,
        "What every room's history counts for against --history-memory (data and MessagePack frame of each event)."
    );
    describe_counter!(
        HISTORY_EVICTED,
        "Events dropped from rooms' histories to keep them under --history-memory."
    );
    describe_counter!(
        ROOMS_DROPPED_EARLY,
        "Rooms without subscribers dropped before their TTL to stay under --max-rooms."
    );
    describe_counter!(
        CONNECTIONS_SHED,
        "Connections answered 503 and closed at accept: the process had no file descriptor left."
    );
    describe_histogram!(
        BID_LOG_FLUSH_SECONDS,
        Unit::Seconds,
        "Time of one bid-log flush (group commit)."
    );
    describe_histogram!(
        BID_LOG_FLUSH_BATCH,
        "Durability requests answered by one flush."
    );
    describe_counter!(BID_LOG_FLUSH_ERRORS, "Bid-log flushes that failed.");
    describe_counter!(BIDS, "Bids, by outcome (accepted or the rejection reason).");
    describe_gauge!(AUCTIONS, "Auctions known to this node, by status.");
    describe_gauge!(
        READY,
        "1 while /readyz answers 200 (serving; in cluster mode, connected to Redis), else 0."
    );
    zero();
    describe_gauge!(
        CLUSTER_UP,
        "Cluster mode: 1 when the Redis adapter is connected, subscribed and heartbeating."
    );
    describe_counter!(
        CLUSTER_DISCONNECTS,
        "Cluster mode: pub/sub connections to Redis lost (or failed to set up)."
    );
    describe_counter!(
        CLUSTER_RESUBSCRIBES,
        "Cluster mode: reconnections after which every followed room was resubscribed and resynced."
    );
    describe_counter!(
        CLUSTER_ERRORS,
        "Cluster mode: failed Redis operations, by operation."
    );
    describe_gauge!(
        CLUSTER_ROOMS,
        "Cluster mode: rooms this node follows in Redis."
    );
    describe_counter!(
        CLUSTER_NODES_REAPED,
        "Cluster mode: dead nodes this node removed from the cluster's presence."
    );
    describe_histogram!(
        CLUSTER_COMMIT_SECONDS,
        Unit::Seconds,
        "Cluster mode: time of one auction commit in Redis (its bids, record and events)."
    );
    describe_histogram!(
        CLUSTER_LOCK_WAIT_SECONDS,
        Unit::Seconds,
        "Cluster mode: time an auction turn waited for the auction's cluster-wide lock."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook delivery attempts, by outcome (delivered, failed)."
    );
    describe_gauge!(
        WEBHOOK_PENDING,
        "Webhooks in the outbox not delivered yet (read at each pass of the deliverer)."
    );
    describe_histogram!(
        WEBHOOK_SECONDS,
        Unit::Seconds,
        "Time of one webhook delivery attempt (connect, POST, answer)."
    );
}

/// The `reason` values of `gavel_upgrades_refused_total` (the `code`s of `ws::upgrade`'s
/// refusals).
pub const UPGRADE_REFUSALS: [&str; 9] = [
    "not_websocket",
    "shutting_down",
    "unsupported_subprotocol",
    "origin_not_allowed",
    "token_invalid",
    "token_expired",
    "too_many_connections",
    "too_many_connections_from_address",
    "bad_handshake",
];

/// Starts every counter and gauge at 0 with each of its (bounded) label values, so rates,
/// alerts and dashboards work from the first scrape, before the first event of each kind.
fn zero() {
    use gavel_protocol::{AuctionStatus, BidRejection, ErrorCode};
    for name in [
        CONNECTIONS_OPENED,
        BYTES_RECEIVED,
        BYTES_SENT,
        SLOW_CONSUMERS,
        BID_LOG_FLUSH_ERRORS,
        CONNECTIONS_SHED,
        HISTORY_EVICTED,
        ROOMS_DROPPED_EARLY,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for name in [CONNECTIONS, USERS_ONLINE, ROOMS, HISTORY_BYTES] {
        metrics::gauge!(name).set(0.0);
    }
    for reason in crate::outbound::DisconnectReason::ALL {
        metrics::counter!(DISCONNECTS, "reason" => reason.as_str()).absolute(0);
    }
    for reason in UPGRADE_REFUSALS {
        metrics::counter!(UPGRADES_REFUSED, "reason" => reason).absolute(0);
    }
    for code in ErrorCode::ALL {
        metrics::counter!(ERRORS_SENT, "code" => code.as_str()).absolute(0);
    }
    metrics::counter!(BIDS, "outcome" => "accepted").absolute(0);
    for outcome in ["delivered", "failed"] {
        metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).absolute(0);
    }
    metrics::gauge!(WEBHOOK_PENDING).set(0.0);
    for reason in BidRejection::ALL {
        metrics::counter!(BIDS, "outcome" => reason.as_str()).absolute(0);
    }
    for status in AuctionStatus::ALL {
        metrics::gauge!(AUCTIONS, "status" => status.as_str()).set(0.0);
    }
    metrics::gauge!(READY).set(0.0);
}

/// Cluster mode's metrics, at 0 (only cluster nodes export them).
pub fn zero_cluster() {
    for name in [
        CLUSTER_DISCONNECTS,
        CLUSTER_RESUBSCRIBES,
        CLUSTER_NODES_REAPED,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for op in [
        "publish",
        "signal",
        "presence",
        "heartbeat",
        "reap",
        "lock",
        "unlock",
        "read_auction",
        "commit",
        "create_auction",
        "list_auctions",
        "bids",
        "find_bids",
        "archive",
        "webhooks",
        "gap",
        "relay_full",
        "publish_queue_full",
        "control_queue_full",
        "unsubscribe_queue_full",
    ] {
        metrics::counter!(CLUSTER_ERRORS, "op" => op).absolute(0);
    }
    metrics::gauge!(CLUSTER_UP).set(0.0);
    metrics::gauge!(CLUSTER_ROOMS).set(0.0);
}

/// Spawns the recorder's upkeep (histogram draining); ends with `shutdown`.
pub fn spawn_upkeep(handle: PrometheusHandle, shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => handle.run_upkeep(),
                _ = shutdown.cancelled() => break,
            }
        }
    });
}

/// One fan-out: `events` frames (a turn's events, or one signal), `delivered` copies of them
/// in all, queued in `took`.
pub fn record_fan_out(kind: &'static str, events: usize, delivered: usize, took: Duration) {
    metrics::counter!(PUBLISHES, "type" => kind).increment(events as u64);
    metrics::counter!(MESSAGES_SENT, "type" => kind).increment(delivered as u64);
    metrics::histogram!(FAN_OUT_SECONDS).record(took.as_secs_f64());
}

/// Handles of the metrics a connection's writer records at every socket write, looked up once
/// per process (after the recorder is installed) rather than by name at every write.
pub struct WriterMetrics {
    pub bytes_sent: metrics::Counter,
    pub delivery_seconds: metrics::Histogram,
    pub bytes_received: metrics::Counter,
}

/// The writer's metric handles (see [`WriterMetrics`]).
pub fn writer() -> &'static WriterMetrics {
    static WRITER: OnceLock<WriterMetrics> = OnceLock::new();
    WRITER.get_or_init(|| WriterMetrics {
        bytes_sent: metrics::counter!(BYTES_SENT),
        delivery_seconds: metrics::histogram!(DELIVERY_SECONDS),
        bytes_received: metrics::counter!(BYTES_RECEIVED),
    })
}

/// Sets the process metrics from the kernel's account of this process (Linux only; elsewhere
/// they stay unset): `gavel_process_cpu_seconds`, so that a load test can divide the broker's
/// CPU time over a window by the deliveries in it, and the standard `process_*` gauges that
/// dashboards and alerts expect. Called every second; open descriptors are counted every
/// fifth call (listing 20,000 of them costs about a millisecond).
pub fn record_process() {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if let Some(stat) = ProcessStat::read() {
        metrics::gauge!(PROCESS_CPU_SECONDS).set(stat.cpu_seconds);
        metrics::gauge!(PROCESS_THREADS).set(stat.threads);
    }
    if let Some(bytes) = resident_memory_bytes() {
        metrics::gauge!(PROCESS_RESIDENT_MEMORY).set(bytes);
    }
    if CALLS
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .is_multiple_of(5)
    {
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            metrics::gauge!(PROCESS_OPEN_FDS).set(fds.count() as f64);
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            metrics::gauge!(PROCESS_MAX_FDS).set(limit.rlim_cur as f64);
        }
    }
}

/// What `/proc/self/stat` says of this process.
struct ProcessStat {
    /// User + system CPU seconds.
    cpu_seconds: f64,
    threads: f64,
}

impl ProcessStat {
    fn read() -> Option<ProcessStat> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may hold spaces: count fields after it. The
        // first is field 3 (state); utime and stime are fields 14 and 15, num_threads field 20.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let threads: f64 = fields.get(17)?.parse().ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (ticks > 0).then(|| ProcessStat {
            cpu_seconds: (utime + stime) / ticks as f64,
            threads,
        })
    }
}

/// Resident memory, from `/proc/self/statm` (its second field, in pages).
fn resident_memory_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then_some(pages * page as f64)
}

#[cfg(test)]
fn process_cpu_seconds() -> Option<f64> {
    ProcessStat::read().map(|s| s.cpu_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_time_is_read_and_grows_with_work() {
        let before = process_cpu_seconds().expect("/proc/self/stat");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Burn CPU until the kernel's tick-grained account moves (bounded: at most 5 s).
        while process_cpu_seconds().unwrap_or(before) <= before
            && started.elapsed() < Duration::from_secs(5)
        {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        assert!(process_cpu_seconds().unwrap() > before);
    }
}
