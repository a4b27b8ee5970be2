//! Postgres: the truth about every job. One file per operation, named for the step of the
//! job's path it serves: [`insert_job`] ②, [`claim_job`] ④, [`finish_job`] ⑥, [`get_job`] and
//! [`list_jobs`] ⑦, [`outbox`] for the window between commit and broker confirm.

pub mod batches;
pub mod cancel_job;
pub mod claim_job;
pub mod dead_job;
pub mod dependencies;
pub mod finish_job;
pub mod fire_schedules;
pub mod get_job;
pub mod insert_job;
pub mod invariants;
pub mod limits;
pub mod list_jobs;
pub mod outbox;
pub mod prune;
pub mod queues;
pub mod rescue_job;
pub mod schedules;
pub mod schema;
pub mod series;
pub mod shards;
pub mod stats;
pub mod workers;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// The migrations, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The NOTIFY channel on which finished job ids are announced, comma-separated.
pub const DONE_CHANNEL: &str = "apiary_jobs_done";

/// Errors from Postgres, with what we were doing.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A query failed.
    #[error("postgres: {context}: {source}")]
    Query {
        /// What we were doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The database has not been migrated to this version.
    #[error("the database schema is not current ({0}); run `apiary migrate` first")]
    SchemaOutdated(String),
    /// The connection string does not parse.
    #[error("DATABASE_URL is invalid: {0}")]
    BadUrl(String),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether the error is a lost or refused connection rather than a bad query: the caller
    /// should wait and try again.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Query { source, .. } => match source {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // 08: connection exceptions; 57: operator intervention (shutdown, terminated
                // backend); 40001/40P01: serialization failure and deadlock (retry the
                // transaction); 55P03: lock not available.
                sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                    c.starts_with("08")
                        || c.starts_with("57")
                        || c == "40001"
                        || c == "40P01"
                        || c == "55P03"
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether Postgres refused the statement because of the data it carried (a value it
    /// cannot store, a CHECK it violates, a field past a limit) rather than because it is
    /// unreachable or the statement is wrong. Such an error belongs to one item of a batch:
    /// the batch is retried without it, and the item is refused on its own with this reason.
    pub fn is_data_error(&self) -> bool {
        self.sqlstate().is_some_and(|c| {
            // 22: data exception (bad encoding, untranslatable character, out of range,
            // invalid text representation); 23: integrity constraint (a CHECK); 54: program
            // limit exceeded (a value too large for an index).
            c.starts_with("22") || c.starts_with("23") || c.starts_with("54")
        })
    }

    /// The SQLSTATE of a database error, if this is one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Query {
                source: sqlx::Error::Database(db),
                ..
            } => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// Postgres's own message for a refused value, without the driver's wrapping: safe to show
    /// to the caller who sent the value (it describes their data, not our internals).
    pub fn refusal(&self) -> Option<String> {
        match self {
            StoreError::Query {
                source: sqlx::Error::Database(db),
                ..
            } if self.is_data_error() => Some(db.message().to_string()),
            _ => None,
        }
    }
}

/// The longest error text kept for one attempt (in `error` and in the `errors` history) and
/// sent in a dead letter's `x-apiary-reason` header. Handlers can fail with any message; the
/// record and the letter keep its start, marked as cut.
pub const MAX_ERROR_BYTES: usize = 4096;

/// `s` as Postgres text can hold it: NUL characters (which text cannot store) become U+FFFD.
/// Used for text we write on a caller's behalf that is not theirs to have refused: error
/// messages, reasons, the raw body of a poison message.
pub(crate) fn storable_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// An error message as it is stored: storable, and at most [`MAX_ERROR_BYTES`].
pub fn clip_error(s: &str) -> String {
    let s = storable_text(s);
    if s.len() <= MAX_ERROR_BYTES {
        return s.into_owned();
    }
    const MARK: &str = "… (cut)";
    let mut end = MAX_ERROR_BYTES - MARK.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end])
}

/// Adds context to a sqlx result.
pub(crate) trait Context<T> {
    fn context(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query {
            context: what,
            source,
        })
    }
}

/// A handle on the job store: a connection pool, cheap to clone.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Opens a pool of at most `max_connections` to `url`. Connections open lazily, so a
    /// process starts while Postgres is down and recovers when it returns.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(e.to_string()))?
            .application_name("apiary")
            .log_statements(tracing::log::LevelFilter::Trace);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Store { pool })
    }

    /// Wraps an existing pool.
    pub fn from_pool(pool: PgPool) -> Store {
        Store { pool }
    }

    /// The pool, for handlers and tests.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Fails with [`StoreError::SchemaOutdated`] unless every compiled-in migration is applied.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let applied: Vec<i64> = match sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        {
            Ok(v) => v,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                return Err(StoreError::SchemaOutdated("no migrations applied".into()));
            }
            Err(e) => {
                return Err(StoreError::Query {
                    context: "reading applied migrations",
                    source: e,
                });
            }
        };
        let missing: Vec<String> = MIGRATOR
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| format!("{}_{}", m.version, m.description))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::SchemaOutdated(format!(
                "missing {}",
                missing.join(", ")
            )))
        }
    }

    /// Whether Postgres answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .context("ping")
            .map(|_| ())
    }
}

/// Creates the database named in `url` if it does not exist, then applies the migrations.
/// Safe to run concurrently: a lost creation race is fine, and sqlx serialises migrations with
/// an advisory lock.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    migrate_reporting(url, |_| {}).await
}

/// [`migrate`], calling `step` before each migration it applies (for a progress display).
pub async fn migrate_reporting(
    url: &str,
    step: impl FnMut(schema::Step<'_>),
) -> Result<(), StoreError> {
    let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::BadUrl(e.to_string()))?;
    let database = options.get_database().unwrap_or("postgres").to_string();
    let admin = options.clone().database("postgres");
    let mut conn = admin
        .connect()
        .await
        .context("connecting to the postgres database")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&mut conn)
            .await
            .context("looking for the database")?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(%database, "created database"),
            // 42P04: created by a concurrent `migrate`; 23505: the same race seen in the catalog.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(e) => {
                return Err(StoreError::Query {
                    context: "creating the database",
                    source: e,
                });
            }
        }
    }
    drop(conn);
    let mut conn = options
        .connect()
        .await
        .context("connecting to the database")?;
    schema::apply(&mut conn, step).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_stored_storable_and_bounded() {
        assert_eq!(clip_error("plain"), "plain");
        assert_eq!(clip_error("a\0b"), "a\u{FFFD}b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = clip_error(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.ends_with("(cut)"));
    }
}
