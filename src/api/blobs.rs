//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use super::{headers, upstream_error};
use crate::app::App;
use crate::cluster::Holder;
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::range::{parse_range, RangeRequest};
use crate::oci::Digest;
use crate::proxy::fill::{Fill, FillError};
use crate::proxy::{BlobSource, Outcome, ProxyRepo, Target};
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
    let span = crate::trace_span!("store read", digest = %d, bytes = size);
    tracing::Instrument::instrument(serve_content(app, d, size, req, head), span).await
}

/// Committed content of `size` bytes, `Range` honoured.
async fn serve_content(app: &App, d: &Digest, size: u64, req: &HeaderMap, head: bool) -> ApiResult {
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

/// Whether `d` is served from `p`'s cache: linked there, or stored through another
/// repository and linked now that the upstream says it has it in `p`'s.
async fn cached(app: &App, p: &ProxyRepo, d: &Digest) -> Result<bool, ApiError> {
    if app.store.repo_blob_size(&p.cache, d).await?.is_some() {
        return Ok(true);
    }
    if app.store.blob_size(d).await?.is_some() && upstream_has(app, p, d).await? {
        // Content-addressed: the same bytes arrived through another repository, and the
        // upstream serves them in this one.
        // Linked only if the content is still there (the backend's word, under its guard).
        if app.store.link_blob(&p.cache, d).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// How many leaders a request tries before it gives up (each failure waits for the lease to
/// be let go, so a takeover follows).
const PEER_ROUNDS: usize = 3;

/// A blob in an upstream's namespace: from the cache, else from the fill (started or joined;
/// in a fleet, the fill of whichever replica holds the digest's lease).
async fn get_proxied(app: &App, p: &ProxyRepo, d: &Digest, req: &HeaderMap, head: bool) -> ApiResult {
    if cached(app, p, d).await? {
        return hit(app, p, d, req, head).await;
    }
    if head {
        let size = app.proxy.blob_head(p, d).await.map_err(|e| upstream_error(&e, Code::BlobUnknown))?;
        let Some(size) = size else { return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string())) };
        let mut resp = blob_response(d, StatusCode::OK, 0, Some(size), Some(size), Body::empty());
        headers::outcome(&mut resp, &p.upstream.host, "blob", Outcome::Miss);
        return Ok(resp);
    }
    let lease = crate::cluster::fill_lease(d);
    let mut gone: Option<Holder> = None;
    for _ in 0..PEER_ROUNDS {
        let source = app.proxy.blob_source(&app.store, p, d, gone.as_ref()).await.map_err(fill_error)?;
        let leader = match source {
            BlobSource::Fill(fill, leader) => {
                // Another repository's fill: its bytes are this repository's only if the
                // upstream serves the digest here too (the check stored content gets).
                if fill.repo() != &p.cache && !upstream_has(app, p, d).await? {
                    return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
                }
                let mut resp = fill_response(d, fill, req).await?;
                let outcome = if leader { Outcome::Miss } else { Outcome::Joined };
                headers::outcome(&mut resp, &p.upstream.host, "blob", outcome);
                return Ok(resp);
            }
            BlobSource::Stored => {
                if !cached(app, p, d).await? {
                    return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
                }
                return hit(app, p, d, req, false).await;
            }
            BlobSource::Peer(h) => h,
        };
        let mut relayed = from_peer(app, &leader, p, d, req, false).await;
        if let Ok(Relay::OtherRepository) = relayed {
            // The leader fills (or stored) it through another repository: the upstream must
            // serve it in this one before its bytes are relayed here.
            if !upstream_has(app, p, d).await? {
                return Err(ApiError::new(Code::BlobUnknown).detail(d.to_string()));
            }
            relayed = from_peer(app, &leader, p, d, req, true).await;
        }
        match relayed {
            Ok(Relay::OtherRepository) => {
                tracing::warn!(digest = %d, leader = %leader.replica, peer = %leader.advertise, "a replica refused a relay the upstream check allowed; taking the fill over once its lease is let go");
            }
            Ok(Relay::Response(mut resp)) => {
                crate::metrics::cluster_peer_stream();
                headers::outcome(&mut resp, &p.upstream.host, "blob", Outcome::Peer);
                return Ok(resp);
            }
            Err(why) => {
                tracing::warn!(digest = %d, leader = %leader.replica, peer = %leader.advertise, why = %why, "the replica filling a blob cannot serve it; taking the fill over once its lease is let go");
            }
        }
        // Committed meanwhile, or wait for the lease to expire (its holder died) or pass on.
        if cached(app, p, d).await? {
            return hit(app, p, d, req, false).await;
        }
        let limit = app.cluster.lease_ttl() + std::time::Duration::from_secs(2);
        app.cluster.wait_not_held_by(&lease, &leader, limit).await;
        gone = Some(leader);
    }
    Err(fill_error(FillError::Busy(format!("no replica could fill {d}"))))
}

/// `d` from `p`'s cache (see [`cached`]), marked a hit.
async fn hit(app: &App, p: &ProxyRepo, d: &Digest, req: &HeaderMap, head: bool) -> ApiResult {
    let mut resp = get_local(app, &p.cache, d, req, head).await?;
    headers::outcome(&mut resp, &p.upstream.host, "blob", Outcome::Hit);
    Ok(resp)
}

/// A fill that could not start, as the client sees it.
fn fill_error(e: FillError) -> ApiError {
    match e {
        FillError::Upstream(u) => upstream_error(&u, Code::BlobUnknown),
        // The local store's trouble is never blamed on the upstream.
        FillError::Store(s) if s.is_full() => super::store_full(&s),
        FillError::Store(s) => ApiError::internal(s),
        FillError::Busy(why) => ApiError::new(Code::Unavailable).detail(why).header(header::RETRY_AFTER, 1),
        e => ApiError::new(Code::Unavailable).status(StatusCode::BAD_GATEWAY).detail(e.to_string()),
    }
}

/// The response streaming `fill` (once the upstream answered), `Range` honoured. Every
/// reader's last byte waits for the verification.
async fn fill_response(d: &Digest, fill: Arc<Fill>, req: &HeaderMap) -> ApiResult {
    let size = fill.started().await.map_err(fill_error)?;
    let (status, start, end) = match size.map(|s| (s, range_of(req, s))) {
        Some((s, RangeRequest::Unsatisfiable)) => return Err(unsatisfiable(s)),
        Some((_, RangeRequest::Partial(r))) => (StatusCode::PARTIAL_CONTENT, r.start, Some(r.end + 1)),
        _ => (StatusCode::OK, 0, None),
    };
    let len = end.or(size).map(|e| e - start);
    let body = Body::from_stream(fill.read(start, end));
    Ok(blob_response(d, status, start, len, size, body))
}

/// What a replica's fill endpoint answered, in [`PEER_SOURCE`]: the bytes from its fill
/// (`fill`) or its store (`stored`); an answer for the client as it is (`error`: the fill
/// failed upstream, an unsatisfiable range); or `none`: it has neither.
pub(crate) const PEER_SOURCE: &str = "x-stevedore-peer";

/// Headers of a peer's answer the client gets as they are.
const RELAYED: [&str; 7] = [
    "content-length",
    "content-range",
    "content-type",
    headers::DOCKER_CONTENT_DIGEST,
    "etag",
    "accept-ranges",
    "retry-after",
];

/// [`PEER_SOURCE`] of a replica's refusal: its fill (or stored copy) of the digest is not
/// known to be the asking repository's; the asker checks the upstream and asks again.
const OTHER_REPOSITORY: &str = "other-repository";

/// A replica's answer to a relay request ([`from_peer`]).
enum Relay {
    /// For the client as it is: the blob's bytes, or an error.
    Response(Response),
    /// [`OTHER_REPOSITORY`]: ask again, `checked`, once the upstream said it has the blob in
    /// the asking repository.
    OtherRepository,
}

/// The repository of a relay request (`?host=<upstream host>&name=<repository>`, the cache
/// repository the client asked in) and whether the asking replica checked that the upstream
/// has the digest there (`checked=1`).
pub(crate) struct PeerAsk {
    pub repo: Repo,
    pub checked: bool,
}

impl PeerAsk {
    /// From a relay request's query; `None` without a valid repository (a replica of an
    /// older version): such a request gets [`OTHER_REPOSITORY`] and nothing is relayed.
    pub(crate) fn from_query(query: Option<&str>) -> Option<PeerAsk> {
        let (mut host, mut name, mut checked) = (None, None, false);
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "host" => host = Some(v.into_owned()),
                "name" => name = Some(v.into_owned()),
                "checked" => checked = v == "1",
                _ => {}
            }
        }
        let host = host.filter(|h| !h.is_empty() && !h.contains('/') && h != "." && h != "..")?;
        let name = name?.parse().ok()?;
        Some(PeerAsk { repo: Repo::cache(&host, name), checked })
    }
}

/// Relays the leader's stream of `d` (`GET <advertise>/_stevedore/cluster/fill/<digest>`,
/// `Range` passed on, `p`'s cache repository named): the body flows through as it arrives,
/// never buffered; a stream that breaks breaks the client's. [`Relay::OtherRepository`]
/// when the leader's copy is another repository's and `checked` is false. `Err` (why) when
/// the leader cannot serve it: unreachable, it has no such fill, or it answered something
/// else than a blob or an error for the client.
async fn from_peer(
    app: &App,
    leader: &Holder,
    p: &ProxyRepo,
    d: &Digest,
    req: &HeaderMap,
    checked: bool,
) -> Result<Relay, String> {
    use futures::TryStreamExt;
    let path = format!("{}/fill/{d}", crate::cluster::PEER_PREFIX);
    let Repo::Cache { host, name } = &p.cache else { return Err("not a cache repository".into()) };
    let mut query = vec![("host", host.to_string()), ("name", name.to_string())];
    if checked {
        query.push(("checked", "1".into()));
    }
    let mut rb = app.cluster.peer_request(reqwest::Method::GET, leader, &path).query(&query);
    if let Some(r) = req.get(header::RANGE) {
        rb = rb.header(header::RANGE, r.clone());
    }
    let resp = rb.send().await.map_err(|e| format!("unreachable: {}", crate::upstream::error_chain(&e)))?;
    let status = resp.status();
    let source = resp.headers().get(PEER_SOURCE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if source == OTHER_REPOSITORY && !checked {
        return Ok(Relay::OtherRepository);
    }
    let bytes =
        matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT) && matches!(source.as_str(), "fill" | "stored");
    if !bytes && source != "error" {
        return Err(format!(
            "answered {status} ({})",
            if source.is_empty() { "not a replica's answer" } else { &source }
        ));
    }
    if bytes && resp.headers().get(headers::DOCKER_CONTENT_DIGEST).and_then(|v| v.to_str().ok()) != Some(&d.to_string())
    {
        return Err("answered another digest".into());
    }
    let mut out = headers::response(status, Body::empty());
    for name in RELAYED {
        if let Some(v) = resp.headers().get(name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    if bytes && status == StatusCode::OK {
        *out.body_mut() = Body::from_stream(verified_relay(d.clone(), resp.bytes_stream()));
    } else if bytes {
        // A range cannot be hashed against the digest: the leader holds its last byte back
        // until it verified the whole blob, as for its own clients.
        *out.body_mut() = Body::from_stream(resp.bytes_stream().map_err(std::io::Error::other));
    } else {
        // An error body: small, read whole (bounded).
        if resp.content_length().is_some_and(|n| n > 64 << 10) {
            return Err(format!("answered {status} with a large error body"));
        }
        let body = resp.bytes().await.map_err(|e| format!("reading its answer: {e}"))?;
        *out.body_mut() = Body::from(body);
    }
    Ok(Relay::Response(out))
}

/// A peer's whole blob, verified on its way through: hashed as it passes, its last chunk held
/// back until the digest matched, so a client never receives a complete response of bytes
/// that are not the blob; on a mismatch (or a broken stream) the client's stream breaks.
fn verified_relay(
    d: Digest,
    body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    use futures::StreamExt;
    let hasher = Some(crate::oci::Hasher::new(d.algorithm()));
    // (body, hasher — `None` once the stream ended or broke, the chunk held back)
    let state = (Box::pin(body), hasher, None::<bytes::Bytes>);
    futures::stream::unfold(state, move |(mut body, hasher, mut held)| {
        let d = d.clone();
        async move {
            let mut hasher = hasher?;
            loop {
                match body.next().await {
                    Some(Ok(b)) if b.is_empty() => {}
                    Some(Ok(b)) => {
                        hasher.update(&b);
                        if let Some(prev) = held.replace(b) {
                            return Some((Ok(prev), (body, Some(hasher), held)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(std::io::Error::other(e)), (body, None, None))),
                    None => {
                        let got = hasher.finish();
                        if got != d {
                            tracing::warn!(digest = %d, got = %got, "a peer's relayed blob does not match its digest; the client's stream is cut");
                            crate::metrics::cluster_relay_mismatch();
                            let e = std::io::Error::other("the relayed bytes do not match the digest");
                            return Some((Err(e), (body, None, None)));
                        }
                        return held.take().map(|b| (Ok(b), (body, None, None)));
                    }
                }
            }
        }
    })
}

/// `GET /_stevedore/cluster/fill/<digest>?host=…&name=…[&checked=1]` (a replica's request,
/// secret checked): the blob from this replica's fill while it runs (the last byte after the
/// verification, as for local followers), else from the store; 404 with `x-stevedore-peer:
/// none` when it has neither. As for a local request: a fill of another repository, or
/// content not linked in the asking one, is served only `checked` (the asking replica found
/// the upstream has it there); else 404 with `x-stevedore-peer: other-repository`.
pub(crate) async fn serve_peer(app: &App, d: &Digest, ask: Option<PeerAsk>, req: &HeaderMap) -> Response {
    // A request of this replica may be claiming the lease right now: its fill is coming.
    app.proxy.fills.wait_claim(d, app.cluster.lease_ttl()).await;
    let none = || {
        let mut r = ApiError::new(Code::BlobUnknown).detail("no fill of it on this replica").into_response();
        headers::set(r.headers_mut(), PEER_SOURCE, "none");
        r
    };
    let other = || {
        let mut r =
            ApiError::new(Code::BlobUnknown).detail("this replica has it through another repository").into_response();
        headers::set(r.headers_mut(), PEER_SOURCE, OTHER_REPOSITORY);
        r
    };
    let Some(ask) = ask else { return other() };
    let res = match app.proxy.fills.get(d) {
        Some(fill) if fill.repo() != &ask.repo && !ask.checked => return other(),
        Some(fill) => fill_response(d, fill, req).await.map(|r| (r, "fill")),
        None => match app.store.blob_size(d).await {
            Ok(Some(_)) if !ask.checked && !matches!(app.store.repo_blob_size(&ask.repo, d).await, Ok(Some(_))) => {
                return other()
            }
            Ok(Some(size)) => match serve_content(app, d, size, req, false).await {
                Err(e) if e.code == Code::BlobUnknown => return none(),
                r => r.map(|r| (r, "stored")),
            },
            Ok(None) => return none(),
            Err(e) => Err(ApiError::from(e)),
        },
    };
    match res {
        Ok((mut r, source)) => {
            crate::metrics::cluster_peer_served();
            headers::set(r.headers_mut(), PEER_SOURCE, source);
            r
        }
        Err(e) => {
            let mut r = e.into_response();
            headers::set(r.headers_mut(), PEER_SOURCE, "error");
            r
        }
    }
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
