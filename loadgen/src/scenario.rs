//! What to simulate: connections, their spread over auctions, the bid schedule, durations, and
//! the latency objectives to judge the run by. Parsed from flags (clap).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

/// gavel-loadgen: simulated bidders and viewers against a Gavel broker, with latency measured
/// from each bid's intended send time to every viewer's receipt.
#[derive(Clone, Debug, Parser)]
#[command(name = "gavel-loadgen", version, about, long_about = None, args_override_self = true)]
pub struct Scenario {
    /// A TOML file of scenario settings: `key = value` per flag (`viewers = 10000`,
    /// `bid-rate = 500`, `duration = "20s"`, `url = ["127.0.0.1:7700"]`, `slo = [...]`). Flags
    /// on the command line win over the file.
    #[arg(long)]
    pub scenario: Option<PathBuf>,

    /// Broker address (host:port of its HTTP/WebSocket listener). Repeat to spread connections
    /// over several brokers.
    #[arg(long = "url", default_value = "127.0.0.1:7700")]
    pub urls: Vec<SocketAddr>,

    /// Which server to drive: `gavel`, or `socketio` (a Socket.IO 4 server speaking the common
    /// auction design: join-auction, place-bid, bid-placed, viewerCountUpdate).
    #[arg(long, value_enum, default_value_t = Driver::Gavel)]
    pub driver: Driver,

    /// Auctions to create and bid on.
    #[arg(long, default_value_t = 1)]
    pub auctions: usize,

    /// Viewers (each one WebSocket connection subscribed to one auction).
    #[arg(long, default_value_t = 100)]
    pub viewers: usize,

    /// Spread viewers by a Zipf law with this exponent (auction 1 the hottest) instead of evenly.
    #[arg(long)]
    pub zipf: Option<f64>,

    /// Bidders (each one connection, one user).
    #[arg(long, default_value_t = 10)]
    pub bidders: usize,

    /// Bids per second over all auctions, on a fixed schedule (an open model: sent on time
    /// whether or not earlier bids were answered).
    #[arg(long, default_value_t = 50.0)]
    pub bid_rate: f64,

    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp: f64,

    /// How long bids are sent (the steady state).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// How long to keep listening after the last bid.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub cooldown: Duration,

    /// When the auctions end, counted from the end of the cooldown (gavel driver). The
    /// default keeps them open well past the run; a short one lets a series of runs against
    /// one broker (a soak) see each run's auctions end and be archived.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub auctions_end_after: Duration,

    /// The broker's --jwt-secret, to sign the simulated users' tokens (gavel driver).
    #[arg(
        long,
        env = "GAVEL_JWT_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    pub jwt_secret: String,

    /// The broker's --api-key, to create the auctions (gavel driver).
    #[arg(
        long,
        env = "GAVEL_API_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub api_key: String,

    /// A latency objective such as `delivery.p99<50ms` (metrics: connect, subscribe, bid_ack, chat,
    /// delivery; statistics: p50, p90, p99, p999, max). Repeatable. A missed one makes the exit
    /// code 1.
    #[arg(long = "slo", default_value = "delivery.p99<50ms")]
    pub slos: Vec<Slo>,

    /// Write the JSON report (with the histograms) here.
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics while running (with one worker
    /// process only: not with --workers above 1).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,

    /// Conversation rooms, each with two chatting users (gavel driver).
    #[arg(long, default_value_t = 0)]
    pub conversations: usize,

    /// Chat messages per second over all conversations, on a fixed schedule; each is timed
    /// from its intended send time to the other member's receipt.
    #[arg(long, default_value_t = 0.0)]
    pub chat_rate: f64,

    /// Typing indicators per second over all conversations (delivered, never stored).
    #[arg(long, default_value_t = 0.0)]
    pub typing_rate: f64,

    /// During the steady state, drop this fraction of the viewers (0 to 1) and have them
    /// reconnect after a jittered backoff (up to 0.5 s) and resubscribe with `since` and
    /// `epoch`; the report counts what was recovered (gavel driver).
    #[arg(long, default_value_t = 0.0)]
    pub reconnect_fraction: f64,

    /// When the reconnect storm happens, from the start of the bid schedule (default: halfway).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub reconnect_at: Option<Duration>,

    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,

    /// Run this many loadgen processes, each with its share of the viewers, bidders and
    /// auctions, and merge their histograms into one report: one process may hold only as many
    /// sockets as its open-file limit allows.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,

    /// Connect from this many loopback source addresses (127.0.0.1, 127.0.0.2, ...), past the
    /// ~28,000 ephemeral ports of one address.
    #[arg(long, default_value_t = 1)]
    pub source_addrs: u8,

    /// Publish the schedule's events with `POST /api/publish` (event `tick` to each auction's
    /// room, nothing bid, nothing written to disk) instead of placing bids: the pub/sub path
    /// alone. Each bidder becomes a publisher on one keep-alive HTTP connection, and `bid_ack`
    /// times the publish's answer (gavel driver; needs --api-key).
    #[arg(long)]
    pub publish: bool,

    /// The server's process id on this machine (repeatable): its CPU time is read from
    /// /proc/PID/stat over the bid schedule and reported per delivery. Works for any driver;
    /// without it the gavel driver reads `gavel_process_cpu_seconds` from each broker's
    /// /metrics.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,

    /// (Set by the parent for a worker process.) This worker's index.
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,

    /// (Set by the parent.) The auctions already created.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub auction_ids: Vec<String>,

    /// (Set by the parent.) When the bid schedule starts, in ms since the Unix epoch.
    #[arg(long, hide = true)]
    pub start_at_ms: Option<u64>,

    /// (Set by the parent.) The run's id, part of every request id.
    #[arg(long, hide = true)]
    pub run_id: Option<u64>,
}

/// The protocol spoken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    Gavel,
    Socketio,
}

impl Scenario {
    /// Parses the command line, reading `--scenario FILE` first when it is given.
    pub fn from_args(args: Vec<String>) -> Result<Scenario, ArgsError> {
        let first = Scenario::try_parse_from(&args)?;
        let Some(path) = &first.scenario else {
            return Ok(first);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ArgsError::File(format!("{}: {e}", path.display())))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| ArgsError::File(format!("{}: {e}", path.display())))?;
        let mut merged = vec![args.first().cloned().unwrap_or_default()];
        for (key, value) in &table {
            let flag = format!("--{}", key.replace('_', "-"));
            let values = match value {
                toml::Value::Array(items) => items.clone(),
                other => vec![other.clone()],
            };
            for value in values {
                match value {
                    toml::Value::Boolean(true) => merged.push(flag.clone()),
                    toml::Value::Boolean(false) => {}
                    toml::Value::String(s) => merged.extend([flag.clone(), s]),
                    other => merged.extend([flag.clone(), other.to_string()]),
                }
            }
        }
        // The command line after the file: later occurrences win.
        merged.extend(args.into_iter().skip(1));
        Ok(Scenario::try_parse_from(merged)?)
    }
}

/// Why the command line (or the `--scenario` file) gave no scenario.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// From clap: a bad flag or value, or `--help` / `--version` (which are not failures:
    /// [`clap::Error::exit`] prints them to stdout and exits 0).
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The scenario file cannot be read or is not TOML.
    #[error("{0}")]
    File(String),
}

/// The measured latencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    Connect,
    Subscribe,
    BidAck,
    Delivery,
    /// A chat message, from its intended send time to the other member's receipt.
    Chat,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::Connect,
        Metric::Subscribe,
        Metric::BidAck,
        Metric::Delivery,
        Metric::Chat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Connect => "connect",
            Metric::Subscribe => "subscribe",
            Metric::BidAck => "bid_ack",
            Metric::Delivery => "delivery",
            Metric::Chat => "chat",
        }
    }
}

/// A statistic of a latency histogram.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stat {
    Quantile(f64),
    Max,
}

/// `metric.stat<value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    pub text: String,
    pub metric: Metric,
    pub stat: Stat,
    pub limit: Duration,
}

impl FromStr for Slo {
    type Err = String;

    fn from_str(text: &str) -> Result<Slo, String> {
        let (lhs, limit) = text.split_once('<').ok_or_else(|| {
            format!("{text:?}: expected METRIC.STAT<DURATION, e.g. delivery.p99<50ms")
        })?;
        let (metric, stat) = lhs
            .trim()
            .split_once('.')
            .ok_or_else(|| format!("{text:?}: expected METRIC.STAT before '<'"))?;
        let metric = Metric::ALL
            .into_iter()
            .find(|m| m.name() == metric)
            .ok_or_else(|| {
                format!(
                    "{text:?}: unknown metric {metric:?} (connect, subscribe, bid_ack, delivery, chat)"
                )
            })?;
        let stat = match stat {
            "p50" => Stat::Quantile(0.5),
            "p90" => Stat::Quantile(0.9),
            "p99" => Stat::Quantile(0.99),
            "p999" => Stat::Quantile(0.999),
            "max" => Stat::Max,
            other => {
                return Err(format!(
                    "{text:?}: unknown statistic {other:?} (p50, p90, p99, p999, max)"
                ))
            }
        };
        let limit =
            humantime::parse_duration(limit.trim()).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Slo {
            text: text.to_owned(),
            metric,
            stat,
            limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_file_sets_flags_and_the_command_line_wins() {
        let path = std::env::temp_dir().join(format!("gavel-scenario-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "viewers = 1234\nbid-rate = 42.5\nduration = \"3s\"\nurl = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nquiet = true\nslo = [\"delivery.p99<5ms\"]\n",
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut a = vec![
                "gavel-loadgen".to_string(),
                "--scenario".into(),
                path.display().to_string(),
            ];
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let s = Scenario::from_args(args(&[])).unwrap();
        assert_eq!(
            (s.viewers, s.bid_rate, s.duration, s.quiet),
            (1234, 42.5, Duration::from_secs(3), true)
        );
        assert_eq!(s.urls.len(), 2);
        assert_eq!(s.slos[0].text, "delivery.p99<5ms");
        let s = Scenario::from_args(args(&["--viewers", "7"])).unwrap();
        assert_eq!(s.viewers, 7);
        std::fs::write(&path, "viewrs = 1\n").unwrap();
        assert!(
            Scenario::from_args(args(&[])).is_err(),
            "an unknown key is an error"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn slos_parse_and_unknown_metrics_are_errors() {
        let slo: Slo = "delivery.p99<50ms".parse().unwrap();
        assert_eq!(
            (slo.metric, slo.stat, slo.limit),
            (
                Metric::Delivery,
                Stat::Quantile(0.99),
                Duration::from_millis(50)
            )
        );
        assert!("latency.p99<50ms".parse::<Slo>().is_err());
        assert!("delivery.p98<50ms".parse::<Slo>().is_err());
        assert!("delivery.p99>50ms".parse::<Slo>().is_err());
        assert!("delivery.p99<soon".parse::<Slo>().is_err());
    }
}
