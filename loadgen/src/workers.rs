//! `--workers N`: the parent creates the auctions, starts N worker processes (this same binary)
//! that share one bid schedule and split the viewers, bidders and auctions, then merges their
//! JSON reports (histograms included) into one report and one verdict.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::scenario::{Metric, Scenario};
use crate::stats::{Parts, Stats};
use crate::{create_auctions, finish, LoadgenError, Outcome};

/// Time given to the workers to ramp up before the shared schedule starts.
fn ramp_allowance(s: &Scenario) -> Duration {
    let per_worker = (s.viewers + s.bidders) as f64 / s.workers.max(1) as f64;
    Duration::from_secs_f64(per_worker / s.ramp) + Duration::from_secs(3)
}

fn worker_args(
    s: &Scenario,
    index: usize,
    ids: &[String],
    start_at_ms: u64,
    run_id: u64,
    report: &str,
) -> Vec<String> {
    let mut args = Vec::new();
    let mut flag = |name: &str, value: String| {
        args.push(format!("--{name}"));
        args.push(value);
    };
    for url in &s.urls {
        flag("url", url.to_string());
    }
    flag("driver", format!("{:?}", s.driver).to_lowercase());
    flag("auctions", s.auctions.to_string());
    flag("viewers", s.viewers.to_string());
    if let Some(zipf) = s.zipf {
        flag("zipf", zipf.to_string());
    }
    flag("bidders", s.bidders.to_string());
    flag("bid-rate", s.bid_rate.to_string());
    flag("ramp", s.ramp.to_string());
    flag("duration", format!("{}ms", s.duration.as_millis()));
    flag("cooldown", format!("{}ms", s.cooldown.as_millis()));
    flag("jwt-secret", s.jwt_secret.clone());
    flag("api-key", s.api_key.clone());
    for slo in &s.slos {
        flag("slo", slo.text.clone());
    }
    flag("workers", s.workers.to_string());
    flag("source-addrs", s.source_addrs.to_string());
    flag("reconnect-fraction", s.reconnect_fraction.to_string());
    flag("conversations", s.conversations.to_string());
    flag("chat-rate", s.chat_rate.to_string());
    flag("typing-rate", s.typing_rate.to_string());
    if let Some(at) = s.reconnect_at {
        flag("reconnect-at", format!("{}ms", at.as_millis()));
    }
    flag("worker-index", index.to_string());
    flag("auction-ids", ids.join(","));
    flag("start-at-ms", start_at_ms.to_string());
    flag("run-id", run_id.to_string());
    flag("report", report.to_owned());
    args.push("--quiet".into());
    if s.publish {
        args.push("--publish".into());
    }
    args
}

pub async fn run(scenario: Scenario) -> Result<Outcome, LoadgenError> {
    if scenario.metrics_listen.is_some() {
        return Err(LoadgenError::Scenario(
            "--metrics-listen works with one worker only".into(),
        ));
    }
    let run_id = crate::now_ms() % 1_000_000_000;
    let ids = create_auctions(&scenario, run_id).await?;
    let start_at_ms = crate::now_ms() + ramp_allowance(&scenario).as_millis() as u64;
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir();
    let started = Instant::now();
    // The servers' CPU at the schedule's start, read when it comes.
    let cpu_source = crate::CpuSource::of(&scenario);
    let cpu_start = {
        let source = cpu_source.clone();
        tokio::spawn(async move {
            let wait = Duration::from_millis(start_at_ms.saturating_sub(crate::now_ms()));
            tokio::time::sleep(wait).await;
            source.seconds().await
        })
    };
    let mut loadgen_seconds = 0.0;
    let mut children = Vec::new();
    let mut reports = Vec::new();
    for index in 0..scenario.workers {
        let report = dir.join(format!("gavel-loadgen-{run_id}-{index}.json"));
        let args = worker_args(
            &scenario,
            index,
            &ids,
            start_at_ms,
            run_id,
            &report.display().to_string(),
        );
        let child = Command::new(&exe)
            .args(args)
            .stdout(Stdio::null())
            .spawn()?;
        children.push(child);
        reports.push(report);
    }
    let statuses = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|mut c| c.wait().map(|s| s.code()))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| LoadgenError::Scenario(format!("waiting for workers: {e}")))?;
    for (index, status) in statuses.into_iter().enumerate() {
        let code = status?;
        if !matches!(code, Some(0) | Some(1)) {
            return Err(LoadgenError::Scenario(format!(
                "worker {index} failed (exit code {code:?})"
            )));
        }
    }
    let stats = Stats::new();
    let mut parts = Parts {
        watching: vec![0; ids.len()],
        accepted: vec![0; ids.len()],
    };
    for path in &reports {
        let json: Value = serde_json::from_slice(&std::fs::read(path)?)
            .map_err(|e| LoadgenError::Scenario(format!("{}: {e}", path.display())))?;
        merge(&stats, &mut parts, &json);
        loadgen_seconds += json["loadgen_cpu"]["seconds"].as_f64().unwrap_or(0.0);
        let _ = std::fs::remove_file(path);
    }
    // The brokers' CPU from the start of the shared schedule to the workers' end (their
    // cooldown included, when the brokers are idle but for pings).
    let server_cpu = match (cpu_start.await.ok().flatten(), cpu_source.seconds().await) {
        (Some(before), Some(after)) => Some(crate::CpuUse {
            seconds: (after - before).max(0.0),
            deliveries: stats.deliveries.load(std::sync::atomic::Ordering::Relaxed),
        }),
        _ => None,
    };
    let loadgen_cpu = Some(crate::CpuUse {
        seconds: loadgen_seconds,
        deliveries: stats.deliveries.load(std::sync::atomic::Ordering::Relaxed),
    });
    let cpu = crate::CpuReport {
        server: server_cpu,
        loadgen: loadgen_cpu,
    };
    finish(&scenario, &stats, started.elapsed(), &parts, true, cpu)
}

/// Adds one worker's report to the totals.
fn merge(stats: &Stats, parts: &mut Parts, json: &Value) {
    use std::sync::atomic::Ordering::Relaxed;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let counters = [
        (&stats.viewers_connected, "connections", "viewers"),
        (&stats.bidders_connected, "connections", "bidders"),
        (&stats.connect_errors, "connections", "connect_errors"),
        (&stats.bids_sent, "bids", "sent"),
        (&stats.bids_accepted, "bids", "accepted"),
        (&stats.behind_schedule, "bids", "behind_schedule"),
        (&stats.deliveries, "deliveries", "received"),
        (&stats.gaps, "deliveries", "seq_gaps"),
        (&stats.reconnects, "reconnects", "reconnected"),
        (&stats.recovered, "reconnects", "recovered"),
        (&stats.not_recovered, "reconnects", "not_recovered"),
        (&stats.chat_sent, "chat", "sent"),
        (&stats.chat_published, "chat", "published"),
        (&stats.chat_received, "chat", "received"),
        (&stats.typing_sent, "chat", "typing_sent"),
        (&stats.typing_received, "chat", "typing_received"),
    ];
    for (counter, section, key) in counters {
        counter.fetch_add(n(&json[section][key]), Relaxed);
    }
    let lag = (json["bids"]["max_schedule_lag_ms"].as_f64().unwrap_or(0.0) * 1000.0) as u64;
    stats.max_lag_micros.fetch_max(lag, Relaxed);
    let add = |map: &std::sync::Mutex<std::collections::BTreeMap<String, u64>>, from: &Value| {
        if let (Ok(mut map), Some(from)) = (map.lock(), from.as_object()) {
            for (k, v) in from {
                *map.entry(k.clone()).or_insert(0) += n(v);
            }
        }
    };
    add(&stats.rejections, &json["bids"]["rejected"]);
    add(&stats.errors, &json["errors"]);
    if let (Ok(mut map), Some(from)) = (
        stats.disconnects.lock(),
        json["disconnects_by_close_code"].as_object(),
    ) {
        for (k, v) in from {
            *map.entry(k.parse().unwrap_or(0)).or_insert(0) += n(v);
        }
    }
    for metric in Metric::ALL {
        for bucket in json["latency"][metric.name()]["buckets_us"]
            .as_array()
            .into_iter()
            .flatten()
        {
            stats.latency(metric).record_n(n(&bucket[0]), n(&bucket[1]));
        }
    }
    for (i, v) in json["parts"]["watching"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(slot) = parts.watching.get_mut(i) {
            *slot += n(v);
        }
    }
    for (i, v) in json["parts"]["accepted"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(slot) = parts.accepted.get_mut(i) {
            *slot += n(v);
        }
    }
}
