//! Upload sessions: `POST /v2/<name>/blobs/uploads/` (start, monolithic, mount) and
//! `GET`/`PATCH`/`PUT`/`DELETE /v2/<name>/blobs/uploads/<id>`.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use futures::StreamExt;

use super::App;
use super::{blobs, headers, Query};
use crate::error::{ApiError, ApiResult, Code};
use crate::limits::ClientAddr;
use crate::oci::range::parse_content_range;
use crate::oci::{Algorithm, Digest, RepoName};
use crate::registry::{StoreError, Upload, UploadId, UploadWriter, Writable};

fn upload_location(repo: &Writable, id: UploadId) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

/// `Range: 0-<last byte>` as the spec writes it (`0-0` for an empty session).
fn range_value(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

/// 202 (or 204 for a status query) describing a session.
fn session_response(status: StatusCode, repo: &Writable, up: Upload) -> Response {
    let mut r = headers::located(status, &upload_location(repo, up.id));
    headers::set(r.headers_mut(), "range", range_value(up.offset));
    headers::set(r.headers_mut(), headers::DOCKER_UPLOAD_UUID, up.id);
    r
}

fn parse_id(id: &str) -> Result<UploadId, ApiError> {
    id.parse().map_err(|_| ApiError::new(Code::BlobUploadUnknown).detail("no such upload session"))
}

fn digest_param(q: &Query, key: &str) -> Result<Option<Digest>, ApiError> {
    q.get(key)
        .map(|s| s.parse().map_err(|e: crate::oci::digest::DigestError| Code::DigestInvalid.with_detail(e.to_string())))
        .transpose()
}

fn content_length(h: &HeaderMap) -> Result<Option<u64>, ApiError> {
    h.get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Code::SizeInvalid.with_detail("bad Content-Length"))
        })
        .transpose()
}

/// The byte count a chunk must have, from `Content-Range` (checked against the session's
/// offset) and `Content-Length`; `None` for a plain streamed chunk.
fn expected_chunk_len(h: &HeaderMap, offset: u64) -> Result<Option<u64>, ApiError> {
    let len = content_length(h)?;
    let Some(cr) = h.get(header::CONTENT_RANGE) else { return Ok(len) };
    let Some((start, end)) = cr.to_str().ok().and_then(parse_content_range) else {
        return Err(ApiError::new(Code::RangeInvalid).detail("Content-Range must be <start>-<end>"));
    };
    if start != offset {
        return Err(ApiError::new(Code::RangeInvalid)
            .detail(format!("upload is at offset {offset}, chunk starts at {start}"))
            .header(header::RANGE, range_value(offset)));
    }
    let want = end - start + 1;
    if len.is_some_and(|l| l != want) {
        return Err(Code::SizeInvalid.with_detail("Content-Length does not match Content-Range"));
    }
    Ok(Some(want))
}

/// `413 SIZE_INVALID`: the blob would be larger than `uploads.max_size`.
fn too_large(app: &App) -> ApiError {
    ApiError::new(Code::SizeInvalid)
        .status(StatusCode::PAYLOAD_TOO_LARGE)
        .detail(format!("blobs larger than {} are not accepted (uploads.max_size)", app.cfg.uploads.max_size))
}

/// Appends a request body to the session. On any failure the chunk is rolled back, so the
/// session stays at its last checkpoint.
async fn write_chunk(app: &App, mut w: UploadWriter, body: Body, want: Option<u64>) -> Result<UploadWriter, ApiError> {
    let start = w.size();
    let max = app.cfg.uploads.max_size.0;
    if want.is_some_and(|n| start.saturating_add(n) > max) {
        return Err(too_large(app));
    }
    let mut stream = body.into_data_stream();
    let outcome: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Code::BlobUploadInvalid.with_detail(format!("reading the body: {e}")))?;
            if want.is_some_and(|n| w.size() - start + chunk.len() as u64 > n) {
                return Err(Code::SizeInvalid.with_detail("body is longer than announced"));
            }
            if w.size() + chunk.len() as u64 > max {
                return Err(too_large(app));
            }
            w.write(chunk).await?;
        }
        if let Some(n) = want.filter(|&n| w.size() - start != n) {
            return Err(Code::SizeInvalid.with_detail(format!("body has {} bytes, expected {n}", w.size() - start)));
        }
        Ok(())
    }
    .await;
    match outcome {
        Ok(()) => Ok(w),
        Err(e) => {
            w.rollback().await?;
            Err(e)
        }
    }
}

pub async fn start(
    app: &App,
    repo: &Writable,
    client: Option<ClientAddr>,
    q: &Query,
    h: &HeaderMap,
    body: Body,
) -> ApiResult {
    if let Some(mount) = digest_param(q, "mount")? {
        if let Some(r) = try_mount(app, repo, &mount, q.get("from")).await? {
            return Ok(r);
        }
    }
    app.upload_quota.admit(app.registry.store(), client).await.map_err(|why| {
        ApiError::new(Code::TooManyRequests).detail(why).header(header::RETRY_AFTER, RETRY_SESSION_SECS)
    })?;
    if let Some(d) = digest_param(q, "digest")? {
        // Monolithic upload: the whole blob in the POST body.
        let id = app.registry.create_upload(repo, d.algorithm()).await?;
        app.upload_quota.opened(client, id);
        let res = monolithic(app, repo, id, &d, h, body).await;
        app.upload_quota.closed(&id);
        return res;
    }
    let id = app.registry.create_upload(repo, Algorithm::Sha256).await?;
    app.upload_quota.opened(client, id);
    Ok(session_response(StatusCode::ACCEPTED, repo, Upload { id, offset: 0 }))
}

/// A client refused a session for the session caps may retry after this many seconds.
const RETRY_SESSION_SECS: u64 = 10;

/// The whole blob in the `POST` body, through a session of its own.
async fn monolithic(app: &App, repo: &Writable, id: UploadId, d: &Digest, h: &HeaderMap, body: Body) -> ApiResult {
    let w = app.registry.open_upload(repo, &id).await?;
    let w = match write_chunk(app, w, body, content_length(h)?).await {
        Ok(w) => w,
        Err(e) => {
            app.registry.cancel_upload(repo, &id).await?;
            return Err(e);
        }
    };
    app.registry.commit_upload(w, repo, d).await?;
    Ok(blobs::created(repo, d))
}

/// Cross-repository mount ([`crate::registry::Registry::mount`]). `None` when it cannot,
/// and a session should be started instead; always so without `from` (a blob is mounted
/// only from a repository the client names, so deleted blobs stay deleted).
async fn try_mount(app: &App, repo: &Writable, d: &Digest, from: Option<&str>) -> Result<Option<Response>, ApiError> {
    let Some(Ok(from)) = from.map(str::parse::<RepoName>) else { return Ok(None) };
    if !app.registry.mount(repo, d, &from).await? {
        return Ok(None);
    }
    Ok(Some(blobs::created(repo, d)))
}

pub async fn status(app: &App, repo: &Writable, id: &str) -> ApiResult {
    let up = app.registry.upload_status(repo, &parse_id(id)?).await?;
    Ok(session_response(StatusCode::NO_CONTENT, repo, up))
}

pub async fn patch(app: &App, repo: &Writable, id: &str, h: &HeaderMap, body: Body) -> ApiResult {
    let w = app.registry.open_upload(repo, &parse_id(id)?).await?;
    let want = expected_chunk_len(h, w.offset())?;
    let mut w = write_chunk(app, w, body, want).await?;
    w.checkpoint().await?;
    Ok(session_response(StatusCode::ACCEPTED, repo, Upload { id: w.id(), offset: w.size() }))
}

pub async fn finish(app: &App, repo: &Writable, id: &str, q: &Query, h: &HeaderMap, body: Body) -> ApiResult {
    let id = parse_id(id)?;
    let Some(d) = digest_param(q, "digest")? else {
        return Err(Code::DigestInvalid.with_detail("the digest query parameter is required"));
    };
    let w = match app.registry.open_upload(repo, &id).await {
        Ok(w) => w,
        Err(StoreError::UploadUnknown) if app.registry.recover_interrupted_commit(repo, &id, &d).await? => {
            // The retry's body is what the interrupted PUT had sent: already stored. Read it
            // off the connection (bounded) so that the client's next request on it works.
            drain(body, app.cfg.uploads.max_size.0).await;
            return Ok(blobs::created(repo, &d));
        }
        Err(e) => return Err(e.into()),
    };
    let want = expected_chunk_len(h, w.offset())?;
    let w = write_chunk(app, w, body, want).await?;
    // The commit ends the session whatever its outcome.
    let res = app.registry.commit_upload(w, repo, &d).await;
    app.upload_quota.closed(&id);
    res?;
    Ok(blobs::created(repo, &d))
}

/// How long a body nobody needs is read before the connection is given up instead.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads and drops a request body whose bytes the answer does not need: at most `max` bytes
/// and [`DRAIN_TIME`]; past either, the rest is left and hyper closes the connection.
async fn drain(body: Body, max: u64) {
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen = seen.saturating_add(chunk.len() as u64);
            if seen > max {
                break;
            }
        }
    })
    .await;
}

pub async fn cancel(app: &App, repo: &Writable, id: &str) -> ApiResult {
    let id = parse_id(id)?;
    app.registry.cancel_upload(repo, &id).await?;
    app.upload_quota.closed(&id);
    Ok(headers::response(StatusCode::NO_CONTENT, Body::empty()))
}
