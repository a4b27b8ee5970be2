//! The `apiary` binary: parse the command line, start logging, run the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = apiary::cli::Cli::parse();
    apiary::telemetry::init(cli.config.log_format);
    match apiary::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
