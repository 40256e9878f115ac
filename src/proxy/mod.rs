//! Pull-through: maps a request onto an upstream namespace and serves it from the local
//! cache, filling the cache from the upstream on a miss.
//!
//! Namespaces: a request names its upstream by `?ns=<host>` (containerd) or a path prefix
//! `/v2/<host>/…` (podman, CRI-O; the host, an alias, or the cache namespace `127.0.0.1-5301`
//! of an upstream with a port); with neither, a plain name is a local repository when it
//! matches `proxy.local_namespaces` (or when there is no default upstream), else the default
//! upstream's (docker `registry-mirrors`). Pulled content is stored under
//! `<namespace>/<repository>` in every case, so all dialects share one cache. A host that is
//! not configured is never contacted.
//!
//! **Invariant:** what is served for an upstream's name is only ever what that upstream
//! served: every name that resolves to an upstream is read-only ([`Proxy::writable`]), and a
//! name whose first component is an upstream's host, alias or cache namespace is never local.

pub mod fill;
pub mod flight;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;

use crate::cluster::{fill_lease, Claim, Cluster, Holder};
use crate::config::Config;
use crate::oci::manifest;
use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag};
use crate::storage::{ManifestPut, Repo, Store, StoreError, StoredManifest};
use crate::upstream::{Upstream, UpstreamError, UpstreamResult};
use fill::{Claiming, FillError, FillRequest, Fills};
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
    /// An upstream's namespace, named by `ns`, a path prefix, or (`plain`) a plain name
    /// outside `proxy.local_namespaces` with a default upstream: read-only.
    Proxy { repo: ProxyRepo, ns_echo: Option<String>, plain: bool },
}

/// How a request was answered, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Joined,
    Stale,
    /// Served from the cache because the store could not record the upstream's answer
    /// (a full disk).
    StaleWriteFailed,
    Revalidated,
    /// Relayed from the replica that fills the blob (`[redis]` fleets).
    Peer,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Joined => "joined",
            Outcome::Stale => "stale",
            Outcome::StaleWriteFailed => "stale-write-failed",
            Outcome::Revalidated => "revalidated",
            Outcome::Peer => "peer",
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

/// Where a missing blob's bytes come from ([`Proxy::blob_source`]).
pub enum BlobSource {
    /// A fill of this replica; `true` when this call started it (this replica leads).
    Fill(Arc<fill::Fill>, bool),
    /// It was committed meanwhile (by another replica's fill): serve it from the store.
    Stored,
    /// Another replica holds the lease and fills it: relay its stream.
    Peer(Holder),
}

/// How many times [`Proxy::blob_source`] looks again before it gives up (each round waits
/// for something: a claim of this replica, or a lease of this replica to be released).
const SOURCE_ROUNDS: usize = 20;

pub struct Proxy {
    by_host: HashMap<String, Arc<Upstream>>,
    /// Cache namespaces (`127.0.0.1-5301`), also accepted as path prefixes.
    by_namespace: HashMap<String, Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
    /// `proxy.local_namespaces`: plain names that are local while a default upstream is set.
    local_namespaces: Vec<String>,
    pub fills: Fills,
    fill_timeout: Duration,
    manifest_flights: Flights<(Repo, String), ManifestResult>,
    /// Upstream answers to blob HEADs on a miss: (cache repo, digest) → size (None: absent).
    blob_heads: Cache<(Repo, Digest), Option<u64>>,
    /// `proxy.offline`: serve strictly from the store; no upstream is ever contacted.
    offline: bool,
    /// The fleet: manifests by digest and tag revalidations are fetched by one replica.
    cluster: Arc<Cluster>,
}

impl Proxy {
    pub fn new(cfg: &Config, default_upstream: Option<&str>) -> anyhow::Result<Proxy> {
        let mut by_host = HashMap::new();
        let mut by_namespace = HashMap::new();
        for u in &cfg.upstreams {
            let mut up = Upstream::new(u)?;
            up.offline = cfg.proxy.offline;
            let up = Arc::new(up);
            for name in std::iter::once(&u.host).chain(&u.aliases) {
                by_host.insert(name.clone(), up.clone());
            }
            by_namespace.insert(up.namespace.clone(), up.clone());
        }
        let default = default_upstream.filter(|h| !h.is_empty()).and_then(|h| by_host.get(h).cloned());
        Ok(Proxy {
            by_host,
            by_namespace,
            default,
            local_namespaces: cfg.proxy.local_namespaces.clone(),
            fills: Fills::default(),
            fill_timeout: cfg.proxy.fill_timeout,
            manifest_flights: Flights::new(|| Err(Arc::new(ProxyError::Panicked))),
            blob_heads: Cache::builder().max_capacity(100_000).time_to_live(cfg.proxy.head_cache_ttl).build(),
            offline: cfg.proxy.offline,
            cluster: Cluster::alone(),
        })
    }

    /// Coordinates with the other replicas of `cluster` (manifest fetches, tag
    /// revalidations, the upstreams' tokens).
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Proxy {
        for up in self.by_host.values() {
            up.set_cluster(cluster.clone());
        }
        self.cluster = cluster;
        self
    }

    /// Whether the registry is offline (`proxy.offline`, `serve --offline`).
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Where a reference's repository lives when it is named in full (import, export,
    /// prefetch): `host` (a configured upstream's host, alias or cache namespace) names that
    /// upstream's cache; without a host the name resolves as a request's plain name does
    /// ([`Proxy::resolve`]). `None` when `host` is not a configured upstream.
    pub fn named(&self, host: Option<&str>, name: &RepoName) -> Option<Target> {
        match host {
            None => Some(self.resolve(name, None)),
            Some(h) => {
                let up = self.upstream_named(h)?;
                let repo = Proxy::proxy_repo(up, name.as_str())?;
                Some(Target::Proxy { repo, ns_echo: None, plain: false })
            }
        }
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
        let cache = Repo::Cache { host: up.shared_host.clone(), name: remote.clone() };
        Some(ProxyRepo { upstream: up.clone(), remote, cache })
    }

    /// The upstream whose host, alias or cache namespace is `first` (a name's first component).
    fn upstream_named(&self, first: &str) -> Option<&Arc<Upstream>> {
        self.by_host.get(first).or_else(|| self.by_namespace.get(first))
    }

    /// Whether a plain name is a local repository: always without a default upstream, else
    /// when it matches `proxy.local_namespaces`.
    pub fn is_local_namespace(&self, name: &RepoName) -> bool {
        self.default.is_none() || self.local_namespaces.iter().any(|p| crate::oci::glob::matches(p, name.as_str()))
    }

    /// The configured local namespaces, for the start-up summary.
    pub fn local_namespaces(&self) -> &[String] {
        &self.local_namespaces
    }

    /// Maps a request's repository name and `ns` parameter onto a [`Target`]. Never contacts
    /// anything: an unconfigured `ns` or prefix just leaves the request local.
    pub fn resolve(&self, name: &RepoName, ns: Option<&str>) -> Target {
        let s = name.as_str();
        // Path prefix: /v2/<host>/<repo>/… (podman, CRI-O, containerd override_path), or the
        // cache namespace the content is stored under.
        if let Some((first, rest)) = s.split_once('/') {
            if let Some(up) = self.upstream_named(first) {
                if let Some(repo) = Proxy::proxy_repo(up, rest) {
                    // containerd with override_path sends the prefix and ns= for the same host.
                    let ns_echo =
                        ns.filter(|n| self.by_host.get(*n).is_some_and(|u| Arc::ptr_eq(u, up))).map(str::to_string);
                    return Target::Proxy { repo, ns_echo, plain: false };
                }
            }
        }
        if let Some(ns) = ns {
            if let Some(up) = self.by_host.get(ns) {
                if let Some(repo) = Proxy::proxy_repo(up, s) {
                    return Target::Proxy { repo, ns_echo: Some(ns.to_string()), plain: false };
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
        if self.is_local_namespace(name) {
            return Target::Local(name.clone());
        }
        match self.default.as_ref().and_then(|up| Proxy::proxy_repo(up, s)) {
            Some(repo) => Target::Proxy { repo, ns_echo: None, plain: true },
            None => Target::Local(name.clone()),
        }
    }

    /// The local repository a write (push, upload, delete) to `target` goes to, or why it is
    /// refused. Only local repositories are writable, and of those only names outside every
    /// upstream's namespace and, while a default upstream is set, inside
    /// `proxy.local_namespaces`: no client can change what is served for an upstream's name.
    pub fn writable<'a>(&self, name: &RepoName, target: &'a Target) -> Result<&'a RepoName, String> {
        let mirrors = |host: &str| format!("this namespace mirrors the upstream registry {host} and is read-only");
        let plain = |name: &str, host: &str| {
            format!(
                "{name} is in the namespace that mirrors the default upstream {host} and is read-only; \
                 an operator can make it a local, pushable repository by listing it in proxy.local_namespaces"
            )
        };
        match target {
            Target::Proxy { repo, plain: true, .. } => Err(plain(name.as_str(), &repo.upstream.host)),
            Target::Proxy { repo, .. } => Err(mirrors(&repo.upstream.host)),
            Target::Local(n) => {
                let first = n.components().next().unwrap_or_default();
                if let Some(up) = self.upstream_named(first) {
                    return Err(mirrors(&up.host));
                }
                match &self.default {
                    Some(up) if !self.is_local_namespace(n) => Err(plain(n.as_str(), &up.host)),
                    _ => Ok(n),
                }
            }
        }
    }

    /// Makes sure the manifest `reference` names is in the cache; returns its digest.
    /// Tags are served from the cache while younger than the upstream's `tag_ttl` (or when
    /// immutable), then revalidated with a HEAD; an upstream outage serves the cached digest
    /// stale. Concurrent calls for one manifest share one upstream exchange.
    /// Resolves `reference` in `p`'s cache, filling or revalidating it from the upstream when
    /// needed. On a cache hit the stored manifest's record comes along (no second lookup).
    pub async fn manifest(
        &self,
        store: &Arc<Store>,
        p: &ProxyRepo,
        reference: &Reference,
    ) -> Result<(Digest, Outcome, Option<StoredManifest>), Arc<ProxyError>> {
        let resolved = |r: ManifestResult| r.map(|(d, o)| (d, o, None));
        match reference {
            Reference::Digest(d) => {
                if let Some(info) = store.manifest_info(&p.cache, d).await.map_err(store_err)? {
                    return Ok((d.clone(), Outcome::Hit, Some(info)));
                }
                if self.offline {
                    return Err(Arc::new(UpstreamError::Offline.into()));
                }
                let key = (p.cache.clone(), d.to_string());
                let (store, p2, d2, cluster) = (store.clone(), p.clone(), d.clone(), self.cluster.clone());
                resolved(
                    self.manifest_flights
                        .run(key, async move {
                            // One upstream GET per digest across the fleet: the replica holding the
                            // lease fetches; the others find the manifest in the store after it.
                            let lease = format!("manifest:{}@{d2}", p2.cache);
                            let check = || async {
                                let found = store.manifest_info(&p2.cache, &d2).await?.is_some();
                                Ok::<_, ProxyError>(found.then(|| (d2.clone(), Outcome::Joined)))
                            };
                            // Under the lease, the store first: another replica may have just
                            // released it, its work done.
                            let work = || async {
                                if let Some(done) = check().await? {
                                    return Ok(done);
                                }
                                fetch_manifest(&store, &p2, &d2.to_string(), None, Some(&d2))
                                    .await
                                    .map(|d| (d, Outcome::Miss))
                            };
                            cluster.once(&lease, check, work).await.map_err(Arc::new)
                        })
                        .await,
                )
            }
            Reference::Tag(t) => {
                let cached = store.tag_with_age(&p.cache, t).await.map_err(store_err)?;
                if let Some((d, age)) = &cached {
                    // Offline, a cached tag is never revalidated.
                    let fresh = *age < p.upstream.tag_ttl || p.upstream.is_immutable(t) || self.offline;
                    if fresh {
                        if let Some(info) = store.manifest_info(&p.cache, d).await.map_err(store_err)? {
                            return Ok((d.clone(), Outcome::Hit, Some(info)));
                        }
                    }
                }
                if self.offline {
                    return Err(Arc::new(UpstreamError::Offline.into()));
                }
                let key = (p.cache.clone(), format!("tag:{t}"));
                let (store2, p2, t2, cluster) = (store.clone(), p.clone(), t.clone(), self.cluster.clone());
                let res = self
                    .manifest_flights
                    .run(key, async move {
                        // One upstream HEAD per tag per `tag_ttl` across the fleet: the replica
                        // holding the lease revalidates (and refreshes the tag's age); the others
                        // find the tag fresh in the store after it.
                        let lease = format!("tag:{}:{t2}", p2.cache);
                        let check = || async {
                            Ok::<_, ProxyError>(match cached_tag(&store2, &p2, &t2).await? {
                                CachedTag::Fresh(d) => Some((d, Outcome::Joined)),
                                _ => None,
                            })
                        };
                        // Under the lease, the store first: another replica may have just
                        // revalidated (or changed) the tag since this request looked.
                        let work = || async {
                            let known = match cached_tag(&store2, &p2, &t2).await? {
                                CachedTag::Fresh(d) => return Ok((d, Outcome::Joined)),
                                CachedTag::Stale(d) => Some(d),
                                CachedTag::None => None,
                            };
                            revalidate(&store2, &p2, &t2, known).await
                        };
                        cluster.once(&lease, check, work).await.map_err(Arc::new)
                    })
                    .await;
                resolved(match (res, cached) {
                    (Err(e), Some((d, _))) if e.is_outage() => {
                        tracing::warn!(upstream = %p.upstream.host, repo = %p.remote, tag = %t, error = %e, "upstream trouble; serving the cached tag stale");
                        Ok((d, Outcome::Stale))
                    }
                    (Err(e), Some((d, _))) if matches!(*e, ProxyError::Store(_)) => {
                        tracing::warn!(upstream = %p.upstream.host, repo = %p.remote, tag = %t, error = %e, "the store cannot record the revalidation; serving the cached tag stale");
                        crate::metrics::store_write_failed();
                        Ok((d, Outcome::StaleWriteFailed))
                    }
                    (r, _) => r,
                })
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

    /// Joins (or starts) the fill of a missing blob in this replica, whatever other replicas
    /// do (prefetch).
    pub fn fill(&self, store: &Arc<Store>, p: &ProxyRepo, d: &Digest) -> (Arc<fill::Fill>, bool) {
        self.start_fill(store, p, d, None)
    }

    fn start_fill(
        &self,
        store: &Arc<Store>,
        p: &ProxyRepo,
        d: &Digest,
        lease: Option<crate::cluster::Lease>,
    ) -> (Arc<fill::Fill>, bool) {
        self.fills.join_or_start(FillRequest {
            store: store.clone(),
            upstream: p.upstream.clone(),
            remote: p.remote.clone(),
            cache_repo: p.cache.clone(),
            digest: d.clone(),
            timeout: self.fill_timeout,
            lease,
        })
    }

    /// Where a blob missing from `p`'s cache comes from, with single flight across the
    /// fleet: this replica's fill if one runs; else the lease `fill:<digest>` decides —
    /// ours (or no Redis answers: [`Claim::Alone`]) starts the fill here, another replica's
    /// means relaying its stream ([`BlobSource::Peer`]). One request of this replica claims
    /// at a time ([`Fills::claiming`]); the others wait for it and join its fill.
    /// `takeover`: the caller found the previous holder gone (counted and logged when this
    /// replica gets the lease).
    pub async fn blob_source(
        &self,
        store: &Arc<Store>,
        p: &ProxyRepo,
        d: &Digest,
        takeover: Option<&Holder>,
    ) -> Result<BlobSource, FillError> {
        let cluster = &self.cluster;
        let lease_name = fill_lease(d);
        for _ in 0..SOURCE_ROUNDS {
            if let Some(f) = self.fills.get(d) {
                return Ok(BlobSource::Fill(f, false));
            }
            let guard = match self.fills.claiming(d) {
                Claiming::Mine(g) => g,
                Claiming::Busy => {
                    self.fills.wait_claim(d, cluster.lease_ttl()).await;
                    continue;
                }
            };
            match cluster.claim(&lease_name).await {
                Claim::Alone => {
                    let (f, leader) = self.start_fill(store, p, d, None);
                    return Ok(BlobSource::Fill(f, leader));
                }
                Claim::Mine(lease) => {
                    // The lease may have been free because the last holder just committed
                    // (through this repository or another: the caller checks the link).
                    if store.blob_size(d).await?.is_some() {
                        lease.release().await;
                        return Ok(BlobSource::Stored);
                    }
                    if let Some(gone) = takeover {
                        tracing::warn!(digest = %d, from = %gone.replica, peer = %gone.advertise, "taking over the fill of a replica that cannot serve it");
                        crate::metrics::cluster_takeover();
                    }
                    let (f, leader) = self.start_fill(store, p, d, Some(lease));
                    drop(guard);
                    return Ok(BlobSource::Fill(f, leader));
                }
                Claim::Held(h) if h.replica == cluster.id() => {
                    // A fill of ours ended and is releasing its lease (or the release did not
                    // reach Redis and the lease expires by itself).
                    drop(guard);
                    if store.blob_size(d).await?.is_some() {
                        return Ok(BlobSource::Stored);
                    }
                    cluster.wait_not_held_by(&lease_name, &h, cluster.lease_ttl()).await;
                }
                Claim::Held(h) if cluster.is_replica(store, &h).await => return Ok(BlobSource::Peer(h)),
                Claim::Held(h) => {
                    // Not a replica of this store (a forged or stale lease value): never
                    // contacted; this replica fills on its own, verified as always.
                    tracing::warn!(digest = %d, holder = %h.replica, peer = %h.advertise, "the fill's lease names no replica registered in the store; filling here");
                    crate::metrics::cluster_unregistered_holder();
                    let (f, leader) = self.start_fill(store, p, d, None);
                    return Ok(BlobSource::Fill(f, leader));
                }
            }
        }
        Err(FillError::Busy(format!("no replica took the fill of {d} on")))
    }
}

fn store_err(e: StoreError) -> Arc<ProxyError> {
    Arc::new(ProxyError::Store(e))
}

/// A tag in the cache, as one read of it finds it.
enum CachedTag {
    /// Younger than the upstream's `tag_ttl` (or immutable), its manifest present.
    Fresh(Digest),
    /// To revalidate: too old, or its manifest gone.
    Stale(Digest),
    None,
}

async fn cached_tag(store: &Store, p: &ProxyRepo, tag: &Tag) -> Result<CachedTag, ProxyError> {
    let Some((d, age)) = store.tag_with_age(&p.cache, tag).await? else { return Ok(CachedTag::None) };
    let fresh = age < p.upstream.tag_ttl || p.upstream.is_immutable(tag);
    Ok(match fresh && store.manifest_info(&p.cache, &d).await?.is_some() {
        true => CachedTag::Fresh(d),
        false => CachedTag::Stale(d),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    fn proxy(default: &str, local: &[&str]) -> Proxy {
        let mut cfg = Config {
            upstreams: vec![
                UpstreamConfig::docker_hub(),
                UpstreamConfig {
                    host: "127.0.0.1:5301".into(),
                    aliases: vec!["up.test".into()],
                    ..UpstreamConfig::default()
                },
            ],
            ..Config::default()
        };
        cfg.proxy.local_namespaces = local.iter().map(|s| s.to_string()).collect();
        Proxy::new(&cfg, Some(default)).unwrap()
    }

    fn n(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    /// What a write to `name` (with `ns`) gets: Ok(local name) or Err(why).
    fn write(p: &Proxy, name: &str, ns: Option<&str>) -> Result<String, String> {
        let name = n(name);
        let t = p.resolve(&name, ns);
        p.writable(&name, &t).map(|n| n.to_string())
    }

    #[test]
    fn plain_names_are_local_only_inside_local_namespaces() {
        let p = proxy("docker.io", &["team/*", "ci/*"]);
        assert!(matches!(p.resolve(&n("team/app"), None), Target::Local(_)));
        assert!(matches!(p.resolve(&n("team/a/b"), None), Target::Local(_)));
        assert!(matches!(p.resolve(&n("nginx"), None), Target::Proxy { plain: true, .. }));
        assert!(matches!(p.resolve(&n("team"), None), Target::Proxy { plain: true, .. }));
        assert_eq!(write(&p, "team/app", None).unwrap(), "team/app");
        assert_eq!(write(&p, "ci/x/y", None).unwrap(), "ci/x/y");
        let e = write(&p, "nginx", None).unwrap_err();
        assert!(e.contains("proxy.local_namespaces") && e.contains("docker.io"), "{e}");
        // An unknown ns or registry-like prefix stays local, but writable only inside the list.
        assert!(write(&p, "nginx", Some("quay.io")).is_err());
        assert!(write(&p, "ghcr.io/x/y", None).is_err());
        assert!(write(&p, "team/app", Some("quay.io")).is_ok());
    }

    #[test]
    fn upstream_names_are_never_writable_in_any_dialect() {
        for local in [&[][..], &["*"][..]] {
            let p = proxy("127.0.0.1:5301", local);
            for (name, ns) in [
                ("small", Some("127.0.0.1:5301")),
                ("small", Some("up.test")),
                ("up.test/small", None),
                ("127.0.0.1-5301/small", None),
                ("127.0.0.1-5301/small", Some("docker.io")),
                ("docker.io/library/nginx", None),
                ("index.docker.io/x", None),
                ("nginx", Some("docker.io")),
            ] {
                assert!(write(&p, name, ns).is_err(), "{name} ns={ns:?} with local {local:?}");
                assert!(
                    matches!(p.resolve(&n(name), ns), Target::Proxy { .. }),
                    "{name} ns={ns:?} should read from the upstream"
                );
            }
        }
        // The cache name reads the same cache as the other dialects.
        let p = proxy("127.0.0.1:5301", &[]);
        let Target::Proxy { repo, .. } = p.resolve(&n("127.0.0.1-5301/small"), None) else { unreachable!() };
        assert_eq!((repo.remote.as_str(), repo.cache.to_string().as_str()), ("small", "127.0.0.1:5301/small"));
    }

    #[test]
    fn without_a_default_upstream_every_plain_name_is_local() {
        let p = proxy("", &[]);
        assert_eq!(write(&p, "anything/at/all", None).unwrap(), "anything/at/all");
        assert!(write(&p, "docker.io/library/nginx", None).is_err());
        assert!(write(&p, "x", Some("docker.io")).is_err());
    }
}
