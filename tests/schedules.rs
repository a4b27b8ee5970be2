//! Periodic jobs: every worker fires due schedules, each slot is one job however many
//! workers run or die, missed slots follow the documented policy after an outage or a pause,
//! and schedules are managed through the API (with scopes), the CLI and the schedules file.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use apiary::api::auth::parse_tokens;
use apiary::api::{AppState, router};
use apiary::schedule::GRACE;
use apiary::{Missed, ScheduleSpec, Shutdown};
use axum::body::Body;
use axum::http::{Request, header};
use chrono::{DateTime, Utc};
use common::{Proc, TestEnv};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const T: Duration = Duration::from_secs(30);

/// One job of a schedule: its slot (from the dedup key), status and when it was recorded.
#[derive(Debug, Clone)]
struct SlotJob {
    slot: DateTime<Utc>,
    status: String,
    created_at: DateTime<Utc>,
}

/// Every job of schedule `name`, by slot; fails if any slot has two.
async fn slot_jobs(env: &TestEnv, name: &str) -> BTreeMap<DateTime<Utc>, SlotJob> {
    let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT dedup_key, status, created_at FROM apiary_jobs WHERE dedup_key LIKE $1",
    )
    .bind(format!("schedule:{name}:%"))
    .fetch_all(env.store.pool())
    .await
    .expect("jobs");
    let mut out = BTreeMap::new();
    for (key, status, created_at) in rows {
        let slot = key
            .strip_prefix(&format!("schedule:{name}:"))
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_else(|| panic!("bad key {key}"));
        let again = out.insert(
            slot,
            SlotJob {
                slot,
                status,
                created_at,
            },
        );
        assert!(again.is_none(), "slot {slot} of {name} has two jobs");
    }
    out
}

/// Asserts that `slots` holds one job for every second from its first to its last slot.
fn assert_contiguous(name: &str, slots: &[DateTime<Utc>]) {
    for w in slots.windows(2) {
        assert_eq!(
            (w[1] - w[0]).num_seconds(),
            1,
            "{name}: gap or repeat between slots {} and {}",
            w[0],
            w[1]
        );
    }
}

fn every_second(missed: Missed) -> ScheduleSpec {
    ScheduleSpec {
        missed,
        payload: json!({"hello": "tick"}),
        ..ScheduleSpec::new("* * * * * *", "echo")
    }
}

fn worker(env: &TestEnv) -> Proc {
    env.spawn(&["worker"], &[])
}

async fn cursor_of(env: &TestEnv, name: &str) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT cursor FROM apiary_schedules WHERE name = $1")
        .bind(name)
        .fetch_one(env.store.pool())
        .await
        .expect("cursor")
}

async fn wait_for_jobs(env: &TestEnv, name: &str, n: usize) {
    env.wait_until(&format!("{n} jobs of {name}"), T, || async {
        (slot_jobs(env, name).await.len() >= n).then_some(())
    })
    .await;
}

/// Waits until every job of `name` has succeeded.
async fn wait_all_succeeded(env: &TestEnv, name: &str) -> BTreeMap<DateTime<Utc>, SlotJob> {
    env.wait_until(&format!("every job of {name} to succeed"), T, || async {
        let jobs = slot_jobs(env, name).await;
        jobs.values()
            .all(|j| j.status == "succeeded")
            .then_some(jobs)
    })
    .await
}

#[tokio::test]
async fn three_workers_one_killed_make_one_job_per_slot() {
    let env = TestEnv::new().await;
    let client = env.client();
    client
        .set_schedule("tick", &every_second(Missed::All))
        .await
        .expect("set");
    let mut workers = vec![worker(&env), worker(&env), worker(&env)];
    wait_for_jobs(&env, "tick", 2).await;
    let started = std::time::Instant::now();

    tokio::time::sleep(Duration::from_secs(6)).await;
    // Killed at any point of a firing: before its commit (rolled back, another worker fires
    // the slot) or after it (the relay publishes what it recorded).
    workers[0].signal("KILL");
    workers[0].wait(T).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    workers[0] = worker(&env);
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Two workers computing slots already recorded: the cursor set back five seconds, as a
    // stale worker would see it. The dedup keys let none of them become a second job.
    let before = slot_jobs(&env, "tick").await.len();
    sqlx::query(
        "UPDATE apiary_schedules SET cursor = cursor - interval '5 seconds', next_at = now()
          WHERE name = 'tick'",
    )
    .execute(env.store.pool())
    .await
    .expect("set the cursor back");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = slot_jobs(&env, "tick").await;
    assert!(
        after.len() <= before + 2,
        "setting the cursor back made jobs again: {before} -> {}",
        after.len()
    );

    while started.elapsed() < Duration::from_secs(22) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.pause_schedule("tick").await.expect("pause");
    // A firing that began before the pause may still commit; then nothing more.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let jobs = wait_all_succeeded(&env, "tick").await;
    let slots: Vec<DateTime<Utc>> = jobs.keys().copied().collect();
    assert!(
        slots.len() >= 21,
        "only {} slots over more than 20 s",
        slots.len()
    );
    assert_contiguous("tick", &slots);
    for w in &mut workers {
        w.signal("TERM");
        w.wait(T).await;
    }
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn after_a_full_outage_missed_slots_follow_the_policy() {
    let env = TestEnv::new().await;
    let client = env.client();
    for (name, missed) in [
        ("skip", Missed::Skip),
        ("one", Missed::One),
        ("all", Missed::All),
    ] {
        client
            .set_schedule(name, &every_second(missed))
            .await
            .expect("set");
    }
    let mut w = worker(&env);
    for name in ["skip", "one", "all"] {
        wait_for_jobs(&env, name, 2).await;
    }
    w.signal("TERM");
    w.wait(T).await;
    let mut cursors = BTreeMap::new();
    for name in ["skip", "one", "all"] {
        cursors.insert(name, cursor_of(&env, name).await);
    }
    // The outage: no worker at all for eight slots.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut w = worker(&env);
    let restarted = Utc::now();
    for name in ["skip", "one", "all"] {
        env.wait_until(&format!("{name} to fire after the restart"), T, || async {
            let jobs = slot_jobs(&env, name).await;
            jobs.keys()
                .any(|s| *s > restarted + chrono::Duration::seconds(3))
                .then_some(())
        })
        .await;
    }
    w.signal("TERM");
    w.wait(T).await;

    let grace = chrono::Duration::from_std(GRACE).expect("grace");
    for name in ["skip", "one", "all"] {
        let cursor = cursors[name];
        let jobs = wait_all_succeeded(&env, name).await;
        let after: Vec<&SlotJob> = jobs.values().filter(|j| j.slot > cursor).collect();
        // The restarted worker's first firing of this schedule: its jobs carry its time.
        let first = after.iter().map(|j| j.created_at).min().expect("fired");
        let missed_window = |s: DateTime<Utc>| s > cursor && s < first - grace;
        let missed_slots = {
            // Every whole second in (cursor, first - grace): what the outage missed.
            let mut n = 0;
            let mut s = DateTime::from_timestamp(cursor.timestamp(), 0).expect("second");
            while s < first - grace {
                if missed_window(s) {
                    n += 1;
                }
                s += chrono::Duration::seconds(1);
            }
            n
        };
        assert!(
            missed_slots >= 6,
            "{name}: the outage missed only {missed_slots} slots"
        );
        let in_window: Vec<&&SlotJob> = after.iter().filter(|j| missed_window(j.slot)).collect();
        let expected = match name {
            "skip" => 0,
            "one" => 1,
            _ => missed_slots,
        };
        assert_eq!(
            in_window.len(),
            expected,
            "{name}: {} jobs for {missed_slots} missed slots",
            in_window.len()
        );
        if name == "one" {
            // The most recent missed slot.
            let last_missed = in_window[0].slot;
            assert!(
                first - grace - last_missed <= chrono::Duration::seconds(1),
                "one: its job is for {last_missed}, not the latest missed slot"
            );
        }
        // From the first on-time slot on, every slot has its job.
        let on_time: Vec<DateTime<Utc>> = after
            .iter()
            .filter(|j| j.slot >= first - grace)
            .map(|j| j.slot)
            .collect();
        assert_contiguous(name, &on_time);
        if name == "all" {
            let all: Vec<DateTime<Utc>> = after.iter().map(|j| j.slot).collect();
            assert_contiguous(name, &all);
        }
    }
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn a_paused_schedule_enqueues_nothing_and_resumes_by_its_policy() {
    let env = TestEnv::new().await;
    let client = env.client();
    client
        .set_schedule("p-one", &every_second(Missed::One))
        .await
        .expect("set");
    client
        .set_schedule("p-all", &every_second(Missed::All))
        .await
        .expect("set");
    let w = env.start_worker();
    wait_for_jobs(&env, "p-one", 2).await;
    wait_for_jobs(&env, "p-all", 2).await;
    client.pause_schedule("p-one").await.expect("pause");
    client.pause_schedule("p-all").await.expect("pause");
    // A firing already under way when the pause landed may still commit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let one_jobs = slot_jobs(&env, "p-one").await;
    let all_jobs = slot_jobs(&env, "p-all").await;
    let (one_before, all_before) = (one_jobs.len(), all_jobs.len());
    let one_last = *one_jobs.keys().last().expect("jobs");
    let all_last = *all_jobs.keys().last().expect("jobs");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(slot_jobs(&env, "p-one").await.len(), one_before);
    assert_eq!(slot_jobs(&env, "p-all").await.len(), all_before);

    client.resume_schedule("p-one").await.expect("resume");
    client.resume_schedule("p-all").await.expect("resume");
    let resumed = Utc::now();
    for name in ["p-one", "p-all"] {
        env.wait_until(&format!("{name} to fire after resuming"), T, || async {
            slot_jobs(&env, name)
                .await
                .keys()
                .any(|s| *s > resumed + chrono::Duration::seconds(2))
                .then_some(())
        })
        .await;
    }
    w.stop().await;
    // The slots after the last one enqueued before the pause, up to the grace before the
    // first firing after the resume, were missed: `one` has one job for them (the latest),
    // `all` one for each.
    let grace = chrono::Duration::from_std(GRACE).expect("grace");
    for (name, last_before) in [("p-one", one_last), ("p-all", all_last)] {
        let jobs = slot_jobs(&env, name).await;
        let first = jobs
            .values()
            .filter(|j| j.slot > last_before)
            .map(|j| j.created_at)
            .min()
            .expect("fired after resuming");
        let missed: Vec<DateTime<Utc>> = jobs
            .keys()
            .copied()
            .filter(|s| *s > last_before && *s < first - grace)
            .collect();
        let window_slots = (first - grace - last_before).num_seconds();
        assert!(
            window_slots >= 4,
            "{name}: only {window_slots} slots paused"
        );
        if name == "p-one" {
            assert_eq!(missed.len(), 1, "one: {missed:?} for the paused slots");
            assert!(first - grace - missed[0] <= chrono::Duration::seconds(1));
        } else {
            let all: Vec<DateTime<Utc>> = jobs.keys().copied().collect();
            assert_contiguous(name, &all);
            assert!(missed.len() as i64 >= window_slots - 1, "all: {missed:?}");
        }
    }
}

// -------------------------------------------------------------------------------------------
// The API
// -------------------------------------------------------------------------------------------

const READER: &str = "read-0123456789abcdefg";
const ENQUEUER: &str = "enqueue-0123456789abcd";
const ADMIN: &str = "admin-0123456789abcdef";

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    token: &str,
) -> (u16, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Body::from(body.unwrap_or("").to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_api_manages_schedules_with_scopes_and_names_bad_fields() {
    let env = TestEnv::new().await;
    let tokens = parse_tokens(&format!(
        "{READER}:read,{ENQUEUER}:enqueue,{ADMIN}:admin+read"
    ))
    .expect("tokens");
    let app = router(AppState::new(
        env.client(),
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        tokens,
    ));
    let body = r#"{"cron": "* * * * * *", "timezone": "Europe/Berlin", "kind": "echo",
                   "payload": {"n": 1}, "queue": "default", "max_attempts": 3, "priority": 2,
                   "missed": "skip"}"#;
    let uri = "/v1/schedules/beat";
    for token in [READER, ENQUEUER] {
        let (status, _) = call(&app, "PUT", uri, Some(body), token).await;
        assert_eq!(status, 403, "PUT with a token without admin");
        let (status, _) = call(&app, "POST", &format!("{uri}/pause"), None, token).await;
        assert_eq!(status, 403);
        let (status, _) = call(&app, "DELETE", uri, None, token).await;
        assert_eq!(status, 403);
    }
    let (status, _) = call(&app, "GET", "/v1/schedules", None, ENQUEUER).await;
    assert_eq!(status, 403, "an enqueue token cannot read schedules");
    let (status, set) = call(&app, "PUT", uri, Some(body), ADMIN).await;
    assert_eq!(status, 201, "{set}");
    assert_eq!(set["created"], json!(true));
    assert_eq!(set["missed"], json!("skip"));
    assert_eq!(set["source"], json!("api"));
    let (status, again) = call(&app, "PUT", uri, Some(body), ADMIN).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["created"], json!(false));
    assert_eq!(
        again["cursor"], set["cursor"],
        "an unchanged cron keeps its cursor"
    );

    // Bad input: 422, naming the field.
    let bad = [
        (
            uri,
            r#"{"cron": "* * * * *", "kind": "echo", "timezone": "Mars/Base"}"#,
            "timezone",
        ),
        (uri, r#"{"cron": "61 * * * *", "kind": "echo"}"#, "cron"),
        (uri, r#"{"cron": "* * *", "kind": "echo"}"#, "cron"),
        (uri, r#"{"cron": "0 0 30 2 *", "kind": "echo"}"#, "cron"),
        (uri, r#"{"cron": "* * * * *", "kind": "Echo"}"#, "kind"),
        (
            uri,
            r#"{"cron": "* * * * *", "kind": "echo", "priority": 10}"#,
            "priority",
        ),
        (
            uri,
            r#"{"cron": "* * * * *", "kind": "echo", "max_attempts": 0}"#,
            "max_attempts",
        ),
        (
            uri,
            r#"{"cron": "* * * * *", "kind": "echo", "queue": "Q!"}"#,
            "queue",
        ),
        (
            uri,
            r#"{"cron": "* * * * *", "kind": "echo", "payload": {"a": "x\u0000"}}"#,
            "payload",
        ),
        (
            uri,
            r#"{"cron": "* * * * *", "kind": "echo", "missed": "sometimes"}"#,
            "missed",
        ),
        (
            uri,
            r#"{"cron": "* * * * *", "kind": "echo", "colour": 1}"#,
            "colour",
        ),
        (uri, r#"{"kind": "echo"}"#, "cron"),
        (
            "/v1/schedules/Not%20Valid",
            r#"{"cron": "* * * * *", "kind": "echo"}"#,
            "name",
        ),
    ];
    for (at, body, field) in bad {
        let (status, answer) = call(&app, "PUT", at, Some(body), ADMIN).await;
        assert_eq!(status, 422, "{body}: {answer}");
        let text = answer["error"].as_str().unwrap_or_default();
        assert!(text.contains(field), "{body}: {text} does not name {field}");
    }

    // Reading: the list, and one with its next five fire times and its jobs.
    let (status, list) = call(&app, "GET", "/v1/schedules", None, READER).await;
    assert_eq!(status, 200);
    assert_eq!(list["schedules"].as_array().map(Vec::len), Some(1));
    let w = env.start_worker();
    let shown = env
        .wait_until("the schedule's jobs in its answer", T, || async {
            let (_, got) = call(&app, "GET", uri, None, READER).await;
            (got["jobs"].as_array().map_or(0, Vec::len) >= 2).then_some(got)
        })
        .await;
    let next = shown["next"].as_array().expect("next");
    assert_eq!(next.len(), 5, "{shown}");
    assert!(next[0]["at"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert!(
        next[0]["local"]
            .as_str()
            .is_some_and(|s| s.ends_with("+01:00") || s.ends_with("+02:00")),
        "{shown}"
    );
    let key = shown["jobs"][0]["dedup_key"].as_str().expect("key");
    assert!(
        key.starts_with("schedule:beat:") && key.ends_with('Z'),
        "{key}"
    );
    let job_id: uuid::Uuid = shown["jobs"][0]["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let job = env.job(job_id).await.expect("job");
    assert_eq!(
        (job.kind.as_str(), job.max_attempts, job.priority),
        ("echo", 3, 2)
    );
    assert_eq!(job.payload, json!({"n": 1}));

    // Pause and resume, then delete: the jobs stay.
    let (status, paused) = call(&app, "POST", &format!("{uri}/pause"), None, ADMIN).await;
    assert_eq!((status, &paused["paused"]), (200, &json!(true)));
    let (status, resumed) = call(&app, "POST", &format!("{uri}/resume"), None, ADMIN).await;
    assert_eq!((status, &resumed["paused"]), (200, &json!(false)));
    let (status, _) = call(&app, "DELETE", uri, None, ADMIN).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let kept = slot_jobs(&env, "beat").await.len();
    assert!(kept >= 2);
    let (status, _) = call(&app, "GET", uri, None, READER).await;
    assert_eq!(status, 404);
    let (status, _) = call(&app, "DELETE", uri, None, ADMIN).await;
    assert_eq!(status, 404);
    let (status, _) = call(&app, "POST", &format!("{uri}/pause"), None, ADMIN).await;
    assert_eq!(status, 404);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        slot_jobs(&env, "beat").await.len(),
        kept,
        "a deleted schedule fired"
    );
    w.stop().await;

    // Another deployment on the same database sees none of this one's schedules.
    env.client()
        .set_schedule("mine", &ScheduleSpec::new("0 2 * * *", "echo"))
        .await
        .expect("set");
    let mut other = env.cfg.clone();
    other.queue = format!("{}.other", env.cfg.queue);
    let theirs = apiary::Client::new(&other).expect("client");
    assert!(theirs.schedules().await.expect("list").is_empty());
    assert!(matches!(
        theirs.schedule("mine").await,
        Err(apiary::client::ScheduleError::NotFound(_))
    ));
}

#[tokio::test]
async fn the_jobs_lookup_is_on_the_dedup_index() {
    let env = TestEnv::new().await;
    let mut conn = env.store.pool().acquire().await.expect("conn");
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .expect("set");
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id, dedup_key, status, created_at, finished_at FROM apiary_jobs
          WHERE kind = $1 AND dedup_key = ANY($2) AND duplicate_of IS NULL
          ORDER BY dedup_key DESC",
    )
    .bind("echo")
    .bind(vec!["schedule:x:2026-01-01T00:00:00Z".to_string()])
    .fetch_all(&mut *conn)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(plan.contains("apiary_jobs_dedup"), "{plan}");
}

// -------------------------------------------------------------------------------------------
// The CLI and the schedules file
// -------------------------------------------------------------------------------------------

async fn run_with(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"));
    cmd.args(args)
        .envs(env.envs())
        .stdin(std::process::Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run apiary")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn the_cli_sets_lists_pauses_and_removes_schedules() {
    let env = TestEnv::new().await;
    let ok = env
        .run(&[
            "schedule",
            "set",
            "nightly",
            "--cron",
            "0 2 * * *",
            "--kind",
            "echo",
            "--timezone",
            "Europe/Berlin",
            "--payload",
            r#"{"full":true}"#,
            "--priority",
            "4",
            "--missed",
            "all",
            "--max-attempts",
            "3",
        ])
        .await;
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("created schedule nightly"),
        "{}",
        text(&ok)
    );
    let row = env.client().schedule("nightly").await.expect("shown");
    assert_eq!(row.schedule.timezone, "Europe/Berlin");
    assert_eq!(row.schedule.priority, Some(4));
    assert_eq!(row.schedule.missed, "all");
    assert_eq!(row.schedule.max_attempts, Some(3));
    assert_eq!(row.next.len(), 5);

    let list = env.run(&["schedule", "list"]).await;
    assert!(
        list.status.success() && text(&list).contains("nightly"),
        "{}",
        text(&list)
    );
    let json_list = env.run(&["schedule", "list", "--json"]).await;
    let v: Value = serde_json::from_slice(&json_list.stdout).expect("json");
    assert_eq!(v["schedules"][0]["name"], json!("nightly"));
    let show = env.run(&["schedule", "show", "nightly"]).await;
    let v: Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(v["next"].as_array().map(Vec::len), Some(5));

    for (action, paused) in [("pause", true), ("resume", false)] {
        let o = env.run(&["schedule", action, "nightly"]).await;
        assert!(o.status.success(), "{}", text(&o));
        let row = env.client().schedule("nightly").await.expect("shown");
        assert_eq!(row.schedule.paused, paused);
    }

    // Bad input: exit 6, naming the field; a missing schedule: exit 7.
    let bad: [&[&str]; 6] = [
        &["schedule", "set", "n", "--cron", "nope", "--kind", "echo"],
        &[
            "schedule",
            "set",
            "n",
            "--cron",
            "* * * * *",
            "--kind",
            "echo",
            "--timezone",
            "Nowhere/City",
        ],
        &[
            "schedule",
            "set",
            "N!",
            "--cron",
            "* * * * *",
            "--kind",
            "echo",
        ],
        &[
            "schedule",
            "set",
            "n",
            "--cron",
            "* * * * *",
            "--kind",
            "echo",
            "--missed",
            "some",
        ],
        &[
            "schedule",
            "set",
            "n",
            "--cron",
            "* * * * *",
            "--kind",
            "echo",
            "--payload",
            "{",
        ],
        &[
            "schedule",
            "set",
            "n",
            "--cron",
            "* * * * *",
            "--kind",
            "echo",
            "--priority",
            "12",
        ],
    ];
    let fields = ["cron", "timezone", "name", "missed", "payload", "priority"];
    for (args, field) in bad.iter().zip(fields) {
        let o = env.run(args).await;
        assert_eq!(o.status.code(), Some(6), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(field), "{args:?}: {}", text(&o));
    }
    for action in ["rm", "pause", "resume", "show"] {
        let o = env.run(&["schedule", action, "missing"]).await;
        assert_eq!(o.status.code(), Some(7), "{action}: {}", text(&o));
    }
    let rm = env.run(&["schedule", "rm", "nightly"]).await;
    assert!(rm.status.success(), "{}", text(&rm));
    assert!(env.client().schedules().await.expect("list").is_empty());
}

#[tokio::test]
async fn migrate_applies_the_schedules_file() {
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(format!("{}-schedules", env.name));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("schedules.toml");
    let path = file.to_str().expect("path").to_string();
    std::fs::write(
        &file,
        r#"
        [schedules.nightly]
        cron = "0 2 * * *"
        timezone = "Europe/Berlin"
        kind = "echo"
        payload = { full = true }

        [schedules.hourly]
        cron = "0 * * * *"
        kind = "echo"
        missed = "skip"
        "#,
    )
    .expect("write");
    // One set through the API, which the file does not manage.
    env.client()
        .set_schedule("manual", &ScheduleSpec::new("*/5 * * * *", "echo"))
        .await
        .expect("set");
    let vars = [("APIARY_SCHEDULES_FILE", path.as_str())];
    let o = run_with(&env, &["migrate"], &vars).await;
    assert!(o.status.success(), "{}", text(&o));
    let names = |rows: Vec<apiary::store::schedules::ScheduleRow>| {
        rows.into_iter()
            .map(|r| (r.name, r.source))
            .collect::<Vec<_>>()
    };
    let got = names(env.client().schedules().await.expect("list"));
    assert_eq!(
        got,
        vec![
            ("hourly".to_string(), "file".to_string()),
            ("manual".to_string(), "api".to_string()),
            ("nightly".to_string(), "file".to_string()),
        ]
    );
    let cursor = cursor_of(&env, "nightly").await;
    // Applied again unchanged: the cursor stays.
    let o = run_with(&env, &["migrate"], &vars).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(cursor_of(&env, "nightly").await, cursor);

    // A bad file: exit 3, naming the file, the schedule and the field; nothing changes.
    std::fs::write(
        &file,
        "[schedules.nightly]\ncron = \"0 2 * * *\"\nkind = \"echo\"\ntimezone = \"Atlantis/Capital\"\n",
    )
    .expect("write");
    let o = run_with(&env, &["migrate"], &vars).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let said = text(&o);
    assert!(
        said.contains(&path) && said.contains("schedule nightly") && said.contains("timezone"),
        "{said}"
    );
    assert_eq!(env.client().schedules().await.expect("list").len(), 3);
    let yaml = dir.join("schedules.yaml");
    std::fs::write(&yaml, "nightly: {}\n").expect("write");
    let o = run_with(
        &env,
        &["migrate"],
        &[("APIARY_SCHEDULES_FILE", yaml.to_str().expect("path"))],
    )
    .await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("YAML"), "{}", text(&o));

    // A schedule gone from the file is removed; the API's stays.
    std::fs::write(
        &file,
        "[schedules.hourly]\ncron = \"0 * * * *\"\nkind = \"echo\"\nmissed = \"skip\"\n",
    )
    .expect("write");
    let o = run_with(&env, &["migrate"], &vars).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("removed nightly"), "{}", text(&o));
    let got = names(env.client().schedules().await.expect("list"));
    assert_eq!(
        got,
        vec![
            ("hourly".to_string(), "file".to_string()),
            ("manual".to_string(), "api".to_string()),
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
