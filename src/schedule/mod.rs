//! What a schedule is (a periodic job): its spec as a user writes it ([`ScheduleSpec`]), the
//! checks on it, and the pure slot arithmetic every worker's firing duty uses ([`due`]): which
//! slots of a cron expression are due since a cursor, under a [`Missed`] policy.
//!
//! Slots come from [`croner`] in the schedule's IANA time zone ([`chrono_tz`]). Expressions
//! have 5 fields (minute granularity) or 6 (a leading seconds field); the finest schedule
//! fires once a second. Daylight-saving transitions are croner's (see the README's
//! "Periodic jobs"): a fixed local time that does not exist (spring forward) fires at the
//! first instant after the gap, a fixed local time that occurs twice (fall back) fires once,
//! at its first occurrence; wildcard and step fields skip the missing hour and fire in both
//! passes of the repeated one. Tested below with Europe/Berlin.

pub mod file;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{
    InvalidJob, MAX_ATTEMPTS_LIMIT, validate_kind, validate_priority, validate_queue,
};

/// How many slots one firing of one schedule (one transaction) enqueues at most; a longer
/// backlog under [`Missed::All`] continues in the next firings.
pub const MAX_SLOTS_PER_FIRING: usize = 1000;

/// How late a slot may be and still count as on time rather than missed: normal jitter (a
/// slow tick, a busy Postgres, a worker restarting) never skips a slot under
/// [`Missed::Skip`] or folds it under [`Missed::One`].
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The longest cron expression kept (the schema's CHECK).
pub const MAX_CRON_BYTES: usize = 256;

/// How many fire times `GET /v1/schedules/{name}` shows.
pub const NEXT_SHOWN: usize = 5;

/// What happens to slots that fell while no worker ran (or the schedule was paused): slots
/// older than [`GRACE`] when a worker next looks.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    /// None of the missed slots is enqueued; the schedule resumes at its next slot.
    Skip,
    /// One job, for the most recent missed slot, stands for all of them.
    #[default]
    One,
    /// Every missed slot is enqueued, at most [`MAX_SLOTS_PER_FIRING`] per firing.
    All,
}

impl Missed {
    /// The name stored in Postgres and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::One => "one",
            Missed::All => "all",
        }
    }
}

impl std::str::FromStr for Missed {
    type Err = InvalidJob;

    fn from_str(s: &str) -> Result<Missed, InvalidJob> {
        match s {
            "skip" => Ok(Missed::Skip),
            "one" => Ok(Missed::One),
            "all" => Ok(Missed::All),
            other => Err(InvalidJob::new(
                "missed",
                format!("is {other:?}; expected skip, one or all"),
            )),
        }
    }
}

fn utc() -> String {
    "UTC".to_string()
}

/// A schedule as a user writes it: the body of `PUT /v1/schedules/{name}`, an entry of the
/// schedules file, the flags of `apiary schedule set`. Its jobs carry its kind, payload,
/// queue, priority and attempt budget; what it leaves out comes from the kind's options
/// (`APIARY_KINDS`, its handler's), as for any enqueue.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// A cron expression of 5 fields, or 6 with a leading seconds field.
    pub cron: String,
    /// An IANA time zone name the expression is read in; `UTC` when absent.
    #[serde(default = "utc")]
    pub timezone: String,
    /// The kind of its jobs.
    pub kind: String,
    /// The payload of its jobs.
    #[serde(default)]
    pub payload: Value,
    /// The queue of its jobs; the kind's queue, else `default`, when absent.
    #[serde(default)]
    pub queue: Option<String>,
    /// The attempt budget of its jobs; the kind's, else `APIARY_MAX_ATTEMPTS`, when absent.
    #[serde(default)]
    pub max_attempts: Option<i64>,
    /// The priority of its jobs, 0 to 9; the kind's, else 0, when absent.
    #[serde(default)]
    pub priority: Option<i64>,
    /// The missed-slot policy; `one` when absent.
    #[serde(default)]
    pub missed: Missed,
}

impl ScheduleSpec {
    /// A spec firing jobs of `kind` on `cron` (UTC), everything else defaulted.
    pub fn new(cron: impl Into<String>, kind: impl Into<String>) -> ScheduleSpec {
        ScheduleSpec {
            cron: cron.into(),
            timezone: utc(),
            kind: kind.into(),
            payload: Value::Null,
            queue: None,
            max_attempts: None,
            priority: None,
            missed: Missed::default(),
        }
    }

    /// Checks every field and compiles the expression; the error names the field.
    /// `now` is when the schedule would start, for the check that it ever fires.
    pub fn validate(
        &self,
        name: &str,
        max_payload_bytes: usize,
        now: DateTime<Utc>,
    ) -> Result<Compiled, InvalidJob> {
        validate_name(name)?;
        let compiled = Compiled::new(&self.cron, &self.timezone)?;
        if compiled.next_after(now).is_none() {
            return Err(InvalidJob::new(
                "cron",
                format!("{:?} never fires after {}", self.cron, now.to_rfc3339()),
            ));
        }
        validate_kind(&self.kind)?;
        if let Some(q) = &self.queue {
            validate_queue(q)?;
        }
        if let Some(n) = self.max_attempts
            && !(1..=i64::from(MAX_ATTEMPTS_LIMIT)).contains(&n)
        {
            return Err(InvalidJob::new(
                "max_attempts",
                format!("is {n}; must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
            ));
        }
        if let Some(p) = self.priority {
            validate_priority(p)?;
        }
        if holds_nul(&self.payload) {
            return Err(InvalidJob::new(
                "payload",
                "must not contain NUL (\\u0000): Postgres jsonb cannot store it",
            ));
        }
        let size = serde_json::to_vec(&self.payload)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > max_payload_bytes {
            return Err(InvalidJob::new(
                "payload",
                format!("is {size} bytes; the limit is {max_payload_bytes}"),
            ));
        }
        Ok(compiled)
    }
}

/// Checks a schedule's name: `[a-z0-9_.-]{1,64}`, the rule of queue names.
pub fn validate_name(name: &str) -> Result<(), InvalidJob> {
    validate_queue(name).map_err(|e| InvalidJob::new("name", e.reason))
}

/// Whether any string or key in `v` holds a NUL, which jsonb cannot store.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// A schedule's expression, parsed, in its time zone: what computes its slots.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Compiled {
    cron: Cron,
    tz: Tz,
}

impl Compiled {
    /// Parses `cron` (5 or 6 fields) and `timezone` (an IANA name); the error names the field
    /// and, for the expression, carries croner's message.
    pub fn new(cron: &str, timezone: &str) -> Result<Compiled, InvalidJob> {
        if cron.len() > MAX_CRON_BYTES {
            return Err(InvalidJob::new(
                "cron",
                format!("is {} bytes; at most {MAX_CRON_BYTES} allowed", cron.len()),
            ));
        }
        let fields = cron.split_whitespace().count();
        if !cron.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(InvalidJob::new(
                "cron",
                format!(
                    "{cron:?} has {fields} fields; expected 5 (minute hour day month weekday) \
                     or 6 (with a leading seconds field)"
                ),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| InvalidJob::new("cron", format!("{cron:?}: {e}")))?;
        let tz: Tz = timezone.parse().map_err(|_| {
            InvalidJob::new(
                "timezone",
                format!(
                    "{timezone:?} is not an IANA time zone name (such as Europe/Berlin or UTC)"
                ),
            )
        })?;
        Ok(Compiled { cron, tz })
    }

    /// The time zone.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first slot strictly after `t`; `None` if the expression never fires again.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut from = t.with_timezone(&self.tz);
        // croner searches from whole seconds; a slot at or before `t` is searched past, so
        // the answer is strictly after `t` whatever its handling of a fraction of a second.
        for _ in 0..3 {
            let next = self.cron.find_next_occurrence(&from, false).ok()?;
            let utc = next.with_timezone(&Utc);
            if utc > t {
                return Some(utc);
            }
            from = next;
        }
        None
    }

    /// The last slot strictly before `t`; `None` if there is none.
    pub fn last_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner drops a fraction of a second before searching back, which would skip the
        // slot of that whole second: start a second later and search back past `t`.
        let mut from = (t + chrono::Duration::seconds(1)).with_timezone(&self.tz);
        for _ in 0..4 {
            let prev = self.cron.find_previous_occurrence(&from, false).ok()?;
            let utc = prev.with_timezone(&Utc);
            if utc < t {
                return Some(utc);
            }
            from = prev;
        }
        None
    }

    /// The next `n` slots after `t`.
    pub fn next_n(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            match self.next_after(at) {
                Some(s) => {
                    out.push(s);
                    at = s;
                }
                None => break,
            }
        }
        out
    }

    /// The last `n` slots at or before `t`, newest first.
    pub fn last_n(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        // "At or before": search from just after `t`.
        let mut at = t + chrono::Duration::milliseconds(1);
        while out.len() < n {
            match self.last_before(at) {
                Some(s) => {
                    out.push(s);
                    at = s;
                }
                None => break,
            }
        }
        out
    }
}

/// The dedup key of a schedule's slot: `schedule:<name>:<slot in RFC 3339, UTC>`, e.g.
/// `schedule:nightly:2026-12-02T02:00:00Z`. One slot is one job, whichever worker records it.
pub fn dedup_key(name: &str, slot: DateTime<Utc>) -> String {
    format!("schedule:{name}:{}", slot.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// What one firing of a schedule does.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The slots to enqueue, oldest first.
    pub slots: Vec<DateTime<Utc>>,
    /// The new cursor: every slot at or before it is dealt with.
    pub cursor: DateTime<Utc>,
    /// The first slot after the new cursor; `None` if there is none.
    pub next_at: Option<DateTime<Utc>>,
}

/// The slots of `schedule` due at `now` since `cursor` (every slot at or before `cursor` is
/// dealt with), under `missed`. A slot older than `now - grace` is missed; the others are on
/// time and always enqueued:
///
/// - [`Missed::Skip`]: no missed slot;
/// - [`Missed::One`]: the most recent missed slot only;
/// - [`Missed::All`]: every missed slot, oldest first.
///
/// At most [`MAX_SLOTS_PER_FIRING`] slots; when cut there, the cursor stops at the last slot
/// returned and the rest follows at the next firing.
pub fn due(
    schedule: &Compiled,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
    missed: Missed,
    grace: std::time::Duration,
) -> Due {
    let cutoff = now - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
    let mut slots = Vec::new();
    // Where the on-time search starts: past the cursor, and past the missed ones.
    let mut from = cursor;
    if cutoff > cursor {
        match missed {
            Missed::Skip => {}
            Missed::One => {
                if let Some(last) = schedule.last_before(cutoff).filter(|s| *s > cursor) {
                    slots.push(last);
                }
            }
            Missed::All => {
                let mut at = cursor;
                while let Some(s) = schedule.next_after(at).filter(|s| *s < cutoff) {
                    slots.push(s);
                    if slots.len() == MAX_SLOTS_PER_FIRING {
                        return Due {
                            slots,
                            cursor: s,
                            next_at: schedule.next_after(s),
                        };
                    }
                    at = s;
                }
            }
        }
        // The on-time search starts just before `cutoff`; whatever it finds before
        // `cutoff` was dealt with above.
        from = cutoff - chrono::Duration::seconds(1);
    }
    while let Some(s) = schedule.next_after(from).filter(|s| *s <= now) {
        from = s;
        if s <= cursor || s < cutoff {
            continue;
        }
        slots.push(s);
        if slots.len() == MAX_SLOTS_PER_FIRING {
            return Due {
                slots,
                cursor: s,
                next_at: schedule.next_after(s),
            };
        }
    }
    Due {
        slots,
        cursor: now,
        next_at: schedule.next_after(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .expect("time")
    }

    fn every_second() -> Compiled {
        Compiled::new("* * * * * *", "UTC").expect("cron")
    }

    const G: std::time::Duration = std::time::Duration::from_secs(2);

    #[test]
    fn on_time_slots_are_enqueued_once_each() {
        let c = every_second();
        let d = due(
            &c,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:00:01.300Z"),
            Missed::Skip,
            G,
        );
        assert_eq!(d.slots, vec![at("2026-01-01T00:00:01Z")]);
        assert_eq!(d.cursor, at("2026-01-01T00:00:01.300Z"));
        assert_eq!(d.next_at, Some(at("2026-01-01T00:00:02Z")));
        // The next firing starts past the cursor: nothing twice.
        let again = due(&c, d.cursor, at("2026-01-01T00:00:01.900Z"), Missed::All, G);
        assert!(again.slots.is_empty());
    }

    #[test]
    fn missed_slots_follow_the_policy() {
        let c = every_second();
        let cursor = at("2026-01-01T00:00:00Z");
        let now = at("2026-01-01T00:00:10.500Z");
        // Missed: 1..=8 (older than now - 2 s = 8.5); on time: 9 and 10.
        let skip = due(&c, cursor, now, Missed::Skip, G);
        assert_eq!(
            skip.slots,
            vec![at("2026-01-01T00:00:09Z"), at("2026-01-01T00:00:10Z")]
        );
        let one = due(&c, cursor, now, Missed::One, G);
        assert_eq!(
            one.slots,
            vec![
                at("2026-01-01T00:00:08Z"),
                at("2026-01-01T00:00:09Z"),
                at("2026-01-01T00:00:10Z")
            ]
        );
        let all = due(&c, cursor, now, Missed::All, G);
        assert_eq!(all.slots.len(), 10);
        assert_eq!(all.slots[0], at("2026-01-01T00:00:01Z"));
        for d in [skip, one, all] {
            assert_eq!(d.cursor, now);
            assert_eq!(d.next_at, Some(at("2026-01-01T00:00:11Z")));
        }
    }

    #[test]
    fn a_long_backlog_is_cut_and_continues() {
        let c = every_second();
        let cursor = at("2026-01-01T00:00:00Z");
        let now = at("2026-01-01T01:00:00Z");
        let first = due(&c, cursor, now, Missed::All, G);
        assert_eq!(first.slots.len(), MAX_SLOTS_PER_FIRING);
        assert_eq!(first.cursor, at("2026-01-01T00:16:40Z"));
        let second = due(&c, first.cursor, now, Missed::All, G);
        assert_eq!(second.slots[0], at("2026-01-01T00:16:41Z"));
        // One hour of seconds, in four firings, each slot once.
        let mut all = first.slots;
        let mut d = second;
        loop {
            all.extend(d.slots.iter().copied());
            if d.cursor == now {
                break;
            }
            d = due(&c, d.cursor, now, Missed::All, G);
        }
        assert_eq!(all.len(), 3600);
        all.dedup();
        assert_eq!(all.len(), 3600);
    }

    #[test]
    fn one_after_a_long_outage_costs_one_search() {
        let c = Compiled::new("0 * * * *", "UTC").expect("cron");
        let d = due(
            &c,
            at("2020-01-01T00:00:00Z"),
            at("2026-01-01T00:30:00Z"),
            Missed::One,
            G,
        );
        assert_eq!(d.slots, vec![at("2026-01-01T00:00:00Z")]);
    }

    #[test]
    fn fields_are_checked_and_named() {
        let now = at("2026-01-01T00:00:00Z");
        let ok = ScheduleSpec::new("0 2 * * *", "report");
        assert!(ok.validate("nightly", 1024, now).is_ok());
        let field = |s: ScheduleSpec, name: &str| s.validate(name, 1024, now).unwrap_err().field;
        assert_eq!(field(ok.clone(), "Bad Name"), "name");
        assert_eq!(field(ScheduleSpec::new("nope", "report"), "n"), "cron");
        assert_eq!(field(ScheduleSpec::new("* * * *", "report"), "n"), "cron");
        assert_eq!(
            field(ScheduleSpec::new("0 0 0 1 1 * 2030", "report"), "n"),
            "cron"
        );
        // 30 February never comes.
        assert_eq!(
            field(ScheduleSpec::new("0 0 30 2 *", "report"), "n"),
            "cron"
        );
        let tz = ScheduleSpec {
            timezone: "Mars/Olympus".into(),
            ..ok.clone()
        };
        assert_eq!(field(tz, "n"), "timezone");
        assert_eq!(field(ScheduleSpec::new("* * * * *", "Bad"), "n"), "kind");
        let nul = ScheduleSpec {
            payload: serde_json::json!({"a": ["x\u{0}y"]}),
            ..ok.clone()
        };
        assert_eq!(field(nul, "n"), "payload");
        let big = ScheduleSpec {
            payload: serde_json::json!("x".repeat(2000)),
            ..ok.clone()
        };
        assert_eq!(field(big, "n"), "payload");
        let pri = ScheduleSpec {
            priority: Some(10),
            ..ok.clone()
        };
        assert_eq!(field(pri, "n"), "priority");
        let att = ScheduleSpec {
            max_attempts: Some(0),
            ..ok.clone()
        };
        assert_eq!(field(att, "n"), "max_attempts");
        let q = ScheduleSpec {
            queue: Some("A".into()),
            ..ok
        };
        assert_eq!(field(q, "n"), "queue");
        assert!("sometimes".parse::<Missed>().is_err());
        let long = format!("0 0 * * {}", "1,".repeat(200) + "2");
        assert_eq!(field(ScheduleSpec::new(long, "report"), "n"), "cron");
    }

    #[test]
    fn keys_name_the_slot_in_utc() {
        let c = Compiled::new("0 2 * * *", "Europe/Berlin").expect("cron");
        let next = c.next_after(at("2026-12-01T12:00:00Z")).expect("next");
        assert_eq!(
            dedup_key("nightly", next),
            "schedule:nightly:2026-12-02T01:00:00Z"
        );
    }

    #[test]
    fn a_nonexistent_local_time_fires_right_after_the_gap() {
        // Europe/Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
        let c = Compiled::new("30 2 * * *", "Europe/Berlin").expect("cron");
        let berlin = chrono_tz::Europe::Berlin;
        let day_before = berlin
            .with_ymd_and_hms(2026, 3, 28, 12, 0, 0)
            .single()
            .expect("time")
            .with_timezone(&Utc);
        let fires = c.next_n(day_before, 2);
        // Once that day, at the first instant after the gap (03:00 CEST = 01:00 UTC), then
        // at 02:30 local as usual.
        assert_eq!(fires[0], at("2026-03-29T01:00:00Z"));
        assert_eq!(fires[1], at("2026-03-30T00:30:00Z"));
    }

    #[test]
    fn a_repeated_local_time_fires_once() {
        // Europe/Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
        let c = Compiled::new("30 2 * * *", "Europe/Berlin").expect("cron");
        let fires = c.next_n(at("2026-10-24T12:00:00Z"), 2);
        // At its first occurrence (02:30 CEST = 00:30 UTC), not again at 02:30 CET.
        assert_eq!(fires[0], at("2026-10-25T00:30:00Z"));
        assert_eq!(fires[1], at("2026-10-26T01:30:00Z"));
        // A wildcard expression fires in both passes of the repeated hour.
        let every_half_hour = Compiled::new("*/30 * * * *", "Europe/Berlin").expect("cron");
        let passes = every_half_hour.next_n(at("2026-10-24T23:45:00Z"), 4);
        assert_eq!(
            passes,
            vec![
                at("2026-10-25T00:00:00Z"),
                at("2026-10-25T00:30:00Z"),
                at("2026-10-25T01:00:00Z"),
                at("2026-10-25T01:30:00Z"),
            ]
        );
    }

    #[test]
    fn last_slots_are_newest_first() {
        let c = every_second();
        assert_eq!(
            c.last_n(at("2026-01-01T00:00:10Z"), 3),
            vec![
                at("2026-01-01T00:00:10Z"),
                at("2026-01-01T00:00:09Z"),
                at("2026-01-01T00:00:08Z")
            ]
        );
    }
}
