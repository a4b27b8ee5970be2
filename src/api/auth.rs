//! Who may call the API: the middleware that checks the bearer tokens of [`crate::tokens`]
//! in front of every ① enqueue and ⑦ poll route.
//!
//! Each route carries its scope in its own layer ([`require_scope`], applied with
//! `route_layer` in [`super::router`]); health and metrics routes carry none and stay open.
//! The layer attaches what the token was granted ([`Granted`]) to the request, so a handler
//! can tell whether its caller may also read jobs (see [`super::view`]). With no tokens
//! configured nothing is checked and everything is granted: that is the loopback-only mode
//! the CLI enforces at start-up.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use crate::tokens::{Denied, Granted, MIN_TOKEN_LEN, Scope, Tokens, parse_tokens};

use super::ApiError;

impl<S: Send + Sync> FromRequestParts<S> for Granted {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Granted, Infallible> {
        Ok(parts
            .extensions
            .get::<Granted>()
            .copied()
            .unwrap_or(Granted::NONE))
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> ApiError {
        match d {
            Denied::Missing => ApiError::Unauthorized(
                "authentication required: send Authorization: Bearer <token>".into(),
            ),
            Denied::Malformed => ApiError::Unauthorized(
                "malformed Authorization header: expected Bearer <token>".into(),
            ),
            Denied::Unknown => ApiError::Unauthorized("invalid API token".into()),
            Denied::MissingScope(s) => {
                ApiError::Forbidden(format!("this token lacks the {s} scope"))
            }
        }
    }
}

/// What one route's [`require_scope`] layer carries: the tokens and the scope it needs.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Clone)]
pub struct Guard {
    /// The configured tokens, shared with [`super::AppState`].
    pub tokens: Arc<Tokens>,
    /// The scope the route needs.
    pub scope: Scope,
}

/// Middleware: lets the request through if the tokens allow its scope; otherwise answers
/// 401 (with `WWW-Authenticate: Bearer`) or 403 before the handler reads the body.
pub async fn require_scope(State(guard): State<Guard>, mut req: Request, next: Next) -> Response {
    let header = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    match guard.tokens.grant(header, guard.scope) {
        Ok(granted) => {
            req.extensions_mut().insert(granted);
            next.run(req).await
        }
        Err(denied) => {
            tracing::debug!(?denied, method = %req.method(), path = req.uri().path(), "request denied");
            ApiError::from(denied).into_response()
        }
    }
}
