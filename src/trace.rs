//! W3C trace context (`traceparent`, `tracestate`) on job messages: read from a delivery's
//! AMQP headers, written onto a published job's. A producer's trace continues in the span
//! around the handler, whoever published the message: Apiary's `Client` and HTTP API, or any
//! AMQP client that sets the header.
//!
//! This module only checks and carries the header values; the spans themselves, and their
//! export, are the `otel` feature's ([`crate::telemetry`]). A malformed value is dropped, never
//! a reason to refuse the job: tracing is an observer.

use lapin::types::{AMQPValue, FieldTable};

/// The `traceparent` header's name, on HTTP requests and AMQP messages alike.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header's name.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` carried (the W3C limit is 32 members of at most 256 bytes each;
/// 512 bytes is the size propagators must accept).
pub const MAX_TRACESTATE: usize = 512;

/// A job's trace context: a checked `traceparent` and, optionally, its `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lower case.
    pub traceparent: String,
    /// Vendor-specific data, passed along untouched.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// A context from header values; `None` when `traceparent` is not a valid version-00
    /// value. A `tracestate` that is too long or not visible ASCII is dropped, the
    /// `traceparent` kept.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let traceparent = traceparent.trim();
        if !valid_traceparent(traceparent) {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(str::to_string);
        Some(TraceContext {
            traceparent: traceparent.to_string(),
            tracestate,
        })
    }

    /// The trace id, 32 lower-case hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The context an AMQP message's headers carry, if any.
    pub fn from_headers(headers: Option<&FieldTable>) -> Option<TraceContext> {
        let headers = headers?;
        let text = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
            Some(AMQPValue::ShortString(s)) => Some(s.as_str()),
            _ => None,
        };
        TraceContext::parse(text(TRACEPARENT)?, text(TRACESTATE))
    }

    /// Writes this context into an AMQP message's headers.
    pub fn write_headers(&self, headers: &mut FieldTable) {
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(self.traceparent.as_str().into()),
        );
        if let Some(state) = &self.tracestate {
            headers.insert(
                TRACESTATE.into(),
                AMQPValue::LongString(state.as_str().into()),
            );
        }
    }
}

/// Whether `s` is a version-00 `traceparent`: four dash-separated lower-case hex fields of 2,
/// 32, 16 and 2 digits, with neither id all zeros.
fn valid_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zeros = |r: std::ops::Range<usize>| b[r].iter().all(|&c| c == b'0');
    &s[0..2] == "00" && hex(3..35) && hex(36..52) && hex(53..55) && !zeros(3..35) && !zeros(36..52)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_with_its_state() {
        let c = TraceContext::parse(GOOD, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_values_are_dropped() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
        let long = "a=".to_string() + &"b".repeat(MAX_TRACESTATE);
        let c = TraceContext::parse(GOOD, Some(&long)).expect("traceparent kept");
        assert_eq!(c.tracestate, None);
        let c = TraceContext::parse(GOOD, Some("a=\u{0}")).expect("traceparent kept");
        assert_eq!(c.tracestate, None);
    }

    #[test]
    fn headers_round_trip() {
        let c = TraceContext::parse(GOOD, Some("x=1")).expect("valid");
        let mut h = FieldTable::default();
        c.write_headers(&mut h);
        assert_eq!(TraceContext::from_headers(Some(&h)), Some(c));
        assert_eq!(TraceContext::from_headers(None), None);
        let mut wrong = FieldTable::default();
        wrong.insert(TRACEPARENT.into(), AMQPValue::LongLongInt(5));
        assert_eq!(TraceContext::from_headers(Some(&wrong)), None);
    }
}
