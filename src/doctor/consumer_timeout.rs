//! The `consumer_timeout` check: `APIARY_DETACH_AFTER` against the broker's consumer timeout.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::{BrokerTimeout, DoctorArgs, Finding, Level};
use crate::config::Config;

/// Where the broker's consumer timeout was learnt.
///
/// See the crate's [guarantees](crate#guarantees).
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

pub(super) async fn check_consumer_timeout(cfg: &Config, args: &DoctorArgs) -> Finding {
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
    // The first address of the list: rabbitmqctl reads the node on this host.
    let first = crate::config::url_list(amqp_url)
        .first()
        .copied()
        .unwrap_or(amqp_url);
    let host = lapin::uri::AMQPUri::from_str(first)
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
    use crate::doctor::parse_broker_timeout;

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
}
