//! The storage seam: what a backend (the filesystem today, object storage next) provides.
//!
//! The shape follows containerd's content store and Distribution's storage driver:
//! - **content** addressed by digest: stat, ranged streaming reads, delete, walk;
//! - **ingests**: a [`Writer`] under an id ([`IngestId`]) that hashes every byte on the way in,
//!   persists its resumable state at [`Writer::checkpoint`], can be reopened by id after a
//!   restart, and makes content visible only through [`Writer::verify`] →
//!   [`Verified::commit`], which check size and digest against what *this writer* hashed;
//! - **metadata**: small objects under keys ([`Key`], drawn by [`super::layout`]): repository
//!   links, manifest revisions, tags (with their age), referrers, upload state.
//!
//! Nothing above this trait sees a path, a `File` or a backend type; [`super::Store`] builds
//! the registry's semantics (links, sessions, manifests, caches) on top of it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ids::UploadId;
use super::layout::Key;
use super::StoreResult;
use crate::oci::{Algorithm, Digest, Hasher};

/// A stream of content bytes. It ends with an error, never cleanly, when the content is
/// shorter than promised.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Something the writer keeps alive until every byte it accepted has landed (or been
/// abandoned), even past its own drop: the session lock of an upload, so that no write of a
/// dropped request can land after the next request on the same session has started.
pub type Hold = Box<dyn Send + Sync>;

pub use super::ids::IngestId;

/// What an ingest is for, persisted with its state so that it can be found, resumed or
/// cleaned up after a restart.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IngestKind {
    /// A client's upload session into a repository (its storage key, see [`super::Repo`]).
    Upload { repo: String },
    /// A pull-through fill of a known digest.
    Fill { digest: String },
}

/// How a writer is opened.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    pub kind: IngestKind,
    /// The algorithm hashed on the way in.
    pub alg: Algorithm,
    /// Received bytes are handed to the hashing and writing side in batches of about this
    /// size (one thread hop, one hash pass, one vectored write per batch).
    pub batch_bytes: usize,
}

/// An ingest's recorded state (as of its last checkpoint).
#[derive(Clone, Debug)]
pub struct IngestStatus {
    pub id: IngestId,
    pub kind: IngestKind,
    pub started_at: SystemTime,
    /// Bytes received at the last checkpoint.
    pub offset: u64,
    /// Last activity: the latest checkpoint or write.
    pub updated_at: SystemTime,
    /// Whether the ingest still holds data (a commit that was cut short by a crash leaves the
    /// state without data: the content was already moved into place).
    pub has_data: bool,
    /// The digest and size a commit verified and recorded before putting the content in place
    /// (see [`IngestState::commit`]): set, the ingest is only to be finished, never written.
    pub committing: Option<(Digest, u64)>,
}

/// Reads the bytes a writer has written so far (fill followers read a growing ingest).
#[async_trait]
pub trait TailReader: Send + Sync {
    /// Bytes from `pos` on, short of `end` (≤ [`Writer::readable`] when `end` was read);
    /// empty only past the end of what was written.
    async fn read(&self, pos: u64, end: u64) -> std::io::Result<Bytes>;
}

/// The one writer every way bytes come in goes through: uploads, fills, imports.
#[async_trait]
pub trait Writer: Send {
    fn id(&self) -> IngestId;
    /// Bytes accepted, including any not yet written through.
    fn size(&self) -> u64;
    /// Bytes received at the last checkpoint.
    fn offset(&self) -> u64;
    /// Bytes written through and readable with [`Writer::tail`].
    fn readable(&self) -> u64;
    /// A reader of the bytes written so far.
    fn tail(&self) -> Arc<dyn TailReader>;

    /// Appends bytes; they are hashed on the way in.
    async fn write(&mut self, chunk: Bytes) -> StoreResult<()>;
    /// Makes everything accepted durable and records the offset and hash state, so that the
    /// ingest resumes here after a restart.
    async fn checkpoint(&mut self) -> StoreResult<()>;
    /// Drops everything since the last checkpoint.
    async fn rollback(&mut self) -> StoreResult<()>;
    /// Checks everything written against `expected` (and `size`, if given) using the hash
    /// this writer computed on the way in. On a mismatch the ingest is removed.
    async fn verify(self: Box<Self>, expected: &Digest, size: Option<u64>) -> StoreResult<Box<dyn Verified>>;
    /// Removes the ingest and its data.
    async fn abort(self: Box<Self>) -> StoreResult<()>;
}

/// Verified content, not yet visible: [`Verified::commit`] makes it durable and visible under
/// its digest (a digest that is already there is success: same digest, same bytes) and
/// removes the ingest.
#[async_trait]
pub trait Verified: Send {
    fn size(&self) -> u64;
    async fn commit(self: Box<Self>) -> StoreResult<u64>;
    /// Drops verified content that is not wanted after all (an import that failed elsewhere):
    /// the ingest is removed. By default it is left to the sweep of idle ingests.
    async fn abort(self: Box<Self>) -> StoreResult<()> {
        Ok(())
    }
}

/// A storage backend.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The backend's name in metrics (`fs`, `s3`).
    fn kind(&self) -> &'static str {
        "other"
    }

    // --- content ---
    /// The size of committed content, `None` when absent.
    async fn stat(&self, d: &Digest) -> StoreResult<Option<u64>>;
    /// `len` bytes of committed content from `start`; `None` when absent.
    async fn read(&self, d: &Digest, start: u64, len: u64) -> StoreResult<Option<ByteStream>>;
    /// Small committed content in one piece (manifests); `None` when absent.
    async fn read_small(&self, d: &Digest) -> StoreResult<Option<Bytes>>;
    /// Removes committed content; `false` when it was not there.
    async fn delete(&self, d: &Digest) -> StoreResult<bool>;
    /// Every piece of committed content with its size.
    async fn walk(&self) -> StoreResult<Vec<(Digest, u64)>>;
    /// A URL the client may GET committed content from directly, if the backend hands them
    /// out (S3 with `storage.s3.redirect`: presigned, short-lived); `None` otherwise.
    async fn redirect_url(&self, _d: &Digest) -> StoreResult<Option<String>> {
        Ok(None)
    }

    // --- ingests ---
    /// Starts a new ingest. Its state is recorded before this returns.
    async fn create_writer(&self, id: IngestId, opts: WriterOptions, hold: Hold) -> StoreResult<Box<dyn Writer>>;
    /// Reopens an ingest at its last checkpoint ([`super::StoreError::UploadUnknown`] when
    /// there is none); bytes written after it are dropped.
    async fn resume_writer(&self, id: IngestId, batch_bytes: usize, hold: Hold) -> StoreResult<Box<dyn Writer>>;
    /// An ingest's recorded state.
    async fn ingest_status(&self, id: IngestId) -> StoreResult<Option<IngestStatus>>;
    /// Every ingest's id.
    async fn ingests(&self) -> StoreResult<Vec<IngestId>>;
    /// Removes an ingest (state and data) that no writer holds.
    async fn remove_ingest(&self, id: IngestId) -> StoreResult<()>;
    /// Reopens an ingest whose commit was recorded ([`IngestStatus::committing`]) and cut
    /// short before its content was in place: the content, verified when the record was
    /// written, ready to commit again. `None` when the ingest has no such record or its data
    /// is gone.
    async fn resume_commit(&self, id: IngestId, hold: Hold) -> StoreResult<Option<Box<dyn Verified>>>;

    // --- metadata ---
    /// A small object and when it was last written.
    async fn get(&self, key: &Key) -> StoreResult<Option<(Bytes, SystemTime)>>;
    /// Replaces a small object atomically.
    async fn put(&self, key: &Key, value: &[u8]) -> StoreResult<()>;
    /// Removes a small object; `false` when it was not there.
    async fn remove(&self, key: &Key) -> StoreResult<bool>;
    /// Whether anything exists under `key` (an object, or objects below it).
    async fn exists(&self, key: &Key) -> StoreResult<bool>;
    /// Whether the small object `key` exists (a link, a record), nothing below it looked at:
    /// on an object store one HEAD where [`Backend::exists`] may also list.
    async fn has(&self, key: &Key) -> StoreResult<bool> {
        self.exists(key).await
    }
    /// The names directly below `prefix` (objects and sub-prefixes), unsorted.
    async fn list(&self, prefix: &Key) -> StoreResult<Vec<String>>;
    /// Removes the directories at and below `under` that hold nothing, then its parents left
    /// empty, up to the top-level tree `under` is in (a filesystem: an object store keeps no
    /// directories). Undoes the creation of a repository's tree.
    async fn prune_empty(&self, _under: &Key) -> StoreResult<()> {
        Ok(())
    }

    /// Whether the backend accepts writes (a metric and a log line when not).
    async fn writable(&self) -> bool;
    /// Whether the backend can serve what it holds (readiness: a full store still serves).
    async fn readable(&self) -> bool {
        self.ingests().await.is_ok()
    }
    /// Removes temporary objects older than `age` left by crashes (never another process's
    /// live ones: only by age).
    async fn sweep_temporaries(&self, age: std::time::Duration);
}

/// A new ingest id (UUID v7).
pub fn new_ingest_id() -> IngestId {
    UploadId::from_uuid(Uuid::now_v7())
}

/// The persisted form of an ingest's state: everything needed to resume without re-reading the
/// data (`v: 2`; the hash state is `hazmat` serialisation, so a state that does not restore
/// makes the ingest unknown rather than wrong).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IngestState {
    pub v: u32,
    #[serde(flatten)]
    pub kind: IngestKind,
    pub started_at: u64,
    pub offset: u64,
    pub alg: String,
    pub hash: String,
    /// Written by a commit after it verified the content and before it puts the content in
    /// place (rename, complete, copy): the digest and the final size. A retried final request
    /// finds it and finishes the commit (or links what is in place); nothing writes the ingest
    /// any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitRecord>,
}

/// A commit's record in its ingest's state (see [`IngestState::commit`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitRecord {
    pub digest: String,
    pub size: u64,
}

impl IngestState {
    pub const VERSION: u32 = 2;

    pub fn new(kind: IngestKind, alg: Algorithm) -> IngestState {
        IngestState {
            v: IngestState::VERSION,
            kind,
            started_at: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            offset: 0,
            alg: alg.as_str().into(),
            hash: String::new(),
            commit: None,
        }
    }

    pub fn set_hash(&mut self, offset: u64, hasher: &Hasher) {
        use base64::Engine as _;
        self.offset = offset;
        self.hash = base64::engine::general_purpose::STANDARD.encode(hasher.save());
    }

    pub fn hasher(&self) -> Option<Hasher> {
        use base64::Engine as _;
        let alg = match self.alg.as_str() {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return None,
        };
        let raw = base64::engine::general_purpose::STANDARD.decode(&self.hash).ok()?;
        Hasher::restore(alg, &raw)
    }

    /// The recorded commit's digest and size, if any (an unparsable one: none).
    pub fn committing(&self) -> Option<(Digest, u64)> {
        let c = self.commit.as_ref()?;
        Some((c.digest.parse().ok()?, c.size))
    }

    pub fn started(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(self.started_at)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("ingest state serialises")
    }

    pub fn decode(raw: &[u8]) -> Option<IngestState> {
        let s: IngestState = serde_json::from_slice(raw).ok()?;
        (s.v == IngestState::VERSION).then_some(s)
    }
}
