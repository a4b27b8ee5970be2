//! Errors a person can act on: real `apiary` processes against the real Postgres and RabbitMQ,
//! each pointed at one thing that is wrong, print exactly one line on stderr, which names the
//! fix where there is one, and exit with the code of the error's class (`apiary --help`).
//!
//! Not tested against a server: a wrong Postgres password. The shared server trusts every
//! local connection (pg_hba.conf `trust`), so it never asks for one; its SQLSTATE (28P01) takes
//! the same path as the nonexistent role below (28000), and its line is unit-tested in
//! `src/cli/errors.rs`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{PG_ROOT, TestEnv};

const T: Duration = Duration::from_secs(60);

/// What a finished `apiary` said and how it ended.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// Exits with `code`, and stderr is `line` alone; the message is not repeated anywhere.
    #[track_caller]
    fn says(&self, code: i32, line: &str) {
        assert_eq!(self.code, Some(code), "exit code; stderr:\n{}", self.stderr);
        assert_eq!(
            self.stderr.lines().next(),
            Some(line),
            "first line of stderr:\n{}",
            self.stderr
        );
        let message = line.trim_start_matches("error: ");
        assert_eq!(
            self.stderr.matches(message).count(),
            1,
            "said more than once:\n{}",
            self.stderr
        );
        assert!(!self.stderr.contains('\x1b'), "colour off a terminal");
    }

    /// Like [`Outcome::says`], for a long-running role, whose log lines may come first: the
    /// line ends stderr.
    #[track_caller]
    fn ends_saying(&self, code: i32, line: &str) {
        assert_eq!(self.code, Some(code), "exit code; stderr:\n{}", self.stderr);
        assert_eq!(
            self.stderr.lines().last(),
            Some(line),
            "last line of stderr:\n{}",
            self.stderr
        );
        let message = line.trim_start_matches("error: ");
        assert_eq!(self.stderr.matches(message).count(), 1, "{}", self.stderr);
    }
}

/// Runs `apiary args...` in `env`'s world with `vars` on top, as a person would: no
/// `RUST_LOG`, human logs, stderr not a terminal.
async fn apiary(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> Outcome {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"));
    cmd.args(args)
        .envs(env.envs())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("APIARY_LOG_FORMAT")
        .env("APIARY_HTTP_ADDR", "127.0.0.1:0")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(T, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("apiary {args:?} with {vars:?} did not finish"))
        .expect("run apiary");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A port nothing listens on: bound, then let go.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A database or role a test made beside its [`TestEnv`], dropped with it.
struct Scratch(&'static str, String);

impl Drop for Scratch {
    fn drop(&mut self) {
        let sql = match self.0 {
            "database" => format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.1),
            _ => format!("DROP ROLE IF EXISTS \"{}\"", self.1),
        };
        // Drop runs inside the test's runtime, which cannot block on itself.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(admin(&sql));
        })
        .join();
    }
}

async fn admin(sql: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&format!("{PG_ROOT}/postgres"))
        .await
        .expect("postgres");
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .expect(sql);
}

const JOB: &str = "0190d5a6-5b1e-7000-8000-000000000000";

#[tokio::test]
async fn a_missing_database_says_run_migrate() {
    let env = TestEnv::new().await;
    let url = format!("{PG_ROOT}/{}_missing", env.name);
    let line = format!(
        "error: database \"{}_missing\" does not exist (DATABASE_URL={url}); run `apiary migrate` to create it",
        env.name
    );
    for args in [
        &["status"][..],
        &["worker"],
        &["enqueue", "echo", "{}"],
        &["job", JOB],
    ] {
        apiary(&env, args, &[("DATABASE_URL", &url)])
            .await
            .says(5, &line);
    }
    apiary(&env, &["api"], &[("DATABASE_URL", &url)])
        .await
        .ends_saying(5, &line);
}

#[tokio::test]
async fn a_schema_behind_says_run_migrate() {
    let env = TestEnv::new().await;
    // A database that exists, never migrated.
    let empty = format!("{}_empty", env.name);
    admin(&format!("CREATE DATABASE \"{empty}\"")).await;
    let _drop = Scratch("database", empty.clone());
    let url = format!("{PG_ROOT}/{empty}");
    let vars = [("DATABASE_URL", url.as_str())];
    let unmigrated = "error: the database schema is not current (no migrations applied); run `apiary migrate` first";
    for args in [&["worker"][..], &["enqueue", "echo", "{}"]] {
        apiary(&env, args, &vars).await.says(5, unmigrated);
    }
    apiary(&env, &["api"], &vars)
        .await
        .ends_saying(5, unmigrated);
    // Commands that read without checking first say the same, with what Postgres missed.
    apiary(&env, &["job", JOB], &vars).await.says(
        5,
        "error: the database schema is not current (relation \"apiary_jobs\" does not exist); run `apiary migrate` first",
    );
    apiary(&env, &["status"], &vars).await.says(
        5,
        "error: the database schema is not current (relation \"apiary_workers\" does not exist); run `apiary migrate` first",
    );

    // Migrated by an older version: the latest migration is not applied.
    let latest = apiary::store::MIGRATOR.iter().last().expect("migrations");
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(latest.version)
        .execute(env.store.pool())
        .await
        .expect("forget a migration");
    let behind = format!(
        "error: the database schema is not current (missing {}_{}); run `apiary migrate` first",
        latest.version, latest.description
    );
    for args in [&["worker"][..], &["enqueue", "echo", "{}"]] {
        apiary(&env, args, &[]).await.says(5, &behind);
    }
}

#[tokio::test]
async fn postgres_refusing_connections_is_told_with_host_port_and_variable() {
    let env = TestEnv::new().await;
    let port = closed_port();
    let url = format!("postgres://postgres:sekret-pw@127.0.0.1:{port}/apiary");
    let line = format!(
        "error: cannot connect to Postgres at 127.0.0.1:{port} \
         (DATABASE_URL=postgres://postgres:***@127.0.0.1:{port}/apiary): connection refused; \
         is Postgres running there?"
    );
    for args in [
        &["status"][..],
        &["migrate"],
        &["enqueue", "echo", "{}"],
        &["job", JOB],
    ] {
        apiary(&env, args, &[("DATABASE_URL", &url)])
            .await
            .says(4, &line);
    }
}

#[tokio::test]
async fn a_postgres_login_refused_is_told() {
    let env = TestEnv::new().await;
    let role = format!("{}_nobody", env.name);
    let url = format!("postgres://{role}:sekret-pw@127.0.0.1:5432/{}", env.name);
    let line = format!(
        "error: Postgres at 127.0.0.1:5432 refused the login \
         (DATABASE_URL=postgres://{role}:***@127.0.0.1:5432/{}): role \"{role}\" does not exist; \
         check the user and password in DATABASE_URL",
        env.name
    );
    for args in [&["status"][..], &["worker"], &["migrate"]] {
        apiary(&env, args, &[("DATABASE_URL", &url)])
            .await
            .says(4, &line);
    }
}

#[tokio::test]
async fn rabbitmq_refusing_connections_is_told_with_host_port_and_variable() {
    let env = TestEnv::new().await;
    let port = closed_port();
    let url = format!("amqp://guest:sekret-pw@127.0.0.1:{port}/%2f");
    let reason = format!(
        "cannot connect to RabbitMQ at 127.0.0.1:{port} \
         (AMQP_URL=amqp://guest:***@127.0.0.1:{port}/%2f): connection refused; is RabbitMQ \
         running there?"
    );
    for args in [&["status"][..], &["migrate"]] {
        apiary(&env, args, &[("AMQP_URL", &url)])
            .await
            .says(4, &format!("error: {reason}"));
    }
    // The job is recorded before it is published: its id is printed all the same, and the
    // line says it is not lost.
    let out = apiary(&env, &["enqueue", "echo", "{}"], &[("AMQP_URL", &url)]).await;
    out.says(
        4,
        &format!(
            "error: the job is recorded but not yet published (a worker publishes it once \
             RabbitMQ answers): {reason}"
        ),
    );
    let id: uuid::Uuid = out.stdout.trim().parse().expect("the job id on stdout");
    assert!(env.job(id).await.is_some(), "job {id} is recorded");
}

#[tokio::test]
async fn a_rabbitmq_login_refused_is_told() {
    let env = TestEnv::new().await;
    let url = "amqp://guest:wrong-pw@127.0.0.1:5672/%2f";
    let line = "error: RabbitMQ at 127.0.0.1:5672 refused the login of user \"guest\" \
                (AMQP_URL=amqp://guest:***@127.0.0.1:5672/%2f); check the user and password in AMQP_URL";
    for args in [&["status"][..], &["migrate"]] {
        apiary(&env, args, &[("AMQP_URL", url)]).await.says(4, line);
    }
}

#[tokio::test]
async fn bad_input_and_unknown_jobs_have_their_own_codes() {
    let env = TestEnv::new().await;
    apiary(&env, &["enqueue", "echo", "{not json"], &[])
        .await
        .says(
            6,
            "error: the payload is not valid JSON: key must be a string at line 1 column 2",
        );
    apiary(&env, &["enqueue", "Bad Kind", "{}"], &[])
        .await
        .says(
            6,
            "error: invalid job: kind: has 'B'; only a-z, 0-9, '_', '.' and '-' are allowed",
        );
    let line = format!("error: no job with id {JOB}");
    apiary(&env, &["job", JOB], &[]).await.says(7, &line);
    apiary(&env, &["cancel", JOB], &[]).await.says(7, &line);

    // Cancelling a finished job is a request that cannot apply.
    let id = env
        .enqueue(apiary::NewJob::new("echo", serde_json::json!(1)))
        .await;
    let out = apiary(&env, &["cancel", &id.to_string()], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    apiary(&env, &["cancel", &id.to_string()], &[]).await.says(
        6,
        &format!("error: job {id} has already finished (cancelled)"),
    );
}

#[tokio::test]
async fn settings_that_cannot_work_exit_3_and_usage_errors_keep_clap_s_2() {
    let env = TestEnv::new().await;
    let line =
        "error: invalid configuration: APIARY_CONCURRENCY is 0; it must be between 1 and 10000";
    for args in [&["worker"][..], &["status"], &["enqueue", "echo"]] {
        let out = apiary(&env, args, &[("APIARY_CONCURRENCY", "0")]).await;
        out.says(3, line);
        assert!(out.stderr.contains("try '--help'"), "{}", out.stderr);
    }
    apiary(
        &env,
        &["status"],
        &[("DATABASE_URL", "mysql://u:sekret-pw@h/db")],
    )
    .await
    .says(
        3,
        "error: invalid configuration: DATABASE_URL is mysql://u:***@h/db; it must start with \
             postgres:// or postgresql://",
    );
    apiary(&env, &["api"], &[("APIARY_HTTP_ADDR", "0.0.0.0:0")])
        .await
        .says(
            3,
            "error: refusing to listen on 0.0.0.0:0 without authentication: use a loopback \
             address, or pass --insecure-listen-any to accept unauthenticated requests from the \
             network",
        );

    // clap's own usage errors: exit 2, with its tips.
    let out = apiary(&env, &["stauts"], &[]).await;
    out.says(2, "error: unrecognized subcommand 'stauts'");
    assert!(
        out.stderr
            .contains("tip: a similar subcommand exists: 'status'"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("Usage: apiary"), "{}", out.stderr);
    apiary(&env, &["job", "not-a-uuid"], &[]).await.says(
        2,
        "error: invalid value 'not-a-uuid' for '<ID>': invalid character: found `n` at 0",
    );

    // And the codes are in --help.
    let out = apiary(&env, &["--help"], &[]).await;
    assert_eq!(out.code, Some(0));
    assert!(
        out.stdout.contains(apiary::cli::errors::EXIT_CODES),
        "{}",
        out.stdout
    );
}

/// With JSON logs the error is one JSON event, carrying its class and code, and stderr holds
/// nothing else.
#[tokio::test]
async fn with_json_logs_the_error_is_one_json_event() {
    let env = TestEnv::new().await;
    let out = apiary(&env, &["job", JOB], &[("APIARY_LOG_FORMAT", "json")]).await;
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    let event: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(event["level"], "ERROR");
    assert_eq!(event["message"], format!("no job with id {JOB}"));
    assert_eq!(event["class"], "not_found");
    assert_eq!(event["exit_code"], 7);
}

/// "error:" is red on a terminal only, and never with `NO_COLOR`.
#[tokio::test]
async fn colour_only_on_a_terminal() {
    let env = TestEnv::new().await;
    let on_a_tty = |no_color: Option<&str>| {
        // `script` gives the command a terminal; its output is what the terminal showed.
        let mut cmd = std::process::Command::new("script");
        cmd.args([
            "-qec",
            &format!("{} job {JOB}", env!("CARGO_BIN_EXE_apiary")),
            "/dev/null",
        ])
        .envs(env.envs())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().expect("run script");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = on_a_tty(None);
    assert_eq!(code, Some(7), "{text}");
    assert!(
        text.contains(&format!("\x1b[1;31merror\x1b[0m: no job with id {JOB}")),
        "{text:?}"
    );
    let (code, text) = on_a_tty(Some("1"));
    assert_eq!(code, Some(7), "{text}");
    assert!(
        text.contains(&format!("error: no job with id {JOB}")),
        "{text:?}"
    );
    assert!(!text.contains('\x1b'), "{text:?}");
    // Not a terminal: plain (checked by every `says` above).
    apiary(&env, &["job", JOB], &[])
        .await
        .says(7, &format!("error: no job with id {JOB}"));
}

/// A kind no live worker serves is enqueued (a worker for it may start later) with a
/// warning; a served kind, or one with no worker yet, says what it should.
#[tokio::test]
async fn enqueueing_a_kind_no_live_worker_serves_warns() {
    let mut env = TestEnv::new().await;
    // Its broker queues, which the enqueue below declares, go with the test.
    env.queues.push("emails".into());
    let out = apiary(&env, &["enqueue", "echo", "{}"], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "warning: no worker is running on queue \"default\"; the job waits until one starts",
        )
    );

    let mut worker = env.spawn(&["worker"], &[]);
    worker
        .wait_for_log("worker starting", Duration::from_secs(30))
        .await;
    let out = apiary(&env, &["enqueue", "echo", "{}"], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stderr, "", "a served kind gets no warning");
    // A worker of `default` does not serve another queue.
    let out = apiary(&env, &["enqueue", "echo", "{}", "--queue", "emails"], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        "warning: no worker is running on queue \"emails\"; the job waits until one starts"
    );

    let out = apiary(&env, &["enqueue", "send_mail", "{}"], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let id: uuid::Uuid = out.stdout.trim().parse().expect("the job id on stdout");
    assert!(env.job(id).await.is_some());
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "warning: no live worker on queue \"default\" serves kind \"send_mail\" (they serve: \
             apiary.webhook, collect, echo, fail, sleep, tally); a worker without its handler records the job dead, to \
             replay with `apiary dead replay` once one serves it",
        )
    );
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}
