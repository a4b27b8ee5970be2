//! The schema version: which migrations this binary carries ([`expected_version`], shown by
//! `apiary --version`), which a database has applied ([`read_applied`]), how the two compare
//! ([`compare`], for `apiary doctor`), and applying them one at a time so `apiary migrate` can
//! say which one it is on ([`apply`]).

use sqlx::PgConnection;

use super::{Context, MIGRATOR, StoreError};

/// The schema version this binary expects: the number of its newest compiled-in migration
/// (`migrations/0008_....sql` is version 8).
pub fn expected_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// A migration as a database recorded it in `_sqlx_migrations`.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its number.
    pub version: i64,
    /// Whether it completed. sqlx records a migration that failed part-way as unsuccessful.
    pub success: bool,
    /// The SHA-384 of the file that was applied.
    pub checksum: Vec<u8>,
}

/// The migrations a database has applied, oldest first; `None` when it has no migration table
/// (never migrated).
pub async fn read_applied(
    conn: &mut PgConnection,
) -> Result<Option<Vec<AppliedMigration>>, StoreError> {
    let rows: Result<Vec<(i64, bool, Vec<u8>)>, sqlx::Error> =
        sqlx::query_as("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(conn)
            .await;
    match rows {
        Ok(rows) => Ok(Some(
            rows.into_iter()
                .map(|(version, success, checksum)| AppliedMigration {
                    version,
                    success,
                    checksum,
                })
                .collect(),
        )),
        // 42P01: undefined table.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(None),
        Err(e) => Err(e).context("reading applied migrations"),
    }
}

/// A database's schema against this binary's migrations.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    /// Every migration applied, none unknown: the database is at [`expected_version`].
    Current(i64),
    /// Nothing applied: a database `apiary migrate` never ran on.
    Unmigrated,
    /// Migrations of this binary not applied yet (`version_description`).
    Behind {
        /// The newest applied version (0 for none).
        at: i64,
        /// The missing migrations.
        missing: Vec<String>,
    },
    /// Applied migrations this binary does not know: a newer Apiary migrated this database.
    Ahead {
        /// The newest applied version.
        at: i64,
        /// The unknown versions.
        unknown: Vec<i64>,
    },
    /// A migration failed part-way; sqlx refuses to migrate past it.
    Dirty(i64),
    /// A migration was applied from a file other than this binary's (its checksum differs);
    /// `apiary migrate` refuses to go on.
    Changed(i64),
}

/// Compares what a database applied with this binary's migrations.
pub fn compare(applied: Option<&[AppliedMigration]>) -> SchemaState {
    let known: Vec<(i64, String, &[u8])> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| {
            (
                m.version,
                format!("{:04}_{}", m.version, m.description.replace(' ', "_")),
                m.checksum.as_ref(),
            )
        })
        .collect();
    compare_with(applied, &known)
}

/// [`compare`] against `known` migrations `(version, name, checksum)`.
fn compare_with(
    applied: Option<&[AppliedMigration]>,
    known: &[(i64, String, &[u8])],
) -> SchemaState {
    let Some(applied) = applied.filter(|a| !a.is_empty()) else {
        return SchemaState::Unmigrated;
    };
    if let Some(dirty) = applied.iter().find(|a| !a.success) {
        return SchemaState::Dirty(dirty.version);
    }
    let at = applied.iter().map(|a| a.version).max().unwrap_or(0);
    let unknown: Vec<i64> = applied
        .iter()
        .map(|a| a.version)
        .filter(|v| !known.iter().any(|k| k.0 == *v))
        .collect();
    if !unknown.is_empty() {
        return SchemaState::Ahead { at, unknown };
    }
    for (version, _, checksum) in known {
        if let Some(a) = applied.iter().find(|a| a.version == *version)
            && a.checksum.as_slice() != *checksum
        {
            return SchemaState::Changed(*version);
        }
    }
    let missing: Vec<String> = known
        .iter()
        .filter(|k| !applied.iter().any(|a| a.version == k.0))
        .map(|k| k.1.clone())
        .collect();
    if missing.is_empty() {
        SchemaState::Current(at)
    } else {
        SchemaState::Behind { at, missing }
    }
}

/// One migration about to be applied, for a progress display.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// Its place among the pending ones, from 0.
    pub index: usize,
    /// How many are pending.
    pub count: usize,
    /// Its number.
    pub version: i64,
    /// Its name, from the file name.
    pub description: &'a str,
}

/// Applies the pending migrations one at a time, calling `step` before each; then runs the
/// whole set once more, which applies nothing new but keeps sqlx's checks (checksums of
/// applied migrations, a dirty one) exactly as a single run makes them. Each run takes sqlx's
/// advisory lock, so concurrent `apiary migrate`s still serialise: one that loses the race
/// finds the migration applied and goes on.
pub async fn apply(
    conn: &mut PgConnection,
    mut step: impl FnMut(Step<'_>),
) -> Result<(), StoreError> {
    // Only for the display: a migration another process applies meanwhile is skipped by
    // `run_to`, which reads the table again under the lock.
    let applied: Vec<i64> = match read_applied(conn).await {
        Ok(Some(a)) => a.into_iter().map(|a| a.version).collect(),
        _ => Vec::new(),
    };
    let pending: Vec<_> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .collect();
    for (index, m) in pending.iter().enumerate() {
        step(Step {
            index,
            count: pending.len(),
            version: m.version,
            description: &m.description,
        });
        MIGRATOR.run_to(m.version, &mut *conn).await?;
    }
    MIGRATOR.run(conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(versions: &[(i64, bool, &[u8])]) -> Vec<AppliedMigration> {
        versions
            .iter()
            .map(|(version, success, checksum)| AppliedMigration {
                version: *version,
                success: *success,
                checksum: checksum.to_vec(),
            })
            .collect()
    }

    #[test]
    fn a_schema_is_current_behind_ahead_dirty_or_changed() {
        let known = vec![
            (1, "0001_a".to_string(), &b"x"[..]),
            (2, "0002_b".into(), b"y"),
        ];
        assert_eq!(compare_with(None, &known), SchemaState::Unmigrated);
        assert_eq!(compare_with(Some(&[]), &known), SchemaState::Unmigrated);
        assert_eq!(
            compare_with(Some(&applied(&[(1, true, b"x"), (2, true, b"y")])), &known),
            SchemaState::Current(2)
        );
        assert_eq!(
            compare_with(Some(&applied(&[(1, true, b"x")])), &known),
            SchemaState::Behind {
                at: 1,
                missing: vec!["0002_b".into()]
            }
        );
        assert_eq!(
            compare_with(
                Some(&applied(&[
                    (1, true, b"x"),
                    (2, true, b"y"),
                    (3, true, b"z")
                ])),
                &known
            ),
            SchemaState::Ahead {
                at: 3,
                unknown: vec![3]
            }
        );
        assert_eq!(
            compare_with(Some(&applied(&[(1, true, b"x"), (2, false, b"y")])), &known),
            SchemaState::Dirty(2)
        );
        assert_eq!(
            compare_with(Some(&applied(&[(1, true, b"other")])), &known),
            SchemaState::Changed(1)
        );
    }

    #[test]
    fn this_binary_expects_its_newest_migration() {
        let newest = MIGRATOR.iter().map(|m| m.version).max();
        assert_eq!(Some(expected_version()), newest);
        assert!(expected_version() >= 8);
    }
}
