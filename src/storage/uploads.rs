//! Upload sessions on top of the backend's writers: a session is an ingest whose kind names
//! its repository. The writer saves offset and hash state at every chunk boundary, so a
//! session survives a restart and finishing it never re-reads the data.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use uuid::Uuid;

use super::backend::{IngestKind, IngestStatus, WriterOptions};
use super::{Repo, Store, StoreError, StoreResult, Writer, UPLOAD_BATCH};
use crate::oci::{Algorithm, Digest};

/// An upload session's (and any ingest's) id: a UUID (v7, so sessions sort by age).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct UploadId(Uuid);

impl UploadId {
    pub fn from_uuid(u: Uuid) -> UploadId {
        UploadId(u)
    }
}

impl FromStr for UploadId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<UploadId, uuid::Error> {
        // Only the canonical hyphenated form, so one session has one URL.
        let u = Uuid::try_parse(s)?;
        if u.hyphenated().to_string() != s {
            return Err(Uuid::try_parse("!").unwrap_err());
        }
        Ok(UploadId(u))
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A session's public status.
#[derive(Clone, Copy, Debug)]
pub struct Upload {
    pub id: UploadId,
    pub offset: u64,
}

/// Exclusive access to a session for appending bytes.
pub struct UploadWriter {
    id: UploadId,
    w: Box<dyn Writer>,
}

fn upload_kind(repo: &Repo) -> IngestKind {
    IngestKind::Upload { repo: repo.to_string() }
}

impl Store {
    /// Starts a session in `repo`, hashing with `alg` (sha256 unless the digest is known).
    pub async fn create_upload(&self, repo: &Repo, alg: Algorithm) -> StoreResult<UploadId> {
        let (id, hold) = self.sessions.new_ingest().await;
        let opts = WriterOptions { kind: upload_kind(repo), alg, batch_bytes: UPLOAD_BATCH };
        self.backend.create_writer(id, opts, hold).await?;
        Ok(id)
    }

    /// The session's recorded state, if it is a session of `repo`.
    async fn session(&self, repo: &Repo, id: &UploadId) -> StoreResult<IngestStatus> {
        match self.backend.ingest_status(*id).await? {
            Some(s) if s.kind == upload_kind(repo) => Ok(s),
            _ => Err(StoreError::UploadUnknown),
        }
    }

    /// The session's committed offset (bytes received at the last chunk boundary).
    pub async fn upload_status(&self, repo: &Repo, id: &UploadId) -> StoreResult<Upload> {
        let s = self.session(repo, id).await?;
        Ok(Upload { id: *id, offset: s.offset })
    }

    /// Takes the session's lock and reopens it at its last checkpoint.
    pub async fn open_upload(&self, repo: &Repo, id: &UploadId) -> StoreResult<UploadWriter> {
        let guard = self.sessions.get(id).lock_owned().await;
        self.session(repo, id).await?;
        let w = self.backend.resume_writer(*id, UPLOAD_BATCH, Box::new(guard)).await?;
        Ok(UploadWriter { id: *id, w })
    }

    /// Finishes a session whose commit was cut short (the process died after the verified
    /// data was moved into place but before the session was removed): if the blob is there
    /// with the session's size, links it and removes the session. `false` otherwise.
    pub async fn recover_interrupted_commit(&self, repo: &Repo, id: &UploadId, d: &Digest) -> StoreResult<bool> {
        let _guard = self.sessions.get(id).lock_owned().await;
        let Ok(s) = self.session(repo, id).await else { return Ok(false) };
        if s.has_data || self.blob_size(d).await? != Some(s.offset) {
            return Ok(false);
        }
        self.link_blob(repo, d).await?;
        self.backend.remove_ingest(*id).await?;
        Ok(true)
    }

    /// Cancels a session and removes its data.
    pub async fn cancel_upload(&self, repo: &Repo, id: &UploadId) -> StoreResult<()> {
        let _guard = self.sessions.get(id).lock_owned().await;
        self.session(repo, id).await?;
        self.backend.remove_ingest(*id).await
    }

    /// Every ingest in the store (upload sessions, and fills in progress or abandoned).
    pub async fn ingest_ids(&self) -> StoreResult<Vec<UploadId>> {
        self.backend.ingests().await
    }

    /// Removes ingests (upload sessions and abandoned fills) idle for longer than `ttl` and
    /// stray temporary objects. Ingests some writer of this process holds are left alone.
    /// Returns how many ingests were removed.
    pub async fn sweep_uploads(&self, ttl: Duration) -> usize {
        self.backend.sweep_temporaries(Duration::from_secs(3600).min(ttl)).await;
        let Ok(ids) = self.backend.ingests().await else { return 0 };
        let mut removed = 0;
        for id in ids {
            let lock = self.sessions.get(&id);
            let Ok(_guard) = lock.try_lock() else { continue };
            let idle = match self.backend.ingest_status(id).await {
                Ok(Some(s)) => SystemTime::now().duration_since(s.updated_at).unwrap_or_default(),
                // No readable state: an ingest cut short while it was created, or from an
                // older version.
                Ok(None) => Duration::MAX,
                Err(_) => continue,
            };
            if idle >= ttl && self.backend.remove_ingest(id).await.is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

impl UploadWriter {
    pub fn id(&self) -> UploadId {
        self.id
    }

    /// Offset saved at the last chunk boundary.
    pub fn offset(&self) -> u64 {
        self.w.offset()
    }

    /// Bytes in the session including the chunk being written.
    pub fn size(&self) -> u64 {
        self.w.size()
    }

    pub async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        self.w.write(chunk).await
    }

    /// Ends a chunk: makes the data durable, then records the new offset and hash state.
    pub async fn checkpoint(&mut self) -> StoreResult<()> {
        self.w.checkpoint().await
    }

    /// Abandons the chunk being written: the session goes back to its last checkpoint.
    pub async fn rollback(mut self) -> StoreResult<()> {
        self.w.rollback().await
    }

    /// Verifies everything received against `expected` inside the writer that hashed it,
    /// commits it, links it into `repo` and ends the session (whatever the outcome).
    pub async fn commit(self, store: &Store, repo: &Repo, expected: &Digest) -> StoreResult<u64> {
        let size = store.commit(self.w, expected, None).await?;
        store.link_blob(repo, expected).await?;
        Ok(size)
    }
}
