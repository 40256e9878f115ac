//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.

use std::io::SeekFrom;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::headers;
use crate::app::App;
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::range::{parse_range, RangeRequest};
use crate::oci::{Digest, RepoName};

/// Read size when streaming a blob from disk (256 KiB measured ~2× faster than 64 KiB).
pub const READ_CHUNK: usize = 256 * 1024;

pub async fn get(app: &App, repo: &RepoName, d: &Digest, req: &HeaderMap, head: bool) -> ApiResult {
    let Some(size) = app.store.repo_blob_size(repo, d).await? else {
        return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
    };
    let range = match req.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => parse_range(r, size),
        None => RangeRequest::Full,
    };
    let (status, start, len) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, size),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.len()),
        RangeRequest::Unsatisfiable => {
            return Err(ApiError::new(Code::RangeInvalid)
                .detail(format!("blob has {size} bytes"))
                .header(header::CONTENT_RANGE, format!("bytes */{size}")));
        }
    };
    let body = if head {
        Body::empty()
    } else {
        let Some((mut file, _)) = app.store.open_blob(d).await? else {
            return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
        };
        if start > 0 {
            file.seek(SeekFrom::Start(start)).await.map_err(ApiError::internal)?;
        }
        Body::from_stream(ReaderStream::with_capacity(file.take(len), READ_CHUNK))
    };
    let mut resp = headers::response(status, body);
    let h = resp.headers_mut();
    headers::content(h, d, "application/octet-stream", len);
    headers::set(h, "accept-ranges", "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        headers::set(h, "content-range", format!("bytes {start}-{}/{size}", start + len - 1));
    }
    Ok(resp)
}

pub async fn delete(app: &App, repo: &RepoName, d: &Digest) -> ApiResult {
    if !app.store.unlink_blob(repo, d).await? {
        return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
    }
    let mut r = headers::response(StatusCode::ACCEPTED, Body::empty());
    headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
    Ok(r)
}

pub fn location(repo: &RepoName, d: &Digest) -> String {
    format!("/v2/{repo}/blobs/{d}")
}

/// 201 for a blob that is now in `repo`.
pub fn created(repo: &RepoName, d: &Digest) -> Response {
    let mut r = headers::located(StatusCode::CREATED, &location(repo, d));
    headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
    r
}
