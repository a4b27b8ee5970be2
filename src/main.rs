//! The `apiary` binary: parse the command line, start logging, run the library, and report a
//! failure once, with its exit code (`apiary::cli::errors`).

use std::process::ExitCode;

use apiary::cli::errors::{self, Targets};
use apiary::cli::{Cli, Command};
use clap::{CommandFactory as _, FromArgMatches as _};

#[tokio::main]
async fn main() -> ExitCode {
    let parsed = Cli::command()
        .after_help(errors::EXIT_CODES)
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        // --help and --version print and exit 0; --help shows no secret (env values hidden).
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let (class, text) = errors::clap_report(&e);
            eprint!("{text}");
            return ExitCode::from(class.code());
        }
    };
    apiary::telemetry::init_with(cli.config.log_format, default_filter(&cli.command));
    let targets = Targets::of(&cli.config);
    let format = cli.config.log_format;
    match apiary::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => errors::explain(&e, &targets).await.print(format),
    }
}

/// The log filter when `RUST_LOG` is unset. A command that runs once reports its own failure,
/// so lapin's log lines about the same refused or lost connection would only repeat it; the
/// long-running roles keep them, since they carry on after a broker outage. Postgres's notices
/// ("relation ... already exists, skipping", on every `migrate`) say nothing to act on.
fn default_filter(command: &Command) -> &'static str {
    match command {
        Command::Api { .. } | Command::Worker => "info,sqlx::postgres::notice=warn",
        _ => "info,sqlx::postgres::notice=warn,lapin=off",
    }
}
