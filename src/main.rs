//! The `apiary` binary: parse the command line, start logging, run the library, and report a
//! failure once, with its exit code (`apiary::cli::errors`).

use std::process::ExitCode;

use apiary::cli::Cli;
use apiary::cli::errors::{self, Targets};
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
    apiary::telemetry::init_for(
        cli.config.log_format,
        cli.command.default_log_filter(),
        cli.command.service_name(),
    );
    let targets = Targets::of(&cli.config);
    let format = cli.config.log_format;
    let outcome = apiary::cli::run(cli).await;
    // After the drain: the last spans leave before the process does.
    apiary::telemetry::shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => errors::explain(&e, &targets).await.print(format),
    }
}
