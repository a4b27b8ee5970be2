//! `apiary.webhook`: delivers a completion webhook. Every worker runs it (see
//! [`Webhook::register`]); its jobs are recorded by a trigger when a job with a
//! `callback_url` ends (migration 0015), so a delivery retries, survives crashes and shows up
//! in `GET /v1/jobs?kind=apiary.webhook` like any job.
//!
//! One attempt: read the record as `GET /v1/jobs/{id}` shows it, bound its size, sign it, POST
//! it once with a timeout and no redirects, and read at most a few KiB of the answer. 2xx is
//! delivered; 408, 429, 5xx, a timeout or a connection error is retried with the kind's
//! backoff (or the receiver's `Retry-After`); any other answer is final and the delivery is
//! dead with the status in its error. The allow-list is checked again here, since the
//! configuration may have changed since the job was enqueued.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Handler, HandlerError, JobContext, KindOptions, Registry};
use crate::config::Config;
use crate::job::Job;
use crate::webhook::{KIND, WebhookHosts, WebhookSecret};

/// The most of a receiver's answer read (and quoted in an error); the rest is dropped unread.
pub const MAX_ANSWER_BYTES: usize = 4096;

/// The longest `Retry-After` honoured; a longer one waits this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a delivery job carries: which record, where to, and for which finish.
#[derive(Debug, Deserialize)]
struct Delivery {
    /// `job` or `batch`.
    record: String,
    id: Uuid,
    url: String,
    /// `job.succeeded`, `job.dead`, `job.cancelled`, `batch.completed`, `batch.failed`.
    event: String,
    finished_at: Option<DateTime<Utc>>,
}

/// Delivers completion webhooks: POSTs a finished job's record to its `callback_url`, signed.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Webhook {
    hosts: WebhookHosts,
    secret: Option<WebhookSecret>,
    max_bytes: usize,
    /// `Err` if the HTTP client could not be built (no TLS roots): every attempt then retries
    /// with that reason.
    client: Result<reqwest::Client, String>,
}

impl Webhook {
    /// A deliverer with `cfg`'s allow-list, secret, timeout and size bound.
    pub fn new(cfg: &Config) -> Webhook {
        let client = reqwest::Client::builder()
            .timeout(cfg.webhook_timeout)
            .connect_timeout(cfg.webhook_timeout)
            // A redirect could lead anywhere, past the allow-list: the answer is final.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("apiary/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("the webhook HTTP client could not be built: {e}"));
        Webhook {
            hosts: cfg.webhook_hosts.clone(),
            secret: cfg.webhook_secret.clone(),
            max_bytes: cfg.webhook_max_bytes,
            client,
        }
    }

    /// The kind's defaults, below `APIARY_KINDS` (`apiary.webhook:retry_base=...`): backoff
    /// from 2 s doubling to 1 h, so the 12 attempts span about an hour and a half; an attempt
    /// may run the request's timeout plus a margin for reading the record.
    pub fn options(cfg: &Config) -> KindOptions {
        KindOptions {
            retry_base: Some(Duration::from_secs(2)),
            retry_cap: Some(Duration::from_secs(3600)),
            timeout: Some(cfg.webhook_timeout + Duration::from_secs(5)),
            ..KindOptions::default()
        }
    }

    /// Adds the deliverer to `registry` unless it already serves [`KIND`] (an embedding that
    /// registered its own keeps it). Every worker does this when it starts.
    pub fn register(registry: &mut Registry, cfg: &Config) {
        if registry.get(KIND).is_none() {
            registry.register_with(KIND, Webhook::new(cfg), Webhook::options(cfg));
        }
    }

    /// The body to send and what was left out of it to fit the bound.
    fn body(
        &self,
        d: &Delivery,
        job: Option<Job>,
    ) -> Result<(Vec<u8>, Option<&'static str>), HandlerError> {
        let Some(mut job) = job else {
            return stub(d);
        };
        let whole = encode(&job)?;
        if whole.len() <= self.max_bytes {
            return Ok((whole, None));
        }
        job.payload = Value::Null;
        job.result = None;
        let lighter = encode(&job)?;
        if lighter.len() <= self.max_bytes {
            return Ok((lighter, Some("payload,result")));
        }
        // Many long errors, or a large poison body or progress detail: keep only what says
        // where the job stands.
        job.errors = Value::Array(Vec::new());
        job.raw_body = None;
        job.progress_detail = None;
        Ok((
            encode(&job)?,
            Some("payload,result,errors,raw_body,progress_detail"),
        ))
    }
}

/// For a record pruned before this attempt: what the delivery knows (id, status, when), and
/// that the rest is gone.
fn stub(d: &Delivery) -> Result<(Vec<u8>, Option<&'static str>), HandlerError> {
    let status = d
        .event
        .split_once('.')
        .map_or(d.event.as_str(), |(_, status)| status);
    let stub = serde_json::json!({
        "id": d.id, "status": status, "finished_at": d.finished_at,
    });
    Ok((encode(&stub)?, Some("record")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(v)
        .map_err(|e| HandlerError::permanent(format!("the record cannot be encoded: {e}")))
}

impl Handler for Webhook {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let d: Delivery = ctx.payload()?;
        let url = crate::webhook::validate_form(&d.url)
            .map_err(|e| HandlerError::permanent(format!("not delivered: {e}")))?;
        if !self.hosts.allows(&url) {
            return Err(HandlerError::permanent(format!(
                "not delivered: the host of {} is no longer in APIARY_WEBHOOK_HOSTS",
                url.origin().ascii_serialization()
            )));
        }
        let Some(secret) = &self.secret else {
            // Another worker, or this one restarted with its secret, can still deliver it.
            return Err(HandlerError::retry(
                "not delivered: this worker has no APIARY_WEBHOOK_SECRET to sign with",
            ));
        };
        let client = self.client.as_ref().map_err(HandlerError::retry)?;
        let store = crate::store::Store::from_pool(ctx.pool().clone());
        let (body, left_out) = match d.record.as_str() {
            "job" => {
                let job = store
                    .get_job(d.id)
                    .await
                    .map_err(|e| HandlerError::retry(format!("reading the job: {e}")))?;
                self.body(&d, job)?
            }
            // A batch's record is its counts, small whatever the batch's size: never cut.
            "batch" => match store
                .get_batch(d.id)
                .await
                .map_err(|e| HandlerError::retry(format!("reading the batch: {e}")))?
            {
                Some(batch) => (encode(&batch)?, None),
                None => stub(&d)?,
            },
            other => {
                return Err(HandlerError::permanent(format!(
                    "not delivered: unknown record {other:?}"
                )));
            }
        };
        let timestamp = Utc::now().timestamp();
        let mut request = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Apiary-Signature", secret.sign(timestamp, &body))
            .header("X-Apiary-Timestamp", timestamp.to_string())
            .header("X-Apiary-Delivery", ctx.id().to_string())
            .header("X-Apiary-Event", d.event.as_str())
            .header("X-Apiary-Attempt", ctx.attempt().to_string());
        if let Some(what) = left_out {
            request = request.header("X-Apiary-Truncated", what);
        }
        let mut response = request
            .body(body)
            .send()
            .await
            .map_err(|e| HandlerError::retry(format!("not delivered: {}", describe(&e))))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        let answer = read_bounded(&mut response).await;
        if status.is_success() {
            return Ok(serde_json::json!({ "status": status.as_u16() }));
        }
        let message = format!(
            "the receiver answered {status}{}",
            if answer.is_empty() {
                String::new()
            } else {
                format!(": {answer}")
            }
        );
        let again = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(match (again, retry_after) {
            (true, Some(wait)) => HandlerError::retry_after(message, wait),
            (true, None) => HandlerError::retry(message),
            (false, _) => HandlerError::permanent(message),
        })
    }
}

/// At most [`MAX_ANSWER_BYTES`] of the answer, as text; the rest is never read (the
/// connection is dropped with it), so a huge answer costs no memory.
async fn read_bounded(response: &mut reqwest::Response) -> String {
    let mut kept = Vec::new();
    while kept.len() < MAX_ANSWER_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ANSWER_BYTES - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

/// A send error, with its cause (reqwest's own text is often just "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "the request failed"
    };
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
