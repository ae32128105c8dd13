//! Measures the room registry alone (no sockets): the cost of N connections joining one room
//! (a join storm), then of one publish fanned out to all N. Criterion benches cover the same
//! paths with statistics; this is the quick look quoted in `docs/architecture.md`.
//!
//! ```sh
//! cargo run --release -p gavel-broker --example join_storm
//! ```

use std::time::{Duration, Instant};

use gavel_broker::outbound::ConnHandle;
use gavel_broker::protocol::{Channel, Format};
use gavel_broker::rooms::{RoomLimits, Rooms};
use serde_json::json;

const PUBLISHES: u32 = 100;

fn main() {
    let limits = RoomLimits {
        size: 1000,
        ttl: Duration::from_secs(300),
        memory: 0,
        max_rooms: 0,
    };
    let channel = Channel::parse("auction:1").expect("valid channel");
    for n in [1_000usize, 10_000, 20_000] {
        let rooms = Rooms::new(limits);
        // Queues large enough that every offer is queued.
        let conns: Vec<_> = (0..n as u64)
            .map(|id| ConnHandle::new(id, None, Format::MsgPack, 1024, usize::MAX))
            .collect();
        let started = Instant::now();
        for conn in &conns {
            rooms.subscribe(conn, &channel, 1, None, None);
        }
        let join = started.elapsed();
        let started = Instant::now();
        for i in 0..PUBLISHES {
            rooms.publish(
                &channel,
                "bid_placed",
                None,
                json!({"amount": 100 + i, "bidder": "u1"}).into(),
            );
        }
        let publish = started.elapsed() / PUBLISHES;
        println!(
            "{n:>6} subscribers: join storm {join:>10.2?} ({:.2?} per join); one publish to all {publish:>9.2?} ({:.0?} per delivery)",
            join / n as u32,
            publish / n as u32,
        );
    }
}
