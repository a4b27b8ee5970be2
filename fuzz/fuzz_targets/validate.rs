//! Fuzzes `NewJob::validate`, the enqueue's check (step ①), against `WireJob::decode`, the
//! worker's (step ④): an enqueue that is accepted must never be poison to a worker.
//!
//! Input layout: byte 0 picks the payload limit (bits 0-1); the rest is the JSON a producer
//! posts to `POST /v1/jobs`, read as a `NewJob`.
#![no_main]

use apiary::NewJob;
use apiary::wire::WireJob;
use chrono::Utc;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

/// Payload limits to validate under, as in the `decode` target.
const LIMITS: [usize; 4] = [4, 64, 2048, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, json)) = data.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(mode & 3)];
    let Ok(new) = serde_json::from_slice::<NewJob>(json) else {
        return;
    };
    if new.validate(limit).is_err() {
        return;
    }

    let size = serde_json::to_vec(&new.payload).map(|v| v.len());
    assert!(
        matches!(size, Ok(n) if n <= limit),
        "validated a payload of {size:?} bytes under a limit of {limit}"
    );

    // Shaped as the client shapes it (`Inner::rows` and `wire_of`): a fresh id when none is
    // given, the due time from `run_at` or `delay_ms`.
    let payload = serde_json::value::to_raw_value(&new.payload)
        .unwrap_or_else(|e| panic!("validated a payload that cannot be raw JSON: {e}"));
    let wire = WireJob {
        id: new.id.unwrap_or_else(Uuid::now_v7),
        kind: new.kind.clone(),
        payload,
        dedup_key: new.dedup_key.clone(),
        max_attempts: new.max_attempts,
        run_at: new.due_at(Utc::now()),
    };
    let body = wire.to_body();
    for message_id in [None, Some(wire.id.to_string())] {
        let back = WireJob::decode(&body, message_id.as_deref(), limit).unwrap_or_else(|p| {
            panic!(
                "enqueue accepted it, the worker calls it poison: {}\nbody: {}",
                p.reason,
                String::from_utf8_lossy(&body)
            )
        });
        assert_eq!(back.id, wire.id, "id changed on the way to the worker");
        assert_eq!(
            back.kind, wire.kind,
            "kind changed on the way to the worker"
        );
        assert_eq!(
            back.payload.get(),
            wire.payload.get(),
            "payload changed on the way to the worker"
        );
        assert_eq!(back.dedup_key, wire.dedup_key, "dedup_key changed");
        assert_eq!(back.max_attempts, wire.max_attempts, "max_attempts changed");
        assert_eq!(back.run_at, wire.run_at, "run_at changed");
    }
});
