//! Upload sessions on disk: `ingest/<uuid>/{data,state.json}`. The state (offset and the
//! serialised hash state) is saved at every chunk boundary, so a session survives a restart and
//! finishing it never re-reads the data.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use super::{read_opt, Ingest, Store, StoreError, StoreResult};
use crate::oci::{Algorithm, Digest, Hasher, RepoName};

/// An upload session's id: a UUID (v7, so sessions sort by age).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct UploadId(Uuid);

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

/// `state.json`: everything needed to resume without re-reading `data`.
#[derive(Serialize, Deserialize)]
struct State {
    v: u32,
    repo: String,
    started_at: u64,
    offset: u64,
    alg: String,
    hash: String,
}

impl State {
    fn hasher(&self) -> Option<Hasher> {
        let alg = match self.alg.as_str() {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return None,
        };
        let raw = base64::engine::general_purpose::STANDARD.decode(&self.hash).ok()?;
        Hasher::restore(alg, &raw)
    }
}

/// One writer per session at a time, in this process.
#[derive(Default)]
pub(super) struct Locks(Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    fn get(&self, id: &Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().unwrap().entry(*id).or_default().clone()
    }

    fn forget(&self, id: &Uuid) {
        self.0.lock().unwrap().remove(id);
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
    state: State,
    ingest: Ingest,
    _guard: OwnedMutexGuard<()>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Store {
    /// Starts a session in `repo`, hashing with `alg` (sha256 unless the digest is known).
    pub async fn create_upload(&self, repo: &RepoName, alg: Algorithm) -> StoreResult<UploadId> {
        let id = UploadId(Uuid::now_v7());
        let _guard = self.uploads.get(&id.0).lock_owned().await;
        tokio::fs::create_dir_all(self.layout.upload_dir(&id.0)).await?;
        let ingest = Ingest::create(&self.layout.upload_data(&id.0), alg, self.fsync).await?;
        let mut state = State {
            v: 1,
            repo: repo.to_string(),
            started_at: now_secs(),
            offset: 0,
            alg: alg.as_str().into(),
            hash: String::new(),
        };
        self.save_state(&id, &mut state, ingest.hasher()).await?;
        Ok(id)
    }

    async fn save_state(&self, id: &UploadId, state: &mut State, hasher: &Hasher) -> StoreResult<()> {
        state.hash = base64::engine::general_purpose::STANDARD.encode(hasher.save());
        let json = serde_json::to_vec(&*state).map_err(std::io::Error::other)?;
        self.write_atomic(&self.layout.upload_state(&id.0), &json).await
    }

    async fn load_state(&self, repo: &RepoName, id: &UploadId) -> StoreResult<State> {
        let raw = read_opt(&self.layout.upload_state(&id.0)).await?.ok_or(StoreError::UploadUnknown)?;
        let state: State = serde_json::from_slice(&raw).map_err(|_| StoreError::UploadUnknown)?;
        if state.v != 1 || state.repo != repo.as_str() {
            return Err(StoreError::UploadUnknown);
        }
        Ok(state)
    }

    /// The session's committed offset (bytes received at the last chunk boundary).
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> StoreResult<Upload> {
        let state = self.load_state(repo, id).await?;
        Ok(Upload { id: *id, offset: state.offset })
    }

    /// Takes the session's lock and reopens its data file at the saved offset.
    pub async fn open_upload(&self, repo: &RepoName, id: &UploadId) -> StoreResult<UploadWriter> {
        let guard = self.uploads.get(&id.0).lock_owned().await;
        let state = self.load_state(repo, id).await?;
        let hasher = state.hasher().ok_or(StoreError::UploadUnknown)?;
        let ingest = match Ingest::resume(&self.layout.upload_data(&id.0), hasher, state.offset, self.fsync).await {
            Ok(i) => i,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::UploadUnknown),
            Err(e) => return Err(e.into()),
        };
        Ok(UploadWriter { id: *id, state, ingest, _guard: guard })
    }

    /// Finishes a session whose commit was cut short (the process died after the verified
    /// data was renamed into `blobs/` but before the session was removed): if the blob is
    /// there with the session's size, links it and removes the session. `false` otherwise.
    pub async fn recover_interrupted_commit(&self, repo: &RepoName, id: &UploadId, d: &Digest) -> StoreResult<bool> {
        let _guard = self.uploads.get(&id.0).lock_owned().await;
        let Ok(state) = self.load_state(repo, id).await else { return Ok(false) };
        if super::exists(&self.layout.upload_data(&id.0)).await? || self.blob_size(d).await? != Some(state.offset) {
            return Ok(false);
        }
        self.link_blob(repo, d).await?;
        self.remove_upload(id).await;
        Ok(true)
    }

    /// Cancels a session and removes its files.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> StoreResult<()> {
        let guard = self.uploads.get(&id.0).lock_owned().await;
        self.load_state(repo, id).await?;
        self.remove_upload(id).await;
        drop(guard);
        Ok(())
    }

    async fn remove_upload(&self, id: &UploadId) {
        let _ = tokio::fs::remove_dir_all(self.layout.upload_dir(&id.0)).await;
        self.uploads.forget(&id.0);
    }

    /// Removes sessions idle for longer than `ttl` and stray temporary files. Returns how many
    /// sessions were removed.
    pub async fn sweep_uploads(&self, ttl: Duration) -> usize {
        self.remove_stale_tmp(Duration::from_secs(3600).min(ttl)).await;
        let Ok(mut rd) = tokio::fs::read_dir(self.layout.ingest_root()).await else { return 0 };
        let mut removed = 0;
        while let Ok(Some(e)) = rd.next_entry().await {
            let Ok(id) = e.file_name().to_string_lossy().parse::<UploadId>() else { continue };
            let lock = self.uploads.get(&id.0);
            let Ok(_guard) = lock.try_lock() else { continue };
            // Idle since the last checkpoint (state.json), or since creation if it has none.
            let mut idle = Duration::ZERO;
            for p in [self.layout.upload_state(&id.0), self.layout.upload_dir(&id.0)] {
                if let Ok(t) = tokio::fs::metadata(&p).await.and_then(|m| m.modified()) {
                    idle = t.elapsed().unwrap_or_default();
                    break;
                }
            }
            if idle < ttl {
                continue;
            }
            self.remove_upload(&id).await;
            removed += 1;
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
        self.state.offset
    }

    /// Bytes in the session including the chunk being written.
    pub fn size(&self) -> u64 {
        self.ingest.size()
    }

    pub async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.ingest.write(chunk).await
    }

    /// Ends a chunk: makes the data durable, then records the new offset and hash state.
    pub async fn checkpoint(&mut self, store: &Store) -> StoreResult<()> {
        self.ingest.flush(store.fsync).await?;
        self.state.offset = self.ingest.size();
        store.save_state(&self.id, &mut self.state, self.ingest.hasher()).await
    }

    /// Abandons the chunk being written: the session goes back to its last checkpoint.
    pub async fn rollback(self, store: &Store) -> StoreResult<()> {
        let UploadWriter { id, state, mut ingest, _guard } = self;
        // No write of this chunk may land after the cut.
        let _ = ingest.settle().await;
        drop(ingest);
        let f = tokio::fs::OpenOptions::new().write(true).open(store.layout.upload_data(&id.0)).await?;
        f.set_len(state.offset).await?;
        Ok(())
    }

    /// Verifies everything received against `expected`, commits it into `blobs/`, links it
    /// into the session's repository and ends the session (whatever the outcome).
    pub async fn commit(self, store: &Store, repo: &RepoName, expected: &Digest) -> StoreResult<u64> {
        let UploadWriter { id, ingest, _guard, .. } = self;
        let res = store.commit_ingest(ingest, expected, None).await;
        if res.is_ok() {
            store.link_blob(repo, expected).await?;
        }
        store.remove_upload(&id).await;
        res
    }
}
