//! `gavel-loadgen`: run a scenario against a broker, print the report, exit non-zero when an
//! SLO is missed.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let scenario = match gavel_loadgen::Scenario::from_args(std::env::args().collect()) {
        Ok(scenario) => scenario,
        // Help and version go to stdout with exit 0, bad flags to stderr with exit 2.
        Err(gavel_loadgen::ArgsError::Args(error)) => error.exit(),
        Err(error) => {
            eprintln!("{error}");
            return std::process::ExitCode::from(2);
        }
    };
    match gavel_loadgen::run(scenario).await {
        Ok(outcome) if outcome.slo_met => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(1),
        Err(error) => {
            eprintln!("gavel-loadgen: {error}");
            std::process::ExitCode::from(2)
        }
    }
}
