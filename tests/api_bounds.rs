//! The API's bounds: a page of `GET /v1/jobs` is bounded in bytes as well as rows, no filter
//! reads more rows than its bounds allow (a sparse `status` filter pages through its scan
//! budget instead of scanning the table), `/readyz` reads state and never connects, and long
//! polls are capped per process.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use apiary::api::auth::Tokens;
use apiary::api::readiness::Backoff;
use apiary::api::{ApiOptions, AppState, router};
use apiary::store::list_jobs::JobFilter;
use apiary::{JobStatus, Shutdown};
use common::{TestEnv, call};
use serde_json::Value;
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

fn state_with(env: &TestEnv, client: apiary::Client, options: ApiOptions) -> AppState {
    AppState::with_options(
        client,
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        Tokens::default(),
        options,
    )
}

/// Inserts `n` finished jobs of `kind` straight into the table, each `payload_bytes` of
/// payload, the newest `offset_ms` before now and each 1 ms older than the one before.
async fn seed(env: &TestEnv, n: i64, kind: &str, payload_bytes: i32, offset_ms: i64) {
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, result, max_attempts, status, finished_at, created_at)
         SELECT gen_random_uuid(), $2, ('\"' || repeat('x', $3) || '\"')::json, '1', 3, 'succeeded', now(),
                now() - ($4 + g) * interval '1 millisecond'
           FROM generate_series(1, $1) g",
    )
    .bind(n)
    .bind(kind)
    .bind(payload_bytes)
    .bind(offset_ms)
    .execute(env.store.pool())
    .await
    .expect("seed jobs");
}

/// Every job id, newest first, as the table orders them.
async fn all_ids(env: &TestEnv) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM apiary_jobs ORDER BY created_at DESC, id DESC")
        .fetch_all(env.store.pool())
        .await
        .expect("ids")
}

fn ids_of(page: &Value) -> Vec<Uuid> {
    page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").parse().expect("uuid"))
        .collect()
}

/// Follows `next` from `first_uri` to the end, returning every page.
async fn pages(app: &axum::Router, first_uri: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut uri = first_uri.to_string();
    loop {
        let (status, page) = call(app, "GET", &uri, None).await;
        assert_eq!(status, 200, "{uri}: {page}");
        let next = page["next"].as_str().map(str::to_string);
        out.push(page);
        let Some(next) = next else { return out };
        assert!(out.len() < 10_000, "paging does not end");
        let sep = if first_uri.contains('?') { '&' } else { '?' };
        uri = format!("{first_uri}{sep}before={next}");
    }
}

#[tokio::test]
async fn pages_are_bounded_in_bytes_and_continue_where_they_were_cut() {
    let env = TestEnv::new().await;
    const MAX: i64 = 1024 * 1024;
    let state = state_with(
        &env,
        env.client(),
        ApiOptions {
            max_page_bytes: MAX,
            ..ApiOptions::default()
        },
    );
    let app = router(state);
    // 20 jobs of 256 KiB: 5 MiB in all, far fewer rows than the limit asked for.
    seed(&env, 20, "big", 256 * 1024, 0).await;
    let all = all_ids(&env).await;

    let got = pages(&app, "/v1/jobs?limit=1000").await;
    assert!(got.len() > 1, "one page held all 5 MiB");
    for page in &got {
        let bytes = serde_json::to_vec(page).expect("json").len() as i64;
        assert!(
            bytes <= MAX,
            "a page of {bytes} bytes passed the bound of {MAX}"
        );
        assert!(
            !ids_of(page).is_empty(),
            "an empty page before the end: {page}"
        );
    }
    // Cut pages are full: one more job would not have fitted.
    let first = ids_of(&got[0]);
    assert!((first.len() + 1) * (256 * 1024 + 2) > MAX as usize);
    assert_eq!(
        got[0]["next"].as_str(),
        first.last().map(|id| id.to_string()).as_deref(),
        "a page cut by bytes continues after its last job"
    );
    let listed: Vec<Uuid> = got.iter().flat_map(ids_of).collect();
    assert_eq!(listed, all, "paging by bytes skipped or repeated jobs");

    // A job larger than the bound still comes, alone on its page.
    seed(&env, 2, "huge", 2 * 1024 * 1024, -1000).await;
    let (status, page) = call(&app, "GET", "/v1/jobs?limit=10", None).await;
    assert_eq!(status, 200);
    let one = ids_of(&page);
    assert_eq!(one.len(), 1, "{}", page["next"]);
    assert_eq!(page["jobs"][0]["kind"], "huge");
    assert_eq!(page["next"].as_str(), Some(one[0].to_string().as_str()));
}

#[tokio::test]
async fn a_sparse_status_filter_pages_through_its_scan_budget_to_the_match() {
    let env = TestEnv::new().await;
    const BUDGET: i64 = 1000;
    let app = router(state_with(
        &env,
        env.client(),
        ApiOptions {
            scan_budget: BUDGET,
            ..ApiOptions::default()
        },
    ));
    // The one queued job is the oldest, behind 4,500 finished ones.
    let queued = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, max_attempts, created_at)
         VALUES ($1, 'echo', '1', 3, now() - interval '1 hour')",
    )
    .bind(queued)
    .execute(env.store.pool())
    .await
    .expect("insert");
    seed(&env, 4500, "echo", 10, 0).await;
    let all = all_ids(&env).await;

    let (status, first) = call(&app, "GET", "/v1/jobs?status=queued&limit=10", None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids_of(&first), Vec::<Uuid>::new(), "{first}");
    assert_eq!(
        first["next"].as_str(),
        Some(all[BUDGET as usize - 1].to_string().as_str()),
        "an exhausted scan continues after the last row it examined"
    );

    let got = pages(&app, "/v1/jobs?status=queued&limit=10").await;
    let found: Vec<Uuid> = got.iter().flat_map(ids_of).collect();
    assert_eq!(found, vec![queued]);
    assert_eq!(
        got.len(),
        all.len().div_ceil(BUDGET as usize),
        "one page per budget of rows"
    );
    assert!(got.last().is_some_and(|p| p["next"].is_null()));

    // With kind as well, the kind index is walked and the same budget holds.
    let got = pages(&app, "/v1/jobs?status=queued&kind=echo&limit=10").await;
    assert_eq!(
        got.iter().flat_map(ids_of).collect::<Vec<_>>(),
        vec![queued]
    );
    assert!(got.len() > 1);

    // A dense filter fills its page without using up the budget.
    let (_, dense) = call(&app, "GET", "/v1/jobs?status=succeeded&limit=7", None).await;
    assert_eq!(ids_of(&dense), all[..7].to_vec());
    assert_eq!(dense["next"].as_str(), Some(all[6].to_string().as_str()));
}

/// Rows a plan's scans of `apiary_jobs` read: returned plus filtered out, over every loop.
fn rows_read(plan: &Value) -> f64 {
    let mut read = 0.0;
    if plan["Relation Name"] == "apiary_jobs" {
        let n = |k: &str| plan[k].as_f64().unwrap_or(0.0);
        read +=
            (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
                * n("Actual Loops").max(1.0);
    }
    if let Some(children) = plan["Plans"].as_array() {
        read += children.iter().map(rows_read).sum::<f64>();
    }
    read
}

#[tokio::test]
async fn no_filter_reads_more_rows_than_its_bounds() {
    let env = TestEnv::new().await;
    const BUDGET: i64 = 1000;
    // 20,000 jobs of 50 kinds, every other one with a dedup key; a few queued.
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, result, max_attempts, status, finished_at, created_at, dedup_key)
         SELECT gen_random_uuid(), 'k' || (g % 50), '1',
                CASE WHEN g % 997 = 0 THEN NULL ELSE '1'::json END, 3,
                CASE WHEN g % 997 = 0 THEN 'queued' ELSE 'succeeded' END,
                CASE WHEN g % 997 = 0 THEN NULL ELSE now() END,
                now() - g * interval '1 millisecond',
                CASE WHEN g % 2 = 0 THEN 'key-' || g END
           FROM generate_series(1, 20000) g",
    )
    .execute(env.store.pool())
    .await
    .expect("seed");
    sqlx::query("ANALYZE apiary_jobs")
        .execute(env.store.pool())
        .await
        .expect("analyze");
    let cursor: Uuid = sqlx::query_scalar(
        "SELECT id FROM apiary_jobs ORDER BY created_at DESC, id DESC OFFSET 5000 LIMIT 1",
    )
    .fetch_one(env.store.pool())
    .await
    .expect("cursor");

    let limit = 50;
    let filters = [
        ("none", None, None, None),
        ("kind", None, Some("k7"), None),
        ("dedup_key", None, None, Some("key-1234")),
        ("kind and dedup_key", None, Some("k34"), Some("key-1234")),
        ("status", Some(JobStatus::Queued), None, None),
        ("status and kind", Some(JobStatus::Queued), Some("k7"), None),
        (
            "status and dedup_key",
            Some(JobStatus::Queued),
            None,
            Some("key-1234"),
        ),
    ];
    for (what, status, kind, dedup_key) in filters {
        for before in [None, Some(cursor)] {
            let filter = JobFilter {
                status,
                kind: kind.map(str::to_string),
                dedup_key: dedup_key.map(str::to_string),
                before,
                limit,
                scan_budget: BUDGET,
                ..JobFilter::default()
            };
            let plan = env.store.explain_list_jobs(&filter).await.expect("explain");
            let root = &plan[0]["Plan"];
            let read = rows_read(root);
            // The cursor's own lookup reads one row.
            let bound = if status.is_some() { BUDGET } else { limit } as f64 + 1.0;
            assert!(
                read <= bound,
                "{what} (cursor {}): read {read} rows, bound {bound}:\n{root:#}",
                before.is_some()
            );
        }
    }
}

/// A listener that counts the connections made to it and drops each at once: a RabbitMQ
/// that is "up" at the TCP level and refuses every session.
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn readyz_reads_state_and_never_connects() {
    let env = TestEnv::new().await;
    let (port, accepted) = counting_listener().await;
    let mut cfg = env.cfg.clone();
    cfg.amqp_url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let client = apiary::Client::new(&cfg).expect("client");
    // The reconnector makes its first attempt and then waits an hour: every later
    // connection would be a probe's.
    let hour = Duration::from_secs(3600);
    let app = router(state_with(
        &env,
        client,
        ApiOptions {
            reconnect: Backoff {
                min: hour,
                max: hour,
            },
            ..ApiOptions::default()
        },
    ));
    env.wait_until("the reconnector's first attempt", T, || async {
        (accepted.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..200 {
        let (status, ready) = call(&app, "GET", "/readyz", None).await;
        assert_eq!(status, 503, "{ready}");
        assert_eq!(ready["rabbitmq"], false, "{ready}");
        assert_eq!(ready["postgres"], true, "{ready}");
        assert_eq!(ready["ready"], false, "{ready}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "readiness probes opened connections to RabbitMQ"
    );

    // With RabbitMQ reachable the same probe says ready, the reconnector having connected.
    let app = router(state_with(&env, env.client(), ApiOptions::default()));
    let (status, ready) = call(&app, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{ready}");
}

#[tokio::test]
async fn long_polls_past_the_cap_are_refused_with_json() {
    let env = TestEnv::new().await;
    let state = state_with(
        &env,
        env.client(),
        ApiOptions {
            max_waiters: 1,
            ..ApiOptions::default()
        },
    );
    let app = router(state.clone());
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, max_attempts) VALUES ($1, 'echo', '1', 3)",
    )
    .bind(id)
    .execute(env.store.pool())
    .await
    .expect("insert");

    let waiting = {
        let app = app.clone();
        tokio::spawn(
            async move { call(&app, "GET", &format!("/v1/jobs/{id}?wait=60"), None).await },
        )
    };
    env.wait_until("the first long poll to wait", T, || async {
        (state.waiters.waiting() == 1).then_some(())
    })
    .await;

    let (status, err) = call(&app, "GET", &format!("/v1/jobs/{id}?wait=1"), None).await;
    assert_eq!(status, 503, "{err}");
    assert_eq!(
        err["error"],
        "too many waiting requests; retry without wait or later"
    );
    // Reading without waiting is not capped.
    let (status, job) = call(&app, "GET", &format!("/v1/jobs/{id}"), None).await;
    assert_eq!((status, job["status"].as_str()), (200, Some("queued")));

    // The waiting request ends when the job does, and frees its place.
    let (status, _) = call(&app, "POST", &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(status, 200);
    let (status, job) = waiting.await.expect("long poll");
    assert_eq!((status, job["status"].as_str()), (200, Some("cancelled")));
    assert_eq!(state.waiters.waiting(), 0);
    let (status, job) = call(&app, "GET", &format!("/v1/jobs/{id}?wait=1"), None).await;
    assert_eq!((status, job["status"].as_str()), (200, Some("cancelled")));
}
