//! gavel-loadgen against a broker it starts: the report's counts and percentiles, and the SLO
//! verdict in the exit code.

use std::process::Command;

mod common;

use common::{broker, loadgen_command, target_args};

fn args(addr: std::net::SocketAddr, slo: &str) -> Vec<String> {
    let mut args = target_args(addr);
    args.extend(
        [
            "--auctions",
            "2",
            "--viewers",
            "60",
            "--zipf",
            "1.0",
            "--bidders",
            "4",
            "--bid-rate",
            "40",
            "--duration",
            "2s",
            "--cooldown",
            "1s",
            "--quiet",
            "--slo",
            slo,
        ]
        .map(String::from),
    );
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_bid_reaches_every_viewer_and_the_slo_decides() {
    use clap::Parser;
    let (addr, dir) = broker(|_| {}).await;
    std::fs::create_dir_all(&dir).unwrap();
    let mut argv = vec!["gavel-loadgen".to_string()];
    argv.extend(args(addr, "delivery.p99<10s"));
    let outcome = gavel_loadgen::run(gavel_loadgen::Scenario::parse_from(&argv))
        .await
        .unwrap();
    let r = &outcome.report.json;
    assert!(outcome.slo_met, "{}", outcome.report.table);
    assert_eq!(r["connections"]["viewers"], 60);
    let accepted = r["bids"]["accepted"].as_u64().unwrap();
    assert!(accepted > 0);
    assert_eq!(
        r["deliveries"]["expected"], r["deliveries"]["received"],
        "every accepted bid reached every viewer"
    );
    assert_eq!(r["deliveries"]["seq_gaps"], 0);
    // The broker's CPU over the bid schedule, from its own gavel_process_cpu_seconds (here the
    // broker shares the test's process, so it counts loadgen's work too).
    let cpu = &r["broker_cpu"];
    assert!(cpu["seconds"].as_f64().is_some_and(|s| s >= 0.0), "{cpu}");
    assert!(cpu["deliveries"].as_u64().is_some_and(|d| d > 0), "{cpu}");
    assert!(r["loadgen_cpu"]["seconds"].as_f64().is_some(), "{r}");
    for metric in ["connect", "subscribe", "bid_ack", "delivery"] {
        for stat in ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(
                r["latency"][metric][stat].as_f64().is_some(),
                "{metric}.{stat} present"
            );
        }
        assert!(!r["latency"][metric]["buckets_us"]
            .as_array()
            .unwrap()
            .is_empty());
    }

    // A reconnect storm: a quarter of the viewers drop and resubscribe with since; everything
    // they missed is replayed, so nothing is missing and no seq has a gap.
    let mut argv = vec!["gavel-loadgen".to_string()];
    argv.extend(args(addr, "delivery.p99<10s"));
    argv.extend(
        [
            "--reconnect-fraction",
            "0.25",
            "--reconnect-at",
            "1s",
            "--conversations",
            "4",
            "--chat-rate",
            "20",
            "--typing-rate",
            "10",
        ]
        .map(String::from),
    );
    let storm = gavel_loadgen::run(gavel_loadgen::Scenario::parse_from(&argv))
        .await
        .unwrap();
    let r = &storm.report.json;
    let reconnected = r["reconnects"]["reconnected"].as_u64().unwrap();
    assert!(reconnected >= 5, "{r}");
    assert_eq!(r["reconnects"]["recovered"].as_u64().unwrap(), reconnected);
    assert_eq!(r["deliveries"]["expected"], r["deliveries"]["received"]);
    assert_eq!(r["deliveries"]["seq_gaps"], 0);
    // Chat in four conversations: every published message reached the other member.
    let published = r["chat"]["published"].as_u64().unwrap();
    assert!(published > 0);
    assert_eq!(r["chat"]["received"].as_u64().unwrap(), published);
    assert!(r["chat"]["typing_received"].as_u64().unwrap() > 0);
    assert!(r["latency"]["chat"]["p99_ms"].as_f64().is_some());

    // The binary: exit 0 with a loose objective, 1 with an impossible one, 2 for a bad one.
    let run = move |slo: &str| {
        let status = Command::new(env!("CARGO_BIN_EXE_gavel-loadgen"))
            .args(args(addr, slo))
            .status()
            .unwrap();
        status.code()
    };
    let (loose, impossible, unknown) = tokio::task::spawn_blocking(move || {
        (
            run("delivery.p99<10s"),
            run("delivery.p50<1us"),
            run("latency.p99<1s"),
        )
    })
    .await
    .unwrap();
    assert_eq!((loose, impossible, unknown), (Some(0), Some(1), Some(2)));

    // Two worker processes from two source addresses, merged into one report.
    let report = dir.join("workers.json");
    let mut worker_args = args(addr, "delivery.p99<10s");
    worker_args.extend(["--workers", "2", "--source-addrs", "2", "--report"].map(String::from));
    worker_args.push(report.display().to_string());
    let status = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_gavel-loadgen"))
            .args(worker_args)
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    let merged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(merged["connections"]["viewers"], 60);
    assert_eq!(merged["connections"]["bidders"], 4);
    assert!(merged["bids"]["accepted"].as_u64().unwrap() > 0);
    assert_eq!(
        merged["deliveries"]["expected"],
        merged["deliveries"]["received"]
    );
    assert_eq!(merged["deliveries"]["seq_gaps"], 0);
    // The parent reads the broker's CPU over the shared schedule and sums the workers' own.
    assert!(
        merged["broker_cpu"]["seconds"].as_f64().is_some(),
        "{merged}"
    );
    assert!(
        merged["loadgen_cpu"]["seconds"].as_f64().is_some(),
        "{merged}"
    );

    // The pub/sub path alone: the schedule's events published over the HTTP API reach every
    // viewer in seq order, and `--server-pid` reads a process's CPU from /proc (here this
    // test's own process, which runs the broker).
    let mut argv = vec!["gavel-loadgen".to_string()];
    argv.extend(args(addr, "delivery.p99<10s"));
    argv.extend(["--publish", "--server-pid", &std::process::id().to_string()].map(String::from));
    let published = gavel_loadgen::run(gavel_loadgen::Scenario::parse_from(&argv))
        .await
        .unwrap();
    let r = &published.report.json;
    assert!(published.slo_met, "{}", published.report.table);
    assert_eq!(r["bids"]["accepted"].as_u64().unwrap(), 80, "{r}");
    assert_eq!(r["deliveries"]["expected"], r["deliveries"]["received"]);
    // 40 events to each room; the Zipf spread puts 40 viewers in one and 20 in the other.
    assert_eq!(
        r["deliveries"]["received"].as_u64().unwrap(),
        40 * 40 + 40 * 20,
        "{r}"
    );
    assert_eq!(r["deliveries"]["seq_gaps"], 0);
    assert!(
        r["broker_cpu"]["seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{r}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// More worker processes than auctions: the worker with no auction of its own sends no bid but
/// keeps its viewers to the end, so one room's events reach every viewer of both processes.
/// Fewer bidders than the processes with auctions to bid on is a scenario error (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_beyond_the_auctions_watch_to_the_end() {
    let (addr, dir) = broker(|_| {}).await;
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("one-room.json");
    let run = move |auctions: &str, report: Option<&std::path::Path>| {
        let mut cmd = loadgen_command(addr);
        cmd.args(["--auctions", auctions, "--viewers", "20", "--bidders", "1"])
            .args(["--bid-rate", "20", "--duration", "2s", "--cooldown", "1s"])
            .args(["--workers", "2", "--quiet", "--slo", "delivery.p99<10s"]);
        if let Some(report) = report {
            cmd.arg("--report").arg(report);
        }
        cmd.status().unwrap().code()
    };
    let path = report.clone();
    let (one_room, too_few_bidders) =
        tokio::task::spawn_blocking(move || (run("1", Some(&path)), run("4", None)))
            .await
            .unwrap();
    assert_eq!(too_few_bidders, Some(2));
    assert_eq!(one_room, Some(0));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["connections"]["viewers"], 20, "{r}");
    let accepted = r["bids"]["accepted"].as_u64().unwrap();
    assert_eq!(accepted, 40, "{r}");
    assert_eq!(
        r["deliveries"]["received"].as_u64().unwrap(),
        accepted * 20,
        "{r}"
    );
    assert_eq!(r["deliveries"]["expected"], r["deliveries"]["received"]);
    let _ = std::fs::remove_dir_all(&dir);
}
