//! The `postgres` and `schema` checks, and the connection the `clock` check measures on.

use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

use super::clock::{measure_skew, skew_finding};
use super::{CONNECT_TIMEOUT, Finding, Level};
use crate::config::{Config, mask_url};
use crate::store::schema::{self, SchemaState};

pub(super) async fn check_postgres(cfg: &Config) -> Vec<Finding> {
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
