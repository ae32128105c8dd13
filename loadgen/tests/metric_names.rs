//! Every metric a dashboard or an alert rule names is exported, and every exported metric is in
//! the catalogue. A single-node broker and a cluster-mode broker (with a real `redis-server`)
//! run in this process and get traffic from two short `gavel-loadgen` runs; the loadgen run
//! serves its own metrics. A dashboard query that names a metric nobody exports fails here.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use gavel_broker::testing::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::loadgen_command;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

async fn broker(redis_url: Option<String>) -> SocketAddr {
    common::broker(|config| {
        if redis_url.is_none() {
            // Webhooks for every bid, to a loopback port nobody listens on: attempts fail
            // (and are retried), so the webhook metrics are exported too.
            let closed = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            config.webhook_url = Some(format!("http://{closed}/hooks"));
            config.webhook_secret = Some("metric-names-webhook-secret".into());
            config.webhook_bids = true;
        }
        config.redis_url = redis_url;
        config.node_ttl = Duration::from_secs(2);
    })
    .await
    .0
}

/// GET over HTTP/1.0; the body, or `None` when nothing answers.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Series names in a Prometheus exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Series (name and labels, without the value) in a Prometheus exposition.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

/// Every `gavel_...` identifier in a text.
fn named_in(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("gavel_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let mut end = start + "gavel_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if boundary {
            names.insert(text[start..end].trim_end_matches('_').to_owned());
        }
        i = end;
    }
    names
}

fn loadgen(addr: SocketAddr, metrics: Option<SocketAddr>) -> std::process::Child {
    let mut command = loadgen_command(addr);
    command.args([
        "--auctions",
        "2",
        "--viewers",
        "40",
        "--bidders",
        "4",
        "--bid-rate",
        "40",
    ]);
    command.args([
        "--duration",
        "3s",
        "--cooldown",
        "1s",
        "--quiet",
        "--slo",
        "delivery.p99<60s",
    ]);
    if let Some(metrics) = metrics {
        command.args(["--metrics-listen", &metrics.to_string()]);
        // Chat too, so that every latency the loadgen dashboard shows is recorded.
        command.args(["--conversations", "2", "--chat-rate", "10"]);
    }
    command.stdout(std::process::Stdio::null());
    command.spawn().expect("start gavel-loadgen")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_name_only_exported_metrics_and_the_catalogue_lists_them_all() {
    let redis = RedisServer::start();
    let single = broker(None).await;
    let clustered = broker(Some(redis.url())).await;
    for _ in 0..300 {
        if get(clustered, "/readyz")
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Traffic on both brokers; the first run serves its metrics, scraped while it runs.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut first = loadgen(single, Some(metrics_addr));
    let mut second = loadgen(clustered, None);
    let mut from_loadgen = BTreeSet::new();
    let mut loadgen_series = BTreeSet::new();
    loop {
        if let Some((200, body)) = get(metrics_addr, "/metrics").await {
            from_loadgen.extend(exported(&body));
            loadgen_series.extend(series(&body));
        }
        if first.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        second.wait().unwrap().success(),
        "the cluster run passed its SLO"
    );
    // The two brokers share this process's recorder: one scrape has both.
    let (status, body) = get(single, "/metrics").await.expect("broker metrics");
    assert_eq!(status, 200);
    let from_brokers = exported(&body);
    let all: BTreeSet<String> = from_brokers.union(&from_loadgen).cloned().collect();

    // 1. What dashboards and rules use is exported.
    let mut used = BTreeSet::new();
    for dir in ["dashboards", "deploy/prometheus"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ["json", "yml", "yaml"].contains(&ext) && !path.ends_with("alerts_test.yml") {
                used.extend(named_in(&std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    assert!(used.len() > 30, "found the dashboards' metrics: {used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !all.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named by dashboards or rules but exported by nobody: {missing:?}"
    );

    // 1b. Every latency the loadgen dashboard shows (by its `metric` label) is recorded.
    let dashboard = std::fs::read_to_string(root().join("dashboards/gavel-loadgen.json")).unwrap();
    let shown: BTreeSet<&str> = dashboard
        .split(r#"metric=\""#)
        .skip(1)
        .filter_map(|rest| rest.split('\\').next())
        .collect();
    assert!(
        shown.len() >= 5,
        "found the dashboard's latencies: {shown:?}"
    );
    for metric in shown {
        let bucket = format!(r#"gavel_loadgen_latency_seconds_bucket{{metric="{metric}""#);
        assert!(
            loadgen_series.iter().any(|s| s.starts_with(&bucket)),
            "the loadgen dashboard shows {metric:?}, which the loadgen never records"
        );
    }

    // 2. Everything exported is in the catalogue (histograms by their base name).
    let catalogue = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let mut undocumented = Vec::new();
    for name in all.iter().filter(|n| n.starts_with("gavel_")) {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                all.contains(&format!("{base}_bucket")).then_some(base)
            })
            .unwrap_or(name);
        if !catalogue.contains(&format!("`{base}`")) {
            undocumented.push(base.to_owned());
        }
    }
    undocumented.dedup();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );
    // And the catalogue lists nothing that does not exist.
    let stale: Vec<String> = named_in(&catalogue)
        .into_iter()
        .filter(|n| {
            !all.iter()
                .any(|e| e == n || e.starts_with(&format!("{n}_")))
        })
        .collect();
    assert!(
        stale.is_empty(),
        "in docs/metrics.md but never exported: {stale:?}"
    );
}
