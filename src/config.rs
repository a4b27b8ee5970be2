//! Every setting, its environment variable and its default, read once and validated once.
//!
//! The same struct is the `clap` argument group of the binary, so `apiary --help` and
//! `apiary worker --help` list each variable with its default; [`Config::from_env`] reads it
//! without a command line for library users and tests.
//!
//! A setting that cannot work is refused at start-up with a [`ConfigError`] naming the
//! variable and its allowed range (`APIARY_PRUNE_INTERVAL is 0s; it must be between 100ms and
//! 1d`), never found later as a panic deep in a task. The ranges live in one table of
//! constants below, used both by the parsers clap runs and by [`Config::validate`], so a
//! `Config` built in code is held to the same limits as one read from the environment.
//!
//! Connection strings carry passwords: [`mask_url`] hides them, and every message this module
//! makes about a URL goes through it, as does `Config`'s `Debug`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

pub use crate::broker::topology::QueueType;

/// Parses `25s`, `150ms`, `10m`, `7d` and the like.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 25s, 150ms or 10m: {e}"))
}

/// The range a duration setting must lie in, and the variable it comes from.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy)]
pub struct DurationRange {
    /// The environment variable.
    pub var: &'static str,
    /// The shortest allowed value.
    pub min: Duration,
    /// The longest allowed value.
    pub max: Duration,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// `APIARY_LEASE`: at least 1 s, since heartbeats come every lease/5 and each is a write.
pub const LEASE: DurationRange = DurationRange {
    var: "APIARY_LEASE",
    min: secs(1),
    max: secs(HOUR),
};
/// `APIARY_PRUNE_INTERVAL`: the pause between pruning passes; zero would spin.
pub const PRUNE_INTERVAL: DurationRange = DurationRange {
    var: "APIARY_PRUNE_INTERVAL",
    min: ms(100),
    max: secs(DAY),
};
/// `APIARY_DRAIN_TIMEOUT`: 0 hands everything back at once on SIGTERM.
pub const DRAIN_TIMEOUT: DurationRange = DurationRange {
    var: "APIARY_DRAIN_TIMEOUT",
    min: Duration::ZERO,
    max: secs(HOUR),
};
/// `APIARY_JOB_TIMEOUT`, and `timeout=` in `APIARY_KINDS`.
pub const JOB_TIMEOUT: DurationRange = DurationRange {
    var: "APIARY_JOB_TIMEOUT",
    min: ms(10),
    max: secs(7 * DAY),
};
/// `APIARY_RETRY_BASE`, and `retry_base=` in `APIARY_KINDS`.
pub const RETRY_BASE: DurationRange = DurationRange {
    var: "APIARY_RETRY_BASE",
    min: ms(1),
    max: secs(DAY),
};
/// `APIARY_RETRY_CAP`, and `retry_cap=` in `APIARY_KINDS`; also at least the retry base.
pub const RETRY_CAP: DurationRange = DurationRange {
    var: "APIARY_RETRY_CAP",
    min: ms(1),
    max: secs(7 * DAY),
};
/// `APIARY_DETACH_AFTER`: must stay below the broker's `consumer_timeout`, which Apiary
/// cannot read; a day is above any sane one.
pub const DETACH_AFTER: DurationRange = DurationRange {
    var: "APIARY_DETACH_AFTER",
    min: ms(100),
    max: secs(DAY),
};
/// `APIARY_OUTBOX_GRACE`: shorter would republish messages whose confirm is merely slow.
pub const OUTBOX_GRACE: DurationRange = DurationRange {
    var: "APIARY_OUTBOX_GRACE",
    min: ms(100),
    max: secs(HOUR),
};
/// `APIARY_WEBHOOK_TIMEOUT`: the whole of one delivery's request, connect included.
pub const WEBHOOK_TIMEOUT: DurationRange = DurationRange {
    var: "APIARY_WEBHOOK_TIMEOUT",
    min: ms(100),
    max: secs(300),
};

/// `APIARY_RETENTION`, and `retention=` in `APIARY_KINDS`: at least a second, so a result
/// can be read before it goes.
pub const RETENTION: DurationRange = DurationRange {
    var: "APIARY_RETENTION",
    min: secs(1),
    max: secs(3650 * DAY),
};

impl DurationRange {
    /// `value` if it lies in the range, else a message naming `name` and the range.
    fn check_as(&self, name: &str, value: Duration) -> Result<Duration, String> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(format!(
                "{name} is {}; it must be between {} and {}",
                show(value),
                show(self.min),
                show(self.max)
            ))
        }
    }

    /// `value` if it lies in the range, else a [`ConfigError`] naming the variable.
    pub fn check(&self, value: Duration) -> Result<Duration, ConfigError> {
        self.check_as(self.var, value).map_err(ConfigError)
    }

    /// Parses and checks a value of `name` (the variable, or a key of `APIARY_KINDS`).
    fn parse_as(&self, name: &str, s: &str) -> Result<Duration, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|_| {
            format!(
                "{name} is {s:?}; it must be a duration like 25s, 150ms or 10m, between {} and {}",
                show(self.min),
                show(self.max)
            )
        })?;
        self.check_as(name, d)
    }

    /// The parser clap runs for this setting.
    fn parse(&self, s: &str) -> Result<Duration, String> {
        self.parse_as(self.var, s)
    }
}

/// A duration as short as it can be written exactly: `0s`, `150ms`, `10m`, `7d`.
fn show(d: Duration) -> String {
    let units: [(u128, &str); 5] = [
        (u128::from(DAY) * 1000, "d"),
        (u128::from(HOUR) * 1000, "h"),
        (60_000, "m"),
        (1000, "s"),
        (1, "ms"),
    ];
    let total = d.as_millis();
    if d.is_zero() {
        return "0s".into();
    }
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        for (unit, name) in units {
            if total.is_multiple_of(unit) {
                return format!("{}{name}", total / unit);
            }
        }
    }
    humantime::format_duration(d).to_string()
}

/// The range a count setting must lie in, and the variable it comes from.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy)]
pub struct CountRange {
    /// The environment variable.
    pub var: &'static str,
    /// The smallest allowed value.
    pub min: u64,
    /// The largest allowed value.
    pub max: u64,
}

/// `APIARY_CONCURRENCY`: at most 10,000, so twice it (the default prefetch) still fits
/// AMQP's 16-bit prefetch count and one process's handler slots stay countable.
pub const CONCURRENCY: CountRange = CountRange {
    var: "APIARY_CONCURRENCY",
    min: 1,
    max: 10_000,
};
/// `APIARY_PREFETCH`: AMQP's prefetch count is 16 bits; 0 means twice the concurrency.
pub const PREFETCH: CountRange = CountRange {
    var: "APIARY_PREFETCH",
    min: 0,
    max: u16::MAX as u64,
};
/// `APIARY_DB_POOL`: a worker needs two connections at once (claims and completions).
pub const DB_POOL: CountRange = CountRange {
    var: "APIARY_DB_POOL",
    min: 2,
    max: 1000,
};
/// `APIARY_BATCH`: one NOTIFY carries a batch's ids; 200 of them stay under Postgres's
/// 8000-byte payload limit.
pub const BATCH: CountRange = CountRange {
    var: "APIARY_BATCH",
    min: 1,
    max: 200,
};
/// `APIARY_MAX_PAYLOAD_BYTES`: 1 KiB to 64 MiB. Below, a poison message's error and body no
/// longer fit; above, a message nears RabbitMQ's own limit and one job's body would be a
/// sizeable share of a worker's memory.
pub const MAX_PAYLOAD_BYTES: CountRange = CountRange {
    var: "APIARY_MAX_PAYLOAD_BYTES",
    min: 1024,
    max: 64 << 20,
};
/// `APIARY_WEBHOOK_MAX_BYTES`: a record larger than this is delivered without its payload
/// and result.
pub const WEBHOOK_MAX_BYTES: CountRange = CountRange {
    var: "APIARY_WEBHOOK_MAX_BYTES",
    min: 1024,
    max: 64 << 20,
};
/// `APIARY_MAX_ATTEMPTS`, and `max_attempts=` in `APIARY_KINDS`: the schema's CHECK.
pub const MAX_ATTEMPTS: CountRange = CountRange {
    var: "APIARY_MAX_ATTEMPTS",
    min: 1,
    max: crate::job::MAX_ATTEMPTS_LIMIT as u64,
};

impl CountRange {
    fn message(&self, name: &str, value: impl fmt::Display) -> String {
        format!(
            "{name} is {value}; it must be between {} and {}",
            self.min, self.max
        )
    }

    /// `value` if it lies in the range, else a [`ConfigError`] naming the variable.
    pub fn check<T: Copy + TryInto<u64> + fmt::Display>(&self, value: T) -> Result<T, ConfigError> {
        match value.try_into() {
            Ok(v) if (self.min..=self.max).contains(&v) => Ok(value),
            _ => Err(ConfigError(self.message(self.var, value))),
        }
    }

    /// Parses and checks a value of `name`.
    fn parse_as<T: TryFrom<u64>>(&self, name: &str, s: &str) -> Result<T, String> {
        let v: u64 = s.trim().parse().map_err(|_| {
            format!(
                "{name} is {s:?}; it must be a whole number between {} and {}",
                self.min, self.max
            )
        })?;
        if !(self.min..=self.max).contains(&v) {
            return Err(self.message(name, v));
        }
        // Every range above fits its field's type, so this only fails if a range is wrong.
        T::try_from(v).map_err(|_| self.message(name, v))
    }

    /// The parser clap runs for this setting.
    fn parse<T: TryFrom<u64>>(&self, s: &str) -> Result<T, String> {
        self.parse_as(self.var, s)
    }
}

/// Parses a listen address, naming `var` if it is not one.
fn parse_addr(var: &str, s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{var} is {s:?}; it must be an address like 127.0.0.1:8080"))
}

/// Parses `APIARY_QUEUE_TYPE`.
fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    QueueType::parse(s)
        .ok_or_else(|| format!("APIARY_QUEUE_TYPE is {s:?}; it must be classic or quorum"))
}

/// The items of a comma-separated list of connection strings (`AMQP_URL`), trimmed, empty
/// ones left out.
pub fn url_list(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Parses `APIARY_LOG_FORMAT`.
fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim() {
        "human" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!(
            "APIARY_LOG_FORMAT is {s:?}; it must be human or json"
        )),
    }
}

/// `text` with the password of every URL in it replaced by `***`: the `user:password@` of
/// `postgres://user:password@host/db`, and any `password=` parameter. For logs and errors:
/// a connection string may appear in both, its password never.
///
/// Text without a password comes back unchanged. Where a URL is malformed (say, a password
/// with a raw `/`), more is masked rather than less.
pub fn mask_url(text: &str) -> String {
    if !text.contains("://") && !contains_ignore_case(text, "password=") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The URL runs to the first character that cannot be in one unescaped.
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .unwrap_or(after.len());
        // In a list (`amqp://a:pw@h1,amqp://b:pw@h2`) it ends at the comma before the next
        // URL: a comma inside a password is followed by no scheme.
        let end = match after[..end].find("://") {
            Some(next) => after[..next].rfind(',').unwrap_or(end),
            None => end,
        };
        let (url, tail) = after.split_at(end);
        // The authority ends at the query or fragment; its userinfo at its last '@'.
        let authority_end = url.find(['?', '#']).unwrap_or(url.len());
        match url[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                let userinfo = &url[..userinfo_end];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str("***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&url[userinfo_end..]);
            }
            None => out.push_str(url),
        }
        rest = tail;
    }
    out.push_str(rest);
    mask_password_params(&out)
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .to_ascii_lowercase()
        .contains(&needle.to_ascii_lowercase())
}

/// Masks the value of every `...password=VALUE` (`password`, `sslpassword`; Postgres takes
/// both as URL parameters).
fn mask_password_params(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    if !lower.contains("password=") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    // `lower` has the same byte offsets as `text`: ASCII lowering keeps every char's length.
    while let Some(found) = lower[from..].find("password=") {
        let value_start = from + found + "password=".len();
        out.push_str(&text[from..value_start]);
        let value_len = text[value_start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '&' | '#' | '"' | '\'' | '<' | '>'))
            .unwrap_or(text.len() - value_start);
        if value_len > 0 {
            out.push_str("***");
        }
        from = value_start + value_len;
    }
    out.push_str(&text[from..]);
    out
}

/// Checks a connection string: it must be a URL with one of `schemes`, and `parse` (the
/// driver's own parser) must accept it. Messages show it masked.
fn check_url(
    var: &str,
    url: &str,
    schemes: &[&str],
    parse: impl FnOnce(&str) -> Result<(), String>,
) -> Result<(), ConfigError> {
    let expected = schemes
        .iter()
        .map(|s| format!("{s}://"))
        .collect::<Vec<_>>()
        .join(" or ");
    let Some((scheme, _)) = url.split_once("://") else {
        // Not shown at all: without "://" nothing marks where a password would be.
        return Err(ConfigError(format!(
            "{var} is not a URL; it must start with {expected}"
        )));
    };
    if !schemes.contains(&scheme) {
        return Err(ConfigError(format!(
            "{var} is {}; it must start with {expected}",
            mask_url(url)
        )));
    }
    parse(url).map_err(|e| {
        ConfigError(format!(
            "{var} is {}; it does not parse: {}",
            mask_url(url),
            mask_url(&e)
        ))
    })
}

/// The longest deployment prefix (`APIARY_QUEUE`): with `:<queue>:delay:<ms>` after it, a
/// broker name stays within RabbitMQ's 255 bytes.
pub const MAX_PREFIX_BYTES: usize = 170;

/// Apiary's settings. Each field names its environment variable and default. The leases,
/// retries and drain they tune serve the crate's [guarantees](crate#guarantees).
///
/// `Debug` masks the passwords in the connection strings and leaves out the API tokens.
#[derive(Clone, Args)]
pub struct Config {
    /// Postgres connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/apiary",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// RabbitMQ connection string, or several, comma-separated
    /// (`amqp://a:5672/%2f,amqp://b:5672/%2f`): the nodes of one cluster, tried in order; after
    /// a lost connection the next attempt starts from the address after the one lost.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        global = true
    )]
    pub amqp_url: String,

    /// The deployment's prefix, and the broker name of its `default` queue. Every other
    /// broker name derives from it (`<prefix>.dead`, `<prefix>.delay.<tier>`, `<prefix>:<queue>`
    /// for a named queue), so deployments sharing a broker stay apart.
    #[arg(
        long = "prefix",
        env = "APIARY_QUEUE",
        default_value = "apiary.jobs",
        global = true
    )]
    pub queue: String,

    /// The type of every broker queue Apiary declares: `classic` or `quorum` (replicated across
    /// the cluster; RabbitMQ 3.x gives quorum queues no priorities, so job priorities are
    /// ignored). A queue's type cannot change in place: `apiary migrate-queues --to quorum`
    /// moves existing queues.
    #[arg(
        long,
        env = "APIARY_QUEUE_TYPE",
        default_value = "classic",
        value_parser = parse_queue_type,
        global = true
    )]
    pub queue_type: QueueType,

    /// Where `apiary api` listens.
    #[arg(
        long,
        env = "APIARY_HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        value_parser = |s: &str| parse_addr("APIARY_HTTP_ADDR", s),
        global = true
    )]
    pub http_addr: SocketAddr,

    /// Bearer tokens and their scopes, `TOKEN:scope+scope,...` (scopes: enqueue, read, admin).
    /// Empty: no authentication, and the API listens on loopback only.
    #[arg(
        long,
        env = "APIARY_API_TOKENS",
        default_value = "",
        hide_env_values = true,
        value_parser = crate::tokens::parse_tokens,
        global = true
    )]
    pub api_tokens: crate::tokens::Tokens,

    /// Where `apiary worker` serves /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "APIARY_WORKER_HTTP_ADDR",
        default_value = "127.0.0.1:9090",
        value_parser = |s: &str| parse_addr("APIARY_WORKER_HTTP_ADDR", s),
        global = true
    )]
    pub worker_http_addr: SocketAddr,

    /// The queues `apiary worker` consumes, each with how many of its jobs run at once:
    /// `default:64,emails:16,reports:2`. A slow queue never takes the slots of a fast one.
    /// Empty: the `default` queue, with `APIARY_CONCURRENCY`.
    #[arg(long, env = "APIARY_QUEUES", default_value = "", value_parser = parse_queues, global = true)]
    pub queues: QueueSettings,

    /// Per-queue settings: `reports:rate=5/s;emails:rate=100/m,shards=4`. A queue's `rate`
    /// counts the starts of all its jobs, whatever their kind, across every worker; its
    /// `shards` spreads its messages over that many broker work queues (default 1). Every
    /// producer and worker should be given the same value.
    #[arg(long, env = "APIARY_QUEUE_OPTIONS", default_value = "", value_parser = parse_queue_options, global = true)]
    pub queue_options: QueueOptionSettings,

    /// Jobs one worker process runs at once, when `APIARY_QUEUES` is not set (1 to 10000).
    #[arg(long, env = "APIARY_CONCURRENCY", default_value_t = 256, value_parser = |s: &str| CONCURRENCY.parse::<usize>(s), global = true)]
    pub concurrency: usize,

    /// Unacknowledged deliveries one worker holds; 0 means twice the concurrency, so the next
    /// jobs are already local while finished ones wait for their batched commit.
    #[arg(long, env = "APIARY_PREFETCH", default_value_t = 0, value_parser = |s: &str| PREFETCH.parse::<u16>(s), global = true)]
    pub prefetch: u16,

    /// Postgres connections per process (2 to 1000).
    #[arg(long, env = "APIARY_DB_POOL", default_value_t = 16, value_parser = |s: &str| DB_POOL.parse::<u32>(s), global = true)]
    pub db_pool: u32,

    /// Largest accepted payload (API) and message body (worker), in bytes (1 KiB to 64 MiB).
    #[arg(long, env = "APIARY_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20, value_parser = |s: &str| MAX_PAYLOAD_BYTES.parse::<usize>(s), global = true)]
    pub max_payload_bytes: usize,

    /// Attempts allowed when a job does not say (1 to 1000).
    #[arg(long, env = "APIARY_MAX_ATTEMPTS", default_value_t = 5, value_parser = |s: &str| MAX_ATTEMPTS.parse::<i32>(s), global = true)]
    pub max_attempts: i32,

    /// First retry delay; later ones double, with full jitter (1ms to 1d).
    #[arg(long, env = "APIARY_RETRY_BASE", default_value = "1s", value_parser = |s: &str| RETRY_BASE.parse(s), global = true)]
    pub retry_base: Duration,

    /// Longest retry delay (1ms to 7d, at least the retry base).
    #[arg(long, env = "APIARY_RETRY_CAP", default_value = "10m", value_parser = |s: &str| RETRY_CAP.parse(s), global = true)]
    pub retry_cap: Duration,

    /// Longest one attempt may run before it is cancelled and counted as failed (10ms to 7d).
    #[arg(long, env = "APIARY_JOB_TIMEOUT", default_value = "5m", value_parser = |s: &str| JOB_TIMEOUT.parse(s), global = true)]
    pub job_timeout: Duration,

    /// How long a worker's claim on a job lasts without a heartbeat. A killed worker's jobs
    /// run elsewhere at most this long after its last heartbeat (1s to 1h).
    #[arg(long, env = "APIARY_LEASE", default_value = "10s", value_parser = |s: &str| LEASE.parse(s), global = true)]
    pub lease: Duration,

    /// A job still running after this long has its message acked and is protected by its
    /// lease alone, so RabbitMQ's consumer timeout (30 min by default) never closes the channel
    /// under a long job. Keep it well below the broker's `consumer_timeout` (100ms to 1d).
    #[arg(long, env = "APIARY_DETACH_AFTER", default_value = "10m", value_parser = |s: &str| DETACH_AFTER.parse(s), global = true)]
    pub detach_after: Duration,

    /// How long finished jobs (and with them their dedup keys) are kept; per kind with
    /// `APIARY_KINDS` (`kind:retention=1d`) (1s to 3650d).
    #[arg(long, env = "APIARY_RETENTION", default_value = "7d", value_parser = |s: &str| RETENTION.parse(s), global = true)]
    pub retention: Duration,

    /// The pause between pruning passes once the pruner has caught up: one worker at a time
    /// deletes finished jobs past their retention, elected by an advisory lock, and goes on
    /// without a pause while there is a backlog (100ms to 1d).
    #[arg(long, env = "APIARY_PRUNE_INTERVAL", default_value = "1m", value_parser = |s: &str| PRUNE_INTERVAL.parse(s), global = true)]
    pub prune_interval: Duration,

    /// On SIGTERM, how long in-flight jobs may take to finish before they are handed back
    /// (0s to 1h).
    #[arg(long, env = "APIARY_DRAIN_TIMEOUT", default_value = "25s", value_parser = |s: &str| DRAIN_TIMEOUT.parse(s), global = true)]
    pub drain_timeout: Duration,

    /// Largest batch of claims or completions written in one statement (1 to 200).
    #[arg(long, env = "APIARY_BATCH", default_value_t = 128, value_parser = |s: &str| BATCH.parse::<usize>(s), global = true)]
    pub batch: usize,

    /// An outbox row older than this is republished by the relay (its enqueuer died between
    /// the commit and the broker's confirm) (100ms to 1h).
    #[arg(long, env = "APIARY_OUTBOX_GRACE", default_value = "5s", value_parser = |s: &str| OUTBOX_GRACE.parse(s), global = true)]
    pub outbox_grace: Duration,

    /// Per-kind settings overriding the global ones and the handler's own:
    /// `kind:max_attempts=3,timeout=30s,retry_base=500ms,retry_cap=1m,retention=1d;other:timeout=2h`.
    #[arg(long, env = "APIARY_KINDS", default_value = "", value_parser = parse_kinds, global = true)]
    pub kinds: KindSettings,

    /// A TOML file of schedules (`[schedules.<name>]` tables) that `apiary migrate` applies:
    /// sets each, and deletes the file's schedules no longer in it. Unset: none applied.
    #[arg(long, env = "APIARY_SCHEDULES_FILE", global = true)]
    pub schedules_file: Option<std::path::PathBuf>,
    /// The hosts a job's `callback_url` may name: comma-separated `host`, `host:port` or
    /// `*.domain` (any subdomain) entries, matched by name, never resolved. Empty: webhooks
    /// are off and any `callback_url` is refused.
    #[arg(long, env = "APIARY_WEBHOOK_HOSTS", default_value = "", value_parser = crate::webhook::parse_hosts, global = true)]
    pub webhook_hosts: crate::webhook::WebhookHosts,

    /// The key webhook deliveries are signed with (HMAC-SHA256, at least 16 bytes). Unset: a
    /// `callback_url` is refused at enqueue, since its delivery could not be signed.
    #[arg(long, env = "APIARY_WEBHOOK_SECRET", hide_env_values = true, value_parser = crate::webhook::parse_secret, global = true)]
    pub webhook_secret: Option<crate::webhook::WebhookSecret>,

    /// Longest one webhook delivery's request may take, connect included; past it the
    /// delivery is retried (100ms to 5m).
    #[arg(long, env = "APIARY_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = |s: &str| WEBHOOK_TIMEOUT.parse(s), global = true)]
    pub webhook_timeout: Duration,

    /// A job record larger than this (as JSON) is delivered without its `payload` and
    /// `result`, and says so in `X-Apiary-Truncated` (1 KiB to 64 MiB).
    #[arg(long, env = "APIARY_WEBHOOK_MAX_BYTES", default_value_t = 256 << 10, value_parser = |s: &str| WEBHOOK_MAX_BYTES.parse::<usize>(s), global = true)]
    pub webhook_max_bytes: usize,

    /// `human` or `json`.
    #[arg(
        long,
        env = "APIARY_LOG_FORMAT",
        default_value = "human",
        value_parser = parse_log_format,
        global = true
    )]
    pub log_format: LogFormat,
}

/// `APIARY_QUEUES`, parsed: the queues a worker consumes, in order, with their concurrency.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSettings(pub Vec<(String, usize)>);

/// Parses `queue:concurrency,...`. Errors start with `APIARY_QUEUES:` and name the queue.
pub fn parse_queues(s: &str) -> Result<QueueSettings, String> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part.split_once(':').ok_or_else(|| {
            format!("APIARY_QUEUES: {part:?}: expected queue:concurrency, such as emails:16")
        })?;
        let name = name.trim();
        crate::job::validate_queue(name).map_err(|e| format!("APIARY_QUEUES: {name:?}: {e}"))?;
        let n = CONCURRENCY.parse_as(&format!("APIARY_QUEUES: {name} concurrency"), n.trim())?;
        if out.iter().any(|(q, _)| q == name) {
            return Err(format!("APIARY_QUEUES: {name} is listed twice"));
        }
        out.push((name.to_string(), n));
    }
    Ok(QueueSettings(out))
}

/// Settings of one queue (`APIARY_QUEUE_OPTIONS`).
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// At most this many of the queue's jobs start in any window of the period, across every
    /// worker.
    pub rate: Option<Rate>,
    /// How many broker work queues the queue is spread over (`shards=N`, 1 to
    /// [`crate::broker::topology::MAX_SHARDS`]); `None` means 1, the single queue of earlier
    /// versions. Producers and workers must agree on it; see
    /// [`crate::broker::topology`]'s module docs for the names and what changing it does.
    pub shards: Option<u16>,
}

/// `APIARY_QUEUE_OPTIONS`, parsed: options by queue.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptionSettings(pub std::collections::HashMap<String, QueueOptions>);

/// Written back as `APIARY_QUEUE_OPTIONS` takes it (queues sorted), for a process that passes
/// its settings on to the workers it starts.
impl std::fmt::Display for QueueOptionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut queues: Vec<_> = self.0.iter().collect();
        queues.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (queue, o)) in queues.into_iter().enumerate() {
            let mut settings = Vec::new();
            if let Some(r) = &o.rate {
                settings.push(format!(
                    "rate={}/{}",
                    r.count,
                    humantime::format_duration(r.period)
                ));
            }
            if let Some(n) = o.shards {
                settings.push(format!("shards={n}"));
            }
            let sep = if i == 0 { "" } else { ";" };
            write!(f, "{sep}{queue}:{}", settings.join(","))?;
        }
        Ok(())
    }
}

/// Parses `queue:key=value,...;queue:...`. Errors start with `APIARY_QUEUE_OPTIONS:`.
pub fn parse_queue_options(s: &str) -> Result<QueueOptionSettings, String> {
    let mut out = std::collections::HashMap::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (queue, opts) = part.split_once(':').ok_or_else(|| {
            format!("APIARY_QUEUE_OPTIONS: {part:?}: expected queue:key=value,...")
        })?;
        let queue = queue.trim();
        crate::job::validate_queue(queue)
            .map_err(|e| format!("APIARY_QUEUE_OPTIONS: {queue:?}: {e}"))?;
        let mut o = QueueOptions::default();
        for kv in opts.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                format!("APIARY_QUEUE_OPTIONS: {queue}: {kv:?}: expected key=value")
            })?;
            match k.trim() {
                "rate" => {
                    o.rate = Some(
                        Rate::parse(v)
                            .map_err(|e| format!("APIARY_QUEUE_OPTIONS: {queue} rate: {e}"))?,
                    )
                }
                "shards" => {
                    let max = crate::broker::topology::MAX_SHARDS;
                    let n = v
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=max).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "APIARY_QUEUE_OPTIONS: {queue} shards: {:?}: expected a whole number from 1 to {max}",
                                v.trim()
                            )
                        })?;
                    o.shards = Some(n);
                }
                other => {
                    return Err(format!(
                        "APIARY_QUEUE_OPTIONS: {queue}: unknown setting {other:?} (expected rate or shards)"
                    ));
                }
            }
        }
        out.insert(queue.to_string(), o);
    }
    Ok(QueueOptionSettings(out))
}

/// Per-kind settings; `None` means the next level down (the handler's, then the global one).
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindOptions {
    /// The queue the kind's jobs go to when the producer does not name one.
    pub queue: Option<String>,
    /// The priority of the kind's jobs when the producer does not give one (0 to 9).
    pub priority: Option<u8>,
    /// At most this many of the kind's jobs start in any window of the rate's period, across
    /// every worker together (`rate=100/s`, `rate=10/m`).
    pub rate: Option<Rate>,
    /// At most this many of the kind's jobs with the same `concurrency_key` run at once
    /// across every worker (`max_per_key=1`: one at a time per key).
    pub max_per_key: Option<u32>,
    /// Attempts allowed when the job does not say.
    pub max_attempts: Option<i32>,
    /// Longest one attempt may run.
    pub timeout: Option<Duration>,
    /// First retry delay.
    pub retry_base: Option<Duration>,
    /// Longest retry delay.
    pub retry_cap: Option<Duration>,
    /// How long finished jobs of this kind are kept.
    pub retention: Option<Duration>,
    /// Where the kind's jobs' final records are POSTed when the producer names no
    /// `callback_url` (`callback_url=https://...`; it cannot hold `,` or `;`).
    pub callback_url: Option<String>,
}

impl KindOptions {
    /// These options, with unset fields taken from `below`.
    pub fn or(self, below: KindOptions) -> KindOptions {
        KindOptions {
            queue: self.queue.or(below.queue),
            priority: self.priority.or(below.priority),
            rate: self.rate.or(below.rate),
            max_per_key: self.max_per_key.or(below.max_per_key),
            max_attempts: self.max_attempts.or(below.max_attempts),
            timeout: self.timeout.or(below.timeout),
            retry_base: self.retry_base.or(below.retry_base),
            retry_cap: self.retry_cap.or(below.retry_cap),
            retention: self.retention.or(below.retention),
            callback_url: self.callback_url.or(below.callback_url),
        }
    }

    /// Checks every set field against its global setting's range, and that a retry cap set
    /// with a retry base is at least the base. Errors read `APIARY_KINDS: report timeout is
    /// 0s; it must be between 10ms and 7d`.
    pub fn validate(&self, kind: &str) -> Result<(), ConfigError> {
        let named = |key: &str| format!("APIARY_KINDS: {kind} {key}");
        if let Some(n) = self.max_attempts {
            let v = u64::try_from(n).unwrap_or(0);
            if !(MAX_ATTEMPTS.min..=MAX_ATTEMPTS.max).contains(&v) {
                return Err(ConfigError(MAX_ATTEMPTS.message(&named("max_attempts"), n)));
            }
        }
        let durations = [
            ("timeout", self.timeout, JOB_TIMEOUT),
            ("retry_base", self.retry_base, RETRY_BASE),
            ("retry_cap", self.retry_cap, RETRY_CAP),
            ("retention", self.retention, RETENTION),
        ];
        for (key, value, range) in durations {
            if let Some(d) = value {
                range.check_as(&named(key), d).map_err(ConfigError)?;
            }
        }
        if let (Some(base), Some(cap)) = (self.retry_base, self.retry_cap)
            && cap < base
        {
            return Err(ConfigError(format!(
                "{} is {}; it must be at least its retry_base ({})",
                named("retry_cap"),
                show(cap),
                show(base)
            )));
        }
        Ok(())
    }
}

/// The largest `max_per_key`.
pub const MAX_PER_KEY: u32 = 10_000;

/// A rate limit: at most `count` starts in any window of `period`.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Starts allowed per period (1 to 100,000).
    pub count: u32,
    /// The window.
    pub period: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m`, `N/h`, or `N/<duration>` such as `5/10s`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || format!("{s:?} is not a rate; write it like 100/s, 10/m, 500/h or 5/10s");
        let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if !(1..=100_000).contains(&count) {
            return Err(format!("{s:?}: the count must be 1 to 100000"));
        }
        let period = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if period < Duration::from_millis(10) || period > Duration::from_secs(86_400) {
            return Err(format!("{s:?}: the period must be 10ms to 1d"));
        }
        Ok(Rate { count, period })
    }
}

/// `APIARY_KINDS`, parsed: options by kind.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindSettings(pub std::collections::HashMap<String, KindOptions>);

impl KindSettings {
    /// The options set for `kind` (all `None` if none).
    pub fn get(&self, kind: &str) -> KindOptions {
        self.0.get(kind).cloned().unwrap_or_default()
    }
}

/// Parses `kind:key=value,...;kind:...`. Errors start with `APIARY_KINDS:` and name the kind,
/// the key and the allowed range.
pub fn parse_kinds(s: &str) -> Result<KindSettings, String> {
    let mut out = std::collections::HashMap::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, opts) = part
            .split_once(':')
            .ok_or_else(|| format!("APIARY_KINDS: {part:?}: expected kind:key=value,..."))?;
        let kind = kind.trim();
        crate::job::validate_kind(kind).map_err(|e| format!("APIARY_KINDS: {kind:?}: {e}"))?;
        let named = |key: &str| format!("APIARY_KINDS: {kind} {key}");
        let mut o = KindOptions::default();
        for kv in opts.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("APIARY_KINDS: {kind}: {kv:?}: expected key=value"))?;
            let v = v.trim();
            match k.trim() {
                "queue" => {
                    crate::job::validate_queue(v)
                        .map_err(|e| format!("APIARY_KINDS: {kind} queue: {}", e.reason))?;
                    o.queue = Some(v.to_string());
                }
                "rate" => {
                    o.rate = Some(
                        Rate::parse(v).map_err(|e| format!("APIARY_KINDS: {kind} rate: {e}"))?,
                    )
                }
                "max_per_key" => {
                    let n: u32 = v.parse().ok().filter(|n| (1..=MAX_PER_KEY).contains(n)).ok_or_else(|| {
                        format!("APIARY_KINDS: {kind} max_per_key is {v:?}; it must be a whole number between 1 and {MAX_PER_KEY}")
                    })?;
                    o.max_per_key = Some(n);
                }
                "priority" => {
                    let p: i64 = v.parse().map_err(|_| {
                        format!("APIARY_KINDS: {kind} priority is {v:?}; it must be 0 to 9")
                    })?;
                    crate::job::validate_priority(p)
                        .map_err(|e| format!("APIARY_KINDS: {kind} priority: {}", e.reason))?;
                    o.priority = u8::try_from(p).ok();
                }
                "max_attempts" => {
                    o.max_attempts = Some(MAX_ATTEMPTS.parse_as(&named("max_attempts"), v)?)
                }
                "timeout" => o.timeout = Some(JOB_TIMEOUT.parse_as(&named("timeout"), v)?),
                "retry_base" => o.retry_base = Some(RETRY_BASE.parse_as(&named("retry_base"), v)?),
                "retry_cap" => o.retry_cap = Some(RETRY_CAP.parse_as(&named("retry_cap"), v)?),
                "retention" => o.retention = Some(RETENTION.parse_as(&named("retention"), v)?),
                "callback_url" => {
                    crate::webhook::validate_form(v)
                        .map_err(|e| format!("APIARY_KINDS: {kind} callback_url: {}", e.reason))?;
                    o.callback_url = Some(v.to_string());
                }
                other => {
                    return Err(format!(
                        "APIARY_KINDS: {kind}: unknown setting {other:?} (expected queue, priority, rate, max_per_key, max_attempts, timeout, retry_base, retry_cap, retention or callback_url)"
                    ));
                }
            }
        }
        o.validate(kind).map_err(|e| e.0)?;
        out.insert(kind.to_string(), o);
    }
    Ok(KindSettings(out))
}

/// How logs are written.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// A setting that cannot work: the message names the variable and what it must be, and never
/// holds a password or a token.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// The error clap reports for a command line or environment it cannot parse, without the
    /// offending value: clap's own message quotes it, and it may be a token or a URL with a
    /// password. What the value parser said is kept (ours name the variable and the range;
    /// none of them repeats a secret).
    pub fn from_clap(e: &clap::Error) -> ConfigError {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        if e.kind() == ErrorKind::ValueValidation {
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) => a.split_whitespace().next().unwrap_or(a),
                _ => "a setting",
            };
            let var = env_var_of(arg);
            let said = std::error::Error::source(e)
                .map(|s| mask_url(&s.to_string()))
                .unwrap_or_else(|| "invalid value".into());
            return ConfigError(match var {
                Some(var) if said.starts_with(&var) => said,
                Some(var) => format!("{var} ({arg}): {said}"),
                None => format!("{arg}: {said}"),
            });
        }
        // Other errors (an unknown flag, a missing subcommand) quote what was typed: mask
        // what could be a connection string.
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("");
        ConfigError(mask_url(first.trim_start_matches("error: ")))
    }
}

/// The environment variable behind a long flag (`--lease` → `APIARY_LEASE`).
fn env_var_of(flag: &str) -> Option<String> {
    use clap::CommandFactory;
    let long = flag.strip_prefix("--")?;
    EnvOnly::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
}

/// Wraps [`Config`] so clap can parse it on its own.
#[derive(clap::Parser)]
struct EnvOnly {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// Reads every setting from the environment, with the documented defaults, and
    /// [validates](Config::validate) them.
    pub fn from_env() -> Result<Config, ConfigError> {
        use clap::Parser;
        let parsed = EnvOnly::try_parse_from(["apiary"]).map_err(|e| ConfigError::from_clap(&e))?;
        parsed.config.validate()
    }

    /// Checks every setting against its range (the constants of this module) and the
    /// settings that must agree with each other; the first that cannot work is the error.
    pub fn validate(self) -> Result<Config, ConfigError> {
        check_url(
            "DATABASE_URL",
            &self.database_url,
            &["postgres", "postgresql"],
            |u| {
                sqlx::postgres::PgConnectOptions::from_str(u)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )?;
        let amqp = url_list(&self.amqp_url);
        if amqp.is_empty() {
            return Err(ConfigError(
                "AMQP_URL is empty; it must be a URL like amqp://USER:PASSWORD@HOST:5672/%2f, or several, comma-separated".into(),
            ));
        }
        for (i, url) in amqp.iter().enumerate() {
            // One address is named as before; an item of a list by its place in it.
            let var = if amqp.len() == 1 {
                "AMQP_URL".to_string()
            } else {
                format!("AMQP_URL item {} of {}", i + 1, amqp.len())
            };
            check_url(&var, url, &["amqp", "amqps"], |u| {
                lapin::uri::AMQPUri::from_str(u).map(drop)
            })?;
        }
        if self.queue.is_empty() || self.queue.len() > MAX_PREFIX_BYTES {
            return Err(ConfigError(format!(
                "APIARY_QUEUE is {} bytes long; it must be 1 to {MAX_PREFIX_BYTES}",
                self.queue.len()
            )));
        }
        if self.queue.contains(':') {
            // Named queues' broker names are `<prefix>:<queue>`: a colon in the prefix could
            // make two deployments' names meet.
            return Err(ConfigError(format!(
                "APIARY_QUEUE is {:?}; it must not contain ':'",
                self.queue
            )));
        }
        if self.queue.starts_with("amq.") {
            // RabbitMQ reserves the prefix: declaring such a queue is refused.
            return Err(ConfigError(format!(
                "APIARY_QUEUE is {:?}; names starting with amq. are reserved by RabbitMQ",
                self.queue
            )));
        }
        CONCURRENCY.check(self.concurrency)?;
        PREFETCH.check(self.prefetch)?;
        DB_POOL.check(self.db_pool)?;
        BATCH.check(self.batch)?;
        MAX_PAYLOAD_BYTES.check(self.max_payload_bytes)?;
        let attempts = u64::try_from(self.max_attempts).unwrap_or(0);
        if !(MAX_ATTEMPTS.min..=MAX_ATTEMPTS.max).contains(&attempts) {
            return Err(ConfigError(
                MAX_ATTEMPTS.message(MAX_ATTEMPTS.var, self.max_attempts),
            ));
        }
        LEASE.check(self.lease)?;
        PRUNE_INTERVAL.check(self.prune_interval)?;
        DRAIN_TIMEOUT.check(self.drain_timeout)?;
        JOB_TIMEOUT.check(self.job_timeout)?;
        RETRY_BASE.check(self.retry_base)?;
        RETRY_CAP.check(self.retry_cap)?;
        DETACH_AFTER.check(self.detach_after)?;
        OUTBOX_GRACE.check(self.outbox_grace)?;
        RETENTION.check(self.retention)?;
        WEBHOOK_TIMEOUT.check(self.webhook_timeout)?;
        WEBHOOK_MAX_BYTES.check(self.webhook_max_bytes)?;
        if self.retry_cap < self.retry_base {
            return Err(ConfigError(format!(
                "APIARY_RETRY_CAP is {}; it must be at least APIARY_RETRY_BASE ({})",
                show(self.retry_cap),
                show(self.retry_base)
            )));
        }
        let mut kinds: Vec<_> = self.kinds.0.iter().collect();
        kinds.sort_by(|a, b| a.0.cmp(b.0));
        for (kind, options) in kinds {
            crate::job::validate_kind(kind)
                .map_err(|e| ConfigError(format!("APIARY_KINDS: {kind:?}: {e}")))?;
            options.validate(kind)?;
            if let Some(url) = &options.callback_url {
                crate::webhook::check(url, &self.webhook_hosts, self.webhook_secret.as_ref())
                    .map_err(|e| {
                        ConfigError(format!("APIARY_KINDS: {kind} callback_url: {}", e.reason))
                    })?;
            }
        }
        Ok(self)
    }

    /// Every queue's shard count (`shards=` of `APIARY_QUEUE_OPTIONS`).
    pub fn shards(&self) -> crate::broker::topology::Shards {
        crate::broker::topology::Shards(
            self.queue_options
                .0
                .iter()
                .filter_map(|(q, o)| o.shards.map(|n| (q.clone(), n)))
                .collect(),
        )
    }

    /// The broker names of `queue` in this deployment, with its shard count.
    pub fn queue_names(&self, queue: &str) -> crate::broker::QueueNames {
        crate::broker::QueueNames::for_queue(&self.queue, queue)
            .with_shards(self.shards().of(queue))
    }

    /// The queues a worker consumes with their concurrency: `APIARY_QUEUES`, or the
    /// `default` queue with `APIARY_CONCURRENCY`.
    pub fn worker_queues(&self) -> Vec<(String, usize)> {
        if self.queues.0.is_empty() {
            vec![(crate::job::DEFAULT_QUEUE.to_string(), self.concurrency)]
        } else {
            self.queues.0.clone()
        }
    }

    /// Every queue the configuration names, `default` first: the ones `apiary migrate`
    /// declares (`APIARY_QUEUES`, and the queues of `APIARY_KINDS`).
    pub fn configured_queues(&self) -> Vec<String> {
        let mut out = vec![crate::job::DEFAULT_QUEUE.to_string()];
        let mut more: Vec<String> = self
            .queues
            .0
            .iter()
            .map(|(q, _)| q.clone())
            .chain(self.kinds.0.values().filter_map(|o| o.queue.clone()))
            .collect();
        more.sort();
        more.dedup();
        out.extend(more.into_iter().filter(|q| q != crate::job::DEFAULT_QUEUE));
        out
    }

    /// The prefetch actually used.
    pub fn effective_prefetch(&self) -> u16 {
        if self.prefetch > 0 {
            self.prefetch
        } else {
            u16::try_from(self.concurrency.saturating_mul(2)).unwrap_or(u16::MAX)
        }
    }

    /// How often a worker renews its leases: a fifth of the lease, so four missed beats still
    /// leave the claim valid.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 5
    }
}

impl fmt::Debug for Config {
    /// Every setting, with the connection strings' passwords masked and the API tokens
    /// counted rather than shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &mask_url(&self.database_url))
            .field("amqp_url", &mask_url(&self.amqp_url))
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("http_addr", &self.http_addr)
            .field("api_tokens", &self.api_tokens)
            .field("worker_http_addr", &self.worker_http_addr)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .field("db_pool", &self.db_pool)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base", &self.retry_base)
            .field("retry_cap", &self.retry_cap)
            .field("job_timeout", &self.job_timeout)
            .field("lease", &self.lease)
            .field("detach_after", &self.detach_after)
            .field("retention", &self.retention)
            .field("prune_interval", &self.prune_interval)
            .field("drain_timeout", &self.drain_timeout)
            .field("batch", &self.batch)
            .field("outbox_grace", &self.outbox_grace)
            .field("kinds", &self.kinds)
            .field("webhook_hosts", &self.webhook_hosts)
            .field("webhook_secret", &self.webhook_secret)
            .field("webhook_timeout", &self.webhook_timeout)
            .field("webhook_max_bytes", &self.webhook_max_bytes)
            .field("log_format", &self.log_format)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Config {
        use clap::Parser;
        EnvOnly::try_parse_from(["apiary", "--prefix", "q"])
            .expect("parses")
            .config
    }

    #[test]
    fn queue_options_are_written_back_as_they_parse() {
        for s in [
            "",
            "default:shards=4",
            "emails:rate=5/10s,shards=2;reports:rate=100/1m",
        ] {
            let o = parse_queue_options(s).expect(s);
            assert_eq!(parse_queue_options(&o.to_string()).expect(s), o, "{s}");
        }
        let o = parse_queue_options("b:shards=3;a:rate=10/s").expect("parses");
        assert_eq!(o.to_string(), "a:rate=10/1s;b:shards=3");
    }

    #[test]
    fn shards_parse_within_their_range() {
        let o = parse_queue_options("default:shards=4;emails:rate=5/s,shards=2").expect("parses");
        let mut cfg = defaults();
        cfg.queue_options = o;
        assert_eq!(cfg.shards().of("default"), 4);
        assert_eq!(cfg.shards().of("emails"), 2);
        assert_eq!(cfg.shards().of("reports"), 1, "one unless told");
        assert_eq!(
            cfg.queue_names("emails").work_queues(),
            ["q:emails", "q:emails~1"]
        );
        for bad in ["0", "65", "-1", "two", ""] {
            let e = parse_queue_options(&format!("default:shards={bad}")).expect_err(bad);
            assert!(e.contains("default shards") && e.contains("1 to 64"), "{e}");
        }
    }

    #[test]
    fn queues_and_limits_parse_and_name_what_is_wrong() {
        let q = parse_queues("default:64, emails:16,reports:2").expect("parses");
        assert_eq!(
            q.0,
            vec![
                ("default".to_string(), 64),
                ("emails".to_string(), 16),
                ("reports".to_string(), 2)
            ]
        );
        assert!(parse_queues("Emails:4").unwrap_err().contains("\"Emails\""));
        assert!(
            parse_queues("emails")
                .unwrap_err()
                .contains("queue:concurrency")
        );
        assert!(parse_queues("a:1,a:2").unwrap_err().contains("twice"));
        assert!(parse_queues("a:0").unwrap_err().contains("a concurrency"));
        let k =
            parse_kinds("mail:queue=emails,priority=7,rate=100/s,max_per_key=1;poll:rate=5/10s")
                .expect("parses");
        let mail = k.get("mail");
        assert_eq!(mail.queue.as_deref(), Some("emails"));
        assert_eq!(mail.priority, Some(7));
        assert_eq!(
            mail.rate,
            Some(Rate {
                count: 100,
                period: Duration::from_secs(1)
            })
        );
        assert_eq!(mail.max_per_key, Some(1));
        assert_eq!(
            k.get("poll").rate.map(|r| r.period),
            Some(Duration::from_secs(10))
        );
        assert!(
            parse_kinds("m:priority=10")
                .unwrap_err()
                .contains("priority")
        );
        assert!(parse_kinds("m:rate=fast").unwrap_err().contains("rate"));
        assert!(
            parse_kinds("m:rate=0/s")
                .unwrap_err()
                .contains("1 to 100000")
        );
        assert!(
            parse_kinds("m:max_per_key=0")
                .unwrap_err()
                .contains("max_per_key")
        );
        assert!(parse_kinds("m:queue=A").unwrap_err().contains("queue"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("150ms"), Ok(Duration::from_millis(150)));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
    }

    #[test]
    fn kinds_parse_and_reject_nonsense() {
        let k =
            parse_kinds("fail:max_attempts=3,retry_base=100ms; sleep:timeout=2s").expect("parses");
        assert_eq!(k.get("fail").max_attempts, Some(3));
        assert_eq!(k.get("fail").retry_base, Some(Duration::from_millis(100)));
        assert_eq!(k.get("sleep").timeout, Some(Duration::from_secs(2)));
        assert_eq!(k.get("echo"), KindOptions::default());
        assert!(parse_kinds("").expect("empty").0.is_empty());
        assert!(
            parse_kinds("fail:max_attempts=0")
                .unwrap_err()
                .contains("max_attempts")
        );
        assert!(
            parse_kinds("fail:colour=red")
                .unwrap_err()
                .contains("colour")
        );
        assert!(parse_kinds("Bad:timeout=1s").unwrap_err().contains("kind"));
        assert!(parse_kinds("fail").is_err());
    }

    #[test]
    fn kind_settings_name_the_kind_the_key_and_the_range() {
        let cases = [
            (
                "report:timeout=0s",
                "APIARY_KINDS: report timeout is 0s; it must be between 10ms and 7d",
            ),
            (
                "report:retention=0s",
                "APIARY_KINDS: report retention is 0s; it must be between 1s and 3650d",
            ),
            (
                "report:retry_base=2d",
                "APIARY_KINDS: report retry_base is 2d; it must be between 1ms and 1d",
            ),
            (
                "report:max_attempts=5000",
                "APIARY_KINDS: report max_attempts is 5000; it must be between 1 and 1000",
            ),
            (
                "report:timeout=soon",
                "APIARY_KINDS: report timeout is \"soon\"; it must be a duration",
            ),
            (
                "report:retry_base=2s,retry_cap=1s",
                "APIARY_KINDS: report retry_cap is 1s; it must be at least its retry_base (2s)",
            ),
        ];
        for (input, expected) in cases {
            let e = parse_kinds(input).unwrap_err();
            assert!(e.starts_with(expected), "{input}: {e}");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = defaults();
        assert_eq!(c.queue, "q");
        assert_eq!(c.drain_timeout, Duration::from_secs(25));
        assert_eq!(c.max_payload_bytes, 1 << 20);
        assert_eq!(c.effective_prefetch(), 512);
        assert!(c.validate().is_ok());
    }

    /// `validate` holds a `Config` built in code to the same ranges as the parsers: each
    /// case names the variable and its range.
    #[test]
    fn validate_names_the_variable_and_the_range() {
        type Edit = fn(&mut Config);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |c| c.prune_interval = Duration::ZERO,
                "APIARY_PRUNE_INTERVAL is 0s; it must be between 100ms and 1d",
            ),
            (
                |c| c.lease = Duration::from_millis(500),
                "APIARY_LEASE is 500ms; it must be between 1s and 1h",
            ),
            (
                |c| c.drain_timeout = Duration::from_secs(2 * 3600),
                "APIARY_DRAIN_TIMEOUT is 2h; it must be between 0s and 1h",
            ),
            (
                |c| c.job_timeout = Duration::ZERO,
                "APIARY_JOB_TIMEOUT is 0s; it must be between 10ms and 7d",
            ),
            (
                |c| c.retry_base = Duration::ZERO,
                "APIARY_RETRY_BASE is 0s; it must be between 1ms and 1d",
            ),
            (
                |c| c.retry_cap = Duration::from_secs(30 * 86400),
                "APIARY_RETRY_CAP is 30d; it must be between 1ms and 7d",
            ),
            (
                |c| c.retry_cap = Duration::from_millis(500),
                "APIARY_RETRY_CAP is 500ms; it must be at least APIARY_RETRY_BASE (1s)",
            ),
            (
                |c| c.detach_after = Duration::ZERO,
                "APIARY_DETACH_AFTER is 0s; it must be between 100ms and 1d",
            ),
            (
                |c| c.outbox_grace = Duration::ZERO,
                "APIARY_OUTBOX_GRACE is 0s; it must be between 100ms and 1h",
            ),
            (
                |c| c.retention = Duration::ZERO,
                "APIARY_RETENTION is 0s; it must be between 1s and 3650d",
            ),
            (
                |c| c.concurrency = 0,
                "APIARY_CONCURRENCY is 0; it must be between 1 and 10000",
            ),
            (
                |c| c.concurrency = 100_000,
                "APIARY_CONCURRENCY is 100000; it must be between 1 and 10000",
            ),
            (
                |c| c.db_pool = 1,
                "APIARY_DB_POOL is 1; it must be between 2 and 1000",
            ),
            (
                |c| c.batch = 0,
                "APIARY_BATCH is 0; it must be between 1 and 200",
            ),
            (
                |c| c.max_payload_bytes = 10,
                "APIARY_MAX_PAYLOAD_BYTES is 10; it must be between 1024 and 67108864",
            ),
            (
                |c| c.max_attempts = 0,
                "APIARY_MAX_ATTEMPTS is 0; it must be between 1 and 1000",
            ),
            (
                |c| c.queue = String::new(),
                "APIARY_QUEUE is 0 bytes long; it must be 1 to 170",
            ),
            (
                |c| c.queue = "amq.jobs".into(),
                "APIARY_QUEUE is \"amq.jobs\"; names starting with amq. are reserved",
            ),
            (
                |c| c.queue = "apiary:jobs".into(),
                "APIARY_QUEUE is \"apiary:jobs\"; it must not contain ':'",
            ),
            (
                |c| c.database_url = "mysql://u:sekret-pw@h/db".into(),
                "DATABASE_URL is mysql://u:***@h/db; it must start with postgres:// or postgresql://",
            ),
            (
                |c| c.database_url = "u:sekret-pw@h".into(),
                "DATABASE_URL is not a URL; it must start with postgres://",
            ),
            (
                |c| c.database_url = "postgres://u:sekret-pw@h/db?sslmode=bogus".into(),
                "DATABASE_URL is postgres://u:***@h/db?sslmode=bogus; it does not parse",
            ),
            (
                |c| c.amqp_url = "http://u:sekret-pw@h".into(),
                "AMQP_URL is http://u:***@h; it must start with amqp:// or amqps://",
            ),
            (
                |c| c.amqp_url = "amqp://u:sekret-pw@h:99999/%2f".into(),
                "AMQP_URL is amqp://u:***@h:99999/%2f; it does not parse",
            ),
            (
                |c| c.amqp_url = "amqp://u:sekret-pw@h1/%2f,http://u:sekret-pw@h2".into(),
                "AMQP_URL item 2 of 2 is http://u:***@h2; it must start with amqp:// or amqps://",
            ),
            (
                |c| {
                    c.amqp_url = "amqp://u:sekret-pw@h1/%2f, amqp://u:sekret-pw@h2:99999/%2f".into()
                },
                "AMQP_URL item 2 of 2 is amqp://u:***@h2:99999/%2f; it does not parse",
            ),
            (
                |c| c.amqp_url = " , ".into(),
                "AMQP_URL is empty; it must be a URL like amqp://",
            ),
            (
                |c| {
                    c.kinds.0.insert(
                        "report".into(),
                        KindOptions {
                            timeout: Some(Duration::ZERO),
                            ..KindOptions::default()
                        },
                    );
                },
                "APIARY_KINDS: report timeout is 0s; it must be between 10ms and 7d",
            ),
        ];
        for (edit, expected) in cases {
            let mut c = defaults();
            edit(&mut c);
            let e = c.validate().expect_err(expected).to_string();
            assert!(
                e.starts_with(&format!("invalid configuration: {expected}")),
                "expected {expected:?}, got {e:?}"
            );
            assert!(!e.contains("sekret-pw"), "{e}");
        }
    }

    #[test]
    fn the_edges_of_each_range_are_accepted() {
        let mut c = defaults();
        c.prune_interval = PRUNE_INTERVAL.min;
        c.lease = LEASE.min;
        c.drain_timeout = Duration::ZERO;
        c.concurrency = 10_000;
        c.db_pool = 2;
        c.batch = 200;
        c.max_payload_bytes = 64 << 20;
        c.retry_base = Duration::from_secs(1);
        c.retry_cap = Duration::from_secs(1);
        c.retention = RETENTION.max;
        assert!(c.validate().is_ok());
        assert_eq!(
            defaults().validate().map(|c| c.effective_prefetch()).ok(),
            Some(512)
        );
        let mut big = defaults();
        big.concurrency = 10_000;
        assert_eq!(
            big.effective_prefetch(),
            20_000,
            "twice the most still fits"
        );
    }

    #[test]
    fn parsers_name_the_variable_and_the_range() {
        assert_eq!(
            PRUNE_INTERVAL.parse("0s").unwrap_err(),
            "APIARY_PRUNE_INTERVAL is 0s; it must be between 100ms and 1d"
        );
        assert!(
            LEASE
                .parse("soon")
                .unwrap_err()
                .starts_with("APIARY_LEASE is \"soon\"; it must be a duration")
        );
        assert_eq!(
            CONCURRENCY.parse::<usize>("0").unwrap_err(),
            "APIARY_CONCURRENCY is 0; it must be between 1 and 10000"
        );
        assert_eq!(
            CONCURRENCY.parse::<usize>("many").unwrap_err(),
            "APIARY_CONCURRENCY is \"many\"; it must be a whole number between 1 and 10000"
        );
        assert_eq!(PREFETCH.parse::<u16>("65535"), Ok(u16::MAX));
        assert!(PREFETCH.parse::<u16>("65536").is_err());
        assert!(
            parse_addr("APIARY_HTTP_ADDR", "localhost")
                .unwrap_err()
                .starts_with("APIARY_HTTP_ADDR is \"localhost\"")
        );
        assert!(
            parse_log_format("xml")
                .unwrap_err()
                .contains("APIARY_LOG_FORMAT")
        );
    }

    #[test]
    fn clap_errors_leave_out_the_value_and_name_the_variable() {
        use clap::Parser;
        let e = EnvOnly::try_parse_from(["apiary", "--api-tokens", "sekret-pw:read"])
            .err()
            .expect("too short a token");
        let message = ConfigError::from_clap(&e).to_string();
        assert!(message.contains("APIARY_API_TOKENS"), "{message}");
        assert!(!message.contains("sekret-pw"), "{message}");
        let e = EnvOnly::try_parse_from(["apiary", "--lease", "0s"])
            .err()
            .expect("out of range");
        assert_eq!(
            ConfigError::from_clap(&e).to_string(),
            "invalid configuration: APIARY_LEASE is 0s; it must be between 1s and 1h"
        );
    }

    #[test]
    fn urls_lose_their_passwords() {
        let cases = [
            (
                "postgres://u:sekret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("amqp://guest:guest@h/%2f", "amqp://guest:***@h/%2f"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?password=sekret&x=1",
                "postgres://h/db?password=***&x=1",
            ),
            (
                "postgres://h/db?sslpassword=sekret",
                "postgres://h/db?sslpassword=***",
            ),
            // An unescaped '@' in the password: everything up to the last '@' is userinfo.
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            (
                "error connecting to amqp://u:pw@h:1/%2f: refused; then postgres://a:b@c/d",
                "error connecting to amqp://u:***@h:1/%2f: refused; then postgres://a:***@c/d",
            ),
            (
                "{\"url\":\"postgres://u:pw@h/db\"}",
                "{\"url\":\"postgres://u:***@h/db\"}",
            ),
            ("no url here", "no url here"),
            // A list: every item's password goes.
            (
                "amqp://a:pw1@h1:5672/%2f,amqp://b:pw2@h2:5672/%2f",
                "amqp://a:***@h1:5672/%2f,amqp://b:***@h2:5672/%2f",
            ),
            (
                "amqp://h0:1/%2f, amqps://b:pw2@h2/%2f,amqp://c:pw3@h3",
                "amqp://h0:1/%2f, amqps://b:***@h2/%2f,amqp://c:***@h3",
            ),
            // A comma inside a password is not a list's.
            ("amqp://u:pa,ss@h/%2f", "amqp://u:***@h/%2f"),
        ];
        for (input, expected) in cases {
            assert_eq!(mask_url(input), expected, "{input}");
        }
    }

    #[test]
    fn address_lists_split_and_validate_item_by_item() {
        assert_eq!(
            url_list(" amqp://a:1/%2f, ,amqp://b:2/%2f,"),
            vec!["amqp://a:1/%2f", "amqp://b:2/%2f"]
        );
        assert_eq!(url_list("amqp://a/%2f"), vec!["amqp://a/%2f"]);
        let mut c = defaults();
        c.amqp_url =
            "amqp://guest:guest@127.0.0.1:1/%2f,amqp://guest:guest@127.0.0.1:5672/%2f".into();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn queue_types_parse_and_name_the_variable() {
        assert_eq!(defaults().queue_type, QueueType::Classic);
        assert_eq!(parse_queue_type("quorum"), Ok(QueueType::Quorum));
        assert_eq!(parse_queue_type(" classic "), Ok(QueueType::Classic));
        assert_eq!(
            parse_queue_type("stream").unwrap_err(),
            "APIARY_QUEUE_TYPE is \"stream\"; it must be classic or quorum"
        );
        use clap::Parser;
        let e = EnvOnly::try_parse_from(["apiary", "--queue-type", "Quorum"])
            .err()
            .expect("not a type");
        assert_eq!(
            ConfigError::from_clap(&e).to_string(),
            "invalid configuration: APIARY_QUEUE_TYPE is \"Quorum\"; it must be classic or quorum"
        );
    }

    #[test]
    fn debug_masks_urls_and_tokens() {
        let mut c = defaults();
        c.database_url = "postgres://u:sekret-pw@h/db".into();
        c.amqp_url = "amqp://u:sekret-pw@h/%2f,amqp://v:sekret-pw@h2/%2f".into();
        c.api_tokens = crate::tokens::parse_tokens("sekret-pw-sekret-pw:read").expect("token");
        let text = format!("{c:?}");
        assert!(!text.contains("sekret-pw"), "{text}");
        assert!(text.contains("postgres://u:***@h/db"), "{text}");
    }

    #[test]
    fn durations_show_in_their_shortest_exact_form() {
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(86400)), "1d");
        assert_eq!(show(Duration::from_secs(5400)), "90m");
    }
}
