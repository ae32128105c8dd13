//! gavel-loadgen as a library: [`run`] a [`Scenario`] against a broker and get its report.
//!
//! Viewers connect at the ramp rate and subscribe to an auction each; bidders send bids on a
//! fixed schedule (an open model). Latency runs from each bid's *intended* send time, so a
//! stalled broker (or a loadgen falling behind, which is reported) cannot hide in the numbers.

mod chat;
mod gavel_driver;
mod pacer;
mod prometheus;
pub mod scenario;
mod socketio;
mod socketio_driver;
pub mod stats;
mod workers;

use chat::chat;
use gavel_driver::{bid, open, open_resuming, watch, Resume};
use pacer::Schedule;
use socketio_driver::{sio_bid, sio_join, sio_watch};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gavel_client::token::sign_hs256;
use gavel_client::{Client, ConnectOptions, Incoming};
use gavel_protocol::Claims;
use gavel_protocol::{Channel, ClientFrame, Reply, ServerFrame};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use scenario::Metric;
pub use scenario::{ArgsError, Driver, Scenario};
pub use stats::Report;

/// Why a run could not be carried out (a missed SLO is not an error: see [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("creating auction {0}: {1}")]
    CreateAuction(String, String),
    #[error("invalid scenario: {0}")]
    Scenario(String),
    #[error("report: {0}")]
    Report(#[from] std::io::Error),
    #[error("the schedule's pacer thread: {0}")]
    Pacer(std::io::Error),
}

/// The result of a run.
pub struct Outcome {
    pub report: Report,
    pub slo_met: bool,
}

/// State shared by the run's tasks.
struct Ctx {
    scenario: Scenario,
    stats: stats::Stats,
    auction_ids: Vec<String>,
    /// When bid 0 is due; bid `i` is due `i / rate` later, goes to auction `i % A` with amount
    /// `i / A + 1`, so every process can tell any bid's intended time from its amount.
    start: std::sync::OnceLock<Instant>,
    /// Accepted bids per auction (what each of its viewers should receive).
    accepted: Vec<AtomicU64>,
    /// Viewers connected and subscribed, per auction.
    watching: Vec<AtomicU64>,
    export: bool,
}

impl Ctx {
    /// Counts an error for the report, and (with `--metrics-listen`) in
    /// `gavel_loadgen_errors_total{kind}`.
    fn error(&self, kind: &'static str, detail: String) {
        stats::Stats::count(&self.stats.errors, detail);
        if self.export {
            metrics::counter!("gavel_loadgen_errors_total", "kind" => kind).increment(1);
        }
    }

    /// Records one latency for the report and (with `--metrics-listen`) in
    /// `gavel_loadgen_latency_seconds{metric}`.
    fn record(&self, metric: Metric, shard: usize, latency: Duration) {
        self.stats.latency(metric).record(shard, latency);
        if self.export {
            metrics::histogram!("gavel_loadgen_latency_seconds", "metric" => metric.name())
                .record(latency.as_secs_f64());
        }
    }

    /// Counts an accepted bid (or publish) on auction `index`: every viewer of it is due one
    /// delivery.
    fn accepted(&self, index: usize) {
        self.stats.bids_accepted.fetch_add(1, Ordering::Relaxed);
        self.accepted[index].fetch_add(1, Ordering::Relaxed);
        if self.export {
            metrics::counter!("gavel_loadgen_bids_accepted_total").increment(1);
            metrics::counter!("gavel_loadgen_deliveries_expected_total")
                .increment(self.watching[index].load(Ordering::Relaxed));
        }
    }

    /// Counts a connection that failed (connect, handshake or hello).
    fn connect_failed(&self) {
        self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
        if self.export {
            metrics::counter!("gavel_loadgen_errors_total", "kind" => "connect").increment(1);
        }
    }

    /// The bid schedule, once it has started.
    fn bid_schedule(&self) -> Option<Schedule> {
        Some(Schedule {
            start: *self.start.get()?,
            rate: self.scenario.bid_rate,
        })
    }

    /// The intended send time of bid `i`.
    fn due(&self, i: u64) -> Option<Instant> {
        Some(self.bid_schedule()?.due(i))
    }

    /// The intended send time of the bid of `amount` on auction `auction`.
    fn due_of(&self, auction: usize, amount: i64) -> Option<Instant> {
        let per_auction = u64::try_from(amount).ok()?.checked_sub(1)?;
        self.due(per_auction * self.auction_ids.len() as u64 + auction as u64)
    }

    /// The loopback source address for connection `n`.
    fn source(&self, n: usize) -> Option<std::net::IpAddr> {
        let count = self.scenario.source_addrs.max(1) as usize;
        (count > 1).then(|| std::net::IpAddr::from([127, 0, 0, 1 + (n % count) as u8]))
    }
}

/// Runs a viewer's `watch`; when it ends, one viewer fewer in `gavel_loadgen_viewers`.
async fn until_gone<F: std::future::Future>(ctx: Arc<Ctx>, watch: F) -> F::Output {
    let output = watch.await;
    if ctx.export {
        metrics::gauge!("gavel_loadgen_viewers").decrement(1.0);
    }
    output
}

fn token(secret: &str, sub: &str, roles: Option<Vec<String>>) -> String {
    let exp = now_ms() / 1000 + 24 * 3600;
    let claims = Claims {
        sub: sub.into(),
        exp,
        roles,
        channels: None,
    };
    sign_hs256(secret.as_bytes(), &claims).unwrap_or_default()
}

/// How many of `viewers` watch each of `auctions`: evenly, or by a Zipf law.
pub fn spread(viewers: usize, auctions: usize, zipf: Option<f64>) -> Vec<usize> {
    let auctions = auctions.max(1);
    let Some(s) = zipf else {
        return (0..auctions)
            .map(|a| viewers / auctions + usize::from(a < viewers % auctions))
            .collect();
    };
    let weights: Vec<f64> = (1..=auctions).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut counts: Vec<usize> = weights
        .iter()
        .map(|w| (w / total * viewers as f64).floor() as usize)
        .collect();
    let mut left = viewers - counts.iter().sum::<usize>();
    for count in counts.iter_mut() {
        if left == 0 {
            break;
        }
        *count += 1;
        left -= 1;
    }
    counts
}

async fn create_auction(
    addr: SocketAddr,
    api_key: &str,
    id: &str,
    ends_in: Duration,
) -> Result<(), String> {
    let now = now_ms();
    let body = json!({
        "id": id, "title": format!("loadgen {id}"), "currency": "EUR",
        "starting_price": 1, "increment": {"fixed": 1},
        "starts_at": now.saturating_sub(1000), "ends_at": now + ends_in.as_millis() as u64,
    });
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = hyper::Request::post("/api/auctions")
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {api_key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status.as_u16() != 201 {
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(())
}

/// A scheduled bid.
struct Bid {
    auction: usize,
    amount: i64,
    request_id: String,
}

/// Runs the scenario; prints the progress line and the table, writes the JSON report. With
/// `--workers N` it runs N worker processes and merges their reports.
pub async fn run(scenario: Scenario) -> Result<Outcome, LoadgenError> {
    if scenario.urls.is_empty()
        || scenario.bidders == 0
        || scenario.bid_rate <= 0.0
        || scenario.ramp <= 0.0
        || scenario.workers == 0
    {
        return Err(LoadgenError::Scenario(
            "need a --url, bidders, workers, and positive --bid-rate and --ramp".into(),
        ));
    }
    if scenario.publish && scenario.driver != Driver::Gavel {
        return Err(LoadgenError::Scenario(
            "--publish works with the gavel driver only".into(),
        ));
    }
    // Each worker process bids on its own share of the auctions through its own bidders.
    let bidding_workers = scenario.workers.min(scenario.auctions);
    if scenario.bidders < bidding_workers {
        return Err(LoadgenError::Scenario(format!(
            "--workers {} gives {bidding_workers} processes auctions to bid on, each through \
             bidders of its own: use at least {bidding_workers} --bidders",
            scenario.workers
        )));
    }
    if scenario.workers > 1 && scenario.worker_index.is_none() {
        return workers::run(scenario).await;
    }
    let (part, parts) = (scenario.worker_index.unwrap_or(0), scenario.workers.max(1));
    // Copies what it needs, so the bid schedule's pacer thread can take it too.
    let mine = move |n: usize| n % parts == part;
    if let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX) {
        let connections = scenario.viewers + scenario.bidders + 2 * scenario.conversations;
        let needed = (connections / parts) as u64 + 64;
        if needed > limit {
            return Err(LoadgenError::Scenario(format!(
                "{needed} sockets needed but this process may open {limit} files: use --workers"
            )));
        }
    }
    let export = scenario.metrics_listen.is_some();
    if let Some(addr) = scenario.metrics_listen {
        prometheus::serve(addr)
            .await
            .map_err(LoadgenError::Report)?;
    }
    let run_id = scenario.run_id.unwrap_or_else(|| now_ms() % 1_000_000_000);
    let auction_ids = if scenario.auction_ids.is_empty() {
        create_auctions(&scenario, run_id).await?
    } else {
        scenario.auction_ids.clone()
    };
    let ctx = Arc::new(Ctx {
        accepted: auction_ids.iter().map(|_| AtomicU64::new(0)).collect(),
        watching: auction_ids.iter().map(|_| AtomicU64::new(0)).collect(),
        auction_ids,
        scenario: scenario.clone(),
        stats: stats::Stats::new(),
        start: std::sync::OnceLock::new(),
        export,
    });
    let started = Instant::now();
    let progress = progress_line(&ctx);

    // Viewers (this worker's share), at the ramp rate.
    let per_auction = spread(scenario.viewers, ctx.auction_ids.len(), scenario.zipf);
    let mut opening = Vec::new();
    let mut viewer = 0;
    let mut opened = 0;
    for (auction, count) in per_auction.iter().enumerate() {
        let channel = Channel::auction(&ctx.auction_ids[auction])
            .map_err(|e| LoadgenError::Scenario(e.to_string()))?;
        for _ in 0..*count {
            viewer += 1;
            if !mine(viewer - 1) {
                continue;
            }
            let due = started + Duration::from_secs_f64(opened as f64 / scenario.ramp);
            tokio::time::sleep_until(due.into()).await;
            opened += 1;
            let (ctx, channel, n) = (Arc::clone(&ctx), channel.clone(), viewer - 1);
            opening.push(tokio::spawn(async move {
                let watcher = if ctx.scenario.driver == Driver::Socketio {
                    let reader = sio_join(&ctx, n, auction).await?;
                    tokio::spawn(until_gone(
                        Arc::clone(&ctx),
                        sio_watch(Arc::clone(&ctx), n, auction, reader),
                    ))
                } else {
                    let token = token(&ctx.scenario.jwt_secret, &format!("lgv{n}"), None);
                    let mut resume = Resume::default();
                    let client = open_resuming(&ctx, n, token, Some(&channel), &mut resume).await?;
                    tokio::spawn(until_gone(
                        Arc::clone(&ctx),
                        watch(Arc::clone(&ctx), n, auction, client, resume),
                    ))
                };
                ctx.stats.viewers_connected.fetch_add(1, Ordering::Relaxed);
                ctx.watching[auction].fetch_add(1, Ordering::Relaxed);
                if ctx.export {
                    metrics::gauge!("gavel_loadgen_viewers").increment(1.0);
                }
                Some(watcher)
            }));
        }
    }
    let mut watchers = Vec::new();
    for task in opening {
        if let Ok(Some(watcher)) = task.await {
            watchers.push(watcher);
        }
    }
    // Bidders (this worker's share).
    let mut queues = Vec::new();
    let mut bidders = Vec::new();
    for b in (0..scenario.bidders).filter(|b| mine(*b)) {
        let n = scenario.viewers + b;
        let (tx, rx) = tokio::sync::mpsc::channel(65_536);
        if scenario.driver == Driver::Socketio {
            let addr = scenario.urls[n % scenario.urls.len()];
            let connected = socketio::connect(addr, ctx.source(n), &format!("lgb{b}")).await;
            let Ok((reader, writer)) = connected else {
                ctx.connect_failed();
                continue;
            };
            bidders.push(tokio::spawn(sio_bid(
                Arc::clone(&ctx),
                b,
                reader,
                writer,
                rx,
            )));
        } else if scenario.publish {
            let addr = scenario.urls[n % scenario.urls.len()];
            bidders.push(tokio::spawn(gavel_driver::publish(
                Arc::clone(&ctx),
                b,
                addr,
                rx,
            )));
        } else {
            let roles = Some(vec!["bidder".into()]);
            let token = token(&scenario.jwt_secret, &format!("lgb{b}"), roles);
            let Some(client) = open(&ctx, n, token, None).await else {
                continue;
            };
            bidders.push(tokio::spawn(bid(Arc::clone(&ctx), b, client, rx)));
        }
        ctx.stats.bidders_connected.fetch_add(1, Ordering::Relaxed);
        queues.push(tx);
    }
    // A worker with no auction of its own (more workers than auctions) has nothing to bid.
    let bids_here = (0..ctx.auction_ids.len()).any(mine);
    if queues.is_empty() && bids_here {
        return Err(LoadgenError::Scenario("no bidder could connect".into()));
    }
    // The schedule: bid i is due at start + i / rate, whatever happened before. Workers share
    // the start (set by the parent) and each sends the bids of its own auctions.
    let start = match scenario.start_at_ms {
        None => Instant::now(),
        Some(at) => {
            let now = now_ms();
            if at >= now {
                Instant::now() + Duration::from_millis(at - now)
            } else {
                Instant::now() - Duration::from_millis(now - at)
            }
        }
    };
    let _ = ctx.start.set(start);
    // CPU over the bid schedule (the steady window): the servers' (one process only: workers
    // would each read the same servers; their parent reads them) and this process's own.
    let cpu_source = (scenario.worker_index.is_none()).then(|| CpuSource::of(&scenario));
    let server_start = match &cpu_source {
        Some(source) => source.seconds().await,
        None => None,
    };
    let loadgen_start = own_cpu_seconds();
    let deliveries_start = ctx.stats.deliveries.load(Ordering::Relaxed);
    let chatting = chat(Arc::clone(&ctx), run_id).await;
    let auctions = ctx.auction_ids.len();
    let total = (scenario.bid_rate * scenario.duration.as_secs_f64()).round() as u64;
    let schedule = Schedule {
        start,
        rate: scenario.bid_rate,
    };
    let my_bids = (0..total).filter(move |i| mine(*i as usize % auctions));
    let mut ticks = pacer::ticks(schedule, my_bids).map_err(LoadgenError::Pacer)?;
    while let Some(i) = ticks.recv().await {
        let auction = (i as usize) % auctions;
        let lag = schedule.due(i).elapsed();
        // The pacer wakes within tens of microseconds; beyond a millisecond, the loadgen
        // itself is behind.
        if lag > Duration::from_millis(1) {
            ctx.stats.behind_schedule.fetch_add(1, Ordering::Relaxed);
            ctx.stats
                .max_lag_micros
                .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
        }
        let amount = (i / auctions as u64) as i64 + 1;
        // The Socket.IO driver uses the schedule index as its acknowledgement id.
        let request_id = match scenario.driver {
            Driver::Gavel => format!("{run_id}-{i}"),
            Driver::Socketio => i.to_string(),
        };
        ctx.stats.bids_sent.fetch_add(1, Ordering::Relaxed);
        if export {
            metrics::counter!("gavel_loadgen_bids_sent_total").increment(1);
        }
        // One auction's bids all go through one bidder, so they reach the broker in schedule
        // order (amounts only rise) and are accepted; bidders share the auctions round-robin.
        let queue = &queues[(auction / parts) % queues.len()];
        let bid = Bid {
            auction,
            amount,
            request_id,
        };
        if queue.try_send(bid).is_err() {
            ctx.error("queue_full", "loadgen bidder queue full".to_owned());
        }
    }
    ticks
        .finished()
        .map_err(|panicked| LoadgenError::Pacer(std::io::Error::other(panicked)))?;
    drop(queues);
    for bidder in bidders {
        let _ = bidder.await;
    }
    // Every worker keeps its viewers watching to the schedule's end and its cool-down, also one
    // whose own auctions' last bids came early, or one with no auction of its own.
    tokio::time::sleep_until((start + scenario.duration + scenario.cooldown).into()).await;
    let deliveries = ctx.stats.deliveries.load(Ordering::Relaxed) - deliveries_start;
    let server_end = match &cpu_source {
        Some(source) => source.seconds().await,
        None => None,
    };
    let cpu = CpuReport {
        server: server_start.zip(server_end).map(|(before, after)| CpuUse {
            seconds: (after - before).max(0.0),
            deliveries,
        }),
        loadgen: loadgen_start
            .zip(own_cpu_seconds())
            .map(|(before, after)| CpuUse {
                seconds: (after - before).max(0.0),
                deliveries,
            }),
    };
    for watcher in &watchers {
        watcher.abort();
    }
    for task in &chatting {
        task.abort();
    }
    progress.finish_and_clear();
    let load = |v: &[AtomicU64]| v.iter().map(|x| x.load(Ordering::Relaxed)).collect();
    let parts = stats::Parts {
        watching: load(&ctx.watching),
        accepted: load(&ctx.accepted),
    };
    let print = scenario.worker_index.is_none();
    finish(&scenario, &ctx.stats, started.elapsed(), &parts, print, cpu)
}

/// CPU time over the bid schedule, and the deliveries loadgen counted in it.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    pub seconds: f64,
    pub deliveries: u64,
}

impl CpuUse {
    fn per_delivery_us(&self) -> Option<f64> {
        (self.deliveries > 0).then(|| self.seconds * 1e6 / self.deliveries as f64)
    }
}

/// The servers' and loadgen's own CPU over the bid schedule, where they could be read.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuReport {
    pub server: Option<CpuUse>,
    pub loadgen: Option<CpuUse>,
}

/// Where the servers' CPU time is read: their `/proc/PID/stat` (`--server-pid`, any server on
/// this machine) or each Gavel broker's `gavel_process_cpu_seconds`.
#[derive(Clone, Debug)]
pub(crate) enum CpuSource {
    Pids(Vec<u32>),
    Metrics(Vec<SocketAddr>),
    Unknown,
}

impl CpuSource {
    pub(crate) fn of(scenario: &Scenario) -> CpuSource {
        if !scenario.server_pids.is_empty() {
            CpuSource::Pids(scenario.server_pids.clone())
        } else if scenario.driver == Driver::Gavel {
            CpuSource::Metrics(scenario.urls.clone())
        } else {
            CpuSource::Unknown
        }
    }

    /// The servers' CPU seconds so far, summed; `None` when one cannot be read.
    pub(crate) async fn seconds(&self) -> Option<f64> {
        match self {
            CpuSource::Pids(pids) => pids
                .iter()
                .map(|pid| proc_cpu_seconds(&format!("/proc/{pid}/stat")))
                .sum(),
            CpuSource::Metrics(urls) => broker_cpu_seconds(urls).await,
            CpuSource::Unknown => None,
        }
    }
}

/// This process's CPU seconds (user + system), on Linux.
fn own_cpu_seconds() -> Option<f64> {
    proc_cpu_seconds("/proc/self/stat")
}

/// User + system CPU seconds from a `/proc/.../stat` file (fields 14 and 15, in clock ticks of
/// 100 Hz, the value on every Linux platform loadgen runs on).
fn proc_cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces: count from its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// The sum of `gavel_process_cpu_seconds` over the brokers' `/metrics`; `None` when one does
/// not answer or does not export it (an older broker, or not Linux). The broker updates it
/// every second, so the window is exact to about a second of CPU samples.
async fn broker_cpu_seconds(urls: &[SocketAddr]) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut total = 0.0;
    for addr in urls {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&body);
        let seconds: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("gavel_process_cpu_seconds "))?
            .trim()
            .parse()
            .ok()?;
        total += seconds;
    }
    Some(total)
}

/// Builds the report, prints its table (unless a worker), writes the JSON file if asked.
fn finish(
    scenario: &Scenario,
    stats: &stats::Stats,
    elapsed: Duration,
    parts: &stats::Parts,
    print: bool,
    cpu: CpuReport,
) -> Result<Outcome, LoadgenError> {
    let mut report = stats::report(scenario, stats, elapsed, parts);
    for (key, who, usage) in [
        ("broker_cpu", "server", cpu.server),
        ("loadgen_cpu", "loadgen", cpu.loadgen),
    ] {
        let Some(usage) = usage else { continue };
        let per_delivery_us = usage.per_delivery_us();
        report.json[key] = serde_json::json!({
            "seconds": usage.seconds,
            "deliveries": usage.deliveries,
            "us_per_delivery": per_delivery_us,
        });
        report.table.push_str(&format!(
            "\n{who} CPU over the bid schedule: {:.2} s for {} deliveries ({})",
            usage.seconds,
            usage.deliveries,
            per_delivery_us.map_or("n/a".to_owned(), |us| format!("{us:.2} µs per delivery")),
        ));
    }
    if cpu.server.is_some() || cpu.loadgen.is_some() {
        report.table.push('\n');
    }
    if print {
        println!("{}", report.table);
    }
    if let Some(path) = &scenario.report {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&report.json).unwrap_or_default(),
        )?;
    }
    let slo_met = report.slo_met;
    Ok(Outcome { report, slo_met })
}

/// Creates the scenario's auctions (Gavel driver; Socket.IO servers create them on first use).
async fn create_auctions(scenario: &Scenario, run_id: u64) -> Result<Vec<String>, LoadgenError> {
    let ids: Vec<String> = (0..scenario.auctions.max(1))
        .map(|i| format!("lg{run_id}-{i}"))
        .collect();
    if scenario.driver == Driver::Gavel {
        let ends_in = scenario.duration + scenario.cooldown + scenario.auctions_end_after;
        for id in &ids {
            create_auction(scenario.urls[0], &scenario.api_key, id, ends_in)
                .await
                .map_err(|e| LoadgenError::CreateAuction(id.clone(), e))?;
        }
    }
    Ok(ids)
}

fn progress_line(ctx: &Arc<Ctx>) -> indicatif::ProgressBar {
    let bar = if ctx.scenario.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.enable_steady_tick(Duration::from_millis(500));
    let ctx = Arc::clone(ctx);
    let shown = bar.clone();
    tokio::spawn(async move {
        while !shown.is_finished() {
            let s = &ctx.stats;
            shown.set_message(format!(
                "viewers {} · bids sent {} accepted {} · deliveries {} · gaps {}",
                s.viewers_connected.load(Ordering::Relaxed),
                s.bids_sent.load(Ordering::Relaxed),
                s.bids_accepted.load(Ordering::Relaxed),
                s.deliveries.load(Ordering::Relaxed),
                s.gaps.load(Ordering::Relaxed),
            ));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    bar
}

/// Now, in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
