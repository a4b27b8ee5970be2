//! Regression tests for the review's holes in input handling: one size rule on every path,
//! text Postgres cannot store, oversized dead-letter reasons, bad data isolated from shared
//! batches, detached jobs whose retry publish fails, message identity, the budgets of raw
//! scheduled jobs and far-future `run_at`. Each test runs against the real Postgres and
//! RabbitMQ, in a world of its own, and asserts final states, rows, letters and counters.

mod common;

use std::time::Duration;

use apiary::api::{AppState, router};
use apiary::store::claim_job::{Claim, ClaimInput};
use apiary::store::finish_job::{Finish, Outcome};
use apiary::wire::WireJob;
use apiary::{EnqueueError, Job, JobId, JobStatus, NewJob, Shutdown};
use common::{TestEnv, call, consumer_count, peek_dead_letters};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

/// The API router on a client whose payload limit is `max`.
fn api_with_limit(env: &TestEnv, max: usize) -> axum::Router {
    let mut cfg = env.cfg.clone();
    cfg.max_payload_bytes = max;
    let client = apiary::Client::new(&cfg).expect("client");
    router(AppState::new(
        client,
        Shutdown::new(),
        max,
        Default::default(),
    ))
}

fn api(env: &TestEnv) -> axum::Router {
    api_with_limit(env, env.cfg.max_payload_bytes)
}

/// `POST /v1/jobs` with `body`.
async fn post_job(app: &axum::Router, body: &Value) -> (u16, Value) {
    call(app, "POST", "/v1/jobs", Some(&body.to_string())).await
}

fn id_of(body: &Value) -> JobId {
    body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no id in {body}"))
}

fn error_of(body: &Value) -> String {
    body["error"].as_str().unwrap_or_default().to_string()
}

/// A raw message body, as a producer without our code publishes it.
fn raw(body: &Value) -> (Option<String>, Vec<u8>) {
    (None, body.to_string().into_bytes())
}

fn raw_text(body: String) -> (Option<String>, Vec<u8>) {
    (None, body.into_bytes())
}

async fn row_count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count rows")
}

async fn sql(env: &TestEnv, statement: &'static str) {
    sqlx::query(statement)
        .execute(env.store.pool())
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// Dead jobs whose error contains every one of `needles`.
async fn dead_with_error(env: &TestEnv, needles: &[&str]) -> Vec<Job> {
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM apiary_jobs WHERE status = 'dead' ORDER BY created_at")
            .fetch_all(env.store.pool())
            .await
            .expect("dead ids");
    let mut out = Vec::new();
    for id in ids {
        if let Some(job) = env.job(id).await {
            let error = job.error.clone().unwrap_or_default();
            if needles.iter().all(|n| error.contains(n)) {
                out.push(job);
            }
        }
    }
    out
}

/// Waits until the dead-letter queue holds at least `n` letters, and returns them all.
async fn wait_for_letters(env: &TestEnv, n: usize) -> Vec<(Option<String>, Option<String>)> {
    let dead = env.names().dead;
    env.wait_until(&format!("{n} dead letters"), T, || {
        let dead = dead.clone();
        async move {
            let letters = peek_dead_letters(&dead).await;
            (letters.len() >= n).then_some(letters)
        }
    })
    .await
}

fn letter_for(
    letters: &[(Option<String>, Option<String>)],
    id: JobId,
) -> Option<(Option<String>, Option<String>)> {
    letters
        .iter()
        .find(|(job, _)| job.as_deref() == Some(id.to_string().as_str()))
        .cloned()
}

/// Waits until the job's row exists and returns it.
async fn wait_recorded(env: &TestEnv, id: JobId) -> Job {
    env.wait_until(&format!("job {id} to be recorded"), T, || async move {
        env.job(id).await
    })
    .await
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).expect("json").len()
}

/// Review item 1: "APIARY_MAX_PAYLOAD_BYTES=2048, POST /v1/jobs with an echo payload of a
/// 2,030-character string: 202 queued, and the job stays queued forever". One rule holds on
/// every path: a payload of at most the limit is accepted by the API and by the worker, and
/// keeps passing through retries and delay queues; one byte more is refused at the door, and a
/// raw message that large is recorded dead with its size.
#[tokio::test]
async fn one_size_rule_holds_from_the_api_through_retries_and_raw_messages() {
    const LIMIT: usize = 2048;
    let env = TestEnv::new().await;
    let app = api_with_limit(&env, LIMIT);
    let mut worker = env.spawn(&["worker"], &[("APIARY_MAX_PAYLOAD_BYTES", "2048")]);

    let exact = json!("x".repeat(2046));
    assert_eq!(json_len(&exact), LIMIT);
    let review = json!("y".repeat(2030));
    let mut echoes = Vec::new();
    for payload in [&exact, &review] {
        let (status, body) = post_job(&app, &json!({"kind": "echo", "payload": payload})).await;
        assert_eq!(status, 202, "{body}");
        echoes.push((id_of(&body), payload.clone()));
    }

    // One byte over: refused, naming the field, and nothing written.
    let before = row_count(&env).await;
    let over = json!("z".repeat(2047));
    assert_eq!(json_len(&over), LIMIT + 1);
    let (status, body) = post_job(&app, &json!({"kind": "echo", "payload": over})).await;
    assert!(status == 422 || status == 413, "{status}: {body}");
    assert!(error_of(&body).contains("payload"), "{body}");
    assert_eq!(
        row_count(&env).await,
        before,
        "a refused enqueue wrote a row"
    );

    // At the limit, through two retries: each republish (with run_at, through the delay
    // queues) carries the same payload and passes the same rule.
    let mut fail = json!({"times": 2, "pad": ""});
    let pad = LIMIT - json_len(&fail);
    fail["pad"] = json!("p".repeat(pad));
    assert_eq!(json_len(&fail), LIMIT);
    let (status, body) = post_job(&app, &json!({"kind": "fail", "payload": fail})).await;
    assert_eq!(status, 202, "{body}");
    let retried = id_of(&body);

    // Raw messages: a payload of exactly the limit runs; one byte more is recorded dead.
    let raw_ok = Uuid::now_v7();
    let raw_over = Uuid::now_v7();
    env.publish_raw(&[
        raw(&json!({"id": raw_ok, "kind": "echo", "payload": "r".repeat(2046)})),
        raw(&json!({"id": raw_over, "kind": "echo", "payload": "s".repeat(2047)})),
    ])
    .await;

    for (id, payload) in &echoes {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1);
        assert_eq!(job.result.as_ref(), Some(payload));
    }
    let job = env.wait_for_status(retried, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 3, "{job:#?}");
    assert_eq!(job.result, Some(json!({"attempts": 3})));
    assert_eq!(job.errors.as_array().map(Vec::len), Some(2), "{job:#?}");

    let job = env.wait_for_status(raw_ok, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 1);
    assert_eq!(job.result, Some(json!("r".repeat(2046))));
    let job = env.wait_for_status(raw_over, JobStatus::Dead, T).await;
    let error = job.error.clone().unwrap_or_default();
    assert!(error.contains("payload is 2049 bytes"), "{error}");
    assert_eq!(job.attempts, 0);
    let letters = wait_for_letters(&env, 1).await;
    assert!(letter_for(&letters, raw_over).is_some(), "{letters:?}");
    assert_eq!(letters.len(), 1, "{letters:?}");

    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
    env.assert_invariants_quiescent().await;
}

/// Review item 6: NUL and other text Postgres cannot store. Payloads with `\u0000` are `json`
/// now and run like any other; a raw burst holding three of them among twenty good ones runs
/// all twenty-three once each and nothing loops. A dedup key with NUL is refused (422 over
/// HTTP, a dead record naming the field for a raw message), and an error text with NUL is
/// stored with U+FFFD in its place while the worker keeps running.
#[tokio::test]
async fn nul_in_payloads_runs_and_nul_elsewhere_is_refused_or_replaced() {
    let env = TestEnv::new().await;
    let app = api(&env);
    let worker = env.start_worker();

    let mut bodies = Vec::new();
    let mut expected = Vec::new();
    for i in 0..23 {
        let id = Uuid::now_v7();
        if i % 8 == 3 {
            // Written as a producer's JSON text: the escape itself, not a Rust NUL.
            bodies.push(raw_text(format!(
                r#"{{"id":"{id}","kind":"echo","payload":{{"n":{i},"s":"a\u0000b"}}}}"#
            )));
            expected.push((id, json!({"n": i, "s": "a\0b"})));
        } else {
            let payload = json!({"n": i, "s": "plain"});
            bodies.push(raw(&json!({"id": id, "kind": "echo", "payload": payload})));
            expected.push((id, payload));
        }
    }
    assert_eq!(expected.iter().filter(|(_, p)| p["s"] == "a\0b").count(), 3);
    env.publish_raw(&bodies).await;
    for (id, payload) in &expected {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1, "{job:#?}");
        assert_eq!(&job.payload, payload);
        assert_eq!(
            job.result.as_ref(),
            Some(payload),
            "echo returns the payload"
        );
    }

    // Over HTTP too.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/jobs",
        Some(r#"{"kind":"echo","payload":"x\u0000y"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = env
        .wait_for_status(id_of(&body), JobStatus::Succeeded, T)
        .await;
    assert_eq!(job.result, Some(json!("x\0y")));

    // A dedup key is text: NUL is refused, over HTTP and on the wire.
    let before = row_count(&env).await;
    let (status, body) = call(
        &app,
        "POST",
        "/v1/jobs",
        Some(r#"{"kind":"echo","payload":1,"dedup_key":"k\u0000"}"#),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(error_of(&body).contains("dedup_key"), "{body}");
    assert_eq!(row_count(&env).await, before);
    let nul_key = Uuid::now_v7();
    env.publish_raw(&[raw_text(format!(
        r#"{{"id":"{nul_key}","kind":"echo","payload":1,"dedup_key":"k\u0000"}}"#
    ))])
    .await;
    let job = env.wait_for_status(nul_key, JobStatus::Dead, T).await;
    let error = job.error.clone().unwrap_or_default();
    assert!(
        error.contains("dedup_key") && error.contains("NUL"),
        "{error}"
    );

    // An error text with NUL is stored, the NUL replaced.
    let failing = env
        .enqueue(NewJob::new(
            "fail",
            json!({"permanent": true, "message": "a\0b"}),
        ))
        .await;
    let job = env.wait_for_status(failing, JobStatus::Dead, T).await;
    assert_eq!(job.error.as_deref(), Some("a\u{FFFD}b"), "{job:#?}");

    // The worker is still consuming and running jobs.
    assert_eq!(consumer_count(&env.cfg.queue).await, 1);
    let after = env.enqueue(NewJob::new("echo", json!("after"))).await;
    env.wait_for_status(after, JobStatus::Succeeded, T).await;
    let letters = wait_for_letters(&env, 2).await;
    assert!(letter_for(&letters, nul_key).is_some(), "{letters:?}");
    assert!(letter_for(&letters, failing).is_some(), "{letters:?}");

    worker.stop().await;
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0, "a message loops");
    env.assert_invariants_quiescent().await;
}

/// Review item 7: an oversized dead-letter reason. A permanent failure with a 300,000-character
/// message ends dead; its letter carries a reason header of at most 4096 bytes (a header that
/// large used to break the channel), the worker keeps its consumer and runs the next job, and
/// the stored error is at most 4096 bytes.
#[tokio::test]
async fn a_huge_failure_message_is_cut_in_the_letter_and_the_record() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let message = "m".repeat(300_000);
    let id = env
        .enqueue(NewJob::new(
            "fail",
            json!({"permanent": true, "message": message}),
        ))
        .await;
    let job = env.wait_for_status(id, JobStatus::Dead, T).await;
    let error = job.error.clone().unwrap_or_default();
    assert!(error.len() <= 4096, "stored error is {} bytes", error.len());
    assert!(
        error.starts_with("mmmm"),
        "{}",
        &error[..error.len().min(80)]
    );
    for entry in job.errors.as_array().expect("errors") {
        let e = entry["error"].as_str().unwrap_or_default();
        assert!(e.len() <= 4096, "history entry is {} bytes", e.len());
    }

    let letters = wait_for_letters(&env, 1).await;
    let (_, reason) = letter_for(&letters, id).unwrap_or_else(|| panic!("{letters:?}"));
    let reason = reason.expect("x-apiary-reason");
    assert!(
        reason.len() <= 4096,
        "reason header is {} bytes",
        reason.len()
    );
    assert!(reason.starts_with("mmmm"));

    assert_eq!(consumer_count(&env.cfg.queue).await, 1);
    let next = env.enqueue(NewJob::new("echo", json!("next"))).await;
    env.wait_for_status(next, JobStatus::Succeeded, T).await;

    worker.stop().await;
    env.assert_invariants_quiescent().await;
}

/// Items 6 and 18, and "a statement Postgres rejects because of one job's data is retried
/// without that job, and that job is recorded as poison with its reason", on the claim path:
/// two raw messages whose kind a CHECK refuses share claims with thirty good `tally` jobs. The
/// thirty run once each with exact tallies; the two are dead-lettered with Postgres's reason;
/// nothing loops.
#[tokio::test]
async fn refused_data_in_a_claim_batch_is_isolated_and_dead_lettered() {
    let env = TestEnv::new().await;
    sql(
        &env,
        "ALTER TABLE apiary_jobs ADD CONSTRAINT t_refuse_kind CHECK (kind <> 'refused.kind')",
    )
    .await;
    let mut bodies = Vec::new();
    let mut good = Vec::new();
    let mut refused = Vec::new();
    let mut sums = [0i64; 3];
    for i in 0..32usize {
        let id = Uuid::now_v7();
        if i == 7 || i == 23 {
            bodies.push(raw(
                &json!({"id": id, "kind": "refused.kind", "payload": {"i": i}}),
            ));
            refused.push(id);
        } else {
            let by = i as i64 + 1;
            sums[i % 3] += by;
            bodies.push(raw(&json!({
                "id": id, "kind": "tally", "payload": {"counter": format!("c{}", i % 3), "by": by}
            })));
            good.push(id);
        }
    }
    // One burst, published before the worker starts, so the claims share batches.
    env.publish_raw(&bodies).await;
    let mut cfg = env.cfg.clone();
    cfg.batch = 64;
    let worker = env.start_worker_with(cfg, apiary::Registry::builtins());

    for id in &good {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1, "{job:#?}");
    }
    for (i, sum) in sums.iter().enumerate() {
        assert_eq!(
            env.tally(&format!("c{i}")).await,
            Some(*sum),
            "counter c{i}"
        );
    }
    let letters = wait_for_letters(&env, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for id in &refused {
        let (_, reason) = letter_for(&letters, *id).unwrap_or_else(|| panic!("{letters:?}"));
        let reason = reason.unwrap_or_default();
        assert!(reason.contains("Postgres"), "{reason}");
        if let Some(job) = env.job(*id).await {
            assert_eq!(job.status(), JobStatus::Dead, "{job:#?}");
        }
    }

    worker.stop().await;
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0, "a message loops");
    env.assert_invariants_quiescent().await;
}

/// Items 6 and 18 on the finish path: twenty `echo` jobs and one whose result a CHECK refuses
/// finish together. The twenty succeed on their first attempt; the one ends dead, its error
/// saying its outcome could not be stored.
#[tokio::test]
async fn refused_data_in_a_finish_batch_is_isolated_and_recorded_dead() {
    let env = TestEnv::new().await;
    sql(
        &env,
        "ALTER TABLE apiary_jobs ADD CONSTRAINT t_refuse_result
             CHECK (result IS NULL OR result::text NOT LIKE '%refuse-result%')",
    )
    .await;
    let mut jobs: Vec<NewJob> = (0..20).map(|i| NewJob::new("echo", json!(i))).collect();
    jobs.insert(10, NewJob::new("echo", json!("refuse-result")));
    let enqueued = env.client().enqueue_many(jobs).await.expect("enqueue");
    let bad = enqueued[10].job.id;
    let mut cfg = env.cfg.clone();
    cfg.batch = 64;
    let worker = env.start_worker_with(cfg, apiary::Registry::builtins());

    for e in enqueued.iter().filter(|e| e.job.id != bad) {
        let job = env.wait_for_status(e.job.id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1, "{job:#?}");
        assert_eq!(job.result.as_ref(), Some(&e.job.payload));
    }
    let job = env.wait_for_status(bad, JobStatus::Dead, T).await;
    let error = job.error.clone().unwrap_or_default();
    assert!(error.contains("could not be stored"), "{error}");
    assert_eq!(job.result, None);
    let letters = wait_for_letters(&env, 1).await;
    assert!(letter_for(&letters, bad).is_some(), "{letters:?}");

    worker.stop().await;
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0, "a message loops");
    env.assert_invariants_quiescent().await;
}

/// Items 6 and 18 on the enqueue path: twenty concurrent single enqueues, batched together by
/// the client, one of them with a payload a CHECK refuses. Nineteen are created and run; the
/// one is refused to its caller alone, with nothing written; over HTTP the same is a 422.
#[tokio::test]
async fn refused_data_in_an_enqueue_batch_is_refused_to_its_caller_alone() {
    let env = TestEnv::new().await;
    sql(
        &env,
        "ALTER TABLE apiary_jobs ADD CONSTRAINT t_refuse_payload
             CHECK (payload::text NOT LIKE '%refuse-payload%')",
    )
    .await;
    let client = env.client();
    let jobs: Vec<NewJob> = (0..20)
        .map(|i| {
            let payload = if i == 13 {
                json!("refuse-payload")
            } else {
                json!(i)
            };
            NewJob::new("echo", payload).with_id(Uuid::now_v7())
        })
        .collect();
    let bad = jobs[13].id.expect("id");
    let answers =
        futures_util::future::join_all(jobs.iter().cloned().map(|j| client.enqueue(j))).await;
    let mut created = Vec::new();
    for (job, answer) in jobs.iter().zip(answers) {
        if job.id == Some(bad) {
            assert!(
                matches!(answer, Err(EnqueueError::Refused(_))),
                "{answer:?}"
            );
        } else {
            let e = answer.unwrap_or_else(|e| panic!("job {:?}: {e}", job.payload));
            assert!(e.created);
            created.push(e.job.id);
        }
    }
    assert_eq!(created.len(), 19);
    assert!(env.job(bad).await.is_none(), "a refused job was written");

    let (status, body) = post_job(
        &api(&env),
        &json!({"kind": "echo", "payload": "refuse-payload"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");

    let worker = env.start_worker();
    for id in created {
        let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1);
    }
    assert_eq!(row_count(&env).await, 19);

    worker.stop().await;
    env.assert_invariants_quiescent().await;
}

/// Review item 2: a detached (long) job whose retry publish fails. The job's message was acked
/// when it detached, so after it fails with RabbitMQ away, only the retry's outbox row carries
/// it on: once the broker is back, the relay publishes it and the job succeeds on attempt 2.
#[tokio::test]
async fn a_detached_job_that_fails_while_the_broker_is_away_is_retried() {
    let env = TestEnv::new().await;
    let mq = common::Proxy::start("127.0.0.1:5672").await;
    let amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", mq.port);
    let mut worker = env.spawn(
        &["worker"],
        &[("AMQP_URL", &amqp_url), ("APIARY_DETACH_AFTER", "500ms")],
    );
    let id = env
        .enqueue(NewJob::new("fail", json!({"times": 1, "ms": 3000})))
        .await;
    env.wait_until("the job to detach", T, || async {
        let detached: Option<bool> =
            sqlx::query_scalar("SELECT detached FROM apiary_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(env.store.pool())
                .await
                .expect("detached");
        (detached == Some(true)).then_some(())
    })
    .await;
    mq.cut();
    let job = env.wait_for_status(id, JobStatus::Retrying, T).await;
    assert_eq!(job.attempts, 1);
    mq.restore();
    let job = env
        .wait_for_status(id, JobStatus::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(job.attempts, 2, "{job:#?}");
    assert_eq!(job.result, Some(json!({"attempts": 2})));

    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
    env.assert_invariants_quiescent().await;
}

/// Review item 2, in the store: finishing a detached job with a retry leaves an outbox row for
/// it in the same statement, so the retry is published even if the worker dies right after.
#[tokio::test]
async fn finishing_a_detached_job_with_a_retry_queues_its_message_in_the_outbox() {
    let env = TestEnv::new().await;
    let id = Uuid::now_v7();
    let body = json!({"id": id, "kind": "fail", "payload": {"times": 1}}).to_string();
    let wire = WireJob::decode(body.as_bytes(), None, env.cfg.max_payload_bytes).expect("wire");
    let worker = Uuid::now_v7();
    let claims = env
        .store
        .claim_jobs(
            &[ClaimInput {
                job: &wire,
                budget: 3,
                recorded: false,
                prefix: &env.cfg.queue,
            }],
            worker,
            Duration::from_secs(30),
        )
        .await
        .expect("claim");
    assert!(
        matches!(claims.claims[..], [Claim::Claimed { attempt: 1, .. }]),
        "{:?}",
        claims.claims
    );
    assert!(env.store.detach_job(id, worker, 1).await.expect("detach"));
    let outbox = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM apiary_outbox WHERE job_id = $1")
            .bind(id)
            .fetch_one(env.store.pool())
            .await
            .expect("outbox")
    };
    assert_eq!(outbox().await, 0, "a raw claim queues no message");
    let done = env
        .store
        .finish_jobs(
            worker,
            &[Finish {
                id,
                attempt: 1,
                outcome: Outcome::Retry {
                    error: "failed while detached".into(),
                    at: chrono::Utc::now() + chrono::Duration::seconds(1),
                },
                detached: true,
            }],
        )
        .await
        .expect("finish");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, JobStatus::Retrying);
    assert_eq!(outbox().await, 1, "the retry has no outbox row");
    let job = env.job(id).await.expect("job");
    assert_eq!(job.status(), JobStatus::Retrying);
    assert!(job.next_attempt_at.is_some());
}

/// Review item 16: "a message whose id matches a recorded job but whose content differs
/// (another kind, a corrected message after a poison one) is never silently acked". A raw
/// `tally` message reusing an enqueued `echo` job's id does not run as it, or move the
/// counter: the echo job runs as itself, and the message is recorded apart, dead, with a
/// conflict reason naming the id, and dead-lettered.
#[tokio::test]
async fn a_message_reusing_a_jobs_id_for_other_content_is_recorded_as_a_conflict() {
    let env = TestEnv::new().await;
    let payload = json!({"echo": "mine"});
    let x = env.enqueue(NewJob::new("echo", payload.clone())).await;
    env.publish_raw(&[raw(
        &json!({"id": x, "kind": "tally", "payload": {"counter": "stolen"}}),
    )])
    .await;
    let worker = env.start_worker();

    let job = env.wait_for_status(x, JobStatus::Succeeded, T).await;
    assert_eq!(job.kind, "echo");
    assert_eq!(job.attempts, 1);
    assert_eq!(job.result, Some(payload));
    let x_text = x.to_string();
    let conflicts = env
        .wait_until("the conflict record", T, || async {
            let found = dead_with_error(&env, &["conflict", &x_text]).await;
            (!found.is_empty()).then_some(found)
        })
        .await;
    assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
    let conflict = &conflicts[0];
    assert_ne!(conflict.id, x);
    assert_eq!(conflict.kind, "tally");
    let letters = wait_for_letters(&env, 1).await;
    let (_, reason) = letter_for(&letters, conflict.id).unwrap_or_else(|| panic!("{letters:?}"));
    assert!(reason.unwrap_or_default().contains("conflict"));
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(env.tally("stolen").await, None, "the tally counter moved");

    worker.stop().await;
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0);
    env.assert_invariants_quiescent().await;
}

/// Review item 16, "a corrected message after a poison one": a poison message with id P, then a
/// valid message with the same id. The poison record stays as it was, and the corrected
/// message is not silently acked: it is recorded apart as dead with a conflict reason naming
/// P, and both have letters in the dead-letter queue.
#[tokio::test]
async fn a_corrected_message_after_a_poison_one_is_not_silently_acked() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let p = Uuid::now_v7();
    env.publish_raw(&[raw(&json!({"id": p, "kind": 5}))]).await;
    let poison = env.wait_for_status(p, JobStatus::Dead, T).await;
    assert!(poison.raw_body.is_some());
    env.publish_raw(&[raw(&json!({"id": p, "kind": "echo", "payload": 1}))])
        .await;

    let p_text = p.to_string();
    let conflicts = env
        .wait_until("the corrected message's record", T, || async {
            let found: Vec<Job> = dead_with_error(&env, &["conflict", &p_text])
                .await
                .into_iter()
                .filter(|j| j.id != p)
                .collect();
            (!found.is_empty()).then_some(found)
        })
        .await;
    assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
    let letters = wait_for_letters(&env, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letter_for(&letters, p).is_some(), "{letters:?}");
    assert!(
        letter_for(&letters, conflicts[0].id).is_some(),
        "{letters:?}"
    );
    let after = env.job(p).await.expect("poison record");
    assert_eq!(after.status(), JobStatus::Dead);
    assert_eq!(after.raw_body, poison.raw_body);
    assert_eq!(after.error, poison.error);

    worker.stop().await;
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0);
    env.assert_invariants_quiescent().await;
}

/// Review item 16: "an enqueue is never answered with a different job than the one asked
/// for". Over HTTP, an existing job's id with another payload or kind is a 409; with the same
/// kind, payload and dedup key it is a 200 with that job.
#[tokio::test]
async fn an_enqueue_with_a_taken_id_is_answered_with_that_job_only_if_it_is_the_same() {
    let env = TestEnv::new().await;
    let app = api(&env);
    let id = Uuid::now_v7();
    let original = json!({"id": id, "kind": "echo", "payload": {"v": 1}, "dedup_key": "k-16"});
    let (status, body) = post_job(&app, &original).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(id_of(&body), id);

    for other in [
        json!({"id": id, "kind": "echo", "payload": {"v": 2}, "dedup_key": "k-16"}),
        json!({"id": id, "kind": "tally", "payload": {"v": 1}, "dedup_key": "k-16"}),
        json!({"id": id, "kind": "echo", "payload": {"v": 1}}),
    ] {
        let (status, body) = post_job(&app, &other).await;
        assert_eq!(status, 409, "{other}: {body}");
    }
    let (status, body) = post_job(&app, &original).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(id_of(&body), id);
    assert_eq!(body["payload"], json!({"v": 1}));
    assert_eq!(row_count(&env).await, 1);

    let worker = env.start_worker();
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.result, Some(json!({"v": 1})));
    worker.stop().await;
    env.assert_invariants_quiescent().await;
}

/// Review item 13: "record_scheduled ignores per-kind and handler max_attempts". A raw
/// scheduled `fail` message, on a worker with `APIARY_KINDS=fail:max_attempts=2`, is recorded
/// while it waits with a budget of 2, and ends dead after 2 attempts.
#[tokio::test]
async fn a_raw_scheduled_job_gets_its_kinds_attempt_budget() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[("APIARY_KINDS", "fail:max_attempts=2")]);
    let id = Uuid::now_v7();
    let at = chrono::Utc::now() + chrono::Duration::seconds(2);
    env.publish_raw(&[raw(&json!({
        "id": id, "kind": "fail", "payload": {"times": 5}, "run_at": at.to_rfc3339()
    }))])
    .await;
    let waiting = wait_recorded(&env, id).await;
    assert_eq!(waiting.status(), JobStatus::Queued, "{waiting:#?}");
    assert_eq!(waiting.max_attempts, 2, "{waiting:#?}");
    assert_eq!(waiting.attempts, 0);

    let job = env.wait_for_status(id, JobStatus::Dead, T).await;
    assert_eq!(job.attempts, 2, "{job:#?}");
    assert_eq!(job.max_attempts, 2);

    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
    env.assert_invariants_quiescent().await;
}

/// Review item 18: a `run_at` more than a year ahead is refused: a 422 naming `run_at` over
/// HTTP, and a dead record whose reason names `run_at` for a raw message.
#[tokio::test]
async fn a_run_at_more_than_a_year_ahead_is_refused() {
    let env = TestEnv::new().await;
    let app = api(&env);
    let far = (chrono::Utc::now() + chrono::Duration::days(400)).to_rfc3339();
    let (status, body) =
        post_job(&app, &json!({"kind": "echo", "payload": 1, "run_at": far})).await;
    assert_eq!(status, 422, "{body}");
    assert!(error_of(&body).contains("run_at"), "{body}");
    assert_eq!(row_count(&env).await, 0);

    let worker = env.start_worker();
    let id = Uuid::now_v7();
    env.publish_raw(&[raw(
        &json!({"id": id, "kind": "echo", "payload": 1, "run_at": far}),
    )])
    .await;
    let job = env.wait_for_status(id, JobStatus::Dead, T).await;
    let error = job.error.clone().unwrap_or_default();
    assert!(error.contains("run_at"), "{error}");
    let letters = wait_for_letters(&env, 1).await;
    assert!(letter_for(&letters, id).is_some(), "{letters:?}");
    // Nothing waits in the delay queues for it.
    for q in env.names().all() {
        if !q.ends_with(".dead") {
            assert_eq!(env.queue_depth(&q).await, 0, "{q}");
        }
    }

    worker.stop().await;
    env.assert_invariants_quiescent().await;
}
