//! What the store needs from the replicas sharing it, as a trait it is handed: telling them
//! about a change ([`Event`], so their caches drop what it made stale) and leases (a session
//! written by one request at a time across the fleet). `cluster/` implements [`Fleet`] over
//! Redis; the store knows no Redis type, and without replicas it is never handed one.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Something that happened on one replica that the others' caches must hear about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Content was deleted or evicted: forget its size.
    BlobGone { digest: String },
    /// A repository link was removed (`repo` as the store names it).
    LinkGone { repo: String, digest: String },
    /// A tag was written or removed.
    TagChanged { repo: String, tag: String },
    /// A manifest revision was removed.
    ManifestGone { repo: String, digest: String },
    /// A repository was created (the catalog lists it).
    RepoCreated { repo: String },
    /// Events may have been missed (Redis reconnected): drop everything cached.
    Resync,
}

impl Event {
    /// Its name in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Event::BlobGone { .. } => "blob_gone",
            Event::LinkGone { .. } => "link_gone",
            Event::TagChanged { .. } => "tag_changed",
            Event::ManifestGone { .. } => "manifest_gone",
            Event::RepoCreated { .. } => "repo_created",
            Event::Resync => "resync",
        }
    }
}

/// The lease name of a blob's fill (`fill:sha256:…`): the digest as the store and the
/// events name it.
pub fn fill_lease(digest: impl std::fmt::Display) -> String {
    format!("fill:{digest}")
}

/// The lease of a removal of `digest` (`remove:sha256:…`): held by the replica that deletes
/// or unlinks it (eviction, GC) from before its re-check until after the delete; whatever
/// makes the digest reachable on another replica waits while it is held (ARCHITECTURE.md,
/// "The mutation protocol").
pub fn removal_lease(digest: impl std::fmt::Display) -> String {
    format!("remove:{digest}")
}

/// Who holds a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub replica: String,
    /// Its `cluster.advertise` URL (no trailing `/`).
    pub advertise: String,
}

/// The answer to a claim.
pub enum Claim {
    /// This replica holds the lease until the [`Lease`] is released or dropped.
    Mine(Lease),
    /// Another claim holds it (possibly another task of this replica: compare
    /// [`Holder::replica`] with the replica's id).
    Held(Holder),
    /// No coordination is available (no Redis, or it did not answer): act on your own.
    Alone,
}

/// What a lease is to whoever grants it ([`Lease`] wraps one): renewed while it lives,
/// released by [`LeaseHandle::release`] or when dropped.
pub trait LeaseHandle: Send + Sync {
    /// Whether the lease may have expired (found so at a renewal, or not confirmed for
    /// longer than the fleet keeps it): another replica may hold it now.
    fn lost(&self) -> bool;
    /// Releases the lease now (if it is still ours).
    fn release(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// A lease this replica holds: released by [`Lease::release`] or on drop.
pub struct Lease(Box<dyn LeaseHandle>);

impl Lease {
    pub fn new(handle: impl LeaseHandle + 'static) -> Lease {
        Lease(Box::new(handle))
    }

    /// Whether the lease may have expired (another replica may hold it now).
    pub fn lost(&self) -> bool {
        self.0.lost()
    }

    /// Releases the lease now (if it is still ours).
    pub async fn release(self) {
        self.0.release().await
    }
}

/// The replicas sharing this store (`cluster::Cluster` over Redis).
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Claims the lease `name` (`fill:sha256:…`, `upload:<id>`).
    async fn claim(&self, name: &str) -> Claim;
    /// Who holds the lease `name`, if anyone (and coordination answers).
    async fn holder(&self, name: &str) -> Option<Holder>;
    /// Who holds each of the leases `names`, in one request (`None` for each when
    /// coordination does not answer).
    async fn holders(&self, names: &[String]) -> Vec<Option<Holder>>;
    /// Waits until nobody holds `name` (or coordination stops answering), at most `limit`.
    /// Returns whether it is free.
    async fn wait_free(&self, name: &str, limit: Duration) -> bool;
    /// The longest one wait for a lease should last before looking again.
    fn wait_limit(&self) -> Duration;
    /// Tells the other replicas, in the background (best effort).
    fn publish(&self, event: Event);
    /// Tells the other replicas and waits until the event was taken (bounded).
    async fn publish_now(&self, event: Event);
}
