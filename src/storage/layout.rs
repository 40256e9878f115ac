//! The one place that turns validated names and digests into paths. Nothing else in the
//! crate formats a store path.
//!
//! ```text
//! <root>/
//!   blobs/<alg>/<hex[0..2]>/<hex>            committed content (blobs and manifest bytes),
//!                                            only ever created by rename after verification
//!   ingest/<upload-uuid>/data                an upload session's bytes so far
//!   ingest/<upload-uuid>/state.json          {repo, started_at, offset, hash state} at the
//!                                            last chunk boundary (written tmp + rename)
//!   ingest/tmp-<uuid>                        small atomic writes in flight (manifests, links)
//!   repos/<name>/_layers/<alg>/<hex>         link: the blob is visible in <name>
//!   repos/<name>/_manifests/revisions/<alg>/<hex>
//!                                            link: the manifest is in <name>; holds its media type
//!   repos/<name>/_manifests/tags/<tag>       holds the tagged manifest's digest
//!   repos/<name>/_referrers/<alg>/<subject-hex>/<alg>-<hex>
//!                                            the referrer's descriptor (JSON) for the subject
//! ```
//!
//! `ingest/` and `blobs/` share one filesystem, so the commit rename is atomic. Name
//! components never start with `_` (see [`RepoName`]), so they cannot collide with the
//! `_layers`, `_manifests` and `_referrers` directories.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::oci::{Digest, RepoName, Tag};

#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs_root(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn blob(&self, d: &Digest) -> PathBuf {
        self.blobs_root().join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex())
    }

    pub fn ingest_root(&self) -> PathBuf {
        self.root.join("ingest")
    }

    pub fn upload_dir(&self, id: &Uuid) -> PathBuf {
        self.ingest_root().join(id.hyphenated().to_string())
    }

    pub fn upload_data(&self, id: &Uuid) -> PathBuf {
        self.upload_dir(id).join("data")
    }

    pub fn upload_state(&self, id: &Uuid) -> PathBuf {
        self.upload_dir(id).join("state.json")
    }

    /// A fresh temporary file name on the store's filesystem.
    pub fn tmp(&self) -> PathBuf {
        self.ingest_root().join(format!("tmp-{}", Uuid::new_v4().simple()))
    }

    pub fn repos_root(&self) -> PathBuf {
        self.root.join("repos")
    }

    pub fn repo(&self, repo: &RepoName) -> PathBuf {
        let mut p = self.repos_root();
        p.extend(repo.components());
        p
    }

    pub fn layer_link(&self, repo: &RepoName, d: &Digest) -> PathBuf {
        self.repo(repo).join("_layers").join(d.algorithm().as_str()).join(d.hex())
    }

    pub fn revision(&self, repo: &RepoName, d: &Digest) -> PathBuf {
        self.repo(repo).join("_manifests").join("revisions").join(d.algorithm().as_str()).join(d.hex())
    }

    pub fn tags_dir(&self, repo: &RepoName) -> PathBuf {
        self.repo(repo).join("_manifests").join("tags")
    }

    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.tags_dir(repo).join(tag.as_str())
    }

    pub fn referrers_dir(&self, repo: &RepoName, subject: &Digest) -> PathBuf {
        self.repo(repo).join("_referrers").join(subject.algorithm().as_str()).join(subject.hex())
    }

    pub fn referrer(&self, repo: &RepoName, subject: &Digest, referrer: &Digest) -> PathBuf {
        self.referrers_dir(repo, subject).join(format!("{}-{}", referrer.algorithm().as_str(), referrer.hex()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let l = Layout::new("/s");
        let d = Digest::sha256(b"");
        let r: RepoName = "docker.io/library/nginx".parse().unwrap();
        assert_eq!(
            l.blob(&d),
            Path::new("/s/blobs/sha256/e3/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert_eq!(l.layer_link(&r, &d), Path::new("/s/repos/docker.io/library/nginx/_layers/sha256").join(d.hex()));
        assert_eq!(l.tag(&r, &"v1".parse().unwrap()), Path::new("/s/repos/docker.io/library/nginx/_manifests/tags/v1"));
    }
}
