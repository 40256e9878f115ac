//! The streaming, single-flight, digest-verifying blob fill.
//!
//! One [`Fill`] per missing digest: a detached task GETs the blob from the upstream once and
//! writes every received chunk through the store's one [`Writer`] (the same writer uploads
//! use: hashed on the way in, an ingest with resumable state), while every client asking for
//! that digest meanwhile, the first and all followers, streams at its own pace: chunks not yet
//! written through are taken from memory without a copy (`recent`, shared by all), older
//! bytes are read back through the writer's [`TailReader`].
//! Readers never see a clean end of unverified bytes: every read holds its last byte back
//! until the writer has verified the whole blob's digest and size; on any failure before that,
//! every reader's stream breaks with an error. The commit (durable, visible under its digest)
//! follows the verification; new requests see the blob only once it is committed.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::cluster::Lease;
use crate::oci::{Digest, RepoName};
use crate::storage::{Repo, Store, StoreError, TailReader, Writer};
use crate::upstream::{Upstream, UpstreamError};

#[derive(Clone, Debug)]
pub enum FillState {
    Connecting,
    Streaming,
    /// Every byte was written and matches the digest and size; the commit is under way.
    /// Readers may finish.
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
    #[error("local store: {0}")]
    Store(Arc<StoreError>),
    #[error("fill took longer than the fill timeout")]
    Timeout,
    #[error("fill task ended unexpectedly")]
    Vanished,
    /// The fleet could not settle who fills the blob in time: try again.
    #[error("{0}")]
    Busy(String),
}

impl From<StoreError> for FillError {
    fn from(e: StoreError) -> FillError {
        match e {
            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. } => FillError::Mismatch(e.to_string()),
            e => FillError::Store(Arc::new(e)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// The blob's size, when the upstream announced it.
    pub size: Option<u64>,
    /// Bytes received so far: readable, from `recent` or through the writer's tail.
    pub received: u64,
    pub state: FillState,
}

pub struct Fill {
    /// Reads what the writer has written; set before the first byte is received.
    tail: OnceLock<Arc<dyn TailReader>>,
    progress: watch::Receiver<Progress>,
    /// Received chunks the writer has not yet written through, in order, by offset. A chunk
    /// leaves only once it is readable through `tail`, so every received byte is in one
    /// place or the other.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
    /// The cache repository the fill was started for (and links the blob into): a request of
    /// another repository joins only if the upstream has the blob there too.
    repo: Repo,
    /// Clients streaming the fill's bytes now (each [`Fill::read`] stream while it lives).
    readers: AtomicUsize,
}

/// One client streaming a fill: counted in [`Fill::readers`] while it lives.
struct Reading(Arc<Fill>);

impl Reading {
    fn new(fill: Arc<Fill>) -> Reading {
        fill.readers.fetch_add(1, Ordering::Relaxed);
        Reading(fill)
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for Reading {
    type Target = Fill;
    fn deref(&self) -> &Fill {
        &self.0
    }
}

/// Fills in flight, by digest.
#[derive(Clone, Default)]
pub struct Fills {
    map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
    /// Digests whose lease a request of this replica is claiming (before its fill exists):
    /// the receiver sees its sender dropped once the claim is decided.
    claims: Arc<Mutex<HashMap<Digest, watch::Receiver<()>>>>,
}

/// [`Fills::claiming`]'s answer.
pub enum Claiming {
    /// This request decides: claim the lease, start the fill (or not), then drop the guard.
    Mine(ClaimGuard),
    /// Another request of this replica is deciding: wait for it ([`Fills::wait_claim`]).
    Busy,
}

/// Marks a claim under way; dropping it ends the mark and wakes the waiters.
pub struct ClaimGuard {
    fills: Fills,
    digest: Digest,
    _tx: watch::Sender<()>,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.fills.claims.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.digest);
    }
}

/// What a fill needs to run.
pub struct FillRequest {
    pub store: Arc<Store>,
    pub upstream: Arc<Upstream>,
    pub remote: RepoName,
    pub cache_repo: Repo,
    pub digest: Digest,
    pub timeout: Duration,
    /// The fleet's lease on this fill (`fill:<digest>`), held until the fill ends; `None`
    /// alone (no Redis, or it did not answer).
    pub lease: Option<Lease>,
}

/// Ends a fill's life however its task ends (including a panic): the entry leaves the map,
/// and readers waiting on a fill that never finished see a failure.
struct Ending {
    fills: Fills,
    digest: Digest,
    fill: Arc<Fill>,
    tx: watch::Sender<Progress>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let mut map = self.fills.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.digest).is_some_and(|f| Arc::ptr_eq(f, &self.fill)) {
            map.remove(&self.digest);
        }
        drop(map);
        self.tx.send_if_modified(|p| match p.state {
            FillState::Verified | FillState::Committed | FillState::Failed(_) => false,
            _ => {
                p.state = FillState::Failed(FillError::Vanished);
                true
            }
        });
    }
}

impl Fills {
    /// Joins the fill of `req.digest`, starting it if none is running. `true` when this call
    /// started it. Does no I/O: the fill's task opens its writer.
    pub fn join_or_start(&self, req: FillRequest) -> (Arc<Fill>, bool) {
        let mut map = self.map.lock().unwrap();
        if let Some(f) = map.get(&req.digest) {
            return (f.clone(), false);
        }
        let (tx, rx) = watch::channel(Progress { size: None, received: 0, state: FillState::Connecting });
        let fill = Arc::new(Fill {
            tail: OnceLock::new(),
            progress: rx,
            recent: Mutex::default(),
            repo: req.cache_repo.clone(),
            readers: AtomicUsize::new(0),
        });
        map.insert(req.digest.clone(), fill.clone());
        let ending = Ending { fills: self.clone(), digest: req.digest.clone(), fill: fill.clone(), tx };
        crate::metrics::fill_started();
        // A child of the request that started the fill (its followers are not recorded).
        let span = crate::trace_span!("fill", digest = %req.digest, upstream = %req.upstream.host, bytes = tracing::field::Empty);
        let fill_span = span.clone();
        let task = async move {
            let mut req = req;
            let started = Instant::now();
            let outcome = run(&req, &ending).await;
            crate::metrics::fill_finished(&req.upstream.host, outcome.is_ok(), started.elapsed());
            match outcome {
                Ok(size) => {
                    fill_span.record("bytes", size);
                    tracing::info!(digest = %req.digest, size, upstream = %req.upstream.host, ms = started.elapsed().as_millis() as u64, "fill committed");
                    ending.tx.send_modify(|p| p.state = FillState::Committed);
                }
                Err(e) => {
                    tracing::warn!(digest = %req.digest, upstream = %req.upstream.host, error = %e, "fill failed");
                    ending.tx.send_modify(|p| p.state = FillState::Failed(e));
                    ending.fill.recent.lock().unwrap().clear();
                }
            }
            // The fleet may claim the digest again: the blob is visible (or the fill failed).
            if let Some(lease) = req.lease.take() {
                if lease.lost() {
                    tracing::warn!(digest = %req.digest, "the fill's lease expired while it ran (redis unreachable, or the fill stalled); another replica may have fetched the blob too");
                    crate::metrics::cluster_fill_lease_lost();
                }
                lease.release().await;
            }
            drop(ending);
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
        (fill, true)
    }

    /// The fills in flight, for `/status`: digest, repository, bytes received so far, and
    /// followers (clients streaming it besides the first).
    pub fn snapshot(&self) -> Vec<(Digest, String, u64, usize)> {
        let map = self.map.lock().unwrap();
        map.iter()
            .map(|(d, f)| {
                let followers = f.readers.load(Ordering::Relaxed).saturating_sub(1);
                (d.clone(), f.repo.to_string(), f.progress.borrow().received, followers)
            })
            .collect()
    }

    /// Number of fills in flight.
    pub fn in_flight(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// The fill of `d` in flight on this replica, if any.
    pub fn get(&self, d: &Digest) -> Option<Arc<Fill>> {
        self.map.lock().unwrap().get(d).cloned()
    }

    /// Marks that this request claims the lease of `d`, unless another request of this
    /// replica already does.
    pub fn claiming(&self, d: &Digest) -> Claiming {
        let mut claims = self.claims.lock().unwrap();
        if claims.contains_key(d) {
            return Claiming::Busy;
        }
        let (tx, rx) = watch::channel(());
        claims.insert(d.clone(), rx);
        Claiming::Mine(ClaimGuard { fills: self.clone(), digest: d.clone(), _tx: tx })
    }

    /// Waits (at most `limit`) until no request of this replica is claiming `d`.
    pub async fn wait_claim(&self, d: &Digest, limit: Duration) {
        let rx = self.claims.lock().unwrap().get(d).cloned();
        if let Some(mut rx) = rx {
            // `changed` fails once the guard (the sender) is dropped; nothing is ever sent.
            let _ = tokio::time::timeout(limit, rx.changed()).await;
        }
    }
}

/// Opens the writer, streams the upstream body through it (bounded by the fill timeout),
/// verifies, tells the readers, commits and links.
async fn run(req: &FillRequest, ending: &Ending) -> Result<u64, FillError> {
    if req.upstream.offline {
        return Err(UpstreamError::Offline.into());
    }
    // In use until committed and linked: eviction never takes content being filled.
    let _in_use = req.store.hold(&req.digest);
    let mut writer = req.store.begin_fill(&req.digest).await.inspect_err(|e| {
        if e.is_full() {
            req.store.space_needed();
        }
    })?;
    let _ = ending.fill.tail.set(writer.tail());
    let streamed = match tokio::time::timeout(req.timeout, stream(req, ending, writer.as_mut())).await {
        Ok(r) => r,
        Err(_) => Err(FillError::Timeout),
    };
    let size = match streamed {
        Ok(size) => size,
        Err(e) => {
            if matches!(&e, FillError::Store(s) if s.is_full()) {
                req.store.space_needed();
            }
            if let Err(a) = writer.abort().await {
                tracing::warn!(digest = %req.digest, error = %a, "removing a failed fill's ingest");
            }
            return Err(e);
        }
    };
    let verified = writer.verify(&req.digest, size).await?;
    crate::metrics::upstream_bytes(&req.upstream.host, verified.size());
    // The bytes are verified: readers may end their streams while the data is made durable.
    ending.tx.send_modify(|p| p.state = FillState::Verified);
    // Committed and linked under one guard: eviction cannot take it in between.
    let size = req.store.publish_linked(verified, &req.digest, &req.cache_repo).await?;
    Ok(size)
}

/// GETs the blob and writes it through `w`, sharing each chunk with the readers. Returns the
/// size the upstream announced.
async fn stream(req: &FillRequest, ending: &Ending, w: &mut dyn Writer) -> Result<Option<u64>, FillError> {
    let s = req.upstream.blob_get(&req.remote, &req.digest).await?;
    let size = s.resp.content_length();
    ending.tx.send_modify(|p| {
        p.size = size;
        p.state = FillState::Streaming;
    });
    let fill = &ending.fill;
    let mut received = 0u64;
    let mut body = s.resp.bytes_stream();
    let begun = Instant::now();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::Unreachable(format!("blob body: {e}")))?;
        received += chunk.len() as u64;
        if let Some(rate) = test_fill_rate() {
            let due = Duration::from_secs_f64(received as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(begun.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if size.is_some_and(|n| received > n) {
            return Err(FillError::Mismatch("more bytes than Content-Length".into()));
        }
        // Readers may take the chunk at once; the writer hashes and writes it in its batch.
        fill.recent.lock().unwrap().push_back((received - chunk.len() as u64, chunk.clone()));
        ending.tx.send_modify(|p| p.received = received);
        w.write(chunk).await?;
        fill.forget_readable(w.readable());
    }
    Ok(size)
}

/// At most this many bytes a second per fill, for tests that must act while a fill runs
/// (`STEVEDORE_TEST_FILL_BYTES_PER_SEC`); never set in production.
fn test_fill_rate() -> Option<u64> {
    static RATE: OnceLock<Option<u64>> = OnceLock::new();
    *RATE.get_or_init(|| {
        std::env::var("STEVEDORE_TEST_FILL_BYTES_PER_SEC").ok().and_then(|v| v.parse().ok()).filter(|r| *r > 0)
    })
}

impl Fill {
    /// The cache repository this fill was started for.
    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// Drops the chunks that are now readable through the tail.
    fn forget_readable(&self, readable: u64) {
        let mut recent = self.recent.lock().unwrap();
        while recent.front().is_some_and(|(off, c)| off + c.len() as u64 <= readable) {
            recent.pop_front();
        }
    }

    /// Waits until the upstream answered: the size (if announced) is known, or the fill failed.
    pub async fn started(&self) -> Result<Option<u64>, FillError> {
        let mut rx = self.progress.clone();
        let p =
            rx.wait_for(|p| !matches!(p.state, FillState::Connecting)).await.map_err(|_| FillError::Vanished)?.clone();
        match p.state {
            FillState::Failed(e) => Err(e),
            _ => Ok(p.size),
        }
    }

    /// Bytes received so far and the size, if the upstream announced it (progress display).
    pub fn progress(&self) -> (u64, Option<u64>) {
        let p = self.progress.borrow();
        (p.received, p.size)
    }

    /// Waits until the fill is over: the blob committed and linked, or the fill failed.
    pub async fn finished(&self) -> Result<(), FillError> {
        let mut rx = self.progress.clone();
        let p = rx
            .wait_for(|p| matches!(p.state, FillState::Committed | FillState::Failed(_)))
            .await
            .map_err(|_| FillError::Vanished)?
            .clone();
        match p.state {
            FillState::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Bytes from `pos` on, short of `hi` (received bytes): a slice of a chunk still in
    /// `recent` (no copy), else a read through the writer's tail up to where `recent` begins.
    async fn next_chunk(&self, pos: u64, hi: u64) -> io::Result<Bytes> {
        let tail_end = {
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
        let Some(tail) = self.tail.get() else {
            return Err(io::Error::other("fill has no writer"));
        };
        tail.read(pos, tail_end).await
    }

    /// The bytes `start..end` (to the blob's end when `end` is `None`) as they arrive.
    pub fn read(self: Arc<Self>, start: u64, end: Option<u64>) -> impl Stream<Item = io::Result<Bytes>> + Send {
        let rx = self.progress.clone();
        futures::stream::unfold((Reading::new(self), rx, start, false), move |(fill, mut rx, pos, done)| async move {
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
                // Every read keeps its last byte back until the verification, so no reader
                // (whole blob or range) sees a clean end of bytes that were not verified.
                let mut hi = p.received;
                if let Some(l) = limit {
                    hi = hi.min(if committed { l } else { l.saturating_sub(1) });
                }
                if pos < hi {
                    let res = match fill.next_chunk(pos, hi).await {
                        Ok(b) if b.is_empty() => {
                            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "ingest shorter than received"))
                        }
                        other => other,
                    };
                    return match res {
                        Ok(b) => {
                            let next = pos + b.len() as u64;
                            Some((Ok(b), (fill, rx, next, false)))
                        }
                        Err(e) => {
                            tracing::warn!(offset = pos, error = %e, "reading a fill's ingest failed; the client's stream is cut");
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
