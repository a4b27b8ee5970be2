//! The OpenAPI document against the router that serves it: every route is documented with
//! exactly its methods, every documented operation is routed, and the document is served.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use apiary::Shutdown;
use apiary::api::auth::Tokens;
use apiary::api::{AppState, openapi, route_paths, router};
use axum::body::Body;
use axum::http::{Request, header};
use common::TestEnv;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];

fn state(env: &TestEnv) -> AppState {
    AppState::new(
        env.client(),
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        Tokens::default(),
    )
}

/// The document's methods per path.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc = openapi::json();
    let mut ops = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let methods = METHODS
            .iter()
            .filter(|m| item.get(m.to_lowercase()).is_some())
            .map(|m| m.to_string())
            .collect();
        ops.insert(path.clone(), methods);
    }
    ops
}

/// `path` with its parameters filled in: a fresh id, or the `default` queue.
fn concrete(path: &str) -> String {
    path.replace("{id}", &Uuid::now_v7().to_string())
        .replace("{name}", "default")
}

async fn send(app: &axum::Router, method: &str, uri: &str) -> (u16, Option<String>, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn every_route_is_documented_with_exactly_its_methods() {
    let env = TestEnv::new().await;
    let state = state(&env);
    let routed: BTreeSet<String> = route_paths(&state).into_iter().map(String::from).collect();
    let documented = documented();
    let paths: BTreeSet<String> = documented.keys().cloned().collect();
    assert_eq!(
        routed.difference(&paths).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "routes that /openapi.json does not describe"
    );
    assert_eq!(
        paths.difference(&routed).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "paths in /openapi.json that no route serves"
    );

    // The methods, from the router's own answers: a method the document lists is routed (its
    // handler answers, whatever it says), any other gets the router's 405.
    let app = router(state);
    for (path, methods) in &documented {
        for method in METHODS {
            let uri = concrete(path);
            let (status, _, body) = send(&app, method, &uri).await;
            if methods.contains(method) {
                assert_ne!(
                    status, 405,
                    "{method} {uri} is documented but not routed: {body}"
                );
                let fallback = body["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("no such route"));
                assert!(!fallback, "{method} {uri} is documented but not routed");
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {uri} is routed but not documented: {body}"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_document_is_served_as_openapi_3_1_json() {
    let env = TestEnv::new().await;
    let app = router(state(&env));
    let (status, content_type, doc) = send(&app, "GET", "/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc, openapi::json());
    // Every error answer points at the one error shape; /readyz's 503 is its own report.
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            for (code, answer) in op["responses"].as_object().expect("responses") {
                let readiness = path == "/readyz" && code == "503";
                if (code.starts_with('4') || code.starts_with('5')) && !readiness {
                    let schema = &answer["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {code}"
                    );
                }
            }
        }
    }
}
