//! The lifecycle records, kept in the backend as small metadata objects (see [`layout`]):
//! when content was last used, what each manifest references, which content was imported.
//!
//! Why in the backend rather than an embedded database: they then hold on every backend (a
//! bucket shared by replicas included), and `gc`, `fsck` and `import` can read and write them
//! while `serve` runs, with no database that only one process may open. Each record is one
//! object per digest, so there is nothing to merge and nothing a crash can leave half-written
//! (puts are atomic). All of them can be rebuilt from the store: references from the
//! manifests' bytes, access times as "now" (`stevedore fsck --rebuild-index`, or lazily when a
//! record is missing).
//!
//! Accesses are cheap: a hit records the digest and the time in memory
//! ([`Records::touch`]); [`Store::flush_access`] writes the batch (one object per digest used
//! since the last flush), periodically and at shutdown. A commit records its access at once,
//! so content always has a durable record from the moment it is visible.
//!
//! Open reads and fills hold an [`InUse`] guard: eviction and GC never delete content in use.
//! What makes content reachable records a use before it lets go of the digest's guard
//! (`guard.rs`): a removal that decided before it re-checks the use under the exclusive guard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::layout;
use super::{ByteStream, Repo, Store, StoreResult};
use crate::oci::{manifest, Digest};

/// What a manifest references.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refs {
    /// Content a puller needs: the config and the layers (not embedded, distributable).
    pub needs: Vec<Digest>,
    /// Child manifests of an index (absent children are normal: pulled per platform).
    pub children: Vec<Digest>,
    pub subject: Option<Digest>,
}

impl Refs {
    pub fn of(m: &manifest::Manifest) -> Refs {
        let mut needs = Vec::new();
        for r in m.required() {
            if let manifest::Required::Blob(d) = r {
                needs.push(d);
            }
        }
        // Kept for as long as the manifest is (the lifecycle's index): no spare capacity.
        needs.shrink_to_fit();
        Refs {
            needs,
            children: m.manifests.iter().map(|d| d.digest.clone()).collect(),
            subject: m.subject.as_ref().map(|s| s.digest.clone()),
        }
    }
}

/// A change to what the store holds, told to the lifecycle's index ([`Store::drain_changes`])
/// so that it never has to walk the store to know usage, eviction order or what to collect.
#[derive(Clone, Debug)]
pub enum Change {
    /// Content became visible under its digest (`at`: unix milliseconds, its first use).
    Committed {
        digest: Digest,
        size: u64,
        at: u64,
    },
    /// A blob link was written in a repository.
    Linked {
        repo: Repo,
        digest: Digest,
    },
    Unlinked {
        repo: Repo,
        digest: Digest,
    },
    /// A manifest revision was recorded in a repository, with what it references.
    ManifestStored {
        repo: Repo,
        digest: Digest,
        refs: Refs,
    },
    ManifestDeleted {
        repo: Repo,
        digest: Digest,
    },
    /// Content and its records were deleted.
    Deleted {
        digest: Digest,
    },
    Imported {
        digest: Digest,
    },
    Unimported {
        digest: Digest,
    },
    /// Uses written by an access flush (unix milliseconds).
    Accessed {
        uses: Vec<(Digest, u64)>,
    },
}

/// Changes kept for the index between two drains at most (beyond: the index is rebuilt).
const JOURNAL_MAX: usize = 1 << 20;

/// The journal of [`Change`]s: kept only while an index drains it.
#[derive(Default)]
struct Journal {
    on: bool,
    /// More changes than [`JOURNAL_MAX`] since the last drain: some were dropped.
    lost: bool,
    changes: Vec<Change>,
}

/// Usage by kind as the lifecycle last computed it (plain numbers, [`Store::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageSnapshot {
    pub pushed: u64,
    pub imported: u64,
    pub proxied: u64,
    /// Bytes held by ingests (upload sessions, fills) at the check.
    pub ingest: u64,
    /// Pieces of content.
    pub items: u64,
    /// The least recently used proxied content's last use (unix milliseconds; 0: none).
    pub oldest_access_ms: u64,
    /// Whether the lifecycle has computed it yet (a server still loading its index: no).
    pub known: bool,
}

/// In-memory state of the records: the access batch and the content in use.
#[derive(Default)]
pub struct Records {
    journal: Mutex<Journal>,
    usage: Mutex<UsageSnapshot>,
    /// digest → unix milliseconds of its latest use not yet written.
    pending: Mutex<HashMap<Digest, u64>>,
    /// The access records this process wrote since the last flush, and in the interval
    /// before (digest → unix milliseconds): a use within [`RECORD_SLACK_MS`] of one is not
    /// written again. Bounded by two flush intervals' activity, whatever the store holds.
    written: Mutex<[HashMap<Digest, u64>; 2]>,
    /// Uses the flush did not write (within the slack of a record this process wrote), newer
    /// than that record: still uses for [`Store::last_access`] until the next usage check
    /// begins ([`Store::begin_scan`]). By then the index has heard of each of them, and
    /// every eviction that scanned before it did has re-checked (a link made between a scan
    /// and its re-check is seen through its use, even when the use was not written).
    /// Bounded by one check interval's activity.
    skipped: Mutex<HashMap<Digest, u64>>,
    /// digest → open reads and fills.
    in_use: Mutex<HashMap<Digest, usize>>,
    /// Bytes committed since the last usage scan (an estimate between scans).
    pub(crate) committed_since_scan: AtomicU64,
    /// Raised when usage must be checked now (a write hit ENOSPC, or the estimate passed the cap).
    pub(crate) pressure: tokio::sync::Notify,
    /// Set with [`Records::pressure`] when a write found the store full.
    pub(crate) full: std::sync::atomic::AtomicBool,
    /// Proxied bytes at the last scan, and the high watermark (0: no cap).
    pub(crate) proxied_at_scan: AtomicU64,
    pub(crate) high_mark: AtomicU64,
}

/// On a server without a fleet, a use this close after the durable record this process last
/// wrote for its digest is not written again by the flush (the index hears of it all the
/// same): a fill's commit writes its record, and the pull's uses right after would each
/// rewrite it, one request per blob. Durable records (what a rebuilt index reads) may lag the
/// last use by this much.
const RECORD_SLACK_MS: u64 = 60_000;

/// Milliseconds since the epoch (access records are kept to the millisecond: LRU order).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn from_unix(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Records {
    fn note(&self, c: Change) {
        let mut j = self.journal.lock().unwrap();
        if !j.on || j.lost {
            return;
        }
        if j.changes.len() >= JOURNAL_MAX {
            j.lost = true;
            j.changes = Vec::new();
            return;
        }
        j.changes.push(c);
    }

    /// This process wrote `d`'s access record for `t`.
    fn wrote(&self, d: &Digest, t: u64) {
        self.written.lock().unwrap()[0].insert(d.clone(), t);
    }

    /// A flush ended: what was written before the last one is forgotten.
    fn rotate_written(&self) {
        let mut w = self.written.lock().unwrap();
        w[1] = std::mem::take(&mut w[0]);
    }

    /// Whether this process wrote `d`'s access record within [`RECORD_SLACK_MS`] before `t`
    /// (or after it), in this flush interval or the one before.
    fn recorded_near(&self, d: &Digest, t: u64) -> bool {
        let w = self.written.lock().unwrap();
        w.iter().filter_map(|m| m.get(d)).any(|&r| t <= r.saturating_add(RECORD_SLACK_MS))
    }

    pub fn touch(&self, d: &Digest) {
        self.touch_at(d, unix_now());
    }

    /// A use of `d` at `at` (unix milliseconds), unless a later one is batched.
    fn touch_at(&self, d: &Digest, at: u64) {
        let mut p = self.pending.lock().unwrap();
        match p.get_mut(d) {
            Some(t) => *t = (*t).max(at),
            None => {
                p.insert(d.clone(), at);
            }
        }
    }

    /// The latest use of `d` this process knows of and did not write: batched, or skipped
    /// by a flush.
    fn unwritten(&self, d: &Digest) -> Option<u64> {
        let pending = self.pending.lock().unwrap().get(d).copied();
        let skipped = self.skipped.lock().unwrap().get(d).copied();
        pending.max(skipped)
    }
}

/// Content held in use (an open read, a fill); released when dropped.
pub struct InUse {
    records: Arc<Records>,
    digest: Digest,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = self.records.in_use.lock().unwrap();
        if let Some(n) = m.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.digest);
            }
        }
    }
}

impl Store {
    /// Records a use of `d` (in memory; written by [`Store::flush_access`]).
    pub fn touch(&self, d: &Digest) {
        self.records.touch(d);
    }

    /// Holds `d` in use until the guard is dropped: never evicted or collected meanwhile.
    pub fn hold(&self, d: &Digest) -> InUse {
        *self.records.in_use.lock().unwrap().entry(d.clone()).or_insert(0) += 1;
        InUse { records: self.records.clone(), digest: d.clone() }
    }

    pub fn in_use(&self, d: &Digest) -> bool {
        self.records.in_use.lock().unwrap().contains_key(d)
    }

    /// A content stream that holds `d` in use until it is dropped.
    pub(crate) fn held_stream(&self, d: &Digest, s: ByteStream) -> ByteStream {
        let guard = self.hold(d);
        Box::pin(s.map(move |chunk| {
            let _ = &guard;
            chunk
        }))
    }

    /// The latest use of each digest not written yet (the access batch), in memory.
    pub fn pending_uses(&self) -> HashMap<Digest, u64> {
        self.records.pending.lock().unwrap().clone()
    }

    /// Notes a change for the lifecycle's index (when one is kept).
    pub(crate) fn note(&self, c: Change) {
        self.records.note(c);
    }

    /// Starts keeping the journal of changes for an index (and empties it).
    pub fn start_journal(&self) {
        let mut j = self.records.journal.lock().unwrap();
        *j = Journal { on: true, ..Journal::default() };
    }

    /// The changes since the last drain, in order; `None` when some were lost (the journal
    /// overflowed: whoever keeps an index rebuilds it).
    pub fn drain_changes(&self) -> Option<Vec<Change>> {
        let mut j = self.records.journal.lock().unwrap();
        let changes = std::mem::take(&mut j.changes);
        if std::mem::take(&mut j.lost) {
            return None;
        }
        Some(changes)
    }

    /// Usage by kind as of the lifecycle's last check: plain numbers, no backend request.
    pub fn usage(&self) -> UsageSnapshot {
        *self.records.usage.lock().unwrap()
    }

    /// Records the usage the lifecycle computed.
    pub fn set_usage(&self, u: UsageSnapshot) {
        *self.records.usage.lock().unwrap() = u;
    }

    /// Writes the batched accesses; returns how many records were written. A use leaves the
    /// batch only once its record is written and the index was told (a change), so a scan
    /// that reads the batch before it drains the changes misses no use (the record would
    /// read newer than what the scan knows, and the unit be taken for used since). Records
    /// that could not be written (a full store) stay in the batch.
    pub async fn flush_access(&self) -> usize {
        let batch: Vec<(Digest, u64)> =
            self.records.pending.lock().unwrap().iter().map(|(d, t)| (d.clone(), *t)).collect();
        if batch.is_empty() {
            return 0;
        }
        let mut uses = Vec::with_capacity(batch.len());
        let mut skipped = Vec::new();
        let mut written = 0;
        // In a fleet every use is written: other replicas' evictions read the records.
        let alone = self.fleet().is_none();
        for (d, t) in batch {
            if alone && self.records.recorded_near(&d, t) {
                uses.push((d.clone(), t));
                skipped.push((d, t));
                continue;
            }
            if self.backend.put(&layout::access(&d), t.to_string().as_bytes()).await.is_ok() {
                self.records.wrote(&d, t);
                uses.push((d, t));
                written += 1;
            }
        }
        crate::hooks::pause("access.flush_written").await;
        if !uses.is_empty() {
            self.note(Change::Accessed { uses: uses.clone() });
            // Told to the index first, kept for the re-checks before it leaves the batch.
            {
                let mut k = self.records.skipped.lock().unwrap();
                for (d, t) in skipped {
                    let e = k.entry(d).or_insert(t);
                    *e = (*e).max(t);
                }
            }
            let mut p = self.records.pending.lock().unwrap();
            for (d, t) in uses {
                // A use since the write stays for the next flush.
                if p.get(&d) == Some(&t) {
                    p.remove(&d);
                }
            }
            // A burst of uses leaves a large, mostly empty table behind: give it back.
            if p.capacity() > 4 * p.len().max(256) {
                p.shrink_to_fit();
            }
        }
        self.records.rotate_written();
        crate::hooks::pause("access.flushed").await;
        written
    }

    /// A usage check begins (before it drains the changes): the uses earlier flushes skipped
    /// are in the index it reads, and no eviction that scanned before them is still running.
    pub fn begin_scan(&self) {
        let mut k = self.records.skipped.lock().unwrap();
        k.clear();
        if k.capacity() > 1024 {
            k.shrink_to_fit();
        }
    }

    /// Records the use of `d` durably now (a commit).
    pub(crate) async fn record_access_now(&self, d: &Digest) {
        let _ = self.record_access_checked(d).await;
    }

    /// Records the use of `d` durably now, or fails (a reach in a fleet: another replica's
    /// removal re-checks this record, so it must be written before the removal lease is read).
    pub(crate) async fn record_access_checked(&self, d: &Digest) -> StoreResult<()> {
        let t = unix_now();
        // Alone, a use in memory first (the flush will not write it again): `last_access`
        // answers from memory, and must never answer older than a record being written.
        if self.fleet().is_none() {
            self.records.touch_at(d, t);
        }
        self.backend.put(&layout::access(d), t.to_string().as_bytes()).await?;
        // The index knows every record this process writes (an eviction's re-check reads
        // the record: one newer than the index's view would keep the unit as used since).
        self.note(Change::Accessed { uses: vec![(d.clone(), t)] });
        self.records.wrote(d, t);
        Ok(())
    }

    /// When `d` was last used: a use in memory not written (batched, or skipped by a flush),
    /// else the durable record (`None`: no record). In a fleet, the later of the two: another
    /// replica's use is only in the durable record.
    pub async fn last_access(&self, d: &Digest) -> StoreResult<Option<SystemTime>> {
        let unwritten = self.records.unwritten(d).map(from_unix);
        if unwritten.is_some() && self.fleet().is_none() {
            return Ok(unwritten);
        }
        let Some((raw, written)) = self.backend.get(&layout::access(d)).await? else { return Ok(unwritten) };
        let t = std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse::<u64>().ok());
        let durable = t.map(from_unix).unwrap_or(written);
        Ok(Some(unwritten.map_or(durable, |p| p.max(durable))))
    }

    /// Writes an access record of "now" for content that has none (a lost index).
    pub async fn ensure_access(&self, d: &Digest) -> StoreResult<SystemTime> {
        match self.last_access(d).await? {
            Some(t) => Ok(t),
            None => {
                self.record_access_now(d).await;
                Ok(SystemTime::now())
            }
        }
    }

    /// Records what a stored manifest references.
    pub(crate) async fn record_refs(&self, d: &Digest, refs: &Refs) -> StoreResult<()> {
        self.backend.put(&layout::refs(d), &serde_json::to_vec(refs).expect("refs serialise")).await
    }

    /// What manifest `d` (in `repo`) references: its record, rebuilt from the manifest's bytes
    /// when missing. `None` when the manifest is not in `repo` or cannot be read.
    pub async fn references(&self, repo: &Repo, d: &Digest) -> StoreResult<Option<Refs>> {
        if let Some((raw, _)) = self.backend.get(&layout::refs(d)).await? {
            if let Ok(r) = serde_json::from_slice::<Refs>(&raw) {
                return Ok(Some(r));
            }
        }
        self.rebuild_refs(repo, d).await
    }

    /// Parses manifest `d` of `repo` and writes its reference record.
    pub async fn rebuild_refs(&self, repo: &Repo, d: &Digest) -> StoreResult<Option<Refs>> {
        let Some((media_type, _)) = self.backend.get(&layout::revision(repo, d)).await? else { return Ok(None) };
        let Some(bytes) = self.backend.read_small(d).await? else { return Ok(None) };
        let media_type = String::from_utf8_lossy(&media_type).into_owned();
        let ct = (!media_type.is_empty()).then_some(media_type.as_str());
        let Ok(m) = manifest::parse(&bytes, ct) else { return Ok(None) };
        let refs = Refs::of(&m);
        let _ = self.record_refs(d, &refs).await;
        Ok(Some(refs))
    }

    /// Marks content as imported (never evicted by the cache cap). Written before the content
    /// is made visible.
    pub async fn mark_imported(&self, d: &Digest) -> StoreResult<()> {
        self.backend.put(&layout::imported(d), b"").await?;
        self.note(Change::Imported { digest: d.clone() });
        Ok(())
    }

    pub async fn is_imported(&self, d: &Digest) -> StoreResult<bool> {
        self.backend.has(&layout::imported(d)).await
    }

    /// Removes committed content and every record of it (eviction, GC, fsck).
    pub async fn delete_content(&self, d: &Digest) -> StoreResult<bool> {
        let removed = self.backend.delete(d).await?;
        self.forget_size(d);
        self.note(Change::Deleted { digest: d.clone() });
        for key in [layout::access(d), layout::refs(d), layout::imported(d)] {
            let _ = self.backend.remove(&key).await;
        }
        if removed {
            self.tell(super::Event::BlobGone { digest: d.to_string() }).await;
        }
        Ok(removed)
    }

    /// Every piece of committed content with its size.
    pub async fn contents(&self) -> StoreResult<Vec<(Digest, u64)>> {
        self.backend.walk().await
    }

    /// `len` bytes of committed content, not counted as a use (fsck).
    pub async fn read_raw(&self, d: &Digest) -> StoreResult<Option<ByteStream>> {
        let Some(size) = self.backend.stat(d).await? else { return Ok(None) };
        self.backend.read(d, 0, size).await
    }

    /// The digests linked in `repo` (`_layers`) with when each link was written.
    pub async fn repo_links(&self, repo: &Repo) -> StoreResult<Vec<(Digest, SystemTime)>> {
        self.digests_below(&layout::layers_dir(repo)).await
    }

    /// The manifests in `repo` (revisions) with when each was recorded.
    pub async fn repo_manifests(&self, repo: &Repo) -> StoreResult<Vec<(Digest, SystemTime)>> {
        self.digests_below(&layout::revisions_dir(repo)).await
    }

    async fn digests_below(&self, dir: &layout::Key) -> StoreResult<Vec<(Digest, SystemTime)>> {
        let mut out = Vec::new();
        for alg in self.backend.list(dir).await? {
            let alg_dir = layout::child(dir, &alg);
            for hex in self.backend.list(&alg_dir).await? {
                let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else { continue };
                let Some((_, t)) = self.backend.get(&layout::child(&alg_dir, &hex)).await? else { continue };
                out.push((d, t));
            }
        }
        Ok(out)
    }

    /// Whether `d` is linked as a blob in `repo` (not counted as a use).
    pub async fn linked(&self, repo: &Repo, d: &Digest) -> StoreResult<bool> {
        self.is_linked(repo, d).await
    }

    /// Whether `repo` holds a manifest revision for `d`.
    pub async fn has_revision(&self, repo: &Repo, d: &Digest) -> StoreResult<bool> {
        self.backend.has(&layout::revision(repo, d)).await
    }

    /// Every tag of `repo` with the digest it points at (unreadable tags as `None`).
    pub async fn tags_with_targets(&self, repo: &Repo) -> StoreResult<Vec<(crate::oci::Tag, Option<Digest>)>> {
        let mut out = Vec::new();
        for t in self.list_tags(repo).await?.unwrap_or_default() {
            let d = self.resolve_tag(repo, &t).await?;
            out.push((t, d));
        }
        Ok(out)
    }

    /// Committed bytes since the last scan, and the hint that space is needed (the ingests'
    /// bytes count against the cap too).
    pub(crate) fn note_committed(&self, size: u64) {
        let since = self.records.committed_since_scan.fetch_add(size, Ordering::AcqRel) + size;
        let high = self.records.high_mark.load(Ordering::Acquire);
        if high > 0 && self.records.proxied_at_scan.load(Ordering::Acquire) + since + self.ingest_bytes() > high {
            self.records.pressure.notify_one();
        }
    }

    /// Asks the lifecycle task to free space now (a write hit ENOSPC).
    pub fn space_needed(&self) {
        self.records.full.store(true, Ordering::Release);
        self.records.pressure.notify_one();
    }

    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Removes an imported mark (an import undone).
    pub async fn unmark_imported(&self, d: &Digest) -> StoreResult<()> {
        self.backend.remove(&layout::imported(d)).await?;
        self.note(Change::Unimported { digest: d.clone() });
        Ok(())
    }

    /// The lifecycle's saved index, if the last server stopped cleanly after saving it (its
    /// clean-shutdown marker names exactly these bytes); `None` otherwise.
    pub async fn saved_index(&self) -> StoreResult<Option<bytes::Bytes>> {
        let Some((marker, _)) = self.backend.get(&layout::index_clean()).await? else { return Ok(None) };
        let Some((state, _)) = self.backend.get(&layout::index_state()).await? else { return Ok(None) };
        let want = Digest::of(crate::oci::Algorithm::Sha256, &state).to_string();
        Ok((marker.as_ref() == want.as_bytes()).then_some(state))
    }

    /// Saves the lifecycle's index and then its clean-shutdown marker (the index's digest).
    pub async fn save_index(&self, state: &[u8]) -> StoreResult<()> {
        self.backend.put(&layout::index_state(), state).await?;
        let digest = Digest::of(crate::oci::Algorithm::Sha256, state).to_string();
        self.backend.put(&layout::index_clean(), digest.as_bytes()).await
    }

    /// Removes the clean-shutdown marker: the saved index is not trusted any more (a server
    /// started on it: a crash from now on is not a clean stop).
    pub async fn claim_index(&self) -> StoreResult<()> {
        self.backend.remove(&layout::index_clean()).await.map(drop)
    }

    /// An offline tool is about to change the store: the saved index is not trusted any more,
    /// and a server running beside it (prefetch may) sees the store's generation change at
    /// its next check and rebuilds its index.
    pub async fn distrust_index(&self) -> StoreResult<()> {
        self.claim_index().await?;
        let token = uuid::Uuid::now_v7().to_string();
        self.backend.put(&layout::index_generation(), token.as_bytes()).await
    }

    /// The store's generation as offline tools last set it (one small read).
    pub async fn index_generation(&self) -> StoreResult<Option<bytes::Bytes>> {
        Ok(self.backend.get(&layout::index_generation()).await?.map(|(b, _)| b))
    }

    /// Every digest linked in `repo` or stored there as a manifest (listings only).
    pub async fn repo_digests(&self, repo: &Repo) -> StoreResult<Vec<Digest>> {
        let mut out = Vec::new();
        for dir in [layout::layers_dir(repo), layout::revisions_dir(repo)] {
            for alg in self.backend.list(&dir).await? {
                let names = self.backend.list(&layout::child(&dir, &alg)).await?;
                out.extend(names.iter().filter_map(|hex| format!("{alg}:{hex}").parse::<Digest>().ok()));
            }
        }
        Ok(out)
    }

    /// Removes what is left of `repo`'s tree once nothing is in it (an import undone): it is
    /// then in no catalog.
    pub async fn prune_repo(&self, repo: &Repo) -> StoreResult<()> {
        self.backend.prune_empty(&layout::repo(repo)).await?;
        if !self.backend.exists(&layout::repo(repo)).await? {
            self.catalog.names.lock().unwrap().remove(&repo.to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_within_the_slack_of_a_written_record_is_not_written_again_for_two_flushes() {
        let r = Records::default();
        let d = Digest::of(crate::oci::Algorithm::Sha256, b"x");
        let other = Digest::of(crate::oci::Algorithm::Sha256, b"y");
        r.wrote(&d, 1_000);
        assert!(r.recorded_near(&d, 1_000) && r.recorded_near(&d, 500));
        assert!(r.recorded_near(&d, 1_000 + RECORD_SLACK_MS));
        assert!(!r.recorded_near(&d, 1_001 + RECORD_SLACK_MS), "a use past the slack is written");
        assert!(!r.recorded_near(&other, 1_000));
        r.rotate_written();
        assert!(r.recorded_near(&d, 2_000), "the interval before still counts");
        r.rotate_written();
        assert!(!r.recorded_near(&d, 2_000), "two flushes later the record is forgotten");
    }
}
