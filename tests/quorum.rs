//! Quorum queues (`APIARY_QUEUE_TYPE=quorum`): jobs run through them, retries and delays wait
//! in quorum delay tiers, dead letters reach a quorum dead-letter queue, the broker says every
//! queue is of type quorum, a queue of the other type is a clear error, and `apiary
//! migrate-queues --to quorum` moves a deployment's queues with every job kept and none run
//! twice.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use apiary::broker::topology::QueueType;
use apiary::{JobStatus, NewJob};
use common::{Proc, TestEnv};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// Each queue of the broker whose name starts with `prefix`: its type and its arguments, as
/// `rabbitmqctl list_queues` shows them.
async fn queue_types(prefix: &str) -> HashMap<String, (String, String)> {
    common::rabbitmqctl(&[
        "list_queues",
        "name",
        "type",
        "arguments",
        "--no-table-headers",
        "-q",
    ])
    .await
    .lines()
    .filter_map(|l| {
        let mut parts = l.split('\t');
        let name = parts.next()?.to_string();
        let kind = parts.next()?.to_string();
        let args = parts.next().unwrap_or("").to_string();
        name.starts_with(prefix).then_some((name, (kind, args)))
    })
    .collect()
}

/// Fails unless every broker queue of `env`'s default queue exists with type `kind`.
async fn assert_all_of_type(env: &TestEnv, kind: &str) {
    let found = queue_types(&env.cfg.queue).await;
    for q in env.names().all() {
        let (t, _) = found
            .get(&q)
            .unwrap_or_else(|| panic!("queue {q} missing; found {found:#?}"));
        assert_eq!(t, kind, "queue {q}");
    }
}

/// Sums the tally counters `c0..c{n}`.
async fn tally_total(env: &TestEnv, counters: usize) -> i64 {
    let mut total = 0;
    for c in 0..counters {
        total += env.tally(&format!("c{c}")).await.unwrap_or(0);
    }
    total
}

async fn stop(mut worker: Proc) {
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn jobs_run_to_succeeded_through_queues_the_broker_says_are_quorum() {
    let env = TestEnv::with_queue_type(QueueType::Quorum).await;
    assert_all_of_type(&env, "quorum").await;
    let work = queue_types(&env.names().work).await;
    let (_, args) = &work[&env.names().work];
    assert!(args.contains("x-delivery-limit"), "{args}");
    assert!(!args.contains("x-max-priority"), "{args}");

    let worker = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "8")]);
    let ids = env
        .enqueue_all(
            (0..50)
                .map(|i| NewJob::new("echo", json!({"i": i})).with_priority((i % 10) as u8))
                .collect(),
        )
        .await;
    for id in &ids {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1);
    }
    let log = worker.log_text();
    assert!(
        log.contains("priorities are ignored"),
        "the worker says once that priorities are ignored:\n{log}"
    );
    assert_eq!(log.matches("priorities are ignored").count(), 1, "{log}");
    stop(worker).await;
    assert_all_of_type(&env, "quorum").await;
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn delays_and_retries_wait_in_quorum_tiers_and_dead_letters_reach_the_quorum_dead_queue() {
    let env = TestEnv::with_queue_type(QueueType::Quorum).await;
    let worker = env.start_worker();
    let names = env.names();

    // Due in 6 s: its first hop is the 5 s tier, where the broker holds it.
    let delayed = env
        .enqueue(
            NewJob::new("echo", json!({"late": true}))
                .with_run_at(chrono::Utc::now() + chrono::Duration::milliseconds(6_000)),
        )
        .await;
    let tier = names.delay(5_000);
    env.wait_until("the delayed job in the 5 s quorum tier", T, || async {
        (env.queue_depth(&tier).await == 1).then_some(())
    })
    .await;
    assert_eq!(queue_types(&tier).await[&tier].0, "quorum");

    // Fails twice, each retry waiting in the 100 ms tier, then succeeds.
    let retried = env
        .enqueue(NewJob::new("fail", json!({"times": 2})).with_max_attempts(5))
        .await;
    let job = env.wait_for_status(retried, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 3);

    // Fails for good: recorded dead, its letter in the quorum dead-letter queue.
    let dead = env
        .enqueue(NewJob::new("fail", json!({"permanent": true})))
        .await;
    env.wait_for_status(dead, JobStatus::Dead, T).await;
    let letters = env
        .wait_until("the dead letter", T, || async {
            let l = common::peek_dead_letters(&names.dead).await;
            (!l.is_empty()).then_some(l)
        })
        .await;
    assert!(
        letters
            .iter()
            .any(|(id, _)| id.as_deref() == Some(dead.to_string().as_str())),
        "{letters:?}"
    );

    let job = env.wait_for_status(delayed, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 1);
    worker.stop().await;
    assert_all_of_type(&env, "quorum").await;
}

#[tokio::test]
async fn a_queue_of_the_other_type_is_a_clear_error() {
    // Classic queues, a quorum configuration.
    let env = TestEnv::new().await;
    let mut cfg = env.cfg.clone();
    cfg.queue_type = QueueType::Quorum;
    let mut quorum = env.spawn(&["migrate"], &[("APIARY_QUEUE_TYPE", "quorum")]);
    let status = quorum.wait(T).await;
    let text = quorum.log_text();
    assert!(!status.success(), "{text}");
    for part in [
        format!("the queue {} exists as a classic queue", env.names().work),
        "APIARY_QUEUE_TYPE is quorum".to_string(),
        "apiary migrate-queues --to quorum".to_string(),
    ] {
        assert!(text.contains(&part), "{part:?} in:\n{text}");
    }
    let e = apiary::Client::new(&cfg)
        .expect("client")
        .enqueue(NewJob::new("echo", json!(null)))
        .await
        .expect_err("refused");
    let message = e.to_string();
    assert!(
        message.contains("exists as a classic queue") && message.contains("APIARY_QUEUE_TYPE"),
        "{message}"
    );

    // `apiary doctor` names it too.
    let mut doctor = env.spawn(&["doctor"], &[("APIARY_QUEUE_TYPE", "quorum")]);
    doctor.wait(Duration::from_secs(120)).await;
    let text = doctor.log_text();
    assert!(
        text.contains(&format!(
            "queue {} is a classic queue, but APIARY_QUEUE_TYPE is quorum",
            env.names().work
        )),
        "{text}"
    );
    // A worker says it while it waits for the queues to be migrated.
    let worker = env.spawn(&["worker"], &[("APIARY_QUEUE_TYPE", "quorum")]);
    env.wait_until("the worker to name the mismatch", T, || async {
        worker
            .log_text()
            .contains("exists as a classic queue, but APIARY_QUEUE_TYPE is quorum")
            .then_some(())
    })
    .await;
    drop(worker);

    // And the other way round.
    let env = TestEnv::with_queue_type(QueueType::Quorum).await;
    let mut classic = env.spawn(&["migrate"], &[("APIARY_QUEUE_TYPE", "classic")]);
    assert!(!classic.wait(T).await.success());
    let text = classic.log_text();
    assert!(
        text.contains(&format!(
            "the queue {} exists as a quorum queue, but APIARY_QUEUE_TYPE is classic",
            env.names().work
        )),
        "{text}"
    );
}

#[tokio::test]
async fn migrate_queues_refuses_while_workers_consume() {
    let env = TestEnv::new().await;
    let worker = env.spawn(&["worker"], &[]);
    let id = env.enqueue(NewJob::new("echo", json!(1))).await;
    env.wait_for_status(id, JobStatus::Succeeded, T).await;
    let out = env.run(&["migrate-queues", "--to", "quorum"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("stop every worker"), "{stderr}");
    stop(worker).await;
    assert_all_of_type(&env, "classic").await;
}

#[tokio::test]
async fn migrating_from_classic_to_quorum_keeps_every_job_and_runs_each_once() {
    let env = TestEnv::new().await;
    let names = env.names();
    const N: usize = 300;
    const COUNTERS: usize = 3;
    // Queued jobs waiting in the work queue, some with priorities...
    let mut jobs: Vec<NewJob> = (0..N)
        .map(|i| {
            NewJob::new("tally", json!({"counter": format!("c{}", i % COUNTERS)}))
                .with_dedup_key(format!("t{i}"))
                .with_priority((i % 10) as u8)
        })
        .collect();
    // ...and some not due yet, waiting in a delay tier.
    const LATER: usize = 20;
    for i in 0..LATER {
        jobs.push(
            NewJob::new("tally", json!({"counter": "later"}))
                .with_dedup_key(format!("later{i}"))
                .with_run_at(chrono::Utc::now() + chrono::Duration::seconds(8)),
        );
    }
    let ids = env.enqueue_all(jobs).await;
    // A raw producer's job, in the broker only: Postgres has never seen it.
    let raw = uuid::Uuid::new_v4();
    env.publish_raw(&[(
        Some(raw.to_string()),
        serde_json::to_vec(&json!({"id": raw, "kind": "tally", "payload": {"counter": "raw"}}))
            .expect("json"),
    )])
    .await;
    env.wait_until("every message in the broker", T, || async {
        let ready = env.queue_depth(&names.work).await as usize;
        let later = env.queue_depth(&names.delay(5_000)).await as usize;
        (ready == N + 1 && later == LATER).then_some(())
    })
    .await;

    let out = env.run(&["migrate-queues", "--to", "quorum"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{}: now quorum, {} message(s) kept",
            names.work,
            N + 1
        )),
        "{stdout}"
    );
    assert_all_of_type(&env, "quorum").await;
    let holding: Vec<String> = queue_types("apiary.migrating.")
        .await
        .into_keys()
        .filter(|q| {
            names
                .all()
                .iter()
                .any(|n| *q == apiary::broker::migrate::holding_queue(n))
        })
        .collect();
    assert!(holding.is_empty(), "holding queues left: {holding:?}");
    assert_eq!(env.queue_depth(&names.work).await as usize, N + 1);
    // A second run finds nothing to do.
    let again = env.run(&["migrate-queues", "--to", "quorum"]).await;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already quorum"));

    let worker = env.spawn(
        &["worker"],
        &[
            ("APIARY_QUEUE_TYPE", "quorum"),
            ("APIARY_CONCURRENCY", "16"),
        ],
    );
    for id in &ids {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1, "job {id} ran once");
    }
    env.wait_for_status(raw, JobStatus::Succeeded, T).await;
    assert_eq!(
        tally_total(&env, COUNTERS).await,
        N as i64,
        "every tally exactly once"
    );
    assert_eq!(env.tally("later").await, Some(LATER as i64));
    assert_eq!(env.tally("raw").await, Some(1));
    stop(worker).await;
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn classic_queues_declared_before_queue_types_are_used_as_they_are() {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let env = TestEnv::new().await;
    let names = env.names();
    // As an Apiary before APIARY_QUEUE_TYPE declared them: no x-queue-type at all.
    let conn = apiary::broker::connect(common::AMQP, "test: old queues")
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    for q in names.all() {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut work = FieldTable::default();
    work.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
    ch.queue_declare(names.work.as_str().into(), durable, work)
        .await
        .expect("old work queue");
    ch.queue_declare(names.dead.as_str().into(), durable, FieldTable::default())
        .await
        .expect("old dead queue");
    for tier in apiary::broker::topology::DELAY_TIERS_MS {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier as i64));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.work.as_str().into()),
        );
        ch.queue_declare(names.delay(tier).as_str().into(), durable, args)
            .await
            .expect("old tier");
    }
    let _ = conn.close(200, "".into()).await;
    let out = env.run(&["migrate"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let worker = env.start_worker();
    let id = env.enqueue(NewJob::new("fail", json!({"times": 1}))).await;
    env.wait_for_status(id, JobStatus::Succeeded, T).await;
    worker.stop().await;
    assert_all_of_type(&env, "classic").await;
}

/// Why a quorum work queue has no priorities: the broker refuses the argument outright.
#[tokio::test]
async fn the_broker_refuses_priorities_on_a_quorum_queue() {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let name = format!("apiary.t.{}.priority-probe", uuid::Uuid::new_v4().simple());
    let conn = apiary::broker::connect(common::AMQP, "test: priority probe")
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
    let refused = ch
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect_err("refused");
    let text = refused.to_string();
    assert!(
        apiary::broker::topology::is_precondition_failed(&refused),
        "{text}"
    );
    assert!(text.contains("x-max-priority"), "{text}");
    eprintln!("RabbitMQ answers: {text}");
    // In case a broker ever accepts it.
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "".into()).await;
}
