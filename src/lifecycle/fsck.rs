//! `stevedore fsck`: the store checks itself.
//!
//! - every piece of content is read back and hashed: content whose bytes do not hash to its
//!   digest (or whose size is off) is corrupt; `--repair` deletes it (a proxied blob is
//!   fetched again on its next pull);
//! - leftover ingests (upload sessions, abandoned fills) idle longer than the safe age and
//!   stray temporary objects are removed;
//! - links: a blob link or manifest revision whose content is absent, a tag pointing at a
//!   manifest the repository does not hold, a pushed manifest that needs content that is
//!   absent (a cached one fetches its blobs on demand);
//!   `--repair` removes them (the broken manifest with its tags: it could only fail to pull),
//!   and links a local manifest's content that is present but not linked;
//! - `--rebuild-index` rewrites the reference records of every manifest and gives content
//!   without an access record one of "now".
//!
//! Beside a live server only the read-only check runs (`main.rs` refuses `--repair`): content
//! committed after the snapshot of the content is not called absent (each absence is
//! confirmed with the backend before it is reported), and nothing is changed.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;

use crate::oci::{Digest, Hasher};
use crate::progress::Tally;
use crate::storage::{Repo, Store, StoreResult};

#[derive(Clone, Debug)]
pub struct FsckOptions {
    pub repair: bool,
    pub rebuild_index: bool,
    /// Ingests idle for longer than this are leftovers.
    pub ingest_age: Duration,
    /// Remove leftover ingests (not beside a live server: it sweeps its own, and a check
    /// beside it changes nothing).
    pub sweep_ingests: bool,
    /// Counts each blob hashed (a terminal's progress bar).
    pub progress: Tally,
}

#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    /// Problems found, one line each.
    pub problems: Vec<String>,
    /// Problems fixed by `--repair`.
    pub repaired: usize,
    pub ingests_removed: usize,
    pub records_rebuilt: usize,
}

impl FsckReport {
    /// Whether the store is sound now: nothing found, or everything found repaired.
    pub fn ok(&self) -> bool {
        self.problems.len() == self.repaired
    }
}

async fn hash_content(store: &Store, d: &Digest) -> StoreResult<Option<(Digest, u64)>> {
    let Some(mut s) = store.read_raw(d).await? else { return Ok(None) };
    let mut h = Hasher::new(d.algorithm());
    let mut n = 0u64;
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => {
                n += c.len() as u64;
                h.update(&c);
            }
            // Shorter than its recorded size: as corrupt as wrong bytes.
            Err(_) => return Ok(Some((Digest::of(d.algorithm(), b"<truncated>"), n))),
        }
    }
    Ok(Some((h.finish(), n)))
}

pub async fn fsck(store: &Store, opts: &FsckOptions) -> StoreResult<FsckReport> {
    let mut r = FsckReport::default();
    let problem = |r: &mut FsckReport, text: String, fixed: bool| {
        tracing::warn!(repaired = fixed, "{text}");
        r.problems.push(text);
        if fixed {
            r.repaired += 1;
        }
    };
    // Content.
    let mut present: HashSet<Digest> = HashSet::new();
    for (d, size) in store.contents().await? {
        let Some((got, n)) = hash_content(store, &d).await? else { continue };
        r.blobs_checked += 1;
        r.bytes_checked += n;
        opts.progress.add(n);
        if got == d && n == size {
            present.insert(d);
            continue;
        }
        let fixed = opts.repair && store.delete_content(&d).await.is_ok();
        problem(&mut r, format!("corrupt content {d}: {n} bytes hash to {got}"), fixed);
        if !fixed {
            present.insert(d);
        }
    }
    crate::hooks::pause("fsck.after_snapshot").await;
    // Leftovers.
    if opts.sweep_ingests {
        r.ingests_removed = store.sweep_uploads(opts.ingest_age).await;
    }
    // Links and references. Content absent from the snapshot is absent only if the backend
    // says so now (a push beside a running server commits after the snapshot).
    let mut present = Present { snapshot: present, checked: HashSet::new() };
    for repo in store.repositories().await? {
        let local = matches!(repo, Repo::Local(_));
        for (b, _) in store.repo_links(&repo).await? {
            // Unlinked since it was listed (an eviction, a delete): not a problem.
            if !present.has(store, &b).await? && store.linked(&repo, &b).await? {
                let fixed = opts.repair && store.unlink_blob(&repo, &b).await.is_ok();
                problem(&mut r, format!("dangling link {repo}@{b}: the content is absent"), fixed);
            }
        }
        let mut manifests: HashSet<Digest> = HashSet::new();
        for (m, _) in store.repo_manifests(&repo).await? {
            let here = present.has(store, &m).await?;
            let refs = if here {
                if opts.rebuild_index {
                    r.records_rebuilt += 1;
                    store.rebuild_refs(&repo, &m).await?
                } else {
                    store.references(&repo, &m).await?
                }
            } else {
                None
            };
            let Some(refs) = refs else {
                if !store.has_revision(&repo, &m).await? {
                    // Gone since it was listed (a delete, an eviction): not a problem.
                    continue;
                }
                let why = if here { "does not parse" } else { "its bytes are absent" };
                let fixed = opts.repair && store.delete_manifest(&repo, &m, None).await.is_ok();
                problem(&mut r, format!("broken manifest {repo}@{m}: {why}"), fixed);
                continue;
            };
            // A cached manifest whose blobs were never pulled is normal: they are fetched on
            // demand. A pushed one must be whole.
            let mut missing: Vec<&Digest> = Vec::new();
            for d in &refs.needs {
                if !present.has(store, d).await? {
                    missing.push(d);
                }
            }
            if local && !missing.is_empty() {
                let fixed = opts.repair && store.delete_manifest(&repo, &m, refs.subject.as_ref()).await.is_ok();
                problem(&mut r, format!("manifest {repo}@{m} needs absent content {}", join(&missing)), fixed);
                continue;
            }
            if local {
                for d in &refs.needs {
                    if !store.linked(&repo, d).await? {
                        let fixed = opts.repair && store.link_blob(&repo, d).await.is_ok();
                        problem(&mut r, format!("manifest {repo}@{m}: {d} is present but not linked"), fixed);
                    }
                }
            }
            manifests.insert(m);
        }
        for (tag, target) in store.tags_with_targets(&repo).await? {
            let mut ok = target.as_ref().is_some_and(|d| manifests.contains(d));
            if !ok {
                // Tagged since the manifests were listed: confirmed with the store.
                if let Some(d) = &target {
                    ok = store.has_revision(&repo, d).await? && present.has(store, d).await?;
                }
            }
            if !ok {
                let fixed = opts.repair && store.delete_tag(&repo, &tag).await.is_ok();
                let to = target.map(|d| d.to_string()).unwrap_or_else(|| "nothing readable".into());
                problem(&mut r, format!("dangling tag {repo}:{tag} → {to}"), fixed);
            }
        }
    }
    if opts.rebuild_index {
        for d in &present.snapshot {
            store.ensure_access(d).await?;
        }
        // The lifecycle's index, from the store as it now is, saved as a clean stop's: the
        // next server start loads it instead of walking.
        let ix = super::index::Index::build(store).await?;
        store.save_index(&ix.encode()).await?;
        crate::metrics::index_rebuilt("fsck");
    }
    Ok(r)
}

/// The content found by the snapshot, and what the backend was asked about since.
struct Present {
    snapshot: HashSet<Digest>,
    /// Absent from the snapshot, present when asked (committed after it).
    checked: HashSet<Digest>,
}

impl Present {
    async fn has(&mut self, store: &Store, d: &Digest) -> StoreResult<bool> {
        if self.snapshot.contains(d) || self.checked.contains(d) {
            return Ok(true);
        }
        let there = store.blob_size(d).await?.is_some();
        if there {
            self.checked.insert(d.clone());
        }
        Ok(there)
    }
}

fn join(ds: &[&Digest]) -> String {
    ds.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}
