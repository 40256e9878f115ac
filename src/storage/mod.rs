//! The local content store: content-addressed blobs, per-repository links, upload sessions,
//! manifests, tags and referrers on a filesystem. Storage never sees HTTP types.
//!
//! Invariants:
//! - a file appears under `blobs/` only by [`Store::commit_ingest`] or [`Store::put_bytes`],
//!   by atomic rename, after its digest and size were checked;
//! - metadata files (tags, revision links, upload state) are replaced by atomic rename.

mod ingest;
mod layout;
pub mod read;
mod repo;
mod uploads;
mod writeback;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

pub use ingest::{hash_file, write_all_vectored, Ingest};
pub use layout::Layout;
pub use repo::{ManifestPut, StoredManifest};
pub use uploads::{Upload, UploadId, UploadWriter};
pub use writeback::Writeback;

use crate::oci::{Algorithm, Digest, RepoName};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("upload session unknown")]
    UploadUnknown,
    #[error("upload session is at offset {expected}, chunk starts at {got}")]
    InvalidOffset { expected: u64, got: u64 },
    #[error("content digest {actual} does not match {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content size {actual} does not match {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("storage i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// fsync data and directories before renames (crash safety against power loss).
    pub fsync: bool,
    /// Entries in the descriptor cache.
    pub descriptor_cache_capacity: u64,
}

/// The filesystem store. Cheap to share (`Arc<Store>`).
pub struct Store {
    layout: Layout,
    fsync: bool,
    /// digest → size of committed blobs: answers existence and HEAD without touching the disk.
    sizes: Cache<Digest, u64>,
    /// (repository, digest) → the blob is linked there.
    links: Cache<(RepoName, Digest), ()>,
    uploads: uploads::Locks,
}

impl Store {
    pub async fn open(cfg: &StoreConfig) -> std::io::Result<Arc<Store>> {
        let layout = Layout::new(&cfg.root);
        for dir in [layout.blobs_root(), layout.ingest_root(), layout.repos_root()] {
            tokio::fs::create_dir_all(&dir).await?;
        }
        let store = Store {
            layout,
            fsync: cfg.fsync,
            sizes: Cache::builder().max_capacity(cfg.descriptor_cache_capacity).build(),
            links: Cache::builder().max_capacity(cfg.descriptor_cache_capacity).build(),
            uploads: Default::default(),
        };
        store.remove_stale_tmp(Duration::ZERO).await;
        Ok(Arc::new(store))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Size of a committed blob, or `None` if it is not in the store.
    pub async fn blob_size(&self, d: &Digest) -> StoreResult<Option<u64>> {
        if let Some(size) = self.sizes.get(d).await {
            return Ok(Some(size));
        }
        match tokio::fs::metadata(self.layout.blob(d)).await {
            Ok(m) => {
                self.sizes.insert(d.clone(), m.len()).await;
                Ok(Some(m.len()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens a committed blob for reading (with [`read::stream`]).
    pub async fn open_blob(&self, d: &Digest) -> StoreResult<Option<(Arc<std::fs::File>, u64)>> {
        let path = self.layout.blob(d);
        let opened = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(path)?;
            let size = f.metadata()?.len();
            Ok::<_, std::io::Error>((Arc::new(f), size))
        })
        .await
        .map_err(std::io::Error::other)?;
        match opened {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.sizes.invalidate(d).await;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Size of a blob if it is committed *and* linked into `repo`.
    pub async fn repo_blob_size(&self, repo: &RepoName, d: &Digest) -> StoreResult<Option<u64>> {
        if !self.is_linked(repo, d).await? {
            return Ok(None);
        }
        self.blob_size(d).await
    }

    async fn is_linked(&self, repo: &RepoName, d: &Digest) -> StoreResult<bool> {
        let key = (repo.clone(), d.clone());
        if self.links.contains_key(&key) {
            return Ok(true);
        }
        let linked = exists(&self.layout.layer_link(repo, d)).await?;
        if linked {
            self.links.insert(key, ()).await;
        }
        Ok(linked)
    }

    /// Makes a committed blob visible in `repo`.
    pub async fn link_blob(&self, repo: &RepoName, d: &Digest) -> StoreResult<()> {
        let path = self.layout.layer_link(repo, d);
        if !exists(&path).await? {
            self.write_atomic(&path, b"").await?;
        }
        self.links.insert((repo.clone(), d.clone()), ()).await;
        Ok(())
    }

    /// Removes a blob from `repo`'s view. The content stays for other repositories.
    pub async fn unlink_blob(&self, repo: &RepoName, d: &Digest) -> StoreResult<bool> {
        self.links.invalidate(&(repo.clone(), d.clone())).await;
        remove_file(&self.layout.layer_link(repo, d)).await
    }

    /// Verifies a finished ingest file against `expected` and renames it into `blobs/`.
    /// The file is removed whatever the outcome. A blob that already exists is success.
    pub async fn commit_ingest(
        &self,
        ingest: Ingest,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> StoreResult<u64> {
        let (path, actual, size) = ingest.finish(expected.algorithm(), self.fsync).await?;
        self.commit_file(&path, &actual, size, expected, expected_size).await
    }

    /// Whether data is fsynced before it is committed.
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    /// Commits a file under `ingest/` whose content was hashed on the way in (`actual`,
    /// `size`) and, with [`Store::fsync`], already synced: checks it against `expected` and
    /// renames it into `blobs/`. The file is removed whatever the outcome.
    pub async fn commit_file(
        &self,
        path: &Path,
        actual: &Digest,
        size: u64,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> StoreResult<u64> {
        let checked = if actual != expected {
            Err(StoreError::DigestMismatch { expected: expected.clone(), actual: actual.clone() })
        } else if let Some(want) = expected_size.filter(|&s| s != size) {
            Err(StoreError::SizeMismatch { expected: want, actual: size })
        } else {
            Ok(())
        };
        if let Err(e) = checked {
            let _ = tokio::fs::remove_file(path).await;
            return Err(e);
        }
        self.rename_into_blobs(path, expected).await?;
        self.sizes.insert(expected.clone(), size).await;
        Ok(size)
    }

    /// Stores small content (a manifest) under its digest in `alg`; returns that digest.
    pub async fn put_bytes(&self, alg: Algorithm, bytes: &[u8]) -> StoreResult<Digest> {
        let digest = Digest::of(alg, bytes);
        if self.blob_size(&digest).await?.is_none() {
            let tmp = self.layout.tmp();
            let mut ingest = Ingest::create(&tmp, alg, false).await?;
            ingest.write(bytes::Bytes::copy_from_slice(bytes)).await?;
            self.commit_ingest(ingest, &digest, Some(bytes.len() as u64)).await?;
        }
        Ok(digest)
    }

    async fn rename_into_blobs(&self, from: &Path, d: &Digest) -> StoreResult<()> {
        let to = self.layout.blob(d);
        let dir = to.parent().expect("blob path has a parent");
        tokio::fs::create_dir_all(dir).await?;
        // Same digest, same bytes: renaming over an existing blob is harmless and atomic.
        if let Err(e) = tokio::fs::rename(from, &to).await {
            let _ = tokio::fs::remove_file(from).await;
            return Err(e.into());
        }
        if self.fsync {
            sync_dir(dir).await?;
        }
        Ok(())
    }

    /// Replaces `path` with `bytes` atomically (tmp file + rename).
    pub(crate) async fn write_atomic(&self, path: &Path, bytes: &[u8]) -> StoreResult<()> {
        let tmp = self.layout.tmp();
        let res = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut f, bytes).await?;
            if self.fsync {
                f.sync_data().await?;
            }
            let dir = path.parent().expect("store paths have parents");
            tokio::fs::create_dir_all(dir).await?;
            tokio::fs::rename(&tmp, path).await?;
            if self.fsync {
                sync_dir(dir).await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        if res.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        Ok(res?)
    }

    /// Total bytes of committed content (walks `blobs/`).
    pub async fn blob_bytes(&self) -> u64 {
        let root = self.layout.blobs_root();
        tokio::task::spawn_blocking(move || {
            let mut total = 0;
            let mut stack = vec![root];
            while let Some(dir) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&dir) else { continue };
                for e in rd.flatten() {
                    match e.file_type() {
                        Ok(t) if t.is_dir() => stack.push(e.path()),
                        Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                        Err(_) => {}
                    }
                }
            }
            total
        })
        .await
        .unwrap_or(0)
    }

    /// Whether the store accepts writes (for readiness).
    pub async fn writable(&self) -> bool {
        let probe = self.layout.tmp();
        let ok = tokio::fs::write(&probe, b"ready").await.is_ok();
        let _ = tokio::fs::remove_file(&probe).await;
        ok
    }

    /// Removes `ingest/tmp-*` files older than `age` (left behind by a crash).
    async fn remove_stale_tmp(&self, age: Duration) {
        let Ok(mut rd) = tokio::fs::read_dir(self.layout.ingest_root()).await else { return };
        while let Ok(Some(e)) = rd.next_entry().await {
            if !e.file_name().to_string_lossy().starts_with("tmp-") {
                continue;
            }
            let old = e
                .metadata()
                .await
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() >= age)
                .unwrap_or(false);
            if old {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
    }
}

pub(crate) async fn exists(path: &Path) -> std::io::Result<bool> {
    match tokio::fs::metadata(path).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a file; `false` if it was not there.
pub(crate) async fn remove_file(path: &Path) -> StoreResult<bool> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Reads a file; `None` if it is not there.
pub(crate) async fn read_opt(path: &Path) -> StoreResult<Option<Vec<u8>>> {
    match tokio::fs::read(path).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await.map_err(std::io::Error::other)?
}
