//! Response builders shared by the handlers, so each header is set in one place.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use crate::oci::Digest;

pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
pub const DOCKER_UPLOAD_UUID: &str = "docker-upload-uuid";
pub const OCI_SUBJECT: &str = "oci-subject";
pub const OCI_FILTERS_APPLIED: &str = "oci-filters-applied";
pub const OCI_NAMESPACE: &str = "oci-namespace";
/// How a pull was answered: hit, miss, joined, stale or revalidated.
pub const CACHE_OUTCOME: &str = "x-stevedore-cache";
pub const STALE_WARNING: &str = "110 stevedore \"Response is Stale\"";

/// Marks how a pull through `upstream` was answered: header and metric.
pub fn outcome(resp: &mut Response, upstream: &str, kind: &'static str, outcome: crate::registry::Outcome) {
    set(resp.headers_mut(), CACHE_OUTCOME, outcome.as_str());
    tracing::Span::current().record("stevedore.cache", outcome.as_str());
    crate::metrics::cache_outcome(upstream, kind, outcome.as_str());
}

pub fn response(status: StatusCode, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

pub fn set(h: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        h.insert(name, v);
    }
}

/// `Docker-Content-Digest`, `Etag`, `Content-Type` and (when known) `Content-Length` of content.
pub fn content(h: &mut HeaderMap, digest: &Digest, media_type: &str, len: Option<u64>) {
    set(h, DOCKER_CONTENT_DIGEST, digest);
    set(h, "etag", format!("\"{digest}\""));
    set(h, "content-type", media_type);
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

pub fn json_response(body: String) -> Response {
    let mut r = response(StatusCode::OK, Body::from(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An empty answer with a `Location`.
pub fn located(status: StatusCode, location: &str) -> Response {
    let mut r = response(status, Body::empty());
    set(r.headers_mut(), "location", location);
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    r
}
