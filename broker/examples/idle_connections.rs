//! Opens N WebSocket connections to a running broker, subscribes each to one room (checking
//! that every subscription succeeded), lets them sit idle, and reports the broker's resident
//! memory per connection (read from `/proc/PID/status`). Loopback only. The broker must accept
//! anonymous connections (`--allow-anonymous`), or give `--token`.
//!
//! ```sh
//! cargo run --release -p gavel-broker -- --allow-anonymous &   # the broker
//! cargo run --release -p gavel-broker --example idle_connections -- --pid $(pgrep -n gavel-broker) --count 10000
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use gavel_broker::protocol::{Channel, ClientFrame, ServerFrame};
use gavel_client::{Client, ConnectOptions, Incoming};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7700")]
    addr: SocketAddr,
    /// The broker's process id, to read its memory.
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// A token to connect with (default: anonymous).
    #[arg(long)]
    token: Option<String>,
    /// Open the connections without subscribing them.
    #[arg(long)]
    no_subscribe: bool,
    /// How long to hold the connections after the last one is open.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    hold: Duration,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let before = rss_kib(args.pid);
    let channel = Channel::parse("auction:idle")?;
    let mut clients = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let options = ConnectOptions {
            token: args.token.clone(),
            ..ConnectOptions::default()
        };
        let mut client = Client::connect(args.addr, options).await?;
        if !args.no_subscribe {
            client
                .send(&ClientFrame::Subscribe {
                    id: 1,
                    channel: channel.clone(),
                    since: None,
                    epoch: None,
                })
                .await?;
            // The reply to request 1 must be `subscribed`, or the number means nothing.
            loop {
                match client.next().await? {
                    Incoming::Frame(ServerFrame::Ok { id: 1, .. }) => break,
                    Incoming::Frame(ServerFrame::Error(e)) => {
                        return Err(format!("subscribe refused: {:?} {}", e.code, e.message).into())
                    }
                    Incoming::Frame(_) => continue,
                    other => return Err(format!("connection ended: {other:?}").into()),
                }
            }
        }
        clients.push(client);
        if (i + 1) % 2000 == 0 {
            eprintln!("{} connections open", i + 1);
        }
    }
    // Let the subscriptions and viewer-count updates settle, reading so nothing queues up.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { while c.next().await.is_ok() {} }))
        .collect();
    tokio::time::sleep(args.hold).await;
    let after = rss_kib(args.pid);
    println!(
        "{} idle {} connections: broker RSS {before} KiB -> {after} KiB, {:.2} KiB per connection",
        args.count,
        if args.no_subscribe {
            "unsubscribed"
        } else {
            "subscribed"
        },
        (after.saturating_sub(before)) as f64 / args.count as f64
    );
    for r in readers {
        r.abort();
    }
    Ok(())
}
