//! What the dashboard's charts read (`GET /v1/stats/series`): jobs finished per second, by
//! outcome, retries per second, and enqueue-to-finish latency percentiles, in equal time
//! slots up to now.
//!
//! Read from the jobs themselves, so no worker or API process keeps anything. The statement
//! walks `apiary_jobs_created` for jobs created since an hour before the window opened (a job
//! that waited longer than that before finishing is not counted: the bound is what keeps the
//! scan to recent rows on a table of millions), and groups them by the slot of their
//! `finished_at`. Retries come from the attempt history (`errors`), each entry stamped with
//! its time; a job's last entry is not a retry when the job ended failed or dead.

use chrono::{DateTime, TimeZone as _, Utc};
use serde::Serialize;

use super::{Context, Store, StoreError};

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
    /// Jobs that finished `failed` or `dead` in the slot, per second.
    pub failed_per_second: f64,
    /// Attempts that failed and were retried in the slot, per second.
    pub retried_per_second: f64,
    /// Median enqueue-to-finish time of the slot's succeeded jobs, in milliseconds (from
    /// when the job was due, for a scheduled one); `null` when none finished.
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

/// One slot's finishes: slot, succeeded, failed, p50 ms, p99 ms.
type Finished = (i64, i64, i64, Option<f64>, Option<f64>);

impl Store {
    /// `slots` slots of `step_seconds` each, ending now (the last one is still filling).
    pub async fn series(&self, step_seconds: i64, slots: i64) -> Result<Series, StoreError> {
        let step = step_seconds.max(1);
        let slots = slots.clamp(1, MAX_SLOTS);
        let now = Utc::now().timestamp();
        // Slot numbers count steps since the epoch, so a slot keeps its bounds from one
        // refresh to the next and a chart does not jitter.
        let last = now.div_euclid(step);
        let first = last - slots + 1;
        let finished: Vec<Finished> = sqlx::query_as(
            "SELECT floor(extract(epoch FROM finished_at) / $1)::int8 AS slot,
                    count(*) FILTER (WHERE status = 'succeeded'),
                    count(*) FILTER (WHERE status IN ('failed', 'dead')),
                    (percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
                        finished_at - greatest(created_at, coalesce(run_at, created_at))))
                        FILTER (WHERE status = 'succeeded')) * 1000,
                    (percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM
                        finished_at - greatest(created_at, coalesce(run_at, created_at))))
                        FILTER (WHERE status = 'succeeded')) * 1000
               FROM apiary_jobs
              WHERE created_at >= to_timestamp($2 * $1) - interval '1 hour'
                AND finished_at >= to_timestamp($2 * $1)
              GROUP BY 1",
        )
        .bind(step)
        .bind(first)
        .fetch_all(self.pool())
        .await
        .context("reading throughput and latency by time")?;
        let retried: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT floor(extract(epoch FROM (e.entry->>'at')::timestamptz) / $1)::int8, count(*)
               FROM apiary_jobs j,
                    jsonb_array_elements(j.errors) WITH ORDINALITY AS e(entry, n)
              WHERE j.created_at >= to_timestamp($2 * $1) - interval '1 hour'
                AND jsonb_array_length(j.errors) > 0
                AND (e.entry->>'at')::timestamptz >= to_timestamp($2 * $1)
                AND NOT (j.status IN ('failed', 'dead') AND e.n = jsonb_array_length(j.errors))
              GROUP BY 1",
        )
        .bind(step)
        .bind(first)
        .fetch_all(self.pool())
        .await
        .context("reading retries by time")?;
        let per_second = |n: i64| n as f64 / step as f64;
        let points = (first..=last)
            .map(|slot| {
                let f = finished.iter().find(|r| r.0 == slot);
                let r = retried.iter().find(|r| r.0 == slot).map_or(0, |r| r.1);
                SeriesPoint {
                    at: Utc
                        .timestamp_opt(slot * step, 0)
                        .single()
                        .unwrap_or_default(),
                    succeeded_per_second: per_second(f.map_or(0, |f| f.1)),
                    failed_per_second: per_second(f.map_or(0, |f| f.2)),
                    retried_per_second: per_second(r),
                    p50_ms: f.and_then(|f| f.3),
                    p99_ms: f.and_then(|f| f.4),
                }
            })
            .collect();
        Ok(Series {
            step_seconds: step,
            points,
        })
    }
}
