//! Per-repository metadata: manifest revisions, tags, referrers and the catalog.

use bytes::Bytes;
use serde_json::Value;

use super::{exists, read_opt, remove_file, Store, StoreResult};
use crate::oci::{Digest, RepoName, Tag};

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
    /// Stores a manifest's exact bytes and records it (and its tags and referrer entry) in `repo`.
    pub async fn put_manifest(&self, repo: &RepoName, m: ManifestPut<'_>) -> StoreResult<()> {
        let stored = self.put_bytes(m.digest.algorithm(), m.bytes).await?;
        debug_assert_eq!(&stored, m.digest);
        if let Some((subject, desc)) = &m.referrer {
            let path = self.layout.referrer(repo, subject, m.digest);
            self.write_atomic(&path, desc.to_string().as_bytes()).await?;
        }
        self.write_atomic(&self.layout.revision(repo, m.digest), m.media_type.as_bytes()).await?;
        for tag in m.tags {
            self.write_atomic(&self.layout.tag(repo, tag), m.digest.to_string().as_bytes()).await?;
        }
        Ok(())
    }

    /// The digest a tag points at.
    pub async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<Digest>> {
        let Some(raw) = read_opt(&self.layout.tag(repo, tag)).await? else { return Ok(None) };
        Ok(std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse().ok()))
    }

    /// The digest a tag points at and how long ago the tag was written or last confirmed.
    pub async fn tag_with_age(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<(Digest, std::time::Duration)>> {
        let path = self.layout.tag(repo, tag);
        let Some(d) = self.resolve_tag(repo, tag).await? else { return Ok(None) };
        let age = tokio::fs::metadata(&path).await.and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default());
        Ok(age.ok().map(|age| (d, age)))
    }

    /// Points a tag at `d` (again), restarting its age.
    pub async fn touch_tag(&self, repo: &RepoName, tag: &Tag, d: &Digest) -> StoreResult<()> {
        self.write_atomic(&self.layout.tag(repo, tag), d.to_string().as_bytes()).await
    }

    /// A manifest's media type and size, if it is in `repo`.
    pub async fn manifest_info(&self, repo: &RepoName, d: &Digest) -> StoreResult<Option<StoredManifest>> {
        let Some(media_type) = read_opt(&self.layout.revision(repo, d)).await? else { return Ok(None) };
        let Some(size) = self.blob_size(d).await? else { return Ok(None) };
        Ok(Some(StoredManifest {
            digest: d.clone(),
            media_type: String::from_utf8_lossy(&media_type).into_owned(),
            size,
        }))
    }

    /// A manifest's bytes, if it is in `repo`.
    pub async fn read_manifest(&self, repo: &RepoName, d: &Digest) -> StoreResult<Option<(StoredManifest, Bytes)>> {
        let Some(info) = self.manifest_info(repo, d).await? else { return Ok(None) };
        let Some(bytes) = read_opt(&self.layout.blob(d)).await? else { return Ok(None) };
        Ok(Some((info, Bytes::from(bytes))))
    }

    /// Removes a manifest from `repo`, with the tags that point at it and its referrer entry.
    /// `subject` is the manifest's subject, if it has one.
    pub async fn delete_manifest(&self, repo: &RepoName, d: &Digest, subject: Option<&Digest>) -> StoreResult<bool> {
        if !remove_file(&self.layout.revision(repo, d)).await? {
            return Ok(false);
        }
        for tag in self.list_tags(repo).await?.unwrap_or_default() {
            if self.resolve_tag(repo, &tag).await?.as_ref() == Some(d) {
                remove_file(&self.layout.tag(repo, &tag)).await?;
            }
        }
        if let Some(s) = subject {
            remove_file(&self.layout.referrer(repo, s, d)).await?;
        }
        Ok(true)
    }

    pub async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<bool> {
        remove_file(&self.layout.tag(repo, tag)).await
    }

    /// The repository's tags, sorted; `None` if the repository does not exist.
    pub async fn list_tags(&self, repo: &RepoName) -> StoreResult<Option<Vec<Tag>>> {
        if !exists(&self.layout.repo(repo)).await? {
            return Ok(None);
        }
        let mut tags: Vec<Tag> =
            read_names(&self.layout.tags_dir(repo)).await?.iter().filter_map(|n| n.parse().ok()).collect();
        tags.sort();
        Ok(Some(tags))
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`, by digest.
    pub async fn referrers(&self, repo: &RepoName, subject: &Digest) -> StoreResult<Vec<Value>> {
        let dir = self.layout.referrers_dir(repo, subject);
        let mut out = Vec::new();
        for name in read_names(&dir).await? {
            let Some(raw) = read_opt(&dir.join(&name)).await? else { continue };
            if let Ok(v) = serde_json::from_slice::<Value>(&raw) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
        Ok(out)
    }

    /// Every repository (a directory holding `_manifests` or `_layers`), sorted.
    pub async fn catalog(&self) -> StoreResult<Vec<String>> {
        let root = self.layout.repos_root();
        let mut out = Vec::new();
        let mut stack = vec![(root.clone(), String::new())];
        while let Some((dir, name)) = stack.pop() {
            let entries = read_names(&dir).await?;
            if entries.iter().any(|e| e == "_manifests" || e == "_layers") {
                out.push(name.clone());
            }
            for e in entries {
                if e.starts_with('_') {
                    continue;
                }
                let child = if name.is_empty() { e.clone() } else { format!("{name}/{e}") };
                stack.push((dir.join(&e), child));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// File names in a directory; empty if it does not exist.
async fn read_names(dir: &std::path::Path) -> StoreResult<Vec<String>> {
    let mut rd = match tokio::fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    while let Some(e) = rd.next_entry().await? {
        if let Some(n) = e.file_name().to_str() {
            out.push(n.to_string());
        }
    }
    Ok(out)
}
