//! The dead-letter sweeper against the real RabbitMQ: replays queue their ids, one pass
//! removes the letters of the jobs that are no longer dead and keeps every other letter in
//! its order, a job dead again keeps its letters, and two sweepers never sweep at once.

mod common;

use apiary::broker::dead::sweep_replayed;
use apiary::broker::publish::Outgoing;
use apiary::broker::{self, Publisher};
use apiary::store::dead_job::{DEAD_SWEEP_LOCK, ReplaySelector};
use common::{AMQP, TestEnv, peek_dead_letters};
use uuid::Uuid;

/// Records a job that died: `dead`, with its error (the trigger queues its letter's outbox row).
async fn dead_job(env: &TestEnv, id: Uuid) {
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, max_attempts, status, attempts, error, finished_at)
         VALUES ($1, 'echo', '1', 3, 'dead', 3, 'boom', now())",
    )
    .bind(id)
    .execute(env.store.pool())
    .await
    .expect("dead job");
}

/// Publishes one letter per id, in order, as a worker does; `None` is a letter without a job id.
async fn letters(env: &TestEnv, ids: &[Option<Uuid>]) {
    let publisher = Publisher::new(AMQP, "dead sweep test", &env.cfg.queue);
    let names = std::sync::Arc::new(env.names());
    let out: Vec<Outgoing> = ids
        .iter()
        .map(|id| match id {
            Some(id) => Outgoing::dead(names.clone(), *id, b"{}".to_vec(), "boom"),
            None => Outgoing {
                queue: env.names().dead,
                body: b"not a job".to_vec(),
                id: Uuid::nil(),
                headers: None,
                priority: 0,
                names: names.clone(),
            },
        })
        .collect();
    publisher.publish(&out).await.expect("publish letters");
}

/// The job ids of the letters in the dead-letter queue, in order (`message_id` for one
/// without the header).
async fn dead_queue(env: &TestEnv) -> Vec<String> {
    peek_dead_letters(&env.names().dead)
        .await
        .into_iter()
        .map(|(id, _)| id.unwrap_or_else(|| "no id".into()))
        .collect()
}

async fn still_queued(env: &TestEnv) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT job_id FROM apiary_dead_sweep ORDER BY job_id")
        .fetch_all(env.store.pool())
        .await
        .expect("sweep queue")
}

async fn sweep(env: &TestEnv) -> usize {
    let conn = broker::connect(AMQP, "dead sweep test")
        .await
        .expect("rabbitmq");
    let channel = conn.create_channel().await.expect("channel");
    let n = sweep_replayed(&env.store, &channel, &env.names())
        .await
        .expect("sweep");
    let _ = conn.close(200, "swept".into()).await;
    n
}

#[tokio::test]
async fn one_pass_removes_the_letters_of_jobs_no_longer_dead_and_keeps_the_rest() {
    let env = TestEnv::new().await;
    let [replayed, died_again, dead, pruned, no_letter] = [(); 5].map(|()| Uuid::now_v7());
    for id in [replayed, died_again, dead, pruned, no_letter] {
        dead_job(&env, id).await;
    }
    letters(
        &env,
        &[
            Some(replayed),
            Some(died_again),
            Some(dead),
            None,
            Some(pruned),
        ],
    )
    .await;
    // Replays: each back to queued, its id queued for the sweep.
    for id in [replayed, died_again, pruned, no_letter] {
        let jobs = env
            .store
            .replay_dead(&ReplaySelector::Id(id))
            .await
            .expect("replay");
        assert_eq!(jobs.len(), 1);
        env.store.queue_dead_sweep(&[id]).await.expect("queue");
    }
    // One replayed job died again, with a new letter behind its old one; another was pruned.
    sqlx::query(
        "UPDATE apiary_jobs SET status = 'dead', attempts = 3, finished_at = now() WHERE id = $1",
    )
    .bind(died_again)
    .execute(env.store.pool())
    .await
    .expect("die again");
    letters(&env, &[Some(died_again)]).await;
    sqlx::query("DELETE FROM apiary_jobs WHERE id = $1")
        .bind(pruned)
        .execute(env.store.pool())
        .await
        .expect("prune");

    assert_eq!(
        sweep(&env).await,
        2,
        "the replayed and the pruned job's letters"
    );
    let d = died_again.to_string();
    assert_eq!(
        dead_queue(&env).await,
        vec![d.clone(), dead.to_string(), "no id".into(), d.clone()],
        "the other letters stay, in their order"
    );
    // The job that died again stays queued for its next replay; the others are done.
    assert_eq!(still_queued(&env).await, vec![died_again]);

    // Nothing more to do: a second sweep removes nothing.
    assert_eq!(sweep(&env).await, 0);
    assert_eq!(dead_queue(&env).await.len(), 4);

    // Replayed again, its stale letters all go.
    env.store
        .replay_dead(&ReplaySelector::Id(died_again))
        .await
        .expect("replay");
    env.store
        .queue_dead_sweep(&[died_again])
        .await
        .expect("queue");
    assert_eq!(sweep(&env).await, 2);
    assert_eq!(
        dead_queue(&env).await,
        vec![dead.to_string(), "no id".to_string()]
    );
    assert_eq!(still_queued(&env).await, Vec::<Uuid>::new());
}

#[tokio::test]
async fn two_sweepers_never_sweep_at_once() {
    let env = TestEnv::new().await;
    let id = Uuid::now_v7();
    dead_job(&env, id).await;
    letters(&env, &[Some(id)]).await;
    env.store
        .replay_dead(&ReplaySelector::Id(id))
        .await
        .expect("replay");
    env.store.queue_dead_sweep(&[id]).await.expect("queue");

    // Another sweeper holds the lock: this one does nothing.
    let mut other = env.store.pool().acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(DEAD_SWEEP_LOCK)
        .execute(&mut *other)
        .await
        .expect("lock");
    assert_eq!(sweep(&env).await, 0);
    assert_eq!(dead_queue(&env).await, vec![id.to_string()]);
    assert_eq!(still_queued(&env).await, vec![id]);

    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(DEAD_SWEEP_LOCK)
        .execute(&mut *other)
        .await
        .expect("unlock");
    assert_eq!(sweep(&env).await, 1);
    assert_eq!(dead_queue(&env).await, Vec::<String>::new());
    assert_eq!(still_queued(&env).await, Vec::<Uuid>::new());
}
