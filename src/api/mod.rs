//! The HTTP API: ① enqueue and ⑦ poll. [`router`] builds the routes apart from [`serve`], so
//! tests call it without a socket.

pub mod auth;
pub mod enqueue;
pub mod error;
pub mod health;
pub mod jobs;
pub mod waiters;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::client::Client;
use crate::shutdown::Shutdown;
use auth::{Guard, Scope, Tokens};
pub use error::ApiError;
use waiters::Waiters;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Enqueues and reads jobs.
    pub client: Client,
    /// Long polls waiting for jobs to finish.
    pub waiters: Arc<Waiters>,
    /// Fires when the server drains: long polls answer at once with the current state.
    pub shutdown: Shutdown,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// The bearer tokens each scoped route checks; empty means the API is open.
    pub tokens: Arc<Tokens>,
}

impl AppState {
    /// State for `client`, listening for finished jobs on its store, accepting `tokens`.
    pub fn new(
        client: Client,
        shutdown: Shutdown,
        max_payload_bytes: usize,
        tokens: Tokens,
    ) -> AppState {
        let waiters = Waiters::start(client.store().clone(), shutdown.force.clone());
        // The body holds the payload plus a little JSON around it.
        AppState {
            client,
            waiters,
            shutdown,
            max_body_bytes: max_payload_bytes + 64 * 1024,
            tokens: Arc::new(tokens),
        }
    }
}

/// The API's routes. Each job route carries the scope it needs in its own layer
/// ([`auth::require_scope`]); health checks carry none and stay open.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let tokens = state.tokens.clone();
    let needs = move |scope: Scope| {
        axum::middleware::from_fn_with_state(
            Guard {
                tokens: tokens.clone(),
                scope,
            },
            auth::require_scope,
        )
    };
    Router::new()
        .route(
            "/v1/jobs",
            post(enqueue::enqueue)
                .route_layer(needs(Scope::Enqueue))
                .merge(get(jobs::list).route_layer(needs(Scope::Read))),
        )
        .route(
            "/v1/jobs/{id}",
            get(jobs::get).route_layer(needs(Scope::Read)),
        )
        .route(
            "/v1/jobs/{id}/cancel",
            post(jobs::cancel).route_layer(needs(Scope::Admin)),
        )
        .route(
            "/v1/jobs/{id}/retry",
            post(jobs::retry).route_layer(needs(Scope::Admin)),
        )
        .route(
            "/v1/stats",
            get(health::stats).route_layer(needs(Scope::Read)),
        )
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves `router` on `addr` until the shutdown drains it: stops accepting, lets open requests
/// finish (long polls answer with the current state), then returns.
pub async fn serve(addr: SocketAddr, state: AppState) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "api listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.drain.cancelled().await })
        .await
}
