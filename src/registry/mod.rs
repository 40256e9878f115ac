//! The registry layer: what the content is for a repository and a digest or reference, and
//! how it is had: local, cached (a hit), filled (a fill started), joined (a fill in flight),
//! relayed from the replica that fills it, stale, or not at all (offline, unknown). Every
//! caller of content goes through here: the HTTP handlers (`api`), the replicas' internal
//! endpoint, `POST /admin/prefetch` and the CLI's prefetch, export and import. Only this
//! layer calls `proxy` and the store for them.
//!
//! Every access rule about content is checked here, once:
//! - **namespace** ([`Registry::resolve`]): a name maps onto a local repository or an
//!   upstream's cache; what is served for an upstream's name is only what that upstream served;
//! - **writable** ([`Registry::writable`]): writes take a [`Writable`], which only that check
//!   makes; an upstream's namespace is read-only in every dialect;
//! - **repository membership** of a digest ([`blobs`]): content stored through another
//!   repository, a fill of another repository joined, or a replica's copy relayed, is served
//!   under an upstream's name only once that upstream said it has the digest there;
//! - **offline**: no upstream is contacted (`proxy.offline`);
//! - **immutability**: a manifest is served by the digest it hashes to; tags of upstreams'
//!   immutable tags are not revalidated (`proxy`).
//!
//! Answers are typed ([`blobs::BlobAnswer`], [`manifests::ManifestAnswer`]); errors are
//! [`RegistryError`], which `api` maps onto the wire's error codes in one place.

pub mod blobs;
pub mod listing;
pub mod manifests;
pub mod prefetch;
pub mod relay;
pub mod uploads;

use std::fmt;
use std::sync::Arc;

use crate::cluster::Cluster;
use crate::oci::{Digest, RepoName};
use crate::proxy::fill::FillError;
use crate::proxy::{Proxy, ProxyError};
pub use crate::upstream::UpstreamError;

pub use crate::proxy::{Outcome, ProxyRepo, Target};
pub use crate::storage::{ByteStream, Repo, StoreError, Upload, UploadId, UploadWriter};
pub use blobs::{BlobAnswer, BlobBody};
pub use manifests::ManifestAnswer;
pub use prefetch::{human_bytes, PrefetchOptions, PrefetchReport};
pub use relay::PeerAnswer;

/// The content of the repositories: the store, the pull-through proxy over it, and the fleet
/// of replicas sharing it.
pub struct Registry {
    store: Arc<crate::storage::Store>,
    proxy: Proxy,
    cluster: Arc<Cluster>,
}

/// What kind of thing was not found (the wire's `BLOB_UNKNOWN`, `MANIFEST_UNKNOWN`,
/// `NAME_UNKNOWN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    Blob,
    Manifest,
    Name,
}

/// Why the registry has no answer.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Not there (the detail names what).
    #[error("{0:?} unknown: {1}")]
    Unknown(Missing, String),
    /// A byte range past the end of a blob of this size.
    #[error("no such range in a blob of {0} bytes")]
    Unsatisfiable(u64),
    /// A write to a read-only namespace (why).
    #[error("{0}")]
    Denied(String),
    /// The upstream's trouble (`NotFound`, `Offline`: the thing is `Missing`).
    #[error("{1}")]
    Upstream(Missing, UpstreamError),
    /// The local store's trouble (never blamed on the upstream).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The local store's trouble met by a shared task (a fill, a manifest fetch): whether
    /// the store is full, and why.
    #[error("local store: {why}")]
    StoreShared { full: bool, why: String },
    /// The fleet could not settle who fills a blob in time: try again soon.
    #[error("{0}")]
    Busy(String),
    /// A fill failed otherwise (its content did not match, it timed out, …).
    #[error("{0}")]
    Fill(String),
    /// A task ended unexpectedly.
    #[error("{0}")]
    Internal(String),
    /// A manifest pushed that cannot be parsed.
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    /// Content that does not hash to the digest it is named by.
    #[error("digest invalid: {0}")]
    DigestInvalid(String),
    /// A tag that is not one.
    #[error("tag invalid: {0}")]
    TagInvalid(String),
    /// A manifest pushed before a blob or manifest it requires.
    #[error("manifest requires {0}, which is not in the repository")]
    ManifestBlobUnknown(crate::oci::Digest),
}

impl RegistryError {
    pub(crate) fn blob_unknown(d: impl fmt::Display) -> RegistryError {
        RegistryError::Unknown(Missing::Blob, d.to_string())
    }

    /// Pull-through trouble: the upstream's, or the local store's.
    pub(crate) fn proxy(e: &ProxyError, missing: Missing) -> RegistryError {
        match e {
            ProxyError::Upstream(u) => RegistryError::Upstream(missing, u.clone()),
            ProxyError::Store(s) => RegistryError::StoreShared { full: s.is_full(), why: s.to_string() },
            ProxyError::Panicked => RegistryError::Internal(e.to_string()),
        }
    }

    /// A fill that could not start or failed.
    pub(crate) fn fill(e: FillError) -> RegistryError {
        match e {
            FillError::Upstream(u) => RegistryError::Upstream(Missing::Blob, u),
            FillError::Store(s) => RegistryError::StoreShared { full: s.is_full(), why: s.to_string() },
            FillError::Busy(why) => RegistryError::Busy(why),
            e => RegistryError::Fill(e.to_string()),
        }
    }
}

pub type RegistryResult<T> = Result<T, RegistryError>;

/// A local repository a write may go to: made only by [`Registry::writable`] (and
/// [`Registry::store_repo`] for imports), so every write has passed the namespace rule.
#[derive(Clone, Debug)]
pub struct Writable(Repo);

impl Writable {
    pub fn repo(&self) -> &Repo {
        &self.0
    }
}

impl fmt::Display for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Registry {
    pub fn new(store: Arc<crate::storage::Store>, proxy: Proxy, cluster: Arc<Cluster>) -> Registry {
        Registry { store, proxy, cluster }
    }

    /// The store, for wiring and the offline commands (lifecycle, fsck, export, import):
    /// not for serving content.
    pub fn store(&self) -> &Arc<crate::storage::Store> {
        &self.store
    }

    /// The pull-through proxy, for wiring (the start-up summary, the token endpoint's
    /// grants).
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// This replica among the others on the store.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The configured upstreams' hosts, in order.
    pub fn upstream_hosts(&self) -> Vec<String> {
        self.proxy.upstreams().iter().map(|u| u.host.clone()).collect()
    }

    /// The fills in flight in this process: (digest, repository, bytes so far, followers).
    pub fn fills_in_flight(&self) -> Vec<(Digest, String, u64, usize)> {
        self.proxy.fills.snapshot()
    }

    /// Proxied bytes as the cap sees them now: the last usage check's figure plus the fills
    /// committed since (memory only; never walks the store).
    pub fn proxied_estimate(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let r = self.store.records();
        r.proxied_at_scan.load(Ordering::Acquire) + r.committed_since_scan.load(Ordering::Acquire)
    }

    /// Bytes held by ingests (upload sessions, fills) now: counted against the cap beside
    /// proxied content (memory only).
    pub fn ingest_bytes(&self) -> u64 {
        self.store.ingest_bytes()
    }

    /// Whether the registry is offline (`proxy.offline`, `serve --offline`).
    pub fn is_offline(&self) -> bool {
        self.proxy.is_offline()
    }

    /// Whether the store can be read (readiness).
    pub async fn readable(&self) -> bool {
        self.store.readable().await
    }

    /// Whether the store accepts writes (readiness; a full store is still served from).
    pub async fn writable_store(&self) -> bool {
        self.store.writable().await
    }

    /// Maps a request's repository name and `ns` parameter onto a [`Target`] (the namespace
    /// rule). Never contacts anything.
    pub fn resolve(&self, name: &RepoName, ns: Option<&str>) -> Target {
        self.proxy.resolve(name, ns)
    }

    /// Where a reference's repository lives when it is named in full (import, export,
    /// prefetch); `None` when `host` is not a configured upstream.
    pub fn named(&self, host: Option<&str>, name: &RepoName) -> Option<Target> {
        self.proxy.named(host, name)
    }

    /// The local repository a write (push, upload, delete) to `target` goes to, or why it is
    /// refused ([`Proxy::writable`]).
    pub fn writable(&self, name: &RepoName, target: &Target) -> RegistryResult<Writable> {
        self.proxy.writable(name, target).map(|n| Writable(Repo::Local(n.clone()))).map_err(RegistryError::Denied)
    }

    /// The store repository a full reference's repository names (import): an upstream's
    /// cache for a configured host (or a plain name the default upstream mirrors), else a
    /// local repository the configuration allows. `Err` says why neither.
    pub fn store_repo(&self, host: Option<&str>, name: &RepoName) -> Result<Repo, String> {
        match self.proxy.named(host, name) {
            Some(Target::Proxy { repo, .. }) => Ok(repo.cache),
            Some(t @ Target::Local(_)) => self.proxy.writable(name, &t).map(|n| Repo::Local(n.clone())),
            None => Err(format!(
                "{} is not a configured upstream: add an [[upstreams]] entry with host = \"{}\" (it need not be reachable)",
                host.unwrap_or_default(),
                host.unwrap_or_default()
            )),
        }
    }

    /// The store repository a full reference names for reading (export): an upstream no
    /// longer configured still has its cache in the store.
    pub fn stored_repo(&self, host: Option<&str>, name: &RepoName) -> Repo {
        match self.proxy.named(host, name) {
            Some(Target::Proxy { repo, .. }) => repo.cache,
            Some(Target::Local(n)) => Repo::Local(n),
            None => Repo::cache(host.unwrap_or_default(), name.clone()),
        }
    }

    /// Whether a request to the replicas' internal endpoints carries the fleet's secret.
    pub fn peer_authorized(&self, h: &reqwest::header::HeaderMap) -> bool {
        self.cluster.peer_authorized(h)
    }

    /// This replica's id.
    pub fn replica_id(&self) -> String {
        self.cluster.id().to_string()
    }
}
