//! Completion webhooks, end to end against a real receiver: an HTTP server in the test that
//! records every request it gets. Each final job is POSTed once (more only with the same
//! delivery id), signed, with its record as `GET /v1/jobs/{id}` shows it; a failing, slow or
//! chatty receiver is retried without touching the job; a URL outside the allow-list is
//! refused at every way in.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiary::api::auth::Tokens;
use apiary::api::{AppState, router};
use apiary::config::{Config, KindOptions};
use apiary::webhook::{WebhookSecret, parse_hosts, parse_secret};
use apiary::{EnqueueError, JobId, JobStatus, NewJob, Registry, Shutdown};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use common::{TestEnv, call, peek_dead_letters};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "test-secret-0123456789";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    at: DateTime<Utc>,
}

impl Hit {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    fn delivery(&self) -> &str {
        self.header("x-apiary-delivery")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// The id of the job the body reports on.
    fn job_id(&self) -> Option<JobId> {
        self.json()["id"].as_str().and_then(|s| s.parse().ok())
    }

    fn signed_by(&self, secret: &WebhookSecret) -> bool {
        let ts: i64 = self.header("x-apiary-timestamp").parse().unwrap_or(0);
        (Utc::now().timestamp() - ts).abs() < 300
            && secret.verify(ts, &self.body, self.header("x-apiary-signature"))
    }
}

type Hits = Arc<Mutex<Vec<Hit>>>;

/// The test's webhook receiver, on 127.0.0.1 and a free port. `/{mode}` decides the answer,
/// counting earlier requests of the same delivery.
struct Receiver {
    addr: SocketAddr,
    hits: Hits,
}

impl Receiver {
    async fn start() -> Receiver {
        let hits: Hits = Arc::default();
        let app = axum::Router::new()
            .route("/{mode}", axum::routing::post(receive))
            .with_state(hits.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, hits }
    }

    fn url(&self, mode: &str) -> String {
        format!("http://{}/{mode}", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }

    fn hits_for(&self, id: JobId) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.job_id() == Some(id))
            .collect()
    }
}

async fn receive(
    State(hits): State<Hits>,
    Path(mode): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let hit = Hit {
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body.to_vec(),
        at: Utc::now(),
    };
    let nth = {
        let mut all = hits.lock().expect("hits");
        all.push(hit.clone());
        all.iter()
            .filter(|h| h.delivery() == hit.delivery())
            .count()
    };
    let answer = |code: u16, body: Body| {
        Response::builder()
            .status(code)
            .body(body)
            .expect("response")
    };
    match mode.as_str() {
        "fail3" if nth <= 3 => answer(500, Body::from("down for now")),
        "gone" => answer(410, Body::from("no such hook")),
        "busy" if nth == 1 => Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "1")
            .body(Body::empty())
            .expect("response"),
        "slow" if nth == 1 => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            answer(200, Body::empty())
        }
        "slowall" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            answer(200, Body::empty())
        }
        // 256 MiB of answer, streamed: a deliverer that read it all would hold it all.
        "huge" if nth == 1 => {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::iter(
                std::iter::repeat_n(chunk, 4096).map(Ok::<_, std::convert::Infallible>),
            );
            answer(500, Body::from_stream(stream))
        }
        _ => answer(200, Body::from("ok")),
    }
}

/// The world's configuration with webhooks on for the receiver, and deliveries retried fast.
fn webhook_cfg(env: &TestEnv, rx: &Receiver) -> Config {
    let mut cfg = env.cfg.clone();
    cfg.webhook_hosts = parse_hosts(&rx.addr.to_string()).expect("hosts");
    cfg.webhook_secret = Some(parse_secret(SECRET).expect("secret"));
    cfg.kinds.0.insert(
        "apiary.webhook".into(),
        KindOptions {
            retry_base: Some(Duration::from_millis(100)),
            retry_cap: Some(Duration::from_millis(500)),
            ..KindOptions::default()
        },
    );
    cfg
}

/// The delivery jobs (kind `apiary.webhook`) recorded for `id`.
async fn deliveries_of(env: &TestEnv, id: JobId) -> Vec<apiary::Job> {
    let ids: Vec<JobId> = sqlx::query_scalar(
        "SELECT id FROM apiary_jobs WHERE kind = 'apiary.webhook' AND payload->>'id' = $1::text",
    )
    .bind(id)
    .fetch_all(env.store.pool())
    .await
    .expect("deliveries");
    env.store.get_jobs(&ids).await.expect("jobs")
}

/// Waits until `id`'s one delivery job reaches `status`, and returns it.
async fn wait_delivery(env: &TestEnv, id: JobId, status: JobStatus) -> apiary::Job {
    env.wait_until(
        &format!("the delivery of {id} {status}"),
        T,
        || async move {
            let d = deliveries_of(env, id).await;
            match d.as_slice() {
                [one] if one.status() == status => Some(one.clone()),
                _ => None,
            }
        },
    )
    .await
}

#[tokio::test]
async fn every_final_job_is_posted_once_signed_with_its_record() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let mut cfg = webhook_cfg(&env, &rx);
    cfg.webhook_max_bytes = 4096;
    // Kind-level: every `sleep` job calls back unless it says otherwise.
    cfg.kinds.0.insert(
        "sleep".into(),
        KindOptions {
            callback_url: Some(rx.url("ok")),
            ..KindOptions::default()
        },
    );
    let client = apiary::Client::new(&cfg).expect("client");
    let enqueue = |job: NewJob| {
        let client = client.clone();
        async move { client.enqueue(job).await.expect("enqueue").job.id }
    };
    let ok = rx.url("ok");
    let succeeded = enqueue(NewJob::new("echo", json!({"n": 1})).with_callback_url(&ok)).await;
    let dead =
        enqueue(NewJob::new("fail", json!({"permanent": true})).with_callback_url(&ok)).await;
    let later = enqueue(
        NewJob::new("echo", json!({"n": 2}))
            .with_callback_url(&ok)
            .with_run_at(Utc::now() + chrono::Duration::hours(1)),
    )
    .await;
    let by_kind = enqueue(NewJob::new("sleep", json!({"ms": 1}))).await;
    let plain = enqueue(NewJob::new("echo", json!({"n": 3}))).await;
    let big =
        enqueue(NewJob::new("echo", json!({"blob": "b".repeat(8192)})).with_callback_url(&ok))
            .await;
    env.store.cancel_job(later).await.expect("cancel");
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());

    let secret = parse_secret(SECRET).expect("secret");
    for (id, status) in [
        (succeeded, JobStatus::Succeeded),
        (dead, JobStatus::Dead),
        (later, JobStatus::Cancelled),
        (by_kind, JobStatus::Succeeded),
        (big, JobStatus::Succeeded),
    ] {
        let delivery = wait_delivery(&env, id, JobStatus::Succeeded).await;
        let job = env.job(id).await.expect("job");
        assert_eq!(job.status(), status);
        assert_eq!(
            job.callback_url.as_deref(),
            Some(ok.as_str()),
            "shown on the job"
        );
        let hits = rx.hits_for(id);
        assert_eq!(hits.len(), 1, "{id} posted once: {hits:?}");
        let hit = &hits[0];
        assert!(
            hit.signed_by(&secret),
            "a valid signature: {:?}",
            hit.headers
        );
        assert_eq!(hit.delivery(), delivery.id.to_string());
        assert_eq!(hit.header("x-apiary-event"), format!("job.{status}"));
        assert_eq!(hit.header("x-apiary-attempt"), "1");
        assert_eq!(hit.header("content-type"), "application/json");
        assert!(hit.header("user-agent").starts_with("apiary/"));
        let record = serde_json::to_value(&job).expect("json");
        if id == big {
            assert_eq!(hit.header("x-apiary-truncated"), "payload,result");
            let body = hit.json();
            assert_eq!(body["payload"], Value::Null);
            assert_eq!(body["result"], Value::Null);
            assert_eq!(body["status"], "succeeded");
            assert!(hit.body.len() <= 4096);
        } else {
            assert_eq!(hit.json(), record, "the body is the job's record");
            assert!(!hit.headers.contains_key("x-apiary-truncated"));
        }
    }
    assert!(
        deliveries_of(&env, plain).await.is_empty(),
        "a plain job delivers nothing"
    );
    assert_eq!(
        env.job(plain).await.expect("job").callback_url,
        None,
        "and carries no callback_url"
    );
    // A delivery's own end delivers nothing: the receiver saw exactly the five jobs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.hits().len(), 5, "{:?}", rx.hits());
    worker.stop().await;
    env.assert_invariants().await;
}

#[tokio::test]
async fn a_failing_receiver_is_retried_under_one_delivery_id_without_touching_the_job() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let cfg = webhook_cfg(&env, &rx);
    let client = apiary::Client::new(&cfg).expect("client");
    let job =
        |mode: &str| NewJob::new("echo", json!({"mode": mode})).with_callback_url(rx.url(mode));
    let flaky = client.enqueue(job("fail3")).await.expect("enqueue").job.id;
    let gone = client.enqueue(job("gone")).await.expect("enqueue").job.id;
    let busy = client.enqueue(job("busy")).await.expect("enqueue").job.id;
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());

    let delivery = wait_delivery(&env, flaky, JobStatus::Succeeded).await;
    let hits = rx.hits_for(flaky);
    assert_eq!(hits.len(), 4, "three 500s, then delivered: {hits:?}");
    assert!(hits.iter().all(|h| h.delivery() == delivery.id.to_string()));
    let attempts: Vec<&str> = hits.iter().map(|h| h.header("x-apiary-attempt")).collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    assert_eq!(delivery.attempts, 4);
    assert!(
        delivery.errors[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("500") && e.contains("down for now"))
    );
    // The job finished before its receiver heard anything, and stays as it finished.
    let flaky_job = env.job(flaky).await.expect("job");
    assert_eq!(flaky_job.status(), JobStatus::Succeeded);
    assert!(flaky_job.finished_at.expect("finished") <= hits[0].at);

    // Any other 4xx is final: the delivery is dead with the status; the job is untouched.
    let dead = wait_delivery(&env, gone, JobStatus::Dead).await;
    assert_eq!(dead.attempts, 1);
    let error = dead.error.expect("error");
    assert!(
        error.contains("410") && error.contains("no such hook"),
        "{error}"
    );
    assert_eq!(rx.hits_for(gone).len(), 1);
    assert_eq!(
        env.job(gone).await.expect("job").status(),
        JobStatus::Succeeded
    );

    // 429 with Retry-After waits what the receiver asked.
    wait_delivery(&env, busy, JobStatus::Succeeded).await;
    let hits = rx.hits_for(busy);
    assert_eq!(hits.len(), 2);
    assert!(hits[1].at - hits[0].at >= chrono::Duration::milliseconds(900));
    worker.stop().await;
    env.assert_invariants().await;
}

#[tokio::test]
async fn a_slow_receiver_times_out_and_a_huge_answer_is_not_read() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let mut cfg = webhook_cfg(&env, &rx);
    cfg.webhook_timeout = Duration::from_millis(500);
    let client = apiary::Client::new(&cfg).expect("client");
    let slow = client
        .enqueue(NewJob::new("echo", json!(1)).with_callback_url(rx.url("slow")))
        .await
        .expect("enqueue")
        .job
        .id;
    let huge = client
        .enqueue(NewJob::new("echo", json!(2)).with_callback_url(rx.url("huge")))
        .await
        .expect("enqueue")
        .job
        .id;
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());

    let d = wait_delivery(&env, slow, JobStatus::Succeeded).await;
    assert_eq!(d.attempts, 2);
    let first = d.errors[0]["error"].as_str().unwrap_or("").to_string();
    assert!(first.contains("timed out"), "{first}");
    assert_eq!(rx.hits_for(slow).len(), 2);

    let d = wait_delivery(&env, huge, JobStatus::Succeeded).await;
    assert_eq!(d.attempts, 2);
    let first = d.errors[0]["error"].as_str().unwrap_or("").to_string();
    assert!(first.contains("500"), "{first}");
    assert!(
        first.len() <= apiary::handler::MAX_ANSWER_BYTES + 100,
        "at most a few KiB of the answer kept: {} bytes",
        first.len()
    );
    worker.stop().await;
    env.assert_invariants().await;
}

#[tokio::test]
async fn a_url_the_policy_refuses_is_422_everywhere_and_a_raw_one_is_dead_lettered() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let cfg = webhook_cfg(&env, &rx);
    let over_long = format!("{}?{}", rx.url("ok"), "a".repeat(2048));
    let bad = [
        (
            "http://10.0.0.1/hook".to_string(),
            "not in APIARY_WEBHOOK_HOSTS",
        ),
        (
            format!("http://localhost:{}/ok", rx.addr.port()),
            "not in APIARY_WEBHOOK_HOSTS",
        ),
        (format!("ftp://{}/ok", rx.addr), "scheme"),
        (format!("http://user:pw@{}/ok", rx.addr), "password"),
        (over_long, "limit is 2048"),
        ("not a url".to_string(), "not a URL"),
    ];
    let app = |cfg: &Config| {
        router(AppState::new(
            apiary::Client::new(cfg).expect("client"),
            Shutdown::new(),
            cfg.max_payload_bytes,
            Tokens::default(),
        ))
    };
    let api = app(&cfg);
    let client = apiary::Client::new(&cfg).expect("client");
    for (url, why) in &bad {
        let body = json!({"kind": "echo", "callback_url": url}).to_string();
        let (status, answer) = call(&api, "POST", "/v1/jobs", Some(&body)).await;
        assert_eq!(status, 422, "{url}: {answer}");
        let text = answer["error"].as_str().unwrap_or("");
        assert!(
            text.contains("callback_url") && text.contains(why),
            "{url}: {text}"
        );
        match client
            .enqueue(NewJob::new("echo", json!(null)).with_callback_url(url))
            .await
        {
            Err(EnqueueError::Invalid(e)) => {
                assert_eq!(e.field, "callback_url");
                assert!(e.reason.contains(why), "{e}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    // Webhooks off (no allow-list), or no secret to sign with: refused, saying what to set.
    let mut off = cfg.clone();
    off.webhook_hosts = Default::default();
    let mut unsigned = cfg.clone();
    unsigned.webhook_secret = None;
    for (c, why) in [
        (&off, "APIARY_WEBHOOK_HOSTS"),
        (&unsigned, "APIARY_WEBHOOK_SECRET"),
    ] {
        let body = json!({"kind": "echo", "callback_url": rx.url("ok")}).to_string();
        let (status, answer) = call(&app(c), "POST", "/v1/jobs", Some(&body)).await;
        assert_eq!(status, 422, "{answer}");
        assert!(
            answer["error"].as_str().unwrap_or("").contains(why),
            "{answer}"
        );
    }
    // A kind's callback_url outside the list is a configuration error.
    let mut kinds = cfg.clone();
    kinds.kinds.0.insert(
        "echo".into(),
        KindOptions {
            callback_url: Some("https://elsewhere.test/".into()),
            ..KindOptions::default()
        },
    );
    let e = kinds.validate().expect_err("refused");
    assert!(
        e.to_string().contains("APIARY_KINDS: echo callback_url"),
        "{e}"
    );
    // The CLI: exit code 6, naming the field.
    let out = env
        .run(&["enqueue", "echo", "--callback-url", "ftp://x.test/"])
        .await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("callback_url"));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(count, 0, "nothing refused was recorded");

    // Raw messages: a refused URL dead-letters the message with the reason; an allowed one
    // is recorded with it and delivered.
    let refused = uuid::Uuid::now_v7();
    let allowed = uuid::Uuid::now_v7();
    let raw = |id: uuid::Uuid, url: &str| {
        (
            None,
            json!({"id": id, "kind": "echo", "payload": 1, "callback_url": url})
                .to_string()
                .into_bytes(),
        )
    };
    env.publish_raw(&[
        raw(refused, "http://169.254.169.254/latest"),
        raw(allowed, &rx.url("ok")),
    ])
    .await;
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());
    let job = env.wait_for_status(refused, JobStatus::Dead, T).await;
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("callback_url") && error.contains("APIARY_WEBHOOK_HOSTS"),
        "{error}"
    );
    assert_eq!(job.callback_url, None, "a refused URL is not kept");
    let dead_queue = env.names().dead;
    let letters = env
        .wait_until("the dead letter", T, || {
            let q = dead_queue.clone();
            async move {
                let l = peek_dead_letters(&q).await;
                (!l.is_empty()).then_some(l)
            }
        })
        .await;
    assert!(
        letters.iter().any(|(_, reason)| reason
            .as_deref()
            .is_some_and(|r| r.contains("callback_url"))),
        "{letters:?}"
    );
    wait_delivery(&env, allowed, JobStatus::Succeeded).await;
    assert_eq!(rx.hits_for(allowed).len(), 1);
    worker.stop().await;
    env.assert_invariants().await;
}

#[tokio::test]
async fn workers_killed_around_deliveries_deliver_every_job_under_one_id_each() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let cfg = webhook_cfg(&env, &rx);
    let client = apiary::Client::new(&cfg).expect("client");
    let mut ids = Vec::new();
    for n in 0..30 {
        let job = NewJob::new("echo", json!({"n": n})).with_callback_url(rx.url("slowall"));
        ids.push(client.enqueue(job).await.expect("enqueue").job.id);
    }
    let hosts = rx.addr.to_string();
    let vars = [
        ("APIARY_WEBHOOK_HOSTS", hosts.as_str()),
        ("APIARY_WEBHOOK_SECRET", SECRET),
        (
            "APIARY_KINDS",
            "apiary.webhook:retry_base=100ms,retry_cap=500ms",
        ),
        ("APIARY_CONCURRENCY", "4"),
    ];
    for round in 0..2 {
        let mut w = env.spawn(&["worker"], &vars);
        let seen = rx.hits().len();
        // Killed while receivers are being called: some requests are in flight.
        env.wait_until("deliveries in flight", T, || async {
            (rx.hits().len() >= seen + 4).then_some(())
        })
        .await;
        w.signal("KILL");
        w.wait(T).await;
        eprintln!("round {round}: killed after {} requests", rx.hits().len());
    }
    let mut w = env.spawn(&["worker"], &vars);
    for id in &ids {
        wait_delivery(&env, *id, JobStatus::Succeeded).await;
    }
    let mut repeated = 0;
    for id in &ids {
        let hits = rx.hits_for(*id);
        assert!(!hits.is_empty(), "{id} delivered");
        let first = hits[0].delivery().to_string();
        assert!(
            hits.iter().all(|h| h.delivery() == first),
            "{id}: one delivery id: {hits:?}"
        );
        let secret = parse_secret(SECRET).expect("secret");
        assert!(hits.iter().all(|h| h.signed_by(&secret)));
        repeated += hits.len() - 1;
    }
    eprintln!(
        "{} requests for {} jobs ({repeated} repeated after a kill)",
        rx.hits().len(),
        ids.len()
    );
    w.signal("TERM");
    w.wait(T).await;
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn a_replayed_job_that_finishes_again_is_delivered_again_under_a_new_id() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let cfg = webhook_cfg(&env, &rx);
    let client = apiary::Client::new(&cfg).expect("client");
    let id = client
        .enqueue(NewJob::new("fail", json!({"permanent": true})).with_callback_url(rx.url("ok")))
        .await
        .expect("enqueue")
        .job
        .id;
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());
    wait_delivery(&env, id, JobStatus::Succeeded).await;
    let out = env.run(&["dead", "replay", "--id", &id.to_string()]).await;
    assert!(out.status.success(), "{out:?}");
    env.wait_until("a second delivery", T, || async {
        let d = deliveries_of(&env, id).await;
        (d.len() == 2 && d.iter().all(|j| j.status() == JobStatus::Succeeded)).then_some(())
    })
    .await;
    let hits = rx.hits_for(id);
    assert_eq!(hits.len(), 2);
    assert_ne!(hits[0].delivery(), hits[1].delivery());
    worker.stop().await;
    env.assert_invariants().await;
}

#[tokio::test]
async fn a_batch_with_a_callback_url_is_posted_once_when_its_last_child_ends() {
    let env = TestEnv::new().await;
    let rx = Receiver::start().await;
    let cfg = webhook_cfg(&env, &rx);
    let client = apiary::Client::new(&cfg).expect("client");
    let ok = rx.url("ok");
    let children = |fail: bool| {
        let mut jobs: Vec<NewJob> = (0..20)
            .map(|n| NewJob::new("echo", json!({"n": n})))
            .collect();
        if fail {
            jobs.push(NewJob::new("fail", json!({"permanent": true})));
        }
        jobs
    };
    let on_complete = || apiary::client::OnComplete::new("echo", json!({"done": true}));
    let completed = client
        .enqueue_batch(
            children(true),
            on_complete(),
            apiary::client::BatchOptions::default().with_callback_url(&ok),
        )
        .await
        .expect("batch")
        .id;
    // With on_success and a dead child there is no callback job, but the batch still ends.
    let failed = client
        .enqueue_batch(
            children(true),
            on_complete(),
            apiary::client::BatchOptions {
                on_success: true,
                callback_url: Some(ok.clone()),
            },
        )
        .await
        .expect("batch")
        .id;
    let refused = client
        .enqueue_batch(
            children(false),
            on_complete(),
            apiary::client::BatchOptions::default().with_callback_url("http://elsewhere.test/x"),
        )
        .await;
    assert!(
        matches!(&refused, Err(apiary::EnqueueError::Invalid(e)) if e.field == "callback_url"),
        "{refused:?}"
    );

    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());
    let secret = parse_secret(SECRET).expect("secret");
    for (id, status) in [(completed, "completed"), (failed, "failed")] {
        wait_delivery(&env, id, JobStatus::Succeeded).await;
        let hits = rx.hits_for(id);
        assert_eq!(hits.len(), 1, "batch {id} posted once: {hits:?}");
        let hit = &hits[0];
        assert!(hit.signed_by(&secret), "signed: {:?}", hit.headers);
        assert_eq!(hit.header("x-apiary-event"), format!("batch.{status}"));
        let mut body = hit.json();
        let batch = client.batch(id).await.expect("read").expect("batch");
        let mut now = serde_json::to_value(&batch).expect("json");
        // The record is read when the delivery runs; the callback job may have moved on since.
        body["callback_status"] = Value::Null;
        now["callback_status"] = Value::Null;
        assert_eq!(body, now, "the batch's record");
        assert_eq!(body["status"], status);
        assert_eq!(body["total"], 21);
        assert_eq!(body["counts"]["succeeded"], 20);
        assert_eq!(body["counts"]["dead"], 1);
        assert_eq!(body["callback_url"], ok.as_str());
    }
    // Children carry no callback_url of their own: only the two batches were posted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.hits().len(), 2, "{:?}", rx.hits());
    worker.stop().await;
    env.assert_invariants().await;
}
