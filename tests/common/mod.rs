//! Test support: every test gets its own database and its own queue names on the real
//! Postgres and RabbitMQ, removed again when the test ends, so tests run in parallel and
//! leave nothing behind. Waits poll observable state against a deadline; nothing sleeps blind.

#![allow(dead_code)]

use std::process::Stdio;
use std::time::{Duration, Instant};

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

/// One test's private world: a database and a queue name.
pub struct TestEnv {
    pub name: String,
    pub cfg: Config,
    pub store: Store,
}

impl TestEnv {
    /// A migrated database and declared queues, named after a fresh id.
    pub async fn new() -> TestEnv {
        let short = Uuid::new_v4().simple().to_string()[..12].to_string();
        let name = format!("apiary_t_{short}");
        let mut cfg = Config::from_env().expect("default config");
        cfg.database_url = format!("{PG_ROOT}/{name}");
        cfg.amqp_url = AMQP.to_string();
        cfg.queue = format!("apiary.t.{short}");
        cfg.retry_base = Duration::from_millis(100);
        cfg.retry_cap = Duration::from_secs(1);
        cfg.lease = Duration::from_secs(3);
        cfg.outbox_grace = Duration::from_secs(1);
        apiary::store::migrate(&cfg.database_url)
            .await
            .expect("migrate");
        let conn = broker::connect(AMQP, "apiary test setup")
            .await
            .expect("rabbitmq");
        let ch = conn.create_channel().await.expect("channel");
        broker::topology::declare(&ch, &QueueNames::new(&cfg.queue))
            .await
            .expect("declare");
        let _ = conn.close(200, "setup done".into()).await;
        let store = Store::connect_lazy(&cfg.database_url, 8).expect("pool");
        TestEnv { name, cfg, store }
    }

    pub fn names(&self) -> QueueNames {
        QueueNames::new(&self.cfg.queue)
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
            ("APIARY_RETRY_BASE".into(), "100ms".into()),
            ("APIARY_RETRY_CAP".into(), "1s".into()),
            ("APIARY_LEASE".into(), "3s".into()),
            ("APIARY_OUTBOX_GRACE".into(), "1s".into()),
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

    /// Messages ready in a queue.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        passive_declare(queue).await.message_count()
    }
}

pub async fn publish_raw_to(queue: &str, bodies: &[(Option<String>, Vec<u8>)]) {
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
        let name = self.name.clone();
        let names = self.names();
        // Drop runs inside the test's runtime, which cannot block on itself: clean up from a
        // thread of our own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&format!(
                    "{PG_ROOT}/postgres"
                ))
                .await
                {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                }
                if let Ok(conn) = Connection::connect(AMQP, Default::default()).await
                    && let Ok(ch) = conn.create_channel().await
                {
                    for q in names.all() {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    let _ = conn.close(200, "".into()).await;
                }
            });
        });
        let _ = cleanup.join();
    }
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
        let _ = std::fs::remove_file(&self.log);
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

/// A TCP proxy in front of Postgres or RabbitMQ that a test can cut and restore, to take a
/// dependency away from its own processes without touching anyone else's.
pub struct Proxy {
    pub port: u16,
    state: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream` ("127.0.0.1:5432").
    pub async fn start(upstream: &'static str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !*rx.borrow() {
                    // Down: refuse by closing at once.
                    drop(inbound);
                    continue;
                }
                let mut up_rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = up_rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            state: std::sync::Arc::new(tx),
            task,
        }
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        let _ = self.state.send(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        let _ = self.state.send(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
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
