//! What the broker and Postgres spend while a bench drains, so a rate can be read as a cost
//! per job in each component: CPU of RabbitMQ's (`beam.smp`) and Postgres's (`postgres`)
//! processes on this machine from `/proc`, commits, WAL syncs and WAL bytes from Postgres's
//! own statistics, and how busy the machine's cores were. Meaningful only when the servers
//! run on the bench's machine and nothing else runs there.

use std::time::Instant;

use serde::Serialize;

/// The counters at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    at: Instant,
    broker_cpu_s: f64,
    postgres_cpu_s: f64,
    box_busy: u64,
    box_total: u64,
    commits: i64,
    wal_syncs: i64,
    wal_lsn: i64,
}

/// The cost per job in each component over one window of a bench.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Serialize)]
pub struct Components {
    /// CPU of every RabbitMQ node process (`beam.smp`) on this machine, µs per job.
    pub broker_cpu_us_per_job: f64,
    /// CPU of every Postgres process on this machine (backends, WAL writer, checkpointer),
    /// µs per job.
    pub postgres_cpu_us_per_job: f64,
    /// Transactions committed in the bench's database, per second.
    pub pg_commits_per_s: f64,
    /// Transactions committed per job.
    pub pg_commits_per_job: f64,
    /// WAL flushes to disk (`pg_stat_wal.wal_sync`, the whole server), per second.
    pub pg_wal_syncs_per_s: f64,
    /// WAL written per job, bytes.
    pub wal_bytes_per_job: f64,
    /// Both cores' busy share over the window, percent.
    pub box_cpu_busy_pct: f64,
}

/// Reads the counters now.
pub(crate) async fn snapshot(pool: &sqlx::PgPool) -> anyhow::Result<Snapshot> {
    let (commits, wal_syncs, wal_lsn): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
                (SELECT wal_sync FROM pg_stat_wal),
                (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8",
    )
    .fetch_one(pool)
    .await?;
    let (box_busy, box_total) = box_ticks();
    Ok(Snapshot {
        at: Instant::now(),
        broker_cpu_s: cpu_of("beam.smp"),
        postgres_cpu_s: cpu_of("postgres"),
        box_busy,
        box_total,
        commits,
        wal_syncs,
        wal_lsn,
    })
}

/// The costs between `from` and `to` (`to_stats` read later than `to`, once the backends
/// flushed their statistics, which they do at most once a second) for `jobs` jobs.
pub(crate) fn between(
    from: &Snapshot,
    to: &Snapshot,
    to_stats: &Snapshot,
    jobs: usize,
) -> Components {
    let jobs = jobs.max(1) as f64;
    let secs = to.at.duration_since(from.at).as_secs_f64().max(0.001);
    let commits = (to_stats.commits - from.commits).max(0) as f64;
    let syncs = (to_stats.wal_syncs - from.wal_syncs).max(0) as f64;
    let total = to.box_total.saturating_sub(from.box_total).max(1) as f64;
    Components {
        broker_cpu_us_per_job: (to.broker_cpu_s - from.broker_cpu_s).max(0.0) * 1e6 / jobs,
        postgres_cpu_us_per_job: (to.postgres_cpu_s - from.postgres_cpu_s).max(0.0) * 1e6 / jobs,
        pg_commits_per_s: commits / secs,
        pg_commits_per_job: commits / jobs,
        pg_wal_syncs_per_s: syncs / secs,
        wal_bytes_per_job: (to.wal_lsn - from.wal_lsn).max(0) as f64 / jobs,
        box_cpu_busy_pct: to.box_busy.saturating_sub(from.box_busy) as f64 * 100.0 / total,
    }
}

/// User and system CPU seconds of every process whose name is `comm`.
fn cpu_of(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let pids = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
    })
    .map(|pid| super::proc_stats(&[pid]).1)
    .sum()
}

/// Busy and total clock ticks of all cores together, from the first line of `/proc/stat`.
fn box_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().sum();
    // idle and iowait are the fourth and fifth.
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}
