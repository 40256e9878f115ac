//! Upload sessions on top of the backend's writers: a session is an ingest whose kind names
//! its repository. The writer saves offset and hash state at every chunk boundary, so a
//! session survives a restart and finishing it never re-reads the data.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::backend::{IngestKind, IngestStatus, WriterOptions};
use super::ids::UploadId;
use super::{fill_lease, Claim, Lease};
use super::{Repo, Store, StoreError, StoreResult, Writer, UPLOAD_BATCH};
use crate::oci::{Algorithm, Digest};

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

    /// Takes the session's lock (in this process, and across the replicas sharing the store:
    /// the lease `upload:<id>`) and reopens it at its last checkpoint, wherever that was
    /// written. A request for a session another replica's request is writing waits for it, as
    /// one for a session another request of this replica is writing waits for that.
    pub async fn open_upload(&self, repo: &Repo, id: &UploadId) -> StoreResult<UploadWriter> {
        let guard = self.sessions.get(id).lock_owned().await;
        self.session(repo, id).await?;
        let lease = self.session_lease(id).await?;
        let w = self.backend.resume_writer(*id, UPLOAD_BATCH, Box::new((guard, lease))).await?;
        Ok(UploadWriter { id: *id, w })
    }

    /// The session's lease across the replicas, held while a request writes it (`None`
    /// without coordination). Waits while another replica holds it, at most [`SESSION_WAIT`].
    async fn session_lease(&self, id: &UploadId) -> StoreResult<Option<Lease>> {
        let Some(c) = self.fleet.get() else { return Ok(None) };
        let name = session_lease_name(id);
        let deadline = Instant::now() + SESSION_WAIT;
        let mut waited = false;
        let mut _waiting = None;
        loop {
            match c.claim(&name).await {
                Claim::Mine(lease) => {
                    if waited {
                        crate::metrics::cluster_wait("upload", "served");
                    }
                    return Ok(Some(lease));
                }
                Claim::Alone => return Ok(None),
                Claim::Held(_) => {
                    waited = true;
                    _waiting.get_or_insert_with(|| crate::metrics::cluster_waiting("upload"));
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        crate::metrics::cluster_wait("upload", "busy");
                        return Err(StoreError::SessionBusy);
                    }
                    c.wait_free(&name, left.min(c.wait_limit())).await;
                }
            }
        }
    }

    /// Finishes a session whose commit was cut short (the process died after the commit
    /// verified the content and recorded its digest and size in the session's state, before
    /// the session was removed): only for the digest recorded. If the content is in place, it
    /// is linked; if not, the recorded commit is carried out again (rename, or complete and
    /// copy) and linked. `false` when the session has no commit of `d` to finish.
    pub async fn recover_interrupted_commit(&self, repo: &Repo, id: &UploadId, d: &Digest) -> StoreResult<bool> {
        let guard = self.sessions.get(id).lock_owned().await;
        let Ok(_) = self.session(repo, id).await else { return Ok(false) };
        let lease = self.session_lease(id).await?;
        let Ok(s) = self.session(repo, id).await else { return Ok(false) };
        let Some((recorded, size)) = s.committing else { return Ok(false) };
        if &recorded != d {
            return Ok(false);
        }
        let hold: super::backend::Hold = Box::new((guard, lease));
        if self.backend.stat(d).await? != Some(size) {
            let Some(v) = self.backend.resume_commit(*id, hold).await? else { return Ok(false) };
            // Committed and linked under one guard: nothing removes it between the two.
            self.publish_linked(v, d, repo).await?;
            return Ok(true);
        }
        // Linked only if the content is still there under the guard (eviction may have run).
        if !self.link_blob(repo, d).await? {
            return Ok(false);
        }
        self.backend.remove_ingest(*id).await?;
        drop(hold);
        Ok(true)
    }

    /// Cancels a session and removes its data.
    pub async fn cancel_upload(&self, repo: &Repo, id: &UploadId) -> StoreResult<()> {
        let _guard = self.sessions.get(id).lock_owned().await;
        self.session(repo, id).await?;
        let _lease = self.session_lease(id).await?;
        self.session(repo, id).await?;
        self.backend.remove_ingest(*id).await
    }

    /// Every ingest in the store (upload sessions, and fills in progress or abandoned).
    pub async fn ingest_ids(&self) -> StoreResult<Vec<UploadId>> {
        self.backend.ingests().await
    }

    /// Removes ingests (upload sessions and abandoned fills) idle for longer than `ttl` and
    /// stray temporary objects. Ingests some writer of this process holds are left alone, and
    /// so are those another replica holds a lease for (an upload session a request is
    /// writing: `upload:<id>`; a fill: `fill:<digest>`): an ingest is removed by its idle time
    /// only, under its session lease. Returns how many ingests were removed.
    pub async fn sweep_uploads(&self, ttl: Duration) -> usize {
        self.backend.sweep_temporaries(Duration::from_secs(3600).min(ttl)).await;
        let Ok(ids) = self.backend.ingests().await else { return 0 };
        // The first sweep counts the ingests a previous process left (their recorded offsets;
        // this process's own writers count theirs): the listing is the sweep's anyway.
        let seed = !self.inflight.seeded.load(std::sync::atomic::Ordering::Acquire);
        let mut removed = 0;
        for id in ids {
            let lock = self.sessions.get(&id);
            let Ok(_guard) = lock.try_lock() else { continue };
            let Ok(status) = self.backend.ingest_status(id).await else { continue };
            if seed && !self.inflight.knows(&id) {
                if let Some(s) = &status {
                    let slot = self.inflight.slot(id);
                    self.inflight.set(&slot, s.offset);
                }
            }
            if !idle_for(status.as_ref(), ttl) {
                continue;
            }
            // Another replica's live work, seen through its lease.
            let mut _lease = None;
            if let Some(c) = self.fleet.get() {
                if let Some(IngestKind::Fill { digest }) = status.as_ref().map(|s| &s.kind) {
                    if c.holder(&fill_lease(digest)).await.is_some() {
                        continue;
                    }
                }
                match c.claim(&session_lease_name(&id)).await {
                    Claim::Held(_) => continue,
                    Claim::Mine(l) => _lease = Some(l),
                    Claim::Alone => {}
                }
                // Under the lease: idle still?
                match self.backend.ingest_status(id).await {
                    Ok(s) if idle_for(s.as_ref(), ttl) => {}
                    _ => continue,
                }
            }
            if self.backend.remove_ingest(id).await.is_ok() {
                removed += 1;
            }
        }
        if seed {
            self.inflight.seeded.store(true, std::sync::atomic::Ordering::Release);
        }
        removed
    }

    /// Bytes held by ingests (upload sessions, fills in progress or abandoned): kept as they
    /// are written, committed and removed (no backend request).
    pub fn ingest_bytes(&self) -> u64 {
        self.inflight.total()
    }
}

/// How long a request waits for another replica's request writing the same session.
const SESSION_WAIT: Duration = Duration::from_secs(600);

fn session_lease_name(id: &UploadId) -> String {
    format!("upload:{id}")
}

/// Whether an ingest (its status; `None`: no readable state, an ingest cut short while it was
/// created, or from an older version) has been idle for `ttl`.
fn idle_for(status: Option<&IngestStatus>, ttl: Duration) -> bool {
    match status {
        Some(s) => SystemTime::now().duration_since(s.updated_at).unwrap_or_default() >= ttl,
        None => true,
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
    /// commits it, links it into `repo` and ends the session (whatever the outcome). The
    /// commit and the link happen under the digest's shared guard (not the verification:
    /// no guard is held while bytes are read).
    pub async fn commit(self, store: &Store, repo: &Repo, expected: &Digest) -> StoreResult<u64> {
        let verified = self.w.verify(expected, None).await?;
        let mut reach = store.reach(&[expected]).await?;
        let size = store.publish_guarded(&mut reach, verified, expected).await?;
        crate::hooks::pause("commit.after_publish").await;
        store.link_guarded(&reach, repo, expected).await?;
        store.touch(expected);
        Ok(size)
    }
}
