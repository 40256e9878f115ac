//! The filesystem's [`Writer`]: bytes are hashed on the way into `ingest/<id>/data`, the
//! offset and hash state are saved in `ingest/<id>/state.json` at every checkpoint, and only
//! [`Writer::verify`] → [`Verified::commit`] moves a verified file into `blobs/` by rename.
//!
//! Writes are pipelined: a worker on the blocking pool hashes and writes the batches in order,
//! while the next one is collected from the network; the network side waits only while
//! [`QUEUED_BATCHES`] more are queued. A worker runs while batches are queued: started by a
//! batch sent when none runs, it ends once its queue is empty, so a writer whose bytes come
//! slowly holds no thread between its batches. The worker owns the file, the running hash and the
//! writer's [`Hold`] (an upload's session lock) until it has written every batch it was
//! sent: a writer dropped mid-stream (a client that reset its stream) keeps its session
//! locked until those batches have landed, so no write can land after the next request on the
//! session cut the file back to its checkpoint. It counts each landed batch at once, so tail
//! readers (fill followers) see it without waiting for the network side.

use std::fs::File;
use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::task::JoinHandle;

use super::read::SharedBlocks;
use super::writeback::Writeback;
use super::{blocking, create_dirs, rename_noreplace, Fs};
use crate::oci::{Digest, Hasher};
use crate::storage::backend::{
    CommitRecord, Hold, IngestId, IngestKind, IngestState, TailReader, Verified, Writer, WriterOptions,
};
use crate::storage::layout;
use crate::storage::{StoreError, StoreResult};

/// The file and the running hash, owned by whoever works on them: the writer itself, or the
/// blocking-pool worker hashing and writing the batches sent.
struct Sink {
    file: File,
    hasher: Hasher,
    /// Set when the file will be fsynced: its writeback starts as it grows.
    writeback: Option<Writeback>,
    /// Released only when both the writer and its worker are done with it.
    _hold: Arc<Hold>,
}

/// How many sent batches may wait for the worker besides the one it is on: the network side
/// collects the next batch meanwhile, and waits only when this many are queued.
const QUEUED_BATCHES: usize = 1;

/// The worker hashing and writing the batches sent, in order, on the blocking pool: it owns
/// the [`Sink`] until it ends (its queue found empty, or the writer settles) and the writer
/// takes the sink back, and counts what landed so that tail readers see it at once.
struct Worker {
    queue: tokio::sync::mpsc::Sender<Vec<Bytes>>,
    job: JoinHandle<(Sink, std::io::Result<()>)>,
}

pub struct FsWriter {
    fs: Arc<Fs>,
    id: IngestId,
    state: IngestState,
    data: PathBuf,
    /// `None` while the worker has it.
    sink: Option<Sink>,
    worker: Option<Worker>,
    batch: Vec<Bytes>,
    batch_bytes: usize,
    batch_limit: usize,
    /// Bytes accepted: the batches sent to the worker and the one being collected.
    size: u64,
    /// Bytes in the file for certain (the batches that landed), counted by the worker.
    landed: Arc<AtomicU64>,
    tail: Arc<FsTail>,
}

/// Reads a growing ingest file (fill followers), sharing reads between readers that move
/// together.
pub struct FsTail {
    file: Arc<File>,
    shared: SharedBlocks,
}

#[async_trait]
impl TailReader for FsTail {
    async fn read(&self, pos: u64, end: u64) -> std::io::Result<Bytes> {
        self.shared.read(&self.file, pos, end).await
    }
}

impl FsWriter {
    pub(super) async fn create(fs: Arc<Fs>, id: IngestId, opts: WriterOptions, hold: Hold) -> StoreResult<FsWriter> {
        let dir = fs.path(&layout::ingest_dir(&id));
        let data = fs.path(&layout::ingest_data(&id));
        let path = data.clone();
        // An upload session's directory is durable with its state (see below).
        let durable = fs.fsync && matches!(opts.kind, IngestKind::Upload { .. });
        let file = blocking(move || {
            create_dirs(&dir, durable)?;
            std::fs::OpenOptions::new().create_new(true).write(true).open(path).inspect_err(|_| {
                let _ = std::fs::remove_dir(&dir);
            })
        })
        .await?;
        let upload = matches!(opts.kind, IngestKind::Upload { .. });
        let mut state = IngestState::new(opts.kind, opts.alg);
        let hasher = Hasher::new(opts.alg);
        state.set_hash(0, &hasher);
        let w = FsWriter::wrap(fs, id, state, data, file, hasher, opts.batch_bytes, hold)?;
        // An upload session exists once its POST is answered: its state is durable. A fill's
        // is not resumed after a crash (the next request fetches again): an fsync here would
        // wait behind the disk's queue (the previous fill's commit) before the first byte.
        let durable = w.fs.fsync && upload;
        if let Err(e) = w.fs.put_atomic_durable(&layout::ingest_state(&id), &w.state.encode(), durable).await {
            // No state, no session: leave nothing behind (a full disk, typically).
            let _ = w.remove().await;
            return Err(e);
        }
        Ok(w)
    }

    pub(super) async fn resume(fs: Arc<Fs>, id: IngestId, batch_bytes: usize, hold: Hold) -> StoreResult<FsWriter> {
        let raw = match tokio::fs::read(fs.path(&layout::ingest_state(&id))).await {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::UploadUnknown),
            Err(e) => return Err(e.into()),
        };
        let state = IngestState::decode(&raw).ok_or(StoreError::UploadUnknown)?;
        if state.commit.is_some() {
            // Verified and being committed: only finishing it is left (`resume_commit`).
            return Err(StoreError::UploadUnknown);
        }
        let hasher = state.hasher().ok_or(StoreError::UploadUnknown)?;
        let data = fs.path(&layout::ingest_data(&id));
        let (path, offset) = (data.clone(), state.offset);
        let file = blocking(move || {
            let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
            let len = file.metadata()?.len();
            if len < offset {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("ingest data has {len} bytes, its state says {offset}"),
                ));
            }
            if len > offset {
                // A chunk that was being written when the process died or the request ended.
                file.set_len(offset)?;
            }
            file.seek(SeekFrom::Start(offset))?;
            Ok(file)
        })
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::UploadUnknown
            } else {
                e.into()
            }
        })?;
        FsWriter::wrap(fs, id, state, data, file, hasher, batch_bytes, hold)
    }

    /// Reopens an ingest whose commit was recorded and cut short before the rename: its
    /// verified data, ready to commit again. `None` without a record or without the data.
    pub(super) async fn resume_commit(fs: Arc<Fs>, id: IngestId, hold: Hold) -> StoreResult<Option<Box<dyn Verified>>> {
        let Some(raw) = super::not_found(tokio::fs::read(fs.path(&layout::ingest_state(&id))).await)? else {
            return Ok(None);
        };
        let Some(state) = IngestState::decode(&raw) else { return Ok(None) };
        let (Some((digest, size)), Some(hasher)) = (state.committing(), state.hasher()) else { return Ok(None) };
        let data = fs.path(&layout::ingest_data(&id));
        let path = data.clone();
        let file = blocking(move || {
            let file = std::fs::OpenOptions::new().write(true).open(path)?;
            // The record is written after the data was: it has exactly `size` bytes.
            if file.metadata()?.len() != size {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the data is not the recorded size"));
            }
            Ok(file)
        })
        .await;
        let Some(file) = super::not_found(file)? else { return Ok(None) };
        let mut w = FsWriter::wrap(fs, id, state, data, file, hasher, 1, hold)?;
        let sink = w.sink.take().expect("no worker before the first batch");
        Ok(Some(Box::new(FsVerified { writer: Box::new(w), sink, digest, size })))
    }

    #[allow(clippy::too_many_arguments)]
    fn wrap(
        fs: Arc<Fs>,
        id: IngestId,
        state: IngestState,
        data: PathBuf,
        file: File,
        hasher: Hasher,
        batch_limit: usize,
        hold: Hold,
    ) -> StoreResult<FsWriter> {
        let writeback = if fs.fsync { Some(Writeback::new(file.try_clone()?)) } else { None };
        let read = Arc::new(File::open(&data)?);
        let offset = state.offset;
        Ok(FsWriter {
            fs,
            id,
            state,
            data,
            sink: Some(Sink { file, hasher, writeback, _hold: Arc::new(hold) }),
            worker: None,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_limit: batch_limit.max(1),
            size: offset,
            landed: Arc::new(AtomicU64::new(offset)),
            tail: Arc::new(FsTail { file: read, shared: SharedBlocks::default() }),
        })
    }

    /// Hands the collected batch to the worker, waiting only while [`QUEUED_BATCHES`] are
    /// queued already. A worker runs while it has batches: one that found its queue empty
    /// has ended (see [`work`]), and the batch goes to a new one.
    async fn send_batch(&mut self) -> std::io::Result<()> {
        let mut batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        loop {
            let queue = match &self.worker {
                Some(w) => w.queue.clone(),
                None => self.start_worker(),
            };
            match queue.send(batch).await {
                Ok(()) => return Ok(()),
                // The worker ended: it ran out of batches (then this one goes to the next
                // worker), or a write failed (its error).
                Err(tokio::sync::mpsc::error::SendError(back)) => {
                    batch = back;
                    self.join_worker().await?;
                }
            }
        }
    }

    /// Starts a worker with the sink; its queue.
    fn start_worker(&mut self) -> tokio::sync::mpsc::Sender<Vec<Bytes>> {
        let (queue, rx) = tokio::sync::mpsc::channel(QUEUED_BATCHES);
        let sink = self.sink.take().expect("settled");
        let (landed, delay) = (self.landed.clone(), test_write_delay());
        let job = tokio::task::spawn_blocking(move || work(sink, rx, &landed, delay));
        self.worker = Some(Worker { queue: queue.clone(), job });
        queue
    }

    /// Waits until every batch sent has landed, and takes the sink back from the worker.
    async fn settle(&mut self) -> std::io::Result<()> {
        self.join_worker().await?;
        // Everything accepted landed, but the batch being collected.
        debug_assert_eq!(self.landed.load(Ordering::Acquire), self.size - self.batch_bytes as u64);
        Ok(())
    }

    /// Ends the worker, if one runs, once it has written every batch it was sent, and takes
    /// the sink back: its write error, if one failed.
    async fn join_worker(&mut self) -> std::io::Result<()> {
        let Some(Worker { queue, job }) = self.worker.take() else { return Ok(()) };
        drop(queue);
        let (sink, res) = job.await.map_err(std::io::Error::other)?;
        self.sink = Some(sink);
        res
    }

    /// Writes every byte accepted to the file and, with `fsync`, to the disk.
    async fn flush(&mut self, fsync: bool) -> std::io::Result<()> {
        if !self.batch.is_empty() {
            self.send_batch().await?;
        }
        self.settle().await?;
        if fsync {
            let file = self.sink.as_ref().expect("settled").file.try_clone()?;
            blocking(move || file.sync_data()).await?;
        }
        Ok(())
    }

    async fn remove(&self) -> StoreResult<()> {
        let dir = self.fs.path(&layout::ingest_dir(&self.id));
        match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl Writer for FsWriter {
    fn id(&self) -> IngestId {
        self.id
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn offset(&self) -> u64 {
        self.state.offset
    }

    fn readable(&self) -> u64 {
        self.landed.load(Ordering::Acquire)
    }

    fn tail(&self) -> Arc<dyn TailReader> {
        self.tail.clone()
    }

    async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.size += chunk.len() as u64;
        self.batch_bytes += chunk.len();
        self.batch.push(chunk);
        if self.batch_bytes >= self.batch_limit {
            self.send_batch().await?;
        }
        Ok(())
    }

    async fn checkpoint(&mut self) -> StoreResult<()> {
        self.flush(self.fs.fsync).await?;
        let hasher = &self.sink.as_ref().expect("settled").hasher;
        self.state.set_hash(self.size, hasher);
        // Under the session's lock to the end: a request dropped while its state is written
        // keeps the session until the state is in place, so the next request resumes from it
        // and no state of other bytes can land after that request's own.
        let keep = self.sink.as_ref().expect("settled")._hold.clone();
        let key = layout::ingest_state(&self.id);
        let state = self.state.encode();
        self.fs.put_atomic_holding(&key, &state, self.fs.fsync, Some("checkpoint.state_write"), Some(keep)).await
    }

    async fn rollback(&mut self) -> StoreResult<()> {
        // No write of the abandoned chunk may land after the cut.
        let _ = self.settle().await;
        self.batch.clear();
        self.batch_bytes = 0;
        let offset = self.state.offset;
        let hasher = self.state.hasher().ok_or(StoreError::UploadUnknown)?;
        let mut sink = self.sink.take().expect("settled");
        let (sink, res) = blocking_keep(move || {
            let res = sink.file.set_len(offset).and_then(|()| sink.file.seek(SeekFrom::Start(offset)).map(drop));
            sink.hasher = hasher;
            (sink, res)
        })
        .await;
        self.sink = Some(sink);
        res?;
        self.size = offset;
        self.landed.store(offset, Ordering::Release);
        Ok(())
    }

    async fn verify(mut self: Box<Self>, expected: &Digest, size: Option<u64>) -> StoreResult<Box<dyn Verified>> {
        if let Err(e) = self.flush(false).await {
            let _ = self.remove().await;
            return Err(e.into());
        }
        let sink = self.sink.take().expect("settled");
        let written = self.size;
        let actual = if sink.hasher.algorithm() == expected.algorithm() {
            sink.hasher.clone().finish()
        } else {
            match hash_file(self.data.clone(), expected.algorithm()).await {
                Ok(d) => d,
                Err(e) => {
                    let _ = self.remove().await;
                    return Err(e.into());
                }
            }
        };
        let checked = if &actual != expected {
            Err(StoreError::DigestMismatch { expected: expected.clone(), actual })
        } else if let Some(want) = size.filter(|&s| s != written) {
            Err(StoreError::SizeMismatch { expected: want, actual: written })
        } else {
            Ok(())
        };
        if let Err(e) = checked {
            drop(sink);
            let _ = self.remove().await;
            return Err(e);
        }
        Ok(Box::new(FsVerified { writer: self, sink, digest: expected.clone(), size: written }))
    }

    async fn abort(mut self: Box<Self>) -> StoreResult<()> {
        let _ = self.settle().await;
        self.remove().await
    }
}

/// A verified ingest file, ready to be renamed into `blobs/`.
struct FsVerified {
    writer: Box<FsWriter>,
    /// Keeps the file (for the fsync) and the hold until the commit is done.
    sink: Sink,
    digest: Digest,
    size: u64,
}

#[async_trait]
impl Verified for FsVerified {
    fn size(&self) -> u64 {
        self.size
    }

    async fn commit(self: Box<Self>) -> StoreResult<u64> {
        let FsVerified { mut writer, sink, digest, size } = *self;
        let fs = writer.fs.clone();
        let res = async {
            if fs.fsync {
                let file = sink.file.try_clone()?;
                blocking(move || file.sync_data()).await?;
            }
            // An upload's commit is recorded before the content is put in place, so that a
            // final PUT retried after a crash finishes it (`Store::recover_interrupted_commit`).
            let upload = matches!(writer.state.kind, IngestKind::Upload { .. });
            if upload && writer.state.commit.is_none() {
                writer.state.set_hash(size, &sink.hasher);
                writer.state.commit = Some(CommitRecord { digest: digest.to_string(), size });
                fs.put_atomic(&layout::ingest_state(&writer.id), &writer.state.encode()).await?;
            }
            let to = fs.path(&layout::blob(&digest));
            let dir = to.parent().expect("blob paths have a parent").to_path_buf();
            let (from, durable) = (writer.data.clone(), fs.fsync);
            // First writer wins: content in place is never replaced (same digest, same bytes
            // — or a saved state that lied about the bytes: either way the first copy stays).
            let placed = blocking(move || {
                create_dirs(&dir, durable)?;
                let placed = rename_noreplace(&from, &to)?;
                if durable && placed {
                    std::fs::File::open(&dir)?.sync_all()?;
                }
                Ok(placed)
            })
            .await?;
            if !placed {
                tracing::debug!(%digest, "content already stored: the new copy is dropped");
            }
            crate::hooks::pause("commit.after_rename").await;
            Ok::<_, StoreError>(())
        }
        .await;
        // Whatever the outcome, the ingest is done: the data is either in `blobs/` or not
        // wanted. (A crash before this line leaves the state without data: an upload's
        // finish recognises it, the sweep removes it.)
        let removed = writer.remove().await;
        drop(sink);
        res?;
        removed?;
        Ok(size)
    }

    async fn abort(self: Box<Self>) -> StoreResult<()> {
        let FsVerified { writer, sink, .. } = *self;
        let removed = writer.remove().await;
        drop(sink);
        removed
    }
}

/// The worker's loop: hashes and writes each batch in turn, counts it landed, starts its
/// writeback; stops at the first failed write (the writer's next send sees the queue closed).
/// It ends as soon as its queue is empty: a blocking-pool thread is held while there are
/// bytes to hash and write, never while a slow client or upstream sends the next ones (512
/// slow uploads would otherwise hold every thread, and every blocking file operation of the
/// server would wait behind them).
fn work(
    mut sink: Sink,
    mut queue: tokio::sync::mpsc::Receiver<Vec<Bytes>>,
    landed: &AtomicU64,
    delay: Option<std::time::Duration>,
) -> (Sink, std::io::Result<()>) {
    loop {
        let batch = match queue.try_recv() {
            Ok(batch) => batch,
            Err(_) => {
                // No batch, or the writer settles: no more sends are taken; one that raced
                // in before the close is still written.
                queue.close();
                match queue.blocking_recv() {
                    Some(batch) => batch,
                    None => return (sink, Ok(())),
                }
            }
        };
        let len: u64 = batch.iter().map(|c| c.len() as u64).sum();
        for chunk in &batch {
            sink.hasher.update(chunk);
        }
        if let Some(d) = delay {
            tracing::warn!(bytes = len, delay_ms = d.as_millis() as u64, "test hook: batch write held back");
            std::thread::sleep(d);
        }
        if let Err(e) = write_all_vectored(&mut sink.file, &batch) {
            return (sink, Err(e));
        }
        if delay.is_some() {
            tracing::warn!(bytes = len, "test hook: held-back batch landed");
        }
        let now = landed.fetch_add(len, Ordering::AcqRel) + len;
        if let Some(wb) = &mut sink.writeback {
            wb.written(now);
        }
    }
}

/// How long each batch write waits before it lands, for tests that must hit a write landing
/// late (`STEVEDORE_TEST_DELAY_WRITE_MS`); never set in production.
fn test_write_delay() -> Option<std::time::Duration> {
    static DELAY: OnceLock<Option<std::time::Duration>> = OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("STEVEDORE_TEST_DELAY_WRITE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

/// Runs `f` on the blocking pool; the value comes back even if `f` reports an error.
async fn blocking_keep<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows.
pub fn write_all_vectored(file: &mut File, chunks: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Hashes a whole file with `alg` on the blocking pool.
pub async fn hash_file(path: PathBuf, alg: crate::oci::Algorithm) -> std::io::Result<Digest> {
    blocking(move || {
        use std::io::Read;
        let mut f = File::open(path)?;
        let mut h = Hasher::new(alg);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finish());
            }
            h.update(&buf[..n]);
        }
    })
    .await
}
