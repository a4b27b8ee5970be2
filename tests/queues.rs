//! Pausing and resuming queues, on real `apiary` processes: a paused queue starts nothing
//! (its jobs wait, uncharged, across a worker restart) while the other queues run; a job
//! already running when the pause lands finishes; a resume runs the backlog once each.
//! `GET /v1/queues` and `apiary queue list` / `apiary status` show every queue with its
//! state and depths; pausing needs the `admin` scope and a well-formed name.

mod common;

use std::time::{Duration, Instant};

use apiary::{JobId, JobStatus, NewJob};
use common::{Proc, TestEnv};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";
const ENQUEUE: &str = "enqueue-token-0123456789";

/// `apiary api` in `env`'s world with an admin, a read and an enqueue token, and its base URL.
async fn start_api(env: &TestEnv) -> (Proc, String) {
    let tokens = format!("{ADMIN}:admin+read, {READ}:read, {ENQUEUE}:enqueue");
    let queues = env.queues_var();
    let api = env.spawn(
        &["api"],
        &[
            ("APIARY_HTTP_ADDR", "127.0.0.1:0"),
            ("APIARY_API_TOKENS", &tokens),
            ("APIARY_QUEUES", &queues),
        ],
    );
    let line = api.wait_for_log("api listening", T).await;
    let addr = line
        .split("addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (api, format!("http://{addr}"))
}

/// A request with `token`; returns the status and the JSON body (or null).
async fn call(method: &str, url: &str, token: &str) -> (u16, Value) {
    let client = reqwest::Client::new();
    let req = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    let resp = req.bearer_auth(token).send().await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// `GET /v1/queues`' entry for `name`, if listed.
async fn queue_entry(base: &str, name: &str) -> Option<Value> {
    let (status, body) = call("GET", &format!("{base}/v1/queues"), READ).await;
    assert_eq!(status, 200, "{body}");
    body["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == name)
        .cloned()
}

/// Waits until `name`'s work queue has `n` consumers, as `GET /v1/queues` reports them.
async fn wait_for_consumers(env: &TestEnv, base: &str, name: &str, n: u64) {
    env.wait_until(&format!("{n} consumer(s) on {name}"), T, || async {
        let q = queue_entry(base, name).await?;
        (q["consumers"].as_u64() == Some(n)).then_some(())
    })
    .await;
}

async fn enqueue_echoes(env: &TestEnv, queue: &str, n: usize) -> Vec<JobId> {
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob::new("echo", json!({ "queue": queue, "i": i })).with_queue(queue))
        .collect();
    env.client()
        .enqueue_many(jobs)
        .await
        .expect("enqueue")
        .into_iter()
        .map(|e| e.job.id)
        .collect()
}

/// Watches `ids` for `span`: none may start (every one stays `queued` with no attempt).
async fn assert_none_start(env: &TestEnv, ids: &[JobId], span: Duration) {
    let until = Instant::now() + span;
    loop {
        for id in ids {
            let job = env.job(*id).await.expect("job");
            assert!(
                job.status() == JobStatus::Queued && job.attempts == 0,
                "a job of the paused queue started: {job:#?}"
            );
        }
        if Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The queues a live worker's registry row says it consumes.
async fn registered_queues(env: &TestEnv, pid: i32) -> Option<Value> {
    let workers = env
        .store
        .live_workers(Duration::from_secs(9))
        .await
        .expect("workers");
    let w = workers.into_iter().find(|w| w.pid == pid)?;
    Some(serde_json::to_value(w.queues?).expect("json"))
}

#[tokio::test]
async fn a_paused_queue_starts_nothing_across_a_restart_and_runs_once_resumed() {
    let env = TestEnv::with_queues(&[("default", 4), ("emails", 4)]).await;
    let (_api, base) = start_api(&env).await;
    let queues = env.queues_var();
    let mut worker = env.spawn(&["worker"], &[("APIARY_QUEUES", &queues)]);
    wait_for_consumers(&env, &base, "default", 1).await;
    wait_for_consumers(&env, &base, "emails", 1).await;
    // The heartbeat says which queues the worker consumes, with their slots.
    let pid = worker.pid();
    let said = env
        .wait_until("the worker's queues in its registry row", T, || {
            registered_queues(&env, pid)
        })
        .await;
    assert_eq!(said, json!({"default": 4, "emails": 4}));

    let (status, body) = call("POST", &format!("{base}/v1/queues/emails/pause"), ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["paused"].as_bool()),
        (Some("emails"), Some(true))
    );
    // The worker has acted on it once its consumer is gone from the broker.
    wait_for_consumers(&env, &base, "emails", 0).await;

    let emails = enqueue_echoes(&env, "emails", 20).await;
    let default = enqueue_echoes(&env, "default", 20).await;
    for id in &default {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    assert_none_start(&env, &emails, Duration::from_secs(3)).await;
    let entry = queue_entry(&base, "emails").await.expect("emails listed");
    assert_eq!(entry["paused"], true, "{entry}");
    assert!(entry["ready"].as_u64() >= Some(20), "{entry}");

    // A worker started while the queue is paused never takes its messages.
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
    let worker = env.spawn(&["worker"], &[("APIARY_QUEUES", &queues)]);
    wait_for_consumers(&env, &base, "default", 1).await;
    let pid = worker.pid();
    env.wait_until("the new worker registered", T, || {
        registered_queues(&env, pid)
    })
    .await;
    assert_none_start(&env, &emails, Duration::from_secs(3)).await;
    assert_eq!(
        queue_entry(&base, "emails").await.expect("emails")["consumers"],
        0
    );

    let out = env.run(&["queue", "resume", "emails"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in &emails {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1, "charged more than once: {job:#?}");
    }
    let entry = queue_entry(&base, "emails").await.expect("emails");
    assert_eq!(entry["paused"], false, "{entry}");
}

#[tokio::test]
async fn a_job_running_when_the_pause_lands_finishes() {
    let env = TestEnv::with_queues(&[("default", 2), ("emails", 2)]).await;
    let queues = env.queues_var();
    let _worker = env.spawn(&["worker"], &[("APIARY_QUEUES", &queues)]);
    let id = env
        .enqueue(NewJob::new("sleep", json!({"ms": 2000})).with_queue("emails"))
        .await;
    env.wait_for_status(id, JobStatus::Running, T).await;
    let out = env.run(&["queue", "pause", "emails"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused emails"));
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 1);
    // The pause holds for what comes after it.
    let store = env.store.clone();
    let prefix = env.cfg.queue.clone();
    let paused = store
        .paused_queues(&prefix, &["emails".to_string()])
        .await
        .expect("paused");
    assert_eq!(paused, vec!["emails".to_string()]);
}

#[tokio::test]
async fn queues_are_listed_and_pausing_takes_the_admin_scope_and_a_good_name() {
    let env = TestEnv::with_queues(&[("default", 2), ("emails", 2)]).await;
    let (_api, base) = start_api(&env).await;

    // Configured queues are listed before anything ran on them; broker queues that do not
    // exist yet count as empty.
    let (status, body) = call("GET", &format!("{base}/v1/queues"), READ).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(names, ["default", "emails"], "{body}");
    let emails = &body["queues"][1];
    for field in [
        "paused",
        "ready",
        "delayed",
        "dead",
        "consumers",
        "in_flight",
        "oldest_waiting_seconds",
        "succeeded_per_second",
        "failed_per_second",
    ] {
        assert!(emails.get(field).is_some(), "no {field} in {emails}");
    }
    assert_eq!(emails["paused"], false);
    assert_eq!(emails["ready"], 0);

    let pause = format!("{base}/v1/queues/emails/pause");
    for token in [ENQUEUE, READ] {
        let (status, body) = call("POST", &pause, token).await;
        assert_eq!(status, 403, "{token}: {body}");
    }
    let (status, _) = call("GET", &format!("{base}/v1/queues"), ENQUEUE).await;
    assert_eq!(status, 403, "listing needs read");
    assert!(
        env.store
            .paused_queues(&env.cfg.queue, &["emails".to_string()])
            .await
            .expect("paused")
            .is_empty()
    );
    let (status, body) = call("POST", &pause, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], true);
    // Again: idempotent.
    let (status, body) = call("POST", &pause, ADMIN).await;
    assert_eq!((status, &body["paused"]), (200, &json!(true)), "{body}");

    // No worker runs: the jobs wait in the broker, and the depth shows them.
    enqueue_echoes(&env, "emails", 20).await;
    let entry = env
        .wait_until("20 ready in emails", T, || async {
            let q = queue_entry(&base, "emails").await?;
            (q["ready"].as_u64() >= Some(20)).then_some(q)
        })
        .await;
    assert_eq!(entry["paused"], true, "{entry}");
    assert!(
        entry["oldest_waiting_seconds"].as_f64().is_some(),
        "{entry}"
    );
    assert_eq!(
        queue_entry(&base, "default").await.expect("default")["paused"],
        false
    );

    // Bad names are 422, naming the field.
    for bad in ["Emails", "e%20mails", &"x".repeat(65)] {
        let (status, body) = call("POST", &format!("{base}/v1/queues/{bad}/pause"), ADMIN).await;
        assert_eq!(status, 422, "{bad}: {body}");
        let error = body["error"].as_str().expect("error");
        assert!(error.starts_with("queue"), "{bad}: {error}");
    }

    // A queue an operator paused is listed even if nothing configures it.
    let (status, body) = call("POST", &format!("{base}/v1/queues/reports/pause"), ADMIN).await;
    assert_eq!((status, &body["name"]), (200, &json!("reports")), "{body}");
    let reports = queue_entry(&base, "reports").await.expect("reports listed");
    assert_eq!(reports["paused"], true);
    let (status, body) = call("POST", &format!("{base}/v1/queues/reports/resume"), ADMIN).await;
    assert_eq!((status, &body["paused"]), (200, &json!(false)), "{body}");

    // Jobs by queue.
    let (status, body) = call(
        "GET",
        &format!("{base}/v1/jobs?queue=emails&limit=100"),
        READ,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let jobs = body["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 20, "{body}");
    assert!(jobs.iter().all(|j| j["queue"] == "emails"), "{body}");
    let (status, body) = call("GET", &format!("{base}/v1/jobs?queue=default"), READ).await;
    assert_eq!(
        (status, body["jobs"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{body}"
    );
    let (status, body) = call("GET", &format!("{base}/v1/jobs?queue=Nope"), READ).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().expect("error").starts_with("queue"),
        "{body}"
    );
}

#[tokio::test]
async fn status_and_queue_list_show_each_queue() {
    let env = TestEnv::with_queues(&[("default", 2), ("emails", 2)]).await;
    let queues = env.queues_var();
    let vars = [("APIARY_QUEUES", queues.as_str())];
    let run = |args: &'static [&'static str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"));
        cmd.args(args)
            .envs(env.envs())
            .envs(vars.iter().copied())
            .stdin(std::process::Stdio::null());
        async move { cmd.output().await.expect("run apiary") }
    };
    let out = run(&["queue", "pause", "emails"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    enqueue_echoes(&env, "emails", 3).await;

    let out = run(&["status", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).expect("json");
    let listed: Vec<(&str, bool)> = stats["queues"]
        .as_array()
        .expect("queues in status --json")
        .iter()
        .map(|q| (q["name"].as_str().unwrap_or(""), q["paused"] == true))
        .collect();
    assert_eq!(listed, [("default", false), ("emails", true)], "{stats}");
    assert_eq!(stats["queues"][1]["ready"], 3, "{stats}");
    // The totals add up every queue.
    assert_eq!(stats["depths"]["ready"], 3, "{stats}");

    let out = run(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("emails"))
        .unwrap_or_else(|| panic!("no emails row in\n{text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["emails", "yes", "3", "0"], "{text}");

    let out = run(&["queue", "list", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    // The figures that cannot move between the two reads agree.
    let brief = |v: &Value| -> Vec<(String, bool)> {
        v["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .map(|q| {
                (
                    q["name"].as_str().unwrap_or("").to_string(),
                    q["paused"] == true,
                )
            })
            .collect()
    };
    assert_eq!(brief(&list), brief(&stats), "{list}");
    let out = run(&["queue", "list"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("paused") && text.contains("emails"), "{text}");

    // A bad name is bad input: exit 6, before anything changes.
    let out = run(&["queue", "pause", "No Such"]).await;
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue"), "{err}");
    let out = run(&["queue", "resume", "emails"]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumed emails"));
}
