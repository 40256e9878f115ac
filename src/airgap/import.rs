//! `stevedore import PATH`: loads an OCI image layout (a directory, a tar, or a zstd tar,
//! told apart by content, not by name) into the store.
//!
//! One sequential pass over the input (a tar may hold blobs before `index.json`): every
//! `blobs/<alg>/<hex>` entry is streamed through the store's one [`crate::storage::Writer`],
//! which hashes it on the way in and verifies it against the digest its name claims; verified
//! content is held, not committed. Small JSON blobs (at most a manifest's 4 MiB) are also kept
//! in memory, as they may be manifests. After the pass, `index.json` is walked: every entry
//! must be present, every present manifest complete (an index may lack the child manifests of
//! platforms that were not exported), every size as its descriptor says. Only then is
//! anything committed: the blobs, their links, the manifests (children before their parents,
//! referrers after their subjects), and the tags last. On any failure every held ingest is
//! dropped and the store is as it was: a failure while committing undoes, newest first, every
//! change the commit journaled (links, revisions, referrer entries, tags, imported marks,
//! repositories and content that were not there before; content another repository references
//! stays); what cannot be undone is named in the error. Importing the same layout again changes
//! nothing.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use serde_json::Value;
use tokio::runtime::Handle;

use super::reference::{ImageRef, Selector};
use super::REF_NAME;
use crate::oci::manifest::{self, MAX_MANIFEST_BYTES};
use crate::oci::{Digest, Tag};
use crate::progress::Tally;
use crate::registry::Registry;
use crate::storage::{ManifestPut, Repo, Store, StoreError, Verified};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An entry of the layout is corrupt, truncated, missing or not what it claims to be.
    #[error("{entry}: {why}")]
    Entry { entry: String, why: String },
    #[error("{0}")]
    Layout(String),
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("{path}: {err}")]
    Input { path: String, err: std::io::Error },
    /// Committing failed; `left` is what undoing the import could not remove (empty: the
    /// store is as it was).
    #[error("{cause}{}", undone(left))]
    Commit { cause: StoreError, left: Vec<String> },
}

fn undone(left: &[String]) -> String {
    match left {
        [] => "; the import was undone".into(),
        _ => format!("; undoing the import failed, still in the store: {}", left.join(", ")),
    }
}

impl ImportError {
    /// Whether the store is as it was before the import (always, but for a commit whose undo
    /// failed).
    pub fn nothing_imported(&self) -> bool {
        !matches!(self, ImportError::Commit { left, .. } if !left.is_empty())
    }
}

fn entry_err(entry: impl Into<String>, why: impl Into<String>) -> ImportError {
    ImportError::Entry { entry: entry.into(), why: why.into() }
}

/// What an import did.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// `name:tag` (or `name@digest`) → digest, for every entry of `index.json`.
    pub refs: Vec<(String, Digest)>,
    pub manifests: usize,
    pub blobs: usize,
    /// Blobs that were not in the store before.
    pub new_blobs: usize,
    pub new_bytes: u64,
    /// Child manifests of an index that the layout does not hold (platforms not exported).
    pub absent_children: usize,
}

/// Largest `index.json` or `oci-layout` read.
const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Bytes handed to the writer per chunk.
const CHUNK: usize = 1 << 20;

/// Imports the layout at `path`. `repository` names the repository of entries named by a tag
/// only (`v1`) or not named at all.
/// `progress` counts each blob of the archive verified into the store's ingest.
pub async fn import(
    registry: &Registry,
    path: &Path,
    repository: Option<&str>,
    progress: &Tally,
) -> Result<ImportReport, ImportError> {
    let store = registry.store();
    let default_repo = match repository {
        None => None,
        Some(r) => {
            let r: ImageRef = r.parse().map_err(|e: super::reference::RefError| ImportError::Layout(e.to_string()))?;
            if r.selector != Selector::None {
                return Err(ImportError::Layout(format!("--repository {r}: a repository, without a tag or digest")));
            }
            let repo = registry
                .store_repo(r.host.as_deref(), &r.name)
                .map_err(|why| ImportError::Layout(format!("--repository {r}: {why}")))?;
            Some(repo)
        }
    };
    raise_fd_limit();
    let (store2, path2, handle, progress) = (store.clone(), path.to_path_buf(), Handle::current(), progress.clone());
    let mut loader = tokio::task::spawn_blocking(move || {
        let mut loader = Loader { store: Some(store2), handle: Some(handle), progress, ..Loader::default() };
        match read_input(&path2, &mut loader) {
            Ok(()) => Ok(loader),
            Err(e) => {
                loader.discard();
                Err(e)
            }
        }
    })
    .await
    .map_err(|e| ImportError::Layout(format!("import task failed: {e}")))??;
    let plan = match loader.plan(registry, default_repo.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            let held = std::mem::take(&mut loader.blobs);
            discard(held).await;
            return Err(e);
        }
    };
    commit(store, loader, plan).await
}

/// A blob read from the input: verified, not yet committed.
struct Held {
    entry: String,
    size: u64,
    verified: Box<dyn Verified>,
}

#[derive(Default)]
struct Loader {
    store: Option<Arc<Store>>,
    handle: Option<Handle>,
    oci_layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    blobs: HashMap<Digest, Held>,
    /// Small JSON blobs: maybe manifests.
    json: HashMap<Digest, bytes::Bytes>,
    progress: Tally,
}

/// Reads a small file entry whole, refusing more than `limit` bytes.
fn read_small(entry: &str, size: u64, r: &mut dyn Read, limit: u64) -> Result<Vec<u8>, ImportError> {
    if size > limit {
        return Err(entry_err(entry, format!("{size} bytes is more than the {limit} accepted")));
    }
    let mut buf = Vec::with_capacity(size as usize);
    r.take(limit + 1).read_to_end(&mut buf).map_err(|e| entry_err(entry, format!("reading: {e}")))?;
    if buf.len() as u64 != size {
        return Err(entry_err(entry, format!("truncated: {} of {size} bytes", buf.len())));
    }
    Ok(buf)
}

impl Loader {
    fn store(&self) -> &Arc<Store> {
        self.store.as_ref().expect("store")
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle.as_ref().expect("runtime handle").block_on(f)
    }

    /// One entry of the layout (`name` relative to its root).
    fn entry(&mut self, name: &str, size: u64, r: &mut dyn Read) -> Result<(), ImportError> {
        match name {
            "oci-layout" => self.oci_layout = Some(read_small(name, size, r, MAX_INDEX_BYTES)?),
            "index.json" => self.index = Some(read_small(name, size, r, MAX_INDEX_BYTES)?),
            _ if name.starts_with("blobs/") => self.blob(name, size, r)?,
            // Anything else (Docker's manifest.json, repositories) is not ours to read.
            _ => {}
        }
        Ok(())
    }

    /// Streams a blob through the writer and verifies it against its name.
    fn blob(&mut self, name: &str, size: u64, r: &mut dyn Read) -> Result<(), ImportError> {
        let parsed = name
            .strip_prefix("blobs/")
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(alg, hex)| format!("{alg}:{hex}").parse::<Digest>().ok());
        let Some(d) = parsed else {
            return Err(entry_err(name, "not a blob name (blobs/<algorithm>/<hex digest>)"));
        };
        if self.blobs.contains_key(&d) {
            return Ok(()); // the same blob twice: the first copy was verified
        }
        let store = self.store().clone();
        let mut w = self.block_on(store.begin_fill(&d))?;
        let keep_json = size <= MAX_MANIFEST_BYTES as u64;
        let mut json: Option<Vec<u8>> = None;
        let mut read = 0u64;
        let res = loop {
            let mut buf = BytesMut::zeroed(CHUNK);
            let n = match r.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(entry_err(name, format!("reading: {e} (archive truncated or corrupt?)"))),
            };
            if n == 0 {
                break Ok(());
            }
            buf.truncate(n);
            if read == 0 && keep_json && buf.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
                json = Some(Vec::with_capacity(size as usize));
            }
            if let Some(j) = json.as_mut() {
                j.extend_from_slice(&buf);
            }
            read += n as u64;
            if let Err(e) = self.block_on(w.write(buf.freeze())) {
                break Err(e.into());
            }
        };
        let res = res.and_then(|()| {
            if read != size {
                return Err(entry_err(name, format!("truncated: {read} of {size} bytes")));
            }
            Ok(())
        });
        if let Err(e) = res {
            let _ = self.block_on(w.abort());
            return Err(e);
        }
        let verified = match self.block_on(w.verify(&d, Some(size))) {
            Ok(v) => v,
            Err(StoreError::DigestMismatch { actual, .. }) => {
                return Err(entry_err(name, format!("corrupt: the content hashes to {actual}, not to its name")));
            }
            Err(StoreError::SizeMismatch { actual, .. }) => {
                return Err(entry_err(name, format!("truncated: {actual} of {size} bytes")));
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(j) = json {
            self.json.insert(d.clone(), j.into());
        }
        self.blobs.insert(d, Held { entry: name.to_string(), size, verified });
        self.progress.add(size);
        Ok(())
    }

    /// Drops every held ingest (from the blocking side).
    fn discard(&mut self) {
        let held = std::mem::take(&mut self.blobs);
        let handle = self.handle.clone().expect("runtime handle");
        handle.block_on(discard(held));
    }

    /// Checks the layout and decides what goes where; nothing is written.
    fn plan(&self, registry: &Registry, default_repo: Option<&Repo>) -> Result<Plan, ImportError> {
        let Some(layout) = &self.oci_layout else {
            return Err(ImportError::Layout("oci-layout is missing: this is not an OCI image layout".into()));
        };
        let version = serde_json::from_slice::<Value>(layout)
            .ok()
            .and_then(|v| v["imageLayoutVersion"].as_str().map(str::to_string));
        if version.is_none() {
            return Err(entry_err("oci-layout", "no imageLayoutVersion"));
        }
        let Some(index) = &self.index else {
            return Err(ImportError::Layout("index.json is missing: this is not an OCI image layout".into()));
        };
        let index: Value =
            serde_json::from_slice(index).map_err(|e| entry_err("index.json", format!("not JSON: {e}")))?;
        let Some(entries) = index["manifests"].as_array() else {
            return Err(entry_err("index.json", "no manifests array"));
        };
        let mut plan = Plan::default();
        for (i, e) in entries.iter().enumerate() {
            let at = format!("index.json manifests[{i}]");
            let d: Digest =
                e["digest"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| entry_err(&at, "no valid digest"))?;
            let name = e["annotations"][REF_NAME].as_str();
            let at = match name {
                Some(n) => format!("{at} ({n})"),
                None => at,
            };
            let (repo, tag, shown) =
                self.entry_name(registry, default_repo, name, &d).map_err(|why| entry_err(&at, why))?;
            let size = e["size"].as_u64().ok_or_else(|| entry_err(&at, "no size"))?;
            self.visit(&mut plan, &repo, &d, size, &at)?;
            if let Some(t) = tag {
                plan.tags.push((repo.clone(), t, d.clone()));
            }
            plan.refs.push((shown, d));
        }
        self.referrers(&mut plan);
        Ok(plan)
    }

    /// Where an entry of `index.json` goes: (repository, tag, name shown).
    fn entry_name(
        &self,
        registry: &Registry,
        default_repo: Option<&Repo>,
        name: Option<&str>,
        d: &Digest,
    ) -> Result<(Repo, Option<Tag>, String), String> {
        let need_repo = |what: String| {
            default_repo
                .cloned()
                .ok_or_else(|| format!("{what}: name the repository it goes to with --repository NAME"))
        };
        let Some(name) = name else {
            let repo = need_repo(format!("no {REF_NAME} annotation"))?;
            return Ok((repo.clone(), None, format!("{repo}@{d}")));
        };
        if !name.contains(['/', ':', '@']) {
            let tag: Tag = name.parse().map_err(|_| format!("{name:?} is neither a tag nor a full reference"))?;
            let repo = need_repo(format!("named by the tag {name:?} only"))?;
            return Ok((repo.clone(), Some(tag), format!("{repo}:{name}")));
        }
        let r: ImageRef = name.parse().map_err(|e: super::reference::RefError| e.to_string())?;
        let repo = registry.store_repo(r.host.as_deref(), &r.name)?;
        match r.selector {
            Selector::Tag(t) => Ok((repo.clone(), Some(t.clone()), format!("{repo}:{t}"))),
            Selector::Digest(named) if &named != d => Err(format!("names {named} but the entry is {d}")),
            Selector::Digest(_) | Selector::None => Ok((repo.clone(), None, format!("{repo}@{d}"))),
            Selector::Pattern(_) => Err("a tag pattern is not a name".into()),
        }
    }

    /// Checks that the blob `d` is there with `size` bytes; `from` says who references it.
    fn present(&self, d: &Digest, size: u64, from: &str) -> Result<(), ImportError> {
        let Some(held) = self.blobs.get(d) else {
            return Err(entry_err(
                from,
                format!("references {d}, but blobs/{}/{} is not in the layout", d.algorithm().as_str(), d.hex()),
            ));
        };
        if held.size != size {
            return Err(entry_err(&held.entry, format!("{} bytes, but {from} says {size}", held.size)));
        }
        Ok(())
    }

    /// Adds the manifest `d` (and what it references) to `repo` in the plan.
    fn visit(&self, plan: &mut Plan, repo: &Repo, d: &Digest, size: u64, from: &str) -> Result<(), ImportError> {
        self.present(d, size, from)?;
        let mut stack = vec![(d.clone(), false)];
        while let Some((d, children_done)) = stack.pop() {
            let key = (repo.clone(), d.clone());
            if plan.planned.contains(&key) {
                continue;
            }
            let entry = self.blobs[&d].entry.clone();
            let Some(bytes) = self.json.get(&d) else {
                return Err(entry_err(&entry, "referenced as a manifest, but it is not one"));
            };
            let m =
                manifest::parse(bytes, None).map_err(|e| entry_err(&entry, format!("not a valid manifest: {e}")))?;
            if children_done {
                plan.planned.insert(key);
                plan.manifests.push(Planned {
                    repo: repo.clone(),
                    digest: d.clone(),
                    manifest: m,
                    bytes: bytes.clone(),
                });
                continue;
            }
            stack.push((d.clone(), true));
            for b in m.config.iter().chain(&m.layers) {
                if b.embedded || b.is_non_distributable() {
                    continue;
                }
                self.present(&b.digest, b.size, &entry)?;
                plan.links.insert((repo.clone(), b.digest.clone()));
            }
            for c in &m.manifests {
                if self.blobs.contains_key(&c.digest) {
                    self.present(&c.digest, c.size, &entry)?;
                    stack.push((c.digest.clone(), false));
                } else {
                    plan.absent_children += 1;
                }
            }
        }
        Ok(())
    }

    /// Manifests in the layout whose subject is a planned manifest (referrers not named in
    /// `index.json`) go with their subject, when complete.
    fn referrers(&self, plan: &mut Plan) {
        loop {
            let mut added = false;
            for (d, bytes) in &self.json {
                let Ok(m) = manifest::parse(bytes, None) else { continue };
                let Some(subject) = &m.subject else { continue };
                let repos: Vec<Repo> =
                    plan.manifests.iter().filter(|p| p.digest == subject.digest).map(|p| p.repo.clone()).collect();
                for repo in repos {
                    if plan.planned.contains(&(repo.clone(), d.clone())) {
                        continue;
                    }
                    let mut trial = Plan { planned: plan.planned.clone(), ..Plan::default() };
                    if self.visit(&mut trial, &repo, d, self.blobs[d].size, "referrer").is_ok() {
                        plan.planned.extend(trial.planned);
                        plan.manifests.extend(trial.manifests);
                        plan.links.extend(trial.links);
                        added = true;
                    }
                }
            }
            if !added {
                return;
            }
        }
    }
}

struct Planned {
    repo: Repo,
    digest: Digest,
    manifest: manifest::Manifest,
    bytes: bytes::Bytes,
}

#[derive(Default)]
struct Plan {
    /// In commit order: children before parents, subjects before referrers.
    manifests: Vec<Planned>,
    planned: HashSet<(Repo, Digest)>,
    /// Blobs to link: (repository, digest).
    links: HashSet<(Repo, Digest)>,
    tags: Vec<(Repo, Tag, Digest)>,
    refs: Vec<(String, Digest)>,
    absent_children: usize,
}

async fn discard(held: HashMap<Digest, Held>) {
    for (_, h) in held {
        drop_held(h).await;
    }
}

/// Removes a held blob's ingest.
async fn drop_held(h: Held) {
    if let Err(e) = h.verified.abort().await {
        tracing::warn!(entry = %h.entry, error = %e, "removing an import's ingest");
    }
}

/// A change the commit made to the store, journaled before it is made so that a failure can
/// undo it. Only what was not there before is journaled: undoing never removes what the store
/// held before the import.
enum Change {
    /// An imported mark added.
    Marked(Digest),
    /// Content committed that was not in the store.
    Committed(Digest),
    /// A repository created (its tree goes again when the undo leaves it empty).
    Created(Repo),
    /// A blob link added.
    Linked(Repo, Digest),
    /// A manifest revision added, with its referrer entry when it has a subject.
    Revision(Repo, Digest, Option<Digest>),
    /// A tag moved from what it pointed at (`None`: it did not exist).
    Tag(Repo, Tag, Option<Digest>),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Marked(d) => write!(f, "the imported mark of {d}"),
            Change::Committed(d) => write!(f, "blob {d}"),
            Change::Created(r) => write!(f, "repository {r}"),
            Change::Linked(r, d) => write!(f, "the link of {d} in {r}"),
            Change::Revision(r, d, _) => write!(f, "manifest {r}@{d}"),
            Change::Tag(r, t, None) => write!(f, "tag {r}:{t}"),
            Change::Tag(r, t, Some(before)) => write!(f, "tag {r}:{t} (was {before})"),
        }
    }
}

/// The error a test failure point stands in for (`crate::hooks::fail`).
fn injected(point: &str) -> StoreError {
    StoreError::Io(std::io::Error::other(format!("injected failure ({point})")))
}

/// Makes everything in the plan visible, all or nothing: the blobs (invisible until linked),
/// then repository by repository its links and manifests, then the tags. When a step fails,
/// every change journaled so far is undone, newest first.
async fn commit(store: &Arc<Store>, mut loader: Loader, plan: Plan) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport { absent_children: plan.absent_children, ..ImportReport::default() };
    let mut journal = Vec::new();
    let held = std::mem::take(&mut loader.blobs);
    match apply(store, held, &plan, &mut report, &mut journal).await {
        Ok(()) => {
            report.manifests = plan.manifests.len();
            report.refs = plan.refs;
            Ok(report)
        }
        Err(cause) => {
            let left = undo(store, journal).await;
            Err(ImportError::Commit { cause, left })
        }
    }
}

async fn apply(
    store: &Store,
    held: HashMap<Digest, Held>,
    plan: &Plan,
    report: &mut ImportReport,
    journal: &mut Vec<Change>,
) -> Result<(), StoreError> {
    let mut wanted: HashSet<&Digest> = plan.links.iter().map(|(_, d)| d).collect();
    wanted.extend(plan.manifests.iter().map(|p| &p.digest));
    let mut todo = Vec::new();
    let mut unwanted = HashMap::new();
    for (d, h) in held {
        if wanted.contains(&d) {
            todo.push((d, h));
        } else {
            unwanted.insert(d, h);
        }
    }
    discard(unwanted).await;
    todo.sort_by(|a, b| a.0.cmp(&b.0));
    let mut todo = todo.into_iter();
    while let Some((d, h)) = todo.next() {
        if let Err(e) = commit_blob(store, &d, h, report, journal).await {
            discard(todo.collect()).await;
            return Err(e);
        }
    }

    // Repository by repository, in the order of the layout's entries.
    let mut repos: Vec<&Repo> = Vec::new();
    for r in plan.manifests.iter().map(|p| &p.repo).chain(plan.links.iter().map(|(r, _)| r)) {
        if !repos.contains(&r) {
            repos.push(r);
        }
    }
    for repo in repos {
        if store.list_tags(repo).await?.is_none() {
            journal.push(Change::Created(repo.clone()));
        }
        let mut links: Vec<&Digest> = plan.links.iter().filter(|(r, _)| r == repo).map(|(_, d)| d).collect();
        links.sort();
        for d in links {
            if !store.linked(repo, d).await? {
                journal.push(Change::Linked(repo.clone(), d.clone()));
                store.link_blob(repo, d).await?;
            }
        }
        if crate::hooks::fail("import.commit_repo") {
            return Err(injected("import.commit_repo"));
        }
        // Children before their parents, subjects before their referrers (the plan's order).
        for p in plan.manifests.iter().filter(|p| &p.repo == repo) {
            let subject = p.manifest.subject.as_ref().map(|s| s.digest.clone());
            if !store.has_revision(repo, &p.digest).await? {
                journal.push(Change::Revision(repo.clone(), p.digest.clone(), subject.clone()));
            }
            let referrer =
                subject.as_ref().map(|s| (s, p.manifest.referrer_descriptor(&p.digest, p.bytes.len() as u64)));
            let put = ManifestPut {
                media_type: &p.manifest.media_type,
                bytes: &p.bytes,
                digest: &p.digest,
                tags: &[],
                referrer,
            };
            store.put_manifest(repo, put).await?;
        }
    }

    // Tags last: until here no tag has moved.
    for (repo, tag, d) in &plan.tags {
        if crate::hooks::fail("import.move_tag") {
            return Err(injected("import.move_tag"));
        }
        let before = store.resolve_tag(repo, tag).await?;
        if before.as_ref() != Some(d) {
            journal.push(Change::Tag(repo.clone(), tag.clone(), before));
        }
        store.touch_tag(repo, tag, d).await?;
    }
    Ok(())
}

/// Commits one held blob, marked imported before it is visible (imported content is never
/// evicted by the cache cap). Content already in the store is kept as it is.
async fn commit_blob(
    store: &Store,
    d: &Digest,
    h: Held,
    report: &mut ImportReport,
    journal: &mut Vec<Change>,
) -> Result<(), StoreError> {
    let checked = async {
        let existed = store.blob_size(d).await?;
        let marked = store.is_imported(d).await?;
        if !marked {
            journal.push(Change::Marked(d.clone()));
            store.mark_imported(d).await?;
        }
        Ok(existed)
    };
    let existed = match checked.await {
        Ok(existed) => existed,
        Err(e) => {
            drop_held(h).await;
            return Err(e);
        }
    };
    report.blobs += 1;
    if existed == Some(h.size) {
        drop_held(h).await;
        return Ok(());
    }
    if existed.is_none() {
        journal.push(Change::Committed(d.clone()));
    }
    let size = store.publish(h.verified, d).await?;
    if existed.is_none() {
        report.new_blobs += 1;
        report.new_bytes += size;
    }
    Ok(())
}

/// Undoes the journal, newest change first; what could not be undone, said exactly.
/// Content the import committed goes last, and only when no repository references it.
async fn undo(store: &Store, journal: Vec<Change>) -> Vec<String> {
    let mut left = Vec::new();
    let mut content = Vec::new();
    for c in journal.into_iter().rev() {
        if crate::hooks::fail("import.undo") {
            left.push(format!("{c} ({})", injected("import.undo")));
            continue;
        }
        let res = match &c {
            Change::Tag(repo, tag, Some(before)) => store.touch_tag(repo, tag, before).await,
            Change::Tag(repo, tag, None) => store.delete_tag(repo, tag).await.map(drop),
            Change::Revision(repo, d, subject) => store.delete_manifest(repo, d, subject.as_ref()).await.map(drop),
            Change::Linked(repo, d) => store.unlink_blob(repo, d).await.map(drop),
            Change::Created(repo) => store.prune_repo(repo).await,
            Change::Marked(_) | Change::Committed(_) => {
                content.push(c);
                continue;
            }
        };
        if let Err(e) = res {
            left.push(format!("{c} ({e})"));
        }
    }
    let referenced = match content.iter().any(|c| matches!(c, Change::Committed(_))) {
        true => referenced(store).await,
        false => Ok(HashSet::new()),
    };
    for c in content {
        let res = match (&c, &referenced) {
            (Change::Committed(d), Ok(r)) if r.contains(d) => {
                left.push(format!("{c} (a repository links it)"));
                Ok(())
            }
            (Change::Committed(d), Ok(_)) => store.delete_content(d).await.map(drop),
            (Change::Committed(_), Err(e)) => Err(StoreError::Io(std::io::Error::other(format!(
                "could not tell whether another repository references it: {e}"
            )))),
            (Change::Marked(d), _) => store.unmark_imported(d).await,
            _ => Ok(()),
        };
        if let Err(e) = res {
            left.push(format!("{c} ({e})"));
        }
    }
    left
}

/// Every digest linked or stored as a manifest in some repository of the store.
async fn referenced(store: &Store) -> Result<HashSet<Digest>, StoreError> {
    let mut out = HashSet::new();
    for repo in store.repositories().await? {
        out.extend(store.repo_digests(&repo).await?);
    }
    Ok(out)
}

/// Reads the input at `path` entry by entry into `loader`: a directory, or a tar (plain or
/// zstd-compressed, told apart by its first bytes).
fn read_input(path: &Path, loader: &mut Loader) -> Result<(), ImportError> {
    let input = |err: std::io::Error| ImportError::Input { path: path.display().to_string(), err };
    let meta = std::fs::metadata(path).map_err(input)?;
    if meta.is_dir() {
        return read_dir(path, loader);
    }
    let mut file = std::fs::File::open(path).map_err(input)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(input)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).map_err(input)?;
    let file = std::io::BufReader::with_capacity(1 << 20, file);
    let reader: Box<dyn Read> = if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::Decoder::with_buffer(file).map_err(input)?)
    } else {
        Box::new(file)
    };
    read_tar(reader, loader)
}

fn read_dir(root: &Path, loader: &mut Loader) -> Result<(), ImportError> {
    let input = |p: &Path, err: std::io::Error| ImportError::Input { path: p.display().to_string(), err };
    for name in ["oci-layout", "index.json"] {
        let p = root.join(name);
        match std::fs::File::open(&p) {
            Ok(mut f) => {
                let size = f.metadata().map_err(|e| input(&p, e))?.len();
                loader.entry(name, size, &mut f)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(input(&p, e)),
        }
    }
    let blobs = root.join("blobs");
    let algs = match std::fs::read_dir(&blobs) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(input(&blobs, e)),
    };
    for alg in algs {
        let alg = alg.map_err(|e| input(&blobs, e))?;
        if !alg.file_type().map_err(|e| input(&alg.path(), e))?.is_dir() {
            continue;
        }
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for f in std::fs::read_dir(alg.path()).map_err(|e| input(&alg.path(), e))? {
            let f = f.map_err(|e| input(&alg.path(), e))?;
            let name = format!("blobs/{alg_name}/{}", f.file_name().to_string_lossy());
            let mut file = std::fs::File::open(f.path()).map_err(|e| input(&f.path(), e))?;
            let size = file.metadata().map_err(|e| input(&f.path(), e))?.len();
            loader.entry(&name, size, &mut file)?;
        }
    }
    Ok(())
}

fn read_tar(reader: Box<dyn Read>, loader: &mut Loader) -> Result<(), ImportError> {
    let mut archive = tar::Archive::new(reader);
    let mut last = String::from("the start");
    let entries = archive.entries().map_err(|e| ImportError::Layout(format!("not a tar archive: {e}")))?;
    for e in entries {
        let mut e =
            e.map_err(|err| ImportError::Layout(format!("archive truncated or corrupt after {last}: {err}")))?;
        let path = e.path().map_err(|err| ImportError::Layout(format!("bad entry name after {last}: {err}")))?;
        let mut name = path.to_string_lossy().into_owned();
        while let Some(rest) = name.strip_prefix("./") {
            name = rest.to_string();
        }
        last = name.clone();
        let kind = e.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            if name.starts_with("blobs/") || name == "index.json" || name == "oci-layout" {
                return Err(entry_err(&name, "not a regular file"));
            }
            continue;
        }
        let size = e.size();
        loader.entry(&name, size, &mut e)?;
    }
    Ok(())
}

/// Verified blobs are held open until the import commits: allow as many open files as the
/// hard limit does.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
