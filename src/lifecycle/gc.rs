//! Garbage collection: after manifest and tag deletes, the blobs no manifest references are
//! reclaimed.
//!
//! 1. In every local repository, a blob link that no manifest of the repository needs is
//!    removed, unless the link or a use of the blob is younger than the grace period (a blob
//!    uploaded for a manifest not pushed yet, or checked by a push under way).
//! 2. Content no repository links and no manifest needs (and not in use, and unused for the
//!    grace period) is deleted.
//!
//! Safe against concurrent pushes (the mutation protocol, `storage/guard.rs`): a push holds
//! the shared guards of its blobs from its checks to its last write and records a use before
//! it lets go; GC re-reads every manifest's references before a repository's links are
//! removed, then removes each link or content under its exclusive guard after checking again
//! that it was not used since the grace period began; held guards mean "next pass". The
//! offline `stevedore gc` refuses to run while a server or replica is live on the store: the
//! guards and caches are the server's.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::oci::Digest;
use crate::storage::{Repo, Store, StoreResult};

#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub dry_run: bool,
    /// Blob links removed from local repositories.
    pub unlinked: usize,
    /// Pieces of content deleted, and their bytes.
    pub deleted: usize,
    pub bytes: u64,
    /// What was (or, in a dry run, would be) removed: `repo@digest` links, then digests.
    pub removed: Vec<String>,
    /// Not run: this replica (or process) of a fleet found another running a pass.
    pub skipped: Option<crate::cluster::Holder>,
}

/// Manifests of `repo` and everything they need.
async fn marked(store: &Store, repo: &Repo) -> StoreResult<HashSet<Digest>> {
    let mut out = HashSet::new();
    for (m, _) in store.repo_manifests(repo).await? {
        if let Some(refs) = store.references(repo, &m).await? {
            out.extend(refs.needs);
        }
        out.insert(m);
    }
    Ok(out)
}

async fn recent(store: &Store, d: &Digest, since: SystemTime) -> StoreResult<bool> {
    Ok(store.in_use(d) || store.last_access(d).await?.is_some_and(|t| t >= since))
}

pub async fn collect(store: &Store, grace: Duration, dry_run: bool) -> StoreResult<GcReport> {
    let mut r = GcReport { dry_run, ..GcReport::default() };
    let since = SystemTime::now().checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let repos = store.repositories().await?;
    let mut referenced: HashSet<Digest> = HashSet::new();
    for repo in &repos {
        let links = store.repo_links(repo).await?;
        let mut keep = marked(store, repo).await?;
        if let Repo::Local(_) = repo {
            let mut doomed = Vec::new();
            for (b, linked_at) in &links {
                if keep.contains(b) || *linked_at >= since || recent(store, b, since).await? {
                    continue;
                }
                doomed.push(b.clone());
            }
            if !doomed.is_empty() {
                crate::hooks::pause("gc.before_remove").await;
                // One pushed since the mark keeps what it needs.
                keep = marked(store, repo).await?;
            }
            let mut unlinked: HashSet<&Digest> = HashSet::new();
            for b in &doomed {
                if keep.contains(b) || recent(store, b, since).await? {
                    continue;
                }
                if !dry_run {
                    // The mutation protocol: under the exclusive guard nothing links or stores
                    // it; whatever did since the mark recorded a use. Held right now: next pass.
                    let Some(removal) = store.try_removal(&[b]).await else { continue };
                    if recent(store, b, since).await? || removal.lost() {
                        continue;
                    }
                    store.unlink_blob(repo, b).await?;
                }
                unlinked.insert(b);
                r.unlinked += 1;
                r.removed.push(format!("{repo}@{b}"));
            }
            referenced
                .extend(links.iter().map(|(d, _)| d).filter(|d| !unlinked.contains(d) || keep.contains(*d)).cloned());
        } else {
            referenced.extend(links.into_iter().map(|(d, _)| d));
        }
        referenced.extend(keep);
    }
    // Repositories created since the mark count too.
    let repos = store.repositories().await?;
    for (d, size) in store.contents().await? {
        if referenced.contains(&d) || recent(store, &d, since).await? {
            continue;
        }
        if !dry_run {
            let Some(removal) = store.try_removal(&[&d]).await else { continue };
            if recent(store, &d, since).await? {
                continue;
            }
            // Linked or stored as a manifest since the walk: kept.
            let mut relinked = false;
            for repo in &repos {
                if store.linked(repo, &d).await? || store.has_revision(repo, &d).await? {
                    relinked = true;
                    break;
                }
            }
            if relinked {
                continue;
            }
            crate::hooks::pause("gc.before_delete").await;
            if removal.lost() || !store.delete_content(&d).await? {
                continue;
            }
        }
        r.deleted += 1;
        r.bytes += size;
        r.removed.push(d.to_string());
    }
    Ok(r)
}

/// The periodic GC's pass over the index's queue of candidates ([`super::index::Candidate`]):
/// GitLab's review queue, one blob link or piece of content at a time, never a walk.
///
/// 1. A blob link of a local repository that no manifest there needs is removed once neither
///    the link nor a use of the blob is younger than `since` (a blob uploaded for a manifest
///    not pushed yet stays queued until then).
/// 2. Content nothing links or needs (in the index) is deleted once unused since `since`.
///
/// Each removal re-checks under the exclusive guard (not in use, no use since `since`);
/// `since` was taken before the index was brought up to date, so whatever was made
/// reachable after the index's state recorded a later use. Candidates still too young, or
/// whose guard was held, stay queued for the next pass; the others leave the queue.
pub async fn review(store: &Store, ix: &mut super::index::Index, since: SystemTime) -> StoreResult<GcReport> {
    use super::index::Candidate;
    let mut r = GcReport::default();
    let queue: Vec<Candidate> = ix.gc_queue.drain().collect();
    let mut requeue: Vec<Candidate> = Vec::new();
    let mut contents: Vec<Digest> = Vec::new();
    let since_ms = since.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    // Young by the index (no request), else by the store's own record.
    let young = |ix: &super::index::Index, d: &Digest| ix.content.get(d).is_some_and(|c| c.access >= since_ms);
    let mut doomed: Vec<(Repo, Digest)> = Vec::new();
    for c in queue {
        let Some(repo) = c.repo else {
            contents.push(c.digest);
            continue;
        };
        let Some(ri) = ix.repos.get(&repo) else { continue };
        let needed = ri.manifests.contains_key(&c.digest) || ri.manifests.values().any(|n| n.needs.contains(&c.digest));
        if !ri.links.contains(&c.digest) || needed || !matches!(repo, Repo::Local(_)) {
            continue;
        }
        if young(ix, &c.digest) || recent(store, &c.digest, since).await? {
            requeue.push(Candidate { repo: Some(repo), digest: c.digest });
            continue;
        }
        doomed.push((repo, c.digest));
    }
    if !doomed.is_empty() {
        crate::hooks::pause("gc.before_remove").await;
    }
    for (repo, b) in doomed {
        // The mutation protocol: under the exclusive guard nothing links or stores it;
        // whatever did since the index's state recorded a use. Held right now: next pass.
        let Some(_removal) = store.try_removal(&[&b]).await else {
            requeue.push(Candidate { repo: Some(repo), digest: b });
            continue;
        };
        if recent(store, &b, since).await? {
            requeue.push(Candidate { repo: Some(repo), digest: b });
            continue;
        }
        store.unlink_blob(&repo, &b).await?;
        if let Some(ri) = ix.repos.get_mut(&repo) {
            ri.links.remove(&b);
        }
        r.unlinked += 1;
        r.removed.push(format!("{repo}@{b}"));
        contents.push(b);
    }
    contents.sort();
    contents.dedup();
    // Which candidates anything references, in one pass over the index.
    let wanted: HashSet<&Digest> = contents.iter().collect();
    let mut referenced: HashSet<Digest> = HashSet::new();
    for ri in ix.repos.values() {
        let refs = ri.links.iter().chain(ri.manifests.keys()).chain(ri.manifests.values().flat_map(|n| n.needs.iter()));
        referenced.extend(refs.filter(|d| wanted.contains(d)).cloned());
    }
    for d in contents {
        let Some(size) = ix.content.get(&d).map(|c| c.size) else { continue };
        if referenced.contains(&d) {
            continue;
        }
        if young(ix, &d) || recent(store, &d, since).await? {
            requeue.push(Candidate { repo: None, digest: d });
            continue;
        }
        let Some(_removal) = store.try_removal(&[&d]).await else {
            requeue.push(Candidate { repo: None, digest: d });
            continue;
        };
        if recent(store, &d, since).await? {
            requeue.push(Candidate { repo: None, digest: d });
            continue;
        }
        if store.delete_content(&d).await? {
            r.deleted += 1;
            r.bytes += size;
            r.removed.push(d.to_string());
        }
        ix.content.remove(&d);
    }
    ix.gc_queue.extend(requeue);
    Ok(r)
}
