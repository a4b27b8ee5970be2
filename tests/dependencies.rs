//! Job dependencies and chains, with real worker processes: a chain runs strictly in order and
//! each step reads the one before; a step that ends dead cancels the rest and their own
//! dependents; a waiting job can be cancelled; parents already final decide at once; unknown
//! parents are refused naming them; a parent finishing while its child is recorded never
//! strands the child; a release survives the worker dying right after the parent's commit;
//! and every enqueue path (library, HTTP, chains, CLI, raw AMQP) takes `depends_on`.

mod common;

use std::time::Duration;

use apiary::api::{ApiOptions, AppState, auth::Tokens, router};
use apiary::client::EnqueueError;
use apiary::shutdown::Shutdown;
use apiary::{JobStatus, NewJob};
use common::{TestEnv, call};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

fn app(env: &TestEnv) -> axum::Router {
    router(AppState::with_options(
        env.client(),
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        Tokens::default(),
        ApiOptions::default(),
    ))
}

#[tokio::test]
async fn a_chain_of_three_runs_strictly_in_order_and_each_step_reads_the_one_before() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "8")]);
    let chain = env
        .client()
        .enqueue_chain(
            (1..=3)
                .map(|step| NewJob::new("collect", json!({ "step": step })))
                .collect::<Vec<_>>(),
        )
        .await
        .expect("chain");
    let ids: Vec<Uuid> = chain.iter().map(|e| e.job.id).collect();
    assert_eq!(chain[0].job.status(), JobStatus::Queued);
    assert_eq!(chain[1].job.status(), JobStatus::Waiting);
    assert_eq!(chain[2].job.depends_on, vec![ids[1]]);
    let last = env.wait_for_status(ids[2], JobStatus::Succeeded, T).await;
    let mut jobs = Vec::new();
    for id in &ids {
        jobs.push(env.job(*id).await.expect("job"));
    }
    for w in jobs.windows(2) {
        let (before, after) = (&w[0], &w[1]);
        assert!(
            after.started_at >= before.finished_at,
            "{} started at {:?}, before {} finished at {:?}",
            after.id,
            after.started_at,
            before.id,
            before.finished_at
        );
        let result = after.result.as_ref().expect("result");
        let parents = result["parents"].as_array().expect("parents");
        assert_eq!(parents.len(), 1, "{result}");
        assert_eq!(parents[0]["id"], json!(before.id));
        assert_eq!(parents[0]["status"], json!("succeeded"));
        assert_eq!(
            parents[0]["result"]["payload"], before.payload,
            "each step reads the previous step's result"
        );
    }
    assert_eq!(jobs[0].result.as_ref().expect("r")["parents"], json!([]));
    assert_eq!(last.attempts, 1);
    env.assert_invariants().await;
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn a_dead_middle_step_cancels_the_last_and_its_own_dependents() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[]);
    let client = env.client();
    let chain = client
        .enqueue_chain(vec![
            NewJob::new("collect", json!({"step": 1})),
            NewJob::new("fail", json!({"permanent": true})),
            NewJob::new("collect", json!({"step": 3})),
        ])
        .await
        .expect("chain");
    let ids: Vec<Uuid> = chain.iter().map(|e| e.job.id).collect();
    let after_last = client
        .enqueue(NewJob::new("collect", json!({})).with_depends_on([ids[2]]))
        .await
        .expect("dependent of the last")
        .job;
    assert_eq!(after_last.status(), JobStatus::Waiting);
    env.wait_for_status(ids[1], JobStatus::Dead, T).await;
    let last = env.wait_for_status(ids[2], JobStatus::Cancelled, T).await;
    let error = last.error.unwrap_or_default();
    assert!(
        error.contains(&ids[1].to_string()) && error.contains("dead"),
        "the reason names the dead parent: {error}"
    );
    assert!(last.started_at.is_none(), "it never ran");
    let next = env
        .wait_for_status(after_last.id, JobStatus::Cancelled, T)
        .await;
    let error = next.error.unwrap_or_default();
    assert!(
        error.contains(&ids[2].to_string()) && error.contains("cancelled"),
        "the cancellation goes on down, naming each parent: {error}"
    );
    // Replaying the dead parent does not bring its cancelled dependents back.
    let replayed = client
        .replay(&apiary::store::dead_job::ReplaySelector::Id(ids[1]))
        .await
        .expect("replay");
    assert_eq!(replayed, vec![ids[1]]);
    env.wait_for_status(ids[1], JobStatus::Dead, T).await;
    assert_eq!(
        env.job(ids[2]).await.expect("job").status(),
        JobStatus::Cancelled
    );
    env.assert_invariants().await;
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn waiting_jobs_cancel_and_parents_already_final_decide_at_once() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[]);
    let client = env.client();

    // A waiting job is cancelled at once, and so are its own dependents.
    let slow = env.enqueue(NewJob::new("sleep", json!({"ms": 3000}))).await;
    let child = client
        .enqueue(NewJob::new("echo", json!(1)).with_depends_on([slow]))
        .await
        .expect("child")
        .job;
    let grandchild = client
        .enqueue(NewJob::new("echo", json!(2)).with_depends_on([child.id]))
        .await
        .expect("grandchild")
        .job;
    assert_eq!(
        env.store.cancel_job(child.id).await.expect("cancel"),
        apiary::store::cancel_job::CancelOutcome::Cancelled
    );
    let g = env
        .wait_for_status(grandchild.id, JobStatus::Cancelled, T)
        .await;
    assert!(
        g.error.unwrap_or_default().contains(&child.id.to_string()),
        "names the cancelled parent"
    );
    env.wait_for_status(slow, JobStatus::Succeeded, T).await;
    assert_eq!(
        env.job(child.id).await.expect("child").status(),
        JobStatus::Cancelled,
        "a cancelled child stays cancelled when its parent succeeds"
    );

    // A parent that has succeeded already: the child is queued and runs.
    let now = client
        .enqueue(NewJob::new("collect", json!({})).with_depends_on([slow]))
        .await
        .expect("child of a succeeded parent")
        .job;
    assert_eq!(now.status(), JobStatus::Queued);
    let done = env.wait_for_status(now.id, JobStatus::Succeeded, T).await;
    assert_eq!(
        done.result.expect("result")["parents"][0]["id"],
        json!(slow)
    );

    // A dead parent: the child is recorded cancelled, naming it.
    let dead = env
        .enqueue(NewJob::new("fail", json!({"permanent": true})))
        .await;
    env.wait_for_status(dead, JobStatus::Dead, T).await;
    let orphan = client
        .enqueue(NewJob::new("echo", json!(3)).with_depends_on([dead]))
        .await
        .expect("child of a dead parent")
        .job;
    assert_eq!(orphan.status(), JobStatus::Cancelled);
    assert!(orphan.error.unwrap_or_default().contains(&dead.to_string()));

    // Unknown parents and the job itself are refused, naming the field, with nothing written.
    let unknown = Uuid::now_v7();
    let err = client
        .enqueue(NewJob::new("echo", json!(4)).with_depends_on([unknown]))
        .await
        .expect_err("unknown parent");
    match err {
        EnqueueError::Invalid(e) => {
            assert_eq!(e.field, "depends_on");
            assert!(e.reason.contains(&unknown.to_string()), "{e}");
        }
        other => panic!("expected an invalid job, got {other}"),
    }
    let own = Uuid::now_v7();
    let err = client
        .enqueue(
            NewJob::new("echo", json!(5))
                .with_id(own)
                .with_depends_on([own]),
        )
        .await
        .expect_err("itself");
    assert!(matches!(err, EnqueueError::Invalid(e) if e.field == "depends_on"));
    assert!(env.job(own).await.is_none());
    let too_many = NewJob::new("echo", json!(6))
        .with_depends_on((0..=apiary::job::MAX_DEPENDS_ON).map(|_| Uuid::now_v7()));
    assert!(matches!(
        client.enqueue(too_many).await,
        Err(EnqueueError::Invalid(e)) if e.field == "depends_on"
    ));

    // The same over HTTP: 422 naming the field and the parent.
    let app = app(&env);
    let body = json!({"kind": "echo", "depends_on": [unknown]}).to_string();
    let (status, answer) = call(&app, "POST", "/v1/jobs", Some(&body)).await;
    assert_eq!(status, 422, "{answer}");
    let text = answer["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("depends_on") && text.contains(&unknown.to_string()),
        "{text}"
    );

    env.assert_invariants().await;
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn a_parent_finishing_while_its_child_is_recorded_never_strands_the_child() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "32")]);
    let client = env.client();
    let mut children = Vec::new();
    // Each child is enqueued the moment its parent is: the parent is often finishing on the
    // worker while the child's transaction locks it.
    for round in 0..100 {
        let parent = env.enqueue(NewJob::new("echo", json!(round))).await;
        let c = client.clone();
        children.push(tokio::spawn(async move {
            c.enqueue(NewJob::new("echo", json!({"child": round})).with_depends_on([parent]))
                .await
                .expect("child")
                .job
                .id
        }));
    }
    for c in children {
        let id = c.await.expect("task");
        env.wait_for_status(id, JobStatus::Succeeded, T).await;
    }
    assert_eq!(env.count(JobStatus::Waiting).await, 0);
    env.assert_invariants().await;
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn a_release_survives_the_worker_dying_right_after_the_parents_commit() {
    let env = TestEnv::new().await;
    let mut first = env.spawn(&["worker"], &[]);
    let client = env.client();
    let parent = env.enqueue(NewJob::new("sleep", json!({"ms": 1500}))).await;
    let child = client
        .enqueue(NewJob::new("tally", json!({"counter": "released"})).with_depends_on([parent]))
        .await
        .expect("child")
        .job
        .id;
    // Killed as soon as the parent's success is visible: the child's release committed with
    // it, and whether or not the dying worker published it, it must run, once.
    env.wait_for_status(parent, JobStatus::Running, T).await;
    env.wait_until("the parent's success", T, || async {
        (env.job(parent).await?.status() == JobStatus::Succeeded).then_some(())
    })
    .await;
    first.signal("KILL");
    let _ = first.wait(T).await;
    let state = env.job(child).await.expect("child").status();
    assert_ne!(state, JobStatus::Waiting, "released in the parent's commit");
    let mut second = env.spawn(&["worker"], &[]);
    env.wait_for_status(child, JobStatus::Succeeded, T).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.tally("released").await, Some(1), "the child ran once");
    env.assert_invariants().await;
    second.signal("TERM");
    assert!(second.wait(T).await.success(), "{}", second.log_text());
}

#[tokio::test]
async fn every_enqueue_path_takes_depends_on() {
    let env = TestEnv::new().await;
    let parent = env.enqueue(NewJob::new("sleep", json!({"ms": 1500}))).await;
    let app = app(&env);

    // HTTP, one job.
    let body = json!({"kind": "collect", "payload": {"via": "http"}, "depends_on": [parent]});
    let (status, answer) = call(&app, "POST", "/v1/jobs", Some(&body.to_string())).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], json!("waiting"));
    assert_eq!(answer["depends_on"], json!([parent]));
    let http: Uuid = serde_json::from_value(answer["id"].clone()).expect("id");

    // HTTP, a chain, hung off the same parent.
    let body = json!({"jobs": [
        {"kind": "collect", "payload": {"via": "chain", "step": 1}, "depends_on": [parent]},
        {"kind": "collect", "payload": {"via": "chain", "step": 2}}
    ]});
    let (status, answer) = call(&app, "POST", "/v1/chains", Some(&body.to_string())).await;
    assert_eq!(status, 202, "{answer}");
    let chain: Vec<Uuid> = answer["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| serde_json::from_value(j["id"].clone()).expect("id"))
        .collect();
    assert_eq!(answer["jobs"][1]["depends_on"], json!([chain[0]]));
    let (status, answer) = call(&app, "POST", "/v1/chains", Some(r#"{"jobs": []}"#)).await;
    assert_eq!(status, 422, "{answer}");

    // The CLI, with the flag repeated.
    let out = env
        .run(&[
            "enqueue",
            "collect",
            r#"{"via": "cli"}"#,
            "--depends-on",
            &parent.to_string(),
            "--depends-on",
            &http.to_string(),
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Uuid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the id on stdout");
    let out = env
        .run(&[
            "enqueue",
            "echo",
            "--depends-on",
            &Uuid::now_v7().to_string(),
        ])
        .await;
    assert_eq!(out.status.code(), Some(6), "unknown parent: exit 6");

    // Typed arguments.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Collect {
        via: String,
    }
    impl apiary::JobArgs for Collect {
        const KIND: &'static str = "collect";
    }
    let typed = env
        .client()
        .enqueue(
            apiary::TypedJob::new(Collect {
                via: "typed".into(),
            })
            .with_depends_on([parent]),
        )
        .await
        .expect("typed")
        .job;
    assert_eq!(typed.status(), JobStatus::Waiting);

    // A raw AMQP message: recorded waiting, acked, and run once released.
    let raw = Uuid::now_v7();
    let body =
        json!({"id": raw, "kind": "collect", "payload": {"via": "raw"}, "depends_on": [parent]});
    env.publish_raw(&[(None, body.to_string().into_bytes())])
        .await;
    // And a malformed one goes to the dead letters with its reason.
    let bad = Uuid::now_v7();
    let body = json!({"id": bad, "kind": "collect", "depends_on": "not a list"});
    env.publish_raw(&[(None, body.to_string().into_bytes())])
        .await;

    let mut worker = env.spawn(&["worker"], &[]);
    env.wait_for_status(raw, JobStatus::Succeeded, T).await;
    for id in [http, chain[0], chain[1], cli, typed.id, raw] {
        let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
        let parent_job = env.job(parent).await.expect("parent");
        assert!(job.started_at >= parent_job.finished_at, "{id} waited");
        assert_eq!(job.attempts, 1);
    }
    let dead = env.wait_for_status(bad, JobStatus::Dead, T).await;
    assert!(
        dead.error.unwrap_or_default().contains("depends_on"),
        "the reason names the field"
    );
    env.assert_invariants().await;
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn pruning_keeps_a_waiting_jobs_parents() {
    let env = TestEnv::new().await;
    let client = env.client();
    // Two parents, one succeeded long ago (past retention), one still queued: the child
    // waits for the second, and the first must not be pruned under it.
    let old = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, max_attempts, status, result, finished_at, created_at)
         VALUES ($1, 'echo', 3, 'succeeded', '\"old\"', now() - interval '2 days', now() - interval '2 days')",
    )
    .bind(old)
    .execute(env.store.pool())
    .await
    .expect("old parent");
    let open = env.enqueue(NewJob::new("echo", json!("open"))).await;
    let child = client
        .enqueue(NewJob::new("collect", json!({})).with_depends_on([old, open]))
        .await
        .expect("child")
        .job;
    assert_eq!(child.status(), JobStatus::Waiting);
    let pruned = env
        .store
        .prune(Duration::from_secs(3600), &[], 1000, 10)
        .await
        .expect("prune");
    assert_eq!(pruned, Some(0), "a waiting job's parent stays");
    assert!(env.job(old).await.is_some());
    let mut worker = env.spawn(&["worker"], &[]);
    let done = env.wait_for_status(child.id, JobStatus::Succeeded, T).await;
    let parents: Vec<Value> = done.result.expect("result")["parents"]
        .as_array()
        .expect("parents")
        .clone();
    assert_eq!(parents.len(), 2);
    assert!(parents.iter().any(|p| p["result"] == json!("old")));
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}
