//! The content store: content-addressed blobs, per-repository links, upload sessions,
//! manifests, tags and referrers, over a [`Backend`] (the seam: the filesystem today).
//! Storage never sees HTTP types; nothing above it sees a path, a file or a backend type.
//!
//! Invariants:
//! - content becomes visible under a digest only through a [`Writer`]'s verify → commit,
//!   which checks size and digest against the hash that writer computed on the way in;
//! - uploads, fills (and, later, imports) all write through that one writer;
//! - metadata objects (tags, revision links, ingest state) are replaced atomically;
//! - the mutation protocol ([`guard`], ARCHITECTURE.md): whatever makes content reachable
//!   holds the digests' shared guards from its existence check (with the backend, never a
//!   cache) to its last write and records a use before letting go; whatever removes content
//!   re-checks under the exclusive guards.

pub mod backend;
pub mod counted;
mod fleet;
mod fs;
pub mod guard;
mod ids;
pub mod index;
mod inflight;
pub mod layout;
mod memo;
mod replicas;
mod repo;
mod s3;
mod uploads;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use backend::{Backend, ByteStream, IngestKind, TailReader, Verified, Writer};
pub use fleet::{fill_lease, removal_lease, Claim, Event, Fleet, Holder, Lease, LeaseHandle};
pub use guard::{Reach, Removal};
pub use ids::UploadId;
pub use index::{Change, InUse, Refs, UsageSnapshot};
pub use repo::{ManifestPut, StoredManifest};
pub use s3::S3Backend;
pub use uploads::{Upload, UploadWriter};

use crate::oci::{Algorithm, Digest, RepoName};
use backend::{IngestId, WriterOptions};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("upload session unknown")]
    UploadUnknown,
    #[error("upload session is at offset {expected}, chunk starts at {got}")]
    InvalidOffset { expected: u64, got: u64 },
    #[error("content digest {actual} does not match {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content size {actual} does not match {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    /// Another replica kept writing the session for longer than a request waits for it.
    #[error("upload session is being written by another request")]
    SessionBusy,
    /// Another replica kept removing content this request makes reachable for longer than a
    /// request waits for it (its removal lease): nothing was written; try again.
    #[error("content is being removed by another replica")]
    RemovalBusy,
    #[error("storage i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// The store is out of space (or quota): nothing can be written until some is freed.
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Io(e) => {
                e.kind() == std::io::ErrorKind::StorageFull
                    || e.kind() == std::io::ErrorKind::QuotaExceeded
                    || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            }
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// fsync data and directories before renames (crash safety against power loss).
    pub fsync: bool,
    /// Entries in the descriptor cache.
    pub descriptor_cache_capacity: u64,
    /// How long a cached size or link is trusted; `None`: until it is invalidated. Replicas
    /// sharing a store use [`SHARED_CACHE_TTL`], so an invalidation that was missed heals.
    pub cache_ttl: Option<Duration>,
}

/// The lifetime of cached sizes, links and the catalog when replicas share the store.
pub const SHARED_CACHE_TTL: Duration = Duration::from_secs(30);

/// A repository as the store keeps it: a local repository clients push to, or an upstream's
/// repository as cached. The two live in separate trees, so no client-writable name can ever
/// reach an upstream's cache.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Repo {
    Local(RepoName),
    /// `host` as configured (`docker.io`, `127.0.0.1:5301`); `name` the repository there.
    Cache {
        host: Arc<str>,
        name: RepoName,
    },
}

impl Repo {
    pub fn cache(host: &str, name: RepoName) -> Repo {
        debug_assert!(!host.is_empty() && !host.contains('/') && host != "." && host != "..");
        Repo::Cache { host: host.into(), name }
    }
}

impl fmt::Display for Repo {
    /// The name clients see: `team/app`, or `docker.io/library/nginx` for a cache.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repo::Local(n) => n.fmt(f),
            Repo::Cache { host, name } => write!(f, "{host}/{name}"),
        }
    }
}

/// Received bytes per batch for uploads: one thread hop, one hash pass and one `writev` per
/// MiB (push CPU 1.32 → 1.24 s per 512 MiB against per-chunk writes).
const UPLOAD_BATCH: usize = 1 << 20;
/// For fills, smaller batches: followers read what has landed, so it must land often.
const FILL_BATCH: usize = 1 << 20;

/// Cheap to share (`Arc<Store>`).
pub struct Store {
    backend: Arc<dyn Backend>,
    /// digest → size of committed content: answers existence and HEAD without the backend.
    sizes: memo::Memo<Digest, u64>,
    /// (repository, digest) → the blob is linked there.
    links: memo::Memo<(Repo, Digest), ()>,
    /// Bumped by every unlink; a link read from the backend is cached only if no unlink
    /// happened meanwhile (under `link_lock`), so a deleted link is never cached back.
    unlinks: AtomicU64,
    link_lock: Mutex<()>,
    /// The same for sizes: bumped by every deletion of content (here or on another replica).
    deletions: AtomicU64,
    sessions: Locks,
    catalog: Catalog,
    /// Access batch, content in use, space pressure (`index.rs`).
    records: Arc<index::Records>,
    /// The replicas sharing this store: deletions are told to them, theirs invalidate the
    /// caches here ([`Store::listen`]); set once.
    fleet: OnceLock<Arc<dyn Fleet>>,
    /// The mutation protocol's per-digest guards ([`guard`]).
    guards: guard::Guards,
    /// Bytes held by ingests ([`inflight`]), kept by the writers across the seam.
    inflight: Arc<inflight::Inflight>,
}

impl Store {
    /// The filesystem store (the default, embedded backend).
    pub async fn open(cfg: &StoreConfig) -> std::io::Result<Arc<Store>> {
        let backend = fs::FsBackend::open(&cfg.root, cfg.fsync).await?;
        Ok(Store::with_backend(Arc::new(backend), cfg.descriptor_cache_capacity, cfg.cache_ttl))
    }

    /// `cache_ttl`: see [`StoreConfig::cache_ttl`].
    pub fn with_backend(backend: Arc<dyn Backend>, cache_capacity: u64, cache_ttl: Option<Duration>) -> Arc<Store> {
        let sizes = memo::Memo::new(cache_capacity, cache_ttl);
        let links = memo::Memo::new(cache_capacity, cache_ttl);
        let inflight = Arc::new(inflight::Inflight::default());
        Arc::new(Store {
            backend: Arc::new(counted::Counted::new(backend, inflight.clone())),
            sizes,
            links,
            unlinks: AtomicU64::new(0),
            link_lock: Mutex::new(()),
            deletions: AtomicU64::new(0),
            sessions: Locks::default(),
            catalog: Catalog { ttl: cache_ttl, ..Catalog::default() },
            records: Arc::default(),
            fleet: OnceLock::new(),
            guards: guard::Guards::default(),
            inflight,
        })
    }

    /// The catalog is walked again at its next listing: an offline tool (`prefetch`) added
    /// repositories beside this process (seen through the store's generation).
    pub fn expire_catalog(&self) {
        self.catalog.expire();
    }

    /// Size of committed content, or `None` if it is not in the store.
    pub async fn blob_size(&self, d: &Digest) -> StoreResult<Option<u64>> {
        if let Some(size) = self.sizes.get(d) {
            return Ok(Some(size));
        }
        let epoch = self.deletions.load(Ordering::Acquire);
        let size = self.backend.stat(d).await?;
        if let Some(s) = size {
            let _g = self.link_lock.lock().unwrap();
            if self.deletions.load(Ordering::Acquire) == epoch {
                self.sizes.insert(d.clone(), s);
            }
        }
        Ok(size)
    }

    /// Shares this store with the other replicas of `fleet`: changes here are told to them,
    /// and their `events` (heard until the runtime stops, or the sender goes) invalidate the
    /// caches here. Only the first fleet counts.
    pub fn listen(self: &Arc<Store>, fleet: Arc<dyn Fleet>, mut events: tokio::sync::broadcast::Receiver<Event>) {
        if self.fleet.set(fleet).is_err() {
            return;
        }
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let e = match events.recv().await {
                    Ok(e) => e,
                    // Too many at once: some were lost.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Event::Resync,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(store) = store.upgrade() else { return };
                crate::metrics::cluster_event("received", e.name());
                store.apply(&e);
            }
        });
    }

    /// The replicas sharing this store, when they coordinate ([`Store::listen`]).
    pub fn fleet(&self) -> Option<&Arc<dyn Fleet>> {
        self.fleet.get()
    }

    /// Forgets the cached size of `d` (deleted here or on another replica); a lookup racing
    /// with this does not put it back (`deletions`).
    fn forget_size(&self, d: &Digest) {
        let _g = self.link_lock.lock().unwrap();
        self.deletions.fetch_add(1, Ordering::AcqRel);
        self.sizes.invalidate(d);
    }

    /// Forgets the cached link of `d` in `repo` (removed here or on another replica); a
    /// lookup racing with this does not put it back (`unlinks`).
    fn forget_link(&self, repo: &Repo, d: &Digest) {
        let _g = self.link_lock.lock().unwrap();
        self.unlinks.fetch_add(1, Ordering::AcqRel);
        self.links.invalidate(&(repo.clone(), d.clone()));
    }

    /// Drops what another replica's change made stale.
    pub fn apply(&self, e: &Event) {
        match e {
            Event::BlobGone { digest } => {
                if let Ok(d) = digest.parse::<Digest>() {
                    self.forget_size(&d);
                }
            }
            Event::LinkGone { repo, digest } => {
                if let (Some(repo), Ok(d)) = (layout::repo_of(repo), digest.parse::<Digest>()) {
                    self.forget_link(&repo, &d);
                }
            }
            Event::RepoCreated { repo } => {
                if let Some(repo) = layout::repo_of(repo) {
                    self.catalog.add(&repo);
                }
            }
            // Manifest revisions and tags are read from the backend at every request: nothing
            // here caches them.
            Event::ManifestGone { .. } | Event::TagChanged { .. } => {}
            Event::Resync => {
                let _g = self.link_lock.lock().unwrap();
                self.unlinks.fetch_add(1, Ordering::AcqRel);
                self.deletions.fetch_add(1, Ordering::AcqRel);
                self.sizes.invalidate_all();
                self.links.invalidate_all();
                self.catalog.expire();
            }
        }
    }

    /// Tells the other replicas about a change here: a removal before the change's request is
    /// answered (their caches must not serve it a moment longer); an addition in the
    /// background (nothing wrong is served meanwhile, and a write never waits for Redis).
    async fn tell(&self, e: Event) {
        if let Some(c) = self.fleet.get() {
            crate::metrics::cluster_event("published", e.name());
            match e {
                Event::BlobGone { .. } | Event::LinkGone { .. } | Event::ManifestGone { .. } => c.publish_now(e).await,
                _ => c.publish(e),
            }
        }
    }

    /// The name replicas use for `repo` among themselves.
    fn repo_key(repo: &Repo) -> String {
        layout::repo(repo).as_str().to_string()
    }

    /// `len` bytes of committed content from `start`, streamed; `None` when it is gone.
    pub async fn read_blob(&self, d: &Digest, start: u64, len: u64) -> StoreResult<Option<ByteStream>> {
        let r = self.backend.read(d, start, len).await?;
        match r {
            None => {
                self.sizes.invalidate(d);
                Ok(None)
            }
            Some(s) => {
                self.touch(d);
                Ok(Some(self.held_stream(d, s)))
            }
        }
    }

    /// A URL to send a client to for committed content (see [`Backend::redirect_url`]);
    /// counts as a use.
    pub async fn blob_redirect(&self, d: &Digest) -> StoreResult<Option<String>> {
        let url = self.backend.redirect_url(d).await?;
        if url.is_some() {
            self.touch(d);
        }
        Ok(url)
    }

    /// Size of a blob if it is committed *and* linked into `repo`.
    pub async fn repo_blob_size(&self, repo: &Repo, d: &Digest) -> StoreResult<Option<u64>> {
        if !self.is_linked(repo, d).await? {
            return Ok(None);
        }
        let size = self.blob_size(d).await?;
        if size.is_some() {
            self.touch(d);
        }
        Ok(size)
    }

    async fn is_linked(&self, repo: &Repo, d: &Digest) -> StoreResult<bool> {
        let key = (repo.clone(), d.clone());
        if self.links.contains_key(&key) {
            return Ok(true);
        }
        let epoch = self.unlinks.load(Ordering::Acquire);
        let linked = self.backend.has(&layout::layer_link(repo, d)).await?;
        if linked {
            let _g = self.link_lock.lock().unwrap();
            if self.unlinks.load(Ordering::Acquire) == epoch {
                self.links.insert(key, ());
            }
        }
        Ok(linked)
    }

    /// The shared guards of `ds` (see [`guard`]): none of them is removed while they are held.
    /// Never nested: helpers that run under them take the [`Reach`] instead.
    ///
    /// In a fleet, other replicas' removals too: every digest first gets a durable access
    /// record (another replica's removal that re-checks after this sees the use), then the
    /// removal leases of the digests are read (one request); while one is held, this waits
    /// for it (at most the fleet's wait limit, else [`StoreError::RemovalBusy`]). So the
    /// existence check that follows sees either the content that stays or its deletion.
    pub async fn reach(&self, ds: &[&Digest]) -> StoreResult<Reach> {
        let mut reach = self.guards.reach(ds).await;
        let Some(c) = self.fleet.get() else { return Ok(reach) };
        futures::future::try_join_all(ds.iter().map(|d| self.record_access_checked(d))).await?;
        reach.set_recorded(ds);
        let names: Vec<String> = ds.iter().map(removal_lease).collect();
        let held: Vec<&String> =
            names.iter().zip(c.holders(&names).await).filter(|(_, h)| h.is_some()).map(|(n, _)| n).collect();
        if held.is_empty() {
            return Ok(reach);
        }
        crate::hooks::pause("fleet.removal_wait").await;
        let _waiting = crate::metrics::cluster_waiting("remove");
        let deadline = Instant::now() + c.wait_limit();
        for name in held {
            let left = deadline.saturating_duration_since(Instant::now());
            if !c.wait_free(name, left).await {
                crate::metrics::cluster_wait("remove", "busy");
                return Err(StoreError::RemovalBusy);
            }
        }
        crate::metrics::cluster_wait("remove", "served");
        Ok(reach)
    }

    /// The exclusive guards of `ds`, or `None` when something holds one of them (leave the
    /// content for the next pass). Removals re-check under them before they delete. In a
    /// fleet, also the removal lease of every digest: `None` when another replica holds one,
    /// or when Redis does not answer (a push on another replica reads the leases to wait for
    /// a removal: one that took none, or whose claim Redis applied but answered late, would
    /// delete what that push was just told is stored; removals wait until Redis answers).
    pub async fn try_removal(&self, ds: &[&Digest]) -> Option<Removal> {
        let mut removal = self.guards.try_remove(ds).await?;
        if let Some(c) = self.fleet.get() {
            let mut names: Vec<String> = ds.iter().map(removal_lease).collect();
            names.sort_unstable();
            names.dedup();
            for name in names {
                match c.claim(&name).await {
                    Claim::Mine(lease) => removal.leases.push(lease),
                    // Another replica removes it (or its lease outlived a crash), or Redis
                    // does not answer: next pass.
                    Claim::Held(_) | Claim::Alone => return None,
                }
            }
        }
        Some(removal)
    }

    /// Makes committed content visible in `repo`: under the digest's shared guard, links it
    /// if the backend holds the content (not a cache's word). Whether it is linked.
    pub async fn link_blob(&self, repo: &Repo, d: &Digest) -> StoreResult<bool> {
        let reach = self.reach(&[d]).await?;
        if self.backend.stat(d).await?.is_none() {
            self.sizes.invalidate(d);
            return Ok(false);
        }
        self.link_guarded(&reach, repo, d).await?;
        self.touch(d);
        Ok(true)
    }

    /// Cross-repository mount: under the digest's shared guard, links `d` into `repo` if it is
    /// linked in `from` and its content is there (both asked of the backend). Whether it is.
    pub async fn mount_blob(&self, from: &Repo, repo: &Repo, d: &Digest) -> StoreResult<bool> {
        let reach = self.reach(&[d]).await?;
        if !self.backend.has(&layout::layer_link(from, d)).await? || self.backend.stat(d).await?.is_none() {
            return Ok(false);
        }
        crate::hooks::pause("mount.after_check").await;
        self.link_guarded(&reach, repo, d).await?;
        self.touch(d);
        Ok(true)
    }

    /// Writes the link of `d` in `repo` under `d`'s shared guard (content known present).
    /// A new link gets a durable access record first (another replica's eviction sees it),
    /// unless one was written under this reach.
    pub(crate) async fn link_guarded(&self, reach: &Reach, repo: &Repo, d: &Digest) -> StoreResult<()> {
        debug_assert!(reach.covers(d));
        let key = layout::layer_link(repo, d);
        let created = if !self.backend.has(&key).await? {
            if !reach.recorded(d) {
                self.record_access_now(d).await;
            }
            self.backend.put(&key, b"").await?;
            self.note(index::Change::Linked { repo: repo.clone(), digest: d.clone() });
            self.catalog.add(repo)
        } else {
            false
        };
        {
            let _g = self.link_lock.lock().unwrap();
            self.links.insert((repo.clone(), d.clone()), ());
        }
        if created {
            self.tell(Event::RepoCreated { repo: Store::repo_key(repo) }).await;
        }
        Ok(())
    }

    /// Removes a blob from `repo`'s view. The content stays for other repositories.
    pub async fn unlink_blob(&self, repo: &Repo, d: &Digest) -> StoreResult<bool> {
        let removed = self.backend.remove(&layout::layer_link(repo, d)).await;
        self.forget_link(repo, d);
        if matches!(removed, Ok(true)) {
            self.note(index::Change::Unlinked { repo: repo.clone(), digest: d.clone() });
        }
        if matches!(removed, Ok(true)) {
            self.tell(Event::LinkGone { repo: Store::repo_key(repo), digest: d.to_string() }).await;
        }
        removed
    }

    /// Stores small content (a manifest) under its digest in `alg` through the one writer;
    /// returns that digest.
    pub async fn put_bytes(&self, alg: Algorithm, bytes: &[u8]) -> StoreResult<Digest> {
        let digest = Digest::of(alg, bytes);
        let mut reach = self.reach(&[&digest]).await?;
        self.put_bytes_guarded(&mut reach, &digest, bytes).await?;
        self.touch(&digest);
        Ok(digest)
    }

    /// [`Store::put_bytes`] under `digest`'s shared guard: the bytes are written unless the
    /// backend (not the size cache) has them.
    pub(crate) async fn put_bytes_guarded(&self, reach: &mut Reach, digest: &Digest, bytes: &[u8]) -> StoreResult<()> {
        if self.backend.stat(digest).await?.is_some() {
            return Ok(());
        }
        let (id, hold) = self.sessions.new_ingest().await;
        let kind = IngestKind::Fill { digest: digest.to_string() };
        let opts = WriterOptions { kind, alg: digest.algorithm(), batch_bytes: UPLOAD_BATCH };
        let mut w = self.backend.create_writer(id, opts, hold).await?;
        if let Err(e) = w.write(Bytes::copy_from_slice(bytes)).await {
            let _ = w.abort().await;
            return Err(e);
        }
        let verified = w.verify(digest, Some(bytes.len() as u64)).await?;
        self.publish_guarded(reach, verified, digest).await?;
        Ok(())
    }

    /// Commits verified content and records it, under its shared guard.
    pub async fn publish(&self, v: Box<dyn Verified>, d: &Digest) -> StoreResult<u64> {
        let mut reach = self.reach(&[d]).await?;
        let size = self.publish_guarded(&mut reach, v, d).await?;
        self.touch(d);
        Ok(size)
    }

    /// Commits verified content and links it into `repo` under one shared guard (a fill, an
    /// upload): nothing can remove it between the two.
    pub async fn publish_linked(&self, v: Box<dyn Verified>, d: &Digest, repo: &Repo) -> StoreResult<u64> {
        let mut reach = self.reach(&[d]).await?;
        let size = self.publish_guarded(&mut reach, v, d).await?;
        self.link_guarded(&reach, repo, d).await?;
        self.touch(d);
        // Only a fill adds to what the cap counts (pushed and imported bytes are pinned).
        if matches!(repo, Repo::Cache { .. }) {
            self.note_committed(size);
        }
        Ok(size)
    }

    /// [`Store::publish`] under `d`'s shared guard. The size is cached only if no deletion
    /// happened meanwhile (another replica's, heard as an event).
    pub(crate) async fn publish_guarded(
        &self,
        reach: &mut Reach,
        v: Box<dyn Verified>,
        d: &Digest,
    ) -> StoreResult<u64> {
        debug_assert!(reach.covers(d));
        // Used now, recorded before it is visible: a collection that sees the content sees
        // that it is new (on any replica).
        self.touch(d);
        if !reach.recorded(d) && self.record_access_checked(d).await.is_ok() {
            reach.mark_recorded(d);
        }
        let epoch = self.deletions.load(Ordering::Acquire);
        let size = v.commit().await?;
        self.note(index::Change::Committed { digest: d.clone(), size, at: index::unix_now() });
        {
            let _g = self.link_lock.lock().unwrap();
            if self.deletions.load(Ordering::Acquire) == epoch {
                self.sizes.insert(d.clone(), size);
            }
        }
        Ok(size)
    }

    /// Opens the writer of a pull-through fill of `d` (an ingest like an upload's).
    pub async fn begin_fill(&self, d: &Digest) -> StoreResult<Box<dyn Writer>> {
        let (id, hold) = self.sessions.new_ingest().await;
        let opts = WriterOptions {
            kind: IngestKind::Fill { digest: d.to_string() },
            alg: d.algorithm(),
            batch_bytes: FILL_BATCH,
        };
        self.backend.create_writer(id, opts, hold).await
    }

    /// Whether the store accepts writes (reported as `stevedore_store_writable`).
    pub async fn writable(&self) -> bool {
        self.backend.writable().await
    }

    /// Whether the store can serve what it holds (readiness).
    pub async fn readable(&self) -> bool {
        self.backend.readable().await
    }
}

/// One writer per ingest at a time, in this process. Entries exist only while somebody holds
/// or waits for a lock: dead ones are pruned as the map grows, so requests for sessions that
/// do not exist leave nothing behind.
#[derive(Default)]
struct Locks {
    /// The live locks, and the map size at which dead entries are pruned next.
    map: Mutex<(HashMap<IngestId, Weak<SessionLock>>, usize)>,
}

type SessionLock = tokio::sync::Mutex<()>;

impl Locks {
    fn get(&self, id: &IngestId) -> Arc<tokio::sync::Mutex<()>> {
        let mut guard = self.map.lock().unwrap();
        let (map, prune_at) = &mut *guard;
        if let Some(lock) = map.get(id).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(*id, Arc::downgrade(&lock));
        if map.len() >= *prune_at {
            map.retain(|_, w| w.strong_count() > 0);
            *prune_at = (map.len() * 2).max(64);
        }
        lock
    }

    /// A new ingest id, locked.
    async fn new_ingest(&self) -> (IngestId, backend::Hold) {
        let id = backend::new_ingest_id();
        let guard = self.get(&id).lock_owned().await;
        (id, Box::new(guard))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().0.len()
    }
}

/// The catalog's index: every repository name, kept in memory. Built by one walk of the
/// backend on first use; every repository created since is added as it is created (here, or
/// on another replica: [`Event::RepoCreated`]). With replicas, walked again once `ttl` old
/// (an event may have been missed).
#[derive(Default)]
struct Catalog {
    names: Mutex<BTreeSet<String>>,
    /// When the backend was last walked (`None`: not yet, or expired).
    walked: tokio::sync::Mutex<Option<Instant>>,
    /// Set by [`Catalog::expire`]: walk again at the next listing.
    stale: std::sync::atomic::AtomicBool,
    ttl: Option<Duration>,
}

impl Catalog {
    /// Adds a name; whether it is new here.
    fn add(&self, repo: &Repo) -> bool {
        self.names.lock().unwrap().insert(repo.to_string())
    }

    fn expire(&self) {
        self.stale.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn session_locks_exist_only_while_held() {
        let locks = Locks::default();
        for _ in 0..10_000 {
            let id = backend::new_ingest_id();
            let _g = locks.get(&id).lock_owned().await;
        }
        assert!(locks.len() <= 128, "{} lock entries left for 10000 finished requests", locks.len());
        let id = backend::new_ingest_id();
        let held = locks.get(&id);
        let _g = held.clone().lock_owned().await;
        assert!(locks.get(&id).try_lock().is_err(), "the same id gets the same lock while it is held");
    }

    /// A filesystem store in `root`.
    async fn test_store(root: &std::path::Path, fsync: bool) -> Arc<Store> {
        let cfg = StoreConfig { root: root.into(), fsync, descriptor_cache_capacity: 100, cache_ttl: None };
        Store::open(&cfg).await.unwrap()
    }

    /// A fill's batches become readable through its tail as the worker lands them, without
    /// another write from the network side (followers must not wait for the next chunk), and
    /// the bytes read back, the verification and the committed blob are the bytes written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fills_batches_are_readable_as_they_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_store(dir.path(), true).await;
        // 3.5 batches of a byte pattern that shows any reordering or loss.
        let body: Vec<u8> = (0..FILL_BATCH * 7 / 2).map(|i| (i % 251) as u8).collect();
        let d = Digest::sha256(&body);
        let mut w = store.begin_fill(&d).await.unwrap();
        let tail = w.tail();
        for chunk in body.chunks(FILL_BATCH / 16) {
            w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        // Every whole batch was sent; none is followed by another write.
        let sent = (body.len() / FILL_BATCH * FILL_BATCH) as u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while w.readable() < sent {
            assert!(std::time::Instant::now() < deadline, "readable stuck at {} of {sent}", w.readable());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(w.readable(), sent, "only sent batches are readable");
        let mut read = Vec::new();
        while (read.len() as u64) < sent {
            read.extend_from_slice(&tail.read(read.len() as u64, sent).await.unwrap());
        }
        assert!(read == body[..sent as usize], "the tail reads back the bytes written");
        let size = w.verify(&d, Some(body.len() as u64)).await.unwrap().commit().await.unwrap();
        assert_eq!(size, body.len() as u64);
        let stored = std::fs::read(dir.path().join(layout::blob(&d).as_str())).unwrap();
        assert!(stored == body, "the committed blob is the bytes written");
    }

    #[tokio::test]
    async fn an_unlinked_blob_is_never_cached_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_store(dir.path(), false).await;
        let repo = Repo::Local("a/b".parse().unwrap());
        let d = store.put_bytes(Algorithm::Sha256, b"content").await.unwrap();
        for _ in 0..200 {
            store.link_blob(&repo, &d).await.unwrap();
            store.links.invalidate(&(repo.clone(), d.clone()));
            // A reader racing the unlink.
            let (s2, r2, d2) = (store.clone(), repo.clone(), d.clone());
            let reader = tokio::spawn(async move { s2.is_linked(&r2, &d2).await.unwrap() });
            assert!(store.unlink_blob(&repo, &d).await.unwrap());
            reader.await.unwrap();
            assert!(!store.is_linked(&repo, &d).await.unwrap(), "an unlinked blob reads as linked");
        }
    }
}
