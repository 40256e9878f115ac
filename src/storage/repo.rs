//! Per-repository metadata over the backend's small objects: manifest revisions, tags,
//! referrers and the catalog.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::Value;

use super::layout::{self, Key};
use super::Event;
use super::{Reach, Repo, Store, StoreResult};
use crate::oci::manifest::Required;
use crate::oci::{Digest, Tag};

/// A manifest stored in a repository.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// What to record when a manifest is put.
pub struct ManifestPut<'a> {
    pub media_type: &'a str,
    pub bytes: &'a [u8],
    pub digest: &'a Digest,
    pub tags: &'a [Tag],
    /// `(subject, descriptor of this manifest)` when the manifest has a `subject`.
    pub referrer: Option<(&'a Digest, Value)>,
}

impl Store {
    /// Stores a manifest's exact bytes and records it (and its tags and referrer entry) in
    /// `repo`, under the manifest's shared guard (a pull-through or an import: what it
    /// references is not checked here).
    pub async fn put_manifest(&self, repo: &Repo, m: ManifestPut<'_>) -> StoreResult<()> {
        let mut reach = self.reach(&[m.digest]).await?;
        self.put_manifest_guarded(&mut reach, repo, &m, &[]).await
    }

    /// A client's manifest PUT: under the shared guards of the manifest and of everything it
    /// requires, checks with the backend (not a cache) that each required blob is linked in
    /// `repo` with its content present and each required manifest is in `repo`, then stores
    /// it. `Ok(Err(d))`: `d` is missing and nothing was stored.
    pub async fn put_manifest_checked(
        &self,
        repo: &Repo,
        m: ManifestPut<'_>,
        required: &[Required],
    ) -> StoreResult<Result<(), Digest>> {
        let digests: Vec<&Digest> = required
            .iter()
            .map(|r| match r {
                Required::Blob(d) | Required::Manifest(d) => d,
            })
            .collect();
        let mut all = digests.clone();
        all.push(m.digest);
        let mut reach = self.reach(&all).await?;
        let checks = required.iter().map(|r| async move {
            let (d, key) = match r {
                Required::Blob(d) => (d, layout::layer_link(repo, d)),
                Required::Manifest(d) => (d, layout::revision(repo, d)),
            };
            let present = self.backend.has(&key).await? && self.backend.stat(d).await?.is_some();
            StoreResult::Ok((!present).then(|| d.clone()))
        });
        if let Some(missing) = futures::future::try_join_all(checks).await?.into_iter().flatten().next() {
            return Ok(Err(missing));
        }
        crate::hooks::pause("manifest_put.after_check").await;
        self.put_manifest_guarded(&mut reach, repo, &m, &digests).await?;
        Ok(Ok(()))
    }

    /// Stores a manifest under its shared guard (and those of `uses`, which count as used
    /// once it is stored).
    async fn put_manifest_guarded(
        &self,
        reach: &mut Reach,
        repo: &Repo,
        m: &ManifestPut<'_>,
        uses: &[&Digest],
    ) -> StoreResult<()> {
        debug_assert!(reach.covers(m.digest));
        self.put_bytes_guarded(reach, m.digest, m.bytes).await?;
        // What it references is recorded before the manifest is visible in `repo`.
        let mut refs = super::Refs::default();
        if let Ok(parsed) = crate::oci::manifest::parse(m.bytes, Some(m.media_type)) {
            refs = super::Refs::of(&parsed);
            self.record_refs(m.digest, &refs).await?;
        }
        if let Some((subject, desc)) = &m.referrer {
            self.backend.put(&layout::referrer(repo, subject, m.digest), desc.to_string().as_bytes()).await?;
        }
        let revision = layout::revision(repo, m.digest);
        if !reach.recorded(m.digest) && !self.backend.has(&revision).await? {
            // A new revision: its use is durable before it is visible (another replica's
            // collection sees it).
            self.record_access_now(m.digest).await;
        }
        self.backend.put(&revision, m.media_type.as_bytes()).await?;
        let needs = refs.needs.clone();
        self.note(super::Change::ManifestStored { repo: repo.clone(), digest: m.digest.clone(), refs });
        for tag in m.tags {
            self.backend.put(&layout::tag(repo, tag), m.digest.to_string().as_bytes()).await?;
            self.tell(Event::TagChanged { repo: Store::repo_key(repo), tag: tag.to_string() }).await;
        }
        // Used now, after the last write and before the guards go: a removal that decided
        // earlier sees it when it re-checks.
        self.touch(m.digest);
        for d in needs.iter().chain(uses.iter().copied()) {
            self.touch(d);
        }
        if self.catalog.add(repo) {
            self.tell(Event::RepoCreated { repo: Store::repo_key(repo) }).await;
        }
        Ok(())
    }

    /// The digest a tag points at.
    pub async fn resolve_tag(&self, repo: &Repo, tag: &Tag) -> StoreResult<Option<Digest>> {
        Ok(self.tag_with_age(repo, tag).await?.map(|(d, _)| d))
    }

    /// The digest a tag points at and how long ago the tag was written or last confirmed.
    pub async fn tag_with_age(&self, repo: &Repo, tag: &Tag) -> StoreResult<Option<(Digest, Duration)>> {
        let Some((raw, written)) = self.backend.get(&layout::tag(repo, tag)).await? else { return Ok(None) };
        let digest = std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse().ok());
        let age = SystemTime::now().duration_since(written).unwrap_or_default();
        Ok(digest.map(|d| (d, age)))
    }

    /// Points a tag at `d` (again), restarting its age: under `d`'s shared guard, and only
    /// while `repo` holds manifest `d` (a tag never points at a manifest just removed).
    pub async fn touch_tag(&self, repo: &Repo, tag: &Tag, d: &Digest) -> StoreResult<()> {
        let _reach = self.reach(&[d]).await?;
        if !self.backend.has(&layout::revision(repo, d)).await? {
            return Ok(());
        }
        self.backend.put(&layout::tag(repo, tag), d.to_string().as_bytes()).await?;
        self.touch(d);
        Ok(())
    }

    /// A manifest's media type and size, if it is in `repo`.
    pub async fn manifest_info(&self, repo: &Repo, d: &Digest) -> StoreResult<Option<StoredManifest>> {
        let Some((media_type, _)) = self.backend.get(&layout::revision(repo, d)).await? else { return Ok(None) };
        let Some(size) = self.blob_size(d).await? else { return Ok(None) };
        self.touch(d);
        Ok(Some(StoredManifest {
            digest: d.clone(),
            media_type: String::from_utf8_lossy(&media_type).into_owned(),
            size,
        }))
    }

    /// A manifest's bytes, if it is in `repo`.
    pub async fn read_manifest(&self, repo: &Repo, d: &Digest) -> StoreResult<Option<(StoredManifest, Bytes)>> {
        let Some(info) = self.manifest_info(repo, d).await? else { return Ok(None) };
        let Some(bytes) = self.manifest_bytes(&info).await? else { return Ok(None) };
        Ok(Some((info, bytes)))
    }

    /// The bytes of a manifest found with [`Store::manifest_info`] (`None`: removed since).
    pub async fn manifest_bytes(&self, m: &StoredManifest) -> StoreResult<Option<Bytes>> {
        self.backend.read_small(&m.digest).await
    }

    /// Removes a manifest from `repo`, with the tags that point at it and its referrer entry.
    /// `subject` is the manifest's subject, if it has one.
    pub async fn delete_manifest(&self, repo: &Repo, d: &Digest, subject: Option<&Digest>) -> StoreResult<bool> {
        if !self.backend.remove(&layout::revision(repo, d)).await? {
            return Ok(false);
        }
        self.note(super::Change::ManifestDeleted { repo: repo.clone(), digest: d.clone() });
        for tag in self.list_tags(repo).await?.unwrap_or_default() {
            if self.resolve_tag(repo, &tag).await?.as_ref() == Some(d) {
                self.backend.remove(&layout::tag(repo, &tag)).await?;
            }
        }
        if let Some(s) = subject {
            self.backend.remove(&layout::referrer(repo, s, d)).await?;
        }
        self.tell(Event::ManifestGone { repo: Store::repo_key(repo), digest: d.to_string() }).await;
        Ok(true)
    }

    pub async fn delete_tag(&self, repo: &Repo, tag: &Tag) -> StoreResult<bool> {
        let removed = self.backend.remove(&layout::tag(repo, tag)).await?;
        if removed {
            self.tell(Event::TagChanged { repo: Store::repo_key(repo), tag: tag.to_string() }).await;
        }
        Ok(removed)
    }

    /// The repository's tags, sorted; `None` if the repository does not exist.
    pub async fn list_tags(&self, repo: &Repo) -> StoreResult<Option<Vec<Tag>>> {
        if !self.backend.exists(&layout::repo(repo)).await? {
            return Ok(None);
        }
        let mut tags: Vec<Tag> =
            self.backend.list(&layout::tags_dir(repo)).await?.iter().filter_map(|n| n.parse().ok()).collect();
        tags.sort();
        Ok(Some(tags))
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`, by digest.
    pub async fn referrers(&self, repo: &Repo, subject: &Digest) -> StoreResult<Vec<Value>> {
        let dir = layout::referrers_dir(repo, subject);
        let mut out = Vec::new();
        for name in self.backend.list(&dir).await? {
            let Some((raw, _)) = self.backend.get(&layout::child(&dir, &name)).await? else { continue };
            if let Ok(v) = serde_json::from_slice::<Value>(&raw) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
        Ok(out)
    }

    /// Up to `n` repository names after `last`, sorted, from the in-memory index (built by
    /// one walk on first use), and whether more follow.
    pub async fn catalog(&self, last: Option<&str>, n: usize) -> StoreResult<(Vec<String>, bool)> {
        {
            let mut walked = self.catalog.walked.lock().await;
            let expired = self.catalog.stale.swap(false, std::sync::atomic::Ordering::AcqRel)
                || (*walked).zip(self.catalog.ttl).is_some_and(|(at, ttl)| at.elapsed() >= ttl);
            if walked.is_none() || expired {
                let found = self.walk_repos().await?;
                self.catalog.names.lock().unwrap().extend(found);
                *walked = Some(std::time::Instant::now());
            }
        }
        let names = self.catalog.names.lock().unwrap();
        let mut it: Box<dyn Iterator<Item = &String>> = match last {
            Some(l) => Box::new(names.range::<str, _>((std::ops::Bound::Excluded(l), std::ops::Bound::Unbounded))),
            None => Box::new(names.iter()),
        };
        let page: Vec<String> = it.by_ref().take(n).cloned().collect();
        Ok((page, it.next().is_some()))
    }

    /// Every repository in the store, local and cached (export of everything).
    pub async fn repositories(&self) -> StoreResult<Vec<Repo>> {
        let mut out = Vec::new();
        let mut names = Vec::new();
        self.walk_tree(&layout::root(layout::LOCAL_REPOS), String::new(), &mut names).await?;
        out.extend(names.drain(..).filter_map(|n| n.parse().ok()).map(Repo::Local));
        let cache = layout::root(layout::CACHE_REPOS);
        for host in self.backend.list(&cache).await? {
            self.walk_tree(&layout::child(&cache, &host), String::new(), &mut names).await?;
            out.extend(names.drain(..).filter_map(|n| n.parse().ok()).map(|n| Repo::cache(&host, n)));
        }
        out.sort_by_key(|r| r.to_string());
        Ok(out)
    }

    /// Every repository in the backend: local ones under `repos/`, cached ones under
    /// `cache/<host>/`. A repository is a tree holding `_manifests` or `_layers`.
    async fn walk_repos(&self) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        let local = layout::root(layout::LOCAL_REPOS);
        self.walk_tree(&local, String::new(), &mut out).await?;
        let cache = layout::root(layout::CACHE_REPOS);
        for host in self.backend.list(&cache).await? {
            self.walk_tree(&layout::child(&cache, &host), host.clone(), &mut out).await?;
        }
        Ok(out)
    }

    async fn walk_tree(&self, base: &Key, prefix: String, out: &mut Vec<String>) -> StoreResult<()> {
        let mut stack = vec![(base.clone(), prefix)];
        while let Some((dir, name)) = stack.pop() {
            let entries = self.backend.list(&dir).await?;
            if !name.is_empty() && entries.iter().any(|e| e == "_manifests" || e == "_layers") {
                out.push(name.clone());
            }
            for e in entries {
                if e.starts_with('_') {
                    continue;
                }
                let child = if name.is_empty() { e.clone() } else { format!("{name}/{e}") };
                stack.push((layout::child(&dir, &e), child));
            }
        }
        Ok(())
    }
}
