//! What the dashboard's charts read (`GET /v1/stats/series`): jobs finished per second, by
//! outcome, retries per second, and enqueue-to-finish latency percentiles, in equal time
//! slots up to now.
//!
//! Read from the workers' samples (`apiary_worker_samples`, migration 0016), not from the
//! jobs: each worker writes, at each heartbeat in which it finished anything, what it
//! finished since the one before ([`crate::worker::samples`]). So a chart costs the same with
//! a million jobs in the table as with ten: an hour is a few thousand rows per worker at most.
//! Counts are exact (a sample that could not be written goes with the next); latency
//! percentiles come from log buckets and are within 13 % of the true value. Only what workers
//! finished counts: a job cancelled before it started is not a finish.

use chrono::{DateTime, TimeZone as _, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Context, Store, StoreError};
use crate::worker::samples::{Sample, percentile};

/// The most slots one series holds.
pub const MAX_SLOTS: i64 = 240;

/// One time slot of a [`Series`].
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// When the slot starts.
    pub at: DateTime<Utc>,
    /// Jobs that finished `succeeded` in the slot, per second.
    pub succeeded_per_second: f64,
    /// Jobs that ended `dead` in the slot, per second.
    pub failed_per_second: f64,
    /// Attempts that failed and were retried in the slot, per second.
    pub retried_per_second: f64,
    /// Median enqueue-to-finish time of the slot's succeeded jobs, in milliseconds (from when
    /// the job was due, for a scheduled one); `null` when none finished.
    pub p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub p99_ms: Option<f64>,
}

/// Throughput and latency over equal slots, oldest first, the last one ending now.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// Each slot's length in seconds.
    pub step_seconds: i64,
    /// The slots, oldest first; slots with nothing finished are there, with zeros.
    pub points: Vec<SeriesPoint>,
}

impl Store {
    /// Writes one worker's sample, and removes samples older than 25 hours, the longest window
    /// shown and a little (a cheap range delete on the index; every worker does it, whoever comes first finds work).
    pub async fn record_sample(
        &self,
        prefix: &str,
        worker: Uuid,
        sample: &Sample,
    ) -> Result<(), StoreError> {
        let latency: serde_json::Map<String, serde_json::Value> = sample
            .latency
            .iter()
            .map(|(b, n)| (b.to_string(), serde_json::Value::from(*n)))
            .collect();
        let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        sqlx::query(
            "WITH old AS (DELETE FROM apiary_worker_samples
                           WHERE prefix = $1 AND at < now() - interval '25 hours')
             INSERT INTO apiary_worker_samples (prefix, worker_id, succeeded, dead, retried, latency)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(prefix)
        .bind(worker)
        .bind(count(sample.succeeded))
        .bind(count(sample.dead))
        .bind(count(sample.retried))
        .bind(sqlx::types::Json(latency))
        .execute(self.pool())
        .await
        .context("writing a worker's sample")?;
        Ok(())
    }

    /// `slots` slots of `step_seconds` each, ending now (the last one is still filling), of
    /// the deployment whose prefix is `prefix`.
    pub async fn series(
        &self,
        prefix: &str,
        step_seconds: i64,
        slots: i64,
    ) -> Result<Series, StoreError> {
        let step = step_seconds.max(1);
        let slots = slots.clamp(1, MAX_SLOTS);
        let now = Utc::now().timestamp();
        // Slot numbers count steps since the epoch, so a slot keeps its bounds from one
        // refresh to the next and a chart does not jitter.
        let last = now.div_euclid(step);
        let first = last - slots + 1;
        let counts: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT floor(date_part('epoch', at) / $2)::int8, sum(succeeded)::int8,
                    sum(dead)::int8, sum(retried)::int8
               FROM apiary_worker_samples
              WHERE prefix = $1 AND at >= to_timestamp(($3 * $2)::float8)
              GROUP BY 1",
        )
        .bind(prefix)
        .bind(step)
        .bind(first)
        .fetch_all(self.pool())
        .await
        .context("reading finishes by time")?;
        let buckets: Vec<(i64, i32, i64)> = sqlx::query_as(
            "SELECT floor(date_part('epoch', s.at) / $2)::int8, b.key::int4, sum(b.value::int8)::int8
               FROM apiary_worker_samples s, jsonb_each_text(s.latency) AS b
              WHERE s.prefix = $1 AND s.at >= to_timestamp(($3 * $2)::float8)
              GROUP BY 1, 2",
        )
        .bind(prefix)
        .bind(step)
        .bind(first)
        .fetch_all(self.pool())
        .await
        .context("reading latency by time")?;
        let per_second = |n: i64| n as f64 / step as f64;
        let points = (first..=last)
            .map(|slot| {
                let c = counts.iter().find(|r| r.0 == slot);
                let histogram: Vec<(usize, i64)> = buckets
                    .iter()
                    .filter(|b| b.0 == slot)
                    .map(|b| (usize::try_from(b.1).unwrap_or(0), b.2))
                    .collect();
                SeriesPoint {
                    at: Utc
                        .timestamp_opt(slot * step, 0)
                        .single()
                        .unwrap_or_default(),
                    succeeded_per_second: per_second(c.map_or(0, |c| c.1)),
                    failed_per_second: per_second(c.map_or(0, |c| c.2)),
                    retried_per_second: per_second(c.map_or(0, |c| c.3)),
                    p50_ms: percentile(&histogram, 0.5),
                    p99_ms: percentile(&histogram, 0.99),
                }
            })
            .collect();
        Ok(Series {
            step_seconds: step,
            points,
        })
    }
}
