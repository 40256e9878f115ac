//! The streaming, single-flight, digest-verifying blob fill.
//!
//! One [`Fill`] per missing digest: a detached task GETs the blob from the upstream once and
//! hands every received chunk both to a blocking writer thread (hash, append to the spool file)
//! and to the clients: every client asking for that digest meanwhile, the first and all
//! followers, streams at its own pace, taking the chunks still in memory without a copy
//! (`recent`, shared by all) and reading older bytes back from the spool.
//! Readers never see a clean end of unverified bytes: every read holds its last byte back
//! until the whole blob's digest and size have been verified; on any failure before that,
//! every reader's stream breaks with an error. The commit (fsync, rename into `blobs/`)
//! follows the verification; new requests see the blob only once it is committed.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::oci::{Algorithm, Digest, Hasher, RepoName};
use crate::storage::{read, write_all_vectored, Store, StoreError, Writeback};
use crate::upstream::{Upstream, UpstreamError};

/// Batches of received bytes queued between the upstream body and the spool writer: with
/// [`BATCH_BYTES`], bounds the memory of a fill (the chunks in `recent`, which also pin the
/// HTTP client's read buffers they were cut from). 2 rather than 4: peak RSS of a cold 512 MiB
/// pull 18 → 16 MiB, throughput unchanged (the writer thread keeps up; `bench/run.sh`).
const CHANNEL_BATCHES: usize = 2;
/// Bytes collected from the upstream body before they go to the writer as one batch (one
/// wake-up of the writer and one vectored write per batch, not per network read).
const BATCH_BYTES: usize = 256 << 10;

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
    /// Bytes received so far: readable, from `recent` or the spool.
    pub received: u64,
    pub state: FillState,
}

pub struct Fill {
    /// The spool, opened for reading.
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
    /// Received chunks the writer has not yet written, in order, by offset. A chunk leaves
    /// only once it is in the spool, so every received byte is in one place or the other.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
    /// Spool reads, shared by the clients that move together behind `recent`.
    spool_reads: read::SharedBlocks,
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
        let (tx, rx) = watch::channel(Progress { size: None, received: 0, state: FillState::Connecting });
        let fill = Arc::new(Fill {
            file: Arc::new(read),
            progress: rx,
            recent: Mutex::default(),
            spool_reads: Default::default(),
        });
        map.insert(req.digest.clone(), fill.clone());
        let (fills, this) = (self.clone(), fill.clone());
        crate::metrics::fill_started();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(req.timeout, run(&req, &path, &tx, &this)).await {
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
                    this.recent.lock().unwrap().clear();
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

async fn run(req: &FillRequest, path: &Path, tx: &watch::Sender<Progress>, fill: &Arc<Fill>) -> Result<u64, FillError> {
    let s = req.upstream.blob_get(&req.remote, &req.digest).await?;
    let size = s.resp.content_length();
    tx.send_modify(|p| {
        p.size = size;
        p.state = FillState::Streaming;
    });
    // Hashing and file writes run on a blocking thread, overlapped with receiving the body.
    let (chunks, rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(CHANNEL_BATCHES);
    let writer = {
        let (path, fill, alg, fsync) = (path.to_path_buf(), fill.clone(), req.digest.algorithm(), req.store.fsync());
        tokio::task::spawn_blocking(move || write_spool(&path, rx, alg, fsync, &fill))
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
        // Readers may take the chunk at once; the writer gets it with its batch.
        fill.recent.lock().unwrap().push_back((received - chunk.len() as u64, chunk.clone()));
        tx.send_modify(|p| p.received = received);
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

/// The blocking side of a fill: hashes each batch of chunks, appends it to the spool with one
/// vectored write, then drops its chunks from `recent` (readers find them in the spool from
/// then on); when `fsync` is set, starts writeback as it goes (so the final fsync is short).
/// Returns the file, the digest and the byte count.
fn write_spool(
    path: &Path,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Bytes>>,
    alg: Algorithm,
    fsync: bool,
    fill: &Fill,
) -> io::Result<(std::fs::File, Digest, u64)> {
    let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(path)?;
    let mut writeback = if fsync { Some(Writeback::new(file.try_clone()?)) } else { None };
    let mut hasher = Hasher::new(alg);
    let mut written = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for chunk in &batch {
            hasher.update(chunk);
        }
        write_all_vectored(&mut file, &batch)?;
        written += batch.iter().map(|c| c.len() as u64).sum::<u64>();
        fill.recent.lock().unwrap().drain(..batch.len());
        if let Some(wb) = &mut writeback {
            wb.written(written);
        }
    }
    Ok((file, hasher.finish(), written))
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

    /// Bytes from `pos` on, short of `hi` (received bytes): a slice of a chunk still in
    /// `recent` (no copy), else a read of the spool up to where `recent` begins.
    async fn next_chunk(&self, pos: u64, hi: u64) -> io::Result<Bytes> {
        let spool_end = {
            let recent = self.recent.lock().unwrap();
            let first = recent.front().map_or(hi, |(off, _)| *off);
            if pos >= first {
                let i = recent.partition_point(|(off, c)| off + c.len() as u64 <= pos);
                if let Some((off, c)) = recent.get(i) {
                    let from = (pos - off) as usize;
                    let to = c.len().min((hi - off) as usize);
                    return Ok(c.slice(from..to));
                }
            }
            first.min(hi)
        };
        self.spool_reads.read(&self.file, pos, spool_end).await
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
                let mut hi = p.received;
                if let Some(l) = limit {
                    hi = hi.min(if committed { l } else { l.saturating_sub(1) });
                }
                if pos < hi {
                    let res = match fill.next_chunk(pos, hi).await {
                        Ok(b) if b.is_empty() => {
                            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "spool shorter than announced"))
                        }
                        other => other,
                    };
                    return match res {
                        Ok(b) => {
                            let next = pos + b.len() as u64;
                            Some((Ok(b), (fill, rx, next, false)))
                        }
                        Err(e) => {
                            tracing::warn!(offset = pos, error = %e, "reading a fill's spool failed; the client's stream is cut");
                            Some((Err(e), (fill, rx, pos, true)))
                        }
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
