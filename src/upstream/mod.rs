//! The client side of pull-through: one [`Upstream`] per configured registry, speaking the
//! distribution API with auth, endpoint failover, timeouts and a concurrency cap. Only hosts
//! from the configuration are ever contacted: there is no way to build an `Upstream` from a
//! request.

pub mod auth;
pub mod ca;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamConfig;
use crate::oci::manifest::{DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST};
use crate::oci::{Digest, RepoName, Tag};
use auth::{parse_challenge, realm_allowed, send_following, Challenge, Shared, TokenCache, TokenRequest};
pub use auth::{Check, Token, TokenFleet, Work};

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("not found upstream")]
    NotFound,
    #[error("upstream refused our credentials: {0}")]
    Unauthorized(String),
    #[error("upstream rate limit (429)")]
    RateLimited,
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream sent an invalid answer: {0}")]
    Invalid(String),
    /// The upstream asked us to get a token from a realm the configuration does not allow.
    #[error("upstream's token realm not allowed: {0}")]
    RealmRefused(String),
    /// The registry is offline (`proxy.offline`): no upstream is contacted.
    #[error("not in the cache, and this registry is offline: upstreams are never contacted")]
    Offline,
}

impl UpstreamError {
    /// Trouble on the upstream's side (or between us), as opposed to "it does not exist":
    /// cached content may be served stale.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_)
            | UpstreamError::RateLimited
            | UpstreamError::Unauthorized(_)
            | UpstreamError::RealmRefused(_) => true,
            UpstreamError::Status(s) => *s >= 500,
            UpstreamError::NotFound | UpstreamError::Invalid(_) | UpstreamError::Offline => false,
        }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::NotFound => "not_found",
            UpstreamError::Unauthorized(_) => "unauthorized",
            UpstreamError::RateLimited => "rate_limited",
            UpstreamError::Status(_) => "status",
            UpstreamError::Unreachable(_) => "unreachable",
            UpstreamError::Invalid(_) => "invalid",
            UpstreamError::Offline => "offline",
            UpstreamError::RealmRefused(_) => "realm_refused",
        }
    }
}

pub type UpstreamResult<T> = Result<T, UpstreamError>;

/// A manifest as the upstream describes it.
#[derive(Clone, Debug)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: String,
    pub size: Option<u64>,
}

/// An upstream response being streamed; holds a concurrency permit until dropped.
pub struct Streaming {
    pub resp: reqwest::Response,
    _permit: OwnedSemaphorePermit,
}

pub struct Upstream {
    /// The registry host images are named with, e.g. `docker.io`.
    pub host: String,
    /// `host` shared: every cached repository's name holds it (no copy per request).
    pub shared_host: Arc<str>,
    pub aliases: Vec<String>,
    /// First component of the cache namespace (the host, `:` made `-`), e.g. `docker.io`.
    pub namespace: String,
    pub tag_ttl: Duration,
    immutable_tags: Vec<String>,
    endpoints: Vec<Url>,
    /// Origins besides the endpoints' hosts whose token realms may get the credentials.
    token_realms: Vec<Url>,
    creds: Option<(String, String)>,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    tokens: TokenCache,
    /// The fleet this replica belongs to (tokens are shared through it), once set.
    cluster: std::sync::OnceLock<Arc<dyn TokenFleet>>,
    /// The upstream asked for Basic auth once: send credentials with every request.
    wants_basic: AtomicBool,
    /// `proxy.offline`: every request fails with [`UpstreamError::Offline`] before it is sent.
    pub offline: bool,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> anyhow::Result<Upstream> {
        let endpoints =
            if cfg.endpoints.is_empty() { vec![format!("https://{}", cfg.host)] } else { cfg.endpoints.clone() };
        // User info in an endpoint (`https://user:pw@host`) becomes the credentials (unless
        // `username` is set) and leaves the URL, so no URL we print or send carries it.
        let mut url_creds = None;
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let mut u = Url::parse(e.trim_end_matches('/')).map_err(|err| {
                    anyhow::anyhow!("upstream {}: endpoint {}: {err}", cfg.host, crate::config::redact_url(e))
                })?;
                if !u.username().is_empty() || u.password().is_some() {
                    let dec = |s: &str| form_urlencoded_decode(s);
                    url_creds.get_or_insert((dec(u.username()), dec(u.password().unwrap_or_default())));
                    let _ = u.set_username("");
                    let _ = u.set_password(None);
                }
                Ok(u)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut token_realms = cfg
            .token_realms
            .iter()
            .map(|r| {
                Url::parse(r).map_err(|err| {
                    anyhow::anyhow!("upstream {}: token realm {}: {err}", cfg.host, crate::config::redact_url(r))
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if cfg.host == "docker.io" {
            token_realms.push(Url::parse("https://auth.docker.io").expect("a URL"));
        }
        let password = crate::config::read_secret("password", &cfg.password, &cfg.password_file, &cfg.password_env)
            .map_err(|e| anyhow::anyhow!("upstream {}: {e}", cfg.host))?;
        let creds = cfg.username.clone().map(|u| (u, password.unwrap_or_default())).or(url_creds);
        let extra_roots = match &cfg.ca_file {
            Some(f) => ca::load_ca_file(f)
                .map_err(|e| anyhow::anyhow!("upstream {}: ca_file {}: {e}", cfg.host, f.display()))?,
            None => Vec::new(),
        };
        // reqwest is built without a crypto provider (rustls-no-provider): use ring. Installing
        // twice (several upstreams, tests) is fine: the first one wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.read_timeout)
            // Redirects (blob GETs to CDNs) are followed by hand, `auth::send_following`:
            // reqwest's policy would put Authorization back on a second hop within the CDN.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("stevedore/", env!("CARGO_PKG_VERSION")))
            // Trusted besides the system roots (the platform verifier), not instead of them:
            // a token realm or a blob redirect may be on a public host.
            .tls_certs_merge(extra_roots)
            .build()
            .map_err(|e| anyhow::anyhow!("upstream {}: HTTP client: {}", cfg.host, error_chain(&e)))?;
        Ok(Upstream {
            host: cfg.host.clone(),
            shared_host: cfg.host.as_str().into(),
            aliases: cfg.aliases.clone(),
            namespace: cfg.host.replace(':', "-"),
            tag_ttl: cfg.tag_ttl,
            immutable_tags: cfg.immutable_tags.clone(),
            endpoints,
            token_realms,
            creds,
            http,
            permits: Arc::new(Semaphore::new(cfg.max_concurrency)),
            tokens: TokenCache::default(),
            cluster: std::sync::OnceLock::new(),
            wants_basic: AtomicBool::new(false),
            offline: false,
        })
    }

    /// Shares this upstream's tokens with the other replicas of `cluster` (first call wins).
    pub fn set_cluster(&self, cluster: impl TokenFleet + 'static) {
        let _ = self.cluster.set(Arc::new(cluster));
    }

    /// Where the token of `key` is shared with the fleet, when there is one.
    fn shared(&self, key: &str) -> Option<Shared> {
        let c = self.cluster.get().filter(|c| c.coordinated())?;
        Some(Shared::new(c.clone(), &self.host, key, self.creds.as_ref().map(|(u, _)| u.as_str())))
    }

    /// Whether `tag` matches one of the configured immutable patterns.
    pub fn is_immutable(&self, tag: &Tag) -> bool {
        self.immutable_tags.iter().any(|p| crate::oci::glob::matches(p, tag.as_str()))
    }

    /// Sends one request to the first endpoint that answers, authenticating on a 401
    /// challenge. 2xx and 3xx-resolved answers come back; everything else is an error.
    async fn send(&self, method: Method, path: &str, remote: &str, accept: Option<&str>) -> UpstreamResult<Streaming> {
        if self.offline {
            return Err(UpstreamError::Offline);
        }
        let started = std::time::Instant::now();
        let span = crate::trace_span!(
            "upstream request",
            otel.kind = "client",
            upstream = %self.host,
            http.request.method = %method,
            url.path = %path,
            error = tracing::field::Empty,
        );
        let res = tracing::Instrument::instrument(self.send_inner(method, path, remote, accept), span.clone()).await;
        if let Err(e) = &res {
            span.record("error", e.kind());
        }
        crate::metrics::upstream_request(&self.host, started.elapsed());
        if let Err(e) = &res {
            crate::metrics::upstream_error(&self.host, e.kind());
            if matches!(e, UpstreamError::RateLimited) {
                crate::metrics::upstream_ratelimited(&self.host);
            }
        }
        // For `/status`: reached (any answer but a 5xx) or not, and the last error.
        let reached = match &res {
            Ok(_) => true,
            Err(UpstreamError::Unreachable(_)) => false,
            Err(UpstreamError::Status(s)) => *s < 500,
            Err(_) => true,
        };
        let error = res.as_ref().err().filter(|e| !matches!(e, UpstreamError::NotFound)).map(|e| e.to_string());
        crate::metrics::upstream_reachable(&self.host, reached);
        crate::status::get().upstream_result(&self.host, reached, error);
        res
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        remote: &str,
        accept: Option<&str>,
    ) -> UpstreamResult<Streaming> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| UpstreamError::Unreachable("shutting down".into()))?;
        let scope = format!("repository:{remote}:pull");
        let mut last = UpstreamError::Unreachable("no endpoint".into());
        for base in &self.endpoints {
            let url = format!("{}{path}", base.as_str().trim_end_matches('/'));
            let mut auth: Option<String> = match self.basic_auth() {
                Some(b) if self.wants_basic.load(Ordering::Relaxed) => Some(b),
                _ => self.tokens.cached(&self.token_key(base, &scope)).await.map(|t| format!("Bearer {}", t.value)),
            };
            for attempt in 0..2 {
                let target = match Url::parse(&url) {
                    Ok(u) => u,
                    Err(e) => return Err(UpstreamError::Invalid(format!("{url}: {e}"))),
                };
                let resp = match send_following(&self.http, method.clone(), target, accept, auth.as_deref()).await {
                    Ok(r) => r,
                    Err(e) => {
                        last = UpstreamError::Unreachable(e);
                        break;
                    }
                };
                let status = resp.status();
                if let Some(rl) = resp.headers().get("ratelimit-remaining").and_then(|v| v.to_str().ok()) {
                    crate::metrics::ratelimit_remaining(&self.host, rl);
                }
                if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                    let challenge =
                        resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(parse_challenge);
                    match challenge {
                        Some(Challenge::Bearer { realm, service, .. }) => {
                            // Checked before anything is sent there (GHSA-3p65-76g6-3w7r).
                            let realm =
                                realm_allowed(base, &realm, &self.token_realms).map_err(UpstreamError::RealmRefused)?;
                            let key = self.token_key(base, &scope);
                            let shared = self.shared(&key);
                            if auth.is_some() {
                                // The upstream no longer accepts the token we had cached.
                                self.tokens.forget(&key, shared.as_ref()).await;
                                crate::status::get().token(&self.host, &scope, None);
                            }
                            let token = self
                                .tokens
                                .fetch(
                                    &self.http,
                                    &key,
                                    TokenRequest {
                                        realm: &realm,
                                        service: service.as_deref(),
                                        scope: &scope,
                                        creds: self.creds.as_ref(),
                                        upstream: &self.host,
                                        shared: shared.as_ref(),
                                    },
                                )
                                .await
                                .map_err(UpstreamError::Unauthorized)?;
                            crate::status::get().token(&self.host, &scope, Some(token.expires));
                            auth = Some(format!("Bearer {}", token.value));
                            continue;
                        }
                        Some(Challenge::Basic) if self.creds.is_some() => {
                            // Send it up front from now on: one request instead of two.
                            self.wants_basic.store(true, Ordering::Relaxed);
                            auth = self.basic_auth();
                            continue;
                        }
                        _ => return Err(UpstreamError::Unauthorized(format!("{url}: no usable challenge"))),
                    }
                }
                if status.is_success() {
                    return Ok(Streaming { resp, _permit: permit });
                }
                let err = match status {
                    StatusCode::NOT_FOUND => UpstreamError::NotFound,
                    StatusCode::TOO_MANY_REQUESTS => UpstreamError::RateLimited,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        UpstreamError::Unauthorized(format!("{url}: HTTP {status}"))
                    }
                    s => UpstreamError::Status(s.as_u16()),
                };
                if !err.is_outage() || matches!(err, UpstreamError::RateLimited | UpstreamError::Unauthorized(_)) {
                    return Err(err);
                }
                last = err; // 5xx: try the next endpoint
                break;
            }
        }
        Err(last)
    }

    fn basic_auth(&self) -> Option<String> {
        let (u, p) = self.creds.as_ref()?;
        Some(auth::basic_auth(u, p))
    }

    fn token_key(&self, base: &Url, scope: &str) -> String {
        format!("{base} {scope}")
    }

    pub async fn manifest_head(&self, remote: &RepoName, reference: &str) -> UpstreamResult<ManifestHead> {
        let s = self
            .send(Method::HEAD, &format!("/v2/{remote}/manifests/{reference}"), remote.as_str(), Some(MANIFEST_ACCEPT))
            .await?;
        Ok(manifest_head(s.resp.headers()))
    }

    /// GETs a manifest (at most [`MAX_MANIFEST_BYTES`]).
    pub async fn manifest_get(&self, remote: &RepoName, reference: &str) -> UpstreamResult<(ManifestHead, Bytes)> {
        let s = self
            .send(Method::GET, &format!("/v2/{remote}/manifests/{reference}"), remote.as_str(), Some(MANIFEST_ACCEPT))
            .await?;
        let head = manifest_head(s.resp.headers());
        let body = read_capped(s.resp, MAX_MANIFEST_BYTES).await?;
        crate::metrics::upstream_bytes(&self.host, body.len() as u64);
        Ok((head, body))
    }

    /// The size of a blob upstream.
    pub async fn blob_head(&self, remote: &RepoName, d: &Digest) -> UpstreamResult<Option<u64>> {
        let s = self.send(Method::HEAD, &format!("/v2/{remote}/blobs/{d}"), remote.as_str(), None).await?;
        Ok(content_length(s.resp.headers()))
    }

    /// Starts streaming a blob.
    pub async fn blob_get(&self, remote: &RepoName, d: &Digest) -> UpstreamResult<Streaming> {
        self.send(Method::GET, &format!("/v2/{remote}/blobs/{d}"), remote.as_str(), None).await
    }

    /// A JSON listing (tags list, referrers) with its `Content-Type`.
    pub async fn get_json(&self, remote: &RepoName, path_and_query: &str) -> UpstreamResult<(Option<String>, Bytes)> {
        let s = self.send(Method::GET, path_and_query, remote.as_str(), None).await?;
        let ct = s.resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok((ct, read_capped(s.resp, MAX_MANIFEST_BYTES).await?))
    }
}

/// Percent-decodes user info taken from a URL.
fn form_urlencoded_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An error with its sources: reqwest's "error sending request" alone does not say what went
/// wrong (refused, timed out, a certificate not trusted).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok())
}

fn manifest_head(h: &HeaderMap) -> ManifestHead {
    let media_type = h
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
        .filter(|t| [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&t.as_str()))
        .unwrap_or_default();
    ManifestHead {
        digest: h.get("docker-content-digest").and_then(|v| v.to_str().ok()?.parse().ok()),
        media_type,
        size: content_length(h),
    }
}

async fn read_capped(resp: reqwest::Response, cap: usize) -> UpstreamResult<Bytes> {
    if content_length(resp.headers()).is_some_and(|n| n > cap as u64) {
        return Err(UpstreamError::Invalid(format!("body larger than {cap} bytes")));
    }
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::Unreachable(format!("reading body: {e}")))?;
        if buf.len() + chunk.len() > cap {
            return Err(UpstreamError::Invalid(format!("body larger than {cap} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_is_loaded_and_a_bad_one_names_upstream_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca::tests::ca_pem("private CA")).unwrap();
        let cfg = |f: &std::path::Path| UpstreamConfig {
            host: "registry.internal".into(),
            endpoints: vec!["https://127.0.0.1:9".into()],
            ca_file: Some(f.to_path_buf()),
            ..UpstreamConfig::default()
        };
        Upstream::new(&cfg(&good)).unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        for f in [empty, dir.path().join("missing.pem")] {
            let e = Upstream::new(&cfg(&f)).err().expect("a bad ca_file accepted").to_string();
            assert!(e.contains("upstream registry.internal: ca_file"), "{e}");
            assert!(e.contains(&f.display().to_string()), "{e}");
        }
    }

    #[test]
    fn outage_kinds() {
        assert!(UpstreamError::Status(503).is_outage());
        assert!(UpstreamError::RateLimited.is_outage());
        assert!(!UpstreamError::NotFound.is_outage());
        assert!(!UpstreamError::Status(400).is_outage());
    }
}
