//! The web dashboard in a real browser: Debian's Chromium, headless, driven through
//! chromedriver (WebDriver) with fantoccini, against a real `apiary api` and `apiary worker`
//! on this test's own database and queues. Also the API routes the dashboard added: the time
//! range filter, the throughput series, a job's children and replay by kind.
//!
//! Without chromedriver the browser tests say so and pass, unless
//! `APIARY_BROWSER_TESTS=required` (set by `scripts/test` once it has installed Chromium),
//! where a missing browser fails them. `APIARY_DASHBOARD_SHOTS=DIR` saves screenshots there
//! (how `docs/dashboard-*.png` were made).
#![cfg(feature = "dashboard")]

mod common;

use std::os::unix::process::CommandExt as _;
use std::time::{Duration, Instant};

use apiary::{JobStatus, NewJob};
use common::{Proc, TestEnv};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(40);
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const READ: &str = "dashboard-read-token-0123456789";
const ADMIN: &str = "dashboard-admin-token-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A real `apiary api` (with `tokens`, if any) and `apiary worker` in `env`'s world.
struct Deployment {
    base: String,
    _api: Proc,
    _worker: Proc,
}

async fn deploy(env: &TestEnv, tokens: Option<&str>) -> Deployment {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut vars = vec![("APIARY_HTTP_ADDR", addr.as_str())];
    if let Some(t) = tokens {
        vars.push(("APIARY_API_TOKENS", t));
    }
    let api = env.spawn(&["api"], &vars);
    let worker = env.spawn(&["worker"], &[]);
    api.wait_for_log("api listening", T).await;
    worker.wait_for_log("worker starting", T).await;
    Deployment {
        base: format!("http://{addr}"),
        _api: api,
        _worker: worker,
    }
}

/// Chromium, headless, under its own chromedriver; `None` (the test then passes, saying why)
/// where no browser is installed and none is required.
struct Browser {
    client: Client,
    driver: std::process::Child,
}

impl Browser {
    async fn start(test: &str) -> Option<Browser> {
        if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists()
        {
            let required = std::env::var("APIARY_BROWSER_TESTS").is_ok_and(|v| v == "required");
            assert!(
                !required,
                "{test}: {CHROMEDRIVER} or {CHROMIUM} is missing, and APIARY_BROWSER_TESTS=required"
            );
            eprintln!(
                "SKIPPED {test}: no browser ({CHROMIUM} and {CHROMEDRIVER}; `apt-get install chromium chromium-driver`)"
            );
            return None;
        }
        let port = free_port();
        // Its own process group, so the browser it starts goes with it, even when a test
        // panics (`Drop`).
        let driver = std::process::Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = std::env::temp_dir().join(format!("apiary-chrome-{}", Uuid::new_v4()));
        let caps = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let caps = caps.as_object().cloned().expect("caps");
        let deadline = Instant::now() + T;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{test}: no WebDriver session: {e}"),
            }
        };
        Some(Browser { client, driver })
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("goto");
    }

    /// Waits until the element at `css` exists and its text satisfies `want`; returns it.
    async fn wait_text(&self, css: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + T;
        let mut last = String::new();
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await
                && let Ok(text) = e.text().await
            {
                if want(&text) {
                    return text;
                }
                last = text;
            }
            assert!(
                Instant::now() < deadline,
                "{css}: never as wanted; last text {last:?}; page: {}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn page_text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(b) => b.text().await.unwrap_or_default(),
            Err(e) => format!("(no body: {e})"),
        }
    }

    async fn click(&self, css: &str) {
        let deadline = Instant::now() + T;
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(e) if e.click().await.is_ok() => return,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => panic!("{css}: nothing to click; page: {}", self.page_text().await),
            }
        }
    }

    /// Clicks `css`, then Confirm in the page's dialog.
    async fn click_confirmed(&self, css: &str) {
        self.click(css).await;
        self.wait_text("#confirm-text", |t| !t.is_empty()).await;
        self.click("#confirm-yes").await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self
            .client
            .wait()
            .at_most(T)
            .for_element(Locator::Css(css))
            .await
            .expect("input");
        e.send_keys(text).await.expect("type");
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.path().to_string())
            .unwrap_or_default()
    }

    /// Saves a screenshot as `DIR/dashboard-NAME.png` when `APIARY_DASHBOARD_SHOTS=DIR`.
    async fn shot(&self, name: &str) {
        if let Ok(dir) = std::env::var("APIARY_DASHBOARD_SHOTS") {
            let png = self.client.screenshot().await.expect("screenshot");
            std::fs::write(format!("{dir}/dashboard-{name}.png"), png).expect("write png");
        }
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

#[tokio::test]
async fn overview_shows_queues_workers_and_charts() {
    let Some(b) = Browser::start("overview").await else {
        return;
    };
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            env.enqueue(NewJob::new("echo", json!({ "n": i })).with_dedup_key(format!("o-{i}")))
                .await,
        );
    }
    let failing = env
        .enqueue(NewJob::new("fail", json!({ "permanent": true })))
        .await;
    for id in &ids {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    env.wait_for_status(failing, JobStatus::Dead, T).await;

    b.goto(&format!("{}/", d.base)).await;
    b.wait_text("#queues tr[data-queue=default]", |t| t.contains("active"))
        .await;
    let workers = b
        .wait_text("#workers tbody", |t| t.contains("running"))
        .await;
    assert!(workers.contains(&whoami()), "the worker's host: {workers}");
    b.wait_text("#tile-dead .n", |t| t == "1").await;
    b.wait_text("#tile-hour .n", |t| t == "31").await;
    // Both charts drawn by uPlot, from a series that holds the jobs just run.
    let charts = b
        .client
        .find_all(Locator::Css(
            "#chart-throughput .uplot canvas, #chart-latency .uplot canvas",
        ))
        .await
        .expect("charts");
    let deadline = Instant::now() + T;
    let mut drawn = charts.len();
    while drawn < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drawn = b
            .client
            .find_all(Locator::Css(".uplot canvas"))
            .await
            .map_or(0, |c| c.len());
    }
    assert_eq!(drawn, 2, "two charts; page: {}", b.page_text().await);
    let legend = b
        .wait_text("#chart-throughput", |t| t.contains("succeeded/s"))
        .await;
    assert!(
        legend.contains("failed/s") && legend.contains("retried/s"),
        "{legend}"
    );
    b.shot("overview").await;
    b.close().await;
}

fn whoami() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn find_a_job_by_id_and_read_its_payload_as_text() {
    let Some(b) = Browser::start("find a job").await else {
        return;
    };
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    let hostile = "<script>document.title='owned'</script><img src=x onerror=alert(1)>";
    let id = env
        .enqueue(NewJob::new("echo", json!({ "note": hostile })))
        .await;
    env.wait_for_status(id, JobStatus::Succeeded, T).await;

    b.goto(&format!("{}/jobs?kind=echo", d.base)).await;
    b.wait_text("#jobs tbody", |t| t.contains(&id.to_string()))
        .await;
    b.shot("jobs").await;
    b.type_into("#job-id", &id.to_string()).await;
    b.click("#find button").await;
    let deadline = Instant::now() + T;
    while b.path().await != format!("/jobs/{id}") {
        assert!(Instant::now() < deadline, "never reached the job's page");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The payload is shown as the text it is: nothing ran, no element was made from it.
    let payload = b.wait_text("#payload", |t| t.contains("note")).await;
    assert!(payload.contains(hostile), "{payload}");
    b.wait_text("#result", |t| t.contains("note")).await;
    b.wait_text("#job .badge", |t| t == "succeeded").await;
    let title = b.client.title().await.expect("title");
    assert_eq!(title, "Apiary");
    let injected = b
        .client
        .find_all(Locator::Css("#job img, #job script"))
        .await
        .expect("find");
    assert!(
        injected.is_empty(),
        "markup from the payload became elements"
    );
    b.shot("job").await;

    // A time range that holds it lists it; one that ends before it does not.
    let before = "2001-01-01T00:00";
    b.goto(&format!("{}/jobs?kind=echo&until={before}", d.base))
        .await;
    b.wait_text("#jobs", |t| t.contains("No jobs match")).await;
    b.close().await;
}

#[tokio::test]
async fn replay_a_dead_job_and_see_it_succeed() {
    let Some(b) = Browser::start("replay").await else {
        return;
    };
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    // Dies at once; once its cause is gone (`until`), a replay succeeds. The margin is wide:
    // a loaded machine may start the handler seconds after the claim.
    let fixed_at = chrono::Utc::now() + chrono::Duration::seconds(10);
    let id = env
        .enqueue(NewJob::new(
            "fail",
            json!({ "until": fixed_at, "permanent": true, "message": "upstream is down" }),
        ))
        .await;
    env.wait_for_status(id, JobStatus::Dead, T).await;

    b.goto(&format!("{}/dead", d.base)).await;
    let row = format!("#dead-jobs tr[data-id='{id}']");
    let text = b.wait_text(&row, |t| t.contains("upstream is down")).await;
    assert!(text.contains("fail"), "{text}");
    b.shot("dead").await;
    b.click(&format!("{row} a")).await;
    b.wait_text("#job .badge", |t| t == "dead").await;
    b.wait_text("#error", |t| t.contains("upstream is down"))
        .await;
    while chrono::Utc::now() < fixed_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.click_confirmed("#replay").await;
    b.wait_text("#notice", |t| t.contains("Replayed")).await;
    b.wait_text("#job .badge", |t| t == "succeeded").await;
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.result, Some(json!({ "attempts": 1 })));
    assert_eq!(
        job.errors.as_array().map(Vec::len),
        Some(1),
        "the dead attempt stays in the history"
    );
    b.close().await;
}

#[tokio::test]
async fn pause_a_queue_and_see_it_marked() {
    let Some(b) = Browser::start("pause").await else {
        return;
    };
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    b.goto(&format!("{}/queues", d.base)).await;
    let row = "#queue-list tr[data-queue=default]";
    b.wait_text(row, |t| t.contains("active")).await;
    b.click_confirmed(&format!("{row} button[data-action=pause]"))
        .await;
    b.wait_text(&format!("{row} .state"), |t| t == "paused")
        .await;
    let queues = env.client().queues().await.expect("queues");
    assert!(queues.iter().any(|q| q.name == "default" && q.paused));
    // Paused for real: a job enqueued now waits.
    let id = env.enqueue(NewJob::new("echo", json!(1))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.job(id).await.expect("job").status(), JobStatus::Queued);
    b.click(&format!("{row} button[data-action=resume]")).await;
    b.wait_text(&format!("{row} .state"), |t| t == "active")
        .await;
    env.wait_for_status(id, JobStatus::Succeeded, T).await;
    b.close().await;
}

#[tokio::test]
async fn a_read_token_signs_in_and_sees_but_actions_need_admin() {
    let Some(b) = Browser::start("tokens").await else {
        return;
    };
    let env = TestEnv::new().await;
    let tokens = format!("{READ}:read,{ADMIN}:admin+read");
    let d = deploy(&env, Some(&tokens)).await;
    // Without a token the overview sends the visitor to sign in, and back afterwards.
    b.goto(&format!("{}/queues", d.base)).await;
    let deadline = Instant::now() + T;
    while b.path().await != "/login" {
        assert!(Instant::now() < deadline, "not sent to /login");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.type_into("#token", "wrong-token-wrong-token").await;
    b.click("#login button").await;
    b.wait_text("#notice", |t| t.contains("does not work"))
        .await;
    b.client
        .find(Locator::Css("#token"))
        .await
        .expect("token")
        .clear()
        .await
        .expect("clear");
    b.type_into("#token", READ).await;
    b.click("#login button").await;
    let row = "#queue-list tr[data-queue=default]";
    b.wait_text(row, |t| t.contains("active")).await;
    assert_eq!(b.path().await, "/queues");
    b.click_confirmed(&format!("{row} button[data-action=pause]"))
        .await;
    b.wait_text("#notice", |t| t.contains("admin scope")).await;
    let queues = env.client().queues().await.expect("queues");
    assert!(
        queues.iter().all(|q| !q.paused),
        "a read token paused a queue"
    );

    // Signed in again with the admin token, the same click pauses it.
    b.click("#sign-out").await;
    b.type_into("#token", ADMIN).await;
    b.click("#login button").await;
    // The login checks the token, then goes to the overview: wait for that before leaving,
    // or its late redirect would take the browser away from the queues page.
    b.wait_text("#tiles", |t| t.contains("ready")).await;
    b.goto(&format!("{}/queues", d.base)).await;
    b.click_confirmed(&format!("{row} button[data-action=pause]"))
        .await;
    b.wait_text(&format!("{row} .state"), |t| t == "paused")
        .await;
    b.close().await;
}

// ---- the API routes the dashboard reads ------------------------------------------------

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("get");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("post");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn pages_and_assets_are_served_with_a_strict_policy() {
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    for path in [
        "/",
        "/jobs",
        "/jobs/anything",
        "/dead",
        "/queues",
        "/schedules",
        "/login",
    ] {
        let r = reqwest::get(format!("{}{path}", d.base))
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "{path}");
        let csp = r.headers()["content-security-policy"]
            .to_str()
            .expect("csp")
            .to_string();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert!(
            r.text().await.expect("body").contains("/ui/app.js"),
            "{path}"
        );
    }
    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/uPlot.iife.min.js", "text/javascript"),
        ("/ui/uPlot.min.css", "text/css"),
    ] {
        let r = reqwest::get(format!("{}{path}", d.base))
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], kind, "{path}");
    }
    // Unknown paths stay the API's JSON 404.
    let (code, body) = get(&format!("{}/nope", d.base)).await;
    assert_eq!(code, 404);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn series_counts_finishes_retries_and_latency() {
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(env.enqueue(NewJob::new("echo", json!(i))).await);
    }
    let retried = env
        .enqueue(NewJob::new("fail", json!({ "times": 2 })))
        .await;
    let dead = env
        .enqueue(NewJob::new("fail", json!({ "permanent": true })))
        .await;
    for id in ids.iter().chain([&retried]) {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    env.wait_for_status(dead, JobStatus::Dead, T).await;
    // The worker writes what it finished at its next heartbeat: wait for all of it.
    let sum = |s: &Value, k: &str| -> f64 {
        s["points"]
            .as_array()
            .map(|p| p.iter().map(|p| p[k].as_f64().unwrap_or(0.0) * 5.0).sum())
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + T;
    let s = loop {
        let (code, s) = get(&format!("{}/v1/stats/series?minutes=10", d.base)).await;
        assert_eq!(code, 200, "{s}");
        if (sum(&s, "succeeded_per_second") - 13.0).abs() < 1e-6
            && (sum(&s, "failed_per_second") - 1.0).abs() < 1e-6
            && (sum(&s, "retried_per_second") - 2.0).abs() < 1e-6
        {
            break s;
        }
        assert!(Instant::now() < deadline, "the series never added up: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s["step_seconds"], 5);
    let points = s["points"].as_array().expect("points");
    assert_eq!(points.len(), 120);
    let p99: Vec<f64> = points.iter().filter_map(|p| p["p99_ms"].as_f64()).collect();
    assert!(!p99.is_empty() && p99.iter().all(|v| *v > 0.0), "{s}");
    // The samples are the deployment's own: another deployment's series is empty.
    let other = TestEnv::new().await;
    let d2 = deploy(&other, None).await;
    let (_, s2) = get(&format!("{}/v1/stats/series?minutes=10", d2.base)).await;
    assert_eq!(sum(&s2, "succeeded_per_second"), 0.0, "{s2}");
    for bad in ["0", "1441", "x"] {
        let (code, body) = get(&format!("{}/v1/stats/series?minutes={bad}", d.base)).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["error"].as_str().expect("error").contains("minutes"));
    }
}

#[tokio::test]
async fn jobs_filter_by_time_range() {
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    let first = env.enqueue(NewJob::new("echo", json!(1))).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = env.enqueue(NewJob::new("echo", json!(2))).await;
    let at = cut.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let list = |q: String| {
        let base = d.base.clone();
        async move {
            let (code, body) = get(&format!("{base}/v1/jobs?{q}")).await;
            assert_eq!(code, 200, "{q}: {body}");
            body["jobs"]
                .as_array()
                .expect("jobs")
                .iter()
                .map(|j| j["id"].as_str().expect("id").parse::<Uuid>().expect("uuid"))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(format!("created_after={at}")).await, vec![second]);
    assert_eq!(list(format!("created_before={at}")).await, vec![first]);
    assert_eq!(
        list(format!("created_after={at}&created_before={at}")).await,
        Vec::<Uuid>::new()
    );
    let (code, body) = get(&format!("{}/v1/jobs?created_after=yesterday", d.base)).await;
    assert_eq!(code, 400);
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("created_after"),
        "{body}"
    );
}

#[tokio::test]
async fn children_and_replay_by_kind() {
    let env = TestEnv::new().await;
    let d = deploy(&env, None).await;
    let parent = env.enqueue(NewJob::new("echo", json!("p"))).await;
    let child = env
        .enqueue(NewJob::new("echo", json!("c")).with_depends_on([parent]))
        .await;
    env.wait_for_status(child, JobStatus::Succeeded, T).await;
    let (code, body) = get(&format!("{}/v1/jobs/{parent}/children", d.base)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["children"],
        json!([{ "id": child, "kind": "echo", "status": "succeeded" }])
    );
    let (code, _) = get(&format!("{}/v1/jobs/{}/children", d.base, Uuid::now_v7())).await;
    assert_eq!(code, 404);

    // Two dead `fail` jobs and one dead job of another kind: replaying `fail` takes two.
    let fixed_at = chrono::Utc::now() + chrono::Duration::seconds(10);
    let mut dead = Vec::new();
    for _ in 0..2 {
        dead.push(
            env.enqueue(NewJob::new(
                "fail",
                json!({ "until": fixed_at, "permanent": true }),
            ))
            .await,
        );
    }
    let other = env
        .enqueue(NewJob::new("sleep", json!({ "bad": "payload" })).with_max_attempts(1))
        .await;
    for id in &dead {
        env.wait_for_status(*id, JobStatus::Dead, T).await;
    }
    env.wait_for_status(other, JobStatus::Dead, T).await;
    while chrono::Utc::now() < fixed_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = post(
        &format!("{}/v1/dead/replay", d.base),
        json!({ "kind": "fail" }),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["replayed"], 2, "{body}");
    for id in &dead {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    assert_eq!(env.job(other).await.expect("job").status(), JobStatus::Dead);
    for (bad, what) in [
        (json!({}), "give kind"),
        (json!({ "kind": "fail", "all": true }), "not both"),
    ] {
        let (code, body) = post(&format!("{}/v1/dead/replay", d.base), bad).await;
        assert_eq!(code, 400, "{body}");
        assert!(
            body["error"].as_str().expect("error").contains(what),
            "{body}"
        );
    }
}
