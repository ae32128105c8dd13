//! Live Prometheus metrics of a run at `/metrics` (metrics-exporter-prometheus), with latency
//! buckets fine enough between 0.1 ms and 1 s.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
];

/// Describes every metric (the catalogue is `docs/metrics.md`) and starts each counter at 0, so
/// rates and dashboards work from the first scrape, before the first event of each kind.
fn describe_and_zero() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "gavel_loadgen_latency_seconds",
        Unit::Seconds,
        "Latency by metric: connect, subscribe, bid_ack, delivery (from the bid's intended send time), chat."
    );
    describe_counter!("gavel_loadgen_bids_sent_total", "Bids sent.");
    describe_counter!(
        "gavel_loadgen_bids_accepted_total",
        "Bids acknowledged with bid_accepted."
    );
    describe_counter!(
        "gavel_loadgen_bids_rejected_total",
        "Bids answered with bid_rejected, by reason."
    );
    describe_counter!(
        "gavel_loadgen_deliveries_total",
        "bid_placed events received by viewers."
    );
    describe_counter!(
        "gavel_loadgen_deliveries_expected_total",
        "bid_placed events due: each accepted bid times the viewers of its auction."
    );
    describe_counter!("gavel_loadgen_seq_gaps_total", "Events that skipped a seq.");
    describe_counter!("gavel_loadgen_errors_total", "Errors, by kind.");
    describe_gauge!("gavel_loadgen_viewers", "Viewers connected and subscribed.");
    for name in [
        "gavel_loadgen_bids_sent_total",
        "gavel_loadgen_bids_accepted_total",
        "gavel_loadgen_deliveries_total",
        "gavel_loadgen_deliveries_expected_total",
        "gavel_loadgen_seq_gaps_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for reason in gavel_protocol::BidRejection::ALL {
        metrics::counter!("gavel_loadgen_bids_rejected_total", "reason" => reason.as_str())
            .absolute(0);
    }
    for kind in ["connect", "subscribe", "undecodable", "queue_full"] {
        metrics::counter!("gavel_loadgen_errors_total", "kind" => kind).absolute(0);
    }
    metrics::gauge!("gavel_loadgen_viewers").set(0.0);
}

/// Installs the recorder and serves it on `addr` until the process exits.
pub async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(std::io::Error::other)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| std::io::Error::other(e.to_string()))?;
    describe_and_zero();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let body = handle.render();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}
