//! Operator endpoints (`/healthz`, `/readyz`, `/metrics`) and the access log.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{headers, AppState, RouteKind};

/// 200 when the store accepts writes, else 503.
pub async fn readyz(State(app): State<AppState>) -> Response {
    if app.store.writable().await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store is not writable\n").into_response()
    }
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    match &app.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

/// One log line per request: method, path and query, status, bytes, duration, cache outcome.
pub async fn access_log(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = next.run(req).await;
    let took = start.elapsed();
    let status = resp.status().as_u16();
    let bytes =
        resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(0);
    let cache = resp.headers().get(headers::CACHE_OUTCOME).and_then(|v| v.to_str().ok()).unwrap_or("-");
    let route = resp.extensions().get::<RouteKind>().map_or("other", |k| k.0);
    if method == axum::http::Method::GET && resp.status().is_success() {
        crate::metrics::served_bytes(bytes);
    }
    crate::metrics::request(route, method.as_str(), status, took);
    tracing::info!(
        target: "stevedore::access",
        method = %method,
        uri = %uri,
        status,
        bytes,
        ms = took.as_secs_f64() * 1000.0,
        cache,
        "request"
    );
    resp
}
