//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{headers, proxy_error, Query};
use crate::app::App;
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::manifest::{self, MAX_MANIFEST_BYTES};
use crate::oci::{Algorithm, Digest, Reference, Tag};
use crate::proxy::{Outcome, ProxyRepo, Target};
use crate::storage::{ManifestPut, Repo, StoredManifest};

fn unknown(r: &Reference) -> ApiError {
    ApiError::new(Code::ManifestUnknown).detail(r.to_string())
}

/// The digest a reference names in `repo`.
async fn resolve(app: &App, repo: &Repo, r: &Reference) -> Result<Digest, ApiError> {
    match r {
        Reference::Digest(d) => Ok(d.clone()),
        Reference::Tag(t) => app.store.resolve_tag(repo, t).await?.ok_or_else(|| unknown(r)),
    }
}

pub async fn get(app: &App, target: &Target, r: &Reference, head: bool) -> ApiResult {
    match target {
        Target::Local(name) => get_local(app, &Repo::Local(name.clone()), r, head).await,
        Target::Proxy { repo, .. } => get_proxied(app, repo, r, head).await,
    }
}

async fn get_local(app: &App, repo: &Repo, r: &Reference, head: bool) -> ApiResult {
    let d = resolve(app, repo, r).await?;
    let info = app.store.manifest_info(repo, &d).await?.ok_or_else(|| unknown(r))?;
    serve(app, info, r, head).await
}

/// The response for a manifest found in the store (`r`: how the client named it).
async fn serve(app: &App, info: StoredManifest, r: &Reference, head: bool) -> ApiResult {
    let body = if head {
        Body::empty()
    } else {
        Body::from(app.store.manifest_bytes(&info).await?.ok_or_else(|| unknown(r))?)
    };
    let mut resp = headers::response(StatusCode::OK, body);
    headers::content(resp.headers_mut(), &info.digest, &info.media_type, Some(info.size));
    Ok(resp)
}

/// Fills the cache from the upstream when needed, then serves from the cache.
async fn get_proxied(app: &App, p: &ProxyRepo, r: &Reference, head: bool) -> ApiResult {
    let (d, outcome, stored) =
        app.proxy.manifest(&app.store, p, r).await.map_err(|e| proxy_error(&e, Code::ManifestUnknown))?;
    let by_digest = Reference::Digest(d);
    let mut resp = match stored {
        // A hit: the cache's record was just read.
        Some(info) => serve(app, info, &by_digest, head).await?,
        None => get_local(app, &p.cache, &by_digest, head).await?,
    };
    headers::outcome(&mut resp, &p.upstream.host, "manifest", outcome);
    if matches!(outcome, Outcome::Stale | Outcome::StaleWriteFailed) {
        headers::set(resp.headers_mut(), "warning", headers::STALE_WARNING);
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

pub async fn put(app: &App, repo: &Repo, r: &Reference, q: &Query, h: &HeaderMap, body: Body) -> ApiResult {
    let bytes = read_capped(h, body).await?;
    let content_type = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let m = manifest::parse(&bytes, content_type).map_err(|e| Code::ManifestInvalid.with_detail(e.0))?;
    let digest = match r {
        Reference::Digest(want) => {
            let got = Digest::of(want.algorithm(), &bytes);
            if &got != want {
                return Err(Code::DigestInvalid.with_detail(format!("manifest digest is {got}, not {want}")));
            }
            got
        }
        Reference::Tag(_) => Digest::of(Algorithm::Sha256, &bytes),
    };
    let mut tags: Vec<Tag> = Vec::new();
    if let Reference::Tag(t) = r {
        tags.push(t.clone());
    }
    for t in q.all("tag") {
        tags.push(t.parse().map_err(|e: crate::oci::name::TagError| Code::TagInvalid.with_detail(e.to_string()))?);
    }
    let subject = m.subject.as_ref().map(|s| s.digest.clone());
    let referrer = subject.as_ref().map(|s| (s, m.referrer_descriptor(&digest, bytes.len() as u64)));
    // What it requires is checked and the manifest stored under the digests' guards: nothing
    // it needs can be collected in between.
    let put = ManifestPut { media_type: &m.media_type, bytes: &bytes, digest: &digest, tags: &tags, referrer };
    if let Err(missing) = app.store.put_manifest_checked(repo, put, &m.required()).await? {
        return Err(Code::ManifestBlobUnknown.with_detail(serde_json::json!({ "digest": missing.to_string() })));
    }
    let mut resp = headers::located(StatusCode::CREATED, &format!("/v2/{repo}/manifests/{digest}"));
    headers::set(resp.headers_mut(), headers::DOCKER_CONTENT_DIGEST, &digest);
    if let Some(s) = subject {
        headers::set(resp.headers_mut(), headers::OCI_SUBJECT, s);
    }
    Ok(resp)
}

pub async fn delete(app: &App, repo: &Repo, r: &Reference) -> ApiResult {
    match r {
        Reference::Tag(t) => {
            if !app.store.delete_tag(repo, t).await? {
                return Err(unknown(r));
            }
        }
        Reference::Digest(d) => {
            let (info, bytes) = app.store.read_manifest(repo, d).await?.ok_or_else(|| unknown(r))?;
            let subject =
                manifest::parse(&bytes, Some(&info.media_type)).ok().and_then(|m| m.subject).map(|s| s.digest);
            app.store.delete_manifest(repo, d, subject.as_ref()).await?;
        }
    }
    Ok(headers::response(StatusCode::ACCEPTED, Body::empty()))
}
