//! `gavel-broker`: parse the configuration, install logging, bind, and run until SIGINT/SIGTERM.
//! `gavel-broker token ...` prints a signed development token instead.

use std::time::Duration;

use clap::{Parser, Subcommand};
use gavel_broker::config::{Config, LogFormat};
use gavel_broker::protocol::Claims;
use gavel_client::token::sign_hs256;

#[derive(Parser)]
#[command(name = "gavel-broker", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    config: Config,
    /// Threads that run connections, rooms and auctions (the tokio runtime's workers). 0: one per
    /// CPU core the process may use. Fewer than the cores can cost less CPU per delivery when
    /// other busy processes share the machine (docs/benchmarks.md, "One worker thread or two").
    /// The bid log's flusher and sled's IO threads come on top
    #[arg(long, env = "GAVEL_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print an HS256 token signed with --jwt-secret (for development and tests).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// Roles, comma-separated (e.g. `bidder,admin`).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Conversations the user may join, comma-separated (`conversation:ID` or
        /// `conversation:*`).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Lifetime.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cli.worker_threads > 0 {
        runtime.worker_threads(cli.worker_threads);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(serve(cli)),
        Err(error) => {
            eprintln!("gavel-broker: cannot start the runtime: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> std::process::ExitCode {
    let Cli {
        config,
        worker_threads,
        command,
    } = cli;
    if let Err(error) =
        init_tracing(&config).and_then(|()| config.validate().map_err(|e| e.to_string()))
    {
        eprintln!("gavel-broker: {error}");
        return std::process::ExitCode::from(2);
    }
    if let Some(Command::Token {
        sub,
        roles,
        channels,
        ttl,
    }) = command
    {
        return print_token(&config, sub, roles, channels, ttl);
    }
    if config.check_config {
        if let Err(error) = gavel_broker::check(&config) {
            eprintln!("gavel-broker: {error}");
            return std::process::ExitCode::FAILURE;
        }
        println!("{config:#?}");
        match worker_threads {
            0 => println!("worker threads: one per CPU core"),
            n => println!("worker threads: {n}"),
        }
        return std::process::ExitCode::SUCCESS;
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(error) => {
            eprintln!("gavel-broker: cannot listen on {}: {error}", config.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    match gavel_broker::run(listener, config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gavel-broker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_token(
    config: &Config,
    sub: String,
    roles: Vec<String>,
    channels: Vec<String>,
    ttl: Duration,
) -> std::process::ExitCode {
    let Some(secret) = &config.jwt_secret else {
        eprintln!("gavel-broker token: set --jwt-secret (or GAVEL_JWT_SECRET)");
        return std::process::ExitCode::from(2);
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + ttl.as_secs();
    let claims = Claims {
        sub,
        exp,
        roles: (!roles.is_empty()).then_some(roles),
        channels: (!channels.is_empty()).then_some(channels),
    };
    match sign_hs256(secret.as_bytes(), &claims) {
        Ok(token) => {
            println!("{token}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("gavel-broker token: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs the log subscriber; a `--log` filter that does not parse is a configuration error.
fn init_tracing(config: &Config) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .map_err(|error| format!("invalid --log filter {:?}: {error}", config.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
