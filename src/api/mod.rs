//! The HTTP API: ① enqueue and ⑦ poll, and the operator's routes (cancel, retry, queues,
//! schedules, stats). [`router`] builds the routes apart from [`serve`], so tests call it without a
//! socket. Every error it answers, axum's own included, is `{"error": "..."}` ([`error`]).

pub mod auth;
pub mod batches;
pub mod dead;
pub mod enqueue;
pub mod error;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod openapi;
pub mod queues;
pub mod readiness;
pub mod schedules;
pub mod view;
pub mod waiters;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{Method, Uri};
use axum::routing::{MethodRouter, get, post, put};

use crate::client::Client;
use crate::shutdown::Shutdown;
use crate::store::list_jobs::{DEFAULT_SCAN_BUDGET, MAX_PAGE_BYTES};
use auth::{Guard, Scope, Tokens};
pub use error::ApiError;
use readiness::Readiness;
use waiters::Waiters;

/// The API's bounds, each with its default; [`AppState::with_options`] takes them, so tests
/// can make them small.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy)]
pub struct ApiOptions {
    /// The most long polls (`?wait=`) waiting at once in this process (defaults to 10,000);
    /// past it a long poll is answered 503.
    pub max_waiters: usize,
    /// The most bytes of jobs in one `GET /v1/jobs` page (defaults to 8 MiB); a page holds
    /// at least one job.
    pub max_page_bytes: i64,
    /// The most rows one `GET /v1/jobs` page examines for a `status` filter (defaults to
    /// 50,000).
    pub scan_budget: i64,
    /// The readiness reconnector's backoff (defaults to 100 ms, doubling up to 2 s).
    pub reconnect: readiness::Backoff,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            max_waiters: waiters::DEFAULT_MAX_WAITERS,
            max_page_bytes: MAX_PAGE_BYTES,
            scan_budget: DEFAULT_SCAN_BUDGET,
            reconnect: readiness::Backoff::default(),
        }
    }
}

/// What every handler shares.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Clone)]
pub struct AppState {
    /// Enqueues and reads jobs.
    pub client: Client,
    /// Long polls waiting for jobs to finish.
    pub waiters: Arc<Waiters>,
    /// Fires when the server drains: long polls answer at once with the current state, and
    /// the readiness reconnector stops.
    pub shutdown: Shutdown,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// The bearer tokens each scoped route checks; empty means the API is open.
    pub tokens: Arc<Tokens>,
    /// What `/readyz` reports, kept by a background task.
    pub readiness: Arc<Readiness>,
    /// The bounds of pages and long polls.
    pub options: ApiOptions,
}

impl AppState {
    /// State for `client`, listening for finished jobs on its store, accepting `tokens`, with
    /// the default [`ApiOptions`]. Starts the API's background tasks (the long-poll listener
    /// and the readiness reconnector), so it must be called within a tokio runtime.
    pub fn new(
        client: Client,
        shutdown: Shutdown,
        max_payload_bytes: usize,
        tokens: Tokens,
    ) -> AppState {
        AppState::with_options(
            client,
            shutdown,
            max_payload_bytes,
            tokens,
            ApiOptions::default(),
        )
    }

    /// [`AppState::new`] with other bounds.
    pub fn with_options(
        client: Client,
        shutdown: Shutdown,
        max_payload_bytes: usize,
        tokens: Tokens,
        options: ApiOptions,
    ) -> AppState {
        let waiters = Waiters::start(
            client.store().clone(),
            shutdown.force.clone(),
            options.max_waiters,
        );
        let readiness = Readiness::start(client.clone(), options.reconnect, shutdown.drain.clone());
        // The body holds the payload plus a little JSON around it.
        AppState {
            client,
            waiters,
            shutdown,
            max_body_bytes: max_payload_bytes + 64 * 1024,
            tokens: Arc::new(tokens),
            readiness,
            options,
        }
    }
}

/// Every route with its handler and guard, before the fallbacks and the body limit.
fn routes(state: &AppState) -> Routes {
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
    Routes::default()
        .route(
            "/v1/jobs",
            post(enqueue::enqueue)
                .route_layer(needs(Scope::Enqueue))
                .merge(get(jobs::list).route_layer(needs(Scope::Read))),
        )
        .route(
            "/v1/chains",
            post(batches::chain)
                .route_layer(needs(Scope::Enqueue))
                .layer(axum::extract::DefaultBodyLimit::max(
                    batches::MAX_GROUP_BODY_BYTES.max(limit),
                )),
        )
        .route(
            "/v1/batches",
            post(batches::create)
                .route_layer(needs(Scope::Enqueue))
                .layer(axum::extract::DefaultBodyLimit::max(
                    batches::MAX_GROUP_BODY_BYTES.max(limit),
                )),
        )
        .route(
            "/v1/batches/{id}",
            get(batches::get).route_layer(needs(Scope::Read)),
        )
        .route(
            "/v1/jobs/{id}",
            get(jobs::get).route_layer(needs(Scope::Read)),
        )
        .route(
            "/v1/jobs/{id}/children",
            get(jobs::children).route_layer(needs(Scope::Read)),
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
            "/v1/queues",
            get(queues::list).route_layer(needs(Scope::Read)),
        )
        .route(
            "/v1/queues/{name}/pause",
            post(queues::pause).route_layer(needs(Scope::Admin)),
        )
        .route(
            "/v1/queues/{name}/resume",
            post(queues::resume).route_layer(needs(Scope::Admin)),
        )
        .route(
            "/v1/schedules",
            get(schedules::list).route_layer(needs(Scope::Read)),
        )
        .route(
            "/v1/schedules/{name}",
            put(schedules::set)
                .delete(schedules::delete)
                .route_layer(needs(Scope::Admin))
                .merge(get(schedules::get).route_layer(needs(Scope::Read))),
        )
        .route(
            "/v1/schedules/{name}/pause",
            post(schedules::pause).route_layer(needs(Scope::Admin)),
        )
        .route(
            "/v1/schedules/{name}/resume",
            post(schedules::resume).route_layer(needs(Scope::Admin)),
        )
        .route(
            "/v1/dead/replay",
            post(dead::replay).route_layer(needs(Scope::Admin)),
        )
        .route(
            "/v1/stats",
            get(health::stats).route_layer(needs(Scope::Read)),
        )
        .route(
            "/v1/stats/series",
            get(health::series).route_layer(needs(Scope::Read)),
        )
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::document))
}

/// The router under construction, with the path of every route registered on it, so a test
/// can hold the paths against the OpenAPI document ([`route_paths`]).
#[derive(Default)]
struct Routes {
    router: Router<AppState>,
    paths: Vec<&'static str>,
}

impl Routes {
    /// Adds a route, as [`Router::route`] does, and records its path.
    fn route(mut self, path: &'static str, methods: MethodRouter<AppState>) -> Routes {
        self.paths.push(path);
        self.router = self.router.route(path, methods);
        self
    }
}

/// The path of every route [`router`] serves, in the order they are registered.
pub fn route_paths(state: &AppState) -> Vec<&'static str> {
    routes(state).paths
}

/// The API's routes. Each job route carries the scope it needs in its own layer
/// ([`auth::require_scope`]); health checks carry none and stay open. An unknown path and a
/// known path with the wrong method answer JSON like every other error.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let router = routes(&state).router;
    // The dashboard's pages and assets: static, public, and outside the API's contract (they
    // read the API with the visitor's own token).
    #[cfg(feature = "dashboard")]
    let router = router.merge(crate::dashboard::router());
    router
        // After every route: it applies to the routes registered before it. axum still sets
        // the `Allow` header on these answers.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The answer for a path no route has.
async fn no_route() -> ApiError {
    ApiError::NoRoute("no such route; see the HTTP API in the README".into())
}

/// The answer for a route's path with a method it does not take.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
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
