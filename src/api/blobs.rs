//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

use super::{headers, upstream_error};
use crate::app::App;
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::range::{parse_range, RangeRequest};
use crate::oci::Digest;
use crate::proxy::fill::FillError;
use crate::proxy::{Outcome, ProxyRepo, Target};
use crate::storage::Repo;

pub async fn get(app: &App, target: &Target, d: &Digest, req: &HeaderMap, head: bool) -> ApiResult {
    match target {
        Target::Local(name) => get_local(app, &Repo::Local(name.clone()), d, req, head).await,
        Target::Proxy { repo, .. } => get_proxied(app, repo, d, req, head).await,
    }
}

fn range_of(req: &HeaderMap, size: u64) -> RangeRequest {
    match req.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => parse_range(r, size),
        None => RangeRequest::Full,
    }
}

fn unsatisfiable(size: u64) -> ApiError {
    ApiError::new(Code::RangeInvalid)
        .detail(format!("blob has {size} bytes"))
        .header(header::CONTENT_RANGE, format!("bytes */{size}"))
}

/// The response head for `len` bytes from `start` of a `size`-byte blob (`size` unknown: no
/// length headers).
fn blob_response(
    d: &Digest,
    status: StatusCode,
    start: u64,
    len: Option<u64>,
    size: Option<u64>,
    body: Body,
) -> Response {
    let mut resp = headers::response(status, body);
    let h = resp.headers_mut();
    headers::content(h, d, "application/octet-stream", len);
    headers::set(h, "accept-ranges", "bytes");
    if let (StatusCode::PARTIAL_CONTENT, Some(len), Some(size)) = (status, len, size) {
        headers::set(h, "content-range", format!("bytes {start}-{}/{size}", start + len - 1));
    }
    resp
}

async fn get_local(app: &App, repo: &Repo, d: &Digest, req: &HeaderMap, head: bool) -> ApiResult {
    let Some(size) = app.store.repo_blob_size(repo, d).await? else {
        return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
    };
    let (status, start, len) = match range_of(req, size) {
        RangeRequest::Full => (StatusCode::OK, 0, size),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.len()),
        RangeRequest::Unsatisfiable => return Err(unsatisfiable(size)),
    };
    if !head {
        // (`storage.s3.redirect`) The client reads from the bucket: every request here has
        // passed authorization. `Range` is the client's to send again.
        if let Some(url) = app.store.blob_redirect(d).await? {
            let mut r = headers::located(StatusCode::TEMPORARY_REDIRECT, &url);
            headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
            return Ok(r);
        }
    }
    let body = if head {
        Body::empty()
    } else {
        let Some(stream) = app.store.read_blob(d, start, len).await? else {
            return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
        };
        Body::from_stream(stream)
    };
    Ok(blob_response(d, status, start, Some(len), Some(size), body))
}

/// A blob in an upstream's namespace: from the cache, else from the fill (started or joined).
async fn get_proxied(app: &App, p: &ProxyRepo, d: &Digest, req: &HeaderMap, head: bool) -> ApiResult {
    let outcome = if app.store.repo_blob_size(&p.cache, d).await?.is_some() {
        Some(Outcome::Hit)
    } else if app.store.blob_size(d).await?.is_some() && upstream_has(app, p, d).await? {
        // Content-addressed: the same bytes arrived through another repository, and the
        // upstream serves them in this one.
        app.store.link_blob(&p.cache, d).await?;
        Some(Outcome::Hit)
    } else {
        None
    };
    if let Some(outcome) = outcome {
        let mut resp = get_local(app, &p.cache, d, req, head).await?;
        headers::outcome(&mut resp, &p.upstream.host, "blob", outcome);
        return Ok(resp);
    }
    if head {
        let size = app.proxy.blob_head(p, d).await.map_err(|e| upstream_error(&e, Code::BlobUnknown))?;
        let Some(size) = size else { return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string())) };
        let mut resp = blob_response(d, StatusCode::OK, 0, Some(size), Some(size), Body::empty());
        headers::outcome(&mut resp, &p.upstream.host, "blob", Outcome::Miss);
        return Ok(resp);
    }
    let (fill, leader) = app.proxy.fill(&app.store, p, d);
    let size = fill.started().await.map_err(|e| match e {
        FillError::Upstream(u) => upstream_error(&u, Code::BlobUnknown),
        // The local store's trouble is never blamed on the upstream.
        FillError::Store(s) if s.is_full() => super::store_full(&s),
        FillError::Store(s) => ApiError::internal(s),
        e => ApiError::new(Code::Unavailable).status(StatusCode::BAD_GATEWAY).detail(e.to_string()),
    })?;
    let (status, start, end) = match size.map(|s| (s, range_of(req, s))) {
        Some((s, RangeRequest::Unsatisfiable)) => return Err(unsatisfiable(s)),
        Some((_, RangeRequest::Partial(r))) => (StatusCode::PARTIAL_CONTENT, r.start, Some(r.end + 1)),
        _ => (StatusCode::OK, 0, None),
    };
    let len = end.or(size).map(|e| e - start);
    let body = Body::from_stream(fill.read(start, end));
    let mut resp = blob_response(d, status, start, len, size, body);
    let outcome = if leader { Outcome::Miss } else { Outcome::Joined };
    headers::outcome(&mut resp, &p.upstream.host, "blob", outcome);
    Ok(resp)
}

/// Whether the upstream has `d` in `p`'s repository (its answer to a HEAD, cached briefly):
/// content already in the store from elsewhere is served under an upstream's name only if
/// that upstream serves it there.
async fn upstream_has(app: &App, p: &ProxyRepo, d: &Digest) -> Result<bool, ApiError> {
    let size = app.proxy.blob_head(p, d).await.map_err(|e| upstream_error(&e, Code::BlobUnknown))?;
    Ok(size.is_some())
}

pub async fn delete(app: &App, repo: &Repo, d: &Digest) -> ApiResult {
    if !app.store.unlink_blob(repo, d).await? {
        return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
    }
    let mut r = headers::response(StatusCode::ACCEPTED, Body::empty());
    headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
    Ok(r)
}

pub fn location(repo: &Repo, d: &Digest) -> String {
    format!("/v2/{repo}/blobs/{d}")
}

/// 201 for a blob that is now in `repo`.
pub fn created(repo: &Repo, d: &Digest) -> Response {
    let mut r = headers::located(StatusCode::CREATED, &location(repo, d));
    headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
    r
}
