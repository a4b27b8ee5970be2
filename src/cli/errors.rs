//! How a failed `apiary` command tells a person what went wrong: one line on stderr, the
//! error and its causes without repeats or the server's source positions, the fix where one
//! is known, and an exit code for its class ([`ErrorClass`]).
//!
//! The class comes from the errors' types, not their text: [`CliError`] for what the command
//! itself refuses, [`ConfigError`], the store's and the broker's errors, and beneath them
//! `sqlx::Error` (with the SQLSTATE of a Postgres error) and `lapin::Error` (with the AMQP
//! reply code). A connection problem is told with the server's address, the variable it came
//! from and the URL with its password masked.
//!
//! The line is written once. With human logs it goes straight to stderr and not through
//! `tracing` (whose lines go to stderr too, so it would appear twice); with
//! `APIARY_LOG_FORMAT=json` it is one JSON event, with its class and exit code as fields, so a
//! log collector keeps it and stderr still holds it once.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::str::FromStr as _;
use std::time::Duration;

use crate::broker::BrokerError;
use crate::client::{EnqueueError, QueueError, ScheduleError, StatsError};
use crate::config::{Config, ConfigError, LogFormat, mask_url};
use crate::job::InvalidJob;
use crate::store::StoreError;
use crate::worker::WorkerError;

/// What kind of failure ended a command; each has its own exit code, listed in `apiary --help`
/// ([`EXIT_CODES`]) and the README.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Anything not below (exit 1): a failure with no better class, or `status --check`
    /// finding violations.
    Failure,
    /// The command line itself (exit 2, as clap's usage errors): an unknown subcommand or
    /// flag, a missing or malformed argument.
    Usage,
    /// A setting that cannot work, from a flag or an environment variable (exit 3).
    Config,
    /// Postgres or RabbitMQ cannot be reached, or refused the login (exit 4).
    Connect,
    /// The database is missing or behind the binary (or a queue a command needs is not
    /// declared): run `apiary migrate` (exit 5).
    Schema,
    /// The request is wrong: an invalid kind, payload or queue name, a job the store refuses,
    /// cancelling a job that has finished (exit 6).
    Input,
    /// What was asked for does not exist: no job with that id (exit 7).
    NotFound,
}

impl ErrorClass {
    /// The process exit code.
    pub const fn code(self) -> u8 {
        match self {
            ErrorClass::Failure => 1,
            ErrorClass::Usage => 2,
            ErrorClass::Config => 3,
            ErrorClass::Connect => 4,
            ErrorClass::Schema => 5,
            ErrorClass::Input => 6,
            ErrorClass::NotFound => 7,
        }
    }

    /// A short name, for the JSON error event.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorClass::Failure => "failure",
            ErrorClass::Usage => "usage",
            ErrorClass::Config => "configuration",
            ErrorClass::Connect => "connect",
            ErrorClass::Schema => "schema",
            ErrorClass::Input => "input",
            ErrorClass::NotFound => "not_found",
        }
    }
}

/// The exit codes, as `apiary --help` ends.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure not listed below (and `status --check` finding violations)
  2  usage: unknown subcommand or flag, missing or malformed argument
  3  configuration: a flag or environment variable that cannot work
  4  cannot connect: Postgres or RabbitMQ unreachable, or login refused
  5  schema behind: database missing or not migrated to this version; run `apiary migrate`
  6  bad input: invalid kind, payload or queue name, a job the store refuses, cancelling a finished job
  7  not found: no job with that id";

/// A failure the command itself decides, with its class: a job id that does not exist, a
/// payload that is not JSON.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Its class.
    pub class: ErrorClass,
    /// What to tell the person.
    pub message: String,
}

impl CliError {
    /// An error of `class` saying `message`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> CliError {
        CliError {
            class,
            message: message.into(),
        }
    }
}

/// Where a command was pointed: to say which server, from which variable, failed.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Targets {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `AMQP_URL`.
    pub amqp_url: String,
}

impl Targets {
    /// The servers of `cfg`.
    pub fn of(cfg: &Config) -> Targets {
        Targets {
            database_url: cfg.database_url.clone(),
            amqp_url: cfg.amqp_url.clone(),
        }
    }

    fn postgres(&self) -> String {
        match sqlx::postgres::PgConnectOptions::from_str(&self.database_url) {
            Ok(o) => format!("Postgres at {}:{}", o.get_host(), o.get_port()),
            Err(_) => "Postgres".into(),
        }
    }

    fn postgres_var(&self) -> String {
        format!("DATABASE_URL={}", mask_url(&self.database_url))
    }

    fn rabbitmq(&self) -> String {
        // Every address of the list, in order: any of them may be the one that failed.
        let hosts: Option<Vec<String>> = crate::config::url_list(&self.amqp_url)
            .into_iter()
            .map(|u| {
                lapin::uri::AMQPUri::from_str(u)
                    .ok()
                    .map(|u| format!("{}:{}", u.authority.host, u.authority.port))
            })
            .collect();
        match hosts {
            Some(h) if !h.is_empty() => format!("RabbitMQ at {}", h.join(", ")),
            _ => "RabbitMQ".into(),
        }
    }

    fn rabbitmq_var(&self) -> String {
        format!("AMQP_URL={}", mask_url(&self.amqp_url))
    }

    fn rabbitmq_user(&self) -> Option<String> {
        let first = crate::config::url_list(&self.amqp_url).first().copied()?;
        lapin::uri::AMQPUri::from_str(first)
            .ok()
            .map(|u| u.authority.userinfo.username)
    }
}

/// A failed command, as it is reported: its class and the one line that says it.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The class, hence the exit code.
    pub class: ErrorClass,
    /// The line after `error: `, passwords masked.
    pub message: String,
}

impl Report {
    fn new(class: ErrorClass, message: impl Into<String>) -> Report {
        Report {
            class,
            message: mask_url(&message.into()),
        }
    }

    /// Writes the report once (see the module docs for where) and returns the exit code.
    pub fn print(&self, format: LogFormat) -> ExitCode {
        // With every error event filtered out (`RUST_LOG=off`), the line is written plain.
        if format == LogFormat::Json && tracing::enabled!(tracing::Level::ERROR) {
            tracing::error!(
                class = self.class.name(),
                exit_code = self.class.code(),
                "{}",
                self.message
            );
        } else {
            eprintln!("{}: {}", paint("error", RED), self.message);
        }
        ExitCode::from(self.class.code())
    }
}

const RED: &str = "1;31";
const YELLOW: &str = "1;33";

/// Whether to colour what goes to stderr: only on a terminal, and not when `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>).
fn colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// `word` in `code`'s colour if [`colour`], else plain.
fn paint(word: &str, code: &str) -> String {
    if colour() {
        format!("\x1b[{code}m{word}\x1b[0m")
    } else {
        word.to_string()
    }
}

/// Prints `warning: <message>` on stderr (in colour on a terminal), passwords masked.
pub fn warn(message: &str) {
    eprintln!("{}: {}", paint("warning", YELLOW), mask_url(message));
}

/// The report for a command line clap refused. A bad value of a setting (a flag with an
/// environment variable) is a configuration error, told without the value, which may be a
/// secret; anything else is a usage error with clap's own message and tips.
pub fn clap_report(e: &clap::Error) -> (ErrorClass, String) {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let setting = e.kind() == ErrorKind::ValueValidation
        && match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => is_setting(arg),
            _ => false,
        };
    if setting {
        (
            ErrorClass::Config,
            format!(
                "{}: {}\nFor more information, try '--help'.\n",
                paint("error", RED),
                ConfigError::from_clap(e)
            ),
        )
    } else {
        // Masked all the same: an unknown `--flag=value` is quoted whole.
        let text = if colour() {
            e.render().ansi().to_string()
        } else {
            e.render().to_string()
        };
        (ErrorClass::Usage, mask_url(&text))
    }
}

/// Whether clap's name for an argument (`--lease <LEASE>`, `<ID>`) is one of the settings,
/// which all have an environment variable.
fn is_setting(arg: &str) -> bool {
    use clap::CommandFactory as _;
    let Some(long) = arg
        .split_whitespace()
        .next()
        .and_then(|a| a.strip_prefix("--"))
    else {
        return false;
    };
    let cmd = crate::cli::Cli::command();
    let found = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .map(|a| a.get_env().is_some());
    found.unwrap_or(false)
}

/// How long the second look at an unreachable Postgres may take (see [`explain`]).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Explains `err`, a failed command pointed at `targets`.
///
/// When the pool gave up waiting for a connection, which hides why (sqlx retries a refused
/// connection until its timeout), Postgres is dialled once more, directly, to learn it.
pub async fn explain(err: &anyhow::Error, targets: &Targets) -> Report {
    let chain = chain_text(err);
    for cause in err.chain() {
        if let Some(r) = classify(cause, &chain, targets) {
            return r;
        }
        if let Some(sqlx::Error::PoolTimedOut) = cause.downcast_ref::<sqlx::Error>() {
            return probe_postgres(&chain, targets).await;
        }
    }
    Report::new(ErrorClass::Failure, chain)
}

/// The class of one cause, if its type tells it.
fn classify(
    cause: &(dyn std::error::Error + 'static),
    chain: &str,
    targets: &Targets,
) -> Option<Report> {
    if let Some(e) = cause.downcast_ref::<CliError>() {
        return Some(Report::new(e.class, chain));
    }
    if cause.is::<ConfigError>() {
        return Some(Report::new(ErrorClass::Config, chain));
    }
    if cause.is::<InvalidJob>() {
        return Some(Report::new(ErrorClass::Input, chain));
    }
    if let Some(e) = cause.downcast_ref::<EnqueueError>() {
        match e {
            EnqueueError::Invalid(_)
            | EnqueueError::Conflict(_)
            | EnqueueError::Refused(_)
            | EnqueueError::Encode { .. } => {
                return Some(Report::new(ErrorClass::Input, chain));
            }
            EnqueueError::NotPublished { source, ids } => {
                let r = broker(source, chain, targets)?;
                let what = match ids.len() {
                    1 => "the job is recorded but not yet published (a worker publishes it once \
                          RabbitMQ answers)"
                        .to_string(),
                    n => format!(
                        "{n} jobs recorded but not yet published (a worker publishes them once \
                         RabbitMQ answers)"
                    ),
                };
                return Some(Report::new(r.class, format!("{what}: {}", r.message)));
            }
            EnqueueError::Store(s) => return store(s, chain, targets),
        }
    }
    if let Some(e) = cause.downcast_ref::<QueueError>() {
        match e {
            QueueError::Invalid(_) => return Some(Report::new(ErrorClass::Input, chain)),
            QueueError::Store(s) => return store(s, chain, targets),
            QueueError::Broker(b) => return broker(b, chain, targets),
        }
    }
    if let Some(e) = cause.downcast_ref::<ScheduleError>() {
        match e {
            ScheduleError::Invalid(_) => return Some(Report::new(ErrorClass::Input, chain)),
            ScheduleError::NotFound(_) => return Some(Report::new(ErrorClass::NotFound, chain)),
            ScheduleError::Store(s) => return store(s, chain, targets),
        }
    }
    let store_error = cause.downcast_ref::<StoreError>().or_else(|| {
        match (
            cause.downcast_ref::<WorkerError>(),
            cause.downcast_ref::<StatsError>(),
        ) {
            (Some(WorkerError::Store(s)), _) | (_, Some(StatsError::Store(s))) => Some(s),
            _ => None,
        }
    });
    if let Some(s) = store_error {
        return store(s, chain, targets);
    }
    let broker_error = cause.downcast_ref::<BrokerError>().or_else(|| {
        match (
            cause.downcast_ref::<WorkerError>(),
            cause.downcast_ref::<StatsError>(),
        ) {
            (Some(WorkerError::Broker(b)), _) | (_, Some(StatsError::Broker(b))) => Some(b),
            _ => None,
        }
    });
    if let Some(b) = broker_error {
        return broker(b, chain, targets);
    }
    if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
        return postgres(e, chain, targets);
    }
    if let Some(e) = cause.downcast_ref::<sqlx::migrate::MigrateError>() {
        return migration(e, chain, targets);
    }
    if let Some(e) = cause.downcast_ref::<lapin::Error>() {
        return rabbitmq(e, chain, targets);
    }
    None
}

fn store(e: &StoreError, chain: &str, targets: &Targets) -> Option<Report> {
    match e {
        StoreError::SchemaOutdated(_) => Some(Report::new(ErrorClass::Schema, chain)),
        StoreError::BadUrl(_) => Some(Report::new(ErrorClass::Config, chain)),
        StoreError::Query { source, .. } => postgres(source, chain, targets),
        StoreError::Migrate(m) => migration(m, chain, targets),
    }
}

fn migration(e: &sqlx::migrate::MigrateError, chain: &str, targets: &Targets) -> Option<Report> {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::Execute(e) | M::ExecuteMigration(e, _) => postgres(e, chain, targets),
        M::VersionMissing(v) => Some(Report::new(
            ErrorClass::Schema,
            format!(
                "the database has migration {v}, which this apiary does not know: it was \
                 migrated by a newer version; run that version"
            ),
        )),
        _ => None,
    }
}

/// A Postgres error: connection problems, a missing database or schema. `None` for the rest
/// (a statement that failed), which keep their chain.
fn postgres(e: &sqlx::Error, chain: &str, targets: &Targets) -> Option<Report> {
    match e {
        sqlx::Error::Database(db) => postgres_refusal(db.code().as_deref()?, db.message(), targets),
        sqlx::Error::Io(io) => Some(cannot_reach(
            &targets.postgres(),
            &targets.postgres_var(),
            io,
        )),
        sqlx::Error::Tls(tls) => Some(Report::new(
            ErrorClass::Connect,
            format!(
                "cannot connect to {} ({}): TLS: {tls}",
                targets.postgres(),
                targets.postgres_var()
            ),
        )),
        sqlx::Error::Configuration(_) => Some(Report::new(ErrorClass::Config, chain)),
        _ => None,
    }
}

/// A Postgres error by its SQLSTATE (`code`) and message.
fn postgres_refusal(code: &str, message: &str, targets: &Targets) -> Option<Report> {
    let (class, line) = match code {
        // invalid_catalog_name: the database in the URL does not exist.
        "3D000" => (
            ErrorClass::Schema,
            format!(
                "{message} ({}); run `apiary migrate` to create it",
                targets.postgres_var()
            ),
        ),
        // undefined_table, undefined_column, undefined_function: a schema from before a
        // migration (a command that reads without checking the schema first).
        "42P01" | "42703" | "42883" => (
            ErrorClass::Schema,
            format!("the database schema is not current ({message}); run `apiary migrate` first"),
        ),
        // invalid_password, invalid_authorization_specification (no such role, no
        // pg_hba.conf entry).
        "28P01" | "28000" => (
            ErrorClass::Connect,
            format!(
                "{} refused the login ({}): {message}; check the user and password in DATABASE_URL",
                targets.postgres(),
                targets.postgres_var()
            ),
        ),
        // too_many_connections, cannot_connect_now (starting or shutting down), and the
        // connection exceptions.
        c if c == "53300" || c.starts_with("57P") || c.starts_with("08") => (
            ErrorClass::Connect,
            format!(
                "cannot connect to {} ({}): {message}",
                targets.postgres(),
                targets.postgres_var()
            ),
        ),
        _ => return None,
    };
    Some(Report::new(class, line))
}

/// A server that does not answer: refused, unknown host, unreachable network.
fn cannot_reach(server: &str, var: &str, io: &std::io::Error) -> Report {
    let why = match io.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            let name = server.split(" at ").next().unwrap_or(server);
            format!("connection refused; is {name} running there?")
        }
        _ => io.to_string(),
    };
    Report::new(
        ErrorClass::Connect,
        format!("cannot connect to {server} ({var}): {why}"),
    )
}

/// After the pool timed out: dial Postgres directly and report what it says.
async fn probe_postgres(chain: &str, targets: &Targets) -> Report {
    use sqlx::ConnectOptions as _;
    let timed_out = || {
        Report::new(
            ErrorClass::Connect,
            format!(
                "cannot connect to {} ({}): no connection within the pool's timeout",
                targets.postgres(),
                targets.postgres_var()
            ),
        )
    };
    let Ok(options) = sqlx::postgres::PgConnectOptions::from_str(&targets.database_url) else {
        return timed_out();
    };
    match tokio::time::timeout(PROBE_TIMEOUT, options.connect()).await {
        Ok(Err(e)) => postgres(&e, chain, targets).unwrap_or_else(timed_out),
        // It answers now: it was slow or busy, not down.
        Ok(Ok(conn)) => {
            let _ = sqlx::Connection::close(conn).await;
            timed_out()
        }
        Err(_) => timed_out(),
    }
}

fn broker(e: &BrokerError, chain: &str, targets: &Targets) -> Option<Report> {
    match e {
        BrokerError::Amqp { source, .. } => rabbitmq(source, chain, targets),
        BrokerError::Disconnected => Some(Report::new(
            ErrorClass::Connect,
            format!(
                "cannot connect to {} ({})",
                targets.rabbitmq(),
                targets.rabbitmq_var()
            ),
        )),
        BrokerError::ConnectTimeout(_) => Some(Report::new(
            ErrorClass::Connect,
            format!(
                "cannot connect to {} ({}): no address answered in time",
                targets.rabbitmq(),
                targets.rabbitmq_var()
            ),
        )),
        // Our own words already name the queue, its type, the setting and the way out.
        BrokerError::QueueTypeMismatch { .. } => {
            Some(Report::new(ErrorClass::Config, e.to_string()))
        }
        _ => None,
    }
}

/// A RabbitMQ error: connection problems, a refused login, a queue not declared.
fn rabbitmq(e: &lapin::Error, chain: &str, targets: &Targets) -> Option<Report> {
    use lapin::ErrorKind as K;
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    match e.kind() {
        K::IOError(io) => Some(cannot_reach(
            &targets.rabbitmq(),
            &targets.rabbitmq_var(),
            io,
        )),
        K::ProtocolError(amqp) => {
            let text = amqp.get_message().as_str();
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) if text.contains("Login") => {
                    let user = targets
                        .rabbitmq_user()
                        .map(|u| format!(" of user {u:?}"))
                        .unwrap_or_default();
                    Some(Report::new(
                        ErrorClass::Connect,
                        format!(
                            "{} refused the login{user} ({}); check the user and password in AMQP_URL",
                            targets.rabbitmq(),
                            targets.rabbitmq_var()
                        ),
                    ))
                }
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some(Report::new(
                    ErrorClass::Connect,
                    format!(
                        "{} refused access ({}): {text}; check the user's permissions",
                        targets.rabbitmq(),
                        targets.rabbitmq_var()
                    ),
                )),
                // A vhost that does not exist, or the user may not use.
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some(Report::new(
                    ErrorClass::Connect,
                    format!(
                        "{} refused the connection ({}): {text}; check the vhost in AMQP_URL",
                        targets.rabbitmq(),
                        targets.rabbitmq_var()
                    ),
                )),
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Some(Report::new(
                    ErrorClass::Schema,
                    format!("{chain}; run `apiary migrate` to declare the queues"),
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The error and its causes, `a: b: c`, each said once: a cause whose text the one before
/// already holds (our errors print their source, and so does sqlx) is not repeated, and a
/// Postgres error is its message alone, without the position in Postgres's own source that
/// its `Display` appends ("at line 948").
pub fn chain_text(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let raw = cause.to_string();
        let clean = clean_text(cause).unwrap_or_else(|| raw.clone());
        if out.is_empty() {
            out = clean;
        } else if let Some(at) = out.rfind(&raw).filter(|_| !raw.is_empty()) {
            out.replace_range(at..at + raw.len(), &clean);
        } else if !out.contains(&clean) {
            out.push_str(": ");
            out.push_str(&clean);
        }
    }
    out
}

/// The text a person should see for a cause whose `Display` says too much.
fn clean_text(cause: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(sqlx::Error::Database(db)) = cause.downcast_ref::<sqlx::Error>() {
        return Some(db.message().to_string());
    }
    // "protocol error: AMQP soft error: NOT-FOUND: NOT_FOUND - no queue ...": the reply text
    // alone says it.
    if let Some(lapin::ErrorKind::ProtocolError(amqp)) =
        cause.downcast_ref::<lapin::Error>().map(lapin::Error::kind)
    {
        return Some(amqp.get_message().to_string());
    }
    cause
        .downcast_ref::<Box<dyn sqlx::error::DatabaseError>>()
        .map(|db| db.message().to_string())
}

/// What `apiary enqueue` warns when no live worker on the queue would run a kind, from the
/// live workers' `(queue, kinds)`; `None` when one would, or when it cannot tell (a worker too
/// old to record its kinds).
pub fn unserved_kind(
    kind: &str,
    queue: &str,
    workers: &[(String, Option<Vec<String>>)],
) -> Option<String> {
    let on_queue: Vec<&Option<Vec<String>>> = workers
        .iter()
        .filter(|(q, _)| q == queue)
        .map(|(_, k)| k)
        .collect();
    if on_queue.is_empty() {
        return Some(format!(
            "no worker is running on queue {queue:?}; the job waits until one starts"
        ));
    }
    let mut served: Vec<&str> = Vec::new();
    for kinds in on_queue {
        let kinds = kinds.as_ref()?;
        if kinds.iter().any(|k| k == kind) {
            return None;
        }
        served.extend(kinds.iter().map(String::as_str));
    }
    served.sort_unstable();
    served.dedup();
    Some(format!(
        "no live worker on queue {queue:?} serves kind {kind:?} (they serve: {}); a worker \
         without its handler records the job dead, to replay with `apiary dead replay` once one \
         serves it",
        served.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        Targets {
            database_url: "postgres://app:sekret@db.example:6543/jobs".into(),
            amqp_url: "amqp://guest:sekret@mq.example:5673/%2f".into(),
        }
    }

    /// The login refusals the shared test server cannot produce (it trusts every local
    /// connection): a wrong password, and no pg_hba.conf entry.
    #[test]
    fn postgres_login_refusals_say_where_and_what_to_check() {
        let r = postgres_refusal(
            "28P01",
            "password authentication failed for user \"app\"",
            &targets(),
        )
        .expect("classified");
        assert_eq!(r.class, ErrorClass::Connect);
        assert_eq!(
            r.message,
            "Postgres at db.example:6543 refused the login \
             (DATABASE_URL=postgres://app:***@db.example:6543/jobs): password authentication \
             failed for user \"app\"; check the user and password in DATABASE_URL"
        );
        let r = postgres_refusal("28000", "no pg_hba.conf entry", &targets()).expect("class");
        assert_eq!(r.class, ErrorClass::Connect);
        assert_eq!(postgres_refusal("23505", "dup", &targets()), None);
    }

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        let all = [
            ErrorClass::Failure,
            ErrorClass::Usage,
            ErrorClass::Config,
            ErrorClass::Connect,
            ErrorClass::Schema,
            ErrorClass::Input,
            ErrorClass::NotFound,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.code(), b.code(), "{a:?} and {b:?}");
            }
            let line = format!("\n  {}  ", a.code());
            assert!(EXIT_CODES.contains(&line), "{a:?} not in the help");
        }
    }

    #[test]
    fn a_cause_already_said_is_not_repeated() {
        let e = anyhow::Error::from(std::io::Error::other("disk full"))
            .context("writing: disk full")
            .context("saving");
        assert_eq!(chain_text(&e), "saving: writing: disk full");
    }

    #[test]
    fn unserved_kinds_are_told_and_served_or_unknown_ones_not() {
        let q = "apiary.jobs".to_string();
        let builtins = Some(vec!["echo".to_string(), "sleep".to_string()]);
        assert_eq!(
            unserved_kind("echo", &q, &[(q.clone(), builtins.clone())]),
            None
        );
        let w = unserved_kind("send_mail", &q, &[(q.clone(), builtins.clone())]).expect("warned");
        assert!(
            w.contains("serves kind \"send_mail\" (they serve: echo, sleep)"),
            "{w}"
        );
        // A worker that does not say its kinds may serve it.
        assert_eq!(
            unserved_kind("send_mail", &q, &[(q.clone(), builtins), (q.clone(), None)]),
            None
        );
        // Workers of other queues do not count.
        let w = unserved_kind("echo", &q, &[("other".into(), None)]).expect("warned");
        assert!(w.starts_with("no worker is running on queue"), "{w}");
    }
}
