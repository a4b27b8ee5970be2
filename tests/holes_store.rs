//! Regression tests, at the store, for the holes two reviews found in "nothing lost, nothing
//! run twice": each builds the state by hand on a real Postgres (its own database) and calls
//! the store function that used to get it wrong.

mod common;

use std::time::Duration;

use apiary::JobStatus;
use apiary::store::cancel_job::CancelOutcome;
use apiary::store::claim_job::{Claim, ClaimInput};
use apiary::store::dead_job::Waiting;
use apiary::store::finish_job::{Finish, Outcome, finish_jobs};
use apiary::store::invariants::Quiet;
use apiary::store::rescue_job::RescueScope;
use apiary::wire::WireJob;
use common::TestEnv;
use serde_json::json;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn wire(id: Uuid, kind: &str, payload: &str) -> WireJob {
    WireJob {
        id,
        kind: kind.into(),
        payload: serde_json::value::RawValue::from_string(payload.into()).expect("json"),
        dedup_key: None,
        max_attempts: None,
        run_at: None,
        queue: None,
        priority: None,
        concurrency_key: None,
        callback_url: None,
        prefix: None,
    }
}

fn input(job: &WireJob) -> ClaimInput<'_> {
    ClaimInput {
        job,
        budget: 3,
        recorded: true,
        // Recorded jobs route by their own row; this names only raw ones.
        prefix: "apiary.holes",
    }
}

/// A job recorded the way an enqueue records it: queued, with its outbox row.
async fn recorded(
    env: &TestEnv,
    kind: &str,
    payload: serde_json::Value,
    max_attempts: i32,
) -> WireJob {
    let job = env
        .client()
        .enqueue(apiary::NewJob::new(kind, payload).with_max_attempts(max_attempts))
        .await
        .expect("enqueue")
        .job;
    wire(
        job.id,
        kind,
        &serde_json::to_string(&job.payload).expect("json"),
    )
}

async fn claim(env: &TestEnv, job: &WireJob, worker: Uuid) -> Claim {
    env.store
        .claim_jobs(&[input(job)], worker, LEASE)
        .await
        .expect("claim")
        .claims
        .remove(0)
}

async fn expire_lease(env: &TestEnv, id: Uuid) {
    sqlx::query("UPDATE apiary_jobs SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(env.store.pool())
        .await
        .expect("expire");
}

async fn status_of(env: &TestEnv, id: Uuid) -> JobStatus {
    env.job(id).await.expect("job").status()
}

async fn outbox_has(env: &TestEnv, id: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM apiary_outbox WHERE job_id = $1)")
        .bind(id)
        .fetch_one(env.store.pool())
        .await
        .expect("outbox")
}

/// Review item 3: a job with a cancel request, an expired lease and attempts left used to be
/// skipped by the claim while the explanation answered "again" forever; it stayed `running`.
#[tokio::test]
async fn a_cancelled_job_whose_worker_died_is_cancelled_by_the_next_claim() {
    let env = TestEnv::new().await;
    let job = recorded(&env, "sleep", json!({"ms": 60000}), 3).await;
    let dead_worker = Uuid::now_v7();
    assert!(matches!(
        claim(&env, &job, dead_worker).await,
        Claim::Claimed { attempt: 1, .. }
    ));
    assert_eq!(
        env.store.cancel_job(job.id).await.expect("cancel"),
        CancelOutcome::Requested
    );
    expire_lease(&env, job.id).await;
    assert_eq!(claim(&env, &job, Uuid::now_v7()).await, Claim::Cancelled);
    assert_eq!(status_of(&env, job.id).await, JobStatus::Cancelled);
}

/// Review item 3: an expired last attempt redelivered to the same worker answered "busy"
/// before the "abandoned" check, forever.
#[tokio::test]
async fn an_expired_last_attempt_is_dead_even_on_the_worker_that_held_it() {
    let env = TestEnv::new().await;
    let job = recorded(&env, "echo", json!(1), 1).await;
    let worker = Uuid::now_v7();
    assert!(matches!(
        claim(&env, &job, worker).await,
        Claim::Claimed { .. }
    ));
    expire_lease(&env, job.id).await;
    assert_eq!(claim(&env, &job, worker).await, Claim::Exhausted);
    let j = env.job(job.id).await.expect("job");
    assert_eq!(j.status(), JobStatus::Dead);
    assert!(j.error.unwrap_or_default().contains("lease expired"));
    let letter_queued: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM apiary_outbox WHERE job_id = $1 AND dead_reason IS NOT NULL)",
    )
    .bind(job.id)
    .fetch_one(env.store.pool())
    .await
    .expect("outbox");
    assert!(letter_queued, "its dead letter is queued with its death");
}

/// Review item 8: a handler that returned within lease/5 of a cancel used to commit success
/// (and its `ctx.tx()` writes) after the API had answered "cancelled whatever it returns".
#[tokio::test]
async fn a_cancellation_wins_over_a_success_that_races_it() {
    let env = TestEnv::new().await;
    let worker = Uuid::now_v7();
    let ok = serde_json::value::to_raw_value(&json!("done")).expect("raw");

    // Batch path.
    let job = recorded(&env, "echo", json!(1), 3).await;
    let Claim::Claimed { attempt, .. } = claim(&env, &job, worker).await else {
        panic!("claimed")
    };
    env.store.cancel_job(job.id).await.expect("cancel");
    let done = env
        .store
        .finish_jobs(
            worker,
            &[Finish {
                id: job.id,
                attempt,
                outcome: Outcome::Succeeded(ok.clone()),
                detached: false,
            }],
        )
        .await
        .expect("finish");
    assert_eq!(done[0].status, JobStatus::Cancelled);
    let j = env.job(job.id).await.expect("job");
    assert_eq!((j.status(), j.result), (JobStatus::Cancelled, None));

    // With the handler's own writes: the finish refuses, and the writes roll back.
    let job = recorded(&env, "tally", json!({"counter": "c"}), 3).await;
    let Claim::Claimed { attempt, .. } = claim(&env, &job, worker).await else {
        panic!("claimed")
    };
    env.store.cancel_job(job.id).await.expect("cancel");
    let mut tx = env.store.pool().begin().await.expect("tx");
    sqlx::query("INSERT INTO demo_tally VALUES ('c', 1)")
        .execute(&mut *tx)
        .await
        .expect("effect");
    let done = finish_jobs(
        &mut *tx,
        worker,
        &[Finish {
            id: job.id,
            attempt,
            outcome: Outcome::Succeeded(ok),
            detached: false,
        }],
        true,
    )
    .await
    .expect("finish");
    assert!(
        done.is_empty(),
        "a cancelled job's success is not committed"
    );
    tx.rollback().await.expect("rollback");
    assert_eq!(env.tally("c").await, None);
    assert_eq!(status_of(&env, job.id).await, JobStatus::Running);
}

/// Review item 2: a detached job's retry or forced hand-back used to be published after the
/// commit with nothing to cover a failed publish: the row stayed `retrying`/`queued` with no
/// message and no outbox row.
#[tokio::test]
async fn a_detached_jobs_retry_and_hand_back_are_committed_with_an_outbox_row() {
    let env = TestEnv::new().await;
    let worker = Uuid::now_v7();
    for (outcome, want) in [
        (
            Outcome::Retry {
                error: "boom".into(),
                at: chrono::Utc::now() + chrono::Duration::seconds(5),
            },
            JobStatus::Retrying,
        ),
        (Outcome::Released, JobStatus::Queued),
    ] {
        let job = recorded(&env, "echo", json!(1), 3).await;
        // The enqueue's own row is gone once the publish is confirmed.
        env.store.delete_outbox(&[job.id]).await.expect("clean");
        let Claim::Claimed { attempt, .. } = claim(&env, &job, worker).await else {
            panic!("claimed")
        };
        assert!(
            env.store
                .detach_job(job.id, worker, attempt)
                .await
                .expect("detach")
        );
        let done = env
            .store
            .finish_jobs(
                worker,
                &[Finish {
                    id: job.id,
                    attempt,
                    outcome,
                    detached: true,
                }],
            )
            .await
            .expect("finish");
        assert_eq!(done[0].status, want);
        assert!(
            outbox_has(&env, job.id).await,
            "{want}: an outbox row carries it on"
        );
        // The relay sends it where it belongs: a retry to the delay tier of its due time.
        let mut sent = Vec::new();
        env.store
            .relay_outbox(Duration::ZERO, 10, Some(&[job.id]), |items| {
                sent = items;
                async { Ok::<(), std::convert::Infallible>(()) }
            })
            .await
            .expect("relay");
        let Some(apiary::store::outbox::OutboxItem::Job(j)) = sent.first() else {
            panic!("a job to publish: {sent:?}")
        };
        assert_eq!(j.run_at.is_some(), want == JobStatus::Retrying);
    }
}

/// Review items 13 and 16: the claim matched by id only, so a message's kind, payload and
/// dedup key ran instead of the recorded ones, and a message reusing a recorded id was acked
/// as that job.
#[tokio::test]
async fn a_message_claims_only_the_job_it_is() {
    let env = TestEnv::new().await;
    let job = recorded(&env, "echo", json!({"a": 1}), 3).await;
    let impostor = wire(job.id, "tally", r#"{"counter":"x"}"#);
    let Claim::Conflict(other) = claim(&env, &impostor, Uuid::now_v7()).await else {
        panic!("a conflict")
    };
    assert_ne!(other, job.id);
    let rec = env.job(other).await.expect("conflict record");
    assert_eq!(rec.status(), JobStatus::Dead);
    assert!(rec.error.unwrap_or_default().contains(&job.id.to_string()));
    assert!(rec.raw_body.is_some(), "not replayable: it is not a job");
    assert_eq!(
        status_of(&env, job.id).await,
        JobStatus::Queued,
        "untouched"
    );
    // The same message again lands on the same record.
    assert_eq!(
        claim(&env, &impostor, Uuid::now_v7()).await,
        Claim::Conflict(other)
    );
    // Another payload under the same kind is another job too.
    let edited = wire(job.id, "echo", r#"{"a":2}"#);
    assert!(matches!(
        claim(&env, &edited, Uuid::now_v7()).await,
        Claim::Conflict(_)
    ));
    // The real message claims it.
    assert!(matches!(
        claim(&env, &job, Uuid::now_v7()).await,
        Claim::Claimed { .. }
    ));
}

/// Review item 4: a cancelled scheduled job kept hopping through the delay queues; once
/// pruned, its next hop recorded it again as `queued`, or the claim as a new raw job, and it
/// ran.
#[tokio::test]
async fn a_pruned_jobs_late_message_is_never_recorded_again() {
    let env = TestEnv::new().await;
    let job = recorded(&env, "tally", json!({"counter": "late"}), 3).await;
    env.store.cancel_job(job.id).await.expect("cancel");
    let mut later = job.clone();
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(2));
    // While the record exists, its waiting message stops at the next hop.
    let w = env
        .store
        .check_waiting(&[input(&later)])
        .await
        .expect("check");
    assert_eq!(w, vec![Waiting::Finished]);
    // Pruned: the message (which says Apiary published it for a recorded job) is gone with
    // it, at a hop and at the claim.
    let pruned = env
        .store
        .prune(Duration::ZERO, &[], 100, 1)
        .await
        .expect("prune");
    assert_eq!(pruned, Some(1));
    let w = env
        .store
        .check_waiting(&[input(&later)])
        .await
        .expect("check");
    assert_eq!(w, vec![Waiting::Gone]);
    assert_eq!(claim(&env, &job, Uuid::now_v7()).await, Claim::Gone);
    assert!(env.job(job.id).await.is_none(), "not recorded again");
    // A raw message (no such mark) is still recorded: a producer's new job.
    let raw = wire(Uuid::now_v7(), "echo", "1");
    let mut raw_later = raw.clone();
    raw_later.run_at = later.run_at;
    let w = env
        .store
        .check_waiting(&[ClaimInput {
            job: &raw_later,
            budget: 7,
            recorded: false,
            prefix: &env.cfg.queue,
        }])
        .await
        .expect("check");
    assert_eq!(w, vec![Waiting::Hop]);
    let rec = env.job(raw.id).await.expect("recorded while it waits");
    assert_eq!((rec.status(), rec.max_attempts), (JobStatus::Queued, 7));
}

/// Review item 14: only detached jobs were rescued; any running job whose lease lapses must
/// be, whoever held it.
#[tokio::test]
async fn every_lapsed_lease_is_rescued_not_only_detached_ones() {
    let env = TestEnv::new().await;
    let gone = Uuid::now_v7();
    let alive = Uuid::now_v7();
    let a = recorded(&env, "echo", json!(1), 3).await;
    let b = recorded(&env, "echo", json!(2), 3).await;
    let c = recorded(&env, "echo", json!(3), 1).await;
    env.store
        .delete_outbox(&[a.id, b.id, c.id])
        .await
        .expect("clean");
    for (j, w) in [(&a, gone), (&b, alive), (&c, gone)] {
        assert!(matches!(claim(&env, j, w).await, Claim::Claimed { .. }));
    }
    expire_lease(&env, a.id).await;
    expire_lease(&env, c.id).await;
    // By worker: only the gone worker's jobs, only with lapsed leases.
    let ids = env
        .store
        .rescue_expired(RescueScope::Workers(&[alive]), 100)
        .await
        .expect("rescue")
        .unwrap_or_default();
    assert!(ids.is_empty());
    let mut ids = env
        .store
        .rescue_expired(RescueScope::All, 100)
        .await
        .expect("rescue")
        .expect("not locked");
    ids.sort();
    let mut want = vec![a.id, c.id];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(status_of(&env, a.id).await, JobStatus::Queued);
    assert!(
        outbox_has(&env, a.id).await,
        "republished through the outbox"
    );
    assert_eq!(
        status_of(&env, b.id).await,
        JobStatus::Running,
        "a live lease is left alone"
    );
    assert_eq!(
        status_of(&env, c.id).await,
        JobStatus::Dead,
        "its last attempt was lost"
    );
}

/// Review item 15: a worker's bookkeeping must tell one attempt of a job from another. The
/// heartbeat renews by attempt, and says when a claim was lost, so a stalled worker stops
/// an attempt another worker has taken over.
#[tokio::test]
async fn leases_are_renewed_and_lost_by_attempt() {
    let env = TestEnv::new().await;
    let first = Uuid::now_v7();
    let second = Uuid::now_v7();
    let job = recorded(&env, "echo", json!(1), 3).await;
    assert!(matches!(
        claim(&env, &job, first).await,
        Claim::Claimed { attempt: 1, .. }
    ));
    let l = env
        .store
        .renew_leases(first, &[(job.id, 1)], LEASE)
        .await
        .expect("renew");
    assert!(l[0].held);
    expire_lease(&env, job.id).await;
    assert!(matches!(
        claim(&env, &job, second).await,
        Claim::Claimed { attempt: 2, .. }
    ));
    let l = env
        .store
        .renew_leases(first, &[(job.id, 1)], LEASE)
        .await
        .expect("renew");
    assert!(!l[0].held, "the first worker learns its claim is lost");
    let l = env
        .store
        .renew_leases(second, &[(job.id, 1)], LEASE)
        .await
        .expect("renew");
    assert!(
        !l[0].held,
        "attempt 1 is not attempt 2, even for the holder"
    );
    let l = env
        .store
        .renew_leases(second, &[(job.id, 2)], LEASE)
        .await
        .expect("renew");
    assert!(l[0].held);
    // The stale attempt's outcome is fenced out.
    let ok = serde_json::value::to_raw_value(&json!(1)).expect("raw");
    let done = env
        .store
        .finish_jobs(
            first,
            &[Finish {
                id: job.id,
                attempt: 1,
                outcome: Outcome::Succeeded(ok),
                detached: false,
            }],
        )
        .await
        .expect("finish");
    assert!(done.is_empty());
}

/// Invariant 2, in the schema: no statement can make a finished job unfinished, except a
/// replay of a dead or failed one.
#[tokio::test]
async fn a_finished_job_cannot_be_made_unfinished() {
    let env = TestEnv::new().await;
    let job = recorded(&env, "echo", json!(1), 3).await;
    env.store.cancel_job(job.id).await.expect("cancel");
    let err =
        sqlx::query("UPDATE apiary_jobs SET status = 'queued', finished_at = NULL WHERE id = $1")
            .bind(job.id)
            .execute(env.store.pool())
            .await
            .expect_err("refused");
    assert!(err.to_string().contains("final status"), "{err}");
    assert_eq!(status_of(&env, job.id).await, JobStatus::Cancelled);
}

/// The checker finds what it is meant to find: a job nothing carries, and a lapsed lease
/// nobody rescued.
#[tokio::test]
async fn the_invariants_checker_reports_lost_and_stuck_jobs() {
    let env = TestEnv::new().await;
    let quiet = Quiet::Quiescent {
        messages: 0,
        dead_letters: 0,
    };
    assert_eq!(
        env.store.check_invariants(quiet).await.expect("check"),
        vec![]
    );
    let lost = recorded(&env, "echo", json!(1), 3).await;
    env.store.delete_outbox(&[lost.id]).await.expect("clean");
    let stuck = recorded(&env, "echo", json!(2), 3).await;
    assert!(matches!(
        claim(&env, &stuck, Uuid::now_v7()).await,
        Claim::Claimed { .. }
    ));
    sqlx::query("UPDATE apiary_jobs SET lease_until = now() - interval '1 hour' WHERE id = $1")
        .bind(stuck.id)
        .execute(env.store.pool())
        .await
        .expect("lapse");
    let v = env.store.check_invariants(quiet).await.expect("check");
    assert!(
        v.iter()
            .any(|v| v.job == Some(lost.id) && v.invariant == "1 carried"),
        "{v:#?}"
    );
    assert!(
        v.iter()
            .any(|v| v.job == Some(stuck.id) && v.detail.contains("not rescued")),
        "{v:#?}"
    );
    // Live, only what Postgres alone can tell: the unrescued lapse.
    let v = env
        .store
        .check_invariants(Quiet::Live { dead_letters: None })
        .await
        .expect("check");
    assert_eq!(v.len(), 1, "{v:#?}");
}

/// Review item 6: text Postgres cannot store. Payloads and results are `json` now, which
/// keeps every string JSON allows, NUL and lone surrogates included, byte for byte.
#[tokio::test]
async fn payloads_and_results_keep_nul_and_their_exact_text() {
    let env = TestEnv::new().await;
    let payload = r#"{"s": "a\u0000b\ud800", "n": 1e400}"#;
    let job = wire(Uuid::now_v7(), "echo", payload);
    let worker = Uuid::now_v7();
    let raw = ClaimInput {
        job: &job,
        budget: 3,
        recorded: false,
        prefix: &env.cfg.queue,
    };
    let c = env
        .store
        .claim_jobs(&[raw], worker, LEASE)
        .await
        .expect("claim")
        .claims
        .remove(0);
    assert!(matches!(c, Claim::Claimed { attempt: 1, .. }), "{c:?}");
    let stored: String = sqlx::query_scalar("SELECT payload::text FROM apiary_jobs WHERE id = $1")
        .bind(job.id)
        .fetch_one(env.store.pool())
        .await
        .expect("payload");
    assert_eq!(stored, payload, "exactly the producer's text");
    let result = serde_json::value::RawValue::from_string(r#""x\u0000y""#.into()).expect("raw");
    let done = env
        .store
        .finish_jobs(
            worker,
            &[Finish {
                id: job.id,
                attempt: 1,
                outcome: Outcome::Succeeded(result),
                detached: false,
            }],
        )
        .await
        .expect("finish");
    assert_eq!(done[0].status, JobStatus::Succeeded);
    // An error text with NUL is stored too, its NUL replaced.
    let failing = wire(Uuid::now_v7(), "echo", "2");
    let raw = ClaimInput {
        job: &failing,
        budget: 3,
        recorded: false,
        prefix: &env.cfg.queue,
    };
    env.store
        .claim_jobs(&[raw], worker, LEASE)
        .await
        .expect("claim");
    env.store
        .finish_jobs(
            worker,
            &[Finish {
                id: failing.id,
                attempt: 1,
                outcome: Outcome::Dead("bad\0byte".into()),
                detached: false,
            }],
        )
        .await
        .expect("finish");
    let j = env.job(failing.id).await.expect("job");
    assert_eq!(j.error.as_deref(), Some("bad\u{FFFD}byte"));
}

/// Found by the mixed outage run: an enqueue's publish confirmation, cleaned up late, deleted
/// the outbox row that a retry had rewritten for the same job meanwhile; with the retry's own
/// publish lost in a broker outage, the job stayed `retrying` with nothing to carry it.
#[tokio::test]
async fn a_late_enqueue_confirmation_never_deletes_a_retrys_outbox_row() {
    let env = TestEnv::new().await;
    let worker = Uuid::now_v7();
    let job = recorded(&env, "fail", json!({"times": 1}), 3).await;
    // The enqueue's row, as if its cleanup had not run yet (the test client's may have).
    sqlx::query(
        "INSERT INTO apiary_outbox (job_id, created_at) SELECT id, created_at FROM apiary_jobs WHERE id = $1
         ON CONFLICT DO NOTHING",
    )
    .bind(job.id)
    .execute(env.store.pool())
    .await
    .expect("enqueue row");
    let Claim::Claimed { attempt, .. } = claim(&env, &job, worker).await else {
        panic!("claimed")
    };
    env.store
        .finish_jobs(
            worker,
            &[Finish {
                id: job.id,
                attempt,
                outcome: Outcome::Retry {
                    error: "boom".into(),
                    at: chrono::Utc::now(),
                },
                detached: false,
            }],
        )
        .await
        .expect("finish");
    env.store
        .delete_outbox(&[job.id])
        .await
        .expect("late cleanup");
    assert!(
        outbox_has(&env, job.id).await,
        "the retry's row outlives the enqueue's confirmation"
    );
}
