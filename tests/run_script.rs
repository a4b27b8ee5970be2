//! `scripts/run`, the one command that runs the whole system: the real script, with the
//! binary this test suite built (`APIARY_BIN`), each instance in a database, queue and port of
//! its own. It must come up, answer at the URL it prints (the sample commands it prints
//! included), stop everything it started on SIGTERM, and stop everything when one of its
//! processes dies. Which processes are "everything" is read from /proc: every process that
//! carries the instance's unique `APIARY_QUEUE` in its environment was started by it.

mod common;

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiary::broker::QueueNames;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// How long an instance may take to print its URL: migrate and start four processes of a debug
/// build on a busy machine.
const START: Duration = Duration::from_secs(180);
/// How long the script may take to stop: its own bound is 60 s before SIGKILL.
const STOP: Duration = Duration::from_secs(120);

/// One `scripts/run` instance and its private world; on drop, kills whatever it left and
/// removes its database and queues.
struct Instance {
    child: Child,
    queue: String,
    database: String,
    log_dir: PathBuf,
    /// The URL after `API:` in its output.
    api: String,
    /// Everything it printed, stdout and stderr, in the order each stream wrote it.
    output: Arc<Mutex<String>>,
}

impl Instance {
    /// Runs `bash scripts/run --workers 2` listening on `http_addr`, and waits for its URL.
    async fn start(http_addr: &str) -> Instance {
        let short = Uuid::new_v4().simple().to_string()[..12].to_string();
        let database = format!("apiary_t_{short}");
        let queue = format!("apiary.t.run.{short}");
        let log_dir = std::env::temp_dir().join(format!("apiary-run-{short}"));
        let mut cmd = Command::new("bash");
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/run"))
            .args(["--workers", "2"]);
        // Only this test's settings: none of the caller's APIARY_* may leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("APIARY_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("APIARY_BIN", env!("CARGO_BIN_EXE_apiary"))
            .env("DATABASE_URL", format!("{}/{database}", common::PG_ROOT))
            .env("AMQP_URL", common::AMQP)
            .env("APIARY_QUEUE", &queue)
            .env("APIARY_HTTP_ADDR", http_addr)
            .env("APIARY_RUN_LOG_DIR", &log_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn scripts/run");
        let output = Arc::new(Mutex::new(String::new()));
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, prefix) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                "",
            ),
            (Box::new(stderr), "stderr: "),
        ] {
            let output = output.clone();
            let lines_tx = lines_tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if let Ok(mut out) = output.lock() {
                        out.push_str(prefix);
                        out.push_str(&line);
                        out.push('\n');
                    }
                    let _ = lines_tx.send(line);
                }
            });
        }
        drop(lines_tx);
        let mut instance = Instance {
            child,
            queue,
            database,
            log_dir,
            api: String::new(),
            output,
        };
        let deadline = Instant::now() + START;
        instance.api = loop {
            let line = tokio::time::timeout_at(deadline.into(), lines.recv()).await;
            match line {
                Ok(Some(line)) => {
                    if let Some(url) = line.trim().strip_prefix("API:") {
                        break url.trim().to_string();
                    }
                }
                Ok(None) => panic!(
                    "scripts/run ended before printing its URL ({:?}):\n{}",
                    instance.child.try_wait(),
                    instance.output()
                ),
                Err(_) => panic!(
                    "scripts/run printed no URL within {START:?}:\n{}",
                    instance.output()
                ),
            }
        };
        instance
    }

    fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// The processes it started, by name, from the `pids` file in its log directory.
    fn pids(&self) -> Vec<(String, i32)> {
        let text = std::fs::read_to_string(self.log_dir.join("pids")).expect("pids file");
        text.lines()
            .filter_map(|l| {
                let (name, pid) = l.split_once(' ')?;
                Some((name.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running");
        signal(pid as i32, sig);
    }

    async fn wait(&mut self) -> ExitStatus {
        match tokio::time::timeout(STOP, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "scripts/run did not exit within {STOP:?}:\n{}",
                self.output()
            ),
        }
    }

    /// Waits for its output to end (the script is gone) and returns it.
    async fn final_output(&self) -> String {
        // The readers finish at end of stream, just after the exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&self.output) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.output()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // On a failed test: nothing may outlive it, the script included.
        for (pid, _) in processes_with_queue(&self.queue) {
            signal(pid, "KILL");
        }
        common::remove_world(&self.database, &QueueNames::new(&self.queue));
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}

fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Every live process whose environment sets `APIARY_QUEUE` to `queue`, with its command
/// line. A zombie has no environment left, so it does not count: it runs nothing.
fn processes_with_queue(queue: &str) -> Vec<(i32, String)> {
    let wanted = format!("APIARY_QUEUE={queue}");
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read: skip it.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes()) {
            let cmdline = std::fs::read(entry.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, cmdline));
        }
    }
    found
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Enqueues an echo job through `api` and returns its id.
async fn enqueue(http: &reqwest::Client, api: &str, payload: Value) -> String {
    let res = http
        .post(format!("{api}/v1/jobs"))
        .json(&json!({ "kind": "echo", "payload": payload }))
        .send()
        .await
        .expect("POST /v1/jobs");
    assert_eq!(res.status(), 202, "enqueue through {api}");
    let job: Value = res.json().await.expect("job");
    job["id"].as_str().expect("id").to_string()
}

/// Reads the job through `api` until it has succeeded, and returns it.
async fn wait_succeeded(http: &reqwest::Client, api: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job: Value = http
            .get(format!("{api}/v1/jobs/{id}?wait=5"))
            .send()
            .await
            .expect("GET /v1/jobs/{id}")
            .json()
            .await
            .expect("job");
        if job["status"] == "succeeded" {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not succeed through {api}; last: {job}"
        );
    }
}

/// Runs a printed sample command (one line, a `curl ...`) through `sh`, returning its stdout.
async fn run_sample(command: &str) -> Value {
    let out = Command::new("sh")
        .args(["-c", command])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("sh");
    assert!(out.status.success(), "`{command}` failed: {out:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`{command}` printed no JSON ({e}): {out:?}"))
}

/// The line after the one that contains `heading`, trimmed.
fn line_after(output: &str, heading: &str) -> String {
    let mut lines = output.lines();
    lines
        .find(|l| l.contains(heading))
        .and_then(|_| lines.next())
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("no {heading:?} in:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_run_side_by_side_answer_at_their_printed_urls_and_stop_without_leftovers() {
    // One on a port chosen here, one on port 0, whose URL the script learns from the API.
    let addr_a = format!("127.0.0.1:{}", free_port());
    let (mut a, mut b) = tokio::join!(Instance::start(&addr_a), Instance::start("127.0.0.1:0"));
    assert_ne!(a.api, b.api);
    for instance in [&a, &b] {
        let names: Vec<String> = instance.pids().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["api", "worker-1", "worker-2"]);
    }

    // Through the URL it printed: the job runs and its result reads back.
    let http = reqwest::Client::new();
    let id_a = enqueue(&http, &a.api, json!({ "from": "a" })).await;
    let job = wait_succeeded(&http, &a.api, &id_a).await;
    assert_eq!(job["result"], json!({ "from": "a" }));

    // The dashboard it printed answers there.
    let printed = b.output();
    let dashboard = line_after(&printed, "API:");
    assert_eq!(dashboard, format!("dashboard: {}/", b.api), "{printed}");
    let page = http
        .get(dashboard.trim_start_matches("dashboard: "))
        .send()
        .await
        .expect("GET dashboard");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("page").contains("/ui/app.js"));

    // The sample commands it printed work as printed.
    let enqueue_line = line_after(&printed, "Enqueue an echo job");
    assert!(
        enqueue_line.starts_with(&format!("curl -s -X POST {}/v1/jobs ", b.api)),
        "{enqueue_line}"
    );
    let job = run_sample(&enqueue_line).await;
    let id_b = job["id"].as_str().expect("id").to_string();
    let fetch_line = line_after(&printed, "Fetch it with its result").replace("<id>", &id_b);
    let job = run_sample(&fetch_line).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({ "hello": "world" }));

    // Side by side means apart: each has its own database.
    let res = http
        .get(format!("{}/v1/jobs/{id_a}", b.api))
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), 404, "a's job must not be in b's database");

    // SIGTERM: everything drains and stops, and the script exits 0.
    a.signal("TERM");
    b.signal("TERM");
    let (status_a, status_b) = tokio::join!(a.wait(), b.wait());
    for (instance, status) in [(&a, status_a), (&b, status_b)] {
        let output = instance.final_output().await;
        assert!(status.success(), "scripts/run exited {status}:\n{output}");
        assert!(output.contains("==> stopped"), "{output}");
        let left = processes_with_queue(&instance.queue);
        assert!(
            left.is_empty(),
            "still running after scripts/run exited: {left:?}\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_stops_everything_and_the_script_names_it() {
    let mut run = Instance::start(&format!("127.0.0.1:{}", free_port())).await;
    let pids = run.pids();
    let (_, worker) = pids
        .iter()
        .find(|(name, _)| name == "worker-1")
        .expect("worker-1");
    signal(*worker, "KILL");

    let status = run.wait().await;
    let output = run.final_output().await;
    assert_eq!(status.code(), Some(1), "{output}");
    let log = run.log_dir.join("worker-1.log");
    let expected = format!(
        "stderr: error: worker-1 (pid {worker}) stopped unexpectedly (killed by SIGKILL); its log: {}",
        log.display()
    );
    assert!(
        output.lines().any(|l| l == expected),
        "no line {expected:?} in:\n{output}"
    );
    let left = processes_with_queue(&run.queue);
    assert!(
        left.is_empty(),
        "still running after scripts/run exited: {left:?}\n{output}"
    );
}
