//! Managing the deployment's schedules from the library: what `/v1/schedules` and `apiary
//! schedule` call. Only Postgres is involved; the workers fire what is set here within a
//! quarter of a second of each slot.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Client;
use crate::job::InvalidJob;
use crate::schedule::{self, Compiled, NEXT_SHOWN, ScheduleSpec, validate_name};
use crate::store::StoreError;
use crate::store::schedules::{ScheduleJob, ScheduleRow, Source};

/// How many of a schedule's recent slots [`Client::schedule`] looks up jobs for (it shows
/// the jobs of those that have one, newest first, at most [`JOBS_SHOWN`]).
pub const SLOTS_LOOKED_UP: usize = 100;

/// The most jobs [`Client::schedule`] shows.
pub const JOBS_SHOWN: usize = 10;

/// Why a schedule operation failed.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A field is wrong (named); nothing was changed.
    #[error("invalid schedule: {0}")]
    Invalid(#[from] InvalidJob),
    /// There is no schedule of that name in this deployment.
    #[error("no schedule named {0:?}")]
    NotFound(String),
    /// Postgres failed. Every schedule operation is idempotent: trying again is safe.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A fire time, in UTC and in the schedule's zone.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FireTime {
    /// RFC 3339 in UTC.
    pub at: DateTime<Utc>,
    /// RFC 3339 with the zone's offset then.
    pub local: String,
}

/// A schedule with its next fire times and the jobs of its recent slots: what
/// `GET /v1/schedules/{name}` answers.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleInfo {
    /// The schedule.
    #[serde(flatten)]
    pub schedule: ScheduleRow,
    /// Its next [`NEXT_SHOWN`] fire times after now (shown while paused too: when it would
    /// fire).
    pub next: Vec<FireTime>,
    /// The jobs of its recent slots, newest first.
    pub jobs: Vec<ScheduleJob>,
}

/// What setting a schedule did.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSet {
    /// The schedule as now recorded.
    #[serde(flatten)]
    pub schedule: ScheduleRow,
    /// Whether it is new.
    pub created: bool,
}

impl Client {
    /// Sets (creates or replaces) the schedule `name`. A new expression or time zone resets
    /// its cursor to now (no slot before now is enqueued for it); any other change keeps it.
    /// A paused schedule stays paused.
    pub async fn set_schedule(
        &self,
        name: &str,
        spec: &ScheduleSpec,
    ) -> Result<ScheduleSet, ScheduleError> {
        let compiled = spec.validate(name, self.inner.max_payload_bytes, Utc::now())?;
        let (schedule, created) = self
            .inner
            .store
            .set_schedule(self.prefix(), name, spec, &compiled, Source::Api)
            .await?;
        Ok(ScheduleSet { schedule, created })
    }

    /// The deployment's schedules, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleRow>, ScheduleError> {
        Ok(self.inner.store.list_schedules(self.prefix()).await?)
    }

    /// One schedule, with its next fire times and the jobs of its recent slots.
    pub async fn schedule(&self, name: &str) -> Result<ScheduleInfo, ScheduleError> {
        validate_name(name)?;
        let row = self
            .inner
            .store
            .get_schedule(self.prefix(), name)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(name.to_string()))?;
        let (next, keys) = match Compiled::new(&row.cron, &row.timezone) {
            Ok(c) => {
                let tz = c.timezone();
                let next = c
                    .next_n(Utc::now(), NEXT_SHOWN)
                    .into_iter()
                    .map(|at| FireTime {
                        at,
                        local: at.with_timezone(&tz).to_rfc3339(),
                    })
                    .collect();
                let keys: Vec<String> = c
                    .last_n(row.cursor, SLOTS_LOOKED_UP)
                    .into_iter()
                    .map(|s| schedule::dedup_key(name, s))
                    .collect();
                (next, keys)
            }
            Err(_) => (Vec::new(), Vec::new()),
        };
        let mut jobs = self.inner.store.schedule_jobs(&row.kind, &keys).await?;
        jobs.truncate(JOBS_SHOWN);
        Ok(ScheduleInfo {
            schedule: row,
            next,
            jobs,
        })
    }

    /// Deletes a schedule: no more of its slots are enqueued; its jobs stay.
    pub async fn delete_schedule(&self, name: &str) -> Result<(), ScheduleError> {
        validate_name(name)?;
        if self
            .inner
            .store
            .delete_schedule(self.prefix(), name)
            .await?
        {
            Ok(())
        } else {
            Err(ScheduleError::NotFound(name.to_string()))
        }
    }

    /// Pauses a schedule: no slot is enqueued until it is resumed.
    pub async fn pause_schedule(&self, name: &str) -> Result<ScheduleRow, ScheduleError> {
        self.set_schedule_paused(name, true).await
    }

    /// Resumes a paused schedule. The slots that fell during the pause are missed ones: its
    /// `missed` policy decides how many of them are enqueued.
    pub async fn resume_schedule(&self, name: &str) -> Result<ScheduleRow, ScheduleError> {
        self.set_schedule_paused(name, false).await
    }

    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleRow, ScheduleError> {
        validate_name(name)?;
        self.inner
            .store
            .set_schedule_paused(self.prefix(), name, paused)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(name.to_string()))
    }

    /// Applies the schedules file's `specs` (already read and checked, as
    /// [`schedule::file::load`] returns them): sets each, and deletes this deployment's file
    /// schedules the file no longer lists. Returns the names deleted.
    pub async fn apply_schedules_file(
        &self,
        specs: Vec<(String, ScheduleSpec)>,
    ) -> Result<Vec<String>, ScheduleError> {
        let now = Utc::now();
        let mut compiled = Vec::with_capacity(specs.len());
        for (name, spec) in specs {
            let c = spec.validate(&name, self.inner.max_payload_bytes, now)?;
            compiled.push((name, spec, c));
        }
        Ok(self
            .inner
            .store
            .apply_schedules_file(self.prefix(), &compiled)
            .await?)
    }

    fn prefix(&self) -> &str {
        self.inner.publisher.prefix()
    }
}
