//! `apiary doctor`: checks that this host can run Apiary against the configured servers, and
//! says what is wrong with the fix for each problem.
//!
//! | check | fails when | warns when |
//! | --- | --- | --- |
//! | `config` | a setting cannot work | |
//! | `postgres` | Postgres does not answer, refuses the login, or the database is missing | |
//! | `schema` | the schema is behind or ahead of this binary, or a migration failed or changed | |
//! | `clock` | this host's clock and Postgres's differ by more than [`SKEW_FAIL`] | by more than [`SKEW_WARN`] |
//! | `rabbitmq` | RabbitMQ does not answer or refuses the login | |
//! | `queues` | a queue is missing, or declared with other arguments than Apiary's | |
//! | `consumer_timeout` | `APIARY_DETACH_AFTER` is not below the broker's `consumer_timeout` | it is above half of it, or the timeout cannot be read |
//!
//! Exit status: 0 when no check failed (warnings allowed), 1 otherwise; with `--strict`,
//! warnings fail too.
//!
//! The queues' arguments are checked without the management plugin: a passive declare finds a
//! missing queue, and a declare with Apiary's own arguments is a no-op on a queue that has them
//! and is refused (`PRECONDITION_FAILED`, naming the argument) on one that does not.
//!
//! The broker's `consumer_timeout` is one broker-wide setting on RabbitMQ 3.10 that neither
//! AMQP nor the management API reports. Doctor takes it from
//! `APIARY_BROKER_CONSUMER_TIMEOUT` when given, else asks `rabbitmqctl` when the broker is on
//! this host and the tool is installed, else warns that it cannot check.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

use crate::broker::{self, BrokerError, QueueNames, topology};
use crate::config::{Config, mask_url};
use crate::store::schema::{self, SchemaState};

/// A clock difference above this makes `clock` warn: scheduled jobs and retries enqueued from
/// this host are due off by that much.
pub const SKEW_WARN: Duration = Duration::from_secs(1);
/// A clock difference above this makes `clock` fail.
pub const SKEW_FAIL: Duration = Duration::from_secs(60);
/// How long one connection attempt may take before the server counts as not answering.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `apiary doctor` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// The broker's `consumer_timeout` (`30m`, or `off` when disabled), for a broker whose
    /// setting doctor cannot read (not on this host, or no `rabbitmqctl` here). Find it with
    /// `rabbitmqctl environment | grep consumer_timeout` on the broker's host (milliseconds;
    /// 30 min unless configured).
    #[arg(long, env = "APIARY_BROKER_CONSUMER_TIMEOUT", value_parser = parse_broker_timeout)]
    pub broker_consumer_timeout: Option<BrokerTimeout>,
    /// Count warnings as failures (exit 1 on any warning too).
    #[arg(long)]
    pub strict: bool,
}

/// The broker's consumer timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerTimeout {
    /// Deliveries unacknowledged this long close their channel.
    After(Duration),
    /// No consumer timeout.
    Off,
}

fn parse_broker_timeout(s: &str) -> Result<BrokerTimeout, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(BrokerTimeout::Off);
    }
    crate::config::parse_duration(s).map(BrokerTimeout::After)
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Fine.
    Ok,
    /// Not checked, because a check it depends on failed.
    Skip,
    /// Works, but something is off or could not be checked.
    Warn,
    /// Will not work.
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so the report's `{:<5}` lines the columns up.
        f.pad(match self {
            Level::Ok => "ok",
            Level::Skip => "skip",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        })
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The check: `postgres`, `schema`, `queues`, ...
    pub check: &'static str,
    /// How it came out.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// What to do about it, when something is wrong.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            check,
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(
        check: &'static str,
        level: Level,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            level,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(check: &'static str, because: &str) -> Finding {
        Finding {
            check,
            level: Level::Skip,
            detail: format!("not checked: {because}"),
            fix: None,
        }
    }
}

/// Every check's outcome, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Findings at `level`.
    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// Whether all is well: nothing failed, and with `strict` nothing warned either.
    pub fn healthy(&self, strict: bool) -> bool {
        self.count(Level::Fail) == 0 && (!strict || self.count(Level::Warn) == 0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .findings
            .iter()
            .map(|x| x.check.len())
            .max()
            .unwrap_or(0);
        for x in &self.findings {
            writeln!(f, "{:<5} {:<width$}  {}", x.level, x.check, x.detail)?;
            if let Some(fix) = &x.fix {
                writeln!(f, "{:<5} {:<width$}  fix: {fix}", "", "")?;
            }
        }
        let (fails, warns) = (self.count(Level::Fail), self.count(Level::Warn));
        if fails == 0 && warns == 0 {
            writeln!(f, "all is well")
        } else {
            writeln!(f, "{fails} failed, {warns} warning(s)")
        }
    }
}

/// Runs every check, prints the report on stdout, and fails unless all is well.
pub async fn run(cfg: &Config, args: &DoctorArgs) -> anyhow::Result<()> {
    println!(
        "apiary doctor: DATABASE_URL={} AMQP_URL={} APIARY_QUEUE={}",
        mask_url(&cfg.database_url),
        mask_url(&cfg.amqp_url),
        cfg.queue
    );
    let report = examine(cfg, args).await;
    print!("{report}");
    if report.healthy(args.strict) {
        Ok(())
    } else if report.count(Level::Fail) > 0 {
        anyhow::bail!("doctor: {} check(s) failed", report.count(Level::Fail))
    } else {
        anyhow::bail!(
            "doctor: {} warning(s), and --strict counts them as failures",
            report.count(Level::Warn)
        )
    }
}

/// Runs every check.
pub async fn examine(cfg: &Config, args: &DoctorArgs) -> Report {
    let mut findings = vec![match cfg.clone().validate() {
        Ok(_) => Finding::ok("config", "the settings are valid"),
        Err(e) => Finding::bad(
            "config",
            Level::Fail,
            e.to_string(),
            "correct the variable it names (`apiary --help` lists each with its range)",
        ),
    }];
    findings.extend(check_postgres(cfg).await);
    findings.extend(check_rabbitmq(cfg).await);
    findings.push(check_consumer_timeout(cfg, args).await);
    Report { findings }
}

// ---- Postgres ----------------------------------------------------------------------------

async fn check_postgres(cfg: &Config) -> Vec<Finding> {
    let options = match PgConnectOptions::from_str(&cfg.database_url) {
        Ok(o) => o,
        Err(e) => {
            return vec![
                Finding::bad(
                    "postgres",
                    Level::Fail,
                    format!("DATABASE_URL does not parse: {}", mask_url(&e.to_string())),
                    "set DATABASE_URL to postgres://USER[:PASSWORD]@HOST:PORT/DATABASE",
                ),
                Finding::skip("schema", "no database"),
                Finding::skip("clock", "no database"),
            ];
        }
    };
    let at = format!("{}:{}", options.get_host(), options.get_port());
    let database = options.get_database().unwrap_or("postgres").to_string();
    let user = options.get_username().to_string();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await;
    let mut conn = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return vec![
                postgres_problem(&e, &at, &database, &user),
                Finding::skip("schema", "no connection to the database"),
                Finding::skip("clock", "no connection to the database"),
            ];
        }
        Err(_) => {
            return vec![
                Finding::bad(
                    "postgres",
                    Level::Fail,
                    format!(
                        "Postgres at {at} (DATABASE_URL) did not answer within {CONNECT_TIMEOUT:?}"
                    ),
                    "check that Postgres runs there and that nothing blocks the port",
                ),
                Finding::skip("schema", "no connection to the database"),
                Finding::skip("clock", "no connection to the database"),
            ];
        }
    };
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|_| "?".into());
    let mut out = vec![Finding::ok(
        "postgres",
        format!("PostgreSQL {version} answers at {at}, database \"{database}\""),
    )];
    out.push(match schema::read_applied(&mut conn).await {
        Ok(applied) => schema_finding(&schema::compare(applied.as_deref())),
        Err(e) => Finding::bad(
            "schema",
            Level::Fail,
            format!(
                "cannot read the applied migrations: {}",
                mask_url(&e.to_string())
            ),
            "check that the DATABASE_URL user may read _sqlx_migrations",
        ),
    });
    out.push(match measure_skew(&mut conn).await {
        Ok(s) => skew_finding(&s),
        Err(e) => Finding::bad(
            "clock",
            Level::Warn,
            format!("cannot read Postgres's clock: {e}"),
            "run doctor again; if it persists, check the Postgres logs",
        ),
    });
    let _ = sqlx::Connection::close(conn).await;
    out
}

/// A failed connection to Postgres as the person at the keyboard can act on it.
fn postgres_problem(e: &sqlx::Error, at: &str, database: &str, user: &str) -> Finding {
    let fail = |detail: String, fix: &str| Finding::bad("postgres", Level::Fail, detail, fix);
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("3D000") => fail(
                format!("Postgres at {at} answers, but the database \"{database}\" does not exist"),
                "run `apiary migrate`: it creates the database and its schema",
            ),
            Some("28P01" | "28000") => fail(
                format!(
                    "Postgres at {at} refused the login of user \"{user}\": {}",
                    db.message()
                ),
                "check the user and password in DATABASE_URL (and pg_hba.conf on the server)",
            ),
            _ => fail(
                format!("Postgres at {at} refused the connection: {}", db.message()),
                "see the Postgres server log for the reason",
            ),
        },
        sqlx::Error::Io(io) => fail(
            format!("Postgres at {at} (DATABASE_URL) does not answer: {io}"),
            "start Postgres, or point DATABASE_URL at the host and port where it runs",
        ),
        other => fail(
            format!(
                "cannot connect to Postgres at {at}: {}",
                mask_url(&other.to_string())
            ),
            "check DATABASE_URL and that Postgres runs there",
        ),
    }
}

fn schema_finding(state: &SchemaState) -> Finding {
    let expected = schema::expected_version();
    let fail = |detail: String, fix: &str| Finding::bad("schema", Level::Fail, detail, fix);
    match state {
        SchemaState::Current(v) => Finding::ok(
            "schema",
            format!("current: schema {v}, as this apiary expects"),
        ),
        SchemaState::Unmigrated => fail(
            format!("no migrations applied; this apiary expects schema {expected}"),
            "run `apiary migrate`",
        ),
        SchemaState::Behind { at, missing } => fail(
            format!(
                "behind: schema {at}, this apiary expects {expected} (missing {})",
                missing.join(", ")
            ),
            "run `apiary migrate`",
        ),
        SchemaState::Ahead { at, unknown } => fail(
            format!(
                "ahead: schema {at}, this apiary expects {expected} (unknown migrations {})",
                unknown
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "a newer apiary migrated this database: run that version, or point DATABASE_URL at \
             a database of this version",
        ),
        SchemaState::Dirty(v) => fail(
            format!("migration {v} failed part-way"),
            "find the cause in the Postgres log, undo what it did, delete its row from \
             _sqlx_migrations and run `apiary migrate` again",
        ),
        SchemaState::Changed(v) => fail(
            format!("migration {v} was applied from another file than this apiary's"),
            "run the apiary version that migrated this database, or restore migration {v} as \
             it was applied",
        ),
    }
}

/// This host's clock against Postgres's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skew {
    /// Postgres's clock minus this host's, at the midpoint of the round trip.
    pub offset: chrono::Duration,
    /// Half the round trip: the true offset lies within this much of [`Skew::offset`].
    pub uncertainty: chrono::Duration,
}

impl Skew {
    /// The offset measured by asking Postgres for its clock at `sent` and getting `db` back at
    /// `received` (both by this host's clock). The answer was read some time within the round
    /// trip; taking its midpoint leaves an error of at most half of it.
    pub fn measure(sent: DateTime<Utc>, db: DateTime<Utc>, received: DateTime<Utc>) -> Skew {
        let half = (received - sent) / 2;
        Skew {
            offset: db - (sent + half),
            uncertainty: half.abs(),
        }
    }

    /// The least the clocks can differ by, given the uncertainty.
    pub fn at_least(&self) -> Duration {
        (self.offset.abs() - self.uncertainty)
            .to_std()
            .unwrap_or(Duration::ZERO)
    }

    /// How bad it is: [`Level::Fail`] past [`SKEW_FAIL`], [`Level::Warn`] past [`SKEW_WARN`].
    pub fn level(&self) -> Level {
        let d = self.at_least();
        if d > SKEW_FAIL {
            Level::Fail
        } else if d > SKEW_WARN {
            Level::Warn
        } else {
            Level::Ok
        }
    }
}

/// The best of a few measurements: the one with the shortest round trip is the most exact.
async fn measure_skew(conn: &mut sqlx::PgConnection) -> Result<Skew, sqlx::Error> {
    let mut best: Option<Skew> = None;
    for _ in 0..3 {
        let sent = Utc::now();
        let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *conn)
            .await?;
        let s = Skew::measure(sent, db, Utc::now());
        if best.is_none_or(|b| s.uncertainty < b.uncertainty) {
            best = Some(s);
        }
    }
    best.ok_or(sqlx::Error::RowNotFound)
}

fn skew_finding(s: &Skew) -> Finding {
    let ms = s.offset.num_milliseconds();
    let direction = if ms >= 0 { "behind" } else { "ahead of" };
    let detail = format!(
        "this host's clock is {}ms {direction} Postgres's (±{}ms)",
        ms.abs(),
        s.uncertainty.num_milliseconds()
    );
    match s.level() {
        Level::Ok => Finding::ok("clock", detail),
        level => Finding::bad(
            "clock",
            level,
            detail,
            "synchronise the clocks of this host and the database server (NTP: chrony, \
             systemd-timesyncd); jobs scheduled from this host are due off by the difference",
        ),
    }
}

// ---- RabbitMQ ----------------------------------------------------------------------------

/// The AMQP error code of a failed call, if the broker sent one (404 not found, 406
/// precondition failed, 403 access refused).
fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => Some(a.get_id()),
        _ => None,
    }
}

/// The broker's own words for a failed call.
fn amqp_message(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => a.get_message().to_string(),
        _ => e.to_string(),
    }
}

async fn check_rabbitmq(cfg: &Config) -> Vec<Finding> {
    let (at, vhost, user) = match lapin::uri::AMQPUri::from_str(&cfg.amqp_url) {
        Ok(u) => (
            format!("{}:{}", u.authority.host, u.authority.port),
            u.vhost,
            u.authority.userinfo.username,
        ),
        Err(e) => {
            return vec![
                Finding::bad(
                    "rabbitmq",
                    Level::Fail,
                    format!("AMQP_URL does not parse: {}", mask_url(&e)),
                    "set AMQP_URL to amqp://USER:PASSWORD@HOST:PORT/VHOST",
                ),
                Finding::skip("queues", "no broker"),
            ];
        }
    };
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        broker::connect(&cfg.amqp_url, "apiary doctor"),
    )
    .await;
    let conn = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return vec![
                rabbitmq_problem(&e, &at, &user, &vhost),
                Finding::skip("queues", "RabbitMQ not reached"),
            ];
        }
        Err(_) => {
            return vec![
                Finding::bad(
                    "rabbitmq",
                    Level::Fail,
                    format!(
                        "RabbitMQ at {at} (AMQP_URL) did not answer within {CONNECT_TIMEOUT:?}"
                    ),
                    "check that RabbitMQ runs there and that nothing blocks the port",
                ),
                Finding::skip("queues", "RabbitMQ not reached"),
            ];
        }
    };
    let mut out = vec![Finding::ok(
        "rabbitmq",
        format!("RabbitMQ answers at {at}, vhost \"{vhost}\""),
    )];
    out.extend(check_queues(&conn, &QueueNames::new(&cfg.queue)).await);
    let _ = conn.close(200, "doctor done".into()).await;
    out
}

fn rabbitmq_problem(e: &BrokerError, at: &str, user: &str, vhost: &str) -> Finding {
    fn fail(detail: String, fix: impl Into<String>) -> Finding {
        Finding::bad("rabbitmq", Level::Fail, detail, fix)
    }
    let BrokerError::Amqp { source, .. } = e else {
        return fail(
            format!("cannot connect to RabbitMQ at {at}: {e}"),
            "check AMQP_URL and that RabbitMQ runs there",
        );
    };
    match source.kind() {
        lapin::ErrorKind::IOError(io) => fail(
            format!("RabbitMQ at {at} (AMQP_URL) does not answer: {io}"),
            "start RabbitMQ, or point AMQP_URL at the host and port where it runs",
        ),
        _ if amqp_code(source) == Some(403) || source.to_string().contains("ACCESS_REFUSED") => {
            fail(
                format!("RabbitMQ at {at} refused the login of user \"{user}\""),
                "check the user, password and vhost in AMQP_URL (`rabbitmqctl list_users`, \
                 `list_permissions`)",
            )
        }
        // 530 NOT_ALLOWED at connection.open: no such vhost, or no permission on it.
        _ if amqp_code(source) == Some(530) => fail(
            format!(
                "RabbitMQ at {at} does not let user \"{user}\" use vhost \"{vhost}\": {}",
                amqp_message(source)
            ),
            format!(
                "correct the vhost at the end of AMQP_URL (%2f is \"/\"), or create it and grant \
                 access: `rabbitmqctl add_vhost {vhost}`, `rabbitmqctl set_permissions -p {vhost} \
                 {user} \".*\" \".*\" \".*\"`"
            ),
        ),
        _ => fail(
            format!(
                "cannot connect to RabbitMQ at {at}: {}",
                mask_url(&source.to_string())
            ),
            "check AMQP_URL and that RabbitMQ runs there",
        ),
    }
}

/// Each queue: there (a passive declare), and with Apiary's arguments (a declare with them,
/// which the broker refuses on a queue declared otherwise, naming the argument). A queue that
/// exists with the same arguments is left as it was; doctor creates a queue only if one is
/// deleted in the instant between its two declares, and then as `apiary migrate` would.
async fn check_queues(conn: &lapin::Connection, names: &QueueNames) -> Vec<Finding> {
    let specs = topology::specs(names);
    let total = specs.len();
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for spec in specs {
        // A refused declare closes its channel: one channel per queue.
        let channel = match conn.create_channel().await {
            Ok(c) => c,
            Err(e) => {
                out.push(Finding::bad(
                    "queues",
                    Level::Fail,
                    format!("cannot open a channel: {e}"),
                    "check the broker's channel_max and its log",
                ));
                return out;
            }
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let exists = channel
            .queue_declare(spec.name.as_str().into(), passive, FieldTable::default())
            .await;
        match exists {
            Ok(_) => {}
            Err(e) if amqp_code(&e) == Some(404) => {
                missing.push(spec.name);
                continue;
            }
            Err(e) => {
                out.push(Finding::bad(
                    "queues",
                    Level::Fail,
                    format!("cannot look up queue {}: {}", spec.name, amqp_message(&e)),
                    "check that the AMQP_URL user may configure queues in the vhost",
                ));
                continue;
            }
        }
        match channel
            .queue_declare(spec.name.as_str().into(), topology::durable(), spec.args)
            .await
        {
            Ok(_) => {
                let _ = channel.close(200, "checked".into()).await;
            }
            Err(e) if amqp_code(&e) == Some(406) => out.push(Finding::bad(
                "queues",
                Level::Fail,
                format!(
                    "queue {} has other arguments than Apiary declares: {}",
                    spec.name,
                    amqp_message(&e)
                ),
                format!(
                    "move its messages elsewhere (a shovel), delete it \
                     (`rabbitmqctl delete_queue {}`), and run `apiary migrate`",
                    spec.name
                ),
            )),
            Err(e) => out.push(Finding::bad(
                "queues",
                Level::Fail,
                format!("cannot check queue {}: {}", spec.name, amqp_message(&e)),
                "check that the AMQP_URL user may configure queues in the vhost",
            )),
        }
    }
    if !missing.is_empty() {
        out.insert(
            0,
            Finding::bad(
                "queues",
                Level::Fail,
                format!(
                    "{} of {total} queues are not declared: {}",
                    missing.len(),
                    missing.join(", ")
                ),
                "run `apiary migrate` (with the same APIARY_QUEUE)",
            ),
        );
    }
    if out.is_empty() {
        out.push(Finding::ok(
            "queues",
            format!(
                "all {total} queues of \"{}\" exist with the expected arguments",
                names.work
            ),
        ));
    }
    out
}

// ---- consumer_timeout --------------------------------------------------------------------

/// Where the broker's consumer timeout was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutSource {
    /// `APIARY_BROKER_CONSUMER_TIMEOUT`.
    Stated,
    /// `rabbitmqctl eval` on this host.
    Rabbitmqctl,
}

impl fmt::Display for TimeoutSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutSource::Stated => "from APIARY_BROKER_CONSUMER_TIMEOUT",
            TimeoutSource::Rabbitmqctl => "read with rabbitmqctl",
        })
    }
}

async fn check_consumer_timeout(cfg: &Config, args: &DoctorArgs) -> Finding {
    let known = match args.broker_consumer_timeout {
        Some(t) => Ok((t, TimeoutSource::Stated)),
        None => read_consumer_timeout(&cfg.amqp_url)
            .await
            .map(|t| (t, TimeoutSource::Rabbitmqctl)),
    };
    match known {
        Ok((timeout, source)) => judge_detach(cfg.detach_after, timeout, source),
        Err(why) => Finding::bad(
            "consumer_timeout",
            Level::Warn,
            format!(
                "cannot read the broker's consumer_timeout to compare with APIARY_DETACH_AFTER \
                 ({}): {why}",
                show(cfg.detach_after)
            ),
            "set APIARY_BROKER_CONSUMER_TIMEOUT to the broker's value (`rabbitmqctl environment \
             | grep consumer_timeout` on its host; 30m unless configured)",
        ),
    }
}

fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `APIARY_DETACH_AFTER` against the broker's consumer timeout. A delivery can wait up to
/// `detach_after` for a free slot (then it is handed back) and then run up to `detach_after`
/// before it is acked, so it may stay unacknowledged for nearly twice `detach_after`: at or
/// past the timeout fails, past half of it warns.
pub fn judge_detach(
    detach_after: Duration,
    timeout: BrokerTimeout,
    source: TimeoutSource,
) -> Finding {
    let BrokerTimeout::After(timeout) = timeout else {
        return Finding::ok(
            "consumer_timeout",
            format!("the broker has no consumer timeout ({source})"),
        );
    };
    let both = format!(
        "APIARY_DETACH_AFTER ({}) against the broker's consumer_timeout ({}, {source})",
        show(detach_after),
        show(timeout)
    );
    let fix = format!(
        "set APIARY_DETACH_AFTER below {} (half the consumer_timeout), or raise consumer_timeout \
         in rabbitmq.conf",
        show(timeout / 2)
    );
    if detach_after >= timeout {
        Finding::bad(
            "consumer_timeout",
            Level::Fail,
            format!(
                "{both}: a job running longer than the timeout has its channel closed by the \
                 broker before it detaches"
            ),
            fix,
        )
    } else if detach_after.saturating_mul(2) >= timeout {
        Finding::bad(
            "consumer_timeout",
            Level::Warn,
            format!(
                "{both}: a delivery may wait APIARY_DETACH_AFTER for a free slot and then run as \
                 long before its ack, past the timeout"
            ),
            fix,
        )
    } else {
        Finding::ok("consumer_timeout", format!("{both}: well below"))
    }
}

/// Reads `consumer_timeout` from the broker with `rabbitmqctl`, when the broker is on this
/// host. The error says why it could not.
async fn read_consumer_timeout(amqp_url: &str) -> Result<BrokerTimeout, String> {
    let host = lapin::uri::AMQPUri::from_str(amqp_url)
        .map(|u| u.authority.host)
        .map_err(|_| "AMQP_URL does not parse".to_string())?;
    let local = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local {
        return Err(format!(
            "the broker is on {host}, not this host, and RabbitMQ 3.10 reports the setting \
             neither over AMQP nor through the management API"
        ));
    }
    let run = tokio::process::Command::new("rabbitmqctl")
        .args(["eval", "application:get_env(rabbit, consumer_timeout)."])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("rabbitmqctl is not installed on this host".into());
        }
        Ok(Err(e)) => return Err(format!("rabbitmqctl did not run: {e}")),
        Err(_) => return Err("rabbitmqctl did not answer within 30s".into()),
    };
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        let first = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!("rabbitmqctl failed ({}): {first}", out.status));
    }
    parse_get_env(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| "rabbitmqctl answered something unexpected".to_string())
}

/// The broker's answer to `application:get_env(rabbit, consumer_timeout)`: `{ok,1800000}`;
/// anything but an integer (`undefined`, `{ok,undefined}`, `{ok,false}`) disables the timeout,
/// as the broker reads it.
fn parse_get_env(text: &str) -> Option<BrokerTimeout> {
    let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if t == "undefined" {
        return Some(BrokerTimeout::Off);
    }
    let value = t.strip_prefix("{ok,")?.strip_suffix('}')?;
    match value.parse::<u64>() {
        Ok(ms) => Some(BrokerTimeout::After(Duration::from_millis(ms))),
        Err(_) if value.chars().all(|c| c.is_ascii_lowercase() || c == '_') => {
            Some(BrokerTimeout::Off)
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + ms).unwrap_or_default()
    }

    #[test]
    fn skew_is_measured_from_the_midpoint_of_the_round_trip() {
        // Asked at 0, answered at 100: Postgres said 2050, so it is 2000 ahead, ±50.
        let s = Skew::measure(at(0), at(2_050), at(100));
        assert_eq!(s.offset.num_milliseconds(), 2_000);
        assert_eq!(s.uncertainty.num_milliseconds(), 50);
        assert_eq!(s.at_least(), Duration::from_millis(1_950));
        assert_eq!(s.level(), Level::Warn);
        // Behind works the same.
        let s = Skew::measure(at(0), at(-90_000), at(10));
        assert_eq!(s.offset.num_milliseconds(), -90_005);
        assert_eq!(s.level(), Level::Fail);
        // The true offset is only known within half the round trip: 1000 ± 500 is at least 500.
        let s = Skew::measure(at(0), at(1_500), at(1_000));
        assert_eq!(s.at_least(), Duration::from_millis(500));
        assert_eq!(s.level(), Level::Ok);
        // A slow round trip that could hide the whole offset proves no skew at all.
        let s = Skew::measure(at(0), at(4_000), at(6_000));
        assert_eq!(s.offset.num_milliseconds(), 1_000);
        assert_eq!(s.at_least(), Duration::ZERO);
        assert_eq!(Skew::measure(at(0), at(5), at(10)).level(), Level::Ok);
    }

    #[test]
    fn a_skew_finding_says_which_way_and_how_to_fix_it() {
        let f = skew_finding(&Skew::measure(at(0), at(-5_000), at(0)));
        assert_eq!(f.level, Level::Warn);
        assert!(
            f.detail.contains("5000ms ahead of Postgres's"),
            "{}",
            f.detail
        );
        assert!(f.fix.is_some_and(|x| x.contains("NTP")));
    }

    #[test]
    fn detach_after_must_stay_below_the_consumer_timeout() {
        let m = |n: u64| Duration::from_secs(60 * n);
        let src = TimeoutSource::Stated;
        let j = |d, t| judge_detach(d, BrokerTimeout::After(t), src).level;
        assert_eq!(j(m(10), m(30)), Level::Ok);
        assert_eq!(j(m(15), m(30)), Level::Warn);
        assert_eq!(j(m(20), m(30)), Level::Warn);
        assert_eq!(j(m(30), m(30)), Level::Fail);
        assert_eq!(j(m(45), m(30)), Level::Fail);
        assert_eq!(
            judge_detach(m(600), BrokerTimeout::Off, src).level,
            Level::Ok
        );
        let f = judge_detach(
            m(45),
            BrokerTimeout::After(m(30)),
            TimeoutSource::Rabbitmqctl,
        );
        assert!(
            f.detail.contains("APIARY_DETACH_AFTER (45m)"),
            "{}",
            f.detail
        );
        assert!(
            f.detail.contains("(30m, read with rabbitmqctl)"),
            "{}",
            f.detail
        );
        assert!(f.fix.is_some_and(|x| x.contains("below 15m")));
    }

    #[test]
    fn the_broker_answer_parses() {
        assert_eq!(
            parse_get_env("{ok,1800000}\n"),
            Some(BrokerTimeout::After(Duration::from_secs(1800)))
        );
        assert_eq!(parse_get_env("undefined\n"), Some(BrokerTimeout::Off));
        assert_eq!(parse_get_env("{ok,undefined}"), Some(BrokerTimeout::Off));
        assert_eq!(parse_get_env("{ok, false}"), Some(BrokerTimeout::Off));
        assert_eq!(parse_get_env("{badrpc,nodedown}"), None);
        assert_eq!(parse_broker_timeout("off"), Ok(BrokerTimeout::Off));
        assert_eq!(
            parse_broker_timeout("30m"),
            Ok(BrokerTimeout::After(Duration::from_secs(1800)))
        );
    }

    #[test]
    fn warnings_fail_only_when_strict() {
        let r = Report {
            findings: vec![
                Finding::ok("a", "fine"),
                Finding::bad("b", Level::Warn, "meh", "do x"),
                Finding::skip("c", "b"),
            ],
        };
        assert!(r.healthy(false));
        assert!(!r.healthy(true));
        let text = r.to_string();
        assert!(text.contains("warn  b  meh\n"), "{text}");
        assert!(text.contains("      fix: do x"), "{text}");
        assert!(text.ends_with("0 failed, 1 warning(s)\n"), "{text}");
    }
}
