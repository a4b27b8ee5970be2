//! Every setting, its environment variable and its default, read once and validated once.
//!
//! The same struct is the `clap` argument group of the binary, so `apiary --help` and
//! `apiary worker --help` list each variable with its default; [`Config::from_env`] reads it
//! without a command line for library users and tests.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// Parses `25s`, `150ms`, `10m`, `7d` and the like.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 25s, 150ms or 10m: {e}"))
}

/// Apiary's settings. Each field names its environment variable and default.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Postgres connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/apiary",
        global = true
    )]
    pub database_url: String,

    /// RabbitMQ connection string.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    pub amqp_url: String,

    /// The work queue. Every other broker name derives from it (`<queue>.dead`,
    /// `<queue>.delay.<tier>`), so deployments sharing a broker stay apart.
    #[arg(
        long,
        env = "APIARY_QUEUE",
        default_value = "apiary.jobs",
        global = true
    )]
    pub queue: String,

    /// Where `apiary api` listens.
    #[arg(
        long,
        env = "APIARY_HTTP_ADDR",
        default_value = "127.0.0.1:8080",
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
        value_parser = crate::api::auth::parse_tokens,
        global = true
    )]
    pub api_tokens: crate::api::auth::Tokens,

    /// Where `apiary worker` serves /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "APIARY_WORKER_HTTP_ADDR",
        default_value = "127.0.0.1:9090",
        global = true
    )]
    pub worker_http_addr: SocketAddr,

    /// Jobs one worker process runs at once.
    #[arg(long, env = "APIARY_CONCURRENCY", default_value_t = 256, global = true)]
    pub concurrency: usize,

    /// Unacknowledged deliveries one worker holds; 0 means twice the concurrency, so the next
    /// jobs are already local while finished ones wait for their batched commit.
    #[arg(long, env = "APIARY_PREFETCH", default_value_t = 0, global = true)]
    pub prefetch: u16,

    /// Postgres connections per process.
    #[arg(long, env = "APIARY_DB_POOL", default_value_t = 16, global = true)]
    pub db_pool: u32,

    /// Largest accepted payload (API) and message body (worker), in bytes.
    #[arg(long, env = "APIARY_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20, global = true)]
    pub max_payload_bytes: usize,

    /// Attempts allowed when a job does not say.
    #[arg(long, env = "APIARY_MAX_ATTEMPTS", default_value_t = 5, global = true)]
    pub max_attempts: i32,

    /// First retry delay; later ones double, with full jitter.
    #[arg(long, env = "APIARY_RETRY_BASE", default_value = "1s", value_parser = parse_duration, global = true)]
    pub retry_base: Duration,

    /// Longest retry delay.
    #[arg(long, env = "APIARY_RETRY_CAP", default_value = "10m", value_parser = parse_duration, global = true)]
    pub retry_cap: Duration,

    /// Longest one attempt may run before it is cancelled and counted as failed.
    #[arg(long, env = "APIARY_JOB_TIMEOUT", default_value = "5m", value_parser = parse_duration, global = true)]
    pub job_timeout: Duration,

    /// How long a worker's claim on a job lasts without a heartbeat. A killed worker's jobs
    /// run elsewhere at most this long after its last heartbeat.
    #[arg(long, env = "APIARY_LEASE", default_value = "10s", value_parser = parse_duration, global = true)]
    pub lease: Duration,

    /// A job still running after this long has its message acked and is protected by its
    /// lease alone, so RabbitMQ's consumer timeout (30 min by default) never closes the channel
    /// under a long job. Keep it well below the broker's `consumer_timeout`.
    #[arg(long, env = "APIARY_DETACH_AFTER", default_value = "10m", value_parser = parse_duration, global = true)]
    pub detach_after: Duration,

    /// How long finished jobs (and with them their dedup keys) are kept; per kind with
    /// `APIARY_KINDS` (`kind:retention=1d`).
    #[arg(long, env = "APIARY_RETENTION", default_value = "7d", value_parser = parse_duration, global = true)]
    pub retention: Duration,

    /// How often a worker looks for finished jobs past their retention (one worker at a time
    /// prunes, elected by an advisory lock).
    #[arg(long, env = "APIARY_PRUNE_INTERVAL", default_value = "1m", value_parser = parse_duration, global = true)]
    pub prune_interval: Duration,

    /// On SIGTERM, how long in-flight jobs may take to finish before they are handed back.
    #[arg(long, env = "APIARY_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration, global = true)]
    pub drain_timeout: Duration,

    /// Largest batch of claims or completions written in one statement.
    #[arg(long, env = "APIARY_BATCH", default_value_t = 128, global = true)]
    pub batch: usize,

    /// An outbox row older than this is republished by the relay (its enqueuer died between
    /// the commit and the broker's confirm).
    #[arg(long, env = "APIARY_OUTBOX_GRACE", default_value = "5s", value_parser = parse_duration, global = true)]
    pub outbox_grace: Duration,

    /// Per-kind settings overriding the global ones and the handler's own:
    /// `kind:max_attempts=3,timeout=30s,retry_base=500ms,retry_cap=1m,retention=1d;other:timeout=2h`.
    #[arg(long, env = "APIARY_KINDS", default_value = "", value_parser = parse_kinds, global = true)]
    pub kinds: KindSettings,

    /// `human` or `json`.
    #[arg(
        long,
        env = "APIARY_LOG_FORMAT",
        default_value = "human",
        global = true
    )]
    pub log_format: LogFormat,
}

/// Per-kind settings; `None` means the next level down (the handler's, then the global one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindOptions {
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
}

impl KindOptions {
    /// These options, with unset fields taken from `below`.
    pub fn or(self, below: KindOptions) -> KindOptions {
        KindOptions {
            max_attempts: self.max_attempts.or(below.max_attempts),
            timeout: self.timeout.or(below.timeout),
            retry_base: self.retry_base.or(below.retry_base),
            retry_cap: self.retry_cap.or(below.retry_cap),
            retention: self.retention.or(below.retention),
        }
    }
}

/// `APIARY_KINDS`, parsed: options by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindSettings(pub std::collections::HashMap<String, KindOptions>);

impl KindSettings {
    /// The options set for `kind` (all `None` if none).
    pub fn get(&self, kind: &str) -> KindOptions {
        self.0.get(kind).copied().unwrap_or_default()
    }
}

/// Parses `kind:key=value,...;kind:...`.
pub fn parse_kinds(s: &str) -> Result<KindSettings, String> {
    let mut out = std::collections::HashMap::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, opts) = part
            .split_once(':')
            .ok_or_else(|| format!("{part:?}: expected kind:key=value,..."))?;
        let kind = kind.trim();
        crate::job::validate_kind(kind).map_err(|e| e.to_string())?;
        let mut o = KindOptions::default();
        for kv in opts.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?}: expected key=value"))?;
            match k.trim() {
                "max_attempts" => {
                    let n: i32 = v
                        .trim()
                        .parse()
                        .map_err(|_| format!("{kind}: max_attempts {v:?} is not an integer"))?;
                    crate::job::validate_max_attempts(n).map_err(|e| format!("{kind}: {e}"))?;
                    o.max_attempts = Some(n);
                }
                "timeout" => o.timeout = Some(parse_duration(v.trim())?),
                "retry_base" => o.retry_base = Some(parse_duration(v.trim())?),
                "retry_cap" => o.retry_cap = Some(parse_duration(v.trim())?),
                "retention" => o.retention = Some(parse_duration(v.trim())?),
                other => {
                    return Err(format!(
                        "{kind}: unknown setting {other:?} (expected max_attempts, timeout, retry_base, retry_cap or retention)"
                    ));
                }
            }
        }
        out.insert(kind.to_string(), o);
    }
    Ok(KindSettings(out))
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// A setting that cannot work, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Wraps [`Config`] so clap can parse it on its own.
#[derive(clap::Parser)]
struct EnvOnly {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// Reads every setting from the environment, with the documented defaults.
    pub fn from_env() -> Result<Config, ConfigError> {
        use clap::Parser;
        let parsed = EnvOnly::try_parse_from(["apiary"]).map_err(|e| ConfigError(e.to_string()))?;
        parsed.config.validate()
    }

    /// Checks settings that parse but cannot work together.
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError("APIARY_CONCURRENCY must be at least 1".into()));
        }
        if self.queue.is_empty() || self.queue.len() > 200 {
            return Err(ConfigError(
                "APIARY_QUEUE must be 1 to 200 characters".into(),
            ));
        }
        crate::job::validate_max_attempts(self.max_attempts)
            .map_err(|e| ConfigError(format!("APIARY_MAX_ATTEMPTS {}", e.reason)))?;
        if self.lease < Duration::from_secs(1) {
            return Err(ConfigError("APIARY_LEASE must be at least 1s".into()));
        }
        if self.batch == 0 || self.batch > 200 {
            // One NOTIFY carries a batch's ids; 200 of them stay under Postgres's 8000-byte limit.
            return Err(ConfigError("APIARY_BATCH must be between 1 and 200".into()));
        }
        if self.db_pool < 2 {
            return Err(ConfigError("APIARY_DB_POOL must be at least 2".into()));
        }
        Ok(self)
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn defaults_are_the_documented_ones() {
        use clap::Parser;
        let c = EnvOnly::try_parse_from(["apiary", "--queue", "q"])
            .expect("parses")
            .config;
        assert_eq!(c.queue, "q");
        assert_eq!(c.drain_timeout, Duration::from_secs(25));
        assert_eq!(c.max_payload_bytes, 1 << 20);
        assert_eq!(c.effective_prefetch(), 512);
        assert!(c.validate().is_ok());
    }
}
