//! Pull-through: maps a request onto an upstream namespace and serves it from the local
//! cache, filling the cache from the upstream on a miss.
//!
//! Namespaces: a request names its upstream by `?ns=<host>` (containerd) or a path prefix
//! `/v2/<host>/…` (podman, CRI-O); with neither, local repositories are looked up first and
//! the default upstream fills what is missing (docker `registry-mirrors`). Pulled content is
//! stored under `<host>/<repository>` in every case, so all dialects share one cache. A host
//! that is not configured is never contacted.

pub mod fill;
pub mod flight;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;

use crate::config::Config;
use crate::oci::manifest;
use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag};
use crate::storage::{ManifestPut, Repo, Store, StoreError};
use crate::upstream::{Upstream, UpstreamError, UpstreamResult};
use fill::{FillRequest, Fills};
use flight::Flights;

/// An upstream repository and where its content is cached.
#[derive(Clone)]
pub struct ProxyRepo {
    pub upstream: Arc<Upstream>,
    /// The repository's name at the upstream (`library/nginx`).
    pub remote: RepoName,
    /// Where it is cached locally (shown as `docker.io/library/nginx`; a tree of its own).
    pub cache: Repo,
}

/// Where a request's repository lives.
#[derive(Clone)]
pub enum Target {
    /// A local repository only.
    Local(RepoName),
    /// An upstream's namespace, named by `ns` or a path prefix: read-only.
    Proxy { repo: ProxyRepo, ns_echo: Option<String> },
    /// No namespace given: the local repository, else the default upstream.
    Overlay { local: RepoName, repo: ProxyRepo },
}

/// How a request was answered, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Joined,
    Stale,
    Revalidated,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Joined => "joined",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
        }
    }
}

/// Why pull-through failed: the upstream, or the local store (never disguised as each other).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("pull-through task ended unexpectedly")]
    Panicked,
}

impl ProxyError {
    /// The upstream is down or refusing: cached content may be served stale.
    pub fn is_outage(&self) -> bool {
        matches!(self, ProxyError::Upstream(e) if e.is_outage())
    }
}

pub type ManifestResult = Result<(Digest, Outcome), Arc<ProxyError>>;

pub struct Proxy {
    by_host: HashMap<String, Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
    pub fills: Fills,
    fill_timeout: Duration,
    manifest_flights: Flights<(Repo, String), ManifestResult>,
    /// Upstream answers to blob HEADs on a miss: (cache repo, digest) → size (None: absent).
    blob_heads: Cache<(Repo, Digest), Option<u64>>,
}

impl Proxy {
    pub fn new(cfg: &Config, default_upstream: Option<&str>) -> anyhow::Result<Proxy> {
        let mut by_host = HashMap::new();
        for u in &cfg.upstreams {
            let up = Arc::new(Upstream::new(u)?);
            for name in std::iter::once(&u.host).chain(&u.aliases) {
                by_host.insert(name.clone(), up.clone());
            }
        }
        let default = default_upstream.filter(|h| !h.is_empty()).and_then(|h| by_host.get(h).cloned());
        Ok(Proxy {
            by_host,
            default,
            fills: Fills::default(),
            fill_timeout: cfg.proxy.fill_timeout,
            manifest_flights: Flights::new(|| Err(Arc::new(ProxyError::Panicked))),
            blob_heads: Cache::builder().max_capacity(100_000).time_to_live(cfg.proxy.head_cache_ttl).build(),
        })
    }

    pub fn default_upstream(&self) -> Option<&Arc<Upstream>> {
        self.default.as_ref()
    }

    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let mut v: Vec<Arc<Upstream>> = Vec::new();
        for u in self.by_host.values() {
            if !v.iter().any(|x| Arc::ptr_eq(x, u)) {
                v.push(u.clone());
            }
        }
        v.sort_by(|a, b| a.host.cmp(&b.host));
        v
    }

    fn proxy_repo(up: &Arc<Upstream>, remote: &str) -> Option<ProxyRepo> {
        // Docker Hub's official images live under library/.
        let remote = if up.host == "docker.io" && !remote.contains('/') {
            format!("library/{remote}")
        } else {
            remote.to_string()
        };
        let remote: RepoName = remote.parse().ok()?;
        let cache = Repo::cache(&up.host, remote.clone());
        Some(ProxyRepo { upstream: up.clone(), remote, cache })
    }

    /// Maps a request's repository name and `ns` parameter onto a [`Target`]. Never contacts
    /// anything: an unconfigured `ns` or prefix just leaves the request local.
    pub fn resolve(&self, name: &RepoName, ns: Option<&str>) -> Target {
        let s = name.as_str();
        // Path prefix: /v2/<host>/<repo>/… (podman, CRI-O, containerd override_path).
        if let Some((first, rest)) = s.split_once('/') {
            if let Some(up) = self.by_host.get(first) {
                if let Some(repo) = Proxy::proxy_repo(up, rest) {
                    // containerd with override_path sends the prefix and ns= for the same host.
                    let ns_echo =
                        ns.filter(|n| self.by_host.get(*n).is_some_and(|u| Arc::ptr_eq(u, up))).map(str::to_string);
                    return Target::Proxy { repo, ns_echo };
                }
            }
        }
        if let Some(ns) = ns {
            if let Some(up) = self.by_host.get(ns) {
                if let Some(repo) = Proxy::proxy_repo(up, s) {
                    return Target::Proxy { repo, ns_echo: Some(ns.to_string()) };
                }
            }
            return Target::Local(name.clone());
        }
        // Without `ns`, a first component that looks like a registry host (as docker parses
        // references: it has a '.' or is `localhost`) but is not configured is a path prefix
        // for an unknown registry: never sent to any upstream.
        if let Some((first, _)) = s.split_once('/') {
            if first.contains('.') || first == "localhost" {
                return Target::Local(name.clone());
            }
        }
        match self.default.as_ref().and_then(|up| Proxy::proxy_repo(up, s)) {
            Some(repo) => Target::Overlay { local: name.clone(), repo },
            None => Target::Local(name.clone()),
        }
    }

    /// Makes sure the manifest `reference` names is in the cache; returns its digest.
    /// Tags are served from the cache while younger than the upstream's `tag_ttl` (or when
    /// immutable), then revalidated with a HEAD; an upstream outage serves the cached digest
    /// stale. Concurrent calls for one manifest share one upstream exchange.
    pub async fn manifest(&self, store: &Arc<Store>, p: &ProxyRepo, reference: &Reference) -> ManifestResult {
        match reference {
            Reference::Digest(d) => {
                if store.manifest_info(&p.cache, d).await.map_err(store_err)?.is_some() {
                    return Ok((d.clone(), Outcome::Hit));
                }
                let key = (p.cache.clone(), d.to_string());
                let (store, p2, d2) = (store.clone(), p.clone(), d.clone());
                self.manifest_flights
                    .run(key, async move {
                        fetch_manifest(&store, &p2, &d2.to_string(), None, Some(&d2))
                            .await
                            .map(|d| (d, Outcome::Miss))
                            .map_err(Arc::new)
                    })
                    .await
            }
            Reference::Tag(t) => {
                let cached = store.tag_with_age(&p.cache, t).await.map_err(store_err)?;
                if let Some((d, age)) = &cached {
                    let fresh = *age < p.upstream.tag_ttl || p.upstream.is_immutable(t);
                    if fresh && store.manifest_info(&p.cache, d).await.map_err(store_err)?.is_some() {
                        return Ok((d.clone(), Outcome::Hit));
                    }
                }
                let key = (p.cache.clone(), format!("tag:{t}"));
                let (store2, p2, t2, known) =
                    (store.clone(), p.clone(), t.clone(), cached.as_ref().map(|c| c.0.clone()));
                let res = self
                    .manifest_flights
                    .run(key, async move { revalidate(&store2, &p2, &t2, known).await.map_err(Arc::new) })
                    .await;
                match (res, cached) {
                    (Err(e), Some((d, _))) if e.is_outage() => {
                        tracing::warn!(upstream = %p.upstream.host, repo = %p.remote, tag = %t, error = %e, "upstream trouble; serving the cached tag stale");
                        Ok((d, Outcome::Stale))
                    }
                    (r, _) => r,
                }
            }
        }
    }

    /// A blob's size upstream, for a HEAD on a miss (the answer is cached briefly).
    pub async fn blob_head(&self, p: &ProxyRepo, d: &Digest) -> UpstreamResult<Option<u64>> {
        let key = (p.cache.clone(), d.clone());
        if let Some(v) = self.blob_heads.get(&key).await {
            return Ok(v);
        }
        let v = match p.upstream.blob_head(&p.remote, d).await {
            Ok(Some(size)) => Some(size),
            Ok(None) => return Err(UpstreamError::Invalid("blob HEAD without Content-Length".into())),
            Err(UpstreamError::NotFound) => None,
            Err(e) => return Err(e),
        };
        self.blob_heads.insert(key, v).await;
        Ok(v)
    }

    /// Joins (or starts) the fill of a missing blob.
    pub fn fill(&self, store: &Arc<Store>, p: &ProxyRepo, d: &Digest) -> (Arc<fill::Fill>, bool) {
        self.fills.join_or_start(FillRequest {
            store: store.clone(),
            upstream: p.upstream.clone(),
            remote: p.remote.clone(),
            cache_repo: p.cache.clone(),
            digest: d.clone(),
            timeout: self.fill_timeout,
        })
    }
}

fn store_err(e: StoreError) -> Arc<ProxyError> {
    Arc::new(ProxyError::Store(e))
}

/// HEAD the tag upstream; if it still names the cached digest, refresh the tag's age, else
/// GET the manifest. Without a cached digest, GET straight away.
async fn revalidate(
    store: &Store,
    p: &ProxyRepo,
    tag: &Tag,
    known: Option<Digest>,
) -> Result<(Digest, Outcome), ProxyError> {
    if let Some(known) = known {
        let head = p.upstream.manifest_head(&p.remote, tag.as_str()).await?;
        if head.digest.as_ref() == Some(&known) && store.manifest_info(&p.cache, &known).await?.is_some() {
            store.touch_tag(&p.cache, tag, &known).await?;
            return Ok((known, Outcome::Revalidated));
        }
        if let Some(d) = head.digest {
            // Changed upstream: a GET by the new digest (or a cache hit if another tag has it).
            if store.manifest_info(&p.cache, &d).await?.is_none() {
                fetch_manifest(store, p, &d.to_string(), None, Some(&d)).await?;
            }
            store.touch_tag(&p.cache, tag, &d).await?;
            return Ok((d, Outcome::Revalidated));
        }
    }
    let d = fetch_manifest(store, p, tag.as_str(), Some(tag), None).await?;
    Ok((d, Outcome::Miss))
}

/// GETs a manifest, verifies it, and stores the exact bytes (tagged with `tag`, if given).
async fn fetch_manifest(
    store: &Store,
    p: &ProxyRepo,
    reference: &str,
    tag: Option<&Tag>,
    want: Option<&Digest>,
) -> Result<Digest, ProxyError> {
    let (head, bytes) = p.upstream.manifest_get(&p.remote, reference).await?;
    let alg = want.map(Digest::algorithm).or(head.digest.as_ref().map(Digest::algorithm)).unwrap_or(Algorithm::Sha256);
    let digest = Digest::of(alg, &bytes);
    if let Some(expected) = want.or(head.digest.as_ref()) {
        if &digest != expected {
            return Err(UpstreamError::Invalid(format!(
                "manifest {reference} hashes to {digest}, expected {expected}"
            ))
            .into());
        }
    }
    let content_type = (!head.media_type.is_empty()).then_some(head.media_type.as_str());
    let m = manifest::parse(&bytes, content_type)
        .map_err(|e| UpstreamError::Invalid(format!("manifest {reference}: {e}")))?;
    let tags: Vec<Tag> = tag.into_iter().cloned().collect();
    let subject = m.subject.as_ref().map(|s| s.digest.clone());
    let referrer = subject.as_ref().map(|s| (s, m.referrer_descriptor(&digest, bytes.len() as u64)));
    store
        .put_manifest(
            &p.cache,
            ManifestPut { media_type: &m.media_type, bytes: &bytes, digest: &digest, tags: &tags, referrer },
        )
        .await?;
    Ok(digest)
}

/// Rewrites an upstream tags-list answer for the name the client asked with.
pub fn tags_from_upstream(body: &Bytes) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut tags: Vec<String> =
        v.get("tags")?.as_array()?.iter().filter_map(|t| t.as_str().map(str::to_string)).collect();
    tags.sort();
    Some(tags)
}
