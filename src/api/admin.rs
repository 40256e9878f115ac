//! Operator endpoints that change what the cache holds: `POST /admin/prefetch`.
//!
//! They exist only when someone can be told apart from anyone: with client authentication
//! (`[auth] htpasswd`: a login granted `admin` by the rules) or with an admin token
//! (`auth.admin_token_file`: `Authorization: Bearer <token>`, which may do everything). On an
//! open registry without a token the routes are not there (404; `api::router`).
//!
//! The body is `{"references": ["docker.io/library/nginx:1.27*", …], "platforms":
//! ["linux/amd64"], "referrers": true}` (platforms and referrers optional: every platform,
//! referrers included). The prefetch runs in process through the same single-flight verified
//! fill as a client pull, the registry's prefetch that `stevedore prefetch` runs
//! ([`crate::registry::Registry::prefetch`]), in a task of its own, so a client that hangs up
//! does not cut it short (a SIGTERM does: the process exits after `server.shutdown_grace`).
//! Tag patterns over the limits of [`crate::oci::glob::check`] are refused with 400. The answer is the report: `200` when every reference was prefetched,
//! else `502 UNAVAILABLE` with the same report as the error's detail.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::image_ref::{ImageRef, Platform, RefError, Selector};
use crate::registry::{PrefetchOptions, PrefetchReport};

/// A prefetch request is a list of references, not content.
const MAX_BODY: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefetchRequest {
    references: Vec<String>,
    #[serde(default)]
    platforms: Vec<String>,
    #[serde(default = "yes")]
    referrers: bool,
}

fn yes() -> bool {
    true
}

fn bad_request(detail: impl Into<Value>) -> ApiError {
    ApiError::new(Code::Unsupported).status(StatusCode::BAD_REQUEST).detail(detail)
}

pub async fn prefetch(app: &AppState, parts: &axum::http::request::Parts, body: Body) -> ApiResult {
    // The admin token may do everything; without it, client authentication decides (below).
    let by_token = app.admin_token.as_ref().is_some_and(|t| t.presented_in(&parts.headers));
    if !by_token && app.auth.is_none() {
        return Err(ApiError::new(Code::Unauthorized)
            .detail("present the admin token (auth.admin_token_file) as a Bearer token")
            .header(axum::http::header::WWW_AUTHENTICATE, "Bearer realm=\"stevedore-admin\""));
    }
    // With client authentication on, the caller needs `admin` on every repository it names
    // (before the body is looked at further than to learn those names).
    let raw = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| bad_request(format!("the request body must be JSON of at most {MAX_BODY} bytes")))?;
    let req: PrefetchRequest =
        serde_json::from_slice(&raw).map_err(|e| bad_request(format!("the request body: {e}")))?;
    if req.references.is_empty() {
        return Err(bad_request("`references` is empty: nothing to prefetch"));
    }
    let mut fulls = Vec::new();
    for r in &req.references {
        let parsed: ImageRef = r.parse().map_err(|e: RefError| bad_request(format!("reference {r:?}: {}", e.why)))?;
        if let Selector::Pattern(p) = &parsed.selector {
            crate::oci::glob::check(p).map_err(|e| bad_request(format!("reference {r:?}: {e}")))?;
        }
        // A host that is not a configured upstream: the prefetch reports it as failed.
        if let Some(t) = app.registry.named(parsed.host.as_deref(), &parsed.name) {
            fulls.push(super::access::full_name(&t));
        }
    }
    match &app.auth {
        Some(auth) if !by_token => auth.admin_allowed(parts, &fulls).await?,
        _ => {}
    }
    let mut platforms = Vec::new();
    for p in &req.platforms {
        platforms.push(p.parse::<Platform>().map_err(|e| bad_request(format!("platform {p:?}: {}", e.why)))?);
    }
    if app.registry.is_offline() {
        return Err(ApiError::new(Code::Unavailable).detail("the registry is offline: nothing can be prefetched"));
    }
    let app = app.clone();
    let task = tokio::spawn(async move {
        let opts =
            PrefetchOptions { refs: &req.references, platforms: &platforms, referrers: req.referrers, live: false };
        let mut progress = std::io::sink();
        app.registry.prefetch(&opts, &mut progress).await
    });
    let report = task.await.map_err(ApiError::internal)?;
    let body = report_json(&report);
    tracing::info!(ok = report.ok.len(), failed = report.failed.len(), bytes = report.bytes_fetched, "admin prefetch");
    if report.failed.is_empty() {
        return Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string())
            .into_response());
    }
    let failed: Vec<&str> = report.failed.iter().map(|(r, _)| r.as_str()).collect();
    Err(ApiError::new(Code::Unavailable)
        .status(StatusCode::BAD_GATEWAY)
        .detail(json!({"failed_references": failed, "report": body})))
}

fn report_json(r: &PrefetchReport) -> Value {
    json!({
        "ok": r.ok,
        "failed": r.failed.iter().map(|(reference, error)| json!({"reference": reference, "error": error})).collect::<Vec<_>>(),
        "manifests": r.manifests,
        "blobs_fetched": r.blobs_fetched,
        "bytes_fetched": r.bytes_fetched,
        "blobs_cached": r.blobs_cached,
    })
}

/// Renders a handler's result (admin routes are outside `/v2/` dispatch).
pub fn respond(r: ApiResult) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}
