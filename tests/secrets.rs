//! No password or token reaches `--help`, a log line or an error message: real `apiary`
//! processes run with secrets in their connection strings, against servers that are
//! unreachable or refuse them, and none of their output holds the secret.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::TestEnv;

const SECRET: &str = "sekret-pw";
const TOKEN: &str = "sekret-pw-0123456789:read";

async fn output(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("apiary {args:?} did not finish"))
    .expect("run apiary");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn help_shows_no_connection_string_or_token() {
    let env = [
        ("DATABASE_URL", "postgres://u:sekret-pw@127.0.0.1:1/x"),
        ("AMQP_URL", "amqp://u:sekret-pw@127.0.0.1:1/%2f"),
        ("APIARY_API_TOKENS", TOKEN),
    ];
    for args in [&["--help"][..], &["worker", "--help"], &["api", "--help"]] {
        let text = output(args, &env).await;
        assert!(
            text.contains("DATABASE_URL"),
            "the variables are still listed:\n{text}"
        );
        assert!(
            !text.contains(SECRET),
            "apiary {args:?} showed a secret:\n{text}"
        );
    }
}

/// Unreachable servers: every role fails or retries, and says so, without the password.
#[tokio::test]
async fn unreachable_servers_are_reported_without_the_password() {
    let env = TestEnv::new().await;
    let nowhere = [
        ("DATABASE_URL", "postgres://u:sekret-pw@127.0.0.1:1/x"),
        ("AMQP_URL", "amqp://u:sekret-pw@127.0.0.1:1/%2f"),
        ("RUST_LOG", "debug"),
    ];
    for args in [
        &["status"][..],
        &["migrate"],
        &["api"],
        &["job", "0190d5a6-5b1e-7000-8000-000000000000"],
    ] {
        for format in ["human", "json"] {
            let mut vars = nowhere.to_vec();
            vars.push(("APIARY_LOG_FORMAT", format));
            let text = output(args, &vars).await;
            assert!(
                text.contains("error"),
                "apiary {args:?} reported nothing:\n{text}"
            );
            assert!(
                !text.contains(SECRET),
                "apiary {args:?} showed the password:\n{text}"
            );
        }
    }
    // A worker keeps retrying: wait for it to say Postgres is unavailable, then look.
    let mut worker = env.spawn(&["worker"], &nowhere);
    worker
        .wait_for_log("postgres unavailable", Duration::from_secs(30))
        .await;
    worker.signal("TERM");
    let _ = worker.wait(Duration::from_secs(30)).await;
    let log = worker.log_text();
    assert!(
        !log.contains(SECRET),
        "the worker logged the password:\n{log}"
    );
}

/// Reachable servers that refuse the credentials (RabbitMQ checks the password; this
/// Postgres trusts local connections, so the worker gets in there), with JSON logs.
#[tokio::test]
async fn refused_credentials_are_reported_without_the_password() {
    let env = TestEnv::new().await;
    let db_url =
        env.cfg
            .database_url
            .replacen("postgres://postgres@", "postgres://postgres:sekret-pw@", 1);
    let vars = [
        ("DATABASE_URL", db_url.as_str()),
        ("AMQP_URL", "amqp://guest:sekret-pw@127.0.0.1:5672/%2f"),
        ("APIARY_LOG_FORMAT", "json"),
        ("RUST_LOG", "debug"),
    ];
    let mut worker = env.spawn(&["worker"], &vars);
    worker
        .wait_for_log("rabbitmq unavailable", Duration::from_secs(30))
        .await;
    worker.signal("TERM");
    let _ = worker.wait(Duration::from_secs(30)).await;
    let log = worker.log_text();
    assert!(
        !log.contains(SECRET),
        "the worker logged the password:\n{log}"
    );
    let status = output(&["status"], &vars).await;
    assert!(status.contains("error"), "{status}");
    assert!(!status.contains(SECRET), "{status}");
}
