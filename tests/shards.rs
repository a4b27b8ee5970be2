//! One queue over several broker queues (`shards=N` in `APIARY_QUEUE_OPTIONS`), against real
//! Postgres and RabbitMQ: jobs spread over the shards and each runs once, one concurrency key
//! stays on one shard (its delays, retries and dead letter too), dedup keys stay exact
//! across shards, a raw producer's old work queue still works, the depths add the shards up,
//! and changing N, down or up, with jobs waiting loses none and doubles none.

mod common;

use std::time::Duration;

use apiary::broker::{QueueNames, topology};
use apiary::config::{Config, parse_queue_options};
use apiary::{JobId, JobStatus, NewJob, Registry};
use common::{TestEnv, passive_declare, peek_dead_letters};
use serde_json::json;
use uuid::Uuid;

const T: Duration = Duration::from_secs(120);

/// Deletes every shard a test may have made (up to [`MOST`]) when it ends, even if it fails:
/// the world's own clean-up knows only the shards its configuration names at the end.
struct Shards(QueueNames);

/// The most shards any test here uses.
const MOST: u16 = 4;

impl Drop for Shards {
    fn drop(&mut self) {
        common::remove_queues(&self.0.clone().with_shards(MOST));
    }
}

/// `cfg` with the `default` queue over `n` shards.
fn with_shards(cfg: &Config, n: u16) -> Config {
    let mut cfg = cfg.clone();
    cfg.queue_options = parse_queue_options(&format!("default:shards={n}")).expect("options");
    cfg
}

/// Ready messages in each shard's work queue, shard 0 first.
async fn ready_by_shard(names: &QueueNames, shards: u16) -> Vec<u32> {
    let mut out = Vec::new();
    for k in 0..shards {
        out.push(passive_declare(&names.shard_work(k)).await.message_count());
    }
    out
}

/// Messages waiting in shard `k`'s delay tiers.
async fn delayed_in(names: &QueueNames, k: u16) -> u32 {
    delayed_by_shard(names, k + 1).await[usize::from(k)]
}

/// Messages waiting in each shard's delay tiers, shard 0 first, read on one channel so a
/// poll is quick.
async fn delayed_by_shard(names: &QueueNames, shards: u16) -> Vec<u32> {
    let conn = lapin::Connection::connect(common::AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    for k in 0..shards {
        let mut n = 0;
        for tier in topology::DELAY_TIERS_MS {
            n += ch
                .queue_declare(
                    names.shard_delay(k, tier).as_str().into(),
                    passive,
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("a delay tier")
                .message_count();
        }
        out.push(n);
    }
    let _ = conn.close(200, "".into()).await;
    out
}

/// Enqueues `jobs` through a client of `cfg`, in batches.
async fn enqueue_with(cfg: &Config, jobs: Vec<NewJob>) -> Vec<JobId> {
    let client = apiary::Client::new(cfg).expect("client");
    let mut ids = Vec::new();
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let batch: Vec<NewJob> = jobs.by_ref().take(250).collect();
        let done = client.enqueue_many(batch).await.expect("enqueue");
        ids.extend(done.into_iter().map(|e| e.job.id));
    }
    ids
}

/// The `default` queue's depths as `GET /v1/queues` and `apiary status` report them.
async fn reported(cfg: &Config) -> apiary::client::QueueInfo {
    let client = apiary::Client::new(cfg).expect("client");
    client
        .queues()
        .await
        .expect("queues")
        .into_iter()
        .find(|q| q.name == "default")
        .expect("the default queue")
}

fn tally(counter: &str) -> NewJob {
    NewJob::new("tally", json!({ "counter": counter }))
}

#[tokio::test]
async fn two_thousand_jobs_over_four_shards_each_run_once() {
    let mut env = TestEnv::new().await;
    env.cfg = with_shards(&env.cfg, 4);
    env.cfg.concurrency = 32;
    let names = env.names();
    let _shards = Shards(names.clone());
    assert_eq!(names.shards, 4);

    let jobs: Vec<NewJob> = (0..2000)
        .map(|i| {
            if i % 4 == 0 {
                tally("keyed").with_concurrency_key(format!("key-{}", i % 20))
            } else {
                tally("plain")
            }
        })
        .collect();
    let ids = enqueue_with(&env.cfg, jobs).await;
    assert_eq!(ids.len(), 2000);
    // A raw producer knows only the old single work queue: shard 0 is it.
    // Each body its own (a raw message without an id is known by its body).
    let raw: Vec<(Option<String>, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                None,
                format!(r#"{{"kind":"tally","payload":{{"counter":"raw","n":{i}}}}}"#).into_bytes(),
            )
        })
        .collect();
    common::publish_raw_to(&names.work, &raw).await;

    // Before any worker: the messages really are spread over the four broker queues.
    let by_shard = ready_by_shard(&names, 4).await;
    assert_eq!(by_shard.iter().sum::<u32>(), 2020, "{by_shard:?}");
    assert!(by_shard.iter().all(|n| *n >= 100), "spread: {by_shard:?}");
    // And the depths add them up.
    let info = reported(&env.cfg).await;
    assert_eq!(info.ready, 2020, "{info:?}");

    let worker = env.start_worker();
    env.wait_until("every job to succeed", T, || async {
        (env.count(JobStatus::Succeeded).await == 2020).then_some(())
    })
    .await;
    assert_eq!(env.tally("plain").await, Some(1500));
    assert_eq!(env.tally("keyed").await, Some(500));
    assert_eq!(env.tally("raw").await, Some(20));
    worker.stop().await;
    assert_eq!(ready_by_shard(&names, 4).await, vec![0; 4]);
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn one_key_keeps_to_one_shard_through_delays_retries_and_dead_letters() {
    let mut env = TestEnv::new().await;
    env.cfg = with_shards(&env.cfg, 4);
    env.cfg.retry_base = Duration::from_secs(6);
    env.cfg.retry_cap = Duration::from_secs(6);
    let names = env.names();
    let _shards = Shards(names.clone());
    let key = "acct-1";
    let home = topology::shard_of(Uuid::nil(), Some(key), 4);

    let keyed: Vec<NewJob> = (0..40)
        .map(|_| tally("keyed").with_concurrency_key(key))
        .collect();
    let ids = enqueue_with(&env.cfg, keyed).await;
    let by_shard = ready_by_shard(&names, 4).await;
    for (k, n) in by_shard.iter().enumerate() {
        let want = if k == usize::from(home) { 40 } else { 0 };
        assert_eq!(
            *n, want,
            "shard {k} of {by_shard:?}; the key's shard is {home}"
        );
    }

    // A scheduled job of the key waits in its shard's own delay tiers.
    let later = env
        .enqueue(
            tally("later")
                .with_concurrency_key(key)
                // Far enough out to still wait in a tier when the retries do, however long a
                // loaded machine takes to start the worker.
                .with_run_at(chrono::Utc::now() + chrono::Duration::seconds(30)),
        )
        .await;
    for k in 0..4 {
        let want = u32::from(k == home);
        assert_eq!(delayed_in(&names, k).await, want, "shard {k}");
    }
    // One that fails once comes back through the same shard; one that always fails ends as
    // a dead letter in the queue's one dead-letter queue.
    let retried = env
        .enqueue(
            NewJob::new("fail", json!({"times": 1}))
                .with_concurrency_key(key)
                .with_max_attempts(3),
        )
        .await;
    let dead = env
        .enqueue(
            NewJob::new("fail", json!({"times": 99}))
                .with_concurrency_key(key)
                .with_max_attempts(2),
        )
        .await;

    let worker = env.start_worker();
    // Both retries and the scheduled job wait in the key's shard's tiers, none elsewhere.
    env.wait_until("both retries waiting in the key's shard", T, || async {
        let by_shard = delayed_by_shard(&names, 4).await;
        let elsewhere: u32 = (0..4)
            .filter(|k| *k != usize::from(home))
            .map(|k| by_shard[k])
            .sum();
        assert_eq!(elsewhere, 0, "nothing waits in another shard: {by_shard:?}");
        (by_shard[usize::from(home)] == 3).then_some(())
    })
    .await;
    for id in ids.iter().chain([&later, &retried]) {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    let d = env.wait_for_status(dead, JobStatus::Dead, T).await;
    assert_eq!(d.attempts, 2);
    assert_eq!(env.tally("keyed").await, Some(40));
    assert_eq!(env.tally("later").await, Some(1));
    let letters = env
        .wait_until("the dead letter", T, || async {
            let l = peek_dead_letters(&names.dead).await;
            (!l.is_empty()).then_some(l)
        })
        .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0.as_deref(), Some(dead.to_string().as_str()));
    worker.stop().await;
}

#[tokio::test]
async fn dedup_keys_stay_exact_across_shards() {
    let mut env = TestEnv::new().await;
    env.cfg = with_shards(&env.cfg, 4);
    let names = env.names();
    let _shards = Shards(names.clone());
    // Four enqueues of each of 50 keys, each with its own id (so its own shard, were it
    // recorded): Postgres keeps one job per key, and one message per job is published.
    let jobs: Vec<NewJob> = (0..200)
        .map(|i| tally("dedup").with_dedup_key(format!("d-{}", i % 50)))
        .collect();
    let client = env.client();
    let mut created = 0;
    for batch in jobs.chunks(50) {
        for e in client.enqueue_many(batch.to_vec()).await.expect("enqueue") {
            created += usize::from(e.created);
        }
    }
    assert_eq!(created, 50);
    let by_shard = ready_by_shard(&names, 4).await;
    assert_eq!(by_shard.iter().sum::<u32>(), 50, "{by_shard:?}");
    assert!(
        by_shard.iter().filter(|n| **n > 0).count() > 1,
        "{by_shard:?}"
    );
    let worker = env.start_worker();
    env.wait_until("the 50 jobs", T, || async {
        (env.count(JobStatus::Succeeded).await == 50).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(env.tally("dedup").await, Some(50));
}

/// Enqueues `now` due jobs and `later` scheduled a few seconds ahead, some with keys, through
/// a client of `cfg`; returns their ids.
async fn backlog(cfg: &Config, now: usize, later: usize) -> Vec<JobId> {
    let due = (0..now).map(|i| {
        let job = tally("moved");
        if i % 3 == 0 {
            job.with_concurrency_key(format!("k{}", i % 7))
        } else {
            job
        }
    });
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let scheduled = (0..later).map(|_| tally("moved").with_run_at(at));
    enqueue_with(cfg, due.chain(scheduled).collect()).await
}

/// Runs a worker of `cfg` until every one of `ids` succeeded, then checks each ran once.
async fn run_all(env: &TestEnv, cfg: &Config, ids: &[JobId]) {
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());
    let total = i64::try_from(ids.len()).expect("few");
    env.wait_until("every job to succeed", T, || async {
        (env.count(JobStatus::Succeeded).await == total).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(
        env.tally("moved").await,
        Some(total),
        "none lost, none doubled"
    );
}

#[tokio::test]
async fn shrinking_from_four_shards_to_two_keeps_every_job() {
    let env = TestEnv::new().await;
    let four = with_shards(&env.cfg, 4);
    let names = four.queue_names("default");
    let _shards = Shards(names.clone());
    let ids = backlog(&four, 400, 40).await;
    let by_shard = ready_by_shard(&names, 4).await;
    assert!(
        by_shard[2] > 0 && by_shard[3] > 0,
        "shards 2 and 3 hold jobs: {by_shard:?}"
    );
    assert!(delayed_in(&names, 2).await + delayed_in(&names, 3).await > 0);

    // Now two shards. The depths still count what waits in shards 2 and 3.
    let two = with_shards(&env.cfg, 2);
    let info = reported(&two).await;
    assert_eq!(info.ready + info.delayed, 440, "{info:?}");

    run_all(&env, &two, &ids).await;
    // Shards 2 and 3 were drained (scheduled jobs that came due in them too), not deleted.
    assert_eq!(ready_by_shard(&names, 4).await, vec![0; 4]);
    for k in 0..4 {
        assert_eq!(delayed_in(&names, k).await, 0, "shard {k}");
    }
    let after = reported(&two).await;
    assert_eq!((after.ready, after.delayed), (0, 0));
}

#[tokio::test]
async fn growing_from_one_shard_to_three_keeps_every_job() {
    let env = TestEnv::new().await;
    let one = env.cfg.clone();
    let three = with_shards(&env.cfg, 3);
    let names = three.queue_names("default");
    let _shards = Shards(names.clone());
    let mut ids = backlog(&one, 300, 30).await;
    assert_eq!(
        ready_by_shard(&names.clone().with_shards(1), 1).await,
        [300]
    );
    // Producers on three shards from here; what waits in shard 0 stays where it is.
    ids.extend(backlog(&three, 300, 30).await);
    let by_shard = ready_by_shard(&names, 3).await;
    // The scheduled jobs may have come due meanwhile: at least the 600 due ones are ready.
    assert!(by_shard.iter().sum::<u32>() >= 600, "{by_shard:?}");
    assert!(by_shard[1] > 0 && by_shard[2] > 0, "{by_shard:?}");
    let info = reported(&three).await;
    assert_eq!(info.ready + info.delayed, 660, "{info:?}");
    run_all(&env, &three, &ids).await;
    assert_eq!(ready_by_shard(&names, 3).await, vec![0; 3]);
}

#[tokio::test]
async fn quorum_shards_ask_for_balanced_leaders() {
    let mut env = TestEnv::with_queue_type(topology::QueueType::Quorum).await;
    env.cfg = with_shards(&env.cfg, 3);
    let names = env.names();
    let _shards = Shards(names.clone());
    let ids = enqueue_with(&env.cfg, (0..60).map(|_| tally("q")).collect()).await;
    let by_shard = ready_by_shard(&names, 3).await;
    assert_eq!(by_shard.iter().sum::<u32>(), 60, "{by_shard:?}");
    // As the broker shows them: shards 1 and 2 with the locator, shard 0 as it always was.
    let listing = common::rabbitmqctl(&[
        "list_queues",
        "name",
        "type",
        "arguments",
        "--no-table-headers",
        "-q",
    ])
    .await;
    for k in 0..3 {
        let work = names.shard_work(k);
        let line = listing
            .lines()
            .find(|l| l.split('\t').next() == Some(work.as_str()))
            .unwrap_or_else(|| panic!("{work} missing from {listing}"));
        assert!(line.contains("quorum"), "{line}");
        assert_eq!(line.contains("balanced"), k > 0, "{line}");
    }
    let worker = env.start_worker();
    for id in &ids {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    worker.stop().await;
    assert_eq!(env.tally("q").await, Some(60));
}

/// A spawned worker of `env` on `n` shards, once it has run `jobs` of its own (so it is
/// consuming), enqueued through a client on `n` shards too.
async fn spawned_worker_on(env: &TestEnv, n: u16, jobs: usize) -> common::Proc {
    let options = format!("default:shards={n}");
    let worker = env.spawn(&["worker"], &[("APIARY_QUEUE_OPTIONS", &options)]);
    let before = env.tally("moved").await.unwrap_or(0);
    enqueue_with(
        &with_shards(&env.cfg, n),
        (0..jobs).map(|_| tally("moved")).collect(),
    )
    .await;
    let want = before + i64::try_from(jobs).expect("few");
    env.wait_until("the worker to run its jobs", T, || async {
        (env.tally("moved").await == Some(want)).then_some(())
    })
    .await;
    worker
}

/// Deletes shard `k`'s work queue and tiers, as an operator would once they are empty.
async fn delete_shard(names: &QueueNames, k: u16) {
    let conn = apiary::broker::connect(common::AMQP, "test delete shard")
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    for q in names.shard_queues(k) {
        ch.queue_delete(
            q.as_str().into(),
            lapin::options::QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await
        .expect("delete an empty shard queue");
    }
    let _ = conn.close(200, "deleted".into()).await;
}

/// What the broker says when a channel asks for a queue that does not exist; lapin logs it.
const PROBE_MISS: &str = "NOT_FOUND";

#[tokio::test]
async fn leftover_shards_are_looked_for_only_where_the_record_says_they_may_be() {
    let env = TestEnv::new().await;
    let names = with_shards(&env.cfg, 4).queue_names("default");
    let _shards = Shards(names.clone());
    let store = apiary::store::Store::connect_lazy(&env.cfg.database_url, 2).expect("store");

    // Two shards and nothing ever larger: no shard is looked for above them.
    let mut worker = spawned_worker_on(&env, 2, 20).await;
    assert_eq!(store.recorded_shards(&names.work).await.expect("read"), 2);
    assert!(
        !worker.log_text().contains(PROBE_MISS),
        "{}",
        worker.log_text()
    );
    worker.signal("TERM");
    worker.wait(T).await;

    // A producer on four shards records four before it declares them; a worker on two, when
    // it connects, consumes shards 2 and 3 as leftovers, without a probe that misses.
    let ids = enqueue_with(
        &with_shards(&env.cfg, 4),
        (0..40).map(|_| tally("moved")).collect(),
    )
    .await;
    assert_eq!(store.recorded_shards(&names.work).await.expect("read"), 4);
    let by_shard = ready_by_shard(&names, 4).await;
    assert!(by_shard[2] > 0 && by_shard[3] > 0, "{by_shard:?}");
    let mut worker = spawned_worker_on(&env, 2, 0).await;
    env.wait_until("the leftover shards' jobs to run", T, || async {
        (env.tally("moved").await == Some(60)).then_some(())
    })
    .await;
    assert_eq!(ready_by_shard(&names, 4).await, vec![0; 4]);
    let log = worker.log_text();
    assert!(log.contains("leftover=[2, 3]"), "{log}");
    assert!(!log.contains(PROBE_MISS), "{log}");
    worker.signal("TERM");
    worker.wait(T).await;
    for id in ids {
        assert_eq!(
            env.job(id).await.map(|j| j.status()),
            Some(JobStatus::Succeeded)
        );
    }

    // An operator deletes the emptied shard 3. The next worker finds it gone (one probe
    // misses), lowers the record to three, and the one after it misses nothing.
    delete_shard(&names, 3).await;
    let mut worker = spawned_worker_on(&env, 2, 10).await;
    assert_eq!(store.recorded_shards(&names.work).await.expect("read"), 3);
    assert!(worker.log_text().contains("leftover shards were deleted"));
    worker.signal("TERM");
    worker.wait(T).await;
    let mut worker = spawned_worker_on(&env, 2, 10).await;
    let log = worker.log_text();
    assert!(log.contains("leftover=[2]"), "{log}");
    assert!(!log.contains(PROBE_MISS), "{log}");
    worker.signal("TERM");
    worker.wait(T).await;
    assert_eq!(
        env.tally("moved").await,
        Some(80),
        "none lost, none doubled"
    );
    env.assert_invariants_quiescent().await;
}
