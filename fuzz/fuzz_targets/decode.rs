//! Fuzzes `WireJob::decode`, the worker's reading of a message body (step ④), for properties,
//! not just for panics: whatever a worker accepts is a valid job that survives any number of
//! republishes unchanged, and every message, valid or poison, has one stable id.
//!
//! Input layout: byte 0 picks the payload limit (bits 0-1) and the `message_id` property
//! (bits 2-3: none, empty, text taken from the input, or a UUID in the format of bits 4-5);
//! the rest of the input is the body.
#![no_main]

use apiary::job;
use apiary::wire::{Poison, WireJob};
use chrono::Utc;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

/// Payload limits to decode under: the smallest that holds `null`, a small one, the
/// README's example limit, and the default.
const LIMITS: [usize; 4] = [4, 64, 2048, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(mode & 3)];
    let (message_id, body) = split_message_id(mode, rest);
    let message_id = message_id.as_deref();

    match WireJob::decode(body, message_id, limit) {
        Ok(job) => check_accepted(&job, body, message_id, limit),
        Err(poison) => check_poison(&poison, body, message_id, limit),
    }
});

/// Takes the `message_id` property the mode byte asks for off the front of the input.
fn split_message_id(mode: u8, rest: &[u8]) -> (Option<String>, &[u8]) {
    match (mode >> 2) & 3 {
        0 => (None, rest),
        1 => (Some(String::new()), rest),
        2 => {
            let Some((&len, rest)) = rest.split_first() else {
                return (None, rest);
            };
            let len = usize::from(len).min(rest.len());
            let (text, body) = rest.split_at(len);
            (Some(String::from_utf8_lossy(text).into_owned()), body)
        }
        _ => {
            let mut bytes = [0u8; 16];
            let len = rest.len().min(16);
            bytes[..len].copy_from_slice(&rest[..len]);
            let id = Uuid::from_bytes(bytes);
            let text = match (mode >> 4) & 3 {
                0 => id.hyphenated().to_string(),
                1 => id.simple().to_string(),
                2 => id.urn().to_string(),
                _ => id.braced().to_string(),
            };
            (Some(text), &rest[len..])
        }
    }
}

/// What a worker accepts is a job an enqueue could have made, and it stays acceptable, and the
/// same, however often it is republished.
fn check_accepted(job: &WireJob, body: &[u8], message_id: Option<&str>, limit: usize) {
    let payload = job.payload.get();
    assert!(
        payload.len() <= limit,
        "accepted a payload of {} bytes under a limit of {limit}",
        payload.len()
    );
    if let Err(e) = job::validate_kind(&job.kind) {
        panic!("accepted kind {:?}: {e}", job.kind);
    }
    if let Some(key) = &job.dedup_key
        && let Err(e) = job::validate_dedup_key(key)
    {
        panic!("accepted dedup_key {key:?}: {e}");
    }
    if let Some(n) = job.max_attempts
        && let Err(e) = job::validate_max_attempts(n)
    {
        panic!("accepted max_attempts {n}: {e}");
    }
    if let Some(at) = job.run_at
        && let Err(e) = job::validate_run_at(at, Utc::now())
    {
        panic!("accepted run_at {at:?}: {e}");
    }

    // Derived, never random: the same delivery is the same job.
    let again = WireJob::decode(body, message_id, limit)
        .unwrap_or_else(|p| panic!("accepted once, poison the second time: {}", p.reason));
    assert_eq!(again.id, job.id, "the same message decoded to two ids");

    // A republish carries `to_body()`, with or without the original `message_id`.
    let republished = job.to_body();
    for mid in [message_id, None] {
        let back = WireJob::decode(&republished, mid, limit).unwrap_or_else(|p| {
            panic!(
                "accepted, but its republished body is poison: {}\nbody: {}",
                p.reason,
                String::from_utf8_lossy(&republished)
            )
        });
        assert_same(job, &back);
        assert_eq!(
            back.to_body(),
            republished,
            "a second republish differs from the first"
        );
    }
}

/// Every field a job carries survives a republish.
fn assert_same(a: &WireJob, b: &WireJob) {
    assert_eq!(a.id, b.id, "id changed on republish");
    assert_eq!(a.kind, b.kind, "kind changed on republish");
    assert_eq!(
        a.payload.get(),
        b.payload.get(),
        "payload changed on republish"
    );
    assert_eq!(a.dedup_key, b.dedup_key, "dedup_key changed on republish");
    assert_eq!(
        a.max_attempts, b.max_attempts,
        "max_attempts changed on republish"
    );
    assert_eq!(a.run_at, b.run_at, "run_at changed on republish");
}

/// A poison message says why, and is recorded under one id however often it is delivered.
fn check_poison(poison: &Poison, body: &[u8], message_id: Option<&str>, limit: usize) {
    assert!(!poison.reason.is_empty(), "poison without a reason");
    if let Some(kind) = &poison.kind
        && let Err(e) = job::validate_kind(kind)
    {
        panic!("poison recorded under an invalid kind {kind:?}: {e}");
    }
    match WireJob::decode(body, message_id, limit) {
        Ok(_) => panic!("poison once ({}), accepted the second time", poison.reason),
        Err(again) => assert_eq!(&again, poison, "the same poison decoded differently"),
    }
}
