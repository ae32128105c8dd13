//! A small command-line client: subscribes to channels and prints every frame as a JSON line.
//!
//! ```sh
//! token=$(cargo run -q -p gavel-broker -- --jwt-secret "$GAVEL_JWT_SECRET" token --sub u42)
//! cargo run -p gavel-broker --example client -- --token "$token" auction:1 user:u42
//! ```

use std::net::SocketAddr;

use clap::Parser;
use gavel_broker::protocol::{encode, Channel, ClientFrame, Format};
use gavel_client::{Client, ConnectOptions, Incoming};

#[derive(Parser)]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    addr: SocketAddr,
    /// A JWT (`gavel-broker token --sub ID` prints one); without it the connection is
    /// anonymous (the broker must allow that).
    #[arg(long)]
    token: Option<String>,
    /// Channels to subscribe to (`auction:ID`, `user:ID`, `conversation:ID`, `broadcast`).
    #[arg(required = true)]
    channels: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let options = ConnectOptions {
        format: Format::MsgPack,
        token: args.token,
        query: None,
        source: None,
    };
    let mut client = Client::connect(args.addr, options).await?;
    for name in &args.channels {
        let channel = Channel::parse(name)?;
        let id = client.next_id();
        client
            .send(&ClientFrame::Subscribe {
                id,
                channel,
                since: None,
                epoch: None,
            })
            .await?;
    }
    loop {
        match client.next().await? {
            Incoming::Frame(frame) => {
                println!(
                    "{}",
                    String::from_utf8_lossy(&encode(Format::Json, &frame)?)
                );
            }
            Incoming::Closed { code, reason } => {
                eprintln!("closed by the broker: {code} {reason}");
                return Ok(());
            }
        }
    }
}
