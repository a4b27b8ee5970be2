//! The web dashboard `apiary api` serves at `/` (cargo feature `dashboard`): one HTML page,
//! its script and style sheet, and the vendored charting library (uPlot), compiled into the
//! binary, so it needs no separate server, no CDN and no network beyond the API itself.
//!
//! The pages hold no data and no secret: the script in the browser reads and acts through the
//! public `/v1` routes with the visitor's own token (kept in the tab's `sessionStorage`), so
//! the dashboard can show and do exactly what that token's scope allows, no more. Every page
//! path (`/`, `/jobs`, `/jobs/{id}`, `/dead`, `/queues`, `/schedules`, `/login`) answers the
//! same document, and the script draws the page the address names, so a job's address can be
//! pasted into a chat.
//!
//! The answers forbid inline script and every other origin (`Content-Security-Policy`), and
//! the script writes what it shows with `textContent`, never as markup, so a payload holding
//! `<script>` is shown as text.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::AppState;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const UPLOT_JS: &str = include_str!("assets/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/vendor/uPlot.min.css");

/// The page paths: each answers the page, and the script draws what the path names.
pub const PAGES: [&str; 7] = [
    "/",
    "/jobs",
    "/jobs/{id}",
    "/dead",
    "/queues",
    "/schedules",
    "/login",
];

/// The dashboard's routes, to merge into the API's router.
pub fn router() -> Router<AppState> {
    let mut router = Router::new();
    for page in PAGES {
        router = router.route(page, get(index));
    }
    router
        .route("/ui/app.js", get(|| asset(APP_JS, "text/javascript")))
        .route("/ui/app.css", get(|| asset(APP_CSS, "text/css")))
        .route(
            "/ui/uPlot.iife.min.js",
            get(|| asset(UPLOT_JS, "text/javascript")),
        )
        .route("/ui/uPlot.min.css", get(|| asset(UPLOT_CSS, "text/css")))
}

/// Headers every dashboard answer carries: nothing from elsewhere, no inline script, no
/// framing by another site.
fn secure(mut response: Response, content_type: &'static str) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The page. Not cached, so a new version's script is picked up on the next load.
async fn index() -> Response {
    let mut r = secure(
        (StatusCode::OK, INDEX_HTML).into_response(),
        "text/html; charset=utf-8",
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// A script or style sheet; revalidated, since its name carries no version.
async fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = secure((StatusCode::OK, body).into_response(), content_type);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
