//! Named queues and priorities, against real `apiary` processes, Postgres and RabbitMQ: a
//! worker runs only the queues it is given, a slow queue never takes a fast one's slots, a
//! high priority overtakes a backlog, a job's queue and priority come from its producer, its
//! kind or its AMQP property, an old work queue without priorities still works, a message in
//! the wrong queue is dead-lettered, and every republish goes by the job's recorded queue and
//! deployment, never by the worker that happens to send it.

mod common;

use std::time::Duration;

use apiary::broker::{self, QueueNames, topology};
use apiary::config::{QueueSettings, parse_kinds};
use apiary::{JobId, JobStatus, NewJob, Registry};
use common::{AMQP, TestEnv, passive_declare, peek_dead_letters, strip_ansi};
use lapin::Connection;
use lapin::options::{QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

/// Publishes one raw body to `queue`, with the AMQP `priority` property if given.
async fn publish_raw_with_priority(queue: &str, body: &[u8], priority: Option<u8>) {
    common::publish_raw_props(queue, &[(None, body.to_vec())], priority).await
}

/// Runs `f` on a fresh channel and closes the connection.
async fn on_channel<F, Fut, R>(f: F) -> R
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: Future<Output = R>,
{
    let conn = Connection::connect(AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let r = f(ch).await;
    let _ = conn.close(200, "".into()).await;
    r
}

/// Ready messages in a broker queue.
async fn depth(queue: &str) -> u32 {
    passive_declare(queue).await.message_count()
}

/// Messages waiting in `names`' delay tiers.
async fn delayed(names: &QueueNames) -> u32 {
    let names = names.clone();
    on_channel(|ch| async move { topology::depths(&ch, &names).await.expect("depths").delayed })
        .await
}

/// A job as the API shows it.
async fn api_job(base: &str, id: JobId) -> Value {
    let (status, body) = common::http_get(&format!("{base}/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// Deletes a second deployment's broker queues when the test ends, even if it fails.
struct Queues(QueueNames);

impl Drop for Queues {
    fn drop(&mut self) {
        common::remove_queues(&self.0);
    }
}

#[tokio::test]
async fn a_worker_consumes_only_its_queues() {
    let env = TestEnv::with_queues(&[("default", 4), ("emails", 4), ("reports", 2)]).await;
    let (mut api, base) = env.spawn_api(&[]).await;
    let client = env.client();
    let by_client = |q: Option<&str>, i: i32| {
        let job = NewJob::new("echo", json!({"n": i}));
        match q {
            Some(q) => job.with_queue(q),
            None => job,
        }
    };
    let mut default = Vec::new();
    let mut emails = Vec::new();
    let mut reports = Vec::new();
    for i in 0..2 {
        default.push(env.enqueue(by_client(None, i)).await);
        emails.push(env.enqueue(by_client(Some("emails"), i)).await);
        reports.push(env.enqueue(by_client(Some("reports"), i)).await);
    }
    default.push(
        client
            .enqueue(by_client(Some("default"), 9))
            .await
            .expect("enqueue")
            .job
            .id,
    );
    // The CLI.
    let out = env
        .run(&["enqueue", "echo", r#"{"cli": 1}"#, "--queue", "emails"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    emails.push(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a job id on stdout"),
    );
    // The HTTP API.
    let http = reqwest::Client::new();
    for q in ["emails", "reports"] {
        let resp = http
            .post(format!("{base}/v1/jobs"))
            .json(&json!({"kind": "echo", "payload": {"http": q}, "queue": q}))
            .send()
            .await
            .expect("POST /v1/jobs");
        assert_eq!(resp.status().as_u16(), 202);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["queue"], q, "{body}");
        let id: JobId = body["id"].as_str().expect("id").parse().expect("uuid");
        if q == "emails" {
            emails.push(id);
        } else {
            reports.push(id);
        }
    }

    // A worker of `emails` only runs the emails jobs...
    let mut only_emails = env.spawn(&["worker"], &[("APIARY_QUEUES", "emails:4")]);
    for id in &emails {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.queue, "emails");
        assert_eq!(api_job(&base, *id).await["queue"], "emails");
    }
    only_emails.signal("TERM");
    assert!(only_emails.wait(T).await.success());
    // ... and never touched the others: still queued, uncharged, their messages waiting.
    for (queue, ids) in [("default", &default), ("reports", &reports)] {
        for id in ids {
            let job = env.job(*id).await.expect("job");
            assert_eq!(job.status(), JobStatus::Queued, "{job:#?}");
            assert_eq!(job.attempts, 0, "{job:#?}");
            assert_eq!(job.queue, queue);
            assert_eq!(api_job(&base, *id).await["queue"], queue);
        }
        assert_eq!(depth(&env.names_of(queue).work).await as usize, ids.len());
    }

    // A second worker of the other two runs the rest, each job in its own queue.
    let mut the_rest = env.spawn(&["worker"], &[("APIARY_QUEUES", "default:4,reports:2")]);
    for (queue, ids) in [("default", &default), ("reports", &reports)] {
        for id in ids {
            let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
            assert_eq!(job.attempts, 1);
            assert_eq!(job.queue, queue);
            assert_eq!(api_job(&base, *id).await["queue"], queue);
        }
    }
    the_rest.signal("TERM");
    assert!(the_rest.wait(T).await.success());
    api.signal("TERM");
    assert!(api.wait(T).await.success());
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn a_slow_queue_does_not_delay_a_fast_one() {
    let env = TestEnv::with_queues(&[("default", 8), ("reports", 2)]).await;
    let mut worker = env.spawn(&["worker"], &[("APIARY_QUEUES", "default:8,reports:2")]);
    // The slow queue's backlog is enqueued first: every job ahead of the fast ones.
    let slow: Vec<NewJob> = (0..10)
        .map(|_| NewJob::new("sleep", json!({"ms": 3000})).with_queue("reports"))
        .collect();
    let slow: Vec<JobId> = env.enqueue_all(slow).await;
    let fast: Vec<NewJob> = (0..50).map(|i| NewJob::new("echo", json!(i))).collect();
    let fast: Vec<JobId> = env.enqueue_all(fast).await;
    let mut last_fast = None;
    for id in &fast {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        let done = job.finished_at.expect("finished_at");
        last_fast = last_fast.max(Some(done));
    }
    let last_fast = last_fast.expect("fast jobs");
    // The third slow job can start only once one of the first two has slept its 3 s: every
    // fast job finished before then, whatever the machine's speed, since the reports lane's
    // two slots are its own.
    let third_started = env
        .wait_until("a third reports job to start", T, || async {
            let started: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
                "SELECT started_at FROM apiary_jobs
                  WHERE id = ANY($1) AND started_at IS NOT NULL ORDER BY started_at",
            )
            .bind(&slow)
            .fetch_all(env.store.pool())
            .await
            .expect("started_at");
            started.get(2).copied()
        })
        .await;
    assert!(
        last_fast < third_started,
        "the last fast job finished at {last_fast}, after the third slow job started at {third_started}"
    );
    worker.signal("KILL");
    let _ = worker.wait(T).await;
}

#[tokio::test]
async fn a_high_priority_job_overtakes_a_backlog() {
    let env = TestEnv::new().await;
    let client = env.client();
    let mut backlog: Vec<JobId> = Vec::with_capacity(2000);
    for chunk in 0..4 {
        let jobs: Vec<NewJob> = (0..500)
            .map(|i| NewJob::new("echo", json!({"n": chunk * 500 + i})).with_priority(0))
            .collect();
        backlog.extend(
            client
                .enqueue_many(jobs)
                .await
                .expect("enqueue")
                .into_iter()
                .map(|e| e.job.id),
        );
    }
    let urgent = env
        .enqueue(NewJob::new("echo", json!("urgent")).with_priority(9))
        .await;
    assert_eq!(depth(&env.cfg.queue).await, 2001);

    let mut worker = env.spawn(
        &["worker"],
        &[("APIARY_QUEUES", "default:2"), ("APIARY_PREFETCH", "4")],
    );
    let urgent_job = env.wait_for_status(urgent, JobStatus::Succeeded, T).await;
    assert_eq!(urgent_job.priority, 9);
    env.wait_until("the backlog to finish", T, || async {
        (env.count(JobStatus::Succeeded).await == 2001).then_some(())
    })
    .await;
    let urgent_started = urgent_job.started_at.expect("started_at");
    let later: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apiary_jobs WHERE id = ANY($1) AND started_at > $2",
    )
    .bind(&backlog)
    .bind(urgent_started)
    .fetch_one(env.store.pool())
    .await
    .expect("count");
    // RabbitMQ orders what is still in the queue; the few messages the consumer already
    // holds when the urgent one is published (up to the prefetch of 4, and at the consumer's
    // start, whatever the broker had handed over before it looked at priorities) may go
    // first. So not "first", but ahead of nearly all of the 2,000.
    assert!(
        later >= 1900,
        "the priority-9 job started before only {later} of the 2000 backlog jobs"
    );
    worker.signal("TERM");
    assert!(worker.wait(T).await.success());
}

#[tokio::test]
async fn priority_comes_from_the_kind_and_the_amqp_property() {
    let env = TestEnv::with_queues(&[("default", 2), ("emails", 2)]).await;
    let kinds = "echo:priority=7,queue=emails";
    let mut cfg = env.cfg.clone();
    cfg.kinds = parse_kinds(kinds).expect("APIARY_KINDS");
    let client = apiary::Client::new(&cfg).expect("client");

    // The kind's settings, for a job that names neither.
    let by_kind = client
        .enqueue(NewJob::new("echo", json!("by kind")))
        .await
        .expect("enqueue")
        .job;
    assert_eq!(by_kind.queue, "emails");
    assert_eq!(by_kind.priority, 7);
    assert_eq!(depth(&env.names_of("emails").work).await, 1);
    assert_eq!(depth(&env.cfg.queue).await, 0);

    // A raw message: the AMQP priority property, with no priority in the body, is what the
    // broker ordered it by and what is recorded, over the kind's.
    let raw = Uuid::new_v4();
    publish_raw_with_priority(
        &env.names_of("emails").work,
        format!(r#"{{"id":"{raw}","kind":"echo","payload":"raw"}}"#).as_bytes(),
        Some(5),
    )
    .await;
    // And one with no priority anywhere: the kind's, as an enqueue would have given it.
    let plain = Uuid::new_v4();
    publish_raw_with_priority(
        &env.names_of("emails").work,
        format!(r#"{{"id":"{plain}","kind":"echo","payload":"plain"}}"#).as_bytes(),
        None,
    )
    .await;
    let mut worker = env.spawn(
        &["worker"],
        &[("APIARY_QUEUES", "emails:2"), ("APIARY_KINDS", kinds)],
    );
    let job = env
        .wait_for_status(by_kind.id, JobStatus::Succeeded, T)
        .await;
    assert_eq!((job.queue.as_str(), job.priority), ("emails", 7));
    let job = env.wait_for_status(raw, JobStatus::Succeeded, T).await;
    assert_eq!((job.queue.as_str(), job.priority), ("emails", 5));
    let job = env.wait_for_status(plain, JobStatus::Succeeded, T).await;
    assert_eq!((job.queue.as_str(), job.priority), ("emails", 7));
    worker.signal("TERM");
    assert!(worker.wait(T).await.success());
}

#[tokio::test]
async fn the_default_queue_keeps_its_broker_name_and_an_old_queue_without_priorities_still_works() {
    let env = TestEnv::new().await;
    // The default queue's work queue is the deployment's prefix itself, as before queues.
    assert_eq!(env.names_of("default").work, env.cfg.queue);
    // A work queue as an earlier version declared it: no priority levels.
    let work = env.cfg.queue.clone();
    on_channel(|ch| async move {
        ch.queue_delete(work.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        ch.queue_declare(
            work.as_str().into(),
            topology::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declare without arguments");
    })
    .await;
    let id = Uuid::new_v4();
    env.publish_raw(&[(
        None,
        format!(r#"{{"id":"{id}","kind":"echo","payload":"old queue"}}"#).into_bytes(),
    )])
    .await;
    let mut worker = env.spawn(&["worker"], &[]);
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.queue, "default");
    assert_eq!(job.result, Some(json!("old queue")));
    worker.wait_for_log("priorities are ignored", T).await;
    // Used as it is: still without priorities (a declaration with them would have failed).
    let queue = passive_declare(&env.cfg.queue).await;
    assert_eq!(queue.consumer_count(), 1);
    worker.signal("TERM");
    assert!(worker.wait(T).await.success());
}

#[tokio::test]
async fn a_message_naming_another_queue_is_dead_lettered_with_the_reason() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[]);
    let id = Uuid::new_v4();
    // With a payload, so the queue is the only thing wrong with it.
    env.publish_raw(&[(
        None,
        format!(r#"{{"id":"{id}","kind":"echo","payload":1,"queue":"emails"}}"#).into_bytes(),
    )])
    .await;
    let job = env.wait_for_status(id, JobStatus::Dead, T).await;
    let error = job.error.clone().unwrap_or_default();
    assert!(error.contains("queue"), "{error}");
    assert_eq!(job.attempts, 0, "never run: {job:#?}");
    let letters = env
        .wait_until("one letter in the default DLQ", T, || async {
            let l = peek_dead_letters(&env.names().dead).await;
            (l.len() == 1).then_some(l)
        })
        .await;
    assert_eq!(letters[0].0.as_deref(), Some(id.to_string().as_str()));
    assert!(
        letters[0].1.as_deref().unwrap_or("").contains("queue"),
        "{letters:?}"
    );
    // The worker lives on and runs the next job.
    assert!(worker.child.try_wait().expect("try_wait").is_none());
    let next = env.enqueue(NewJob::new("echo", json!("next"))).await;
    env.wait_for_status(next, JobStatus::Succeeded, T).await;
    worker.signal("TERM");
    assert!(worker.wait(T).await.success());
}

#[tokio::test]
async fn republishes_route_by_the_jobs_recorded_deployment() {
    let env = TestEnv::new().await;
    let a = env.names();
    // Deployment B: the same database, another prefix, only its default queue.
    let mut cfg_b = env.cfg.clone();
    cfg_b.queue = format!("{}b", env.cfg.queue);
    cfg_b.queues = QueueSettings(vec![("default".into(), 2)]);
    let b = QueueNames::new(&cfg_b.queue);
    let _cleanup = Queues(b.clone());
    {
        let conn = broker::connect(AMQP, "test: deployment b")
            .await
            .expect("rabbitmq");
        let ch = conn.create_channel().await.expect("channel");
        topology::declare(&conn, &ch, &b, cfg_b.queue_type)
            .await
            .expect("declare b");
        let _ = conn.close(200, "".into()).await;
    }
    let purge = |queue: String| {
        on_channel(|ch| async move {
            ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await
                .expect("purge")
        })
    };

    // A job of A whose message was lost, its outbox row left stale, as if its enqueuer died.
    let job = env.enqueue(NewJob::new("echo", json!("a's job"))).await;
    purge(a.work.clone()).await;
    sqlx::query(
        "INSERT INTO apiary_outbox (job_id, created_at) VALUES ($1, now() - interval '1 hour')
         ON CONFLICT (job_id) DO UPDATE SET created_at = EXCLUDED.created_at",
    )
    .bind(job)
    .execute(env.store.pool())
    .await
    .expect("stale outbox row");
    assert_eq!(depth(&a.work).await, 0);

    // Only B's worker runs; its relay sends the job home, to A's work queue.
    let worker_b = env.start_worker_with(cfg_b.clone(), Registry::builtins());
    env.wait_until("the relay to republish to A's work queue", T, || async {
        (depth(&a.work).await == 1).then_some(())
    })
    .await;
    assert_eq!(depth(&b.work).await, 0);
    let j = env.job(job).await.expect("job");
    assert_eq!(j.status(), JobStatus::Queued, "B must not run A's job");
    assert_eq!(j.attempts, 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_outbox WHERE job_id = $1")
        .bind(job)
        .fetch_one(env.store.pool())
        .await
        .expect("outbox");
    assert_eq!(left, 0, "relayed, so the row is gone");

    // A dead job of A: the trigger queues its dead letter; B's relay sends it to A's DLQ.
    let dead = env
        .enqueue(NewJob::new("echo", json!("a's dead job")))
        .await;
    purge(a.work.clone()).await;
    sqlx::query(
        "UPDATE apiary_jobs SET status = 'dead', finished_at = now(), error = 'x' WHERE id = $1",
    )
    .bind(dead)
    .execute(env.store.pool())
    .await
    .expect("make dead");
    let letters = env
        .wait_until("the dead letter in A's DLQ", T, || async {
            let l = peek_dead_letters(&a.dead).await;
            (!l.is_empty()).then_some(l)
        })
        .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0.as_deref(), Some(dead.to_string().as_str()));
    assert_eq!(depth(&b.dead).await, 0, "nothing in B's DLQ");
    worker_b.stop().await;
}

#[tokio::test]
async fn a_retry_in_a_named_queue_goes_through_its_own_delay_tiers() {
    let env = TestEnv::with_queues(&[("emails", 2)]).await;
    // Retries wait up to 3 s (full jitter): with five jobs, some wait in a tier long
    // enough to be seen there.
    let mut worker = env.spawn(
        &["worker"],
        &[
            ("APIARY_QUEUES", "emails:2"),
            ("APIARY_RETRY_BASE", "3s"),
            ("APIARY_RETRY_CAP", "3s"),
        ],
    );
    let jobs: Vec<NewJob> = (0..5)
        .map(|i| {
            NewJob::new(
                "fail",
                json!({"times": 1, "message": format!("first try {i}")}),
            )
            .with_queue("emails")
            .with_max_attempts(2)
        })
        .collect();
    let ids: Vec<JobId> = env
        .client()
        .enqueue_many(jobs)
        .await
        .expect("enqueue")
        .into_iter()
        .map(|e| e.job.id)
        .collect();
    let emails = env.names_of("emails");
    assert!(
        emails
            .delay(1000)
            .starts_with(&format!("{}:emails:delay:", env.cfg.queue))
    );
    env.wait_until("a retry waiting in an emails delay tier", T, || async {
        (delayed(&emails).await > 0).then_some(())
    })
    .await;
    assert_eq!(delayed(&env.names()).await, 0, "nothing in default's tiers");
    for id in &ids {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 2, "{job:#?}");
        assert_eq!(job.queue, "emails");
        assert_eq!(job.result, Some(json!({"attempts": 2})));
    }
    assert_eq!(delayed(&env.names()).await, 0);
    let log = strip_ansi(&worker.log_text());
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{log}");
}

#[tokio::test]
async fn the_longest_prefix_and_queue_name_fit_the_brokers_names() {
    let mut env = TestEnv::new().await;
    let first = env.names();
    // The longest of each: a 170-byte prefix and a 64-byte queue name make the longest broker
    // name, the hour-long delay tier, 249 bytes of RabbitMQ's 255.
    let tag = env.cfg.queue.replace('.', "-");
    env.cfg.queue = format!("{tag}{}", "p".repeat(170 - tag.len()));
    let queue = "q".repeat(64);
    env.cfg.queues = QueueSettings(vec![(queue.clone(), 2)]);
    env.queues.push(queue.clone());
    common::remove_queues(&first);
    let names = env.names_of(&queue);
    assert!(names.delay(3_600_000).len() <= 255);
    let worker = env.start_worker();
    // A retry goes out through the queue's delay tiers and back.
    let id = env
        .enqueue(
            NewJob::new("fail", json!({"times": 1}))
                .with_queue(queue.as_str())
                .with_max_attempts(2),
        )
        .await;
    let job = env
        .wait_for_status(id, JobStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!((job.queue.as_str(), job.attempts), (queue.as_str(), 2));
    worker.stop().await;
}
