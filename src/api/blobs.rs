//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`: the registry's answer
//! ([`crate::registry::Registry::blob`]) as HTTP.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

use super::headers;
use super::App;
use crate::error::ApiResult;
use crate::oci::Digest;
use crate::registry::{BlobAnswer, BlobBody, Target, Writable};

pub async fn get(app: &App, target: &Target, d: &Digest, req: &HeaderMap, head: bool) -> ApiResult {
    let range = req.get(header::RANGE).and_then(|v| v.to_str().ok());
    let answer = app.registry.blob(target, d, range, head).await?;
    Ok(blob_response(answer))
}

/// The response for a blob answer: its bytes (`Range` honoured), a redirect, or a replica's
/// answer relayed as it is; marked with how a pull through an upstream was answered.
pub(super) fn blob_response(answer: BlobAnswer) -> Response {
    let d = &answer.digest;
    let mut resp = match answer.body {
        BlobBody::Content { partial, start, len, size, stream } => {
            let status = if partial { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
            let body = stream.map_or_else(Body::empty, Body::from_stream);
            let mut resp = headers::response(status, body);
            let h = resp.headers_mut();
            headers::content(h, d, "application/octet-stream", len);
            headers::set(h, "accept-ranges", "bytes");
            if let (true, Some(len), Some(size)) = (partial, len, size) {
                headers::set(h, "content-range", format!("bytes {start}-{}/{size}", start + len - 1));
            }
            resp
        }
        BlobBody::Redirect(url) => {
            let mut r = headers::located(StatusCode::TEMPORARY_REDIRECT, &url);
            headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
            r
        }
        BlobBody::Relayed { status, headers: relayed, stream } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = headers::response(status, Body::from_stream(stream));
            for (name, v) in relayed {
                out.headers_mut().insert(name, v);
            }
            out
        }
    };
    if let Some((outcome, upstream)) = &answer.outcome {
        headers::outcome(&mut resp, upstream, "blob", *outcome);
    }
    resp
}

pub async fn delete(app: &App, repo: &Writable, d: &Digest) -> ApiResult {
    app.registry.delete_blob(repo, d).await?;
    let mut r = headers::response(StatusCode::ACCEPTED, Body::empty());
    headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
    Ok(r)
}

pub fn location(repo: &Writable, d: &Digest) -> String {
    format!("/v2/{repo}/blobs/{d}")
}

/// 201 for a blob that is now in `repo`.
pub fn created(repo: &Writable, d: &Digest) -> Response {
    let mut r = headers::located(StatusCode::CREATED, &location(repo, d));
    headers::set(r.headers_mut(), headers::DOCKER_CONTENT_DIGEST, d);
    r
}
