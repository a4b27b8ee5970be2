//! Test support: every test gets its own database and its own queue names on the real
//! Postgres and RabbitMQ, removed again when the test ends, so tests run in parallel and
//! leave nothing behind. Waits poll observable state against a deadline; nothing sleeps blind.

#![allow(dead_code)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use apiary::broker::topology::QueueType;
use apiary::broker::{self, QueueNames};
use apiary::config::Config;
use apiary::store::Store;
use apiary::{Client, Job, JobId, JobStatus, Registry, Shutdown, Worker};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const PG_ROOT: &str = "postgres://postgres@127.0.0.1:5432";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The connection pool of each worker and client in a test (`APIARY_DB_POOL`).
pub const TEST_DB_POOL: u32 = 6;

/// One test's private world: a database and a queue name.
pub struct TestEnv {
    pub name: String,
    pub cfg: Config,
    pub store: Store,
    /// Named queues this test uses besides `default`: their broker queues go with the test.
    pub queues: Vec<String>,
    /// The Postgres server holding the database (`postgres://user@host:port`), where the
    /// database is dropped when the test ends.
    pub pg_root: String,
    /// The broker addresses the queues were declared on (`AMQP_URL`, maybe a list), where
    /// they are deleted when the test ends.
    pub amqp_url: String,
}

impl TestEnv {
    /// A migrated database and declared queues, named after a fresh id.
    pub async fn new() -> TestEnv {
        TestEnv::with_queue_type(QueueType::Classic).await
    }

    /// [`TestEnv::new`] with its queues declared as `kind` (`APIARY_QUEUE_TYPE`).
    pub async fn with_queue_type(kind: QueueType) -> TestEnv {
        TestEnv::on(AMQP, PG_ROOT, kind).await
    }

    /// A world on other servers than the shared ones: its database on the Postgres at
    /// `pg_root` (`postgres://postgres@127.0.0.1:5451`, no database), its queues declared as
    /// `kind` on the broker `amqp_url` (one address or a comma-separated list, tried in
    /// order, as `AMQP_URL`). Both are removed again from there when the test ends.
    pub async fn on(amqp_url: &str, pg_root: &str, kind: QueueType) -> TestEnv {
        let short = Uuid::new_v4().simple().to_string()[..12].to_string();
        let name = format!("apiary_t_{short}");
        let mut cfg = Config::from_env().expect("default config");
        cfg.database_url = format!("{pg_root}/{name}");
        cfg.amqp_url = amqp_url.to_string();
        cfg.queue = format!("apiary.t.{short}");
        cfg.retry_base = Duration::from_millis(100);
        cfg.retry_cap = Duration::from_secs(1);
        cfg.lease = Duration::from_secs(3);
        cfg.outbox_grace = Duration::from_secs(1);
        // Small pools: test binaries run side by side on a Postgres with 100 connections.
        cfg.db_pool = TEST_DB_POOL;
        cfg.queue_type = kind;
        apiary::store::migrate(&cfg.database_url)
            .await
            .expect("migrate");
        let conn = broker::connect(amqp_url, "apiary test setup")
            .await
            .expect("rabbitmq");
        let ch = conn.create_channel().await.expect("channel");
        broker::topology::declare(&conn, &ch, &QueueNames::new(&cfg.queue), kind)
            .await
            .expect("declare");
        let _ = conn.close(200, "setup done".into()).await;
        let store = Store::connect_lazy(&cfg.database_url, 4).expect("pool");
        TestEnv {
            name,
            cfg,
            store,
            queues: Vec::new(),
            pg_root: pg_root.to_string(),
            amqp_url: amqp_url.to_string(),
        }
    }

    /// A world whose workers consume `queues` (`APIARY_QUEUES`, `name:concurrency`), the
    /// first of which may be `default`.
    pub async fn with_queues(queues: &[(&str, usize)]) -> TestEnv {
        let mut env = TestEnv::new().await;
        env.cfg.queues = apiary::config::QueueSettings(
            queues.iter().map(|(q, n)| (q.to_string(), *n)).collect(),
        );
        env.queues = queues
            .iter()
            .map(|(q, _)| q.to_string())
            .filter(|q| q != "default")
            .collect();
        env
    }

    /// The broker names of the `default` queue in this world, with its shards.
    pub fn names(&self) -> QueueNames {
        self.cfg.queue_names(apiary::job::DEFAULT_QUEUE)
    }

    /// The broker names of `queue` in this world, with its shards.
    pub fn names_of(&self, queue: &str) -> QueueNames {
        self.cfg.queue_names(queue)
    }

    /// `APIARY_QUEUES` for a spawned process, from this world's queues.
    pub fn queues_var(&self) -> String {
        self.cfg
            .queues
            .0
            .iter()
            .map(|(q, n)| format!("{q}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn client(&self) -> Client {
        Client::new(&self.cfg).expect("client")
    }

    /// Enqueues one job through a fresh client and returns its id.
    pub async fn enqueue(&self, job: apiary::NewJob) -> JobId {
        self.client().enqueue(job).await.expect("enqueue").job.id
    }

    /// An in-process worker with the built-in handlers.
    pub fn start_worker(&self) -> InProcessWorker {
        self.start_worker_with(self.cfg.clone(), Registry::builtins())
    }

    pub fn start_worker_with(&self, cfg: Config, registry: Registry) -> InProcessWorker {
        let shutdown = Shutdown::new();
        let worker = Worker::new(cfg, registry, shutdown.clone()).expect("worker");
        let task = tokio::spawn(worker.run());
        InProcessWorker {
            shutdown,
            task: Some(task),
        }
    }

    /// The environment for an `apiary` process in this test's world.
    pub fn envs(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.cfg.database_url.clone()),
            ("AMQP_URL".into(), self.cfg.amqp_url.clone()),
            ("APIARY_QUEUE".into(), self.cfg.queue.clone()),
            (
                "APIARY_QUEUE_TYPE".into(),
                self.cfg.queue_type.as_str().into(),
            ),
            ("APIARY_RETRY_BASE".into(), "100ms".into()),
            ("APIARY_RETRY_CAP".into(), "1s".into()),
            ("APIARY_LEASE".into(), "3s".into()),
            ("APIARY_OUTBOX_GRACE".into(), "1s".into()),
            ("APIARY_DB_POOL".into(), TEST_DB_POOL.to_string()),
            ("APIARY_WORKER_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            (
                "RUST_LOG".into(),
                std::env::var("TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ]
    }

    /// A real `apiary` process with `args`, in this test's world, plus `extra` variables.
    pub fn spawn(&self, args: &[&str], extra: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_apiary"));
        cmd.args(args)
            .envs(self.envs())
            .kill_on_drop(true)
            .stdin(Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let log =
            std::env::temp_dir().join(format!("{}-{}.log", self.name, Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        cmd.stdout(file.try_clone().expect("log")).stderr(file);
        Proc {
            child: cmd.spawn().expect("spawn apiary"),
            log,
        }
    }

    /// A real `apiary api` on a free local port, plus `extra` variables, once it listens;
    /// returned with its base URL (read from its log).
    pub async fn spawn_api(&self, extra: &[(&str, &str)]) -> (Proc, String) {
        let mut vars = vec![("APIARY_HTTP_ADDR", "127.0.0.1:0")];
        vars.extend_from_slice(extra);
        let api = self.spawn(&["api"], &vars);
        let line = api
            .wait_for_log("api listening", Duration::from_secs(30))
            .await;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("the api's address in its log")
            .to_string();
        (api, format!("http://{addr}"))
    }

    /// Runs `apiary args...` to completion and returns its stdout.
    pub async fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_apiary"))
            .args(args)
            .envs(self.envs())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run apiary")
    }

    pub async fn job(&self, id: JobId) -> Option<Job> {
        self.store.get_job(id).await.expect("get job")
    }

    /// Waits until the job reaches `status`, failing with its last state after `timeout`.
    pub async fn wait_for_status(&self, id: JobId, status: JobStatus, timeout: Duration) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if let Some(j) = &job
                && j.status() == status
            {
                return j.clone();
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not become {status} within {timeout:?}; last: {job:#?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `check` returns `Some`, or panics with `what` after `timeout`.
    pub async fn wait_until<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Counts jobs by status.
    pub async fn count(&self, status: JobStatus) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM apiary_jobs WHERE status = $1")
            .bind(status.as_str())
            .fetch_one(self.store.pool())
            .await
            .expect("count")
    }

    pub async fn tally(&self, counter: &str) -> Option<i64> {
        sqlx::query_scalar("SELECT value FROM demo_tally WHERE counter = $1")
            .bind(counter)
            .fetch_optional(self.store.pool())
            .await
            .expect("tally")
    }

    /// Publishes raw bodies to the work queue, as a producer without our code would.
    pub async fn publish_raw(&self, bodies: &[(Option<String>, Vec<u8>)]) {
        publish_raw_to(&self.cfg.queue, bodies).await
    }

    /// Fails with every violation if the invariants do not hold, workers possibly running.
    pub async fn assert_invariants(&self) {
        let v = self.client().check().await.expect("check invariants");
        assert!(v.is_empty(), "invariants broken: {v:#?}");
    }

    /// Fails with every violation if the invariants do not hold; for when every worker has
    /// stopped, so every message of this test's world is counted.
    pub async fn assert_invariants_quiescent(&self) {
        let v = self
            .client()
            .check_quiescent()
            .await
            .expect("check invariants");
        assert!(v.is_empty(), "invariants broken: {v:#?}");
    }

    /// Enqueues `jobs` in one batch through a fresh client and returns their ids, in order.
    pub async fn enqueue_all(&self, jobs: Vec<apiary::NewJob>) -> Vec<JobId> {
        self.client()
            .enqueue_many(jobs)
            .await
            .expect("enqueue")
            .into_iter()
            .map(|e| e.job.id)
            .collect()
    }

    /// Messages ready in a queue.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        passive_declare(queue).await.message_count()
    }
}

pub async fn publish_raw_to(queue: &str, bodies: &[(Option<String>, Vec<u8>)]) {
    publish_raw_props(queue, bodies, None).await
}

/// Publishes raw bodies to `queue` as a producer without our code would, each with the AMQP
/// `priority` property if given.
pub async fn publish_raw_props(
    queue: &str,
    bodies: &[(Option<String>, Vec<u8>)],
    priority: Option<u8>,
) {
    publish_raw_with(queue, bodies, priority, None).await;
}

/// [`publish_raw_props`], each message also carrying `headers`.
pub async fn publish_raw_with(
    queue: &str,
    bodies: &[(Option<String>, Vec<u8>)],
    priority: Option<u8>,
    headers: Option<lapin::types::FieldTable>,
) {
    let conn = Connection::connect(AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for (message_id, body) in bodies {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(m) = message_id {
            props = props.with_message_id(m.as_str().into());
        }
        if let Some(p) = priority {
            props = props.with_priority(p);
        }
        if let Some(h) = &headers {
            props = props.with_headers(h.clone());
        }
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish");
    }
    ch.wait_for_confirms().await.expect("confirms");
    let _ = conn.close(200, "".into()).await;
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        remove_world_on(&self.pg_root, &self.amqp_url, &self.name, &self.names());
        for q in &self.queues {
            remove_queues_on(&self.amqp_url, &self.names_of(q));
        }
    }
}

/// Runs a clean-up to its end on a runtime of its own, in a thread of its own: called from
/// drops inside the test's runtime, which cannot block on itself.
fn clean_up<F: Future<Output = ()> + Send + 'static>(work: F) {
    let cleanup = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(work);
        }
    });
    let _ = cleanup.join();
}

/// Deletes `names`' broker queues.
pub fn remove_queues(names: &QueueNames) {
    remove_queues_on(AMQP, names)
}

/// Deletes `names`' broker queues on the broker `amqp_url`: the first of its addresses that
/// answers, when it is a comma-separated list.
pub fn remove_queues_on(amqp_url: &str, names: &QueueNames) {
    let queues = names.all();
    let urls: Vec<String> = amqp_url.split(',').map(|u| u.trim().to_string()).collect();
    clean_up(async move {
        let mut conn = None;
        for url in &urls {
            let dial = Connection::connect(url, Default::default());
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(10), dial).await {
                conn = Some(c);
                break;
            }
        }
        if let Some(conn) = conn
            && let Ok(ch) = conn.create_channel().await
        {
            for q in queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "".into()).await;
        }
    });
}

/// Drops the database `name` and deletes `names`' queues, whatever made them: a [`TestEnv`]
/// when it ends, or a test whose world a script or a CLI created.
pub fn remove_world(name: &str, names: &QueueNames) {
    remove_world_on(PG_ROOT, AMQP, name, names)
}

/// [`remove_world`] on other servers: the database on the Postgres at `pg_root`, the queues
/// on the broker `amqp_url`.
pub fn remove_world_on(pg_root: &str, amqp_url: &str, name: &str, names: &QueueNames) {
    let name = name.to_string();
    let admin = format!("{pg_root}/postgres");
    clean_up(async move {
        if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await {
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await;
        }
    });
    remove_queues_on(amqp_url, names);
}

/// A worker running inside the test process.
pub struct InProcessWorker {
    pub shutdown: Shutdown,
    task: Option<
        tokio::task::JoinHandle<Result<apiary::worker::Summary, apiary::worker::WorkerError>>,
    >,
}

impl InProcessWorker {
    /// Drains it and returns its summary.
    pub async fn stop(mut self) -> apiary::worker::Summary {
        self.shutdown.drain.cancel();
        let task = self.task.take().expect("running");
        task.await.expect("worker task").expect("worker result")
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.shutdown.drain.cancel();
        self.shutdown.force.cancel();
    }
}

/// A real `apiary` process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).expect("pid")
    }

    /// Sends a real signal ("TERM", "KILL", "INT") to the process.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    /// Waits for the process to exit, returning its status.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "process did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                )
            })
            .expect("wait")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::env::var_os("KEEP_LOGS").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Reads every message in `queue` without removing any: (job id header, reason header).
pub async fn peek_dead_letters(queue: &str) -> Vec<(Option<String>, Option<String>)> {
    use futures_util::StreamExt;
    use lapin::types::AMQPValue;
    let conn = Connection::connect(AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let depth = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("declare")
        .message_count();
    let mut out = Vec::new();
    if depth > 0 {
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "peek".into(),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("consume");
        for _ in 0..depth {
            let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
            else {
                break;
            };
            let header = |name: &str| {
                d.properties
                    .headers()
                    .as_ref()
                    .and_then(|h| match h.inner().get(name) {
                        Some(AMQPValue::LongString(s)) => {
                            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                        }
                        _ => None,
                    })
            };
            out.push((header("x-apiary-job-id"), header("x-apiary-reason")));
        }
    }
    // Closing without acking puts every message back.
    let _ = conn.close(200, "".into()).await;
    out
}

/// Which way bytes travel through a [`Proxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the process under test to the server.
    ToUpstream,
    /// From the server back to the process.
    ToClient,
}

/// The faults a [`Proxy`] applies now. Connections read them on every chunk, so a change
/// takes effect at once on open connections as well as new ones.
#[derive(Debug, Clone, Default)]
struct Faults {
    /// Added to every chunk's trip, in both directions (a slow link, not a slow pipe: chunks
    /// read meanwhile travel concurrently).
    latency: Duration,
    /// No bytes forwarded towards the server / towards the client; sockets stay open.
    stall_up: bool,
    stall_down: bool,
    /// New connections are closed at once.
    refusing: bool,
    /// Bumped by every cut: a connection opened under an older generation closes.
    generation: u64,
}

impl Faults {
    fn stalled(&self, dir: Direction) -> bool {
        match dir {
            Direction::ToUpstream => self.stall_up,
            Direction::ToClient => self.stall_down,
        }
    }
}

/// State shared by a proxy's listener, its connections and the test holding it.
#[derive(Default)]
struct ProxyShared {
    /// Written by the test through [`Proxy`]'s methods; watched by every connection.
    faults: tokio::sync::watch::Sender<Faults>,
    /// Bytes still to forward before a mid-stream cut fires; `None` when none is armed.
    budget: std::sync::Mutex<Option<u64>>,
    /// Bytes that, once seen in a chunk towards the server, stall every answer; `None` when
    /// none is armed.
    answer_trigger: std::sync::Mutex<Option<Vec<u8>>>,
    answers_lost: std::sync::atomic::AtomicU64,
    bytes_up: std::sync::atomic::AtomicU64,
    bytes_down: std::sync::atomic::AtomicU64,
    /// Bytes read from one side and not yet written to the other (delayed or stalled).
    in_flight: std::sync::atomic::AtomicU64,
    accepted: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
    open: std::sync::atomic::AtomicU64,
    /// Connections closed by a cut (either kind).
    dropped: std::sync::atomic::AtomicU64,
    mid_stream_cuts: std::sync::atomic::AtomicU64,
}

impl ProxyShared {
    /// Closes every open connection (new ones are still accepted unless refusing is set).
    fn drop_open(&self) {
        self.faults.send_modify(|f| f.generation += 1);
    }

    /// Stalls every answer if an armed lost-answer trigger matches `sent`.
    fn check_answer_trigger(&self, sent: &[u8]) {
        let Ok(mut trigger) = self.answer_trigger.lock() else {
            return;
        };
        let hit = trigger
            .as_deref()
            .is_some_and(|n| !n.is_empty() && sent.windows(n.len()).any(|w| w == n));
        if hit {
            *trigger = None;
            self.answers_lost
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.faults.send_modify(|f| f.stall_down = true);
        }
    }

    /// How much of a chunk of `len` bytes may pass, and whether the mid-stream cut fires
    /// after it.
    fn take_budget(&self, len: usize) -> (usize, bool) {
        let Ok(mut budget) = self.budget.lock() else {
            return (len, false);
        };
        match *budget {
            None => (len, false),
            Some(left) if (len as u64) < left => {
                *budget = Some(left - len as u64);
                (len, false)
            }
            Some(left) => {
                *budget = None;
                (left as usize, true)
            }
        }
    }
}

/// A fault-injecting TCP proxy in front of Postgres or RabbitMQ, one per dependency of one
/// process under test, so a test can break that process's link without touching anyone
/// else's. Faults switch at runtime and apply to open connections at once:
///
/// - [`Proxy::latency`]: every chunk arrives `d` late, in both directions;
/// - [`Proxy::stall`] / [`Proxy::unstall`]: nothing is forwarded, but every socket stays open
///   (a hung server, a partition without resets); [`Proxy::stall_direction`] for one way;
/// - [`Proxy::cut`] / [`Proxy::restore`]: open connections drop, new ones are refused;
/// - [`Proxy::cut_after_bytes`]: the connection that carries the `n`-th byte from now is cut
///   right after it, mid-message, with every other open connection; new ones are accepted;
/// - [`Proxy::lose_answer_to`]: the request carrying given bytes reaches the server, and no
///   answer comes back (then [`Proxy::cut`]: the server acted, the client never heard);
/// - [`Proxy::heal`]: every fault off.
///
/// Counters ([`Proxy::bytes`], [`Proxy::connections`], ...) let a test check that a fault
/// met traffic.
pub struct Proxy {
    pub port: u16,
    shared: std::sync::Arc<ProxyShared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream` ("127.0.0.1:5432").
    pub async fn start(upstream: &'static str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let shared = std::sync::Arc::new(ProxyShared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if s.faults.borrow().refusing {
                    // Down: refuse by closing at once.
                    s.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(inbound);
                    continue;
                }
                s.accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(proxy_connection(inbound, upstream, s.clone()));
            }
        });
        Proxy { port, shared, task }
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.shared.faults.send_modify(|f| {
            f.refusing = true;
            f.generation += 1;
        });
    }

    /// Accepts connections again (other faults stay as they are).
    pub fn restore(&self) {
        self.shared.faults.send_modify(|f| f.refusing = false);
    }

    /// Delays every chunk by `d` in each direction (`Duration::ZERO` to stop).
    pub fn latency(&self, d: Duration) {
        self.shared.faults.send_modify(|f| f.latency = d);
    }

    /// Stops forwarding in both directions, keeping every socket open.
    pub fn stall(&self) {
        self.shared.faults.send_modify(|f| {
            f.stall_up = true;
            f.stall_down = true;
        });
    }

    /// Stops forwarding in one direction only: [`Direction::ToUpstream`] is a server that
    /// stops reading (as RabbitMQ does to publishers under a memory alarm).
    pub fn stall_direction(&self, dir: Direction) {
        self.shared.faults.send_modify(|f| match dir {
            Direction::ToUpstream => f.stall_up = true,
            Direction::ToClient => f.stall_down = true,
        });
    }

    /// Forwards again, both directions; what was held goes on in order.
    pub fn unstall(&self) {
        self.shared.faults.send_modify(|f| {
            f.stall_up = false;
            f.stall_down = false;
        });
    }

    /// Arms a one-shot mid-stream cut: once `n` more bytes have been forwarded (either
    /// direction, any connection), the connection carrying the last of them is cut right
    /// after it, possibly inside a protocol message, and so is every other open connection.
    /// New connections are accepted as before. [`Proxy::mid_stream_cuts`] counts firings.
    pub fn cut_after_bytes(&self, n: u64) {
        if let Ok(mut b) = self.shared.budget.lock() {
            *b = Some(n.max(1));
        }
    }

    /// Arms a one-shot lost answer: the first chunk towards the server that contains `needle`
    /// (within one read; a job id a statement binds, say) is delivered, and from then on
    /// nothing comes back, as [`Proxy::stall_direction`]`(ToClient)`: the server acts on the
    /// request but its answer never arrives. Follow with [`Proxy::cut`] to lose it for good.
    pub fn lose_answer_to(&self, needle: &[u8]) {
        if let Ok(mut t) = self.shared.answer_trigger.lock() {
            *t = Some(needle.to_vec());
        }
    }

    /// How many armed lost answers have fired.
    pub fn answers_lost(&self) -> u64 {
        self.shared
            .answers_lost
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every fault off: no latency, no stall, no armed cut, connections accepted.
    pub fn heal(&self) {
        if let Ok(mut b) = self.shared.budget.lock() {
            *b = None;
        }
        if let Ok(mut t) = self.shared.answer_trigger.lock() {
            *t = None;
        }
        self.shared.faults.send_modify(|f| {
            f.latency = Duration::ZERO;
            f.stall_up = false;
            f.stall_down = false;
            f.refusing = false;
        });
    }

    /// Bytes forwarded so far, (towards the server, towards the client).
    pub fn bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.bytes_up.load(Relaxed),
            self.shared.bytes_down.load(Relaxed),
        )
    }

    /// Bytes read from one side and not yet delivered to the other (delayed or stalled): a
    /// request or a response is on its way right now.
    pub fn in_flight(&self) -> u64 {
        self.shared
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections accepted so far (refused ones not counted).
    pub fn connections(&self) -> u64 {
        self.shared
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.shared
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections closed by a cut, of either kind.
    pub fn dropped(&self) -> u64 {
        self.shared
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Mid-stream cuts that have fired.
    pub fn mid_stream_cuts(&self) -> u64 {
        self.shared
            .mid_stream_cuts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a mid-stream cut is armed and has not fired yet.
    pub fn cut_armed(&self) -> bool {
        self.shared
            .budget
            .lock()
            .map(|b| b.is_some())
            .unwrap_or(false)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A chunk read from one side and not yet written to the other; counted in
/// [`Proxy::in_flight`] until delivered or dropped with its connection.
struct InFlight<'a> {
    bytes: Vec<u8>,
    shared: &'a ProxyShared,
}

impl<'a> InFlight<'a> {
    fn new(bytes: &[u8], shared: &'a ProxyShared) -> Self {
        shared
            .in_flight
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        InFlight {
            bytes: bytes.to_vec(),
            shared,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(
            self.bytes.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// One client connection: dials `upstream` and pumps both ways under the proxy's faults,
/// until either side closes, a pump fails, or a cut bumps the generation.
async fn proxy_connection(
    inbound: tokio::net::TcpStream,
    upstream: &'static str,
    shared: std::sync::Arc<ProxyShared>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut faults = shared.faults.subscribe();
    let generation = faults.borrow().generation;
    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (client_rd, client_wr) = inbound.into_split();
    let (server_rd, server_wr) = outbound.into_split();
    shared.open.fetch_add(1, Relaxed);
    let pumps = async {
        tokio::try_join!(
            pump(client_rd, server_wr, Direction::ToUpstream, &shared),
            pump(server_rd, client_wr, Direction::ToClient, &shared),
        )
    };
    tokio::select! {
        _ = pumps => {}
        _ = faults.wait_for(|f| f.generation != generation) => {}
    }
    // Closed by a cut, whether this connection carried a mid-stream cut's last byte or was
    // dropped with the others.
    if shared.faults.borrow().generation != generation {
        shared.dropped.fetch_add(1, Relaxed);
    }
    shared.open.fetch_sub(1, Relaxed);
    // Dropping the halves closes both sockets.
}

/// Forwards one direction. The reader stamps each chunk with its due time (now + latency) and
/// keeps reading; the writer delivers each chunk once due and not stalled. Ends when the
/// source closes (after delivering what it sent) or either side fails.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dir: Direction,
    shared: &ProxyShared,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Bounded: a stalled direction holds a few hundred KiB, then TCP pushes back.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, InFlight<'_>)>(32);
    let reading = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(()); // dropping `tx` ends the writer
            }
            let due = tokio::time::Instant::now() + shared.faults.borrow().latency;
            if tx
                .send((due, InFlight::new(&buf[..n], shared)))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let writing = async move {
        let mut faults = shared.faults.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            faults
                .wait_for(|f| !f.stalled(dir))
                .await
                .map_err(|_| std::io::Error::other("proxy stopped"))?;
            let (n, cut) = shared.take_budget(chunk.bytes.len());
            to.write_all(&chunk.bytes[..n]).await?;
            match dir {
                Direction::ToUpstream => shared.bytes_up.fetch_add(n as u64, Relaxed),
                Direction::ToClient => shared.bytes_down.fetch_add(n as u64, Relaxed),
            };
            if cut {
                shared.mid_stream_cuts.fetch_add(1, Relaxed);
                shared.drop_open();
                return Err(std::io::Error::other("cut mid-stream"));
            }
            if dir == Direction::ToUpstream {
                shared.check_answer_trigger(&chunk.bytes[..n]);
            }
        }
        to.shutdown().await
    };
    tokio::pin!(reading);
    tokio::pin!(writing);
    let mut reading_done = false;
    loop {
        tokio::select! {
            r = &mut writing => return r,
            r = &mut reading, if !reading_done => {
                reading_done = true;
                r?;
            }
        }
    }
}

impl Proc {
    /// Waits for a log line containing `needle` and returns it (ANSI colours stripped).
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = strip_ansi(&self.log_text());
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {timeout:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address the worker's probes listen on, from its log.
    pub async fn probe_addr(&self) -> String {
        let line = self
            .wait_for_log("worker probes listening", Duration::from_secs(20))
            .await;
        line.split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("addr")
            .to_string()
    }
}

/// Removes terminal colour codes from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A plain HTTP GET, returning status and body.
pub async fn http_get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Calls the API router without a socket; returns the status and the JSON body (or null).
pub async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(axum::body::Body::from(body.unwrap_or("").to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// Consumers on a queue.
pub async fn consumer_count(queue: &str) -> u32 {
    passive_declare(queue).await.consumer_count()
}

/// A queue's counts, from a passive declare on a connection of its own.
pub async fn passive_declare(queue: &str) -> lapin::Queue {
    let conn = Connection::connect(AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let opts = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), opts, Default::default())
        .await
        .expect("passive declare");
    let _ = conn.close(200, "".into()).await;
    q
}

/// Closes the RabbitMQ connections of the OS process `pid`, found by the pid in their
/// connection name; returns how many.
pub async fn close_rabbit_connections_of(pid: i32) -> usize {
    let listing = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--no-table-headers",
        "-q",
    ])
    .await;
    let needle = format!("pid {pid}\"");
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(&needle)) {
        let Some(cpid) = line.split('\t').next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", cpid, "test: connection closed"])
            .stdin(std::process::Stdio::null())
            .status()
            .await
            .expect("close_connection");
        closed += usize::from(status.success());
    }
    closed
}

/// What `rabbitmqctl ARGS` prints on the shared broker (it reads standard input, so it gets
/// none).
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
