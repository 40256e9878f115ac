//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::App;
use super::{headers, Query};
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::manifest::MAX_MANIFEST_BYTES;
use crate::oci::Reference;
use crate::registry::{Outcome, Target, Writable};

pub async fn get(app: &App, target: &Target, r: &Reference, head: bool) -> ApiResult {
    let m = app.registry.manifest(target, r, head).await?;
    let mut resp = headers::response(StatusCode::OK, m.bytes.map_or_else(Body::empty, Body::from));
    headers::content(resp.headers_mut(), &m.digest, &m.media_type, Some(m.size));
    if let Some((outcome, upstream)) = m.outcome {
        headers::outcome(&mut resp, &upstream, "manifest", outcome);
        if matches!(outcome, Outcome::Stale | Outcome::StaleWriteFailed) {
            headers::set(resp.headers_mut(), "warning", headers::STALE_WARNING);
        }
    }
    Ok(resp)
}

/// How much of an oversized manifest body is read and dropped before the 413.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

/// Reads a manifest body, refusing more than [`MAX_MANIFEST_BYTES`].
async fn read_capped(h: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_big = || {
        Code::SizeInvalid
            .with_detail(format!("manifests are limited to {MAX_MANIFEST_BYTES} bytes"))
            .status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let announced = h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if announced.is_some_and(|n| n > MAX_MANIFEST_BYTES as u64 + DRAIN_LIMIT) {
        return Err(too_big());
    }
    let mut buf = BytesMut::new();
    let mut seen = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Code::ManifestInvalid.with_detail(format!("reading the body: {e}")))?;
        seen += chunk.len() as u64;
        if seen > MAX_MANIFEST_BYTES as u64 {
            // Read (and drop) a moderate excess so the client gets to see the 413 instead of a
            // reset; past that, give up on the connection.
            if seen > MAX_MANIFEST_BYTES as u64 + DRAIN_LIMIT {
                break;
            }
            buf.clear();
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if seen > MAX_MANIFEST_BYTES as u64 {
        return Err(too_big());
    }
    Ok(buf.freeze())
}

pub async fn put(app: &App, repo: &Writable, r: &Reference, q: &Query, h: &HeaderMap, body: Body) -> ApiResult {
    let bytes = read_capped(h, body).await?;
    let content_type = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let tags: Vec<&str> = q.all("tag").collect();
    let put = app.registry.put_manifest(repo, r, &bytes, content_type, &tags).await?;
    let mut resp = headers::located(StatusCode::CREATED, &format!("/v2/{repo}/manifests/{}", put.digest));
    headers::set(resp.headers_mut(), headers::DOCKER_CONTENT_DIGEST, &put.digest);
    if let Some(s) = put.subject {
        headers::set(resp.headers_mut(), headers::OCI_SUBJECT, s);
    }
    Ok(resp)
}

pub async fn delete(app: &App, repo: &Writable, r: &Reference) -> ApiResult {
    app.registry.delete_manifest(repo, r).await?;
    Ok(headers::response(StatusCode::ACCEPTED, Body::empty()))
}
