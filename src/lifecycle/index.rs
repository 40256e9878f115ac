//! The lifecycle's index of the store: every piece of content (size, last use, imported),
//! every repository's blob links and manifests (with what each needs), and the queue of GC
//! candidates. Usage by kind, eviction order and collection are computed from it in memory:
//! an idle server asks the backend for nothing.
//!
//! Kept up to date from the store's journal of changes ([`Store::drain_changes`]: commits,
//! links, unlinks, manifests stored and deleted, deletions, imported marks, access flushes).
//! Saved at a clean stop with a clean-shutdown marker ([`Store::save_index`]); a server that
//! starts on a trusted index removes the marker first, so after a crash (or an offline tool
//! that changed the store) the next start rebuilds it by one walk ([`Index::build`]), as does
//! `stevedore fsck --rebuild-index`. A change that does not fit the index (a link to content
//! it does not know, a deletion of something it holds that was not there) is drift: it is
//! rebuilt at the next check.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::oci::Digest;
use crate::storage::layout;
use crate::storage::{Change, Repo, Store, StoreResult};

/// One piece of content.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Content {
    pub size: u64,
    /// Last use, unix milliseconds.
    pub access: u64,
}

/// What a manifest needs (what eviction and GC follow).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Needs {
    pub needs: Vec<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
}

#[derive(Clone, Debug, Default)]
pub struct RepoIndex {
    pub links: HashSet<Digest>,
    pub manifests: HashMap<Digest, Needs>,
}

/// Something GC reviews: a blob link in a repository, or content (`repo: None`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub repo: Option<Repo>,
    pub digest: Digest,
}

#[derive(Default)]
pub struct Index {
    pub content: HashMap<Digest, Content>,
    pub imported: HashSet<Digest>,
    pub repos: HashMap<Repo, RepoIndex>,
    /// What may have become garbage since the last GC pass (a manifest deleted, a blob
    /// unlinked, an eviction): the periodic GC reviews these and nothing else.
    pub gc_queue: HashSet<Candidate>,
}

/// A change did not fit the index: rebuild it.
#[derive(Debug)]
pub struct Drift(pub String);

/// The saved form.
#[derive(Serialize, Deserialize)]
struct Saved {
    v: u32,
    content: Vec<(Digest, Content)>,
    imported: Vec<Digest>,
    repos: Vec<SavedRepo>,
    gc_queue: Vec<(Option<String>, Digest)>,
}

#[derive(Serialize, Deserialize)]
struct SavedRepo {
    key: String,
    links: Vec<Digest>,
    manifests: Vec<(Digest, Needs)>,
}

const VERSION: u32 = 1;

fn repo_key(r: &Repo) -> String {
    layout::repo(r).as_str().to_string()
}

impl Index {
    /// The index as saved (JSON).
    pub fn encode(&self) -> Vec<u8> {
        let saved = Saved {
            v: VERSION,
            content: self.content.iter().map(|(d, c)| (d.clone(), *c)).collect(),
            imported: self.imported.iter().cloned().collect(),
            repos: self
                .repos
                .iter()
                .map(|(r, i)| SavedRepo {
                    key: repo_key(r),
                    links: i.links.iter().cloned().collect(),
                    manifests: i.manifests.iter().map(|(d, n)| (d.clone(), n.clone())).collect(),
                })
                .collect(),
            gc_queue: self.gc_queue.iter().map(|c| (c.repo.as_ref().map(repo_key), c.digest.clone())).collect(),
        };
        serde_json::to_vec(&saved).expect("the index serialises")
    }

    /// A saved index; `None` when it does not parse (then it is rebuilt).
    pub fn decode(raw: &[u8]) -> Option<Index> {
        let s: Saved = serde_json::from_slice(raw).ok()?;
        if s.v != VERSION {
            return None;
        }
        let mut repos = HashMap::new();
        for r in s.repos {
            let repo = layout::repo_of(&r.key)?;
            repos.insert(
                repo,
                RepoIndex { links: r.links.into_iter().collect(), manifests: r.manifests.into_iter().collect() },
            );
        }
        let mut gc_queue = HashSet::new();
        for (r, digest) in s.gc_queue {
            let repo = match r {
                Some(k) => Some(layout::repo_of(&k)?),
                None => None,
            };
            gc_queue.insert(Candidate { repo, digest });
        }
        Some(Index {
            content: s.content.into_iter().collect(),
            imported: s.imported.into_iter().collect(),
            repos,
            gc_queue,
        })
    }

    /// The index of the store as it is, by one walk (content, repositories, their links and
    /// manifests' references, imported marks, access records: about three requests per
    /// piece of content). Everything unreferenced it finds is queued for GC.
    pub async fn build(store: &Store) -> StoreResult<Index> {
        let mut ix = Index::default();
        for (d, size) in store.contents().await? {
            let access = store.ensure_access(&d).await?;
            let access = access.duration_since(std::time::UNIX_EPOCH).map(|t| t.as_millis() as u64).unwrap_or(0);
            if store.is_imported(&d).await? {
                ix.imported.insert(d.clone());
            }
            ix.content.insert(d, Content { size, access });
        }
        for repo in store.repositories().await? {
            let mut ri = RepoIndex::default();
            for (m, _) in store.repo_manifests(&repo).await? {
                let refs = store.references(&repo, &m).await?.unwrap_or_default();
                ri.manifests.insert(m, Needs { needs: refs.needs, subject: refs.subject });
            }
            ri.links = store.repo_links(&repo).await?.into_iter().map(|(d, _)| d).collect();
            ix.repos.insert(repo, ri);
        }
        ix.queue_unreferenced();
        Ok(ix)
    }

    /// Queues everything unreferenced: content nothing links or needs, and blob links of
    /// local repositories that no manifest there needs.
    fn queue_unreferenced(&mut self) {
        let mut referenced: HashSet<&Digest> = HashSet::new();
        for (repo, ri) in &self.repos {
            let needed: HashSet<&Digest> = ri.manifests.values().flat_map(|n| n.needs.iter()).collect();
            referenced.extend(ri.links.iter());
            referenced.extend(ri.manifests.keys());
            referenced.extend(needed.iter().copied());
            if let Repo::Local(_) = repo {
                for b in &ri.links {
                    if !needed.contains(b) && !ri.manifests.contains_key(b) {
                        self.gc_queue.insert(Candidate { repo: Some(repo.clone()), digest: b.clone() });
                    }
                }
            }
        }
        let orphans: Vec<Digest> = self.content.keys().filter(|d| !referenced.contains(d)).cloned().collect();
        for d in orphans {
            self.gc_queue.insert(Candidate { repo: None, digest: d });
        }
    }

    /// Applies one change from the store's journal.
    pub fn apply(&mut self, c: Change) -> Result<(), Drift> {
        match c {
            Change::Committed { digest, size, at } => {
                let c = self.content.entry(digest).or_insert(Content { size, access: at });
                c.size = size;
                c.access = c.access.max(at);
            }
            Change::Linked { repo, digest } => {
                if !self.content.contains_key(&digest) {
                    return Err(Drift(format!("{digest} linked in {repo} is not in the index")));
                }
                // An upload to a local repository is reviewed once its grace period is over:
                // kept if a manifest needs it by then (GitLab's review of uploaded blobs).
                if let Repo::Local(_) = repo {
                    self.gc_queue.insert(Candidate { repo: Some(repo.clone()), digest: digest.clone() });
                }
                self.repos.entry(repo).or_default().links.insert(digest);
            }
            Change::Unlinked { repo, digest } => {
                if let Some(ri) = self.repos.get_mut(&repo) {
                    ri.links.remove(&digest);
                }
                self.gc_queue.insert(Candidate { repo: None, digest });
            }
            Change::ManifestStored { repo, digest, refs } => {
                self.repos
                    .entry(repo)
                    .or_default()
                    .manifests
                    .insert(digest, Needs { needs: refs.needs, subject: refs.subject });
            }
            Change::ManifestDeleted { repo, digest } => {
                let local = matches!(repo, Repo::Local(_));
                if let Some(n) = self.repos.get_mut(&repo).and_then(|ri| ri.manifests.remove(&digest)) {
                    for b in n.needs {
                        if local {
                            self.gc_queue.insert(Candidate { repo: Some(repo.clone()), digest: b.clone() });
                        }
                        self.gc_queue.insert(Candidate { repo: None, digest: b });
                    }
                }
                self.gc_queue.insert(Candidate { repo: None, digest });
            }
            Change::Deleted { digest } => {
                self.content.remove(&digest);
                self.imported.remove(&digest);
            }
            Change::Imported { digest } => {
                self.imported.insert(digest);
            }
            Change::Unimported { digest } => {
                self.imported.remove(&digest);
            }
            Change::Accessed { uses } => {
                for (d, t) in uses {
                    if let Some(c) = self.content.get_mut(&d) {
                        c.access = c.access.max(t);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a manifest anywhere needs `d`, or a repository links it or holds it as a
    /// manifest.
    pub fn referenced(&self, d: &Digest) -> bool {
        self.repos.values().any(|ri| {
            ri.links.contains(d) || ri.manifests.contains_key(d) || ri.manifests.values().any(|n| n.needs.contains(d))
        })
    }
}
