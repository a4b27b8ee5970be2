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
use std::time::Duration;

use crate::config::{Config, mask_url};

mod clock;
mod consumer_timeout;
mod postgres;
mod rabbitmq;

pub use clock::Skew;
pub use consumer_timeout::{TimeoutSource, judge_detach};

/// A clock difference above this makes `clock` warn: scheduled jobs and retries enqueued from
/// this host are due off by that much.
pub const SKEW_WARN: Duration = Duration::from_secs(1);
/// A clock difference above this makes `clock` fail.
pub const SKEW_FAIL: Duration = Duration::from_secs(60);
/// How long one connection attempt may take before the server counts as not answering.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `apiary doctor` options.
///
/// See the crate's [guarantees](crate#guarantees).
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
///
/// See the crate's [guarantees](crate#guarantees).
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
///
/// See the crate's [guarantees](crate#guarantees).
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
///
/// See the crate's [guarantees](crate#guarantees).
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
///
/// See the crate's [guarantees](crate#guarantees).
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
    findings.extend(postgres::check_postgres(cfg).await);
    findings.extend(rabbitmq::check_rabbitmq(cfg).await);
    findings.push(consumer_timeout::check_consumer_timeout(cfg, args).await);
    Report { findings }
}

#[cfg(test)]
mod tests {
    use super::*;

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
