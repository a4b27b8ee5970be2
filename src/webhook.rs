//! Completion webhooks: which URLs a job may name as its `callback_url`, and how a delivery
//! is signed. The policy is applied at enqueue (API, CLI, library), when a raw message is
//! first recorded (a bad URL dead-letters the message), and again at delivery, since the
//! configuration may have changed in between.
//!
//! The rest of the path: a trigger records a delivery job of kind [`KIND`] in the same
//! transaction as the job's final status (migration 0015), the committer publishes it with
//! the job's other messages, and `handler/webhook.rs` POSTs the record.
//!
//! The allow-list is by host name, as the URL spells it: Apiary does not resolve names before
//! matching, so an allowed name whose DNS points at an internal address is called all the
//! same. List only hosts whose DNS you trust.

use std::fmt;

use hmac::{KeyInit, Mac};
use reqwest::Url;

use crate::job::InvalidJob;

/// The kind of the built-in job that delivers a webhook.
pub const KIND: &str = "apiary.webhook";

/// The longest `callback_url`, in bytes (also a CHECK in the schema).
pub const MAX_CALLBACK_URL_BYTES: usize = 2048;

/// The attempts a delivery gets (set by the trigger that records it): with the kind's default
/// backoff (2 s doubling, capped at 1 h) they span about an hour and a half.
pub const DELIVERY_ATTEMPTS: i32 = 12;

/// Checks a `callback_url`'s form: at most [`MAX_CALLBACK_URL_BYTES`], an absolute `http` or
/// `https` URL with a host and no user name or password. Returns it parsed.
pub fn validate_form(url: &str) -> Result<Url, InvalidJob> {
    let bad = |reason: String| InvalidJob::new("callback_url", reason);
    if url.len() > MAX_CALLBACK_URL_BYTES {
        return Err(bad(format!(
            "is {} bytes; the limit is {MAX_CALLBACK_URL_BYTES}",
            url.len()
        )));
    }
    let parsed = Url::parse(url).map_err(|e| bad(format!("is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not allowed; use http or https",
            parsed.scheme()
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(
            "must not hold a user name or password; authenticate receivers by the signature".into(),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host".into()));
    }
    Ok(parsed)
}

/// One entry of `APIARY_WEBHOOK_HOSTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    /// Lowercase; for `*.example.com`, `.example.com`.
    host: String,
    /// `*.example.com`: any name ending in `.example.com` (not `example.com` itself).
    wildcard: bool,
    /// `host:port`: only that port; else any.
    port: Option<u16>,
}

impl HostRule {
    fn allows(&self, host: &str, port: Option<u16>) -> bool {
        let host_ok = if self.wildcard {
            host.len() > self.host.len() && host.ends_with(&self.host)
        } else {
            host == self.host
        };
        host_ok && self.port.is_none_or(|p| Some(p) == port)
    }
}

/// `APIARY_WEBHOOK_HOSTS`, parsed: the hosts a `callback_url` may name. Empty: webhooks
/// are off, and every `callback_url` is refused.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookHosts(Vec<HostRule>);

/// Parses `APIARY_WEBHOOK_HOSTS`: comma-separated `host`, `host:port`, `*.domain` or
/// `*.domain:port` entries (IPv6 literals in brackets: `[::1]:8080`). Errors name the entry.
pub fn parse_hosts(s: &str) -> Result<WebhookHosts, String> {
    let mut out = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: &str| format!("APIARY_WEBHOOK_HOSTS: {entry:?}: {why}");
        let lower = entry.to_ascii_lowercase();
        let (host, port) = if let Some(rest) = lower.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing ]"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("expected host or host:port")),
            };
            (format!("[{inside}]"), port)
        } else {
            match lower.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (lower.clone(), None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad("the port must be 1 to 65535"))?,
            ),
        };
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (format!(".{rest}"), true),
            None => (host, false),
        };
        let name = host.trim_start_matches('.');
        if name.is_empty()
            || name.contains('*')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
        {
            return Err(bad(
                "expected a host name, an IP address or *.domain, with an optional :port",
            ));
        }
        out.push(HostRule {
            host,
            wildcard,
            port,
        });
    }
    Ok(WebhookHosts(out))
}

impl WebhookHosts {
    /// Whether no host is allowed (webhooks are off).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `url`'s host (and port) is on the list.
    pub fn allows(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let port = url.port_or_known_default();
        self.0.iter().any(|r| r.allows(&host, port))
    }
}

/// `APIARY_WEBHOOK_SECRET`: the key deliveries are signed with. Never printed.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

/// The shortest secret accepted: shorter keys are guessable from signed bodies.
pub const MIN_SECRET_BYTES: usize = 16;

/// Parses `APIARY_WEBHOOK_SECRET`: at least [`MIN_SECRET_BYTES`].
pub fn parse_secret(s: &str) -> Result<WebhookSecret, String> {
    if s.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "APIARY_WEBHOOK_SECRET is {} bytes; it must be at least {MIN_SECRET_BYTES}",
            s.len()
        ));
    }
    Ok(WebhookSecret(s.to_string()))
}

impl WebhookSecret {
    /// The secret from its text (checked as [`parse_secret`] does).
    pub fn new(s: &str) -> Result<WebhookSecret, String> {
        parse_secret(s)
    }

    /// The `X-Apiary-Signature` value for `body` sent at `timestamp` (Unix seconds):
    /// `sha256=` and the hex HMAC-SHA256 of `"<timestamp>.<body>"` under this secret.
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        let bytes = mac(&self.0, timestamp, body).finalize().into_bytes();
        format!("sha256={}", hex::encode(bytes))
    }

    /// Whether `signature` is this secret's for `body` at `timestamp`, compared in constant
    /// time: what a receiver does (for tests and Rust receivers).
    pub fn verify(&self, timestamp: i64, body: &[u8], signature: &str) -> bool {
        let Some(hexed) = signature.strip_prefix("sha256=") else {
            return false;
        };
        let Ok(given) = hex::decode(hexed) else {
            return false;
        };
        mac(&self.0, timestamp, body).verify_slice(&given).is_ok()
    }
}

/// The HMAC-SHA256 state over `"<timestamp>.<body>"`, before finalising.
fn mac(secret: &str, timestamp: i64, body: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail here.
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// Checks `url` as a job's `callback_url` against the policy: its form, the allow-list, and
/// that deliveries can be signed. The error names `callback_url` and says what to change.
pub fn check(
    url: &str,
    hosts: &WebhookHosts,
    secret: Option<&WebhookSecret>,
) -> Result<(), InvalidJob> {
    let parsed = validate_form(url)?;
    let bad = |reason: String| InvalidJob::new("callback_url", reason);
    if hosts.is_empty() {
        return Err(bad(
            "webhooks are off: set APIARY_WEBHOOK_HOSTS to the hosts jobs may call back".into(),
        ));
    }
    if !hosts.allows(&parsed) {
        return Err(bad(format!(
            "host {} is not in APIARY_WEBHOOK_HOSTS",
            match parsed.port() {
                Some(p) => format!("{}:{p}", parsed.host_str().unwrap_or_default()),
                None => parsed.host_str().unwrap_or_default().to_string(),
            }
        )));
    }
    if secret.is_none() {
        return Err(bad(
            "APIARY_WEBHOOK_SECRET is not set, so the delivery could not be signed".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("url")
    }

    #[test]
    fn the_allow_list_matches_hosts_ports_and_subdomains() {
        let h = parse_hosts("hooks.example.com, *.corp.test, 127.0.0.1:8080, [::1]").expect("ok");
        assert!(h.allows(&url("https://hooks.example.com/x")));
        assert!(h.allows(&url("https://HOOKS.example.com:8443/x")));
        assert!(!h.allows(&url("https://evil.hooks.example.com/x")));
        assert!(h.allows(&url("http://a.corp.test/")));
        assert!(h.allows(&url("http://a.b.corp.test/")));
        assert!(!h.allows(&url("http://corp.test/")));
        assert!(!h.allows(&url("http://xcorp.test/")));
        assert!(h.allows(&url("http://127.0.0.1:8080/")));
        assert!(!h.allows(&url("http://127.0.0.1:8081/")));
        assert!(!h.allows(&url("http://127.0.0.1/")));
        assert!(h.allows(&url("http://[::1]:9/")));
        assert!(parse_hosts("").expect("ok").is_empty());
        for bad in ["a:0", "a:x", "*.", "a*b.com", "[::1", "exa mple.com"] {
            assert!(parse_hosts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_policy_refuses_naming_callback_url() {
        let hosts = parse_hosts("ok.test").expect("ok");
        let secret = parse_secret("0123456789abcdef").expect("ok");
        let s = Some(&secret);
        assert!(check("https://ok.test/hook?x=1", &hosts, s).is_ok());
        let reason = |u: &str, h: &WebhookHosts, s: Option<&WebhookSecret>| {
            let e = check(u, h, s).expect_err(u);
            assert_eq!(e.field, "callback_url");
            e.reason
        };
        assert!(reason("ftp://ok.test/", &hosts, s).contains("scheme"));
        assert!(reason("https://u:p@ok.test/", &hosts, s).contains("password"));
        assert!(reason("https://other.test/", &hosts, s).contains("APIARY_WEBHOOK_HOSTS"));
        assert!(reason("not a url", &hosts, s).contains("not a URL"));
        let long = format!("https://ok.test/{}", "a".repeat(MAX_CALLBACK_URL_BYTES));
        assert!(reason(&long, &hosts, s).contains("limit"));
        let at_limit = format!(
            "https://ok.test/{}",
            "a".repeat(MAX_CALLBACK_URL_BYTES - "https://ok.test/".len())
        );
        assert!(check(&at_limit, &hosts, s).is_ok());
        assert!(reason("https://ok.test/", &WebhookHosts::default(), s).contains("off"));
        assert!(reason("https://ok.test/", &hosts, None).contains("APIARY_WEBHOOK_SECRET"));
    }

    #[test]
    fn signatures_verify_and_bind_the_timestamp() {
        let secret = parse_secret("0123456789abcdef").expect("ok");
        let sig = secret.sign(1_700_000_000, b"{\"id\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(secret.verify(1_700_000_000, b"{\"id\":1}", &sig));
        assert!(!secret.verify(1_700_000_001, b"{\"id\":1}", &sig));
        assert!(!secret.verify(1_700_000_000, b"{\"id\":2}", &sig));
        assert!(parse_secret("short").is_err());
        assert_eq!(format!("{secret:?}"), "WebhookSecret(***)");
    }
}
