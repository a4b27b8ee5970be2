//! ④ Claims under limits: rate limits (at most N starts in any window of a period) and
//! concurrency keys (at most N running jobs per key), enforced across every worker at once.
//!
//! A limited batch is claimed in one transaction: first the advisory lock of every scope and
//! key in it (in one order, so two workers never deadlock), then, in a new statement whose
//! snapshot sees every claim committed before the locks were granted, the counts; then the
//! claim of the jobs the limits let through; then their starts, stamped with a clock read after
//! the counts, which is also their `started_at`. A job held back is not claimed, so it is charged nothing: the worker
//! sends its message to a delay tier to come back when the limit should allow it. Held jobs
//! of a rate are given return times spread at the rate's pace (the `apiary_limit_slots` table), so a
//! backlog behind a limit costs about one hop per job, not a storm of retries.
//!
//! Jobs of kinds without limits never come here: their claims are exactly as before.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::claim_job::{ClaimInput, Claims, claim_statement};
use super::{Context, Store, StoreError};
use crate::config::Rate;

/// The limits one delivery is subject to.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// Rate limits and the scope each counts in (the job's kind's, its queue's): the job
    /// starts only when none of them is full.
    pub rates: Vec<(String, Rate)>,
    /// A concurrency limit: the job's key and how many of its kind may run with it at once.
    pub key: Option<(String, u32)>,
}

/// What a limited claim answered for one delivery.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq)]
pub enum Limited {
    /// The limits let it through; this is what the claim found.
    Claim(super::claim_job::Claim),
    /// Held back by a limit: claimed nothing, charged nothing; try again after this long.
    Held(Duration),
}

/// How long a job held by its concurrency key waits before it looks again: there is no way to
/// know when a running job of the key ends, so held jobs look about once a second.
pub const KEY_RECHECK: Duration = Duration::from_secs(1);

impl Store {
    /// Claims `inputs`, each under its `gates` entry. Returns one answer per input, in order,
    /// and Postgres's clock.
    pub async fn claim_limited(
        &self,
        inputs: &[ClaimInput<'_>],
        gates: &[Gate],
        worker: uuid::Uuid,
        lease: Duration,
    ) -> Result<(Vec<Limited>, Option<DateTime<Utc>>), StoreError> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .context("starting a limited claim")?;
        let mut locks: Vec<String> = Vec::new();
        for (input, gate) in inputs.iter().zip(gates) {
            for (scope, _) in &gate.rates {
                locks.push(format!("rate:{scope}"));
            }
            if let Some((key, _)) = &gate.key {
                locks.push(format!("key:{}:{key}", input.job.kind));
            }
        }
        locks.sort();
        locks.dedup();
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(hashtextextended(l, 42)))
               FROM (SELECT l FROM unnest($1::text[]) l ORDER BY l) o",
        )
        .bind(&locks)
        .execute(&mut *tx)
        .await
        .context("taking the limits' locks")?;
        // The window's edge: read once the locks are held (`now()` is when the transaction
        // began, before any wait for a lock).
        let t0: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *tx)
            .await
            .context("reading the clock")?;

        // The counts, in a statement of their own: its snapshot is taken after every lock was
        // granted, so it sees every start and claim committed by the previous holder.
        let mut rates: Vec<(String, Rate)> =
            gates.iter().flat_map(|g| g.rates.iter().cloned()).collect();
        rates.sort_by(|a, b| a.0.cmp(&b.0));
        rates.dedup_by(|a, b| a.0 == b.0);
        let scopes: Vec<&str> = rates.iter().map(|(s, _)| s.as_str()).collect();
        let periods: Vec<i64> = rates
            .iter()
            .map(|(_, r)| i64::try_from(r.period.as_micros()).unwrap_or(i64::MAX))
            .collect();
        #[allow(clippy::type_complexity)]
        let rate_rows: Vec<(String, i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>, DateTime<Utc>)> =
            sqlx::query_as(
                "SELECT s.scope,
                        (SELECT count(*) FROM apiary_rate_starts r
                          WHERE r.scope = s.scope AND r.started_at > $3 - s.period * interval '1 microsecond'),
                        (SELECT min(r.started_at) FROM apiary_rate_starts r
                          WHERE r.scope = s.scope AND r.started_at > $3 - s.period * interval '1 microsecond'),
                        (SELECT next_slot FROM apiary_limit_slots l WHERE l.scope = s.scope),
                        $3
                   FROM unnest($1::text[], $2::int8[]) AS s(scope, period)",
            )
            .bind(&scopes)
            .bind(&periods)
            .bind(t0)
            .fetch_all(&mut *tx)
            .await
            .context("counting a rate limit's starts")?;
        let mut keyed: Vec<(&str, &str)> = inputs
            .iter()
            .zip(gates)
            .filter_map(|(i, g)| {
                g.key
                    .as_ref()
                    .map(|(k, _)| (i.job.kind.as_str(), k.as_str()))
            })
            .collect();
        keyed.sort_unstable();
        keyed.dedup();
        let key_kinds: Vec<&str> = keyed.iter().map(|(k, _)| *k).collect();
        let key_values: Vec<&str> = keyed.iter().map(|(_, v)| *v).collect();
        let key_rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT k.kind, k.key,
                    (SELECT count(*) FROM apiary_jobs j
                      WHERE j.concurrency_key = k.key AND j.kind = k.kind AND j.status = 'running')
               FROM unnest($1::text[], $2::text[]) AS k(kind, key)",
        )
        .bind(&key_kinds)
        .bind(&key_values)
        .fetch_all(&mut *tx)
        .await
        .context("counting a concurrency key's running jobs")?;
        // The starts' clock, read after the counts: a job the counts did not see running had
        // finished before them, so before this; and it is never before the window's edge, so
        // a start counted against the window it lands in. The starts recorded and the claimed
        // jobs' `started_at` use it.
        let t: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *tx)
            .await
            .context("reading the clock")?;

        let now = t;
        struct RateState {
            rate: Rate,
            started: i64,
            oldest: Option<DateTime<Utc>>,
            next_slot: Option<DateTime<Utc>>,
            moved: bool,
        }
        let mut rate_state: HashMap<String, RateState> = rate_rows
            .into_iter()
            .zip(rates.iter())
            .map(|((scope, started, oldest, next_slot, _), (_, rate))| {
                (
                    scope,
                    RateState {
                        rate: *rate,
                        started,
                        oldest,
                        next_slot,
                        moved: false,
                    },
                )
            })
            .collect();
        let mut running: HashMap<(String, String), i64> =
            key_rows.into_iter().map(|(k, v, n)| ((k, v), n)).collect();

        // Decide, in delivery order.
        let mut verdicts: Vec<Option<Duration>> = Vec::with_capacity(inputs.len());
        for (input, gate) in inputs.iter().zip(gates) {
            let key_full = gate.key.as_ref().is_some_and(|(k, max)| {
                running
                    .get(&(input.job.kind.clone(), k.clone()))
                    .copied()
                    .unwrap_or(0)
                    >= i64::from(*max)
            });
            // The first full rate decides the wait. Held jobs are given return times one
            // interval apart, after any already handed out, from when the window frees a
            // start (when its oldest start leaves it).
            let full = gate.rates.iter().find(|(scope, _)| {
                rate_state
                    .get(scope)
                    .is_some_and(|st| st.started >= i64::from(st.rate.count))
            });
            let rate_wait = full.and_then(|(scope, _)| {
                let st = rate_state.get_mut(scope)?;
                let free_at = st.oldest.map(|o| o + st.rate.period).unwrap_or(now);
                let slot = st.next_slot.filter(|s| *s > free_at).unwrap_or(free_at);
                let interval = st.rate.period / st.rate.count;
                st.next_slot = Some(slot + interval);
                st.moved = true;
                Some((slot - now).to_std().unwrap_or_default())
            });
            let verdict = match (rate_wait, key_full) {
                (Some(w), _) => Some(w),
                (None, true) => Some(KEY_RECHECK),
                (None, false) => None,
            };
            if verdict.is_none() {
                for (scope, _) in &gate.rates {
                    if let Some(st) = rate_state.get_mut(scope) {
                        st.started += 1;
                    }
                }
                if let Some((k, _)) = &gate.key {
                    *running
                        .entry((input.job.kind.clone(), k.clone()))
                        .or_insert(0) += 1;
                }
            }
            verdicts.push(verdict);
        }

        let passing: Vec<ClaimInput<'_>> = inputs
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_none())
            .map(|(i, _)| *i)
            .collect();
        let claimed = if passing.is_empty() {
            Vec::new()
        } else {
            claim_statement(&mut *tx, &passing, worker, lease).await?
        };
        // The starts of what was claimed, at `t`: also their `started_at`, stamped below.
        let claimed_ids: std::collections::HashSet<uuid::Uuid> =
            claimed.iter().map(|c| c.0).collect();
        let mut starts: Vec<&str> = Vec::new();
        for ((input, gate), verdict) in inputs.iter().zip(gates).zip(&verdicts) {
            if verdict.is_none() && claimed_ids.contains(&input.job.id) {
                starts.extend(gate.rates.iter().map(|(scope, _)| scope.as_str()));
            }
        }
        if !claimed.is_empty() {
            let ids: Vec<uuid::Uuid> = claimed.iter().map(|c| c.0).collect();
            sqlx::query("UPDATE apiary_jobs SET started_at = $2 WHERE id = ANY($1)")
                .bind(&ids)
                .bind(t)
                .execute(&mut *tx)
                .await
                .context("stamping limited starts")?;
        }
        if !starts.is_empty() || !scopes.is_empty() {
            sqlx::query(
                "WITH gone AS (
                     DELETE FROM apiary_rate_starts r
                      USING unnest($2::text[], $3::int8[]) AS s(scope, period)
                      WHERE r.scope = s.scope AND r.started_at <= $4 - s.period * interval '1 microsecond'
                 )
                 INSERT INTO apiary_rate_starts (scope, started_at) SELECT unnest($1::text[]), $4",
            )
            .bind(&starts)
            .bind(&scopes)
            .bind(&periods)
            .bind(t)
            .execute(&mut *tx)
            .await
            .context("recording a rate limit's starts")?;
        }
        let moved: Vec<(&String, DateTime<Utc>)> = rate_state
            .iter()
            .filter(|(_, st)| st.moved)
            .filter_map(|(scope, st)| st.next_slot.map(|n| (scope, n)))
            .collect();
        if !moved.is_empty() {
            let names: Vec<&str> = moved.iter().map(|(s, _)| s.as_str()).collect();
            let slots: Vec<DateTime<Utc>> = moved.iter().map(|(_, n)| *n).collect();
            sqlx::query(
                "INSERT INTO apiary_limit_slots (scope, next_slot)
                 SELECT * FROM unnest($1::text[], $2::timestamptz[])
                 ON CONFLICT (scope) DO UPDATE SET next_slot = EXCLUDED.next_slot",
            )
            .bind(&names)
            .bind(&slots)
            .execute(&mut *tx)
            .await
            .context("spreading held jobs")?;
        }
        tx.commit().await.context("committing a limited claim")?;

        let Claims { claims, db_now } = self.resolve_claims(&passing, claimed).await?;
        let mut claims = claims.into_iter();
        let out = verdicts
            .into_iter()
            .map(|v| match v {
                Some(wait) => Limited::Held(wait),
                None => Limited::Claim(claims.next().unwrap_or(super::claim_job::Claim::Again)),
            })
            .collect();
        Ok((out, db_now.or(Some(now))))
    }
}
