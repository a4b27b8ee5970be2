//! A tiny run of `apiary bench` in CI: it runs end to end, reports sane figures as JSON, and
//! removes what it made. (The real numbers are in BENCHMARKS.md, never asserted here.)

use std::time::Duration;

use serde_json::Value;

#[tokio::test]
async fn apiary_bench_runs_reports_and_cleans_up() {
    let out_file = std::env::temp_dir().join(format!("apiary-bench-{}.json", uuid::Uuid::new_v4()));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"))
            .args(["bench", "--jobs", "300", "--workers", "2", "--json"])
            .arg(&out_file)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/apiary")
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
            .env("APIARY_WORKER_HTTP_ADDR", "127.0.0.1:0")
            .output(),
    )
    .await
    .expect("bench finished in time")
    .expect("bench ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("end to end"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).expect("json written"))
            .expect("json");
    let _ = std::fs::remove_file(&out_file);
    assert_eq!(report["jobs"], 300);
    for key in [
        "publish_rate",
        "e2e_rate",
        "drain_rate",
        "worker_cpu_seconds",
        "worker_peak_rss_mib",
    ] {
        assert!(
            report[key].as_f64().unwrap_or(0.0) > 0.0,
            "{key} in {report}"
        );
    }
    let p = &report["latency_ms"];
    assert!(p["p50"].as_f64() <= p["p99"].as_f64(), "{p}");
    // The scratch database is gone.
    let dbname = stdout
        .lines()
        .find(|l| l.contains("apiary_bench_"))
        .map(str::to_string);
    assert!(dbname.is_none(), "the report names no leftover database");
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
    .await
    .expect("postgres");
    let created = String::from_utf8_lossy(&out.stderr)
        .split("apiary_bench_")
        .nth(1)
        .and_then(|s| s.get(..10))
        .map(|s| format!("apiary_bench_{s}"));
    if let Some(db) = created {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&db)
            .fetch_one(&mut conn)
            .await
            .expect("query");
        assert_eq!(left, 0, "{db} was left behind");
    }
}
