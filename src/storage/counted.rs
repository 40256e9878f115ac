//! Counts every call across the storage seam (`stevedore_backend_requests_total{backend,op,
//! purpose}`): a wrapper around the backend that [`super::Store`] always talks through.
//!
//! One count per call of a [`Backend`] method: on S3 most are one request (a `walk` or a
//! `list` is one call however many pages it reads; a writer's parts are counted at its
//! creation, resumption and commit). The heartbeat's calls run under [`heartbeat`] and are
//! counted apart (`purpose="heartbeat"`), so an idle server's own cost is read directly.
//!
//! Its writers also keep the bytes each ingest holds ([`super::inflight`]).

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::backend::{Backend, ByteStream, Hold, IngestId, IngestStatus, Verified, Writer, WriterOptions};
use super::inflight::{Inflight, Slot};
use super::layout::Key;
use super::{StoreError, StoreResult};
use crate::oci::Digest;

tokio::task_local! {
    static PURPOSE: &'static str;
}

/// Runs `f` with its backend calls counted as the heartbeat's.
pub async fn heartbeat<F: Future>(f: F) -> F::Output {
    PURPOSE.scope("heartbeat", f).await
}

/// The backend, counted.
pub struct Counted {
    inner: Arc<dyn Backend>,
    inflight: Arc<Inflight>,
}

impl Counted {
    pub(crate) fn new(inner: Arc<dyn Backend>, inflight: Arc<Inflight>) -> Counted {
        Counted { inner, inflight }
    }

    /// `inner`, counted, its bytes kept in the ingest's slot from `size()` on.
    fn writer(&self, inner: Box<dyn Writer>) -> Box<dyn Writer> {
        let slot = self.inflight.slot(inner.id());
        self.inflight.set(&slot, inner.size());
        Box::new(CountedWriter { inner, backend: self.inner.kind(), inflight: self.inflight.clone(), slot })
    }

    fn verified(&self, id: IngestId, inner: Box<dyn Verified>) -> Box<dyn Verified> {
        Box::new(CountedVerified { inner, backend: self.inner.kind(), id, inflight: self.inflight.clone() })
    }

    fn count(&self, op: &'static str) {
        crate::metrics::backend_request(self.inner.kind(), op, purpose());
    }
}

/// A verified ingest whose commit is counted.
struct CountedVerified {
    inner: Box<dyn Verified>,
    backend: &'static str,
    id: IngestId,
    inflight: Arc<Inflight>,
}

#[async_trait]
impl Verified for CountedVerified {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn commit(self: Box<Self>) -> StoreResult<u64> {
        crate::metrics::backend_request(self.backend, "commit", purpose());
        let (id, inflight) = (self.id, self.inflight.clone());
        let r = self.inner.commit().await;
        // Whatever the outcome the ingest is done: in place, or not wanted (a failed commit's
        // leftovers are the sweep's).
        inflight.forget(&id);
        r
    }
    async fn abort(self: Box<Self>) -> StoreResult<()> {
        let (id, inflight) = (self.id, self.inflight.clone());
        let r = self.inner.abort().await;
        inflight.forget(&id);
        r
    }
}

/// A writer whose checkpoints and commit are counted.
struct CountedWriter {
    inner: Box<dyn Writer>,
    backend: &'static str,
    inflight: Arc<Inflight>,
    slot: Slot,
}

impl CountedWriter {
    /// The ingest holds what the writer has accepted.
    fn note(&self) {
        self.inflight.set(&self.slot, self.inner.size());
    }
}

fn purpose() -> &'static str {
    PURPOSE.try_with(|p| *p).unwrap_or("serve")
}

#[async_trait]
impl Writer for CountedWriter {
    fn id(&self) -> IngestId {
        self.inner.id()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn offset(&self) -> u64 {
        self.inner.offset()
    }
    fn readable(&self) -> u64 {
        self.inner.readable()
    }
    fn tail(&self) -> Arc<dyn super::backend::TailReader> {
        self.inner.tail()
    }
    async fn write(&mut self, chunk: Bytes) -> StoreResult<()> {
        let r = self.inner.write(chunk).await;
        self.note();
        r
    }
    async fn checkpoint(&mut self) -> StoreResult<()> {
        crate::metrics::backend_request(self.backend, "checkpoint", purpose());
        let r = self.inner.checkpoint().await;
        self.note();
        r
    }
    async fn rollback(&mut self) -> StoreResult<()> {
        let r = self.inner.rollback().await;
        self.note();
        r
    }
    async fn verify(self: Box<Self>, expected: &Digest, size: Option<u64>) -> StoreResult<Box<dyn Verified>> {
        let CountedWriter { inner, backend, inflight, slot: _ } = *self;
        let id = inner.id();
        match inner.verify(expected, size).await {
            Ok(inner) => Ok(Box::new(CountedVerified { inner, backend, id, inflight })),
            Err(e) => {
                // A mismatch removes the ingest.
                if matches!(e, StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. }) {
                    inflight.forget(&id);
                }
                Err(e)
            }
        }
    }
    async fn abort(self: Box<Self>) -> StoreResult<()> {
        crate::metrics::backend_request(self.backend, "remove_ingest", purpose());
        let (id, inflight) = (self.inner.id(), self.inflight.clone());
        let r = self.inner.abort().await;
        inflight.forget(&id);
        r
    }
}

#[async_trait]
impl Backend for Counted {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn stat(&self, d: &Digest) -> StoreResult<Option<u64>> {
        self.count("stat");
        self.inner.stat(d).await
    }
    async fn read(&self, d: &Digest, start: u64, len: u64) -> StoreResult<Option<ByteStream>> {
        self.count("read");
        self.inner.read(d, start, len).await
    }
    async fn read_small(&self, d: &Digest) -> StoreResult<Option<Bytes>> {
        self.count("read");
        self.inner.read_small(d).await
    }
    async fn delete(&self, d: &Digest) -> StoreResult<bool> {
        self.count("delete");
        self.inner.delete(d).await
    }
    async fn walk(&self) -> StoreResult<Vec<(Digest, u64)>> {
        self.count("walk");
        self.inner.walk().await
    }
    async fn redirect_url(&self, d: &Digest) -> StoreResult<Option<String>> {
        self.inner.redirect_url(d).await
    }
    async fn create_writer(&self, id: IngestId, opts: WriterOptions, hold: Hold) -> StoreResult<Box<dyn Writer>> {
        self.count("create_writer");
        let inner = self.inner.create_writer(id, opts, hold).await?;
        Ok(self.writer(inner))
    }
    async fn resume_writer(&self, id: IngestId, batch_bytes: usize, hold: Hold) -> StoreResult<Box<dyn Writer>> {
        self.count("resume_writer");
        let inner = self.inner.resume_writer(id, batch_bytes, hold).await?;
        Ok(self.writer(inner))
    }
    async fn ingest_status(&self, id: IngestId) -> StoreResult<Option<IngestStatus>> {
        self.count("ingest_status");
        self.inner.ingest_status(id).await
    }
    async fn ingests(&self) -> StoreResult<Vec<IngestId>> {
        self.count("ingests");
        self.inner.ingests().await
    }
    async fn remove_ingest(&self, id: IngestId) -> StoreResult<()> {
        self.count("remove_ingest");
        self.inner.remove_ingest(id).await?;
        self.inflight.forget(&id);
        Ok(())
    }
    async fn resume_commit(&self, id: IngestId, hold: Hold) -> StoreResult<Option<Box<dyn Verified>>> {
        self.count("resume_commit");
        let v = self.inner.resume_commit(id, hold).await?;
        Ok(v.map(|inner| self.verified(id, inner)))
    }
    async fn get(&self, key: &Key) -> StoreResult<Option<(Bytes, SystemTime)>> {
        self.count("get");
        self.inner.get(key).await
    }
    async fn put(&self, key: &Key, value: &[u8]) -> StoreResult<()> {
        self.count("put");
        self.inner.put(key, value).await
    }
    async fn remove(&self, key: &Key) -> StoreResult<bool> {
        self.count("remove");
        self.inner.remove(key).await
    }
    async fn exists(&self, key: &Key) -> StoreResult<bool> {
        self.count("exists");
        self.inner.exists(key).await
    }
    async fn has(&self, key: &Key) -> StoreResult<bool> {
        self.count("has");
        self.inner.has(key).await
    }
    async fn list(&self, prefix: &Key) -> StoreResult<Vec<String>> {
        self.count("list");
        self.inner.list(prefix).await
    }
    async fn prune_empty(&self, under: &Key) -> StoreResult<()> {
        self.count("prune_empty");
        self.inner.prune_empty(under).await
    }
    async fn writable(&self) -> bool {
        self.count("writable");
        self.inner.writable().await
    }
    async fn readable(&self) -> bool {
        self.count("readable");
        self.inner.readable().await
    }
    async fn sweep_temporaries(&self, age: std::time::Duration) {
        self.count("sweep_temporaries");
        self.inner.sweep_temporaries(age).await
    }
}
