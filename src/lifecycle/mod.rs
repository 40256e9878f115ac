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

/// The lifecycle of one store: one eviction or collection at a time in this process.
pub struct Lifecycle {
    store: Arc<Store>,
    cfg: CacheConfig,
    lock: tokio::sync::Mutex<()>,
}

impl Lifecycle {
    pub fn new(store: Arc<Store>, cfg: &CacheConfig) -> Arc<Lifecycle> {
        let lc = Arc::new(Lifecycle { store, cfg: cfg.clone(), lock: tokio::sync::Mutex::new(()) });
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

    /// Bytes used by kind (a full scan).
    pub async fn usage(&self) -> StoreResult<Usage> {
        let _g = self.lock.lock().await;
        Ok(self.scan().await?.usage)
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

    /// Measures usage and applies the cap and the age limit; `pressure`: space is needed
    /// now (a write hit a full store), so something is evicted even under the cap. Skipped
    /// (nothing evicted) while another replica runs a pass.
    pub async fn check(&self, pressure: bool) -> StoreResult<Evicted> {
        let _g = self.lock.lock().await;
        let Ok(_pass) = self.fleet_pass("eviction").await else { return Ok(Evicted::default()) };
        let scan = self.scan().await?;
        let proxied = scan.usage.proxied;
        let cap = match self.marks() {
            Some((high, low)) if proxied > high => Some(low),
            _ => None,
        };
        // A full store: a tenth of the proxied content (at least down to the low mark), but
        // never what was used within the last check interval (the working set stays served).
        let full = pressure.then(|| {
            let (_, low) = self.marks().unwrap_or((u64::MAX, u64::MAX));
            let target = proxied.saturating_sub((proxied / 10).max(1)).min(low);
            (target, scan.start.checked_sub(self.cfg.check_interval).unwrap_or(SystemTime::UNIX_EPOCH))
        });
        let out = self.evict(scan, cap, full).await?;
        crate::metrics::usage(&out.before, out.after_proxied);
        if out.items > 0 {
            crate::metrics::evicted(out.bytes, out.items);
            tracing::info!(
                bytes = out.bytes,
                items = out.items,
                manifests = out.manifests,
                proxied_before = out.before.proxied,
                proxied_after = out.after_proxied,
                "evicted least recently used proxied content"
            );
        }
        Ok(out)
    }

    async fn scan(&self) -> StoreResult<Scan> {
        let store = &self.store;
        let start = SystemTime::now();
        store.records().committed_since_scan.store(0, Ordering::Release);
        let sizes: HashMap<Digest, u64> = store.contents().await?.into_iter().collect();
        let mut s = Scan {
            start,
            sizes,
            kinds: HashMap::new(),
            access: HashMap::new(),
            links: HashMap::new(),
            needed: HashMap::new(),
            repo_needed: HashMap::new(),
            repo_linked: HashSet::new(),
            units: Vec::new(),
            usage: Usage::default(),
        };
        let mut pushed: HashSet<Digest> = HashSet::new();
        let mut cached_units = Vec::new();
        for repo in store.repositories().await? {
            let manifests = store.repo_manifests(&repo).await?;
            let links = store.repo_links(&repo).await?;
            let local = matches!(repo, Repo::Local(_));
            let mut needs_here: HashSet<Digest> = HashSet::new();
            for (m, _) in &manifests {
                *s.links.entry(m.clone()).or_default() += 1;
                let refs = store.references(&repo, m).await?.unwrap_or_default();
                for n in &refs.needs {
                    *s.needed.entry(n.clone()).or_default() += 1;
                    *s.repo_needed.entry((repo.clone(), n.clone())).or_default() += 1;
                    needs_here.insert(n.clone());
                }
                if local {
                    pushed.insert(m.clone());
                    pushed.extend(refs.needs.iter().cloned());
                } else {
                    cached_units.push(Unit {
                        repo: Some(repo.clone()),
                        manifest: Some(m.clone()),
                        blobs: refs.needs.clone(),
                        subject: refs.subject.clone(),
                        last: start,
                    });
                }
            }
            for (b, _) in &links {
                *s.links.entry(b.clone()).or_default() += 1;
                s.repo_linked.insert((repo.clone(), b.clone()));
                if local {
                    pushed.insert(b.clone());
                } else if !needs_here.contains(b) && !manifests.iter().any(|(m, _)| m == b) {
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
                cached_units.push(Unit {
                    repo: None,
                    manifest: None,
                    blobs: vec![d.clone()],
                    subject: None,
                    last: start,
                });
            }
        }
        let mut oldest: Option<SystemTime> = None;
        for (d, size) in &s.sizes {
            let kind = if pushed.contains(d) {
                Kind::Pushed
            } else if store.is_imported(d).await? {
                Kind::Imported
            } else {
                Kind::Proxied
            };
            let t = store.ensure_access(d).await?;
            s.access.insert(d.clone(), t);
            s.kinds.insert(d.clone(), kind);
            match kind {
                Kind::Pushed => s.usage.pushed += size,
                Kind::Imported => s.usage.imported += size,
                Kind::Proxied => {
                    s.usage.proxied += size;
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
        store.records().proxied_at_scan.store(s.usage.proxied, Ordering::Release);
        Ok(s)
    }

    /// Evicts units, least recently used first, until proxied usage is at `target` (if
    /// given), or at `full.0` among units unused since `full.1`, and every unit unused for
    /// longer than `cache.max_unused`.
    async fn evict(&self, mut s: Scan, target: Option<u64>, full: Option<(u64, SystemTime)>) -> StoreResult<Evicted> {
        let store = &self.store;
        let mut out = Evicted { before: s.usage.clone(), ..Evicted::default() };
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
                continue;
            }
            let digests: Vec<Digest> = u.manifest.iter().chain(u.blobs.iter()).cloned().collect();
            // The mutation protocol: under the unit's exclusive guards nothing makes any of it
            // reachable; whatever did since the scan recorded a use, re-checked here. A unit
            // something is being linked to right now is left for the next pass.
            let refs: Vec<&Digest> = digests.iter().collect();
            let Some(_removal) = store.try_removal(&refs).await else { continue };
            if digests.iter().any(|d| store.in_use(d)) {
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
                continue;
            }
            crate::hooks::pause("evict.before_delete").await;
            let mut candidates = Vec::new();
            if let Some(repo) = &u.repo {
                if let Some(m) = &u.manifest {
                    if store.delete_manifest(repo, m, u.subject.as_ref()).await? {
                        out.manifests += 1;
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
                }
                s.kinds.remove(&d);
            }
        }
        out.after_proxied = proxied;
        store.records().proxied_at_scan.store(proxied, Ordering::Release);
        Ok(out)
    }

    /// Garbage collection of pushed repositories (see [`gc`]). Skipped while another
    /// replica runs a pass ([`gc::GcReport::skipped`]); a dry run changes nothing and runs
    /// regardless.
    pub async fn gc(&self, dry_run: bool) -> StoreResult<gc::GcReport> {
        let _g = self.lock.lock().await;
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

    /// Runs until the runtime stops: usage checks (every `check_interval`, and at once when
    /// space is needed), access flushes, the periodic GC.
    pub fn spawn(self: &Arc<Lifecycle>) {
        let lc = self.clone();
        tokio::spawn(async move {
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
                    match lc.gc(false).await {
                        Ok(r) if r.unlinked + r.deleted > 0 => tracing::info!(
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

fn dec(m: &mut HashMap<Digest, usize>, d: &Digest) {
    if let Some(n) = m.get_mut(d) {
        *n = n.saturating_sub(1);
    }
}

/// How long ago `t` was.
pub fn age(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}
