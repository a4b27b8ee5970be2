//! A property test of the job state machine at the store: random sequences of the operations a
//! job goes through (enqueue, claim, finish with every outcome, cancel, a lapsed lease, rescue,
//! prune, replay, renew, detach, publish, the delay-tier check) run against a real Postgres,
//! beside a model that predicts each answer and each row. After every step the database must
//! match the model, every status change must be one `JobStatus::can_become` allows, and
//! `Store::check_invariants` must report nothing but the lapsed leases the sequence made.
//!
//! One database serves the whole run; each case uses fresh job and worker ids and deletes its
//! rows when it ends, so cases never see each other. Shrinking works on the plain [`Op`] list.
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default); `STATE_MACHINE_COVERAGE=1`
//! prints what the steps did (answers and status changes). Some finish batches carry a stale
//! completion of the same job beside the current one (the counterexample the property found
//! first is kept below as plain tests).

mod common;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use apiary::JobStatus;
use apiary::store::cancel_job::CancelOutcome;
use apiary::store::claim_job::{Claim, ClaimInput};
use apiary::store::dead_job::{ReplaySelector, Waiting};
use apiary::store::finish_job::{Finish, Finished, Lease, Outcome, finish_jobs};
use apiary::store::insert_job::{InsertOutcome, Inserted, JobRow};
use apiary::store::invariants::Quiet;
use apiary::store::rescue_job::RescueScope;
use apiary::wire::WireJob;
use chrono::{DateTime, Utc};
use common::TestEnv;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use uuid::Uuid;

/// Job slots per case; a case uses those its operations name.
const JOBS: usize = 3;
/// Worker ids per case.
const WORKERS: usize = 2;
/// Longest operation sequence.
const MAX_OPS: usize = 20;
/// A claim's lease: far longer than a case, so only `Expire` makes one lapse.
const LEASE: Duration = Duration::from_secs(30);
/// How far in the past `Expire` puts a lease: past the checker's rescue window (90 s), so the
/// checker reports every lapse the model knows of.
const EXPIRED_BY_SECS: i64 = 120;
/// How far ahead a "later" retry is due: far past the end of a case.
const RETRY_LATER_SECS: i64 = 600;

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// Which attempt number a worker names: the job's current one, or a stale or future one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Current,
    Stale,
    Ahead,
}

/// Which worker acts on a running job: the one holding its claim (worker 0 when none does),
/// or the other one (a stale worker whose claim was taken over, or a stranger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Holder,
    Other,
}

/// How a finished attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Succeeded,
    /// Succeeded with the handler's own database write, committed with the finish in one
    /// transaction (the executor's path for `ctx.tx()`): refused if a cancel came in.
    SucceededWithWrites,
    /// Retry, due at once.
    RetryNow,
    /// Retry, due in [`RETRY_LATER_SECS`].
    RetryLater,
    Dead,
    Cancelled,
    Released,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `Store::insert_jobs` of the job (again, after a prune: a new life under the same id).
    Enqueue(usize),
    /// A delivery of the job (recorded: true), or of an impostor with the job's id and another
    /// kind.
    Claim {
        worker: usize,
        job: usize,
        impostor: bool,
        /// Two deliveries of it in one batch.
        twice: bool,
    },
    Finish {
        who: Who,
        job: usize,
        attempt: Attempt,
        end: End,
        detached: bool,
        /// The batch also carries the same worker's completion of the attempt before, as the
        /// completer sends when a worker whose lease lapsed took its own job over (a stale
        /// handler and the new one finishing together): it must write nothing.
        stale_too: bool,
    },
    Cancel(usize),
    /// The running job's lease lapses (its worker died or stalled).
    Expire(usize),
    /// `rescue_expired(All)`.
    Rescue,
    /// `prune` with retention 0.
    Prune,
    Replay(usize),
    /// `replay_dead(All)`: every dead job, and never an impostor's conflict record.
    ReplayAll,
    Renew {
        who: Who,
        job: usize,
        attempt: Attempt,
    },
    /// `detach_job`: a long job's message is acked early.
    Detach {
        who: Who,
        job: usize,
        attempt: Attempt,
    },
    /// The enqueue's publish is confirmed: `delete_outbox` removes the row the enqueue wrote
    /// (never one rewritten since); the message is now in the broker.
    Publish(usize),
    /// The delay tiers ask whether a waiting message should hop on: `check_waiting`.
    Wait {
        job: usize,
        impostor: bool,
    },
}

#[derive(Debug, Clone)]
struct Case {
    /// Each job's `max_attempts`.
    budgets: [i32; JOBS],
    /// Whether each job has a dedup key.
    keyed: [bool; JOBS],
    /// Whether each job is enqueued before the first operation.
    enqueued: [bool; JOBS],
    ops: Vec<Op>,
}

fn attempt() -> impl Strategy<Value = Attempt> {
    prop_oneof![
        4 => Just(Attempt::Current),
        1 => Just(Attempt::Stale),
        1 => Just(Attempt::Ahead),
    ]
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        Just(End::Succeeded),
        Just(End::SucceededWithWrites),
        Just(End::RetryNow),
        Just(End::RetryLater),
        Just(End::Dead),
        Just(End::Cancelled),
        Just(End::Released),
    ]
}

/// A job slot, the first ones more often, so operations meet on the same job.
fn job() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![6 => Just(0), 2 => Just(1), 1 => Just(2)]
}

/// A worker, the first more often, so finishes and renewals often come from the claimer.
fn worker() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![3 => Just(0), 1 => Just(1)]
}

/// Whether a finish's batch also carries a stale completion of the same job (a stalled
/// worker whose lease lapsed, taking its own job over as the next attempt, then finishing
/// both together; see `a_batch_with_a_stale_completion_of_the_same_job_is_written`).
fn stale_too() -> BoxedStrategy<bool> {
    prop::bool::weighted(0.1).boxed()
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![4 => Just(Who::Holder), 1 => Just(Who::Other)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => job().prop_map(Op::Enqueue),
        8 => (worker(), job(), prop::bool::weighted(0.1), prop::bool::weighted(0.1))
            .prop_map(|(worker, job, impostor, twice)| Op::Claim { worker, job, impostor, twice }),
        8 => (who(), job(), attempt(), end(), prop::bool::weighted(0.25), stale_too())
            .prop_map(|(who, job, attempt, end, detached, stale_too)| Op::Finish {
                who, job, attempt, end, detached, stale_too
            }),
        1 => job().prop_map(Op::Cancel),
        3 => job().prop_map(Op::Expire),
        3 => Just(Op::Rescue),
        1 => Just(Op::Prune),
        2 => job().prop_map(Op::Replay),
        1 => Just(Op::ReplayAll),
        2 => (who(), job(), attempt())
            .prop_map(|(who, job, attempt)| Op::Renew { who, job, attempt }),
        1 => (who(), job(), attempt())
            .prop_map(|(who, job, attempt)| Op::Detach { who, job, attempt }),
        1 => job().prop_map(Op::Publish),
        1 => (job(), prop::bool::weighted(0.2)).prop_map(|(job, impostor)| Op::Wait { job, impostor }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::array::uniform3(1..=3i32),
        prop::array::uniform3(any::<bool>()),
        prop::array::uniform3(prop::bool::weighted(0.8)),
        prop::collection::vec(op(), 1..=MAX_OPS),
    )
        .prop_map(|(budgets, keyed, enqueued, ops)| Case {
            budgets,
            keyed,
            enqueued,
            ops,
        })
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    NotEnqueued,
    Live,
    Pruned,
}

/// The job's outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Letter {
    None,
    /// A job message to (re)publish.
    Job,
    /// A dead letter.
    Dead,
}

#[derive(Debug, Clone)]
struct Model {
    wire: WireJob,
    impostor: WireJob,
    budget: i32,
    life: Life,
    status: JobStatus,
    attempts: i32,
    worker: Option<usize>,
    lapsed: bool,
    cancel_requested: bool,
    /// A cancel answered `Requested` (the job was running) since the last replay: the job
    /// must never succeed.
    cancelled_while_running: bool,
    detached: bool,
    /// Retrying, due after the end of the case.
    due_later: bool,
    outbox: Letter,
    /// The outbox row is the one the enqueue wrote (not rewritten since for a retry, a rescue
    /// or a replay): only that row is deleted when the enqueue's publish is confirmed.
    enqueue_row: bool,
    /// A message for the job is in the broker or held by a worker (model-only: the broker is
    /// not in this test).
    message: bool,
    /// Lives so far (enqueues that created the row).
    lives: u32,
    /// Handler writes committed in this life: at most one, and only with a success.
    effects: i64,
    /// Attempt numbers claimed in this life and not given back by a release: no second claim
    /// may get one of them.
    burned: BTreeSet<i32>,
}

impl Model {
    fn new(id: Uuid, n: usize, budget: i32, keyed: bool) -> Model {
        let payload = format!("{{\"n\":{n}}}");
        let wire = WireJob {
            id,
            kind: "echo".into(),
            payload: serde_json::value::RawValue::from_string(payload.clone()).expect("json"),
            dedup_key: keyed.then(|| format!("key-{id}")),
            max_attempts: Some(budget),
            run_at: None,
            queue: None,
            priority: None,
            concurrency_key: None,
            callback_url: None,
            prefix: None,
        };
        let impostor = WireJob {
            kind: "impostor".into(),
            ..wire.clone()
        };
        Model {
            wire,
            impostor,
            budget,
            life: Life::NotEnqueued,
            status: JobStatus::Queued,
            attempts: 0,
            worker: None,
            lapsed: false,
            cancel_requested: false,
            cancelled_while_running: false,
            detached: false,
            due_later: false,
            outbox: Letter::None,
            enqueue_row: false,
            message: false,
            lives: 0,
            effects: 0,
            burned: BTreeSet::new(),
        }
    }

    fn id(&self) -> Uuid {
        self.wire.id
    }

    /// The `demo_tally` counter the handler's writes in this life go to.
    fn counter(&self) -> String {
        format!("{}:{}", self.id(), self.lives)
    }

    fn live(&self) -> bool {
        self.life == Life::Live
    }

    fn worker(&self, who: Who) -> usize {
        let holder = self.worker.unwrap_or(0);
        match who {
            Who::Holder => holder,
            Who::Other => (holder + 1) % WORKERS,
        }
    }

    fn attempt(&self, which: Attempt) -> i32 {
        match which {
            Attempt::Current => self.attempts,
            Attempt::Stale => self.attempts - 1,
            Attempt::Ahead => self.attempts + 1,
        }
    }

    /// Whether `worker` holds the claim on `attempt` (a lapsed lease still holds until another
    /// claim, the rescuer or a finish takes it).
    fn held(&self, worker: usize, attempt: i32) -> bool {
        self.live()
            && self.status == JobStatus::Running
            && self.worker == Some(worker)
            && self.attempts == attempt
    }

    /// A new life: recorded, queued, with its outbox row.
    fn enqueued(&mut self) {
        self.life = Life::Live;
        self.lives += 1;
        self.effects = 0;
        self.status = JobStatus::Queued;
        self.attempts = 0;
        self.worker = None;
        self.lapsed = false;
        self.cancel_requested = false;
        self.cancelled_while_running = false;
        self.detached = false;
        self.due_later = false;
        self.outbox = Letter::Job;
        self.enqueue_row = true;
        self.message = false;
        self.burned.clear();
    }

    /// Replayed: queued again with a fresh budget and an outbox row.
    fn replayed(&mut self) {
        self.status = JobStatus::Queued;
        self.attempts = 0;
        self.cancel_requested = false;
        self.cancelled_while_running = false;
        self.due_later = false;
        self.outbox = Letter::Job;
        self.enqueue_row = false;
        self.message = false;
        self.burned.clear();
    }

    /// Ends the claim without a worker: the job is no longer running.
    fn unclaimed(&mut self, status: JobStatus) {
        self.status = status;
        self.worker = None;
        self.lapsed = false;
        self.detached = false;
        if status == JobStatus::Dead {
            self.outbox = Letter::Dead;
            self.enqueue_row = false;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The database's view
// ---------------------------------------------------------------------------------------------

/// One job's row and outbox row, every column a write could change.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Row {
    id: Uuid,
    status: String,
    attempts: i32,
    max_attempts: i32,
    worker_id: Option<Uuid>,
    lease_until: Option<DateTime<Utc>>,
    lapsed: Option<bool>,
    cancel_requested: bool,
    detached: bool,
    next_attempt_at: Option<DateTime<Utc>>,
    due_later: Option<bool>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    result: Option<String>,
    error: Option<String>,
    errors: String,
    raw_body: Option<String>,
    /// None: no outbox row; Some(false): a job message; Some(true): a dead letter.
    letter: Option<bool>,
    letter_at: Option<DateTime<Utc>>,
}

impl Row {
    fn status(&self) -> JobStatus {
        self.status.parse().expect("a known status")
    }

    fn letter(&self) -> Letter {
        match self.letter {
            None => Letter::None,
            Some(false) => Letter::Job,
            Some(true) => Letter::Dead,
        }
    }
}

async fn rows(env: &TestEnv, ids: &[Uuid]) -> Result<BTreeMap<Uuid, Row>, TestCaseError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT j.id, j.status, j.attempts, j.max_attempts, j.worker_id, j.lease_until,
                j.lease_until < now() AS lapsed, j.cancel_requested, j.detached, j.next_attempt_at,
                j.next_attempt_at > now() + interval '1 second' AS due_later,
                j.started_at, j.finished_at, j.result::text AS result, j.error, j.errors::text AS errors,
                j.raw_body, o.dead_reason IS NOT NULL AS letter, o.created_at AS letter_at
           FROM apiary_jobs j LEFT JOIN apiary_outbox o ON o.job_id = j.id
          WHERE j.id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(env.store.pool())
    .await
    .map_err(fail)?;
    // A LEFT JOIN's missing outbox row reads as letter = NULL IS NOT NULL = false: tell a job
    // message from no row by the row's created_at.
    Ok(rows
        .into_iter()
        .map(|mut r| {
            if r.letter_at.is_none() {
                r.letter = None;
            }
            (r.id, r)
        })
        .collect())
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

struct World {
    jobs: Vec<Model>,
    workers: [Uuid; WORKERS],
    /// Conflict records made by impostors, and whether each exists now.
    conflicts: BTreeMap<Uuid, bool>,
    /// What happened so far, for failure messages.
    trace: Vec<String>,
    /// One label per step, for the coverage summary.
    seen: Vec<String>,
}

impl World {
    fn ids(&self) -> Vec<Uuid> {
        self.jobs
            .iter()
            .map(Model::id)
            .chain(self.conflicts.keys().copied())
            .collect()
    }
}

macro_rules! check {
    ($world:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!(
                "{}\n  after: {}",
                format!($($fmt)+),
                $world.trace.join("\n         ")
            )));
        }
    };
}

async fn run_case(
    env: &TestEnv,
    case: &Case,
    seen: &RefCell<BTreeMap<String, usize>>,
) -> Result<(), TestCaseError> {
    let mut world = World {
        jobs: (0..JOBS)
            .map(|n| Model::new(Uuid::now_v7(), n, case.budgets[n], case.keyed[n]))
            .collect(),
        workers: [Uuid::now_v7(), Uuid::now_v7()],
        conflicts: BTreeMap::new(),
        trace: Vec::new(),
        seen: Vec::new(),
    };
    let mut outcome = Ok(());
    let first = (0..JOBS).filter(|&j| case.enqueued[j]).map(Op::Enqueue);
    for op in first.chain(case.ops.iter().copied()) {
        if let Err(e) = step(env, &mut world, op).await {
            let reason = e.to_string();
            // A store error comes without the trace the checks add.
            outcome = Err(if reason.contains("\n  after: ") {
                e
            } else {
                TestCaseError::fail(format!(
                    "{reason}\n  during: {op:?}\n  after: {}",
                    world.trace.join("\n         ")
                ))
            });
            break;
        }
    }
    // Leave nothing behind for the next case (outbox rows go with their jobs).
    sqlx::query("DELETE FROM apiary_jobs WHERE id = ANY($1)")
        .bind(world.ids())
        .execute(env.store.pool())
        .await
        .map_err(fail)?;
    let counters: Vec<String> = world.jobs.iter().map(|m| m.id().to_string()).collect();
    sqlx::query("DELETE FROM demo_tally WHERE split_part(counter, ':', 1) = ANY($1)")
        .bind(&counters)
        .execute(env.store.pool())
        .await
        .map_err(fail)?;
    let mut seen = seen.borrow_mut();
    for label in world.seen {
        *seen.entry(label).or_default() += 1;
    }
    outcome
}

/// Resolves the job an operation names: finishes, renewals, detaches and expiries go to the
/// `j`-th running job (replays to the `j`-th dead one) if there is one, else to slot `j`, so
/// random sequences reach the interesting states often. The trace shows the resolved job.
fn resolve(w: &World, op: Op) -> Op {
    let pick = |j: usize, want: fn(&Model) -> bool| {
        let found: Vec<usize> = (0..JOBS).filter(|&k| want(&w.jobs[k])).collect();
        if found.is_empty() {
            j
        } else {
            found[j % found.len()]
        }
    };
    let running = |m: &Model| m.live() && m.status == JobStatus::Running;
    let dead = |m: &Model| m.live() && m.status == JobStatus::Dead;
    match op {
        Op::Finish {
            who,
            job,
            attempt,
            end,
            detached,
            stale_too,
        } => Op::Finish {
            who,
            job: pick(job, running),
            attempt,
            end,
            detached,
            stale_too,
        },
        Op::Renew { who, job, attempt } => Op::Renew {
            who,
            job: pick(job, running),
            attempt,
        },
        Op::Detach { who, job, attempt } => Op::Detach {
            who,
            job: pick(job, running),
            attempt,
        },
        Op::Expire(job) => Op::Expire(pick(job, running)),
        Op::Replay(job) => Op::Replay(pick(job, dead)),
        op => op,
    }
}

async fn step(env: &TestEnv, w: &mut World, op: Op) -> Result<(), TestCaseError> {
    let op = resolve(w, op);
    let ids = w.ids();
    let before = rows(env, &ids).await?;
    // The jobs this step may write; every other row must stay exactly as it was.
    let mut touched: BTreeSet<usize> = BTreeSet::new();
    let store = &env.store;
    match op {
        Op::Enqueue(j) => {
            let m = &mut w.jobs[j];
            let row = JobRow {
                id: m.id(),
                kind: m.wire.kind.clone(),
                payload: m.wire.payload.clone(),
                dedup_key: m.wire.dedup_key.clone(),
                max_attempts: m.budget,
                run_at: None,
                queue: "default".into(),
                prefix: env.cfg.queue.clone(),
                priority: 0,
                concurrency_key: None,
                depends_on: Vec::new(),
                batch_id: None,
                callback_url: None,
                trace: None,
            };
            let got = store.insert_jobs(&[row], false).await.map_err(fail)?;
            let answer = format!("{got:?}");
            let ok = match (&got, m.life) {
                (InsertOutcome::Written(v), Life::Live) => v == &[Inserted::Existing(m.id())],
                (InsertOutcome::Written(v), _) => matches!(v.as_slice(), [Inserted::New(_)]),
                _ => false,
            };
            w.trace.push(format!("{op:?} -> {answer}"));
            check!(w, ok, "enqueue answered {answer}");
            let m = &mut w.jobs[j];
            if !m.live() {
                m.enqueued();
                touched.insert(j);
            }
        }
        Op::Claim {
            worker,
            job: j,
            impostor,
            twice,
        } => {
            let m = &w.jobs[j];
            let msg = if impostor { &m.impostor } else { &m.wire };
            let input = ClaimInput {
                job: msg,
                budget: m.budget,
                recorded: true,
                prefix: &env.cfg.queue,
            };
            let inputs = if twice { vec![input; 2] } else { vec![input] };
            let got = store
                .claim_jobs(&inputs, w.workers[worker], LEASE)
                .await
                .map_err(fail)?
                .claims;
            let answer = format!("{got:?}");
            w.trace.push(format!("{op:?} -> {answer}"));
            let m = &w.jobs[j];
            let first = if !m.live() {
                // (6) A recorded message of a pruned (or never recorded) job is gone.
                Claim::Gone
            } else if impostor {
                let cid = apiary::wire::conflict_id(m.id(), &m.impostor.to_body());
                w.conflicts.insert(cid, true);
                Claim::Conflict(cid)
            } else {
                let workers = w.workers;
                let (expected, changes) = expect_claim(&mut w.jobs[j], worker, &workers);
                if changes {
                    touched.insert(j);
                }
                expected
            };
            // A second delivery of the job in the same batch never runs: it finds the job
            // busy under the first, or the first's settlement already made (then "again").
            let second = match &first {
                Claim::Claimed {
                    attempt,
                    max_attempts,
                } => Claim::Busy {
                    until: Utc::now(),
                    worker: w.workers[worker],
                    attempt: *attempt,
                    max_attempts: *max_attempts,
                },
                Claim::Cancelled | Claim::Exhausted => Claim::Again,
                other => other.clone(),
            };
            let expected = if twice {
                vec![first, second]
            } else {
                vec![first]
            };
            let ok = expected.len() == got.len()
                && expected.iter().zip(&got).all(|(e, g)| same_claim(e, g));
            check!(
                w,
                ok,
                "claim answered {answer}, the model expected {expected:?}"
            );
            if let Some(Claim::Claimed { attempt, .. }) = got.first() {
                // (3) No two claims get the same attempt unless a release gave it back.
                let attempt = *attempt;
                let fresh = w.jobs[j].burned.insert(attempt);
                check!(
                    w,
                    fresh,
                    "attempt {attempt} was claimed a second time without being given back"
                );
            }
        }
        Op::Finish {
            who,
            job: j,
            attempt,
            end,
            detached,
            stale_too,
        } => {
            let m = &w.jobs[j];
            let (worker, a) = (m.worker(who), m.attempt(attempt));
            let outcome = match end {
                End::Succeeded | End::SucceededWithWrites => Outcome::Succeeded(
                    serde_json::value::RawValue::from_string("\"done\"".into()).expect("json"),
                ),
                End::RetryNow => Outcome::Retry {
                    error: "try again".into(),
                    at: Utc::now(),
                },
                End::RetryLater => Outcome::Retry {
                    error: "try again later".into(),
                    at: Utc::now() + chrono::Duration::seconds(RETRY_LATER_SECS),
                },
                End::Dead => Outcome::Dead("gave up".into()),
                End::Cancelled => Outcome::Cancelled,
                End::Released => Outcome::Released,
            };
            let status = outcome.status();
            // The attempt of the batch that holds the claim, if one does.
            let holds = [a, a - 1]
                .into_iter()
                .take(if stale_too { 2 } else { 1 })
                .find(|&n| m.held(worker, n));
            let finish = |outcome: Outcome| {
                let stale = Finish {
                    id: m.id(),
                    attempt: a - 1,
                    outcome: outcome.clone(),
                    detached,
                };
                let this = Finish {
                    id: m.id(),
                    attempt: a,
                    outcome,
                    detached,
                };
                if stale_too {
                    vec![stale, this]
                } else {
                    vec![this]
                }
            };
            let got = if end == End::SucceededWithWrites {
                // As the executor does: the handler's write and the success in one transaction;
                // if the finish is refused, roll back and record the cancellation on its own.
                let mut tx = store.pool().begin().await.map_err(fail)?;
                sqlx::query(
                    "INSERT INTO demo_tally (counter, value) VALUES ($1, 1)
                     ON CONFLICT (counter) DO UPDATE SET value = demo_tally.value + 1",
                )
                .bind(m.counter())
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
                let done = finish_jobs(&mut *tx, w.workers[worker], &finish(outcome), true)
                    .await
                    .map_err(fail)?;
                let refused = done.is_empty();
                let must_refuse = holds.is_none() || m.cancel_requested;
                check!(
                    w,
                    refused == must_refuse,
                    "a success with the handler's writes answered {done:?} \
                     (held {holds:?}, cancel requested {})",
                    m.cancel_requested
                );
                if refused {
                    tx.rollback().await.map_err(fail)?;
                    store
                        .finish_jobs(w.workers[worker], &finish(Outcome::Cancelled))
                        .await
                        .map_err(fail)?
                } else {
                    tx.commit().await.map_err(fail)?;
                    done
                }
            } else {
                store
                    .finish_jobs(w.workers[worker], &finish(outcome))
                    .await
                    .map_err(fail)?
            };
            let answer = format!("{got:?}");
            w.trace
                .push(format!("{op:?} (worker {worker}, attempt {a}) -> {answer}"));
            let m = &mut w.jobs[j];
            if let Some(a) = holds {
                let ends = if m.cancel_requested {
                    JobStatus::Cancelled
                } else {
                    status
                };
                let expected = [Finished {
                    id: m.id(),
                    attempt: a,
                    status: ends,
                    webhook: None,
                }];
                if end == End::Released {
                    m.attempts -= 1;
                    m.burned.remove(&a);
                }
                if end == End::SucceededWithWrites && ends == JobStatus::Succeeded {
                    m.effects += 1;
                }
                m.unclaimed(ends);
                m.due_later = ends == JobStatus::Retrying && end == End::RetryLater;
                if ends == JobStatus::Retrying || (ends == JobStatus::Queued && detached) {
                    m.outbox = Letter::Job;
                    m.enqueue_row = false;
                }
                // The worker acks its delivery, except a release of a message it still holds,
                // which it hands back to the broker.
                m.message = !detached && end == End::Released;
                touched.insert(j);
                check!(
                    w,
                    got == expected,
                    "finish answered {answer}, the model expected {expected:?}"
                );
            } else {
                check!(
                    w,
                    got.is_empty(),
                    "a finish of attempt {a} by a worker that does not hold it wrote {answer}"
                );
            }
        }
        Op::Cancel(j) => {
            let m = &mut w.jobs[j];
            let got = store.cancel_job(m.id()).await.map_err(fail)?;
            let answer = format!("{got:?}");
            let expected = if !m.live() {
                CancelOutcome::NotFound
            } else {
                match m.status {
                    JobStatus::Queued | JobStatus::Retrying => {
                        m.cancel_requested = true;
                        m.status = JobStatus::Cancelled;
                        m.due_later = false;
                        touched.insert(j);
                        CancelOutcome::Cancelled
                    }
                    JobStatus::Running => {
                        m.cancel_requested = true;
                        m.cancelled_while_running = true;
                        touched.insert(j);
                        CancelOutcome::Requested
                    }
                    s => CancelOutcome::AlreadyFinal(s),
                }
            };
            w.trace.push(format!("{op:?} -> {answer}"));
            check!(
                w,
                got == expected,
                "cancel answered {answer}, the model expected {expected:?}"
            );
        }
        Op::Expire(j) => {
            let m = &mut w.jobs[j];
            sqlx::query(
                "UPDATE apiary_jobs SET lease_until = now() - $2 * interval '1 second'
                  WHERE id = $1 AND status = 'running'",
            )
            .bind(m.id())
            .bind(EXPIRED_BY_SECS)
            .execute(store.pool())
            .await
            .map_err(fail)?;
            if m.live() && m.status == JobStatus::Running {
                m.lapsed = true;
                touched.insert(j);
            }
            w.trace.push(format!("{op:?}"));
        }
        Op::Rescue => {
            let got = store
                .rescue_expired(RescueScope::All, 10_000)
                .await
                .map_err(fail)?;
            let answer = format!("{got:?}");
            w.trace.push(format!("{op:?} -> {answer}"));
            check!(
                w,
                got.is_some(),
                "no one else holds the rescue lock, yet it was refused"
            );
            let got: BTreeSet<Uuid> = got.into_iter().flatten().collect();
            let mut expected = BTreeSet::new();
            for (j, m) in w.jobs.iter_mut().enumerate() {
                if m.live() && m.status == JobStatus::Running && m.lapsed {
                    expected.insert(m.id());
                    let to = if m.cancel_requested {
                        JobStatus::Cancelled
                    } else if m.attempts >= m.budget {
                        JobStatus::Dead
                    } else {
                        JobStatus::Queued
                    };
                    m.unclaimed(to);
                    if to == JobStatus::Queued {
                        m.outbox = Letter::Job;
                        m.enqueue_row = false;
                    }
                    touched.insert(j);
                }
            }
            check!(
                w,
                got == expected,
                "rescue took {got:?}, the model expected {expected:?}"
            );
        }
        Op::Prune => {
            let got = store
                .prune(Duration::ZERO, &[], 1000, 100)
                .await
                .map_err(fail)?;
            let answer = format!("{got:?}");
            w.trace.push(format!("{op:?} -> {answer}"));
            let mut expected = 0u64;
            for (j, m) in w.jobs.iter_mut().enumerate() {
                if m.live() && m.status.is_final() {
                    m.life = Life::Pruned;
                    m.outbox = Letter::None;
                    expected += 1;
                    touched.insert(j);
                }
            }
            for exists in w.conflicts.values_mut() {
                expected += u64::from(std::mem::replace(exists, false));
            }
            check!(
                w,
                got == Some(expected),
                "prune deleted {got:?} jobs, the model expected {expected}"
            );
        }
        Op::Replay(j) => {
            let m = &mut w.jobs[j];
            let got = store
                .replay_dead(&ReplaySelector::Id(m.id()))
                .await
                .map_err(fail)?;
            let answer = format!(
                "replayed {:?}",
                got.iter().map(|g| g.id).collect::<Vec<_>>()
            );
            w.trace.push(format!("{op:?} -> {answer}"));
            let m = &mut w.jobs[j];
            if m.live() && matches!(m.status, JobStatus::Dead | JobStatus::Failed) {
                let same = matches!(got.as_slice(), [g] if g.id == m.id()
                    && g.kind == m.wire.kind
                    && g.payload.get() == m.wire.payload.get()
                    && g.dedup_key == m.wire.dedup_key
                    && g.max_attempts == Some(m.budget));
                m.replayed();
                touched.insert(j);
                check!(w, same, "replay of a dead job returned {answer}");
            } else {
                check!(
                    w,
                    got.is_empty(),
                    "replay of a job that is not dead returned {answer}"
                );
            }
        }
        Op::ReplayAll => {
            let got = store
                .replay_dead(&ReplaySelector::All)
                .await
                .map_err(fail)?;
            let got: BTreeSet<Uuid> = got.into_iter().map(|g| g.id).collect();
            w.trace.push(format!("{op:?} -> replayed {got:?}"));
            let mut expected = BTreeSet::new();
            for (j, m) in w.jobs.iter_mut().enumerate() {
                if m.live() && m.status == JobStatus::Dead {
                    expected.insert(m.id());
                    m.replayed();
                    touched.insert(j);
                }
            }
            check!(
                w,
                got == expected,
                "replay of every dead job returned {got:?}, the model expected {expected:?}"
            );
        }
        Op::Renew {
            who,
            job: j,
            attempt,
        } => {
            let m = &mut w.jobs[j];
            let (worker, a) = (m.worker(who), m.attempt(attempt));
            let got = store
                .renew_leases(w.workers[worker], &[(m.id(), a)], LEASE)
                .await
                .map_err(fail)?;
            let answer = format!("{got:?}");
            let m = &mut w.jobs[j];
            let held = m.held(worker, a);
            // A finished job reads as held: the heartbeat must not take a job this worker's
            // own completer just ended for a lost claim.
            let expected = vec![Lease {
                id: m.id(),
                attempt: a,
                held: held || (m.live() && m.status.is_final()),
                cancel_requested: m.live() && m.cancel_requested,
            }];
            if held {
                m.lapsed = false;
                touched.insert(j);
            }
            w.trace
                .push(format!("{op:?} (worker {worker}, attempt {a}) -> {answer}"));
            check!(
                w,
                got == expected,
                "renew answered {answer}, the model expected {expected:?}"
            );
        }
        Op::Detach {
            who,
            job: j,
            attempt,
        } => {
            let m = &w.jobs[j];
            let (worker, a) = (m.worker(who), m.attempt(attempt));
            let got = store
                .detach_job(m.id(), w.workers[worker], a)
                .await
                .map_err(fail)?;
            let answer = format!("{got:?}");
            w.trace
                .push(format!("{op:?} (worker {worker}, attempt {a}) -> {answer}"));
            let m = &mut w.jobs[j];
            let held = m.held(worker, a);
            if held {
                m.detached = true;
                touched.insert(j);
            }
            check!(
                w,
                got == held,
                "detach answered {answer}, the model expected {held}"
            );
        }
        Op::Publish(j) => {
            let m = &mut w.jobs[j];
            store.delete_outbox(&[m.id()]).await.map_err(fail)?;
            if m.live() && m.outbox == Letter::Job && m.enqueue_row {
                m.outbox = Letter::None;
                m.message = true;
                touched.insert(j);
            }
            w.trace.push(format!("{op:?}"));
        }
        Op::Wait { job: j, impostor } => {
            let m = &w.jobs[j];
            let msg = if impostor { &m.impostor } else { &m.wire };
            let got = store
                .check_waiting(&[ClaimInput {
                    job: msg,
                    budget: m.budget,
                    recorded: true,
                    prefix: &env.cfg.queue,
                }])
                .await
                .map_err(fail)?;
            let answer = format!("{got:?}");
            w.trace.push(format!("{op:?} -> {answer}"));
            let expected = if !m.live() {
                Waiting::Gone
            } else if impostor {
                Waiting::Conflict
            } else if m.status.is_final() {
                Waiting::Finished
            } else {
                Waiting::Hop
            };
            check!(
                w,
                got == [expected],
                "check_waiting answered {answer}, the model expected {expected:?}"
            );
        }
    }
    let after = rows(env, &w.ids()).await?;
    compare(env, w, &before, &after, &touched, op).await?;
    tally(w, op, &before, &after, &touched);
    Ok(())
}

/// Notes what the step did, for the coverage summary: the operation, its answer, and the
/// status changes it made.
fn tally(
    w: &mut World,
    op: Op,
    before: &BTreeMap<Uuid, Row>,
    after: &BTreeMap<Uuid, Row>,
    touched: &BTreeSet<usize>,
) {
    let head = |s: &str| s.split(['(', ' ', '{']).next().unwrap_or("").to_string();
    let name = head(&format!("{op:?}"));
    let answer = w
        .trace
        .last()
        .and_then(|t| t.split(" -> ").nth(1))
        .map(|a| head(a.trim_start_matches('[')))
        .unwrap_or_default();
    let status = |rows: &BTreeMap<Uuid, Row>, id: &Uuid| {
        rows.get(id)
            .map_or("none".to_string(), |r| r.status.clone())
    };
    let mut label = format!("{name} {answer}");
    let job = match op {
        Op::Enqueue(j) | Op::Cancel(j) | Op::Expire(j) | Op::Replay(j) | Op::Publish(j) => Some(j),
        Op::Claim { job, .. }
        | Op::Finish { job, .. }
        | Op::Renew { job, .. }
        | Op::Detach { job, .. }
        | Op::Wait { job, .. } => Some(job),
        Op::Rescue | Op::Prune | Op::ReplayAll => None,
    };
    if let Some(j) = job.filter(|_| touched.is_empty()) {
        label.push_str(&format!(" ({})", status(before, &w.jobs[j].id())));
    }
    for &j in touched {
        let id = w.jobs[j].id();
        label.push_str(&format!(" {}->{}", status(before, &id), status(after, &id)));
    }
    w.seen.push(label);
}

/// Whether a claim's answer is the expected one: only the lease's end and the time left are
/// the clock's to say.
fn same_claim(expected: &Claim, got: &Claim) -> bool {
    match (expected, got) {
        (
            Claim::Busy {
                worker: ew,
                attempt: ea,
                ..
            },
            Claim::Busy {
                worker: gw,
                attempt: ga,
                ..
            },
        ) => ew == gw && ea == ga,
        (Claim::NotDue { .. }, Claim::NotDue { remaining_ms }) => *remaining_ms > 0,
        (e, g) => e == g,
    }
}

/// What a claim of the real message should answer, with the model updated to match, and
/// whether the claim writes the job's row.
fn expect_claim(m: &mut Model, worker: usize, workers: &[Uuid; WORKERS]) -> (Claim, bool) {
    use JobStatus::*;
    let claimed = |m: &mut Model| {
        m.status = Running;
        m.attempts += 1;
        m.worker = Some(worker);
        m.lapsed = false;
        m.due_later = false;
        // A new attempt holds its own delivery: not detached, whatever the last one was.
        m.detached = false;
        // The claim came with a delivery, which the worker now holds.
        m.message = true;
        Claim::Claimed {
            attempt: m.attempts,
            max_attempts: m.budget,
        }
    };
    match m.status {
        s if s.is_final() => (Claim::Finished, false),
        Running if !m.lapsed => (
            Claim::Busy {
                until: Utc::now(),
                worker: m.worker.map(|k| workers[k]).unwrap_or_default(),
                attempt: m.attempts,
                max_attempts: m.budget,
            },
            false,
        ),
        Running if !m.cancel_requested && m.attempts < m.budget => (claimed(m), true),
        Running if m.cancel_requested => {
            m.unclaimed(Cancelled);
            (Claim::Cancelled, true)
        }
        Running => {
            m.unclaimed(Dead);
            (Claim::Exhausted, true)
        }
        _ if m.cancel_requested => {
            m.unclaimed(Cancelled);
            (Claim::Cancelled, true)
        }
        _ if m.due_later => (Claim::NotDue { remaining_ms: 0 }, false),
        _ if m.attempts < m.budget => (claimed(m), true),
        _ => {
            m.unclaimed(Dead);
            m.due_later = false;
            (Claim::Exhausted, true)
        }
    }
}

/// The checks after every step.
async fn compare(
    env: &TestEnv,
    w: &World,
    before: &BTreeMap<Uuid, Row>,
    after: &BTreeMap<Uuid, Row>,
    touched: &BTreeSet<usize>,
    op: Op,
) -> Result<(), TestCaseError> {
    for (j, m) in w.jobs.iter().enumerate() {
        let id = m.id();
        let (was, now) = (before.get(&id), after.get(&id));
        if !touched.contains(&j) {
            check!(
                w,
                was == now,
                "job {j} was written by a step that must not touch it:\n  before {was:?}\n  after  {now:?}"
            );
        }
        // (1) and (2): the observed transition.
        match (was, now) {
            (Some(a), Some(b)) => {
                let (from, to) = (a.status(), b.status());
                check!(
                    w,
                    from == to || from.can_become(to),
                    "job {j} went {from} -> {to}, which can_become does not allow"
                );
                check!(
                    w,
                    !from.is_final()
                        || from == to
                        || (matches!(from, JobStatus::Dead | JobStatus::Failed)
                            && to == JobStatus::Queued
                            && b.attempts == 0),
                    "job {j} left the final status {from} for {to} (attempts {})",
                    b.attempts
                );
            }
            (None, Some(_)) => check!(
                w,
                op == Op::Enqueue(j),
                "job {j} appeared (again) without an enqueue"
            ),
            _ => {}
        }
        // The row against the model.
        let Some(r) = now else {
            check!(
                w,
                !m.live(),
                "job {j} is missing; the model has it {:?}",
                m.status
            );
            continue;
        };
        check!(w, m.live(), "job {j} exists; the model has it {:?}", m.life);
        let status = r.status();
        let worker = m.worker.map(|k| w.workers[k]);
        check!(
            w,
            status == m.status
                && r.attempts == m.attempts
                && r.max_attempts == m.budget
                && r.worker_id == worker
                && r.cancel_requested == m.cancel_requested
                && r.detached == m.detached
                && r.letter() == m.outbox,
            "job {j} is {r:#?}\n  the model has {m:#?}"
        );
        check!(
            w,
            (status == JobStatus::Running) == r.lease_until.is_some()
                && (status != JobStatus::Running || r.lapsed == Some(m.lapsed)),
            "job {j}'s lease is {:?} (lapsed {:?}); the model says lapsed {}",
            r.lease_until,
            r.lapsed,
            m.lapsed
        );
        check!(
            w,
            (status == JobStatus::Retrying) == r.next_attempt_at.is_some()
                && r.due_later.unwrap_or(false) == m.due_later,
            "job {j} is {status} due at {:?}; the model says due later {}",
            r.next_attempt_at,
            m.due_later
        );
        check!(
            w,
            status.is_final() == r.finished_at.is_some()
                && (status == JobStatus::Succeeded) == r.result.is_some(),
            "job {j} is {status} finished at {:?} with result {:?}",
            r.finished_at,
            r.result
        );
        // (3) Attempts stay within the budget.
        check!(
            w,
            r.attempts <= r.max_attempts,
            "job {j} has {} attempts of {}",
            r.attempts,
            r.max_attempts
        );
        // (4) A cancellation accepted while it ran means it never succeeds.
        check!(
            w,
            !(m.cancelled_while_running && status == JobStatus::Succeeded),
            "job {j} succeeded after its cancellation was accepted while it ran"
        );
        // (7) An unfinished job is carried: by an outbox row, or by a message.
        if matches!(status, JobStatus::Queued | JobStatus::Retrying) {
            check!(
                w,
                r.letter() == Letter::Job || m.message,
                "job {j} is {status} with no outbox row and no message"
            );
        }
        if status == JobStatus::Dead {
            check!(
                w,
                r.letter() == Letter::Dead,
                "job {j} is dead with no dead letter queued"
            );
        }
    }
    // Run nothing twice: the handler's writes committed once at most per life, only with the
    // success that carried them.
    let counters: Vec<String> = w.jobs.iter().map(Model::counter).collect();
    let effects: BTreeMap<String, i64> =
        sqlx::query_as("SELECT counter, value FROM demo_tally WHERE counter = ANY($1)")
            .bind(&counters)
            .fetch_all(env.store.pool())
            .await
            .map_err(fail)?
            .into_iter()
            .collect();
    for (j, m) in w.jobs.iter().enumerate() {
        let got = effects.get(&m.counter()).copied().unwrap_or(0);
        check!(
            w,
            got == m.effects && got <= 1,
            "job {j}'s handler writes committed {got} times; the model expected {}",
            m.effects
        );
    }
    // Impostors' records: dead, not replayable, their letter queued; gone once pruned.
    if !w.conflicts.is_empty() {
        for (cid, exists) in &w.conflicts {
            match after.get(cid) {
                Some(r) => check!(
                    w,
                    *exists
                        && r.status() == JobStatus::Dead
                        && r.raw_body.is_some()
                        && r.letter() == Letter::Dead,
                    "conflict record {cid} is {r:#?}"
                ),
                None => check!(w, !exists, "conflict record {cid} is missing"),
            }
        }
    }
    // (5) The invariants checker sees nothing wrong but the lapses the sequence made.
    let ours: BTreeSet<Uuid> = w.ids().into_iter().collect();
    let violations = env
        .store
        .check_invariants(Quiet::Live { dead_letters: None })
        .await
        .map_err(fail)?;
    let mut lapsed = BTreeSet::new();
    for v in violations {
        match v.job {
            Some(id) if !ours.contains(&id) => {}
            Some(id)
                if v.invariant == "1 carried"
                    && v.detail.contains("lease lapsed")
                    && w.jobs.iter().any(|m| m.id() == id && m.live() && m.lapsed) =>
            {
                lapsed.insert(id);
            }
            _ => check!(w, false, "check_invariants reports {v:?}"),
        }
    }
    let expected: BTreeSet<Uuid> = w
        .jobs
        .iter()
        .filter(|m| m.live() && m.status == JobStatus::Running && m.lapsed)
        .map(Model::id)
        .collect();
    check!(
        w,
        lapsed == expected,
        "check_invariants reports the lapsed leases of {lapsed:?}; the model has {expected:?}"
    );
    Ok(())
}

#[test]
fn every_sequence_of_operations_keeps_the_invariants() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _inside = rt.enter();
    let env = rt.block_on(TestEnv::new());
    let mut config = Config {
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let steps = Cell::new(0usize);
    let seen = RefCell::new(BTreeMap::new());
    let started = Instant::now();
    let result = runner.run(&case(), |case| {
        steps.set(steps.get() + case.ops.len());
        rt.block_on(run_case(&env, &case, &seen))
    });
    eprintln!(
        "state machine: {cases} cases, {} steps (shrinking included) in {:.1?}",
        steps.get(),
        started.elapsed()
    );
    if std::env::var_os("STATE_MACHINE_COVERAGE").is_some() {
        for (label, n) in seen.borrow().iter() {
            eprintln!("{n:>6}  {label}");
        }
    }
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => {
            panic!("minimal failing case: {case:#?}\n{reason}")
        }
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Counterexamples found by the property, kept as plain tests
// ---------------------------------------------------------------------------------------------

fn wire_of(m: &Model) -> ClaimInput<'_> {
    ClaimInput {
        job: &m.wire,
        budget: m.budget,
        recorded: true,
        prefix: "apiary.state",
    }
}

/// A job recorded by `insert_jobs`, queued with its outbox row.
async fn recorded_job(env: &TestEnv, budget: i32) -> Model {
    let m = Model::new(Uuid::now_v7(), 0, budget, false);
    let row = JobRow {
        id: m.id(),
        kind: m.wire.kind.clone(),
        payload: m.wire.payload.clone(),
        dedup_key: None,
        max_attempts: budget,
        run_at: None,
        queue: "default".into(),
        prefix: env.cfg.queue.clone(),
        priority: 0,
        concurrency_key: None,
        depends_on: Vec::new(),
        batch_id: None,
        callback_url: None,
        trace: None,
    };
    env.store.insert_jobs(&[row], false).await.expect("insert");
    m
}

/// A worker whose lease lapsed (its heartbeat stalled) gets the job's message again and takes
/// its own job over: attempt 2, while the handler of attempt 1 still runs. Both finish at once
/// and the completer writes them in one batch; attempt 1's entry must write nothing and
/// attempt 2's retry must commit. Found shrunk to: claim, then a finish batch of the current
/// attempt with a retry plus one more entry for the same job.
///
/// The whole statement used to fail with "ON CONFLICT DO UPDATE command cannot affect row a
/// second time" (SQLSTATE 21000): `finish_jobs` joined the one updated row to *every* input row
/// with its id, whatever the attempt, so a retry inserted the same `job_id` into the outbox
/// twice. Not a data error, so the completer retried the same batch forever and every
/// completion in it stayed uncommitted. The finish now returns the input row that matched.
#[tokio::test]
async fn a_batch_with_a_stale_completion_of_the_same_job_is_written() {
    let env = TestEnv::new().await;
    let m = recorded_job(&env, 3).await;
    let worker = Uuid::now_v7();
    for expected in [1, 2] {
        let got = env
            .store
            .claim_jobs(&[wire_of(&m)], worker, LEASE)
            .await
            .expect("claim")
            .claims;
        assert_eq!(
            got,
            [Claim::Claimed {
                attempt: expected,
                max_attempts: 3
            }]
        );
        // The heartbeat stalls: the lease lapses and the next delivery takes the job over.
        sqlx::query(
            "UPDATE apiary_jobs SET lease_until = now() - interval '1 second' WHERE id = $1",
        )
        .bind(m.id())
        .execute(env.store.pool())
        .await
        .expect("lapse");
    }
    let retry = |attempt| Finish {
        id: m.id(),
        attempt,
        outcome: Outcome::Retry {
            error: "try again".into(),
            at: Utc::now(),
        },
        detached: false,
    };
    let done = env
        .store
        .finish_jobs(worker, &[retry(1), retry(2)])
        .await
        .expect("a batch with a stale entry must be written, the stale entry writing nothing");
    assert_eq!(
        done,
        [Finished {
            id: m.id(),
            attempt: 2,
            status: JobStatus::Retrying,
            webhook: None,
        }]
    );
}

/// The same fault on the drain's path: `release_stuck` (src/worker/mod.rs) releases every
/// attempt the worker still runs in one batch, so a long (detached) job whose worker took it
/// over from itself has two `Released, detached` entries; the outbox CTE inserted its row twice
/// and the release failed (the leases then lapsed and the rescuer put the job back, later).
#[tokio::test]
async fn a_drain_releasing_two_attempts_of_one_long_job_is_written() {
    let env = TestEnv::new().await;
    let m = recorded_job(&env, 3).await;
    let worker = Uuid::now_v7();
    for expected in [1, 2] {
        let got = env
            .store
            .claim_jobs(&[wire_of(&m)], worker, LEASE)
            .await
            .expect("claim")
            .claims;
        assert_eq!(
            got,
            [Claim::Claimed {
                attempt: expected,
                max_attempts: 3
            }]
        );
        assert!(
            env.store
                .detach_job(m.id(), worker, expected)
                .await
                .expect("detach")
        );
        sqlx::query(
            "UPDATE apiary_jobs SET lease_until = now() - interval '1 second' WHERE id = $1",
        )
        .bind(m.id())
        .execute(env.store.pool())
        .await
        .expect("lapse");
    }
    let release = |attempt| Finish {
        id: m.id(),
        attempt,
        outcome: Outcome::Released,
        detached: true,
    };
    let done = env
        .store
        .finish_jobs(worker, &[release(1), release(2)])
        .await
        .expect("a release batch with a stale entry must be written");
    assert_eq!(
        done,
        [Finished {
            id: m.id(),
            attempt: 2,
            status: JobStatus::Queued,
            webhook: None,
        }]
    );
}
