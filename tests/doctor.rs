//! `apiary doctor` against the real Postgres and RabbitMQ: all is well on a migrated database
//! with declared queues, and each misconfiguration it checks is reported as a FAIL (or warn)
//! line with its fix and the exit status that goes with it. (The clock comparison is
//! unit-tested in `src/doctor.rs`: this host and its Postgres share one clock, so here the
//! check can only be seen passing.)

mod common;

use std::time::Duration;

use common::{AMQP, PG_ROOT, TestEnv};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use uuid::Uuid;

/// What one doctor run printed and how it exited.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The report line of `check` at `level` ("ok", "warn", "FAIL") that contains `text`,
    /// and the fix printed under it, if any.
    fn line(&self, level: &str, check: &str, text: &str) -> (String, Option<String>) {
        let lines: Vec<&str> = self.stdout.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let mut words = l.split_whitespace();
            if words.next() == Some(level) && words.next() == Some(check) && l.contains(text) {
                let fix = lines
                    .get(i + 1)
                    .and_then(|n| n.trim_start().strip_prefix("fix: "))
                    .map(str::to_string);
                return (l.to_string(), fix);
            }
        }
        panic!(
            "no `{level} {check}` line containing {text:?}:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
    }

    /// The fix under the one line of `check` at `level` containing `text`.
    fn fix(&self, level: &str, check: &str, text: &str) -> String {
        self.line(level, check, text)
            .1
            .unwrap_or_else(|| panic!("no fix under `{level} {check}`:\n{}", self.stdout))
    }

    fn level_of(&self, check: &str) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let level = w.next()?;
                (w.next() == Some(check)).then(|| level.to_string())
            })
            .collect()
    }
}

/// Runs `apiary doctor` in `env`'s world with `extra` variables (and `args`).
async fn doctor(env: &TestEnv, extra: &[(&str, &str)], args: &[&str]) -> Outcome {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"));
    cmd.arg("doctor")
        .args(args)
        .envs(env.envs())
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("doctor finished in time")
        .expect("doctor ran");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A local port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}

/// The broker's consumer_timeout in milliseconds, read the way doctor reads it.
fn broker_consumer_timeout_ms() -> u64 {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", "application:get_env(rabbit, consumer_timeout)."])
        .output()
        .expect("rabbitmqctl runs on this machine");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("{ok,")
        .and_then(|t| t.strip_suffix('}'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("the broker here has a consumer_timeout: {text}"))
}

#[tokio::test]
async fn all_is_well_on_a_migrated_database_with_declared_queues() {
    let env = TestEnv::new().await;
    let out = doctor(&env, &[], &[]).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    for check in [
        "config",
        "postgres",
        "schema",
        "clock",
        "rabbitmq",
        "queues",
        "consumer_timeout",
    ] {
        assert_eq!(out.level_of(check), ["ok"], "{check}:\n{}", out.stdout);
    }
    out.line("ok", "postgres", &format!("database \"{}\"", env.name));
    let schema = apiary::store::schema::expected_version();
    out.line("ok", "schema", &format!("current: schema {schema}"));
    out.line("ok", "clock", "Postgres's (±");
    out.line(
        "ok",
        "queues",
        &format!("all 9 queues of \"{}\" exist", env.cfg.queue),
    );
    out.line("ok", "consumer_timeout", "read with rabbitmqctl");
    assert!(out.stdout.ends_with("all is well\n"), "{}", out.stdout);
    // No noise from the checks themselves.
    assert!(!out.stderr.contains("ERROR"), "{}", out.stderr);
}

#[tokio::test]
async fn postgres_unreachable_missing_database_and_refused_login() {
    let env = TestEnv::new().await;
    let port = closed_port().await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", env.name);
    let out = doctor(&env, &[("DATABASE_URL", &url)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "postgres",
        &format!("Postgres at 127.0.0.1:{port} (DATABASE_URL) does not answer"),
    );
    assert_eq!(
        fix,
        "start Postgres, or point DATABASE_URL at the host and port where it runs"
    );
    assert_eq!(out.level_of("schema"), ["skip"]);
    assert_eq!(out.level_of("clock"), ["skip"]);
    // The broker is checked all the same.
    assert_eq!(out.level_of("queues"), ["ok"], "{}", out.stdout);

    let missing = format!(
        "apiary_t_missing_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("{PG_ROOT}/{missing}");
    let out = doctor(&env, &[("DATABASE_URL", &url)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "postgres",
        &format!("answers, but the database \"{missing}\" does not exist"),
    );
    assert_eq!(
        fix,
        "run `apiary migrate`: it creates the database and its schema"
    );

    let url = format!(
        "postgres://apiary_no_such_role:pw@127.0.0.1:5432/{}",
        env.name
    );
    let out = doctor(&env, &[("DATABASE_URL", &url)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let (line, fix) = out.line(
        "FAIL",
        "postgres",
        "refused the login of user \"apiary_no_such_role\"",
    );
    assert!(!line.contains(":pw@"), "{line}");
    assert!(
        fix.is_some_and(|f| f.starts_with("check the user and password in DATABASE_URL")),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn a_schema_behind_is_fixed_by_migrate_and_one_ahead_is_named() {
    let env = TestEnv::new().await;
    let newest = apiary::store::schema::expected_version();
    let name = apiary::store::MIGRATOR
        .iter()
        .find(|m| m.version == newest)
        .map(|m| format!("{newest:04}_{}", m.description.replace(' ', "_")))
        .expect("the newest migration");
    // The database as an older apiary left it: the newest migration not recorded.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newest)
        .execute(env.store.pool())
        .await
        .expect("forget the newest migration");
    let out = doctor(&env, &[], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "schema",
        &format!(
            "behind: schema {}, this apiary expects {newest} (missing {name})",
            // The migration before the newest: numbers may have gaps on a branch.
            apiary::store::MIGRATOR
                .iter()
                .map(|m| m.version)
                .filter(|v| *v < newest)
                .max()
                .unwrap_or(0)
        ),
    );
    assert_eq!(fix, "run `apiary migrate`");
    // The fix works.
    let migrated = env.run(&["migrate"]).await;
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let out = doctor(&env, &[], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);

    // Migrated by a newer apiary.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', true, '\\x00', 0)",
    )
    .execute(env.store.pool())
    .await
    .expect("a migration from the future");
    let out = doctor(&env, &[], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "schema",
        &format!("ahead: schema 9999, this apiary expects {newest} (unknown migrations 9999)"),
    );
    assert!(
        fix.starts_with("a newer apiary migrated this database"),
        "{fix}"
    );
}

#[tokio::test]
async fn a_database_never_migrated_is_told_to_migrate() {
    let env = TestEnv::new().await;
    sqlx::query("DROP TABLE _sqlx_migrations")
        .execute(env.store.pool())
        .await
        .expect("drop the migration table");
    let out = doctor(&env, &[], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix("FAIL", "schema", "no migrations applied");
    assert_eq!(fix, "run `apiary migrate`");
}

#[tokio::test]
async fn rabbitmq_unreachable_refused_login_and_missing_vhost() {
    let env = TestEnv::new().await;
    let port = closed_port().await;
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let out = doctor(&env, &[("AMQP_URL", &url)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "rabbitmq",
        &format!("RabbitMQ at 127.0.0.1:{port} (AMQP_URL) does not answer"),
    );
    assert_eq!(
        fix,
        "start RabbitMQ, or point AMQP_URL at the host and port where it runs"
    );
    assert_eq!(out.level_of("queues"), ["skip"]);
    // Postgres is checked all the same.
    assert_eq!(out.level_of("schema"), ["ok"], "{}", out.stdout);

    let url = "amqp://guest:not-the-password@127.0.0.1:5672/%2f";
    let out = doctor(&env, &[("AMQP_URL", url)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix("FAIL", "rabbitmq", "refused the login of user \"guest\"");
    assert!(
        fix.starts_with("check the user, password and vhost in AMQP_URL"),
        "{fix}"
    );
    assert!(!out.stdout.contains("not-the-password"), "{}", out.stdout);

    let vhost = format!(
        "apiary-missing-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let out = doctor(&env, &[("AMQP_URL", &url)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "rabbitmq",
        &format!("does not let user \"guest\" use vhost \"{vhost}\""),
    );
    assert!(
        fix.contains(&format!("rabbitmqctl add_vhost {vhost}")),
        "{fix}"
    );
}

#[tokio::test]
async fn queues_not_declared_are_named_and_not_created() {
    let env = TestEnv::new().await;
    let queue = format!(
        "apiary.t.undeclared.{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let out = doctor(&env, &[("APIARY_QUEUE", &queue)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "queues",
        &format!("9 of 9 queues are not declared: {queue}, {queue}.dead, {queue}.delay.100"),
    );
    assert_eq!(fix, "run `apiary migrate` (with the same APIARY_QUEUE)");
    // Doctor looked without declaring.
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await;
    assert!(found.is_err(), "doctor created {queue}");
    let _ = conn.close(200, "".into()).await;
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_is_named_with_the_argument() {
    let env = TestEnv::new().await;
    let tier = env.names().delay(100);
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(tier.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the tier");
    // Another program's idea of the tier: a different TTL, no dead-letter target.
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(999));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(tier.as_str().into(), durable, args)
        .await
        .expect("declare it otherwise");
    let _ = conn.close(200, "".into()).await;

    let out = doctor(&env, &[], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let (line, fix) = out.line(
        "FAIL",
        "queues",
        &format!("queue {tier} has other arguments than Apiary declares"),
    );
    assert!(line.contains("inequivalent arg"), "{line}");
    assert!(line.contains("x-message-ttl"), "{line}");
    assert_eq!(
        fix.as_deref(),
        Some(
            format!(
                "move its messages elsewhere (a shovel), delete it (`rabbitmqctl delete_queue \
                 {tier}`), and run `apiary migrate`"
            )
            .as_str()
        )
    );
    // Only that queue is wrong.
    assert_eq!(out.level_of("queues"), ["FAIL"], "{}", out.stdout);
}

#[tokio::test]
async fn a_work_queue_from_before_priorities_is_a_warning_with_the_upgrade() {
    let env = TestEnv::new().await;
    let work = env.names().work;
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(work.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the work queue");
    // As an Apiary before priorities declared it: durable, no arguments.
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(work.as_str().into(), durable, FieldTable::default())
        .await
        .expect("declare it the old way");
    let _ = conn.close(200, "".into()).await;

    let out = doctor(&env, &[], &[]).await;
    assert_eq!(out.code, Some(0), "a warning alone passes: {}", out.stdout);
    let (_, fix) = out.line(
        "warn",
        "queues",
        &format!("work queue {work} has no priority levels"),
    );
    assert!(
        fix.as_deref().is_some_and(|f| f.contains("apiary migrate")),
        "{fix:?}"
    );
    let strict = doctor(&env, &[], &["--strict"]).await;
    assert_eq!(strict.code, Some(1), "{}", strict.stdout);
}

#[tokio::test]
async fn detach_after_against_the_brokers_consumer_timeout() {
    let env = TestEnv::new().await;
    let timeout = Duration::from_millis(broker_consumer_timeout_ms());
    let show = |d: Duration| humantime::format_duration(d).to_string();

    // At the broker's timeout: a long job's channel is closed before it detaches.
    let detach = show(timeout.min(Duration::from_secs(86_400)));
    let out = doctor(&env, &[("APIARY_DETACH_AFTER", &detach)], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let fix = out.fix(
        "FAIL",
        "consumer_timeout",
        &format!(
            "APIARY_DETACH_AFTER ({detach}) against the broker's consumer_timeout ({}, read with \
             rabbitmqctl)",
            show(timeout)
        ),
    );
    assert_eq!(
        fix,
        format!(
            "set APIARY_DETACH_AFTER below {} (half the consumer_timeout), or raise \
             consumer_timeout in rabbitmq.conf",
            show(timeout / 2)
        )
    );

    // Above half of it: a warning, which fails only with --strict.
    let detach = show(timeout * 3 / 4);
    let out = doctor(&env, &[("APIARY_DETACH_AFTER", &detach)], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    out.line("warn", "consumer_timeout", "may wait APIARY_DETACH_AFTER");
    let out = doctor(&env, &[("APIARY_DETACH_AFTER", &detach)], &["--strict"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stdout.ends_with("0 failed, 1 warning(s)\n"),
        "{}",
        out.stdout
    );

    // A broker doctor cannot read, stated by the operator.
    let out = doctor(&env, &[("APIARY_BROKER_CONSUMER_TIMEOUT", "5m")], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    out.fix(
        "FAIL",
        "consumer_timeout",
        "APIARY_DETACH_AFTER (10m) against the broker's consumer_timeout (5m, from \
         APIARY_BROKER_CONSUMER_TIMEOUT)",
    );
    let out = doctor(&env, &[("APIARY_BROKER_CONSUMER_TIMEOUT", "off")], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    out.line(
        "ok",
        "consumer_timeout",
        "the broker has no consumer timeout",
    );
}

#[tokio::test]
async fn an_unworkable_setting_fails_and_the_rest_is_still_checked() {
    let env = TestEnv::new().await;
    let out = doctor(
        &env,
        &[("APIARY_RETRY_BASE", "5s"), ("APIARY_RETRY_CAP", "1s")],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    out.line(
        "FAIL",
        "config",
        "APIARY_RETRY_CAP is 1s; it must be at least",
    );
    assert_eq!(out.level_of("schema"), ["ok"], "{}", out.stdout);
    assert_eq!(out.level_of("queues"), ["ok"], "{}", out.stdout);
}
