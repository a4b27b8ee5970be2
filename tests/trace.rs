//! W3C trace context across the queue, exported over OTLP to a real receiver run by the test:
//! a caller's trace continues in `POST /v1/jobs`'s span (a real `apiary api`), and a raw AMQP
//! producer's `traceparent` continues in the handler's span (a real `apiary worker`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiary::JobStatus;
use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use common::TestEnv;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use uuid::Uuid;

/// One exported span: its service, name, ids.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

/// An OTLP/HTTP receiver (JSON encoding) on a free port of loopback.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let sink = spans.clone();
        let app = Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let sink = sink.clone();
                async move {
                    if let Ok(doc) = serde_json::from_slice::<Value>(&body) {
                        sink.lock().expect("lock").extend(spans_of(&doc));
                    }
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { url, spans }
    }

    /// Waits until a span matching `want` has arrived.
    async fn wait_for(&self, what: &str, want: impl Fn(&Span) -> bool) -> Span {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.spans.lock().expect("lock").iter().find(|s| want(s)) {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no span {what}; got {:?}",
                self.spans.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The spans of an OTLP JSON export request.
fn spans_of(doc: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_string();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let text = |k: &str| s[k].as_str().unwrap_or_default().to_lowercase();
                out.push(Span {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent: text("parentSpanId"),
                });
            }
        }
    }
    out
}

/// What points a real `apiary` process's export at `collector`, quickly.
fn otel_env(collector: &Collector) -> [(&'static str, &str); 3] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn random_hex(bytes: usize) -> String {
    let mut s = Uuid::new_v4().simple().to_string();
    s.push_str(&Uuid::new_v4().simple().to_string());
    s.truncate(bytes * 2);
    s
}

#[tokio::test]
async fn a_callers_trace_runs_from_the_http_enqueue_into_the_handler() {
    let env = TestEnv::new().await;
    let collector = Collector::start().await;
    let vars = otel_env(&collector);
    let port = free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let mut api_vars = vars.to_vec();
    api_vars.push(("APIARY_HTTP_ADDR", &addr));
    let api = env.spawn(&["api"], &api_vars);
    let _worker = env.spawn(&["worker"], &vars);
    api.wait_for_log("api listening", Duration::from_secs(20))
        .await;

    let trace_id = random_hex(16);
    let caller_span = random_hex(8);
    let http = reqwest::Client::new();
    let answer: Value = http
        .post(format!("http://{addr}/v1/jobs"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"kind": "echo", "payload": {"hello": "trace"}}))
        .send()
        .await
        .expect("enqueue")
        .json()
        .await
        .expect("json");
    let id: Uuid = answer["id"].as_str().expect("id").parse().expect("uuid");
    env.wait_for_status(id, JobStatus::Succeeded, Duration::from_secs(20))
        .await;

    let api_span = collector
        .wait_for("from the api", |s| {
            s.trace_id == trace_id && s.service == "apiary-api"
        })
        .await;
    assert_eq!(
        api_span.parent, caller_span,
        "the api's span continues the caller's"
    );
    assert_eq!(api_span.span_id.len(), 16, "a span id of its own");
    // `apiary api` enqueues through `Client::enqueue`, whose batcher publishes outside the
    // request's span: the message must still carry this span's context to the handler.
    let job_span = collector
        .wait_for("from the worker", |s| {
            s.trace_id == trace_id && s.service == "apiary-worker" && s.name == "job"
        })
        .await;
    assert_eq!(
        job_span.parent, api_span.span_id,
        "the handler's span is a child of the api's"
    );
}

#[tokio::test]
async fn a_raw_producers_traceparent_is_continued_and_a_malformed_one_is_ignored() {
    let env = TestEnv::new().await;
    let collector = Collector::start().await;
    let vars = otel_env(&collector);
    let _worker = env.spawn(&["worker"], &vars);

    let trace_id = random_hex(16);
    let producer_span = random_hex(8);
    let good = Uuid::now_v7();
    let bad = Uuid::now_v7();
    for (id, traceparent) in [
        (good, format!("00-{trace_id}-{producer_span}-01")),
        (bad, "00-not-a-trace".to_string()),
    ] {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(traceparent.as_str().into()),
        );
        let body = serde_json::json!({"id": id, "kind": "echo", "payload": 1}).to_string();
        common::publish_raw_with(
            &env.names().work,
            &[(None, body.into_bytes())],
            None,
            Some(headers),
        )
        .await;
    }
    env.wait_for_status(good, JobStatus::Succeeded, Duration::from_secs(20))
        .await;
    env.wait_for_status(bad, JobStatus::Succeeded, Duration::from_secs(20))
        .await;
    let job_span = collector
        .wait_for("for the raw message", |s| {
            s.trace_id == trace_id && s.name == "job"
        })
        .await;
    assert_eq!(job_span.parent, producer_span);
    assert_eq!(job_span.service, "apiary-worker");
}
