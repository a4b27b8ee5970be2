//! Typed jobs end to end on the real services: arguments enqueued as a Rust type, run by a
//! typed handler that receives them decoded, the result read back as a type; a payload that
//! does not fit the type is dead at once, naming the field.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use apiary::handler::{HandlerError, JobContext, Work};
use apiary::{EnqueueError, JobArgs, JobStatus, NewJob, Registry, TypedJob};
use common::TestEnv;
use serde::{Deserialize, Serialize};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SendEmail {
    to: Address,
    subject: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Address {
    address: String,
}

impl JobArgs for SendEmail {
    const KIND: &'static str = "send_email";

    fn dedup_key(&self) -> Option<String> {
        Some(format!("{}/{}", self.to.address, self.subject))
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sent {
    to: String,
    attempt: i32,
}

/// Answers with what it received, so the test sees the arguments arrived decoded.
struct Mailer;

impl Work for Mailer {
    type Args = SendEmail;
    type Output = Sent;

    async fn work(&self, args: SendEmail, ctx: &mut JobContext) -> Result<Sent, HandlerError> {
        Ok(Sent {
            to: args.to.address,
            attempt: ctx.attempt(),
        })
    }
}

fn email(to: &str, subject: &str) -> SendEmail {
    SendEmail {
        to: Address { address: to.into() },
        subject: subject.into(),
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.add(Mailer);
    r
}

#[tokio::test]
async fn a_typed_job_runs_with_its_args_and_its_result_reads_back() {
    let env = TestEnv::new().await;
    let worker = env.start_worker_with(env.cfg.clone(), registry());
    let client = env.client();

    let enq = client
        .enqueue(email("ada@example.com", "welcome"))
        .await
        .expect("enqueue");
    assert!(enq.created);
    assert_eq!(enq.job.kind, "send_email");
    assert_eq!(
        enq.job.dedup_key.as_deref(),
        Some("ada@example.com/welcome")
    );

    let job = client
        .wait(enq.job.id, T)
        .await
        .expect("wait")
        .expect("the job exists");
    assert_eq!(job.status(), JobStatus::Succeeded, "{job:#?}");
    let sent: Option<Sent> = job.result_as().expect("the result is a Sent");
    assert_eq!(
        sent,
        Some(Sent {
            to: "ada@example.com".into(),
            attempt: 1
        })
    );

    // The args' dedup key makes the same email one job; an explicit key overrides it.
    let again = client
        .enqueue(email("ada@example.com", "welcome"))
        .await
        .expect("enqueue again");
    assert!(!again.created);
    assert_eq!(again.job.id, enq.job.id);
    let keyed = client
        .enqueue(TypedJob::new(email("ada@example.com", "welcome")).with_dedup_key("other"))
        .await
        .expect("enqueue with a key");
    assert!(keyed.created);
    assert_eq!(keyed.job.dedup_key.as_deref(), Some("other"));
    let keyed = env
        .wait_for_status(keyed.job.id, JobStatus::Succeeded, T)
        .await;
    assert_eq!(
        keyed.result,
        Some(json!({"to": "ada@example.com", "attempt": 1}))
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_payload_that_does_not_fit_the_args_is_dead_at_once_naming_the_field() {
    let env = TestEnv::new().await;
    let worker = env.start_worker_with(env.cfg.clone(), registry());
    // What a producer in another language might send: the JSON API, the typed kind, a
    // number where the type has a string.
    let id = env
        .enqueue(
            NewJob::new(
                SendEmail::KIND,
                json!({"to": {"address": 42}, "subject": "hi"}),
            )
            .with_max_attempts(5),
        )
        .await;
    let job = env.wait_for_status(id, JobStatus::Dead, T).await;
    assert_eq!(job.attempts, 1, "a payload of the wrong shape was retried");
    let error = job.error.clone().unwrap_or_default();
    assert!(
        error.starts_with(
            "payload does not fit kind \"send_email\": at `to.address`: invalid type: integer `42`"
        ),
        "{error}"
    );
    assert_eq!(job.result, None);
    worker.stop().await;
}

#[tokio::test]
async fn enqueue_many_takes_typed_args_and_answers_in_order() {
    let env = TestEnv::new().await;
    let worker = env.start_worker_with(env.cfg.clone(), registry());
    let client = env.client();
    let to: Vec<String> = (0..20).map(|i| format!("user{i}@example.com")).collect();
    let many = client
        .enqueue_many(to.iter().map(|a| email(a, "news")).collect())
        .await
        .expect("enqueue many");
    assert_eq!(many.len(), to.len());
    for (e, address) in many.iter().zip(&to) {
        assert!(e.created);
        let job = env.wait_for_status(e.job.id, JobStatus::Succeeded, T).await;
        assert_eq!(job.payload["to"]["address"], json!(address));
        assert_eq!(job.result, Some(json!({"to": address, "attempt": 1})));
    }
    // Typed jobs of several kinds, with the JSON API's jobs, in one batch.
    let mixed = vec![
        TypedJob::new(email("x@example.com", "mixed"))
            .with_max_attempts(2)
            .into_new_job_checked(),
        NewJob::new("other_kind", json!(1)),
    ];
    let mixed = client.enqueue_many(mixed).await.expect("enqueue mixed");
    assert_eq!(mixed[0].job.kind, "send_email");
    assert_eq!(mixed[0].job.max_attempts, 2);
    assert_eq!(mixed[1].job.kind, "other_kind");
    worker.stop().await;
}

/// [`apiary::IntoNewJob::into_new_job`] for arguments known to encode.
trait Checked {
    fn into_new_job_checked(self) -> NewJob;
}

impl<J: apiary::IntoNewJob> Checked for J {
    fn into_new_job_checked(self) -> NewJob {
        self.into_new_job().expect("these arguments encode")
    }
}

#[derive(Serialize, Deserialize)]
struct Grid {
    cells: BTreeMap<(i32, i32), i32>,
}

impl JobArgs for Grid {
    const KIND: &'static str = "grid";
}

#[tokio::test]
async fn arguments_without_a_json_form_are_refused_and_nothing_is_written() {
    let env = TestEnv::new().await;
    let client = env.client();
    let grid = || Grid {
        cells: BTreeMap::from([((0, 0), 1)]),
    };
    match client.enqueue(grid()).await {
        Err(EnqueueError::Encode { kind, source }) => {
            assert_eq!(kind, "grid");
            assert!(
                source.to_string().contains("key must be a string"),
                "{source}"
            );
        }
        other => panic!("expected an encode error, got {other:?}"),
    }
    let batch = client.enqueue_many(vec![grid(), grid()]).await;
    assert!(
        matches!(batch, Err(EnqueueError::Encode { kind: "grid", .. })),
        "{batch:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn wait_returns_an_unfinished_job_as_it_stands_at_the_deadline() {
    let env = TestEnv::new().await;
    let client = env.client();
    // No worker serves it, so it stays queued.
    let enq = client
        .enqueue(email("late@example.com", "x"))
        .await
        .expect("enqueue");
    let job = client
        .wait(enq.job.id, Duration::from_millis(300))
        .await
        .expect("wait")
        .expect("the job exists");
    assert_eq!(job.status(), JobStatus::Queued);
    let none = client
        .wait(uuid::Uuid::now_v7(), Duration::from_secs(5))
        .await
        .expect("wait");
    assert_eq!(none, None);
}

/// Like [`Mailer`], with its kind's queue and priority in its options.
struct QueuedMailer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Newsletter {
    issue: u32,
}

impl JobArgs for Newsletter {
    const KIND: &'static str = "newsletter";
}

impl Work for QueuedMailer {
    type Args = Newsletter;
    type Output = u32;

    async fn work(&self, args: Newsletter, _ctx: &mut JobContext) -> Result<u32, HandlerError> {
        Ok(args.issue)
    }

    fn options(&self) -> apiary::handler::KindOptions {
        apiary::handler::KindOptions {
            queue: Some("emails".into()),
            priority: Some(4),
            ..Default::default()
        }
    }
}

#[tokio::test]
async fn a_handlers_queue_and_priority_apply_to_its_jobs_once_the_client_knows_them() {
    let env = TestEnv::with_queues(&[("emails", 2)]).await;
    let mut registry = Registry::new();
    registry.add(QueuedMailer);
    let client = env.client();
    client.use_handler_options(&registry);
    let id = client
        .enqueue(Newsletter { issue: 7 })
        .await
        .expect("enqueue")
        .job
        .id;
    let worker = env.start_worker_with(env.cfg.clone(), registry);
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.queue, "emails");
    assert_eq!(job.priority, 4);
    assert_eq!(job.result_as::<u32>().expect("result"), Some(7));
    // The producer's own choice still wins over the handler's.
    let id = client
        .enqueue(TypedJob::new(Newsletter { issue: 8 }).with_priority(1))
        .await
        .expect("enqueue")
        .job
        .id;
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!((job.queue.as_str(), job.priority), ("emails", 1));
    worker.stop().await;
}
