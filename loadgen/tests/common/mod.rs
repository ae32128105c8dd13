//! What the loadgen tests share: a broker in this process, with the tests' secrets.

use gavel_broker::{Broker, Config};

pub const SECRET: &str = "loadgen-test-secret-0123";
pub const KEY: &str = "loadgen-test-api-key-0123";

/// A broker on an ephemeral loopback port (bids unthrottled), with `tweak` applied; returns
/// its address and its data directory.
pub async fn broker(tweak: impl FnOnce(&mut Config)) -> (std::net::SocketAddr, std::path::PathBuf) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!(
        "gavel-loadgen-test-{}-{}",
        std::process::id(),
        addr.port()
    ));
    let mut config = Config::defaults();
    config.api_key = Some(KEY.into());
    config.jwt_secret = Some(SECRET.into());
    config.bid_rate = 1000.0;
    config.data_dir = dir.clone();
    tweak(&mut config);
    let broker = Broker::new(config).unwrap();
    tokio::spawn(async move { broker.serve(listener).await });
    (addr, dir)
}

/// The flags that aim the loadgen at the broker at `addr` with the test's secret and API key.
pub fn target_args(addr: std::net::SocketAddr) -> Vec<String> {
    let addr = addr.to_string();
    ["--url", &addr, "--jwt-secret", SECRET, "--api-key", KEY]
        .map(String::from)
        .to_vec()
}

/// The loadgen binary with [`target_args`].
pub fn loadgen_command(addr: std::net::SocketAddr) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gavel-loadgen"));
    command.args(target_args(addr));
    command
}
