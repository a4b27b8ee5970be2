//! The `clock` check: this host's clock against Postgres's, within what the round trip allows.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Finding, Level, SKEW_FAIL, SKEW_WARN};

/// This host's clock against Postgres's.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skew {
    /// Postgres's clock minus this host's, at the midpoint of the round trip.
    pub offset: chrono::Duration,
    /// Half the round trip: the true offset lies within this much of [`Skew::offset`].
    pub uncertainty: chrono::Duration,
}

impl Skew {
    /// The offset measured by asking Postgres for its clock at `sent` and getting `db` back at
    /// `received` (both by this host's clock). The answer was read some time within the round
    /// trip; taking its midpoint leaves an error of at most half of it.
    pub fn measure(sent: DateTime<Utc>, db: DateTime<Utc>, received: DateTime<Utc>) -> Skew {
        let half = (received - sent) / 2;
        Skew {
            offset: db - (sent + half),
            uncertainty: half.abs(),
        }
    }

    /// The least the clocks can differ by, given the uncertainty.
    pub fn at_least(&self) -> Duration {
        (self.offset.abs() - self.uncertainty)
            .to_std()
            .unwrap_or(Duration::ZERO)
    }

    /// How bad it is: [`Level::Fail`] past [`SKEW_FAIL`], [`Level::Warn`] past [`SKEW_WARN`].
    pub fn level(&self) -> Level {
        let d = self.at_least();
        if d > SKEW_FAIL {
            Level::Fail
        } else if d > SKEW_WARN {
            Level::Warn
        } else {
            Level::Ok
        }
    }
}

/// The best of a few measurements: the one with the shortest round trip is the most exact.
pub(super) async fn measure_skew(conn: &mut sqlx::PgConnection) -> Result<Skew, sqlx::Error> {
    let mut best: Option<Skew> = None;
    for _ in 0..3 {
        let sent = Utc::now();
        let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *conn)
            .await?;
        let s = Skew::measure(sent, db, Utc::now());
        if best.is_none_or(|b| s.uncertainty < b.uncertainty) {
            best = Some(s);
        }
    }
    best.ok_or(sqlx::Error::RowNotFound)
}

pub(super) fn skew_finding(s: &Skew) -> Finding {
    let ms = s.offset.num_milliseconds();
    let direction = if ms >= 0 { "behind" } else { "ahead of" };
    let detail = format!(
        "this host's clock is {}ms {direction} Postgres's (±{}ms)",
        ms.abs(),
        s.uncertainty.num_milliseconds()
    );
    match s.level() {
        Level::Ok => Finding::ok("clock", detail),
        level => Finding::bad(
            "clock",
            level,
            detail,
            "synchronise the clocks of this host and the database server (NTP: chrony, \
             systemd-timesyncd); jobs scheduled from this host are due off by the difference",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + ms).unwrap_or_default()
    }

    #[test]
    fn skew_is_measured_from_the_midpoint_of_the_round_trip() {
        // Asked at 0, answered at 100: Postgres said 2050, so it is 2000 ahead, ±50.
        let s = Skew::measure(at(0), at(2_050), at(100));
        assert_eq!(s.offset.num_milliseconds(), 2_000);
        assert_eq!(s.uncertainty.num_milliseconds(), 50);
        assert_eq!(s.at_least(), Duration::from_millis(1_950));
        assert_eq!(s.level(), Level::Warn);
        // Behind works the same.
        let s = Skew::measure(at(0), at(-90_000), at(10));
        assert_eq!(s.offset.num_milliseconds(), -90_005);
        assert_eq!(s.level(), Level::Fail);
        // The true offset is only known within half the round trip: 1000 ± 500 is at least 500.
        let s = Skew::measure(at(0), at(1_500), at(1_000));
        assert_eq!(s.at_least(), Duration::from_millis(500));
        assert_eq!(s.level(), Level::Ok);
        // A slow round trip that could hide the whole offset proves no skew at all.
        let s = Skew::measure(at(0), at(4_000), at(6_000));
        assert_eq!(s.offset.num_milliseconds(), 1_000);
        assert_eq!(s.at_least(), Duration::ZERO);
        assert_eq!(Skew::measure(at(0), at(5), at(10)).level(), Level::Ok);
    }

    #[test]
    fn a_skew_finding_says_which_way_and_how_to_fix_it() {
        let f = skew_finding(&Skew::measure(at(0), at(-5_000), at(0)));
        assert_eq!(f.level, Level::Warn);
        assert!(
            f.detail.contains("5000ms ahead of Postgres's"),
            "{}",
            f.detail
        );
        assert!(f.fix.is_some_and(|x| x.contains("NTP")));
    }
}
