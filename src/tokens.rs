//! API tokens: the bearer tokens from `APIARY_API_TOKENS`, the scopes they grant, and the
//! constant-time check of a presented `Authorization` header against them.
//!
//! This module has no HTTP server in it, so configuration parses tokens even in a build
//! without the `api` feature; the middleware that applies them to routes is
//! `api::auth`.

use std::fmt;
use std::str::FromStr;

use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The shortest token accepted: long enough that guessing is hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token allows.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `POST /v1/jobs`.
    Enqueue,
    /// `GET /v1/jobs` and `GET /v1/jobs/{id}`.
    Read,
    /// Changing jobs already enqueued: cancel, replay.
    Admin,
}

impl Scope {
    /// The name used in `APIARY_API_TOKENS` and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Enqueue => "enqueue",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    /// This scope's bit in a token's scope set.
    fn bit(self) -> u8 {
        match self {
            Scope::Enqueue => 1,
            Scope::Read => 2,
            Scope::Admin => 4,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "enqueue" => Ok(Scope::Enqueue),
            "read" => Ok(Scope::Read),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope {other:?} (expected enqueue, read or admin)"
            )),
        }
    }
}

/// The scopes a request was let through with: attached to it by the API's `require_scope` middleware, read by
/// handlers as an extractor. A request that never passed a guard is granted nothing, so a
/// route wired without one answers as little as it can rather than everything.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted(u8);

impl Granted {
    /// Everything: authentication is off (no tokens configured).
    pub const ALL: Granted = Granted(1 | 2 | 4);
    /// Nothing.
    pub const NONE: Granted = Granted(0);

    /// Whether `scope` was granted.
    pub fn allows(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

/// One configured token and the scopes it grants, as a bit set of [`Scope::bit`].
#[derive(Clone)]
struct Token {
    secret: Box<[u8]>,
    scopes: u8,
}

/// The configured bearer tokens (`APIARY_API_TOKENS`). Empty means no authentication.
///
/// `Debug` prints how many tokens there are and their scopes, never the tokens themselves.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Clone, Default)]
pub struct Tokens(Vec<Token>);

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scopes: Vec<Vec<&str>> = self
            .0
            .iter()
            .map(|t| {
                [Scope::Enqueue, Scope::Read, Scope::Admin]
                    .into_iter()
                    .filter(|s| t.scopes & s.bit() != 0)
                    .map(Scope::as_str)
                    .collect()
            })
            .collect();
        f.debug_struct("Tokens")
            .field("count", &self.0.len())
            .field("scopes", &scopes)
            .finish()
    }
}

/// Why a request was not let through.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
    /// A token that is not configured.
    Unknown,
    /// A known token without the scope this route needs.
    MissingScope(Scope),
}

impl Tokens {
    /// Whether no tokens are configured, so the API is open.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The scope bits granted to `presented`, 0 if it is not a configured token.
    ///
    /// Constant time: `presented` is compared with every configured token, each over the
    /// configured token's full length, and the results are combined without branching, so
    /// how long this takes says nothing about which token, or which prefix of one, matched.
    fn scopes_of(&self, presented: &[u8]) -> u8 {
        let mut granted = 0u8;
        for token in &self.0 {
            let mut same = (presented.len() as u64).ct_eq(&(token.secret.len() as u64));
            for (i, expected) in token.secret.iter().enumerate() {
                // Past the end of a shorter presented token, compare against 0: the lengths
                // already differ, and the loop still runs over the whole configured token.
                let got = presented.get(i).copied().unwrap_or(0);
                same &= got.ct_eq(expected);
            }
            granted |= u8::conditional_select(&0, &token.scopes, same);
        }
        granted
    }

    /// Checks an `Authorization` header value against these tokens for `scope`.
    pub fn check(&self, authorization: Option<&[u8]>, scope: Scope) -> Result<(), Denied> {
        self.grant(authorization, scope).map(|_| ())
    }

    /// Checks an `Authorization` header value against these tokens for `scope`, and returns
    /// every scope its token holds ([`Granted::ALL`] when authentication is off).
    pub fn grant(&self, authorization: Option<&[u8]>, scope: Scope) -> Result<Granted, Denied> {
        if self.is_empty() {
            return Ok(Granted::ALL);
        }
        let header = authorization.ok_or(Denied::Missing)?;
        let presented = bearer_token(header).ok_or(Denied::Malformed)?;
        let granted = self.scopes_of(presented);
        if granted == 0 {
            return Err(Denied::Unknown);
        }
        if granted & scope.bit() == 0 {
            return Err(Denied::MissingScope(scope));
        }
        Ok(Granted(granted))
    }
}

/// The token in `Bearer <token>` (the scheme is case-insensitive, RFC 7235).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.strip_prefix(b" ")?.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Words that mark a token copied from an example rather than generated (compared
/// case-insensitively): such a token is public, so it is refused like a short one.
const PLACEHOLDER_WORDS: [&str; 5] = [
    "REPLACE_ME",
    "CHANGE_ME",
    "CHANGEME",
    "EXAMPLE",
    "PLACEHOLDER",
];

/// Whether `secret` contains one of [`PLACEHOLDER_WORDS`].
fn is_placeholder(secret: &str) -> bool {
    let upper = secret.to_ascii_uppercase();
    PLACEHOLDER_WORDS.iter().any(|w| upper.contains(w))
}

/// Parses `APIARY_API_TOKENS`: `TOKEN:scope+scope,TOKEN2:scope`. Empty means no tokens.
///
/// Errors name the entry by position, never by its token, so a bad setting does not print
/// a secret into a log. Placeholders left from an example (`REPLACE_ME...`) are refused.
pub fn parse_tokens(s: &str) -> Result<Tokens, String> {
    let mut tokens: Vec<Token> = Vec::new();
    for (i, entry) in s.split(',').map(str::trim).enumerate() {
        let n = i + 1;
        if entry.is_empty() {
            if s.trim().is_empty() {
                break;
            }
            return Err(format!("token entry {n} is empty"));
        }
        let (secret, scopes) = entry
            .split_once(':')
            .ok_or_else(|| format!("token entry {n}: expected TOKEN:scope+scope"))?;
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(format!("token entry {n}: empty token"));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "token entry {n}: tokens may hold only printable ASCII without spaces"
            ));
        }
        if secret.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "token entry {n}: tokens must be at least {MIN_TOKEN_LEN} characters"
            ));
        }
        if is_placeholder(secret) {
            // Naming the words, not the one found: the error must say nothing of the token.
            return Err(format!(
                "token entry {n} is a placeholder (it contains one of {}): set a long random \
                 token, for example from `openssl rand -hex 32`",
                PLACEHOLDER_WORDS.join(", ")
            ));
        }
        let mut bits = 0u8;
        for scope in scopes.split('+').map(str::trim) {
            if scope.is_empty() {
                return Err(format!(
                    "token entry {n}: empty scope (expected enqueue, read or admin)"
                ));
            }
            bits |= scope
                .parse::<Scope>()
                .map_err(|e| format!("token entry {n}: {e}"))?
                .bit();
        }
        if tokens.iter().any(|t| *t.secret == *secret.as_bytes()) {
            return Err(format!("token entry {n}: the same token is listed twice"));
        }
        tokens.push(Token {
            secret: secret.as_bytes().into(),
            scopes: bits,
        });
    }
    Ok(Tokens(tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: &str = "0pstoken-0pstoken";
    const RO: &str = "readonly-readonly";

    fn tokens() -> Tokens {
        parse_tokens(&format!("{OPS}:admin+read+enqueue, {RO}:read")).expect("parses")
    }

    fn bearer(t: &str) -> Vec<u8> {
        format!("Bearer {t}").into_bytes()
    }

    #[test]
    fn valid_tokens_parse_with_their_scopes() {
        let t = tokens();
        assert_eq!(t.len(), 2);
        assert_eq!(t.scopes_of(OPS.as_bytes()), 7);
        assert_eq!(t.scopes_of(RO.as_bytes()), Scope::Read.bit());
        assert_eq!(t.check(Some(&bearer(RO)), Scope::Read), Ok(()));
        assert_eq!(t.check(Some(&bearer(OPS)), Scope::Admin), Ok(()));
    }

    #[test]
    fn empty_means_no_tokens_and_everything_open() {
        for s in ["", "  "] {
            let t = parse_tokens(s).expect("empty parses");
            assert!(t.is_empty());
            assert_eq!(t.check(None, Scope::Admin), Ok(()));
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let long = "x".repeat(MIN_TOKEN_LEN);
        let cases = [
            (format!("{long}:read+delete"), "unknown scope \"delete\""),
            ("short:read".to_string(), "at least 16 characters"),
            (":read".to_string(), "empty token"),
            (long.clone(), "expected TOKEN:scope"),
            (format!("{long}:"), "empty scope"),
            (format!("{long}:read,,"), "entry 2 is empty"),
            (format!("{long}:read,{long}:admin"), "listed twice"),
            (format!("{long} x:read"), "printable ASCII"),
        ];
        for (input, want) in cases {
            let err = parse_tokens(&input).expect_err(&input);
            assert!(err.contains(want), "{input:?}: {err:?} should say {want:?}");
            assert!(
                !err.contains(&long),
                "{input:?}: the error leaks the token: {err}"
            );
        }
    }

    #[test]
    fn requests_are_denied_for_the_right_reason() {
        let t = tokens();
        assert_eq!(t.check(None, Scope::Read), Err(Denied::Missing));
        for bad in [&b"Basic x"[..], b"Bearer", b"Bearer ", b"Bearerx", b""] {
            assert_eq!(t.check(Some(bad), Scope::Read), Err(Denied::Malformed));
        }
        assert_eq!(
            t.check(Some(&bearer("nope-nope-nope-nope")), Scope::Read),
            Err(Denied::Unknown)
        );
        // A prefix or an extension of a real token is not that token.
        assert_eq!(
            t.check(Some(&bearer(&RO[..RO.len() - 1])), Scope::Read),
            Err(Denied::Unknown)
        );
        assert_eq!(
            t.check(Some(&bearer(&format!("{RO}x"))), Scope::Read),
            Err(Denied::Unknown)
        );
        assert_eq!(
            t.check(Some(&bearer(RO)), Scope::Enqueue),
            Err(Denied::MissingScope(Scope::Enqueue))
        );
        assert_eq!(
            t.check(Some(format!("bearer {RO}").as_bytes()), Scope::Read),
            Ok(())
        );
    }

    #[test]
    fn placeholders_are_refused_without_printing_them() {
        for token in [
            "REPLACE_ME_WITH_A_LONG_RANDOM_TOKEN",
            "please-change_me-0123456789",
            "xxxxCHANGEMExxxxxxxx",
            "an-example-token-0123",
            "placeholder-0123456789",
        ] {
            let err = parse_tokens(&format!("{RO}:read,{token}:admin")).expect_err(token);
            assert!(err.contains("entry 2 is a placeholder"), "{token}: {err}");
            assert!(
                !err.contains(token),
                "{token}: the error leaks the token: {err}"
            );
        }
    }

    /// The example Secret's token must not run if copied as it is.
    #[test]
    fn the_example_secrets_token_is_refused() {
        let example = include_str!("../deploy/kubernetes/secret.example.yaml");
        let value = example
            .lines()
            .filter_map(|l| l.trim().strip_prefix("APIARY_API_TOKENS:"))
            .next()
            .expect("the example sets APIARY_API_TOKENS")
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        assert!(!value.is_empty());
        let err = parse_tokens(value).expect_err("the example's token must be refused");
        assert!(err.contains("entry 1 is a placeholder"), "{err}");
    }

    #[test]
    fn debug_never_prints_a_token() {
        let shown = format!("{:?}", tokens());
        assert!(!shown.contains(OPS) && !shown.contains(RO), "{shown}");
        assert!(shown.contains("count: 2"), "{shown}");
    }
}
