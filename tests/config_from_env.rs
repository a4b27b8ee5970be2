//! `Config::from_env`, the library's way to read the settings, refuses what cannot work with
//! the same messages as the binary. One test in a binary of its own: it changes this process's
//! environment, which no other test may see.

use apiary::config::Config;

/// Sets `vars` for the duration of `f`, then removes them.
fn with_env<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
    // SAFETY: this test binary holds this one test, so no other thread reads the environment
    // while it changes.
    unsafe {
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
    }
    let out = f();
    unsafe {
        for (k, _) in vars {
            std::env::remove_var(k);
        }
    }
    out
}

#[test]
fn from_env_refuses_what_cannot_work_and_masks_what_it_shows() {
    let e = with_env(&[("APIARY_PRUNE_INTERVAL", "0s")], Config::from_env)
        .expect_err("a zero prune interval")
        .to_string();
    assert_eq!(
        e,
        "invalid configuration: APIARY_PRUNE_INTERVAL is 0s; it must be between 100ms and 1d"
    );

    let e = with_env(&[("APIARY_CONCURRENCY", "0")], Config::from_env)
        .expect_err("no concurrency")
        .to_string();
    assert!(
        e.contains("APIARY_CONCURRENCY is 0; it must be between 1 and 10000"),
        "{e}"
    );

    let e = with_env(
        &[("APIARY_RETRY_BASE", "5s"), ("APIARY_RETRY_CAP", "1s")],
        Config::from_env,
    )
    .expect_err("a cap below the base")
    .to_string();
    assert!(
        e.contains("APIARY_RETRY_CAP is 1s; it must be at least"),
        "{e}"
    );

    let e = with_env(
        &[("DATABASE_URL", "mysql://u:sekret-pw@127.0.0.1/x")],
        Config::from_env,
    )
    .expect_err("not postgres")
    .to_string();
    assert!(
        e.contains("DATABASE_URL is mysql://u:***@127.0.0.1/x"),
        "{e}"
    );
    assert!(!e.contains("sekret-pw"), "{e}");

    let e = with_env(&[("APIARY_API_TOKENS", "sekret-pw:read")], Config::from_env)
        .expect_err("too short a token")
        .to_string();
    assert!(e.contains("APIARY_API_TOKENS"), "{e}");
    assert!(!e.contains("sekret-pw"), "{e}");

    let cfg = with_env(
        &[
            ("DATABASE_URL", "postgres://u:sekret-pw@127.0.0.1:1/x"),
            ("AMQP_URL", "amqp://u:sekret-pw@127.0.0.1:1/%2f"),
            ("APIARY_PRUNE_INTERVAL", "100ms"),
        ],
        Config::from_env,
    )
    .expect("valid settings");
    assert_eq!(cfg.prune_interval.as_millis(), 100);
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("sekret-pw"), "{debug}");
    assert!(debug.contains("postgres://u:***@127.0.0.1:1/x"), "{debug}");
}
