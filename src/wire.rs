//! The message format on the queue: what a producer in any language publishes, and how a
//! worker reads it back. The README documents the same format for people without our code.
//!
//! A job message is a persistent AMQP message with `content_type: application/json` whose body
//! is `{"id", "kind", "payload", "dedup_key", "max_attempts", "run_at"}`; only `kind` is
//! required. Decoding never panics and never guesses: a body that is not a job comes back as a
//! [`Poison`] naming what is wrong, and the worker dead-letters it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::job::{self, JobId};

/// A job as carried by a message. The payload stays raw JSON: the worker passes it to Postgres
/// and to the handler without re-encoding it.
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
}

/// Why a message is not a job. The worker records it, with the raw body, as a dead job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Poison {
    /// The id to record the message under: the body's or the `message_id`'s if either is a
    /// UUID, else a new one.
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
}

impl WireJob {
    /// The JSON body to publish.
    pub fn to_body(&self) -> Vec<u8> {
        // Serialising a struct of strings, numbers and already-valid raw JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a message body. `message_id` is the AMQP property, used as the id when the body
    /// has none. `max_bytes` bounds the body.
    pub fn decode(
        body: &[u8],
        message_id: Option<&str>,
        max_bytes: usize,
    ) -> Result<WireJob, Poison> {
        let prop_id = message_id.and_then(|m| Uuid::parse_str(m).ok());
        let poison = |id: Option<JobId>, kind: Option<String>, reason: String| Poison {
            id: id.or(prop_id).unwrap_or_else(Uuid::now_v7),
            kind,
            reason,
        };
        if body.len() > max_bytes {
            return Err(poison(
                None,
                None,
                format!("body is {} bytes; the limit is {max_bytes}", body.len()),
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
        let payload = match fields.payload {
            Some(raw) => raw.to_owned(),
            None => RawValue::from_string("null".into()).map_err(|e| with_kind(e.to_string()))?,
        };
        Ok(WireJob {
            id: id.or(prop_id).unwrap_or_else(Uuid::now_v7),
            kind,
            payload,
            dedup_key,
            max_attempts,
            run_at,
        })
    }
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
        let body = format!(
            r#"{{"id":"{id}","kind":"echo","payload":{{"a":[1,2]}},"dedup_key":"k","max_attempts":3,"run_at":"2030-01-01T00:00:00Z"}}"#
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
        let fresh = decode(r#"{"kind":"echo"}"#).expect("valid");
        assert_eq!(fresh.id.get_version_num(), 7);
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
        assert!(err.reason.contains("limit is 10"));
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
}
