//! The object store's [`Writer`]: bytes are hashed on the way in and spooled to local part
//! files (`<scratch>/ingest/<id>/<n>`, `part_size` each); every full part goes to the
//! ingest's multipart upload, up to [`PARTS_IN_FLIGHT`] at once per writer, each holding a
//! slot of the process-wide part budget while it is in memory: an upload session's as soon as
//! it is spooled, a fill's at its commit, once its readers have every byte
//! ([`S3Writer::send_parts_now`]). The bytes coming in never wait for the bucket (one batch is
//! spooled while the next is collected; parts start as slots free up; `verify` needs the hash
//! only and the commit waits for the parts). A part counts as sent
//! (and a checkpoint records it) only once it and every part before it landed: the part
//! numbers recorded are always contiguous from 1.
//!
//! The state object (`ingest/<id>/state.json` in the bucket) holds the offset and hash state
//! of the last checkpoint, the multipart upload's id and key, and the ETags of the parts below
//! that offset. It is written when an upload session starts, before the first part of any
//! ingest (so an abandoned multipart upload can always be found and aborted), and at every
//! checkpoint. The spool keeps every byte from the start of the part holding the last
//! checkpoint: a rollback or a resume goes back to it (parts sent past it are sent again under
//! the same numbers, which replaces them).
//!
//! The bucket is the session's record, so that any process sharing it can take the next
//! request: at a checkpoint the bytes of the part not sent yet that are not in the bucket yet
//! become one piece object (`ingest/<id>/piece/<start>`, listed in the state), and pieces of
//! parts sent since are deleted after the new state is written. Each save gives the state a
//! new revision, and the spool's `rev` file names the revision it is in step with: a writer
//! opened where they differ (another process advanced the session) or where the spool is
//! missing rebuilds the spool from the pieces, and never sends the local bytes.
//!
//! Every job working for the writer (a batch being hashed and spooled, a part being sent)
//! holds the writer's [`Hold`], so a writer dropped mid-request keeps its session locked
//! until its work has landed.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{io, S3};
use crate::oci::{Digest, Hasher};
use crate::storage::backend::{
    CommitRecord, Hold, IngestId, IngestKind, IngestState, TailReader, Verified, Writer, WriterOptions,
};
use crate::storage::fs::read::{read_at, READ_CHUNK};
use crate::storage::layout;
use crate::storage::{StoreError, StoreResult};

/// The persisted state of an S3 ingest: the common [`IngestState`] plus the multipart upload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct S3State {
    #[serde(flatten)]
    pub base: IngestState,
    /// The multipart upload's id, once created.
    #[serde(default)]
    pub upload: Option<String>,
    /// The key (below the prefix) the multipart upload completes under.
    #[serde(default)]
    pub target: String,
    /// ETags of parts 1..=n, every one below `offset`.
    #[serde(default)]
    pub parts: Vec<String>,
    /// Set once the content is in place (an upload's copy is done): only cleaning up is left.
    #[serde(default)]
    pub committed: bool,
    /// The bytes of the part not sent yet, `[parts × part_size, offset)`, as piece objects
    /// (`ingest/<id>/piece/<start>`), in order and contiguous: any process sharing the bucket
    /// rebuilds the session's spool from them.
    #[serde(default)]
    pub pieces: Vec<Piece>,
    /// A fresh token at every save. A local spool is used only if it was in step with this
    /// revision (its `rev` file names it); else another process advanced the session (or the
    /// spool is gone) and it is rebuilt from the pieces.
    #[serde(default)]
    pub rev: String,
    /// Last activity (unix millis): the sweep's idle time (an object's Last-Modified has whole
    /// seconds only).
    #[serde(default)]
    pub updated_ms: u64,
    /// The multipart copy making a large upload visible (`storage.s3.max_copy_size`), recorded
    /// before its first part so that the sweep can abort it.
    #[serde(default)]
    pub copy: Option<CopyUpload>,
}

/// Bytes `start..start + len` of an upload, in the object `ingest/<id>/piece/<start>`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub len: u64,
    /// The piece object's ETag when it was written: a rebuild takes only that object (a
    /// piece written since under the same key, by a request the state does not describe,
    /// makes the session unknown instead of lending its bytes to this state's hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// A multipart upload copying a staged upload to its final key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CopyUpload {
    /// Below the prefix.
    pub key: String,
    pub upload: String,
}

impl S3State {
    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("ingest state serialises"))
    }

    pub fn decode(raw: &[u8]) -> Option<S3State> {
        let s: S3State = serde_json::from_slice(raw).ok()?;
        (s.base.v == IngestState::VERSION).then_some(s)
    }

    /// Whether the pieces cover `[from, offset)` exactly, in order.
    fn pieces_cover(&self, from: u64) -> bool {
        let mut at = from;
        for p in &self.pieces {
            if p.start != at || p.len == 0 {
                return false;
            }
            at += p.len;
        }
        at == self.base.offset
    }
}

/// Parts one writer sends at once. Each holds a slot of the process-wide part budget
/// (`storage.s3.buffer_memory`) while it is in memory, so this bounds one writer's share, not
/// the process's memory. One at a time left a fill waiting for every part's round trip
/// (64 MB/s cold pull on Garage against Distribution's 236).
const PARTS_IN_FLIGHT: usize = 4;

/// A fill's batches hashed and spooled at once (each takes a permit until both its jobs are
/// done): the bytes coming in wait only when this many are behind. An upload session keeps
/// one under way (see [`S3Writer::start_batch`]).
const BATCHES_AT_ONCE: usize = 3;

/// The batches being hashed and spooled. Each batch is two jobs on the blocking pool at once,
/// one hashing, one spooling (the direct spool's writes wait for the disk meanwhile); a job
/// takes its state (the hasher; the direct spool) from the previous batch's job of its kind
/// and hands it to the next, so batches are hashed and spooled in order while up to
/// [`BATCHES_AT_ONCE`] are under way. (One job per batch, hashing then spooling, with the
/// next batch waiting for it: on a 2-core host the bytes coming in waited ~1.2 ms of every
/// 1 MiB batch, a third of a Garage cold pull's time.)
struct Spooling {
    /// The last batch's jobs: the hasher after it; the direct spool after it and the first
    /// error of any batch.
    hash: JoinHandle<Option<Hasher>>,
    spool: JoinHandle<Spooled>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Spooling {
    /// Every batch under way is hashed and spooled.
    fn is_finished(&self) -> bool {
        self.hash.is_finished() && self.spool.is_finished()
    }
}

/// The spool's state after a batch: the direct spool, and the first error (a batch after a
/// failed one does nothing).
type Spooled = (Option<DirectSpool>, std::io::Result<()>);

/// The unit of direct I/O: file offsets, lengths and buffer addresses are multiples of it.
const BLOCK: usize = 4096;

/// The direct spool's gathering buffer.
const STAGE: usize = 1 << 20;

/// A fill's spool from its second part on, written around the page cache (`O_DIRECT`): those
/// bytes go to the bucket at the commit and are read back once, so caching them only costs
/// fresh memory for every byte (and evicts what the host caches). On a VM whose freed memory
/// the host takes back (free page reporting), the first touch of each such page is a host
/// fault: after other work had freed memory, a 512 MiB fill's page-cache writes took ~1.7 s
/// of its CPU instead of ~0.1 s (perf: `copy_folio_from_iter_atomic`), halving the pull.
/// Bytes are gathered in an aligned `stage`; whole blocks are written as they complete, the
/// rest (less than a block) waits for the next batch or the verdict, which writes it padded
/// and cuts the file to size. The first part goes through the page cache as before: a small
/// blob's commit and its followers read it from memory.
struct DirectSpool {
    /// Mapped with the first part spooled here (a blob of one part never needs it).
    stage: Option<Mapping>,
    /// Bytes in `stage`, from stream offset `base` (a multiple of [`BLOCK`], in one part).
    len: usize,
    base: u64,
    part_size: u64,
    /// The part files opened for direct I/O, by index: writes, and the commit's reads.
    files: BTreeMap<usize, Arc<File>>,
}

impl DirectSpool {
    fn new(part_size: u64) -> DirectSpool {
        DirectSpool { stage: None, len: 0, base: 0, part_size, files: BTreeMap::new() }
    }

    /// Whether part `idx` is spooled here: every part after the first (its direct handle is
    /// opened on first use; an error if the file system refuses).
    fn takes(&mut self, idx: usize, dir: &std::path::Path) -> std::io::Result<bool> {
        if idx == 0 {
            return Ok(false);
        }
        if self.files.contains_key(&idx) {
            return Ok(true);
        }
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(part_file(dir, idx))?;
        if self.stage.is_none() {
            self.stage = Some(Mapping::new(STAGE)?);
        }
        self.files.insert(idx, Arc::new(f));
        Ok(true)
    }

    /// Appends `bytes`, the stream's bytes from `pos` (where the stage ends); writes whole
    /// blocks as the stage fills and everything at the end of a part.
    fn push(&mut self, mut bytes: &[u8], pos: u64) -> std::io::Result<()> {
        if self.len == 0 {
            self.base = pos;
        }
        debug_assert_eq!(pos, self.base + self.len as u64);
        while !bytes.is_empty() {
            let at = self.len;
            let stage = self.stage_mut();
            let n = (stage.len() - at).min(bytes.len());
            stage[at..at + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.len == STAGE || (self.base + self.len as u64).is_multiple_of(self.part_size) {
                self.write(false)?;
            }
        }
        Ok(())
    }

    /// Writes the stage's whole blocks (all of it, padded, with `last`: then the part file is
    /// cut to the stream's end) and keeps the rest at its start.
    fn write(&mut self, last: bool) -> std::io::Result<()> {
        let whole = if last { self.len.next_multiple_of(BLOCK) } else { self.len / BLOCK * BLOCK };
        if whole == 0 {
            return Ok(());
        }
        let idx = (self.base / self.part_size) as usize;
        let at = self.base % self.part_size;
        let file = self.files.get(&idx).cloned().ok_or_else(|| std::io::Error::other("direct spool file missing"))?;
        let len = self.len;
        let stage = self.stage_mut();
        if last {
            stage[len..whole].fill(0);
        }
        file.write_all_at(&stage[..whole], at)?;
        if last {
            file.set_len(at + len as u64)?;
            self.base += len as u64;
            self.len = 0;
        } else {
            stage.copy_within(whole..len, 0);
            self.base += whole as u64;
            self.len -= whole;
        }
        Ok(())
    }

    /// Where the bytes readable from the part files end, given the stream's `end`.
    fn readable(&self, end: u64) -> u64 {
        if self.len > 0 {
            self.base
        } else {
            end
        }
    }

    fn stage_mut(&mut self) -> &mut [u8] {
        let m = self.stage.as_ref().expect("mapped with the first direct part");
        // SAFETY: the mapping is `m.len` bytes, readable and writable, owned by `self.stage`.
        unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), m.len) }
    }
}

/// The name of the file in a local spool naming the state revision it is in step with.
const REV_FILE: &str = "rev";

/// Reads what a writer has spooled so far (fill followers): the part files, kept open, so a
/// follower can finish reading after the commit removed them.
pub struct S3Tail {
    part_size: u64,
    files: Mutex<BTreeMap<usize, Arc<File>>>,
}

#[async_trait]
impl TailReader for S3Tail {
    async fn read(&self, pos: u64, end: u64) -> std::io::Result<Bytes> {
        if pos >= end {
            return Ok(Bytes::new());
        }
        let idx = (pos / self.part_size) as usize;
        let at = pos % self.part_size;
        let file = self.files.lock().unwrap().get(&idx).cloned();
        let Some(file) = file else {
            return Err(std::io::Error::other(format!("the spool of part {} is gone", idx + 1)));
        };
        let n = (end - pos).min(self.part_size - at).min(READ_CHUNK as u64) as usize;
        read_at(&file, at, n).await
    }
}

pub struct S3Writer {
    s3: Arc<S3>,
    id: IngestId,
    state: S3State,
    /// The state object exists in the bucket.
    state_saved: bool,
    /// `None` only while a batch is being hashed and spooled.
    hasher: Option<Hasher>,
    /// Parts sent (index = part number - 1).
    parts: Vec<String>,
    /// Parts being sent, in order: `parts.len()`, `parts.len() + 1`, ... (at most
    /// [`PARTS_IN_FLIGHT`]). A part joins `parts` only once it and every part before it landed.
    in_flight: VecDeque<JoinHandle<StoreResult<PartId>>>,
    /// The batches being hashed and spooled (see [`Spooling`]): the next is collected meanwhile.
    spooling: Option<Spooling>,
    batch: Vec<Bytes>,
    batch_bytes: usize,
    batch_limit: usize,
    size: u64,
    /// Bytes in the spool for certain (advanced by the spooling jobs, in order).
    landed: Arc<AtomicU64>,
    /// Fills keep every part file until the commit, for their followers.
    keep_spool: bool,
    /// The multipart upload is complete (under its target key).
    completed: bool,
    tail: Arc<S3Tail>,
    hold: Arc<Hold>,
    /// Counted among the writers taking bytes until the verdict.
    receiving: Option<Receiving>,
    /// A fill's parts after the first, spooled around the page cache; `None` for upload
    /// sessions, while a batch has it, or where the file system refuses `O_DIRECT`.
    direct: Option<DirectSpool>,
    /// Keeps the process's part mappings while this writer sends parts (see [`PartPool`]).
    pool_use: Option<PoolUse>,
}

/// One writer counted in [`S3::receiving`] while it lives.
struct Receiving(Arc<S3>);

impl Receiving {
    fn new(s3: &Arc<S3>) -> Receiving {
        s3.receiving.fetch_add(1, Ordering::Relaxed);
        Receiving(s3.clone())
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let s3 = &self.0;
        s3.busy_until_ms.fetch_max(s3.ms_since_opened() + BUSY_GRACE_MS, Ordering::Relaxed);
        s3.receiving.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long after a writer stopped taking bytes the bucket still counts as busy for clients:
/// a pull asks for its next blob within milliseconds of the last byte of one.
const BUSY_GRACE_MS: u64 = 250;

impl S3 {
    fn ms_since_opened(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Whether a writer takes bytes, or did within [`BUSY_GRACE_MS`].
    fn receiving_lately(&self) -> bool {
        self.receiving.load(Ordering::Relaxed) > 0
            || self.ms_since_opened() < self.busy_until_ms.load(Ordering::Relaxed)
    }
}

impl S3Writer {
    pub(super) async fn create(s3: Arc<S3>, id: IngestId, opts: WriterOptions, hold: Hold) -> StoreResult<S3Writer> {
        let dir = s3.spool_dir(&id);
        tokio::fs::create_dir_all(&dir).await?;
        let hasher = Hasher::new(opts.alg);
        let keep_spool = matches!(opts.kind, IngestKind::Fill { .. });
        let target = match &opts.kind {
            IngestKind::Fill { digest } => match digest.parse::<Digest>() {
                Ok(d) => layout::blob(&d).as_str().to_string(),
                Err(_) => layout::ingest_data(&id).as_str().to_string(),
            },
            IngestKind::Upload { .. } => layout::ingest_data(&id).as_str().to_string(),
        };
        let mut base = IngestState::new(opts.kind, opts.alg);
        base.set_hash(0, &hasher);
        let state = S3State {
            base,
            upload: None,
            target,
            parts: Vec::new(),
            committed: false,
            pieces: Vec::new(),
            rev: String::new(),
            updated_ms: 0,
            copy: None,
        };
        let mut w = S3Writer::wrap(s3, id, state, hasher, Vec::new(), opts.batch_bytes, keep_spool, hold);
        if keep_spool && w.s3.part_size.is_multiple_of(BLOCK as u64) && !w.s3.no_direct.load(Ordering::Relaxed) {
            w.direct = Some(DirectSpool::new(w.s3.part_size));
        }
        if !keep_spool {
            // An upload session exists once its state does. (A fill's state is written before
            // its first part: a fill that never needs one leaves nothing in the bucket.)
            if let Err(e) = w.save_state().await {
                let _ = w.remove().await;
                return Err(e);
            }
        }
        Ok(w)
    }

    pub(super) async fn resume(s3: Arc<S3>, id: IngestId, batch_bytes: usize, hold: Hold) -> StoreResult<S3Writer> {
        let Some((state, _)) = s3.state(&id).await? else { return Err(StoreError::UploadUnknown) };
        if state.committed || state.base.commit.is_some() {
            // Done, or verified and being committed: only finishing it is left.
            return Err(StoreError::UploadUnknown);
        }
        let hasher = state.base.hasher().ok_or(StoreError::UploadUnknown)?;
        let part_size = s3.part_size;
        let offset = state.base.offset;
        let idx = state.parts.len();
        if idx as u64 != offset / part_size {
            return Err(StoreError::UploadUnknown);
        }
        // The spool must hold the checkpoint's part up to the offset (bytes after it go), and
        // be in step with the state: else it is rebuilt from the state's pieces.
        let dir = s3.spool_dir(&id);
        let part_start = idx as u64 * part_size;
        let want = offset - part_start;
        let marker = tokio::fs::read_to_string(dir.join(REV_FILE)).await.ok();
        // (A state without a revision was written before pieces existed: its spool is all.)
        let in_step = state.rev.is_empty() || marker.as_deref() == Some(state.rev.as_str());
        let local = if in_step {
            open_spool(dir, idx, want).await
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the spool is behind the state"))
        };
        let file = match local {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if state.rev.is_empty() || !state.pieces_cover(part_start) {
                    return Err(StoreError::UploadUnknown);
                }
                Some(rebuild_spool(&s3, &id, &state, idx).await?)
            }
            Err(e) => return Err(e.into()),
        };
        let parts = state.parts.clone();
        let mut w = S3Writer::wrap(s3, id, state, hasher, parts, batch_bytes, false, hold);
        w.state_saved = true;
        w.size = offset;
        w.landed.store(offset, Ordering::Release);
        w.tail.files.lock().unwrap().extend(file.map(|f| (idx, f)));
        Ok(w)
    }

    #[allow(clippy::too_many_arguments)]
    fn wrap(
        s3: Arc<S3>,
        id: IngestId,
        state: S3State,
        hasher: Hasher,
        parts: Vec<String>,
        batch_limit: usize,
        keep_spool: bool,
        hold: Hold,
    ) -> S3Writer {
        let tail = Arc::new(S3Tail { part_size: s3.part_size, files: Mutex::new(BTreeMap::new()) });
        S3Writer {
            id,
            state,
            state_saved: false,
            hasher: Some(hasher),
            parts,
            in_flight: VecDeque::new(),
            spooling: None,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_limit: batch_limit.max(1),
            size: 0,
            landed: Arc::new(AtomicU64::new(0)),
            keep_spool,
            completed: false,
            tail,
            hold: Arc::new(hold),
            receiving: Some(Receiving::new(&s3)),
            direct: None,
            pool_use: None,
            s3,
        }
    }

    fn target(&self) -> Path {
        Path::from(format!("{}{}", self.s3.prefix, self.state.target))
    }

    async fn save_state(&mut self) -> StoreResult<()> {
        self.save_state_hooked(None).await
    }

    /// Saves the state. The PUT runs as a task of its own holding the writer's [`Hold`] (the
    /// session's lock): a request dropped meanwhile keeps the session until the PUT is over,
    /// so no state can land after the next request on the session started. `hook`: a test
    /// pause point before the PUT.
    async fn save_state_hooked(&mut self, hook: Option<&'static str>) -> StoreResult<()> {
        self.state.rev = uuid::Uuid::new_v4().simple().to_string();
        self.state.updated_ms = crate::storage::index::unix_now();
        let (s3, key, value, hold) =
            (self.s3.clone(), layout::ingest_state(&self.id), self.state.encode(), self.hold.clone());
        tokio::spawn(async move {
            let _hold = hold;
            if let Some(name) = hook {
                crate::hooks::pause(name).await;
            }
            s3.put(&key, value).await
        })
        .await
        .map_err(std::io::Error::other)??;
        self.state_saved = true;
        if !self.keep_spool {
            // The spool is in step with this revision (up to the offset). Best effort: a spool
            // whose mark is older is rebuilt from the pieces, never used.
            let _ = tokio::fs::write(self.s3.spool_dir(&self.id).join(REV_FILE), &self.state.rev).await;
        }
        Ok(())
    }

    /// PUTs bytes `start..start + len` of the spool of part `idx` as a piece object; its ETag.
    async fn put_piece(&self, idx: usize, start: u64, len: u64) -> StoreResult<Option<String>> {
        let file = self.tail.files.lock().unwrap().get(&idx).cloned();
        let file = file.ok_or_else(|| std::io::Error::other(format!("spool of part {} is missing", idx + 1)))?;
        let at = start - idx as u64 * self.s3.part_size;
        let payload = read_range(&self.s3, file, at, len).await?;
        self.s3.put_payload(&layout::ingest_piece(&self.id, start), payload).await
    }

    /// Sends the last part, if any bytes are not in a sent part yet.
    async fn send_last_part(&mut self) -> StoreResult<()> {
        let res = async {
            // Every full part first (`verify` may have left some not started yet).
            self.send_full_parts(true).await?;
            let sent = self.parts.len() as u64 * self.s3.part_size;
            if self.size > sent {
                self.start_part(self.parts.len(), self.size - sent).await?;
                self.settle_part().await?;
            }
            Ok(())
        }
        .await;
        if res.is_err() {
            self.drain_parts().await;
        }
        res
    }

    /// Records the commit (digest, final size and hash, every part) in the state before the
    /// content is put in place: a final PUT retried after a crash finds it and finishes the
    /// commit (`Store::recover_interrupted_commit`). Upload sessions only (fills are never
    /// resumed).
    async fn record_commit(&mut self, digest: &Digest) -> StoreResult<()> {
        if self.keep_spool || self.state.base.commit.is_some() {
            return Ok(());
        }
        self.state.parts = self.parts.clone();
        self.state.base.set_hash(self.size, self.hasher.as_ref().expect("settled"));
        self.state.base.commit = Some(CommitRecord { digest: digest.to_string(), size: self.size });
        self.save_state().await
    }

    /// Reopens an ingest whose commit was recorded and cut short before the content was in
    /// place: the verified content, ready to commit again. `None` without a record, or when
    /// what the record needs is gone (the local spool of a one-part upload).
    pub(super) async fn resume_commit(s3: Arc<S3>, id: IngestId, hold: Hold) -> StoreResult<Option<Box<dyn Verified>>> {
        let Some((mut state, _)) = s3.state(&id).await? else { return Ok(None) };
        let (Some((digest, size)), Some(hasher)) = (state.base.committing(), state.base.hasher()) else {
            return Ok(None);
        };
        if state.committed {
            return Ok(None);
        }
        // A multipart copy cut short is started again.
        if let Some(copy) = state.copy.take() {
            let _ = s3.store.abort_multipart(&Path::from(format!("{}{}", s3.prefix, copy.key)), &copy.upload).await;
        }
        let one_part = state.upload.is_none() && state.parts.is_empty();
        let parts = state.parts.clone();
        let mut w = S3Writer::wrap(s3.clone(), id, state, hasher, parts, 1, false, hold);
        w.state_saved = true;
        w.size = size;
        w.landed.store(size, Ordering::Release);
        if one_part {
            // Its bytes are in the local spool only.
            let file = part_file(&s3.spool_dir(&id), 0);
            let f = match std::fs::OpenOptions::new().read(true).write(true).open(&file) {
                Ok(f) if f.metadata().map(|m| m.len() >= size).unwrap_or(false) => f,
                _ => return Ok(None),
            };
            w.tail.files.lock().unwrap().insert(0, Arc::new(f));
        } else if w.state.upload.is_none() {
            // Completed under the staging key already.
            w.completed = true;
        }
        Ok(Some(Box::new(S3Verified { writer: Box::new(w), digest })))
    }

    /// Hashes and spools the collected batch, and waits for it.
    async fn spool_batch(&mut self) -> StoreResult<()> {
        if !self.batch.is_empty() {
            self.start_batch().await?;
        }
        self.settle_batch().await
    }

    /// Waits for the batches being spooled, if any: their bytes are readable then, and the
    /// hasher and the direct spool are back.
    async fn settle_batch(&mut self) -> StoreResult<()> {
        let Some(job) = self.spooling.take() else { return Ok(()) };
        let (hashed, spooled) = (job.hash.await, job.spool.await);
        let (direct, res) = spooled.map_err(std::io::Error::other)?;
        self.hasher = hashed.map_err(std::io::Error::other)?;
        self.direct = direct;
        res?;
        if self.hasher.is_none() {
            return Err(std::io::Error::other("an earlier batch was lost").into());
        }
        Ok(())
    }

    fn landed(&self) -> u64 {
        self.landed.load(Ordering::Acquire)
    }

    /// Writes what the direct spool holds back (less than a block): every byte is readable
    /// from the part files then. At the verdict.
    async fn finish_spool(&mut self) -> StoreResult<()> {
        let Some(mut d) = self.direct.take() else { return Ok(()) };
        if d.len == 0 {
            self.direct = Some(d);
            return Ok(());
        }
        let hold = self.hold.clone();
        let (d, res) = tokio::task::spawn_blocking(move || {
            let _hold = hold;
            let res = d.write(true);
            (d, res)
        })
        .await
        .map_err(std::io::Error::other)?;
        self.direct = Some(d);
        res?;
        self.landed.store(self.size, Ordering::Release);
        Ok(())
    }

    /// Starts hashing and spooling the collected batch (see [`Spooling`]); waits only while
    /// [`BATCHES_AT_ONCE`] are under way.
    async fn start_batch(&mut self) -> StoreResult<()> {
        if !self.keep_spool {
            // An upload session's parts go as they land, started from `write`: with one batch
            // under way, a part is sent by the time the next batch starts, whenever the client
            // pauses (a slow PATCH keeps its session alive across replicas' sweeps).
            self.settle_batch().await?;
        }
        let start = self.size - self.batch_bytes as u64;
        let batch = std::mem::take(&mut self.batch);
        let end = start + std::mem::take(&mut self.batch_bytes) as u64;
        let (prev_hash, prev_spool, permits) = match self.spooling.take() {
            Some(j) => (Some(j.hash), Some(j.spool), j.permits),
            None => (None, None, Arc::new(tokio::sync::Semaphore::new(BATCHES_AT_ONCE))),
        };
        let permit = Arc::new(permits.clone().acquire_owned().await.expect("never closed"));
        let mut hasher = self.hasher.take();
        let mut direct = self.direct.take();
        let runtime = tokio::runtime::Handle::current();
        let hash = tokio::task::spawn_blocking({
            let (batch, hold, permit, runtime) = (batch.clone(), self.hold.clone(), permit.clone(), runtime.clone());
            move || {
                let (_hold, _permit) = (hold, permit);
                if let Some(prev) = prev_hash {
                    hasher = runtime.block_on(prev).ok().flatten();
                }
                let mut hasher = hasher?;
                for chunk in &batch {
                    hasher.update(chunk);
                }
                Some(hasher)
            }
        });
        let (dir, part_size) = (self.s3.spool_dir(&self.id), self.s3.part_size);
        let (hold, s3, tail, landed) = (self.hold.clone(), self.s3.clone(), self.tail.clone(), self.landed.clone());
        let spool = tokio::task::spawn_blocking(move || -> Spooled {
            let (_hold, _permit) = (hold, permit);
            if let Some(prev) = prev_spool {
                match runtime.block_on(prev) {
                    Ok((d, Ok(()))) => direct = d,
                    Ok((d, Err(e))) => return (d, Err(e)),
                    Err(e) => return (None, Err(std::io::Error::other(e))),
                }
            }
            let res = spool(&batch, start, part_size, &dir, &tail, &mut direct, &s3);
            if res.is_ok() {
                landed.store(direct.as_ref().map_or(end, |d| d.readable(end)), Ordering::Release);
            }
            (direct, res)
        });
        self.spooling = Some(Spooling { hash, spool, permits });
        Ok(())
    }

    /// Waits for the oldest part in flight and records it.
    async fn settle_part(&mut self) -> StoreResult<()> {
        let Some(job) = self.in_flight.pop_front() else { return Ok(()) };
        let part = job.await.map_err(std::io::Error::other)??;
        self.parts.push(part.content_id);
        Ok(())
    }

    /// Waits for every part in flight and records them.
    async fn settle_parts(&mut self) -> StoreResult<()> {
        while !self.in_flight.is_empty() {
            self.settle_part().await?;
        }
        Ok(())
    }

    /// Waits for every part in flight, recording none: after a failure, so that no part of
    /// this writer lands after the next request on the session began.
    async fn drain_parts(&mut self) {
        while let Some(job) = self.in_flight.pop_front() {
            let _ = job.await;
        }
    }

    /// Records the parts at the front of those in flight that have landed, without waiting.
    async fn settle_landed(&mut self) -> StoreResult<()> {
        while self.in_flight.front().is_some_and(|j| j.is_finished()) {
            self.settle_part().await?;
        }
        Ok(())
    }

    /// Starts sending the full parts spooled and not sent yet, as many as
    /// [`PARTS_IN_FLIGHT`] allows, recording those landed first: the bytes coming in never
    /// wait for the bucket (the spool holds them). With `wait`, sends every one and waits for
    /// them all.
    async fn send_full_parts(&mut self, wait: bool) -> StoreResult<()> {
        let full = (self.landed() / self.s3.part_size) as usize;
        let res = async {
            loop {
                self.settle_landed().await?;
                let next = self.parts.len() + self.in_flight.len();
                if next >= full {
                    break;
                }
                if self.in_flight.len() >= self.parts_in_flight() {
                    if !wait {
                        break;
                    }
                    self.settle_part().await?;
                    continue;
                }
                self.start_part(next, self.s3.part_size).await?;
            }
            if wait {
                self.settle_parts().await?;
            }
            Ok(())
        }
        .await;
        if res.is_err() {
            self.drain_parts().await;
        }
        res
    }

    /// Parts sent at once: [`PARTS_IN_FLIGHT`]; but a fill's commit, background work once its
    /// readers have every byte (the spool holds the blob meanwhile), sends one at a time while
    /// writers take bytes or did a moment ago (this one's own last byte included), so the
    /// bucket answers first what clients wait for: the lookups and ingests of a pull's next
    /// blobs (on a 2-core host with the bucket beside it, its next small blobs took 45-145 ms
    /// instead of 8-16 behind four parts of the last one's commit).
    fn parts_in_flight(&self) -> usize {
        match self.keep_spool && self.s3.receiving_lately() {
            true => 1,
            false => PARTS_IN_FLIGHT,
        }
    }

    /// While bytes come in: an upload session's full parts start at once (its spool keeps
    /// only the part being filled); a fill's wait for the commit. A fill's spool holds the
    /// whole blob anyway (its followers read it), and its clients are served from the upstream
    /// stream and the spool: sending parts meanwhile only takes CPU and bandwidth from them
    /// (on a 2-core host with the bucket beside it, a cold pull ran at a third of the speed
    /// of one whose parts went after the readers had their bytes).
    async fn send_parts_now(&mut self) -> StoreResult<()> {
        if self.keep_spool {
            return Ok(());
        }
        self.send_full_parts(false).await
    }

    /// Everything written is in the spool of part 1 and nothing was sent: no multipart upload
    /// (a fill's starts only at its commit), none completed, at most one part of bytes.
    fn in_first_part_only(&self) -> bool {
        self.state.upload.is_none() && !self.completed && self.size <= self.s3.part_size
    }

    /// Starts sending part `idx` (`len` bytes of its spool file).
    async fn start_part(&mut self, idx: usize, len: u64) -> StoreResult<()> {
        if self.state.upload.is_none() {
            let upload = self.s3.store.create_multipart(&self.target()).await.map_err(io)?;
            self.state.upload = Some(upload);
            // Recorded before the first part: the sweep can always find and abort it.
            self.save_state().await?;
        }
        // A part spooled around the page cache is read back the same way.
        let direct = self.direct.as_ref().and_then(|d| d.files.get(&idx).cloned());
        let file = direct.clone().or_else(|| self.tail.files.lock().unwrap().get(&idx).cloned());
        let file = file.ok_or_else(|| std::io::Error::other(format!("spool of part {} is missing", idx + 1)))?;
        if self.pool_use.is_none() {
            self.pool_use = Some(PoolUse::new(&self.s3.parts));
        }
        let (s3, path, upload, hold) =
            (self.s3.clone(), self.target(), self.state.upload.clone().expect("created"), self.hold.clone());
        self.in_flight.push_back(tokio::spawn(async move {
            let _hold = hold;
            if idx == 0 {
                // Tests hold the first part back while the next ones are sent.
                crate::hooks::pause("s3_part.first").await;
            }
            let payload = match direct {
                Some(_) => read_part_direct(&s3, file, len).await?,
                None => read_part(&s3, file, len).await?,
            };
            s3.store.put_part(&path, &upload, idx, payload).await.map_err(io)
        }));
        Ok(())
    }

    /// Sends the last part and completes the multipart upload (under its target key).
    async fn complete(&mut self) -> StoreResult<()> {
        self.send_last_part().await?;
        let parts = self.parts.iter().map(|e| PartId { content_id: e.clone() }).collect();
        let upload = self.state.upload.clone().expect("created");
        if let Err(e) = self.s3.store.complete_multipart(&self.target(), &upload, parts).await {
            // A recorded commit cut short after the completion: the object is there.
            let done = self.state.base.commit.is_some()
                && self.s3.store.head(&self.target()).await.is_ok_and(|m| m.size == self.size);
            if !done {
                return Err(io(e));
            }
        }
        self.state.upload = None;
        self.completed = true;
        Ok(())
    }

    /// The digest in `alg` of everything written: from the spool when it is all there, else
    /// from the completed staging object (read back once).
    async fn rehash(&mut self, alg: crate::oci::Algorithm) -> StoreResult<Digest> {
        let mut h = Hasher::new(alg);
        if self.in_first_part_only() {
            let file = self.tail.files.lock().unwrap().get(&0).cloned();
            if let Some(f) = file {
                let mut pos = 0;
                while pos < self.size {
                    let b = read_at(&f, pos, (self.size - pos).min(READ_CHUNK as u64) as usize).await?;
                    if b.is_empty() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "spool shorter than written",
                        )
                        .into());
                    }
                    h.update(&b);
                    pos += b.len() as u64;
                }
            }
            return Ok(h.finish());
        }
        if !self.completed {
            self.complete().await?;
        }
        let mut body = self.s3.store.get(&self.target()).await.map_err(io)?.into_stream();
        while let Some(b) = futures::TryStreamExt::try_next(&mut body).await.map_err(io)? {
            h.update(&b);
        }
        Ok(h.finish())
    }

    /// Removes the ingest: its multipart upload, its objects, its spool.
    async fn remove(&mut self) -> StoreResult<()> {
        if let Some(job) = self.spooling.take() {
            let _ = job.hash.await;
            let _ = job.spool.await;
        }
        self.drain_parts().await;
        if self.state_saved {
            // A fill has its state only; an upload its staging object and pieces too.
            let all = !self.keep_spool || self.state.target == layout::ingest_data(&self.id).as_str();
            self.s3.remove_ingest_objects(&self.id, Some(&self.state), all).await?;
        } else if let Some(upload) = &self.state.upload {
            let _ = self.s3.store.abort_multipart(&self.target(), upload).await;
        }
        match tokio::fs::remove_dir_all(self.s3.spool_dir(&self.id)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// Writes `batch`, the stream's bytes from `start`, into the part files (opening those it
/// starts: readers find them in `tail`), through `direct` from the second part on.
fn spool(
    batch: &[Bytes],
    start: u64,
    part_size: u64,
    dir: &std::path::Path,
    tail: &S3Tail,
    direct: &mut Option<DirectSpool>,
    s3: &S3,
) -> std::io::Result<()> {
    let mut pos = start;
    let mut current: Option<(usize, Arc<File>)> = None;
    for chunk in batch {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            let idx = (pos / part_size) as usize;
            let at = pos % part_size;
            let file = match &current {
                Some((i, f)) if *i == idx => f.clone(),
                _ => {
                    let known = tail.files.lock().unwrap().get(&idx).cloned();
                    let f = match known {
                        Some(f) => f,
                        None => {
                            let f = Arc::new(
                                std::fs::OpenOptions::new()
                                    .read(true)
                                    .write(true)
                                    .create(true)
                                    .truncate(true)
                                    .open(part_file(dir, idx))?,
                            );
                            tail.files.lock().unwrap().insert(idx, f.clone());
                            f
                        }
                    };
                    current = Some((idx, f.clone()));
                    f
                }
            };
            let n = rest.len().min((part_size - at) as usize);
            match direct.as_mut().map(|d| d.takes(idx, dir)) {
                Some(Ok(true)) => direct.as_mut().expect("taken").push(&rest[..n], pos)?,
                Some(Err(e)) => {
                    // Refused (at a part's first byte: nothing held back): this writer goes
                    // through the page cache from here on, and every later one where the file
                    // system does not take O_DIRECT.
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        if !s3.no_direct.swap(true, Ordering::Relaxed) {
                            tracing::warn!(dir = %dir.display(), "the scratch file system refuses O_DIRECT: fills spool through the page cache");
                        }
                    } else {
                        tracing::warn!(dir = %dir.display(), error = %e, "opening a spool file for direct I/O; this fill spools through the page cache");
                    }
                    *direct = None;
                    file.write_all_at(&rest[..n], at)?;
                }
                _ => file.write_all_at(&rest[..n], at)?,
            }
            rest = &rest[n..];
            pos += n as u64;
        }
    }
    // The batch's whole blocks are readable at once.
    if let Some(d) = direct.as_mut() {
        d.write(false)?;
    }
    Ok(())
}

fn part_file(dir: &std::path::Path, idx: usize) -> PathBuf {
    dir.join((idx + 1).to_string())
}

/// The local spool of part `idx`, cut to `want` bytes (`NotFound` when it has fewer); other
/// part files go. `None` when there is nothing to keep and no file.
async fn open_spool(dir: PathBuf, idx: usize, want: u64) -> std::io::Result<Option<Arc<File>>> {
    super::super::fs::blocking(move || {
        let file = part_file(&dir, idx);
        let mut out = None;
        if want > 0 || file.exists() {
            let f = std::fs::OpenOptions::new().read(true).write(true).create(want == 0).open(&file)?;
            let len = f.metadata()?.len();
            if len < want {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("ingest spool has {len} bytes, its state says {want}"),
                ));
            }
            f.set_len(want)?;
            out = Some(Arc::new(f));
        }
        for e in std::fs::read_dir(&dir)?.flatten() {
            let n: Option<usize> = e.file_name().to_str().and_then(|n| n.parse().ok());
            if n.is_some_and(|n| n != idx + 1) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(out)
    })
    .await
}

/// Builds the local spool of part `idx` anew from the state's pieces in the bucket (the
/// session was advanced by another process, or this one lost its spool), and marks it in step
/// with the state's revision. A missing or short piece makes the session unknown.
async fn rebuild_spool(s3: &S3, id: &IngestId, state: &S3State, idx: usize) -> StoreResult<Arc<File>> {
    use futures::TryStreamExt;
    use tokio::io::AsyncWriteExt;
    let dir = s3.spool_dir(id);
    match tokio::fs::remove_dir_all(&dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    tokio::fs::create_dir_all(&dir).await?;
    let mut f = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(part_file(&dir, idx))
        .await?;
    for p in &state.pieces {
        let key = layout::ingest_piece(id, p.start);
        let Some(r) = super::absent(s3.store.get(&s3.path(&key)).await)? else {
            tracing::warn!(ingest = %id, piece = p.start, "an upload's piece is missing: the session cannot resume");
            return Err(StoreError::UploadUnknown);
        };
        if p.etag.is_some() && r.meta.e_tag != p.etag {
            tracing::warn!(
                ingest = %id, piece = p.start, want = ?p.etag, got = ?r.meta.e_tag,
                "an upload's piece is not the one its state recorded: the session cannot resume"
            );
            return Err(StoreError::UploadUnknown);
        }
        let mut body = r.into_stream();
        let mut got = 0u64;
        while let Some(b) = body.try_next().await.map_err(io)? {
            got += b.len() as u64;
            if got > p.len {
                break;
            }
            f.write_all(&b).await?;
        }
        if got != p.len {
            tracing::warn!(ingest = %id, piece = p.start, got, want = p.len, "an upload's piece has the wrong size");
            return Err(StoreError::UploadUnknown);
        }
    }
    f.flush().await?;
    if s3.fsync {
        f.sync_data().await?;
    }
    let f = f.into_std().await;
    tokio::fs::write(dir.join(REV_FILE), &state.rev).await?;
    Ok(Arc::new(f))
}

/// Anonymous mappings of `part_size` bytes for parts in memory, each part's own while it is
/// sent. A part given back while others are still out is kept (at most [`PartPool::KEEP`])
/// for the next one: a commit's parts reuse a few mappings whose pages are already resident
/// instead of mapping and faulting in (and the kernel zeroing) 8 MiB per part. Once no part is
/// out and no writer is sending parts ([`PoolUse`]) every mapping is unmapped, so an idle
/// server holds none. Not the allocator: glibc raises
/// its mmap threshold after a large free, and parts freed on one thread's arena would then
/// stay resident beside new ones allocated on another's.
pub(super) struct PartPool {
    size: usize,
    inner: Mutex<Pool>,
}

struct Pool {
    /// Parts taken and not given back.
    out: usize,
    /// Writers sending parts now ([`PoolUse`]): a commit that sends one part at a time has
    /// none out between two, and should not map fresh memory for each.
    users: usize,
    free: Vec<Mapping>,
}

impl Pool {
    /// The mappings to unmap now: all of them once no part is out and no writer sends.
    fn idle(&mut self) -> Vec<Mapping> {
        match self.out == 0 && self.users == 0 {
            true => std::mem::take(&mut self.free),
            false => Vec::new(),
        }
    }
}

/// A writer sending parts: the pool keeps its mappings while any lives.
pub(super) struct PoolUse(Arc<PartPool>);

impl PoolUse {
    fn new(pool: &Arc<PartPool>) -> PoolUse {
        pool.inner.lock().unwrap().users += 1;
        PoolUse(pool.clone())
    }
}

impl Drop for PoolUse {
    fn drop(&mut self) {
        let unmap = {
            let mut p = self.0.inner.lock().unwrap();
            p.users -= 1;
            p.idle()
        };
        drop(unmap);
    }
}

/// A private anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (moved between threads whole).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping of `len` bytes; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, exactly once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl PartPool {
    /// Mappings kept for reuse while parts are out: a writer's [`PARTS_IN_FLIGHT`].
    const KEEP: usize = PARTS_IN_FLIGHT;

    pub(super) fn new(part_size: usize) -> PartPool {
        PartPool { size: part_size.max(1), inner: Mutex::new(Pool { out: 0, users: 0, free: Vec::new() }) }
    }

    /// A mapping for a part of `len` bytes (a kept one when it is large enough).
    fn take(self: &Arc<Self>, len: usize, slot: tokio::sync::OwnedSemaphorePermit) -> std::io::Result<PartBuf> {
        let kept = {
            let mut p = self.inner.lock().unwrap();
            p.out += 1;
            p.free.iter().position(|m| m.len >= len).map(|i| p.free.swap_remove(i))
        };
        let map = match kept {
            Some(m) => m,
            None => match Mapping::new(len.max(self.size)) {
                Ok(m) => m,
                Err(e) => {
                    self.inner.lock().unwrap().out -= 1;
                    return Err(e);
                }
            },
        };
        Ok(PartBuf { map: Some(map), len, pool: self.clone(), _slot: slot })
    }

    fn give(&self, map: Mapping) {
        let unmap = {
            let mut p = self.inner.lock().unwrap();
            p.out -= 1;
            if p.out == 0 && p.users == 0 {
                let mut all = p.idle();
                all.push(map);
                all
            } else if p.free.len() < Self::KEEP {
                p.free.push(map);
                Vec::new()
            } else {
                vec![map]
            }
        };
        drop(unmap);
    }

    /// Mappings kept now (tests).
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.inner.lock().unwrap().free.len()
    }
}

/// A part in memory while it is sent: a mapping of the [`PartPool`], given back (and its slot
/// of the budget released) when the last `Bytes` of it is dropped.
struct PartBuf {
    map: Option<Mapping>,
    len: usize,
    pool: Arc<PartPool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl PartBuf {
    /// The first `n` bytes of the whole mapping (`n` may exceed the part's length, up to the
    /// mapping's), for reads in whole blocks.
    fn room_mut(&mut self, n: usize) -> std::io::Result<&mut [u8]> {
        let m = self.map.as_ref().expect("held until drop");
        if n > m.len {
            return Err(std::io::Error::other(format!("a part buffer of {} bytes cannot take {n}", m.len)));
        }
        // SAFETY: the mapping is `m.len >= n` bytes, readable and writable, owned by `self`.
        Ok(unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), n) })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        let m = self.map.as_ref().expect("held until drop");
        // SAFETY: the mapping is at least `len` bytes, readable and writable, owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for PartBuf {
    fn as_ref(&self) -> &[u8] {
        let m = self.map.as_ref().expect("held until drop");
        // SAFETY: as in `as_mut`; no mutable borrow outlives the filling.
        unsafe { std::slice::from_raw_parts(m.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PartBuf {
    fn drop(&mut self) {
        if let Some(m) = self.map.take() {
            self.pool.give(m);
        }
    }
}

/// The first `len` bytes of a part file, in memory, holding one slot of the budget until the
/// payload is dropped.
async fn read_part(s3: &S3, file: Arc<File>, len: u64) -> StoreResult<PutPayload> {
    read_range(s3, file, 0, len).await
}

/// The first `len` bytes of a part file opened for direct I/O, as [`read_part`].
async fn read_part_direct(s3: &S3, file: Arc<File>, len: u64) -> StoreResult<PutPayload> {
    part_payload(s3, len, move |buf| read_direct(buf, &file, len as usize)).await
}

/// Reads the first `len` bytes of a part file opened for direct I/O into `buf`, in whole
/// blocks (the mapping is page-aligned), the last one up to the end of the file.
fn read_direct(buf: &mut PartBuf, file: &File, len: usize) -> std::io::Result<()> {
    let room = buf.room_mut(len.next_multiple_of(BLOCK))?;
    let mut pos = 0;
    while pos < len {
        match file.read_at(&mut room[pos..], pos as u64)? {
            0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "part spool shorter than written")),
            n => pos += n,
        }
    }
    Ok(())
}

/// `len` bytes from `at` of a part file, in memory, as [`read_part`].
async fn read_range(s3: &S3, file: Arc<File>, at: u64, len: u64) -> StoreResult<PutPayload> {
    part_payload(s3, len, move |buf| file.read_exact_at(buf.as_mut(), at)).await
}

/// A part of `len` bytes in memory, filled by `read` on the blocking pool: one slot of the
/// budget and a mapping of the pool, held until the payload is dropped.
async fn part_payload(
    s3: &S3,
    len: u64,
    read: impl FnOnce(&mut PartBuf) -> std::io::Result<()> + Send + 'static,
) -> StoreResult<PutPayload> {
    let slot = s3.budget.clone().acquire_owned().await.expect("the budget is never closed");
    let pool = s3.parts.clone();
    let buf = super::super::fs::blocking(move || {
        let mut buf = pool.take(len as usize, slot)?;
        read(&mut buf)?;
        Ok(buf)
    })
    .await?;
    Ok(PutPayload::from_bytes(Bytes::from_owner(buf)))
}

#[async_trait]
impl Writer for S3Writer {
    fn id(&self) -> IngestId {
        self.id
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn offset(&self) -> u64 {
        self.state.base.offset
    }

    fn readable(&self) -> u64 {
        self.landed()
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
            // The previous batch lands, this one is spooled while its full parts start.
            self.start_batch().await?;
            self.send_parts_now().await?;
        } else if self.spooling.as_ref().is_some_and(|j| j.is_finished()) {
            // Every batch landed: readers and the hasher see it, and an upload's full parts go.
            self.settle_batch().await?;
            self.send_parts_now().await?;
        } else if self.in_flight.front().is_some_and(|j| j.is_finished()) {
            // A part landed: the next one can go.
            self.send_parts_now().await?;
        }
        Ok(())
    }

    async fn checkpoint(&mut self) -> StoreResult<()> {
        self.spool_batch().await?;
        self.send_full_parts(true).await?;
        let idx = self.parts.len();
        let part_start = idx as u64 * self.s3.part_size;
        if self.s3.fsync {
            let current = self.tail.files.lock().unwrap().get(&idx).cloned();
            if let Some(f) = current {
                super::super::fs::blocking(move || f.sync_data()).await?;
            }
        }
        // The bytes of the part not sent yet go to the bucket as pieces, each byte once: the
        // state's pieces while their part is still the one being filled, plus one for the
        // bytes since (from the part's start when earlier parts were sent).
        let (mut pieces, obsolete) = if self.state.parts.len() == idx {
            (self.state.pieces.clone(), Vec::new())
        } else {
            (Vec::new(), self.state.pieces.clone())
        };
        let from = self.state.base.offset.max(part_start);
        if self.size > from {
            let etag = self.put_piece(idx, from, self.size - from).await?;
            pieces.push(Piece { start: from, len: self.size - from, etag });
        }
        self.state.parts = self.parts.clone();
        self.state.pieces = pieces;
        self.state.base.set_hash(self.size, self.hasher.as_ref().expect("settled"));
        self.save_state_hooked(Some("checkpoint.state_write")).await?;
        // Pieces of sent parts: no state names them any more. (One left by a crash here is
        // removed with the ingest.)
        for p in obsolete {
            let _ = self.s3.delete(&layout::ingest_piece(&self.id, p.start)).await;
        }
        if !self.keep_spool {
            // The parts below the checkpoint are in the bucket for good.
            let sent: Vec<usize> = self.tail.files.lock().unwrap().range(..idx).map(|(i, _)| *i).collect();
            let dir = self.s3.spool_dir(&self.id);
            for i in sent {
                self.tail.files.lock().unwrap().remove(&i);
                let _ = tokio::fs::remove_file(part_file(&dir, i)).await;
            }
        }
        Ok(())
    }

    async fn rollback(&mut self) -> StoreResult<()> {
        // No part of the abandoned chunk may land after this (it would replace a part sent
        // again later), nor any byte of it be spooled after the spool is cut back.
        let _ = self.settle_batch().await;
        self.drain_parts().await;
        self.batch.clear();
        self.batch_bytes = 0;
        let offset = self.state.base.offset;
        self.hasher = Some(self.state.base.hasher().ok_or(StoreError::UploadUnknown)?);
        self.parts = self.state.parts.clone();
        let idx = self.parts.len();
        let want = offset - idx as u64 * self.s3.part_size;
        let later: Vec<(usize, Arc<File>)> = {
            let mut files = self.tail.files.lock().unwrap();
            let later: Vec<usize> = files.range(idx + 1..).map(|(i, _)| *i).collect();
            later.iter().filter_map(|i| files.remove(i).map(|f| (*i, f))).collect()
        };
        let current = self.tail.files.lock().unwrap().get(&idx).cloned();
        let dir = self.s3.spool_dir(&self.id);
        super::super::fs::blocking(move || {
            if let Some(f) = current {
                f.set_len(want)?;
            }
            for (i, _) in later {
                let _ = std::fs::remove_file(part_file(&dir, i));
            }
            Ok(())
        })
        .await?;
        self.size = offset;
        self.landed.store(offset, Ordering::Release);
        Ok(())
    }

    async fn verify(mut self: Box<Self>, expected: &Digest, size: Option<u64>) -> StoreResult<Box<dyn Verified>> {
        // The hash is all a verdict needs: the parts still to send are waited for at the
        // commit, so a fill's readers get their last byte without waiting for the bucket.
        self.receiving = None;
        let res = async {
            self.spool_batch().await?;
            self.finish_spool().await?;
            self.send_parts_now().await
        }
        .await;
        if let Err(e) = res {
            let _ = self.remove().await;
            return Err(e);
        }
        let hasher = self.hasher.clone().expect("settled");
        let written = self.size;
        let actual = if hasher.algorithm() == expected.algorithm() {
            Ok(hasher.finish())
        } else {
            // A session hashed with sha256 finished with another algorithm's digest (rare):
            // hash its content again, from the spool or from the completed staging object.
            self.rehash(expected.algorithm()).await
        };
        let checked = match actual {
            Err(e) => Err(e),
            Ok(actual) => {
                if &actual != expected {
                    Err(StoreError::DigestMismatch { expected: expected.clone(), actual })
                } else if let Some(want) = size.filter(|&s| s != written) {
                    Err(StoreError::SizeMismatch { expected: want, actual: written })
                } else {
                    Ok(())
                }
            }
        };
        if let Err(e) = checked {
            let _ = self.remove().await;
            return Err(e);
        }
        Ok(Box::new(S3Verified { writer: self, digest: expected.clone() }))
    }

    async fn abort(mut self: Box<Self>) -> StoreResult<()> {
        self.remove().await
    }
}

/// Verified content, in the spool and the multipart upload, not yet visible.
struct S3Verified {
    writer: Box<S3Writer>,
    digest: Digest,
}

impl S3Verified {
    async fn publish(&mut self) -> StoreResult<()> {
        let w = &mut self.writer;
        let s3 = w.s3.clone();
        let blob = s3.path(&layout::blob(&self.digest));
        let idx = w.parts.len();
        let rest = w.size - idx as u64 * s3.part_size;
        if w.in_first_part_only() {
            // It fits in one part: one PUT of the verified spool under the final key (unless
            // there: first writer wins).
            w.record_commit(&self.digest).await?;
            let file = w.tail.files.lock().unwrap().get(&0).cloned();
            let payload = match file {
                Some(f) => read_part(&s3, f, rest).await?,
                None => PutPayload::new(),
            };
            s3.put_new(&blob, payload).await?;
            return Ok(());
        }
        if !w.completed {
            w.send_last_part().await?;
            crate::hooks::pause("commit.parts_sent").await;
            w.record_commit(&self.digest).await?;
            w.complete().await?;
        }
        let target = w.target();
        w.state.upload = None;
        if target != blob && s3.store.head(&blob).await.is_ok_and(|m| m.size == w.size) {
            // First writer wins: content in place is never replaced.
            tracing::debug!(digest = %self.digest, "content already stored: the new copy is dropped");
        } else if target != blob {
            // An upload: completed under its staging key, made visible by a server-side copy
            // (by parts past what one `CopyObject` may copy).
            if w.size > s3.max_copy_size {
                let upload = s3.store.create_multipart(&blob).await.map_err(io)?;
                let key = layout::blob(&self.digest).as_str().to_string();
                w.state.copy = Some(CopyUpload { key, upload: upload.clone() });
                // Recorded before the first part: the sweep can always find and abort it.
                w.save_state().await?;
                let parts = s3.copy_parts(&target, &blob, &upload, w.size).await?;
                s3.store.complete_multipart(&blob, &upload, parts).await.map_err(io)?;
                w.state.copy = None;
            } else {
                s3.store.copy(&target, &blob).await.map_err(io)?;
            }
            crate::hooks::pause("commit.after_copy").await;
        }
        if target != blob {
            w.state.committed = true;
            w.save_state().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Verified for S3Verified {
    fn size(&self) -> u64 {
        self.writer.size
    }

    async fn commit(mut self: Box<Self>) -> StoreResult<u64> {
        let res = self.publish().await;
        // Whatever the outcome, the ingest is done: the content is in place or not wanted.
        let removed = self.writer.remove().await;
        res?;
        removed?;
        Ok(self.writer.size)
    }

    async fn abort(mut self: Box<Self>) -> StoreResult<()> {
        self.writer.remove().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    #[test]
    fn part_mappings_are_reused_while_parts_are_out_and_all_unmapped_after() {
        let budget = Arc::new(tokio::sync::Semaphore::new(8));
        let slot = || budget.clone().try_acquire_owned().unwrap();
        let pool = Arc::new(PartPool::new(1 << 20));
        let mut a = pool.take(1 << 20, slot()).unwrap();
        a.as_mut().fill(7);
        let a_at = a.as_ref().as_ptr();
        let b = pool.take(100, slot()).unwrap();
        assert_eq!((a.as_ref().len(), b.as_ref().len()), (1 << 20, 100));
        drop(a);
        assert_eq!(pool.kept(), 1, "given back while another part is out: kept");
        // The next part gets the kept mapping (a short one too: every mapping is a part's size).
        let mut c = pool.take(4096, slot()).unwrap();
        assert_eq!(c.as_ref().as_ptr(), a_at);
        assert_eq!(pool.kept(), 0);
        c.as_mut().fill(1);
        assert_eq!(budget.available_permits(), 6);
        drop(c);
        drop(b);
        assert_eq!(pool.kept(), 0, "no part out: every mapping unmapped");
        assert_eq!(budget.available_permits(), 8, "the slots go back with the parts");
        let many: Vec<_> = (0..6).map(|_| pool.take(10, slot()).unwrap()).collect();
        let mut many = many.into_iter();
        let last = many.next().unwrap();
        drop(many);
        assert_eq!(pool.kept(), PartPool::KEEP, "at most KEEP kept");
        drop(last);
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn the_direct_spool_writes_whole_blocks_holds_the_rest_and_reads_back_exactly() {
        let dir = std::env::temp_dir().join(format!("stevedore-direct-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let part = 3 * BLOCK as u64;
        let size = part * 4 + 1000;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let mut d = DirectSpool::new(part);
        assert!(!d.takes(0, &dir).unwrap(), "the first part goes through the page cache");
        assert!(d.stage.is_none(), "nothing mapped until a part is spooled here");
        let mut buffered = BTreeMap::new();
        let mut pos = part;
        // Chunks of every awkward size, batches of a few chunks, as a fill's job gets them.
        let sizes = [1usize, 4095, 5000, 12000, 7, 4096, 8191, 3000, 1, 9000];
        let mut i = 0;
        while pos < size {
            for _ in 0..3 {
                let idx = (pos / part) as usize;
                let n = sizes[i % sizes.len()].min((part - pos % part) as usize).min((size - pos) as usize);
                i += 1;
                buffered.entry(idx).or_insert_with(|| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(part_file(&dir, idx))
                        .unwrap()
                });
                assert!(d.takes(idx, &dir).expect("the file system takes O_DIRECT (tmpfs does since Linux 6.6)"));
                d.push(&data[pos as usize..pos as usize + n], pos).unwrap();
                pos += n as u64;
                if pos == size {
                    break;
                }
            }
            d.write(false).unwrap();
            let readable = d.readable(pos);
            assert_eq!(
                readable,
                if pos.is_multiple_of(part) { pos } else { pos / BLOCK as u64 * BLOCK as u64 },
                "at {pos}"
            );
            // What is readable is in the part files (through the page cache, as followers read).
            if readable > part {
                let (idx, at) = ((readable - 1) / part, (readable - 1) % part);
                let mut b = [0u8; 1];
                buffered[&(idx as usize)].read_exact_at(&mut b, at).unwrap();
                assert_eq!(b[0], data[readable as usize - 1]);
            }
        }
        d.write(true).unwrap();
        assert_eq!(d.readable(size), size);
        for idx in 1..=4usize {
            let len = (size - idx as u64 * part).min(part) as usize;
            assert_eq!(buffered[&idx].metadata().unwrap().len(), len as u64, "part {idx} cut to size");
            let mut got = vec![0u8; len];
            buffered[&idx].read_exact_at(&mut got, 0).unwrap();
            assert!(got == data[idx * part as usize..idx * part as usize + len], "part {idx} through the page cache");
        }
        // The commit reads a part back in whole blocks into a part buffer: a full one, and
        // the last (its read stops at the end of the file).
        let pool = Arc::new(PartPool::new(part as usize));
        let budget = Arc::new(tokio::sync::Semaphore::new(3));
        let slot = || budget.clone().try_acquire_owned().unwrap();
        let mut full = pool.take(part as usize, slot()).unwrap();
        read_direct(&mut full, &d.files[&2], part as usize).unwrap();
        assert!(full.as_ref() == &data[2 * part as usize..3 * part as usize]);
        let mut last = pool.take(1000, slot()).unwrap();
        read_direct(&mut last, &d.files[&4], 1000).unwrap();
        assert!(last.as_ref() == &data[4 * part as usize..]);
        let mut short = pool.take(1001, slot()).unwrap();
        let err = read_direct(&mut short, &d.files[&4], 1001).expect_err("short");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_writer_sending_parts_keeps_the_mappings_between_its_parts() {
        let budget = Arc::new(tokio::sync::Semaphore::new(4));
        let slot = || budget.clone().try_acquire_owned().unwrap();
        let pool = Arc::new(PartPool::new(1 << 20));
        let using = PoolUse::new(&pool);
        let a = pool.take(1 << 20, slot()).unwrap();
        let at = a.as_ref().as_ptr();
        drop(a);
        assert_eq!(pool.kept(), 1, "no part out, but a writer still sends: kept");
        let b = pool.take(1 << 20, slot()).unwrap();
        assert_eq!(b.as_ref().as_ptr(), at, "its next part reuses the mapping");
        drop(b);
        drop(using);
        assert_eq!(pool.kept(), 0, "the last writer done and no part out: every mapping unmapped");
        let c = pool.take(10, slot()).unwrap();
        let other = PoolUse::new(&pool);
        drop(other);
        assert_eq!(pool.kept(), 0);
        drop(c);
        assert_eq!(pool.kept(), 0, "a part given back with no writer sending: unmapped");
    }

    fn state(offset: u64, pieces: &[(u64, u64)]) -> S3State {
        let mut base = IngestState::new(IngestKind::Upload { repo: "r".into() }, Algorithm::Sha256);
        base.offset = offset;
        S3State {
            base,
            upload: None,
            target: String::new(),
            parts: Vec::new(),
            committed: false,
            pieces: pieces.iter().map(|&(start, len)| Piece { start, len, etag: None }).collect(),
            rev: "r1".into(),
            updated_ms: 1,
            copy: None,
        }
    }

    #[test]
    fn pieces_must_cover_the_partial_part_exactly() {
        assert!(state(10, &[(0, 4), (4, 6)]).pieces_cover(0));
        assert!(state(10, &[]).pieces_cover(10));
        assert!(!state(10, &[(0, 4)]).pieces_cover(0), "short");
        assert!(!state(10, &[(0, 4), (5, 5)]).pieces_cover(0), "gap");
        assert!(!state(10, &[(0, 4), (4, 0), (4, 6)]).pieces_cover(0), "empty piece");
        assert!(!state(10, &[(2, 8)]).pieces_cover(0), "not from the part's start");
    }

    #[test]
    fn states_without_the_new_fields_still_decode() {
        let s = state(3, &[(0, 3)]);
        let mut v: serde_json::Value = serde_json::from_slice(&s.encode()).unwrap();
        for k in ["pieces", "rev", "updated_ms", "copy"] {
            v.as_object_mut().unwrap().remove(k);
        }
        let old = S3State::decode(&serde_json::to_vec(&v).unwrap()).expect("decodes");
        assert!(old.pieces.is_empty() && old.rev.is_empty() && old.updated_ms == 0 && old.copy.is_none());
        let back = S3State::decode(&s.encode()).unwrap();
        assert_eq!(back.pieces, s.pieces);
        assert_eq!(back.rev, "r1");
    }
}
