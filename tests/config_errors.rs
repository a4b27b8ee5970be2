//! Settings that cannot work stop a real `apiary` process at start-up: a non-zero exit, a
//! message on stderr naming the variable and its allowed range, and no panic. The library's
//! side of the same checks (`Config::validate`) is unit-tested in `src/config.rs`; reading them
//! from the environment (`Config::from_env`) is in `tests/config_from_env.rs`.

use std::process::Stdio;
use std::time::Duration;

/// Unreachable servers: a setting wrongly accepted makes the process wait on them rather than
/// touch anyone's database or queue, and the timeout below then reports it.
const NOWHERE: [(&str, &str); 3] = [
    (
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:1/apiary_config_errors",
    ),
    ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
    ("APIARY_QUEUE", "apiary.config-errors"),
];

/// Runs `apiary <command>` with `var=value` and returns (exit success, stderr).
async fn run(command: &str, env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"));
    cmd.arg(command)
        .envs(NOWHERE)
        .env("APIARY_WORKER_HTTP_ADDR", "127.0.0.1:0")
        .env("APIARY_HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("apiary {command} with {env:?} did not stop: it accepted them"))
        .expect("run apiary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each `(variable, value, expected message)` is refused by `apiary worker` (and the
/// settings shared by every role, by `apiary api`).
async fn refused(cases: &[(&str, &str, &str)], commands: &[&str]) {
    for command in commands {
        for (var, value, expected) in cases {
            let (ok, stderr) = run(command, &[(var, value)]).await;
            assert!(!ok, "apiary {command} accepted {var}={value}:\n{stderr}");
            assert!(
                stderr.contains(expected),
                "apiary {command} with {var}={value}: expected {expected:?} in:\n{stderr}"
            );
            assert!(
                !stderr.contains("panicked"),
                "apiary {command} with {var}={value} panicked:\n{stderr}"
            );
            assert!(!stderr.contains("sekret-pw"), "{stderr}");
        }
    }
}

#[tokio::test]
async fn durations_out_of_range_are_refused() {
    refused(
        &[
            (
                "APIARY_PRUNE_INTERVAL",
                "0s",
                "APIARY_PRUNE_INTERVAL is 0s; it must be between 100ms and 1d",
            ),
            (
                "APIARY_LEASE",
                "0s",
                "APIARY_LEASE is 0s; it must be between 1s and 1h",
            ),
            (
                "APIARY_LEASE",
                "soon",
                "APIARY_LEASE is \"soon\"; it must be a duration like 25s, 150ms or 10m, between 1s and 1h",
            ),
            (
                "APIARY_DRAIN_TIMEOUT",
                "2h",
                "APIARY_DRAIN_TIMEOUT is 2h; it must be between 0s and 1h",
            ),
            (
                "APIARY_JOB_TIMEOUT",
                "0s",
                "APIARY_JOB_TIMEOUT is 0s; it must be between 10ms and 7d",
            ),
            (
                "APIARY_RETRY_BASE",
                "0s",
                "APIARY_RETRY_BASE is 0s; it must be between 1ms and 1d",
            ),
            (
                "APIARY_RETRY_CAP",
                "30d",
                "APIARY_RETRY_CAP is 30d; it must be between 1ms and 7d",
            ),
            (
                "APIARY_RETRY_CAP",
                "500ms",
                "APIARY_RETRY_CAP is 500ms; it must be at least APIARY_RETRY_BASE (1s)",
            ),
            (
                "APIARY_DETACH_AFTER",
                "0s",
                "APIARY_DETACH_AFTER is 0s; it must be between 100ms and 1d",
            ),
            (
                "APIARY_OUTBOX_GRACE",
                "0s",
                "APIARY_OUTBOX_GRACE is 0s; it must be between 100ms and 1h",
            ),
            (
                "APIARY_RETENTION",
                "0s",
                "APIARY_RETENTION is 0s; it must be between 1s and 3650d",
            ),
        ],
        &["worker"],
    )
    .await;
}

#[tokio::test]
async fn counts_out_of_range_are_refused() {
    refused(
        &[
            (
                "APIARY_CONCURRENCY",
                "0",
                "APIARY_CONCURRENCY is 0; it must be between 1 and 10000",
            ),
            (
                "APIARY_CONCURRENCY",
                "100000",
                "APIARY_CONCURRENCY is 100000; it must be between 1 and 10000",
            ),
            (
                "APIARY_CONCURRENCY",
                "lots",
                "APIARY_CONCURRENCY is \"lots\"; it must be a whole number between 1 and 10000",
            ),
            (
                "APIARY_PREFETCH",
                "70000",
                "APIARY_PREFETCH is 70000; it must be between 0 and 65535",
            ),
            (
                "APIARY_DB_POOL",
                "1",
                "APIARY_DB_POOL is 1; it must be between 2 and 1000",
            ),
            (
                "APIARY_BATCH",
                "0",
                "APIARY_BATCH is 0; it must be between 1 and 200",
            ),
            (
                "APIARY_BATCH",
                "201",
                "APIARY_BATCH is 201; it must be between 1 and 200",
            ),
            (
                "APIARY_MAX_PAYLOAD_BYTES",
                "10",
                "APIARY_MAX_PAYLOAD_BYTES is 10; it must be between 1024 and 67108864",
            ),
            (
                "APIARY_MAX_PAYLOAD_BYTES",
                "1000000000",
                "APIARY_MAX_PAYLOAD_BYTES is 1000000000; it must be between 1024 and 67108864",
            ),
            (
                "APIARY_MAX_ATTEMPTS",
                "0",
                "APIARY_MAX_ATTEMPTS is 0; it must be between 1 and 1000",
            ),
        ],
        &["worker"],
    )
    .await;
}

#[tokio::test]
async fn per_kind_settings_out_of_range_are_refused() {
    refused(
        &[
            (
                "APIARY_KINDS",
                "report:timeout=0s",
                "APIARY_KINDS: report timeout is 0s; it must be between 10ms and 7d",
            ),
            (
                "APIARY_KINDS",
                "report:retention=0s",
                "APIARY_KINDS: report retention is 0s; it must be between 1s and 3650d",
            ),
            (
                "APIARY_KINDS",
                "report:retry_base=2s,retry_cap=1s",
                "APIARY_KINDS: report retry_cap is 1s; it must be at least its retry_base (2s)",
            ),
            (
                "APIARY_KINDS",
                "report:max_attempts=0",
                "APIARY_KINDS: report max_attempts is 0; it must be between 1 and 1000",
            ),
        ],
        &["worker"],
    )
    .await;
}

#[tokio::test]
async fn addresses_urls_and_names_that_cannot_work_are_refused_by_every_role() {
    let long_queue = "q".repeat(171);
    refused(
        &[
            (
                "APIARY_HTTP_ADDR",
                "localhost",
                "APIARY_HTTP_ADDR is \"localhost\"; it must be an address like 127.0.0.1:8080",
            ),
            (
                "APIARY_WORKER_HTTP_ADDR",
                "127.0.0.1:http",
                "APIARY_WORKER_HTTP_ADDR is \"127.0.0.1:http\"; it must be an address",
            ),
            (
                "DATABASE_URL",
                "mysql://u:sekret-pw@127.0.0.1:1/x",
                "DATABASE_URL is mysql://u:***@127.0.0.1:1/x; it must start with postgres:// or postgresql://",
            ),
            (
                "DATABASE_URL",
                "postgres://u:sekret-pw@127.0.0.1:1/x?sslmode=sometimes",
                "DATABASE_URL is postgres://u:***@127.0.0.1:1/x?sslmode=sometimes; it does not parse",
            ),
            (
                "AMQP_URL",
                "amqp://u:sekret-pw@127.0.0.1:99999/%2f",
                "AMQP_URL is amqp://u:***@127.0.0.1:99999/%2f; it does not parse",
            ),
            (
                "APIARY_QUEUE",
                long_queue.as_str(),
                "APIARY_QUEUE is 171 bytes long; it must be 1 to 170",
            ),
            (
                "APIARY_LOG_FORMAT",
                "xml",
                "APIARY_LOG_FORMAT is \"xml\"; it must be human or json",
            ),
            (
                "APIARY_PRUNE_INTERVAL",
                "0s",
                "APIARY_PRUNE_INTERVAL is 0s; it must be between 100ms and 1d",
            ),
        ],
        &["worker", "api", "status"],
    )
    .await;
}

/// A token too short is refused by its position; clap's own message would have quoted it.
#[tokio::test]
async fn a_bad_token_is_refused_without_being_shown() {
    refused(
        &[(
            "APIARY_API_TOKENS",
            "sekret-pw:read",
            "APIARY_API_TOKENS (--api-tokens): token entry 1",
        )],
        &["api"],
    )
    .await;
}
