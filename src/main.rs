//! The `apiary` binary: parse the command line, start logging, run the library.

use std::process::ExitCode;

use apiary::config::{ConfigError, mask_url};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match apiary::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0; --help shows no secret (env values hidden).
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            // clap's own message quotes the value it refused, which may be a token or a
            // connection string: say what was wrong without it.
            eprintln!("error: {}", ConfigError::from_clap(&e));
            eprintln!("For more information, try '--help'.");
            return ExitCode::from(2);
        }
        Err(e) => {
            // A usage error (unknown flag, missing subcommand) with clap's tips, masked: an
            // unknown `--flag=value` is quoted whole.
            eprint!("{}", mask_url(&e.render().to_string()));
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    apiary::telemetry::init_with_default(cli.config.log_format, cli.command.default_log_filter());
    match apiary::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = mask_url(&error_chain(&e));
            tracing::error!("{message}");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `a: b: c`, leaving out a cause whose text the one before already
/// ends with: our error types print their source too, and `{:#}` would repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
