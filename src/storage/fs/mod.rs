//! The filesystem backend: the default, embedded store. Keys (see [`super::layout`]) are
//! paths under the store root; `ingest/` and `blobs/` share one filesystem, so a commit is an
//! atomic rename; metadata objects are replaced by tmp file + rename; with `fsync` (default)
//! data and directories are synced around every rename.

mod ingest;
pub mod read;
mod small;
mod writeback;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::backend::{Backend, ByteStream, Hold, IngestId, IngestState, IngestStatus, Verified, Writer, WriterOptions};
use super::layout::{self, Key};
use super::{StoreResult, UploadId};
use crate::oci::{Algorithm, Digest};
use small::Cached;

pub(super) struct Fs {
    root: PathBuf,
    fsync: bool,
}

/// The filesystem store under `root`.
pub struct FsBackend(Arc<Fs>);

impl FsBackend {
    pub async fn open(root: &Path, fsync: bool) -> std::io::Result<FsBackend> {
        for dir in [layout::BLOBS, layout::INGEST, layout::LOCAL_REPOS, layout::CACHE_REPOS] {
            let dir = root.join(dir);
            blocking(move || create_dirs(&dir, fsync)).await?;
        }
        Ok(FsBackend(Arc::new(Fs { root: root.to_path_buf(), fsync })))
    }
}

impl Fs {
    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// [`Fs::path`] as the syscalls take it, built in one allocation (keys never hold NUL).
    fn cpath(&self, key: &Key) -> std::io::Result<CString> {
        let root = self.root.as_os_str().as_bytes();
        let mut v = Vec::with_capacity(root.len() + key.as_str().len() + 2);
        v.extend_from_slice(root);
        v.push(b'/');
        v.extend_from_slice(key.as_str().as_bytes());
        CString::new(v).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    }

    /// A file's size and modification time: on this thread when the kernel has it cached
    /// (see [`small`]), else in one blocking-pool hop.
    async fn stat(&self, key: &Key) -> std::io::Result<Option<small::Stat>> {
        let path = self.cpath(key)?;
        if let Cached::Ready(r) = small::stat(&path) {
            return not_found(r);
        }
        let m = not_found(blocking(move || std::fs::metadata(small::as_path(&path))).await)?;
        Ok(m.map(|m| small::Stat { len: m.len(), modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH) }))
    }

    /// A small file whole, with its modification time: on this thread when cached, else in
    /// one blocking-pool hop (open, stat and read together).
    async fn read_small(&self, key: &Key) -> std::io::Result<Option<(Bytes, SystemTime)>> {
        let path = self.cpath(key)?;
        if let Cached::Ready(r) = small::read(&path) {
            return not_found(r);
        }
        not_found(blocking(move || small::read_blocking(small::as_path(&path))).await)
    }

    /// Replaces `key` with `bytes` atomically (tmp file + rename).
    async fn put_atomic(&self, key: &Key, bytes: &[u8]) -> StoreResult<()> {
        self.put_atomic_durable(key, bytes, self.fsync).await
    }

    /// [`Fs::put_atomic`], fsynced only when `fsync`: for records a crash may lose (a fill's
    /// ingest state: a fill is never resumed, the sweep removes its remains either way).
    async fn put_atomic_durable(&self, key: &Key, bytes: &[u8], fsync: bool) -> StoreResult<()> {
        self.put_atomic_holding(key, bytes, fsync, None, None).await
    }

    /// [`Fs::put_atomic_durable`] that keeps `keep` (a session's lock) until the new value is
    /// in place or the write failed, even if the caller is dropped meanwhile: the write runs
    /// on the blocking pool to its end, and no request on the session can start before it
    /// has. `hook`: a test pause point just before the rename.
    async fn put_atomic_holding(
        &self,
        key: &Key,
        bytes: &[u8],
        fsync: bool,
        hook: Option<&'static str>,
        keep: Option<Arc<Hold>>,
    ) -> StoreResult<()> {
        let tmp = self.path(&layout::tmp());
        let path = self.path(key);
        // Plain blocking I/O: tokio's `File` reports a failed write (ENOSPC) only at the next
        // operation on the file, so `write_all` + rename could put an empty file in place of
        // the old value.
        let bytes = bytes.to_vec();
        let res = blocking(move || {
            let _keep = keep;
            let write = || {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                if fsync {
                    f.sync_data()?;
                }
                let dir = path.parent().expect("store paths have parents");
                create_dirs(dir, fsync)?;
                if let Some(name) = hook {
                    crate::hooks::pause_blocking(name);
                }
                std::fs::rename(&tmp, &path)?;
                if fsync {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok::<_, std::io::Error>(())
            };
            let res = write();
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            res
        })
        .await;
        Ok(res?)
    }
}

fn not_found<T>(r: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Backend for FsBackend {
    fn kind(&self) -> &'static str {
        "fs"
    }

    async fn stat(&self, d: &Digest) -> StoreResult<Option<u64>> {
        Ok(self.0.stat(&layout::blob(d)).await?.map(|s| s.len))
    }

    async fn read(&self, d: &Digest, start: u64, len: u64) -> StoreResult<Option<ByteStream>> {
        let path = self.0.cpath(&layout::blob(d))?;
        let file = match small::open_read(&path) {
            Cached::Ready(r) => r,
            Cached::WouldBlock => blocking(move || std::fs::File::open(small::as_path(&path))).await,
        };
        let Some(file) = not_found(file)? else { return Ok(None) };
        Ok(Some(Box::pin(read::stream(Arc::new(file), start, len))))
    }

    async fn read_small(&self, d: &Digest) -> StoreResult<Option<Bytes>> {
        Ok(self.0.read_small(&layout::blob(d)).await?.map(|(b, _)| b))
    }

    async fn delete(&self, d: &Digest) -> StoreResult<bool> {
        Ok(not_found(tokio::fs::remove_file(self.0.path(&layout::blob(d))).await)?.is_some())
    }

    async fn walk(&self) -> StoreResult<Vec<(Digest, u64)>> {
        let root = self.0.path(&layout::root(layout::BLOBS));
        Ok(blocking(move || {
            let mut out = Vec::new();
            for alg in [Algorithm::Sha256, Algorithm::Sha512] {
                let Some(prefixes) = not_found(std::fs::read_dir(root.join(alg.as_str())))? else { continue };
                for p in prefixes.flatten() {
                    for e in std::fs::read_dir(p.path())?.flatten() {
                        let name = e.file_name();
                        let Ok(d) = format!("{}:{}", alg.as_str(), name.to_string_lossy()).parse::<Digest>() else {
                            continue;
                        };
                        out.push((d, e.metadata()?.len()));
                    }
                }
            }
            Ok(out)
        })
        .await?)
    }

    async fn create_writer(&self, id: IngestId, opts: WriterOptions, hold: Hold) -> StoreResult<Box<dyn Writer>> {
        Ok(Box::new(ingest::FsWriter::create(self.0.clone(), id, opts, hold).await?))
    }

    async fn resume_writer(&self, id: IngestId, batch_bytes: usize, hold: Hold) -> StoreResult<Box<dyn Writer>> {
        Ok(Box::new(ingest::FsWriter::resume(self.0.clone(), id, batch_bytes, hold).await?))
    }

    async fn ingest_status(&self, id: IngestId) -> StoreResult<Option<IngestStatus>> {
        let state_path = self.0.path(&layout::ingest_state(&id));
        let Some(raw) = not_found(tokio::fs::read(&state_path).await)? else { return Ok(None) };
        let Some(state) = IngestState::decode(&raw) else { return Ok(None) };
        let mut updated = not_found(tokio::fs::metadata(&state_path).await)?.and_then(|m| m.modified().ok());
        let data = not_found(tokio::fs::metadata(self.0.path(&layout::ingest_data(&id))).await)?;
        if let Some(t) = data.as_ref().and_then(|m| m.modified().ok()) {
            updated = updated.max(Some(t));
        }
        Ok(Some(IngestStatus {
            id,
            started_at: state.started(),
            offset: state.offset,
            updated_at: updated.unwrap_or(SystemTime::UNIX_EPOCH),
            has_data: data.is_some(),
            committing: state.committing(),
            kind: state.kind,
        }))
    }

    async fn ingests(&self) -> StoreResult<Vec<IngestId>> {
        let names = self.list(&layout::root(layout::INGEST)).await?;
        Ok(names.iter().filter_map(|n| n.parse::<UploadId>().ok()).collect())
    }

    async fn remove_ingest(&self, id: IngestId) -> StoreResult<()> {
        Ok(not_found(tokio::fs::remove_dir_all(self.0.path(&layout::ingest_dir(&id))).await).map(drop)?)
    }

    async fn resume_commit(&self, id: IngestId, hold: Hold) -> StoreResult<Option<Box<dyn Verified>>> {
        ingest::FsWriter::resume_commit(self.0.clone(), id, hold).await
    }

    async fn get(&self, key: &Key) -> StoreResult<Option<(Bytes, SystemTime)>> {
        Ok(self.0.read_small(key).await?)
    }

    async fn put(&self, key: &Key, value: &[u8]) -> StoreResult<()> {
        self.0.put_atomic(key, value).await
    }

    async fn remove(&self, key: &Key) -> StoreResult<bool> {
        Ok(not_found(tokio::fs::remove_file(self.0.path(key)).await)?.is_some())
    }

    async fn exists(&self, key: &Key) -> StoreResult<bool> {
        Ok(self.0.stat(key).await?.is_some())
    }

    async fn list(&self, prefix: &Key) -> StoreResult<Vec<String>> {
        let Some(mut rd) = not_found(tokio::fs::read_dir(self.0.path(prefix)).await)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        while let Some(e) = rd.next_entry().await? {
            if let Some(n) = e.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        Ok(out)
    }

    async fn prune_empty(&self, under: &Key) -> StoreResult<()> {
        let dir = self.0.path(under);
        let tree = self.0.path(&layout::root(under.as_str().split('/').next().unwrap_or_default()));
        fn prune(dir: &Path) -> std::io::Result<()> {
            let Some(rd) = not_found(std::fs::read_dir(dir))? else { return Ok(()) };
            for e in rd {
                let e = e?;
                if e.file_type()?.is_dir() {
                    prune(&e.path())?;
                }
            }
            match std::fs::remove_dir(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
                r => not_found(r).map(drop),
            }
        }
        Ok(blocking(move || {
            prune(&dir)?;
            // Parents left empty (`repos/team` of `repos/team/app`), up to the tree.
            let mut parent = dir.parent();
            while let Some(p) = parent.filter(|p| p.starts_with(&tree) && *p != tree) {
                if std::fs::remove_dir(p).is_err() {
                    break;
                }
                parent = p.parent();
            }
            Ok(())
        })
        .await?)
    }

    async fn writable(&self) -> bool {
        let probe = self.0.path(&layout::tmp());
        let ok = tokio::fs::write(&probe, b"ready").await.is_ok();
        let _ = tokio::fs::remove_file(&probe).await;
        ok
    }

    async fn readable(&self) -> bool {
        let root = self.0.path(&layout::root(layout::BLOBS));
        let root = root.parent().map(std::path::Path::to_path_buf).unwrap_or(root);
        tokio::fs::metadata(root).await.is_ok_and(|m| m.is_dir())
    }

    async fn sweep_temporaries(&self, age: Duration) {
        let Ok(mut rd) = tokio::fs::read_dir(self.0.path(&layout::root(layout::INGEST))).await else { return };
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

/// Runs `f` on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}

/// Creates `dir` and its missing parents (blocking). With `fsync`, every directory created is
/// made durable in its parent: the parent is fsynced after the creation (a directory made
/// meanwhile by another thread too: its maker may not have synced it yet). The one way
/// directories are made on the store's commit paths.
pub(super) fn create_dirs(dir: &Path, fsync: bool) -> std::io::Result<()> {
    if !fsync {
        return std::fs::create_dir_all(dir);
    }
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} is not a directory", d.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(d),
            Err(e) => return Err(e),
        }
        at = d.parent();
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        if let Some(parent) = d.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists: `true` when renamed, `false` when `to` was
/// there (it is left as it is; `from` too). `renameat2(RENAME_NOREPLACE)`, or where the
/// filesystem has no such rename, a hard link (which never replaces) and an unlink.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<bool> {
    let f = CString::new(from.as_os_str().as_bytes())?;
    let t = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => match std::fs::hard_link(from, to) {
            Ok(()) => {
                std::fs::remove_file(from)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
        _ => Err(e),
    }
}
