//! Cache lifecycle over the store seam: usage by kind, the size cap with reference-aware LRU
//! eviction of proxied content, the age limit, garbage collection of pushed repositories
//! ([`gc`]) and the store check ([`fsck`]).
//!
//! Everything here goes through [`Store`] (and so through the backend seam): it holds on any
//! backend. The records it relies on (access times, references, the imported mark) are
//! described in `storage/index.rs`.
//!
//! Eviction is coherent:
//! - the unit is a manifest in an upstream's cache repository with the blobs it needs
//!   (config, layers), or a blob linked there that no manifest of the repository needs;
//! - a manifest goes with the tags pointing at it; a blob is unlinked from the repository
//!   only when no kept manifest of it needs it, and its content is deleted only when no
//!   repository links it and no kept manifest anywhere needs it;
//! - pushed content (anything a local repository holds or needs) and imported content are
//!   never evicted; content in use (an open read, a fill) or used since the scan is skipped;
//! - an index does not need its children (a client pulls one platform), so a child can be
//!   evicted while the index stays: it is fetched again when asked for.

pub mod fsck;
pub mod gc;
pub mod index;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cluster::{Claim, Holder, Lease};
use crate::config::CacheConfig;
use crate::oci::Digest;
use crate::storage::{Repo, Store, StoreResult};

/// The lease of a lifecycle pass across the replicas sharing a store.
pub const LIFECYCLE_LEASE: &str = "lifecycle";

/// How a piece of content came to be in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Held or needed by a local repository: pushed by a client.
    Pushed,
    /// Loaded by `stevedore import`.
    Imported,
    /// Pulled through from an upstream (or no longer referenced by anything).
    Proxied,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Pushed => "pushed",
            Kind::Imported => "imported",
            Kind::Proxied => "proxied",
        }
    }
}

/// Bytes and items of content by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub pushed: u64,
    pub imported: u64,
    pub proxied: u64,
    /// Bytes held by ingests (upload sessions, fills): not evictable, but counted against
    /// the cap beside proxied content.
    pub ingest: u64,
    pub items: usize,
    /// The least recently used proxied content's last use.
    pub oldest_access: Option<SystemTime>,
}

/// What an eviction did.
#[derive(Clone, Debug, Default)]
pub struct Evicted {
    pub bytes: u64,
    /// Pieces of content deleted.
    pub items: usize,
    pub manifests: usize,
    pub before: Usage,
    pub after_proxied: u64,
    /// The target proxied usage (`None`: no cap pass, only the age limit or pressure).
    pub target: Option<u64>,
    /// Units over the target left in place, by why: something was making them reachable
    /// (their guard was busy, or another replica's removal lease); a piece of them was being
    /// read or filled; used since the scan; an orphan within its grace period.
    pub kept_busy: usize,
    pub kept_in_use: usize,
    pub kept_used: usize,
    pub kept_grace: usize,
}

/// One eviction unit (see the module doc).
struct Unit {
    repo: Option<Repo>,
    manifest: Option<Digest>,
    blobs: Vec<Digest>,
    subject: Option<Digest>,
    last: SystemTime,
}

/// A picture of the store: sizes, kinds, references, units.
struct Scan {
    start: SystemTime,
    sizes: HashMap<Digest, u64>,
    kinds: HashMap<Digest, Kind>,
    access: HashMap<Digest, SystemTime>,
    /// Links (blob links and manifest revisions) to each digest, in all repositories.
    links: HashMap<Digest, usize>,
    /// Manifests (anywhere) that need each digest.
    needed: HashMap<Digest, usize>,
    /// (repository, digest) → manifests of the repository that need it.
    repo_needed: HashMap<(Repo, Digest), usize>,
    /// (repository, digest) linked as a blob.
    repo_linked: HashSet<(Repo, Digest)>,
    units: Vec<Unit>,
    usage: Usage,
}

/// What the lifecycle holds between passes (under its lock).
#[derive(Default)]
struct State {
    /// `None` until loaded or built.
    index: Option<index::Index>,
    /// Rebuild the index (by one walk) before the next pass.
    drift: bool,
    /// The index changed since `usage` was computed.
    changed: bool,
    usage: Usage,
    /// Shutting down: the index was saved, nothing runs any more.
    sealed: bool,
    /// The last check applied changes (the store was in use): the first check that applies
    /// none gives the allocator's free memory back ([`release_free_memory`]).
    busy: bool,
    /// The store's generation (changed by offline tools) the index reflects.
    generation: Option<bytes::Bytes>,
}

/// The lifecycle of one store: one eviction or collection at a time in this process.
pub struct Lifecycle {
    store: Arc<Store>,
    cfg: CacheConfig,
    state: tokio::sync::Mutex<State>,
}

impl Lifecycle {
    pub fn new(store: Arc<Store>, cfg: &CacheConfig) -> Arc<Lifecycle> {
        let lc = Arc::new(Lifecycle { store, cfg: cfg.clone(), state: tokio::sync::Mutex::new(State::default()) });
        if let Some((high, low)) = lc.marks() {
            lc.store.records().high_mark.store(high, Ordering::Release);
            crate::metrics::cache_limits(lc.cfg.max_size.map_or(0, |m| m.0), high, low);
        }
        lc
    }

    /// The high and low watermarks in bytes, when a cap is set.
    pub fn marks(&self) -> Option<(u64, u64)> {
        let max = self.cfg.max_size?.0;
        Some((self.cfg.high_watermark.bytes(max), self.cfg.low_watermark.bytes(max)))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Whether the store is shared with other replicas: their changes are not in this
    /// process's journal, so the index is rebuilt for every pass (the lease makes one replica
    /// at a time run one).
    fn shared(&self) -> bool {
        self.store.fleet().is_some()
    }

    /// Loads the index a clean stop saved (trusted only with its clean-shutdown marker), or
    /// builds it by one walk; then removes the marker (a crash from here on is not a clean
    /// stop) and keeps the journal of changes.
    pub async fn open(&self) -> StoreResult<()> {
        let mut st = self.state.lock().await;
        self.store.start_journal();
        st.generation = self.store.index_generation().await?;
        let saved = match self.shared() {
            true => None,
            false => self.store.saved_index().await?.and_then(|raw| index::Index::decode(&raw)),
        };
        match saved {
            Some(ix) => {
                tracing::info!(content = ix.content.len(), "lifecycle index loaded (clean stop)");
                st.index = Some(ix);
            }
            None => self.rebuild(&mut st, "start").await?,
        }
        self.store.claim_index().await?;
        st.changed = true;
        self.catch_up(&mut st).await
    }

    async fn rebuild(&self, st: &mut State, reason: &'static str) -> StoreResult<()> {
        // Changes from here on are applied to what the walk finds (applying one twice is
        // harmless: the index is sets and maxima).
        self.store.start_journal();
        let started = std::time::Instant::now();
        let ix = index::Index::build(&self.store).await?;
        if reason != "shared" {
            tracing::info!(
                reason,
                content = ix.content.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "lifecycle index rebuilt by walking the store"
            );
        }
        crate::metrics::index_rebuilt(reason);
        st.index = Some(ix);
        st.drift = false;
        st.changed = true;
        Ok(())
    }

    /// Brings the index up to date: the journal's changes applied, or a rebuild after drift
    /// (or for every pass on a shared store).
    async fn catch_up(&self, st: &mut State) -> StoreResult<()> {
        if st.index.is_none() || st.drift {
            let reason = if st.index.is_none() { "start" } else { "drift" };
            return self.rebuild(st, reason).await;
        }
        if self.shared() {
            return self.rebuild(st, "shared").await;
        }
        // An offline tool (prefetch) changed the store beside this server: not in the journal.
        let generation = self.store.index_generation().await?;
        if generation != st.generation {
            st.generation = generation;
            // Repositories it created are in no cache here: the catalog is walked again.
            self.store.expire_catalog();
            tracing::info!("the store was changed by an offline tool; rebuilding the lifecycle index");
            return self.rebuild(st, "drift").await;
        }
        let Some(changes) = self.store.drain_changes() else {
            tracing::warn!("the lifecycle journal overflowed; rebuilding the index");
            return self.rebuild(st, "drift").await;
        };
        if changes.is_empty() {
            return Ok(());
        }
        st.changed = true;
        let ix = st.index.as_mut().expect("index loaded");
        for c in changes {
            if let Err(index::Drift(why)) = ix.apply(c) {
                tracing::warn!(%why, "the lifecycle index drifted from the store; rebuilding it");
                return self.rebuild(st, "drift").await;
            }
        }
        Ok(())
    }

    /// Recomputes usage from the index when it changed (in memory), and publishes it.
    fn refresh_usage(&self, st: &mut State) {
        if st.changed {
            if let Some(ix) = &st.index {
                st.usage = usage_of(ix);
            }
            st.changed = false;
        }
        st.usage.ingest = self.store.ingest_bytes();
        let u = &st.usage;
        let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.store.set_usage(crate::storage::UsageSnapshot {
            pushed: u.pushed,
            imported: u.imported,
            proxied: u.proxied,
            ingest: u.ingest,
            items: u.items as u64,
            oldest_access_ms: u.oldest_access.map(ms).unwrap_or(0),
            known: true,
        });
        self.store.records().proxied_at_scan.store(u.proxied, Ordering::Release);
        let oldest = u.oldest_access.map(|t| age(t).as_secs_f64()).unwrap_or(0.0);
        crate::metrics::usage(u.pushed, u.imported, u.proxied, oldest);
        crate::metrics::ingest_bytes(u.ingest);
        crate::metrics::store_bytes(u.pushed + u.imported + u.proxied);
    }

    /// The fleet's lease for one pass (eviction or GC), so that one replica at a time runs
    /// one: `Err(holder)` when another replica (or `stevedore gc`) is running one; `Ok(None)`
    /// without coordination (each replica on its own, as a lone one).
    async fn fleet_pass(&self, pass: &'static str) -> Result<Option<Lease>, Holder> {
        let Some(c) = self.store.fleet() else { return Ok(None) };
        match c.claim(LIFECYCLE_LEASE).await {
            Claim::Mine(l) => Ok(Some(l)),
            Claim::Alone => Ok(None),
            Claim::Held(h) => {
                crate::metrics::cluster_lifecycle_skipped(pass);
                tracing::debug!(holder = %h.replica, pass, "another replica runs the cache lifecycle; skipping this pass");
                Err(h)
            }
        }
    }

    /// Applies the cap and the age limit to usage as the index knows it; `pressure`: space
    /// is needed now (a write hit a full store), so something is evicted even under the cap.
    /// Nothing is asked of the backend unless something is to be evicted. Skipped (nothing
    /// evicted) while another replica runs a pass.
    pub async fn check(&self, pressure: bool) -> StoreResult<Evicted> {
        let mut st = self.state.lock().await;
        if st.sealed {
            return Ok(Evicted::default());
        }
        let Ok(_pass) = self.fleet_pass("eviction").await else { return Ok(Evicted::default()) };
        // The last pass is over: the uses flushes skipped since the one before are noted.
        self.store.begin_scan();
        // Before the journal is drained: any use after this is seen by the re-checks.
        let start = SystemTime::now();
        self.store.records().committed_since_scan.store(0, Ordering::Release);
        // The batch of uses before the changes: a use flushed in between is in one of them.
        let pending = self.store.pending_uses();
        self.catch_up(&mut st).await?;
        let busy = st.changed;
        if st.busy && !busy {
            release_free_memory();
        }
        st.busy = busy;
        self.refresh_usage(&mut st);
        let proxied = st.usage.proxied;
        // Ingests count against the cap but are not evictable (as pinned content is not):
        // past the high mark, proxied content goes down to the low mark less what they hold.
        let ingest = st.usage.ingest;
        let cap = match self.marks() {
            Some((high, low)) if proxied + ingest > high && proxied > low.saturating_sub(ingest) => {
                Some(low.saturating_sub(ingest))
            }
            _ => None,
        };
        let expired = self
            .cfg
            .max_unused
            .and_then(|age| start.checked_sub(age))
            .is_some_and(|before| st.usage.oldest_access.is_some_and(|t| t < before));
        if cap.is_none() && !pressure && !expired {
            return Ok(Evicted { before: st.usage.clone(), after_proxied: proxied, ..Evicted::default() });
        }
        let mut scan = view(st.index.as_ref().expect("index loaded"), start, &pending);
        scan.usage.ingest = ingest;
        // A full store: a tenth of the proxied content (at least down to the low mark), but
        // never what was used within the last check interval (the working set stays served).
        let full = pressure.then(|| {
            let (_, low) = self.marks().unwrap_or((u64::MAX, u64::MAX));
            let target = proxied.saturating_sub((proxied / 10).max(1)).min(low);
            (target, start.checked_sub(self.cfg.check_interval).unwrap_or(SystemTime::UNIX_EPOCH))
        });
        let out = self.evict(scan, cap, full).await;
        crate::hooks::pause("evict.done").await;
        if matches!(out, Ok((_, true))) {
            st.drift = true;
        }
        // What the eviction removed, into the index (and usage) now; a shared store's next
        // pass walks it again anyway.
        if self.shared() {
            if let Ok((e, _)) = &out {
                st.usage.proxied = e.after_proxied;
            }
        } else {
            self.catch_up(&mut st).await?;
        }
        self.refresh_usage(&mut st);
        let (out, _) = out?;
        if out.items > 0 {
            crate::metrics::evicted(out.bytes, out.items);
            tracing::info!(
                bytes = out.bytes,
                items = out.items,
                manifests = out.manifests,
                proxied_before = out.before.proxied,
                proxied_after = out.after_proxied,
                target = out.target,
                ingest = out.before.ingest,
                kept_busy = out.kept_busy,
                kept_in_use = out.kept_in_use,
                kept_used = out.kept_used,
                kept_grace = out.kept_grace,
                "evicted least recently used proxied content"
            );
        }
        Ok(out)
    }

    /// Usage by kind as of the last check (no backend request; before the first check the
    /// index is computed from what is loaded).
    pub async fn usage(&self) -> Usage {
        self.state.lock().await.usage.clone()
    }

    /// Saves the index with its clean-shutdown marker (a clean stop): the next start loads it
    /// instead of walking the store. Nothing runs after this.
    pub async fn save(&self) -> StoreResult<()> {
        let mut st = self.state.lock().await;
        if st.sealed || st.index.is_none() || self.shared() {
            return Ok(());
        }
        self.catch_up(&mut st).await?;
        st.sealed = true;
        let raw = st.index.as_ref().expect("index loaded").encode();
        self.store.save_index(&raw).await?;
        // A change that slipped in after the drain (a fill finishing): not a clean index.
        if !self.store.drain_changes().is_some_and(|c| c.is_empty()) {
            self.store.distrust_index().await?;
        }
        Ok(())
    }

    /// Evicts units, least recently used first, until proxied usage is at `target` (if
    /// given), or at `full.0` among units unused since `full.1`, and every unit unused for
    /// longer than `cache.max_unused`. `true` beside it: the store did not hold something the
    /// index said it did (drift).
    async fn evict(
        &self,
        mut s: Scan,
        target: Option<u64>,
        full: Option<(u64, SystemTime)>,
    ) -> StoreResult<(Evicted, bool)> {
        let store = &self.store;
        let mut drift = false;
        let mut out = Evicted { before: s.usage.clone(), target, ..Evicted::default() };
        let mut proxied = s.usage.proxied;
        let expired_before = self.cfg.max_unused.and_then(|age| s.start.checked_sub(age));
        let grace_before = s.start.checked_sub(self.cfg.gc_grace);
        let units = std::mem::take(&mut s.units);
        for u in units {
            let over = target.is_some_and(|t| proxied > t)
                || full.is_some_and(|(t, unused_since)| proxied > t && u.last < unused_since);
            let expired = expired_before.is_some_and(|e| u.last < e);
            if !over && !expired {
                continue;
            }
            // Orphans are collected only past the grace period (an upload being linked).
            if u.repo.is_none() && grace_before.is_none_or(|g| u.last >= g) {
                out.kept_grace += 1;
                continue;
            }
            let digests: Vec<Digest> = u.manifest.iter().chain(u.blobs.iter()).cloned().collect();
            // The mutation protocol: under the unit's exclusive guards nothing makes any of it
            // reachable; whatever did since the scan recorded a use, re-checked here. A unit
            // something is being linked to right now is left for the next pass.
            let refs: Vec<&Digest> = digests.iter().collect();
            crate::hooks::pause("evict.before_recheck").await;
            let Some(removal) = store.try_removal(&refs).await else {
                out.kept_busy += 1;
                continue;
            };
            if digests.iter().any(|d| store.in_use(d)) {
                out.kept_in_use += 1;
                continue;
            }
            let mut used_since = false;
            for d in &digests {
                // The unit's age is its proxied parts' (`scan`): a pinned layer used since then
                // keeps nothing cached, but any use since the scan started does (a link).
                let proxied = s.kinds.get(d) == Some(&Kind::Proxied);
                if store.last_access(d).await?.is_some_and(|t| (proxied && t > u.last) || t >= s.start) {
                    used_since = true;
                    break;
                }
            }
            if used_since {
                out.kept_used += 1;
                continue;
            }
            crate::hooks::pause("evict.before_delete").await;
            if removal.lost() {
                out.kept_busy += 1;
                continue;
            }
            let mut candidates = Vec::new();
            if let Some(repo) = &u.repo {
                if let Some(m) = &u.manifest {
                    if store.delete_manifest(repo, m, u.subject.as_ref()).await? {
                        out.manifests += 1;
                    } else {
                        drift = true;
                    }
                    dec(&mut s.links, m);
                    candidates.push(m.clone());
                    for b in &u.blobs {
                        dec(&mut s.needed, b);
                        let key = (repo.clone(), b.clone());
                        let left = s.repo_needed.get_mut(&key).map(|n| {
                            *n -= 1;
                            *n
                        });
                        if left.unwrap_or(0) == 0 && s.repo_linked.remove(&key) {
                            store.unlink_blob(repo, b).await?;
                            dec(&mut s.links, b);
                        }
                        candidates.push(b.clone());
                    }
                } else {
                    for b in &u.blobs {
                        if s.repo_linked.remove(&(repo.clone(), b.clone())) {
                            store.unlink_blob(repo, b).await?;
                            dec(&mut s.links, b);
                        }
                        candidates.push(b.clone());
                    }
                }
            } else {
                candidates.extend(u.blobs.iter().cloned());
            }
            for d in candidates {
                let free = s.links.get(&d).copied().unwrap_or(0) == 0
                    && s.needed.get(&d).copied().unwrap_or(0) == 0
                    && s.kinds.get(&d) == Some(&Kind::Proxied)
                    && !store.in_use(&d);
                if !free {
                    continue;
                }
                if store.delete_content(&d).await? {
                    let size = s.sizes.remove(&d).unwrap_or(0);
                    proxied = proxied.saturating_sub(size);
                    out.bytes += size;
                    out.items += 1;
                } else {
                    drift = true;
                }
                s.kinds.remove(&d);
            }
        }
        out.after_proxied = proxied;
        Ok((out, drift))
    }

    /// Garbage collection of the whole store by walking it (see [`gc::collect`]): the
    /// explicit `stevedore gc`. Skipped while another replica runs a pass
    /// ([`gc::GcReport::skipped`]); a dry run changes nothing and runs regardless.
    pub async fn gc(&self, dry_run: bool) -> StoreResult<gc::GcReport> {
        let _st = self.state.lock().await;
        let _pass = match dry_run {
            true => None,
            false => match self.fleet_pass("gc").await {
                Ok(l) => l,
                Err(h) => return Ok(gc::GcReport { skipped: Some(h), ..gc::GcReport::default() }),
            },
        };
        let r = gc::collect(&self.store, self.cfg.gc_grace, dry_run).await;
        crate::metrics::gc_run(r.is_ok(), r.as_ref().map(|r| r.bytes).unwrap_or(0));
        r
    }

    /// The periodic GC: reviews the queue of candidates (what was unlinked, deleted, evicted
    /// or uploaded since), nothing else; `None` when the queue is empty (nothing is asked of
    /// the backend). On a shared store, the whole store (the queue of changes made by other
    /// replicas is not here).
    pub async fn gc_pass(&self) -> StoreResult<Option<gc::GcReport>> {
        let mut st = self.state.lock().await;
        if st.sealed || st.index.is_none() {
            return Ok(None);
        }
        if self.shared() {
            let Ok(_pass) = self.fleet_pass("gc").await else { return Ok(None) };
            let r = gc::collect(&self.store, self.cfg.gc_grace, false).await;
            crate::metrics::gc_run(r.is_ok(), r.as_ref().map(|r| r.bytes).unwrap_or(0));
            return r.map(Some);
        }
        // Before the journal is drained: whatever is made reachable after this is recent.
        let since = SystemTime::now().checked_sub(self.cfg.gc_grace).unwrap_or(SystemTime::UNIX_EPOCH);
        self.catch_up(&mut st).await?;
        if st.index.as_ref().is_some_and(|ix| ix.gc_queue.is_empty()) {
            return Ok(None);
        }
        let r = gc::review(&self.store, st.index.as_mut().expect("index loaded"), since).await;
        crate::metrics::gc_run(r.is_ok(), r.as_ref().map(|r| r.bytes).unwrap_or(0));
        self.catch_up(&mut st).await?;
        self.refresh_usage(&mut st);
        r.map(Some)
    }

    /// Runs until the runtime stops: loads (or builds) the index, then usage checks (every
    /// `check_interval`, and at once when space is needed), access flushes, the periodic GC.
    pub fn spawn(self: &Arc<Lifecycle>) {
        let lc = self.clone();
        tokio::spawn(async move {
            while let Err(e) = lc.open().await {
                tracing::warn!(error = %e, "loading the lifecycle index failed; trying again");
                tokio::time::sleep(lc.cfg.check_interval).await;
            }
            let mut tick = tokio::time::interval(lc.cfg.check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = lc.store.records().pressure.notified() => {}
                }
                let full = lc.store.records().full.swap(false, Ordering::AcqRel);
                if let Err(e) = lc.check(full).await {
                    tracing::warn!(error = %e, "cache usage check failed");
                }
            }
        });
        let lc = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lc.cfg.access_flush_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                lc.store.flush_access().await;
            }
        });
        if !self.cfg.gc_interval.is_zero() {
            let lc = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(lc.cfg.gc_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match lc.gc_pass().await {
                        Ok(Some(r)) if r.unlinked + r.deleted > 0 => tracing::info!(
                            unlinked = r.unlinked,
                            deleted = r.deleted,
                            bytes = r.bytes,
                            "garbage collection reclaimed unreferenced content"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                    }
                }
            });
        }
    }
}

/// Returns the allocator's free pages to the kernel once the store goes quiet after a burst
/// (pulls, pushes, their access flush). The allocator is tuned to keep freed buffers for
/// reuse while busy (`main.rs`, `tune_allocator`), and what a burst freed lies in holes
/// between the blocks that stay (the index, the descriptor caches): at rest that is memory
/// nobody uses (~6 MiB after 20k blobs pulled through). Once per burst, a few milliseconds;
/// an idle server does not call it again.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory; it may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Usage by kind as [`view`] counts it (no use pending), without building the eviction
/// picture: what each change to the index costs is a pass over the content and no copies.
fn usage_of(ix: &index::Index) -> Usage {
    let pushed = held_locally(ix);
    let mut u = Usage { items: ix.content.len(), ..Usage::default() };
    let mut oldest: Option<u64> = None;
    for (d, c) in &ix.content {
        match kind_of(ix, &pushed, d) {
            Kind::Pushed => u.pushed += c.size,
            Kind::Imported => u.imported += c.size,
            Kind::Proxied => {
                u.proxied += c.size;
                oldest = Some(oldest.map_or(c.access, |o| o.min(c.access)));
            }
        }
    }
    u.oldest_access = oldest.map(crate::storage::index::from_unix);
    u
}

/// What local repositories hold or need (pushed content, whatever else it also is).
fn held_locally(ix: &index::Index) -> HashSet<&Digest> {
    let mut pushed = HashSet::new();
    for (repo, ri) in &ix.repos {
        if matches!(repo, Repo::Local(_)) {
            pushed.extend(ri.manifests.keys());
            pushed.extend(ri.manifests.values().flat_map(|n| n.needs.iter()));
            pushed.extend(ri.links.iter());
        }
    }
    pushed
}

/// The kind `d` is counted as: pushed (held locally) before imported before proxied.
fn kind_of(ix: &index::Index, pushed: &HashSet<&Digest>, d: &Digest) -> Kind {
    if pushed.contains(d) {
        Kind::Pushed
    } else if ix.imported.contains(d) {
        Kind::Imported
    } else {
        Kind::Proxied
    }
}

/// The eviction picture of the index at `start`: sizes, kinds, references, units in LRU
/// order, usage (in memory, no backend request). `pending`: uses not flushed yet, which
/// count as the last use (as the re-checks before a deletion see them).
fn view(ix: &index::Index, start: SystemTime, pending: &HashMap<Digest, u64>) -> Scan {
    let mut s = Scan {
        start,
        sizes: ix.content.iter().map(|(d, c)| (d.clone(), c.size)).collect(),
        kinds: HashMap::new(),
        access: HashMap::new(),
        links: HashMap::new(),
        needed: HashMap::new(),
        repo_needed: HashMap::new(),
        repo_linked: HashSet::new(),
        units: Vec::new(),
        usage: Usage::default(),
    };
    let pushed = held_locally(ix);
    let mut cached_units = Vec::new();
    for (repo, ri) in &ix.repos {
        let local = matches!(repo, Repo::Local(_));
        let mut needs_here: HashSet<&Digest> = HashSet::new();
        for (m, refs) in &ri.manifests {
            *s.links.entry(m.clone()).or_default() += 1;
            for n in &refs.needs {
                *s.needed.entry(n.clone()).or_default() += 1;
                *s.repo_needed.entry((repo.clone(), n.clone())).or_default() += 1;
                needs_here.insert(n);
            }
            if !local {
                cached_units.push(Unit {
                    repo: Some(repo.clone()),
                    manifest: Some(m.clone()),
                    blobs: refs.needs.clone(),
                    subject: refs.subject.clone(),
                    last: start,
                });
            }
        }
        for b in &ri.links {
            *s.links.entry(b.clone()).or_default() += 1;
            s.repo_linked.insert((repo.clone(), b.clone()));
            if !local && !needs_here.contains(b) && !ri.manifests.contains_key(b) {
                cached_units.push(Unit {
                    repo: Some(repo.clone()),
                    manifest: None,
                    blobs: vec![b.clone()],
                    subject: None,
                    last: start,
                });
            }
        }
    }
    // Content nothing links or needs: left by an interrupted eviction or a delete.
    for d in s.sizes.keys() {
        if !s.links.contains_key(d) && !s.needed.contains_key(d) {
            cached_units.push(Unit { repo: None, manifest: None, blobs: vec![d.clone()], subject: None, last: start });
        }
    }
    let mut oldest: Option<SystemTime> = None;
    for (d, c) in &ix.content {
        let kind = kind_of(ix, &pushed, d);
        let ms = pending.get(d).map_or(c.access, |p| c.access.max(*p));
        let t = crate::storage::index::from_unix(ms);
        s.access.insert(d.clone(), t);
        s.kinds.insert(d.clone(), kind);
        match kind {
            Kind::Pushed => s.usage.pushed += c.size,
            Kind::Imported => s.usage.imported += c.size,
            Kind::Proxied => {
                s.usage.proxied += c.size;
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        }
    }
    s.usage.items = s.sizes.len();
    s.usage.oldest_access = oldest;
    for mut u in cached_units {
        let pinned = |d: &Digest| matches!(s.kinds.get(d), Some(Kind::Pushed | Kind::Imported));
        let proxied = |d: &&Digest| s.kinds.get(*d) == Some(&Kind::Proxied);
        let digests = u.manifest.iter().chain(u.blobs.iter());
        // A pushed or imported manifest is not the cap's to evict, nor a unit with nothing
        // proxied. A cached image sharing a layer with a pushed one is: its proxied parts
        // go, the pinned layer stays (content of another kind is never deleted here).
        if u.manifest.as_ref().is_some_and(pinned) || !digests.clone().any(|d| proxied(&d)) {
            continue;
        }
        // Its age is that of its proxied parts (a pushed layer in use keeps nothing cached).
        u.last = digests.filter(proxied).filter_map(|d| s.access.get(d)).max().copied().unwrap_or(start);
        s.units.push(u);
    }
    s.units.sort_by_key(|u| u.last);
    s
}
fn dec(m: &mut HashMap<Digest, usize>, d: &Digest) {
    if let Some(n) = m.get_mut(d) {
        *n = n.saturating_sub(1);
    }
}

/// How long ago `t` was.
pub fn age(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}
