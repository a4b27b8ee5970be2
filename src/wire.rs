//! The message format on the queue: what a producer in any language publishes, and how a
//! worker reads it back. The README documents the same format for people without our code.
//!
//! A job message is a persistent AMQP message with `content_type: application/json` whose body
//! is `{"id", "kind", "payload", "dedup_key", "max_attempts", "run_at"}`; only `kind` is
//! required. Decoding never panics and never guesses: a body that is not a job comes back as a
//! [`Poison`] naming what is wrong, and the worker dead-letters it.
//!
//! Every message has one stable id, so a redelivery is always recognised as the same job: the
//! body's `id`, else the `message_id` property if it is a UUID, else a UUID derived from the
//! `message_id` text, else a UUID derived from the body itself (see [`derived_id`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::job::{self, JobId};

/// The AMQP header Apiary puts on every job message it publishes for a job it has recorded
/// (enqueue, relay, retry, delay hop, rescue, replay). A message that carries it but whose job
/// row is gone belongs to a job that finished and was pruned: it is acked unrun, never
/// recorded again. Producers should not set it.
pub const RECORDED_HEADER: &str = "x-apiary-recorded";

/// Namespace of ids derived from a non-UUID `message_id`.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x69128f94_87d2_4fdb_874d_7c413d62ef57);
/// Namespace of ids derived from a body that names no id at all.
const BODY_NAMESPACE: Uuid = Uuid::from_u128(0x3ebe62f1_db0c_4a87_bcaf_9a9b7fb0a690);
/// Namespace of the ids under which messages that collide with another job are recorded.
const CONFLICT_NAMESPACE: Uuid = Uuid::from_u128(0xa9024965_9f41_4b39_80ac_118475608118);

/// The id of a message that carries no UUID of its own: a UUIDv5 of its `message_id` text if
/// it has one, else of its body. Derived, not random, so a redelivery of the message (after a
/// worker died holding it) is the same job and never runs as a second one. The consequence,
/// documented for producers: two id-less messages with identical bodies are one job.
pub fn derived_id(message_id: Option<&str>, body: &[u8]) -> JobId {
    match message_id.filter(|m| !m.is_empty()) {
        Some(m) => Uuid::new_v5(&MESSAGE_ID_NAMESPACE, m.as_bytes()),
        None => Uuid::new_v5(&BODY_NAMESPACE, body),
    }
}

/// The id under which a message that collides with a recorded job (same id, other content) is
/// recorded instead: derived from the message, so its redeliveries land on the same record.
pub fn conflict_id(taken: JobId, body: &[u8]) -> JobId {
    let mut name = Vec::with_capacity(16 + body.len());
    name.extend_from_slice(taken.as_bytes());
    name.extend_from_slice(body);
    Uuid::new_v5(&CONFLICT_NAMESPACE, &name)
}

/// A job as carried by a message. The payload stays raw JSON: the worker passes it to Postgres
/// and to the handler without re-encoding it.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Serialize)]
pub struct WireJob {
    /// The job's id.
    pub id: JobId,
    /// The handler name.
    pub kind: String,
    /// The handler's input, as the producer wrote it.
    pub payload: Box<RawValue>,
    /// The producer's idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_key: Option<String>,
    /// The attempt budget the producer asked for; the worker's default when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    /// Not before this instant: a scheduled job or a retry waiting out its backoff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    /// The queue the job belongs to; when absent, the queue the message was delivered on. A
    /// message that names another queue than the one it arrived on is refused (dead-lettered
    /// with the reason), never run in the wrong line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// 0 to 9, higher first. RabbitMQ orders by the message's AMQP `priority` property; this
    /// field is what Apiary records and sets on every message it publishes for the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Jobs sharing it run at most the kind's `max_per_key` at a time across every worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// Where the job's final record is POSTed when it ends (a completion webhook). A raw
    /// message's URL is checked against the worker's webhook policy when it is first
    /// recorded; one it would not call dead-letters the message with the reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The deployment (`APIARY_QUEUE`) the job was recorded in, for routing its messages;
    /// never on the wire. `None`: the deployment of whoever publishes it.
    #[serde(skip)]
    pub prefix: Option<String>,
}

/// Why a message is not a job. The worker records it, with the raw body, as a dead job.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Poison {
    /// The id to record the message under: the one a valid message would have had (see
    /// [`derived_id`]).
    pub id: JobId,
    /// The kind, if one could be read, so the record is findable by kind.
    pub kind: Option<String>,
    /// What is wrong, naming the field.
    pub reason: String,
}

/// The fields of a body, borrowed and not yet checked, so each error can name its field.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    dedup_key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_attempts: Option<&'a RawValue>,
    #[serde(borrow, default)]
    run_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    queue: Option<&'a RawValue>,
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
    #[serde(borrow, default)]
    concurrency_key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    callback_url: Option<&'a RawValue>,
}

impl WireJob {
    /// The JSON body to publish.
    pub fn to_body(&self) -> Vec<u8> {
        // Serialising a struct of strings, numbers and already-valid raw JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a message body. `message_id` is the AMQP property, used for the id when the body
    /// has none. `max_payload_bytes` bounds the payload (as the producer wrote it); the body
    /// may be [`job::ENVELOPE_BYTES`] larger.
    pub fn decode(
        body: &[u8],
        message_id: Option<&str>,
        max_payload_bytes: usize,
    ) -> Result<WireJob, Poison> {
        let prop_id = message_id.and_then(|m| Uuid::parse_str(m).ok());
        let fallback = || prop_id.unwrap_or_else(|| derived_id(message_id, body));
        let poison = |id: Option<JobId>, kind: Option<String>, reason: String| Poison {
            id: id.unwrap_or_else(fallback),
            kind,
            reason,
        };
        let max_body = max_payload_bytes.saturating_add(job::ENVELOPE_BYTES);
        if body.len() > max_body {
            return Err(poison(
                None,
                None,
                format!(
                    "body is {} bytes; the limit is {max_body} (a payload of at most {max_payload_bytes} plus {} for the envelope)",
                    body.len(),
                    job::ENVELOPE_BYTES
                ),
            ));
        }
        let text = std::str::from_utf8(body)
            .map_err(|e| poison(None, None, format!("body is not UTF-8: {e}")))?;
        // Checked first: serde would read an array as a struct, field by position.
        if !text.trim_start().starts_with('{') {
            let what = if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                "body is not a JSON object".to_string()
            } else {
                "body is not a JSON object (not JSON at all)".to_string()
            };
            return Err(poison(None, None, what));
        }
        let fields: Fields<'_> = serde_json::from_str(text)
            .map_err(|e| poison(None, None, format!("body is not valid JSON: {e}")))?;

        let id: Option<JobId> = match fields.id {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|_| {
                poison(
                    None,
                    None,
                    format!("id: expected a UUID string, got {}", clip(raw.get())),
                )
            })?),
        };
        let kind: String = match fields.kind {
            None => return Err(poison(id, None, "kind: missing".into())),
            Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
                poison(
                    id,
                    None,
                    format!("kind: expected a string, got {}", clip(raw.get())),
                )
            })?,
        };
        if let Err(e) = job::validate_kind(&kind) {
            return Err(poison(id, None, e.to_string()));
        }
        let with_kind = |reason: String| poison(id, Some(kind.clone()), reason);
        let dedup_key: Option<String> = match fields.dedup_key {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|_| {
                with_kind(format!(
                    "dedup_key: expected a string, got {}",
                    clip(raw.get())
                ))
            })?),
        };
        if let Some(key) = &dedup_key {
            job::validate_dedup_key(key).map_err(|e| with_kind(e.to_string()))?;
        }
        let max_attempts: Option<i32> = match fields.max_attempts {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|_| {
                with_kind(format!(
                    "max_attempts: expected an integer, got {}",
                    clip(raw.get())
                ))
            })?),
        };
        if let Some(n) = max_attempts {
            job::validate_max_attempts(n).map_err(|e| with_kind(e.to_string()))?;
        }
        let run_at: Option<DateTime<Utc>> = match fields.run_at {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|_| {
                with_kind(format!(
                    "run_at: expected an RFC 3339 timestamp, got {}",
                    clip(raw.get())
                ))
            })?),
        };
        if let Some(at) = run_at {
            job::validate_run_at(at, Utc::now()).map_err(|e| with_kind(e.to_string()))?;
        }
        let queue: Option<String> = match fields.queue {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|_| {
                with_kind(format!("queue: expected a string, got {}", clip(raw.get())))
            })?),
        };
        if let Some(q) = &queue {
            job::validate_queue(q).map_err(|e| with_kind(e.to_string()))?;
        }
        let priority: Option<u8> = match fields.priority {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => {
                let n: i64 = serde_json::from_str(raw.get()).map_err(|_| {
                    with_kind(format!(
                        "priority: expected an integer from 0 to 9, got {}",
                        clip(raw.get())
                    ))
                })?;
                job::validate_priority(n).map_err(|e| with_kind(e.to_string()))?;
                u8::try_from(n).ok()
            }
        };
        let concurrency_key: Option<String> = match fields.concurrency_key {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|_| {
                with_kind(format!(
                    "concurrency_key: expected a string, got {}",
                    clip(raw.get())
                ))
            })?),
        };
        if let Some(key) = &concurrency_key {
            job::validate_concurrency_key(key).map_err(|e| with_kind(e.to_string()))?;
        }
        let callback_url: Option<String> = match fields.callback_url {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|_| {
                with_kind(format!(
                    "callback_url: expected a string, got {}",
                    clip(raw.get())
                ))
            })?),
        };
        if let Some(url) = &callback_url {
            crate::webhook::validate_form(url).map_err(|e| with_kind(e.to_string()))?;
        }
        let payload = match fields.payload {
            Some(raw) => raw.to_owned(),
            None => RawValue::from_string("null".into()).map_err(|e| with_kind(e.to_string()))?,
        };
        // The payload as the producer wrote it is what Postgres keeps and every republish
        // carries, so this one measure holds on every path.
        if payload.get().len() > max_payload_bytes {
            return Err(with_kind(format!(
                "payload is {} bytes; the limit is {max_payload_bytes}",
                payload.get().len()
            )));
        }
        Ok(WireJob {
            id: id.unwrap_or_else(fallback),
            kind,
            payload,
            dedup_key,
            max_attempts,
            run_at,
            queue,
            priority,
            concurrency_key,
            callback_url,
            prefix: None,
        })
    }

    /// The queue this job belongs to: its own, or `default`.
    pub fn queue_name(&self) -> &str {
        self.queue.as_deref().unwrap_or(job::DEFAULT_QUEUE)
    }
}

/// The `depends_on` of a raw message's body (already decoded as a job with id `id`): the jobs
/// it must wait for, empty when the field is absent or `null`. Read apart from
/// [`WireJob::decode`] because only a raw producer's first message can carry it (Apiary never
/// publishes a job before its parents allow), so a body without the field name costs one byte
/// scan. `Err` names what is wrong, for the dead letter.
pub fn depends_on(body: &[u8], id: JobId) -> Result<Vec<JobId>, String> {
    if !body.windows(12).any(|w| w == b"\"depends_on\"") {
        return Ok(Vec::new());
    }
    #[derive(Deserialize)]
    struct Only<'a> {
        #[serde(borrow, default)]
        depends_on: Option<&'a RawValue>,
    }
    let only: Only<'_> = serde_json::from_slice(body).map_err(|e| format!("depends_on: {e}"))?;
    let parents: Vec<JobId> = match only.depends_on {
        None => return Ok(Vec::new()),
        Some(raw) if raw.get() == "null" => return Ok(Vec::new()),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
            format!(
                "depends_on: expected an array of job ids (UUID strings), got {}",
                clip(raw.get())
            )
        })?,
    };
    job::validate_depends_on(Some(id), &parents).map_err(|e| e.to_string())?;
    Ok(parents)
}

/// A short rendering of a bad value for an error message.
fn clip(s: &str) -> String {
    const MAX: usize = 40;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn decode(body: &str) -> Result<WireJob, Poison> {
        WireJob::decode(body.as_bytes(), None, LIMIT)
    }

    #[test]
    fn full_message_round_trips() {
        let id = Uuid::now_v7();
        let at = (Utc::now() + chrono::Duration::days(30)).to_rfc3339();
        let body = format!(
            r#"{{"id":"{id}","kind":"echo","payload":{{"a":[1,2]}},"dedup_key":"k","max_attempts":3,"run_at":"{at}"}}"#
        );
        let job = decode(&body).expect("valid");
        assert_eq!(job.id, id);
        assert_eq!(job.kind, "echo");
        assert_eq!(job.payload.get(), r#"{"a":[1,2]}"#);
        assert_eq!(job.dedup_key.as_deref(), Some("k"));
        assert_eq!(job.max_attempts, Some(3));
        assert!(job.run_at.is_some());
        let again = WireJob::decode(&job.to_body(), None, LIMIT).expect("re-decodes");
        assert_eq!(again.id, id);
        assert_eq!(again.payload.get(), job.payload.get());
    }

    #[test]
    fn id_comes_from_body_then_message_id_then_new() {
        let prop = Uuid::now_v7();
        let job =
            WireJob::decode(br#"{"kind":"echo"}"#, Some(&prop.to_string()), LIMIT).expect("valid");
        assert_eq!(job.id, prop);
        assert_eq!(job.payload.get(), "null");
        // No UUID anywhere: derived, so every delivery of the same message is the same job.
        let fresh = decode(r#"{"kind":"echo"}"#).expect("valid");
        assert_eq!(fresh.id.get_version_num(), 5);
        assert_eq!(decode(r#"{"kind":"echo"}"#).expect("valid").id, fresh.id);
        assert_ne!(
            decode(r#"{"kind":"echo","payload":1}"#).expect("valid").id,
            fresh.id
        );
        let named = WireJob::decode(br#"{"kind":"echo"}"#, Some("order-17"), LIMIT).expect("valid");
        assert_eq!(named.id, derived_id(Some("order-17"), b"ignored"));
        assert_ne!(named.id, fresh.id);
    }

    #[test]
    fn poison_names_the_field() {
        let cases = [
            ("not json", "not a JSON object"),
            ("{\"kind\":", "not valid JSON"),
            ("[1,2]", "not a JSON object"),
            ("{}", "kind: missing"),
            (r#"{"kind":5}"#, "kind: expected a string"),
            (r#"{"kind":"Bad Kind"}"#, "kind: has"),
            (r#"{"kind":"echo","id":"nope"}"#, "id: expected a UUID"),
            (
                r#"{"kind":"echo","max_attempts":"3"}"#,
                "max_attempts: expected an integer",
            ),
            (r#"{"kind":"echo","max_attempts":0}"#, "max_attempts: is 0"),
            (
                r#"{"kind":"echo","dedup_key":7}"#,
                "dedup_key: expected a string",
            ),
            (
                r#"{"kind":"echo","run_at":"tomorrow"}"#,
                "run_at: expected an RFC 3339",
            ),
        ];
        for (body, want) in cases {
            let err = decode(body).expect_err(body);
            assert!(
                err.reason.contains(want),
                "{body}: {} should contain {want}",
                err.reason
            );
        }
        let err = WireJob::decode(&[0xff, 0xfe], None, LIMIT).expect_err("binary");
        assert!(err.reason.contains("UTF-8"));
        let err = WireJob::decode(br#"{"kind":"echo","payload":"xxxxxxxxxxxx"}"#, None, 10)
            .expect_err("big");
        assert!(
            err.reason.contains("payload is 14 bytes; the limit is 10"),
            "{}",
            err.reason
        );
        let huge = vec![b' '; 11 + job::ENVELOPE_BYTES];
        let err = WireJob::decode(&huge, None, 10).expect_err("huge");
        assert!(err.reason.starts_with("body is"), "{}", err.reason);
        let err = decode(r#"{"kind":"echo","dedup_key":"a\u0000b"}"#).expect_err("nul key");
        assert!(err.reason.contains("NUL"), "{}", err.reason);
        let err = decode(r#"{"kind":"echo","run_at":"2999-01-01T00:00:00Z"}"#).expect_err("far");
        assert!(err.reason.contains("one year"), "{}", err.reason);
    }

    #[test]
    fn the_payload_limit_is_exact_and_independent_of_the_envelope() {
        // A payload at exactly the limit passes with any envelope Apiary itself adds.
        let payload = format!("\"{}\"", "x".repeat(2046));
        assert_eq!(payload.len(), 2048);
        let id = Uuid::now_v7();
        let body = format!(
            r#"{{"id":"{id}","kind":"echo","payload":{payload},"dedup_key":"{}","max_attempts":1000,"run_at":"2026-12-01T00:00:00.123456789Z"}}"#,
            "k".repeat(256)
        );
        let job = WireJob::decode(body.as_bytes(), None, 2048).expect("at the limit");
        let mut again = job.clone();
        again.run_at = Some(Utc::now());
        WireJob::decode(&again.to_body(), None, 2048).expect("republished");
        let over = format!("\"{}\"", "x".repeat(2047));
        let body = format!(r#"{{"kind":"echo","payload":{over}}}"#);
        assert!(WireJob::decode(body.as_bytes(), None, 2048).is_err());
    }

    #[test]
    fn poison_keeps_what_it_could_read() {
        let id = Uuid::now_v7();
        let err = decode(&format!(
            r#"{{"id":"{id}","kind":"echo","max_attempts":-1}}"#
        ))
        .expect_err("bad");
        assert_eq!(err.id, id);
        assert_eq!(err.kind.as_deref(), Some("echo"));
    }

    #[test]
    fn depends_on_is_read_from_raw_bodies_and_checked() {
        let id = Uuid::now_v7();
        let p = Uuid::now_v7();
        assert_eq!(depends_on(br#"{"kind": "echo"}"#, id), Ok(vec![]));
        assert_eq!(
            depends_on(br#"{"kind": "echo", "depends_on": null}"#, id),
            Ok(vec![])
        );
        let body = format!(r#"{{"kind": "echo", "depends_on": ["{p}"]}}"#);
        assert_eq!(depends_on(body.as_bytes(), id), Ok(vec![p]));
        let bad = depends_on(br#"{"kind": "echo", "depends_on": "x"}"#, id).unwrap_err();
        assert!(bad.starts_with("depends_on: expected an array"), "{bad}");
        let body = format!(r#"{{"kind": "echo", "depends_on": ["{id}"]}}"#);
        assert!(
            depends_on(body.as_bytes(), id)
                .unwrap_err()
                .contains("itself")
        );
    }
}
