//! The streaming, single-flight, digest-verifying blob fill.
//!
//! One [`Fill`] per missing digest: a detached task GETs the blob from the upstream once and
//! writes it through the digest verifier into an ingest file; every client asking for that
//! digest meanwhile, the first and all followers, reads the growing file at its own pace.
//! Readers never see a clean end of unverified bytes: every read holds its last byte back
//! until the whole blob's digest and size have been verified; on any failure before that,
//! every reader's stream breaks with an error. The commit (fsync, rename into `blobs/`)
//! follows the verification; new requests see the blob only once it is committed.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::oci::{Algorithm, Digest, Hasher, RepoName};
use crate::storage::{Store, StoreError};
use crate::upstream::{Upstream, UpstreamError};

/// Readers are woken, and the spool written to, after this many new bytes.
const PUBLISH_EVERY: usize = 1 << 20;
/// Batches of received bytes queued between the upstream body and the spool writer.
const CHANNEL_BATCHES: usize = 4;
/// Bytes collected from the upstream body before they go to the writer as one batch.
const BATCH_BYTES: usize = 256 << 10;
/// With fsync on, writeback of the spool is started after this many bytes.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Largest read a client makes from the spool at once (memory per client in flight).
const READ_CHUNK: u64 = 256 << 10;

#[derive(Clone, Debug)]
pub enum FillState {
    Connecting,
    Streaming,
    /// Every byte is in the spool and matches the digest and size; the commit (fsync,
    /// rename) is under way. Readers may finish.
    Verified,
    Committed,
    Failed(FillError),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream content does not match: {0}")]
    Mismatch(String),
    #[error("fill i/o: {0}")]
    Io(String),
    #[error("fill took longer than the fill timeout")]
    Timeout,
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// The blob's size, when the upstream announced it.
    pub size: Option<u64>,
    /// Bytes in the spool file, readable.
    pub written: u64,
    pub state: FillState,
}

pub struct Fill {
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
}

/// Fills in flight, by digest.
#[derive(Clone, Default)]
pub struct Fills {
    map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
}

/// What a fill needs to run.
pub struct FillRequest {
    pub store: Arc<Store>,
    pub upstream: Arc<Upstream>,
    pub remote: RepoName,
    pub cache_repo: RepoName,
    pub digest: Digest,
    pub timeout: Duration,
}

impl Fills {
    /// Joins the fill of `req.digest`, starting it if none is running. `true` when this call
    /// started it.
    pub fn join_or_start(&self, req: FillRequest) -> io::Result<(Arc<Fill>, bool)> {
        let mut map = self.map.lock().unwrap();
        if let Some(f) = map.get(&req.digest) {
            return Ok((f.clone(), false));
        }
        let path = req.store.layout().tmp();
        let write = std::fs::OpenOptions::new().create_new(true).write(true).open(&path)?;
        drop(write);
        let read = std::fs::File::open(&path)?;
        let (tx, rx) = watch::channel(Progress { size: None, written: 0, state: FillState::Connecting });
        let tx = Arc::new(tx);
        let fill = Arc::new(Fill { file: Arc::new(read), progress: rx });
        map.insert(req.digest.clone(), fill.clone());
        let fills = self.clone();
        crate::metrics::fill_started();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(req.timeout, run(&req, &path, &tx)).await {
                Ok(r) => r,
                Err(_) => Err(FillError::Timeout),
            };
            fills.map.lock().unwrap().remove(&req.digest);
            crate::metrics::fill_finished(&req.upstream.host, outcome.is_ok(), started.elapsed());
            match outcome {
                Ok(size) => {
                    tracing::info!(digest = %req.digest, size, upstream = %req.upstream.host, ms = started.elapsed().as_millis() as u64, "fill committed");
                    tx.send_modify(|p| p.state = FillState::Committed);
                }
                Err(e) => {
                    tracing::warn!(digest = %req.digest, upstream = %req.upstream.host, error = %e, "fill failed");
                    let _ = std::fs::remove_file(&path);
                    tx.send_modify(|p| p.state = FillState::Failed(e));
                }
            }
        });
        Ok((fill, true))
    }

    /// Number of fills in flight.
    pub fn in_flight(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

async fn run(req: &FillRequest, path: &Path, tx: &Arc<watch::Sender<Progress>>) -> Result<u64, FillError> {
    let s = req.upstream.blob_get(&req.remote, &req.digest).await?;
    let size = s.resp.content_length();
    tx.send_modify(|p| {
        p.size = size;
        p.state = FillState::Streaming;
    });
    // Hashing and file writes run on a blocking thread, overlapped with receiving the body.
    let (chunks, rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(CHANNEL_BATCHES);
    let writer = {
        let (path, tx, alg, fsync) = (path.to_path_buf(), tx.clone(), req.digest.algorithm(), req.store.fsync());
        tokio::task::spawn_blocking(move || write_spool(&path, rx, alg, fsync, &tx))
    };
    let mut received = 0u64;
    let mut body = s.resp.bytes_stream();
    let mut outcome = Ok(());
    // Chunks go to the writer in batches: one wake-up per ~256 KiB, not per network read.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_bytes = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                outcome = Err(UpstreamError::Unreachable(format!("blob body: {e}")).into());
                break;
            }
        };
        received += chunk.len() as u64;
        if size.is_some_and(|n| received > n) {
            outcome = Err(FillError::Mismatch("more bytes than Content-Length".into()));
            break;
        }
        batch_bytes += chunk.len();
        batch.push(chunk);
        if batch_bytes >= BATCH_BYTES {
            batch_bytes = 0;
            if chunks.send(std::mem::take(&mut batch)).await.is_err() {
                break; // the writer failed; its error is reported below
            }
        }
    }
    if !batch.is_empty() && outcome.is_ok() {
        let _ = chunks.send(batch).await;
    }
    drop(chunks);
    let written = writer.await.map_err(|e| FillError::Io(e.to_string()))?;
    outcome?;
    let (file, actual, written) = written.map_err(|e| FillError::Io(e.to_string()))?;
    crate::metrics::upstream_bytes(&req.upstream.host, written);
    if actual != req.digest || size.is_some_and(|n| n != written) {
        return Err(FillError::Mismatch(format!("received {written} bytes hashing to {actual}")));
    }
    // The bytes are verified: readers may end their streams while the data is made durable.
    tx.send_modify(|p| p.state = FillState::Verified);
    if req.store.fsync() {
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| FillError::Io(e.to_string()))?
            .map_err(|e| FillError::Io(e.to_string()))?;
    }
    let size = req.store.commit_file(path, &actual, written, &req.digest, size).await.map_err(|e| match e {
        StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. } => FillError::Mismatch(e.to_string()),
        e => FillError::Io(e.to_string()),
    })?;
    req.store.link_blob(&req.cache_repo, &req.digest).await.map_err(|e| FillError::Io(e.to_string()))?;
    Ok(size)
}

/// The blocking side of a fill: hashes and appends chunks to the spool in large writes,
/// publishes progress after each write and, when `fsync` is set, starts writeback as it goes
/// (so the final fsync is short). Returns the file, the digest and the byte count.
fn write_spool(
    path: &Path,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Bytes>>,
    alg: Algorithm,
    fsync: bool,
    tx: &watch::Sender<Progress>,
) -> io::Result<(std::fs::File, Digest, u64)> {
    let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(path)?;
    let mut hasher = Hasher::new(alg);
    let mut buf: Vec<u8> = Vec::with_capacity(PUBLISH_EVERY);
    let (mut written, mut synced) = (0u64, 0u64);
    let mut flush = |buf: &mut Vec<u8>, file: &mut std::fs::File| -> io::Result<()> {
        file.write_all(buf)?;
        written += buf.len() as u64;
        buf.clear();
        tx.send_modify(|p| p.written = written);
        if fsync && written - synced >= WRITEBACK_EVERY {
            start_writeback(file, synced, written - synced);
            synced = written;
        }
        Ok(())
    };
    while let Some(batch) = rx.blocking_recv() {
        for chunk in batch {
            hasher.update(&chunk);
            buf.extend_from_slice(&chunk);
        }
        if buf.len() >= PUBLISH_EVERY {
            flush(&mut buf, &mut file)?;
        }
    }
    if !buf.is_empty() {
        flush(&mut buf, &mut file)?;
    }
    Ok((file, hasher.finish(), written))
}

/// Asks the kernel to start writing `len` bytes at `offset` back to disk without waiting.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a valid, open file descriptor; it only schedules writeback.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl Fill {
    /// Waits until the upstream answered: the size (if announced) is known, or the fill failed.
    pub async fn started(&self) -> Result<Option<u64>, FillError> {
        let mut rx = self.progress.clone();
        let p = rx
            .wait_for(|p| !matches!(p.state, FillState::Connecting))
            .await
            .map_err(|_| FillError::Io("fill vanished".into()))?
            .clone();
        match p.state {
            FillState::Failed(e) => Err(e),
            _ => Ok(p.size),
        }
    }

    /// The bytes `start..end` (to the blob's end when `end` is `None`) as they arrive.
    pub fn read(self: Arc<Self>, start: u64, end: Option<u64>) -> impl Stream<Item = io::Result<Bytes>> + Send {
        let rx = self.progress.clone();
        futures::stream::unfold((self, rx, start, false), move |(fill, mut rx, pos, done)| async move {
            if done {
                return None;
            }
            loop {
                let p = rx.borrow_and_update().clone();
                let committed = matches!(p.state, FillState::Verified | FillState::Committed);
                if let FillState::Failed(e) = &p.state {
                    return Some((Err(io::Error::other(e.to_string())), (fill, rx, pos, true)));
                }
                let limit = end.or(p.size);
                // Every read keeps its last byte back until the commit, so no reader (whole
                // blob or range) sees a clean end of bytes that were not verified.
                let mut hi = p.written;
                if let Some(l) = limit {
                    hi = hi.min(if committed { l } else { l.saturating_sub(1) });
                }
                if pos < hi {
                    let n = (hi - pos).min(READ_CHUNK) as usize;
                    let file = fill.file.clone();
                    let res = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n];
                        let got = file.read_at(&mut buf, pos)?;
                        if got == 0 {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "spool shorter than announced"));
                        }
                        buf.truncate(got);
                        Ok(Bytes::from(buf))
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                    return match res {
                        Ok(b) => {
                            let next = pos + b.len() as u64;
                            Some((Ok(b), (fill, rx, next, false)))
                        }
                        Err(e) => Some((Err(e), (fill, rx, pos, true))),
                    };
                }
                if committed && limit.is_none_or(|l| pos >= l) {
                    return None;
                }
                if rx.changed().await.is_err() {
                    // The fill task is gone; its last word is in the channel.
                    let p = rx.borrow().clone();
                    if !matches!(p.state, FillState::Verified | FillState::Committed | FillState::Failed(_)) {
                        return Some((Err(io::Error::other("fill ended unexpectedly")), (fill, rx, pos, true)));
                    }
                }
            }
        })
    }
}
