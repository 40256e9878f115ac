//! The S3-compatible object-storage backend (through the `object_store` crate).
//!
//! Content and metadata are objects under `prefix`, at the keys [`super::layout`] draws
//! (`blobs/sha256/ab/ab…`, `repos/…/_layers/…`, `ingest/<id>/state.json`). `storage.root` is
//! local scratch only: the spool of every write in progress (`<root>/ingest/<id>/<part>`),
//! never content.
//!
//! - **Writers** ([`writer::S3Writer`]) hash on the way in and spool to the scratch disk in
//!   part files of `part_size`; each full part is sent as one part of a multipart upload
//!   (an upload session's as soon as it is spooled, a fill's at its commit, after its readers
//!   have every byte; up to four parts in flight per writer, each holding a slot of the process-wide part
//!   budget, so memory is bounded whatever the number of writers). The upload id, the parts' ETags, the
//!   offset and the hash state are in the ingest's state object in the bucket, written before
//!   the first part: a writer resumes after a restart, and the sweep can always find and abort
//!   an abandoned multipart upload. The bytes of the part not sent yet are in the bucket too
//!   (piece objects, written at each checkpoint), so a session resumes on any process that
//!   shares the bucket, or on this one with its scratch space lost.
//! - **Commit** happens only after the digest verified: a fill (digest known up front)
//!   completes its multipart upload under the blob's final key; an upload (digest learnt at
//!   the PUT) completes under its staging key `ingest/<id>/data` and is copied server-side to
//!   the final key: `CopyObject`, or past `max_copy_size` a multipart copy (`UploadPartCopy`
//!   by ranges, signed here with `object_store`'s `AwsAuthorizer`). Content that fits in one part is a single `PUT` of the
//!   verified spool under the final key. Same digest, same bytes: completing or copying over
//!   an existing blob is harmless.
//! - **Reads** stream ranged `GET`s (or, with `redirect`, the client is sent to a presigned
//!   GET URL). Fill followers read the spool ([`writer::S3Tail`]): a
//!   multipart upload is not readable before it completes.
//! - **Signing:** `object_store` hashes every payload for SigV4 (`x-amz-content-sha256`)
//!   unless told not to, a second SHA-256 over every byte beside the digest's own. Over TLS
//!   payloads are sent `UNSIGNED-PAYLOAD` (TLS protects them; the digest verifies them); over
//!   plain http (tests, `allow_http`) they are signed.

mod writer;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsAuthorizer};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::sync::Semaphore;

use super::backend::{Backend, ByteStream, Hold, IngestId, IngestStatus, Verified, Writer, WriterOptions};
use super::layout::{self, Key};
use super::{StoreError, StoreResult, UploadId};
use crate::config::{ConditionalPut, S3Config};
use crate::oci::Digest;

pub(super) use writer::S3State;

/// What the backend shares with its writers.
pub(super) struct S3 {
    store: Arc<AmazonS3>,
    /// `""` or `"some/prefix/"`.
    prefix: String,
    /// Local scratch space (`storage.root`).
    scratch: PathBuf,
    part_size: u64,
    /// Parts in memory at once, process-wide (`buffer_memory / part_size`).
    budget: Arc<Semaphore>,
    /// The mappings of parts in memory (see `writer::PartPool`).
    parts: Arc<writer::PartPool>,
    /// Writers taking bytes now (created or resumed, not verified yet), and until when (ms
    /// after `opened`) the last one to stop counts as busy still: meanwhile a fill's commit
    /// sends one part at a time (see `S3Writer::parts_in_flight`).
    receiving: std::sync::atomic::AtomicUsize,
    busy_until_ms: std::sync::atomic::AtomicU64,
    opened: std::time::Instant,
    /// The scratch file system refused `O_DIRECT` once: fills spool through the page cache
    /// (see `writer::DirectSpool`).
    no_direct: std::sync::atomic::AtomicBool,
    fsync: bool,
    /// Objects larger than this are copied by parts (`storage.s3.max_copy_size`).
    max_copy_size: u64,
    /// For the requests `object_store` has no call for (`UploadPartCopy`): the same client
    /// options (TLS, timeouts) and credentials as the store's own requests.
    http: HttpClient,
    bucket: String,
    region: String,
    sign_payload: bool,
    /// `storage.s3.redirect`: presigned GETs valid this long.
    redirect: Option<Duration>,
    /// Blobs are written with `If-None-Match: *` (`storage.s3.conditional_put`, detected at
    /// start-up with `auto`); else a HEAD before the write keeps a blob in place.
    conditional: bool,
}

/// The object-storage backend.
pub struct S3Backend(Arc<S3>);

impl S3Backend {
    /// Connects to the bucket (`cfg`); `scratch` is local scratch space (`storage.root`).
    pub async fn open(cfg: &S3Config, scratch: &FsPath, fsync: bool) -> anyhow::Result<S3Backend> {
        // reqwest is built without a crypto provider: ring, as for the upstream client.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = cfg.endpoint.is_empty() || cfg.endpoint.starts_with("https://");
        let client = ClientOptions::new()
            .with_allow_http(cfg.allow_http)
            .with_connect_timeout(Duration::from_secs(10))
            // A blob GET streams for as long as the client reads: no limit on a whole request,
            // only on silence.
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(60));
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_client_options(client.clone())
            .with_allow_http(cfg.allow_http)
            .with_unsigned_payload(tls);
        if !cfg.endpoint.is_empty() {
            b = b.with_endpoint(&cfg.endpoint).with_virtual_hosted_style_request(false);
        }
        if let Some((id, secret)) = cfg.credentials().map_err(|e| anyhow::anyhow!("storage.s3: {e}"))? {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b.build().map_err(|e| anyhow::anyhow!("storage.s3: {e}"))?;
        let http = ReqwestConnector::default().connect(&client).map_err(|e| anyhow::anyhow!("storage.s3: {e}"))?;
        let prefix = cfg.prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        tokio::fs::create_dir_all(scratch.join(layout::INGEST)).await?;
        let part_size = cfg.part_size.0;
        let slots = (cfg.buffer_memory.0 / part_size).max(1) as usize;
        let s3 = S3 {
            store: Arc::new(store),
            prefix,
            scratch: scratch.to_path_buf(),
            part_size,
            budget: Arc::new(Semaphore::new(slots)),
            receiving: std::sync::atomic::AtomicUsize::new(0),
            busy_until_ms: std::sync::atomic::AtomicU64::new(0),
            opened: std::time::Instant::now(),
            no_direct: std::sync::atomic::AtomicBool::new(false),
            parts: Arc::new(writer::PartPool::new(part_size as usize)),
            fsync,
            max_copy_size: cfg.max_copy_size.0,
            http,
            bucket: cfg.bucket.clone(),
            region: cfg.region.clone(),
            sign_payload: !tls,
            redirect: cfg.redirect.then_some(cfg.redirect_expiry),
            conditional: false,
        };
        // Fail at start-up, not at the first request, when the bucket cannot be reached.
        s3.store
            .list_with_delimiter(Some(&s3.path(&layout::root(layout::INGEST))))
            .await
            .map_err(|e| anyhow::anyhow!("storage.s3: bucket {:?}: {e}", cfg.bucket))?;
        let mut s3 = s3;
        s3.conditional = match cfg.conditional_put {
            ConditionalPut::Always => true,
            ConditionalPut::Never => false,
            ConditionalPut::Auto => probe_conditional_put(&s3.store, &s3.prefix).await,
        };
        if s3.conditional {
            tracing::info!(
                setting = ?cfg.conditional_put,
                "storage.s3: blobs are written with conditional writes (If-None-Match: *): content in place is never replaced"
            );
        } else {
            tracing::info!(
                setting = ?cfg.conditional_put,
                "storage.s3: no conditional writes: a HEAD before each blob write keeps content in place"
            );
        }
        Ok(S3Backend(Arc::new(s3)))
    }
}

impl S3 {
    fn path(&self, key: &Key) -> Path {
        Path::from(format!("{}{}", self.prefix, key.as_str()))
    }

    /// The local spool directory of an ingest.
    fn spool_dir(&self, id: &IngestId) -> PathBuf {
        self.scratch.join(layout::ingest_dir(id).as_str())
    }

    async fn head(&self, key: &Key) -> StoreResult<Option<object_store::ObjectMeta>> {
        absent(self.store.head(&self.path(key)).await)
    }

    async fn get(&self, key: &Key) -> StoreResult<Option<(Bytes, SystemTime)>> {
        let Some(r) = absent(self.store.get(&self.path(key)).await)? else { return Ok(None) };
        let modified: SystemTime = r.meta.last_modified.into();
        let Some(bytes) = absent(r.bytes().await)? else { return Ok(None) };
        Ok(Some((bytes, modified)))
    }

    async fn put(&self, key: &Key, value: Bytes) -> StoreResult<()> {
        self.store.put(&self.path(key), PutPayload::from_bytes(value)).await.map_err(io)?;
        Ok(())
    }

    async fn delete(&self, key: &Key) -> StoreResult<()> {
        absent(self.store.delete(&self.path(key)).await)?;
        Ok(())
    }

    /// Copies `from` (`size` bytes) into the multipart upload `upload` of `to` server-side,
    /// by parts (`UploadPartCopy`, a few at a time), and returns the parts to complete it with.
    /// Nothing passes through this process.
    async fn copy_parts(&self, from: &Path, to: &Path, upload: &str, size: u64) -> StoreResult<Vec<PartId>> {
        let part = copy_part_size(self.max_copy_size, size);
        let ranges: Vec<(usize, u64, u64)> =
            (0..size.div_ceil(part)).map(|i| (i as usize, i * part, ((i + 1) * part).min(size))).collect();
        futures::stream::iter(ranges)
            .map(|(i, start, end)| async move {
                Ok(PartId { content_id: self.upload_part_copy(to, upload, i, from, start, end).await? })
            })
            .buffered(COPY_PARTS_IN_FLIGHT)
            .try_collect()
            .await
    }

    /// One `UploadPartCopy` (part `idx` + 1 of `upload` on `to`: bytes `start..end` of `from`),
    /// retried a few times; the part's ETag. `object_store` has no call for it: the request is
    /// built here, signed (SigV4, the copy headers included) by `object_store`'s
    /// `AwsAuthorizer` with the store's credentials and sent by a client with the store's
    /// options.
    async fn upload_part_copy(
        &self,
        to: &Path,
        upload: &str,
        idx: usize,
        from: &Path,
        start: u64,
        end: u64,
    ) -> StoreResult<String> {
        let failed = |why: String| StoreError::Io(std::io::Error::other(format!("UploadPartCopy {to}: {why}")));
        // The store's own URL for `to` (path- or virtual-hosted style, encoded as it encodes).
        let mut url = self.store.signed_url(http::Method::PUT, to, Duration::from_secs(60)).await.map_err(io)?;
        url.set_query(None);
        url.query_pairs_mut().append_pair("partNumber", &(idx + 1).to_string()).append_pair("uploadId", upload);
        let source = format!("{}/{}", encode_key(&self.bucket), encode_key(from.as_ref()));
        let range = format!("bytes={start}-{}", end - 1);
        let mut last = String::new();
        for attempt in 0..COPY_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let credential = self.store.credentials().get_credential().await.map_err(io)?;
            let mut req = http::Request::builder()
                .method(http::Method::PUT)
                .uri(url.as_str())
                .header("x-amz-copy-source", &source)
                .header("x-amz-copy-source-range", &range)
                .body(HttpRequestBody::empty())
                .map_err(|e| failed(e.to_string()))?;
            AwsAuthorizer::new(&credential, "s3", &self.region)
                .with_sign_payload(self.sign_payload)
                .try_authorize(&mut req, None)
                .map_err(io)?;
            let res = match self.http.execute(req).await {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let status = res.status();
            let body = match res.into_body().bytes().await {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            // S3 may answer 200 and report a failure in the body.
            let etag = xml_value(&body, "ETag");
            match etag {
                Some(etag) if status.is_success() && !body.contains("<Error>") => return Ok(etag),
                _ if status.is_server_error() || status.is_success() || status.as_u16() == 429 => {
                    last = format!("{status}: {}", body.chars().take(300).collect::<String>());
                }
                _ => return Err(failed(format!("{status}: {}", body.chars().take(300).collect::<String>()))),
            }
        }
        Err(failed(last))
    }

    async fn state(&self, id: &IngestId) -> StoreResult<Option<(S3State, SystemTime)>> {
        let Some((raw, modified)) = self.get(&layout::ingest_state(id)).await? else { return Ok(None) };
        Ok(S3State::decode(&raw).map(|s| (s, modified)))
    }

    /// PUTs an object; its ETag.
    async fn put_payload(&self, key: &Key, payload: PutPayload) -> StoreResult<Option<String>> {
        Ok(self.store.put(&self.path(key), payload).await.map_err(io)?.e_tag)
    }

    /// PUTs an object unless one is in place (first writer wins): with `If-None-Match: *`
    /// where the store has conditional writes, else after a HEAD. `false` when it was there.
    async fn put_new(&self, path: &Path, payload: PutPayload) -> StoreResult<bool> {
        if self.conditional {
            let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
            return match self.store.put_opts(path, payload, opts).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
                Err(e) => Err(io(e)),
            };
        }
        if absent(self.store.head(path).await)?.is_some() {
            return Ok(false);
        }
        self.store.put(path, payload).await.map_err(io)?;
        Ok(true)
    }

    /// Aborts an ingest's multipart uploads (gone already is fine) and deletes its objects,
    /// its state last (so that a removal cut short is found again). With `all`, every object
    /// under `ingest/<id>/` (the staging object, pieces, any a crash left); else its state only.
    async fn remove_ingest_objects(&self, id: &IngestId, state: Option<&S3State>, all: bool) -> StoreResult<()> {
        if let Some(state) = state {
            if let Some(upload) = &state.upload {
                let _ =
                    self.store.abort_multipart(&Path::from(format!("{}{}", self.prefix, state.target)), upload).await;
            }
            if let Some(copy) = &state.copy {
                let _ =
                    self.store.abort_multipart(&Path::from(format!("{}{}", self.prefix, copy.key)), &copy.upload).await;
            }
        }
        let state_key = self.path(&layout::ingest_state(id));
        if all {
            let mut keys = Vec::new();
            let mut objects = self.store.list(Some(&self.path(&layout::ingest_dir(id))));
            while let Some(meta) = objects.try_next().await.map_err(io)? {
                if meta.location != state_key {
                    keys.push(meta.location);
                }
            }
            for key in keys {
                absent(self.store.delete(&key).await)?;
            }
        }
        absent(self.store.delete(&state_key).await)?;
        Ok(())
    }

    /// Removes an ingest: aborts its multipart uploads, deletes its objects and its spool.
    async fn remove_ingest(&self, id: &IngestId) -> StoreResult<()> {
        let state = self.state(id).await?;
        self.remove_ingest_objects(id, state.as_ref().map(|(s, _)| s), true).await?;
        match tokio::fs::remove_dir_all(self.spool_dir(id)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// `UploadPartCopy` requests in flight per copy.
const COPY_PARTS_IN_FLIGHT: usize = 8;
/// Tries of one `UploadPartCopy`.
const COPY_ATTEMPTS: u32 = 4;

/// The part size of a multipart copy of `size` bytes: at most `max_copy_size` and 256 MiB (a
/// part copy is one request that must answer within the read timeout), at least S3's 5 MiB,
/// and large enough for S3's 10,000 parts.
fn copy_part_size(max_copy_size: u64, size: u64) -> u64 {
    max_copy_size.clamp(5 << 20, 256 << 20).max(size.div_ceil(10_000))
}

/// A key or bucket name as `x-amz-copy-source` wants it: percent-encoded, `/` kept.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of the first `<tag>` in an S3 XML answer (quotes of an ETag included, as
/// `object_store` keeps them).
fn xml_value(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let rest = &xml[xml.find(&open)? + open.len()..];
    let value = &rest[..rest.find(&format!("</{tag}>"))?];
    Some(value.replace("&quot;", "\"").replace("&#34;", "\""))
}

/// Whether the store has conditional writes: two `PUT`s with `If-None-Match: *` of a probe key
/// (under `meta/`, removed after), the second refused with a precondition error.
async fn probe_conditional_put(store: &AmazonS3, prefix: &str) -> bool {
    let path = Path::from(format!("{prefix}{}/conditional-put-probe-{}", layout::META, uuid::Uuid::new_v4().simple()));
    let put = || {
        store.put_opts(
            &path,
            PutPayload::from_static(b"probe"),
            PutOptions { mode: PutMode::Create, ..PutOptions::default() },
        )
    };
    let second = match put().await {
        Ok(_) => put().await,
        Err(e) => Err(e),
    };
    let _ = store.delete(&path).await;
    match second {
        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => true,
        other => {
            tracing::debug!(answer = ?other.map(drop), "storage.s3: the conditional-write probe was not refused");
            false
        }
    }
}

/// An `object_store` error as an I/O error of the store.
fn io(e: object_store::Error) -> StoreError {
    let kind = match &e {
        object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
        _ => std::io::ErrorKind::Other,
    };
    StoreError::Io(std::io::Error::new(kind, e))
}

/// `None` for an object that is not there.
fn absent<T>(r: object_store::Result<T>) -> StoreResult<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// The last component of an object path or common prefix.
fn last_part(p: &Path) -> Option<String> {
    p.parts().next_back().map(|part| part.as_ref().to_string())
}

#[async_trait]
impl Backend for S3Backend {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn stat(&self, d: &Digest) -> StoreResult<Option<u64>> {
        Ok(self.0.head(&layout::blob(d)).await?.map(|m| m.size))
    }

    async fn read(&self, d: &Digest, start: u64, len: u64) -> StoreResult<Option<ByteStream>> {
        let path = self.0.path(&layout::blob(d));
        if len == 0 {
            // An empty range is not a valid `Range` header: only the object's existence counts.
            return Ok(
                absent(self.0.store.head(&path).await)?.map(|_| Box::pin(futures::stream::empty()) as ByteStream)
            );
        }
        let opts = GetOptions { range: Some(GetRange::Bounded(start..start + len)), ..GetOptions::default() };
        let Some(r) = absent(self.0.store.get_opts(&path, opts).await)? else { return Ok(None) };
        // The stream must end with an error, never cleanly, when the object is short.
        let body = r.into_stream().map_err(std::io::Error::other);
        let checked = futures::stream::unfold((body, 0u64, false), move |(mut body, got, done)| async move {
            if done {
                return None;
            }
            match body.next().await {
                Some(Ok(b)) => {
                    let got = got + b.len() as u64;
                    Some((Ok(b), (body, got, false)))
                }
                Some(Err(e)) => Some((Err(e), (body, got, true))),
                None if got < len => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "object shorter than its recorded size",
                    )),
                    (body, got, true),
                )),
                None => None,
            }
        });
        Ok(Some(Box::pin(checked)))
    }

    async fn read_small(&self, d: &Digest) -> StoreResult<Option<Bytes>> {
        Ok(self.0.get(&layout::blob(d)).await?.map(|(b, _)| b))
    }

    async fn delete(&self, d: &Digest) -> StoreResult<bool> {
        let key = layout::blob(d);
        if self.0.head(&key).await?.is_none() {
            return Ok(false);
        }
        self.0.delete(&key).await?;
        Ok(true)
    }

    async fn walk(&self) -> StoreResult<Vec<(Digest, u64)>> {
        let base = self.0.path(&layout::root(layout::BLOBS));
        let mut out = Vec::new();
        let mut list = self.0.store.list(Some(&base));
        while let Some(meta) = list.try_next().await.map_err(io)? {
            let parts: Vec<String> = meta.location.parts().map(|p| p.as_ref().to_string()).collect();
            let [.., alg, _, hex] = parts.as_slice() else { continue };
            if let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() {
                out.push((d, meta.size));
            }
        }
        Ok(out)
    }

    async fn redirect_url(&self, d: &Digest) -> StoreResult<Option<String>> {
        let Some(expiry) = self.0.redirect else { return Ok(None) };
        let url =
            self.0.store.signed_url(http::Method::GET, &self.0.path(&layout::blob(d)), expiry).await.map_err(io)?;
        Ok(Some(url.to_string()))
    }

    async fn create_writer(&self, id: IngestId, opts: WriterOptions, hold: Hold) -> StoreResult<Box<dyn Writer>> {
        Ok(Box::new(writer::S3Writer::create(self.0.clone(), id, opts, hold).await?))
    }

    async fn resume_writer(&self, id: IngestId, batch_bytes: usize, hold: Hold) -> StoreResult<Box<dyn Writer>> {
        Ok(Box::new(writer::S3Writer::resume(self.0.clone(), id, batch_bytes, hold).await?))
    }

    async fn ingest_status(&self, id: IngestId) -> StoreResult<Option<IngestStatus>> {
        let Some((state, modified)) = self.0.state(&id).await? else { return Ok(None) };
        // Last activity, as the state records it (millis); an older state has only its
        // Last-Modified, whole seconds rounded down: a second more never sweeps it early.
        let mut updated = match state.updated_ms {
            0 => modified + Duration::from_secs(1),
            ms => crate::storage::index::from_unix(ms),
        };
        // A chunk being received lands in the spool before the next checkpoint.
        if let Ok(mut rd) = tokio::fs::read_dir(self.0.spool_dir(&id)).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                if let Ok(t) = e.metadata().await.and_then(|m| m.modified()) {
                    updated = updated.max(t);
                }
            }
        }
        Ok(Some(IngestStatus {
            id,
            started_at: state.base.started(),
            offset: state.base.offset,
            updated_at: updated,
            has_data: !state.committed,
            committing: state.base.committing(),
            kind: state.base.kind,
        }))
    }

    async fn ingests(&self) -> StoreResult<Vec<IngestId>> {
        let names = self.list(&layout::root(layout::INGEST)).await?;
        Ok(names.iter().filter_map(|n| n.parse::<UploadId>().ok()).collect())
    }

    async fn remove_ingest(&self, id: IngestId) -> StoreResult<()> {
        self.0.remove_ingest(&id).await
    }

    async fn resume_commit(&self, id: IngestId, hold: Hold) -> StoreResult<Option<Box<dyn Verified>>> {
        writer::S3Writer::resume_commit(self.0.clone(), id, hold).await
    }

    async fn get(&self, key: &Key) -> StoreResult<Option<(Bytes, SystemTime)>> {
        self.0.get(key).await
    }

    async fn put(&self, key: &Key, value: &[u8]) -> StoreResult<()> {
        // One PUT replaces an object atomically.
        self.0.put(key, Bytes::copy_from_slice(value)).await
    }

    async fn remove(&self, key: &Key) -> StoreResult<bool> {
        if self.0.head(key).await?.is_none() {
            return Ok(false);
        }
        self.0.delete(key).await?;
        Ok(true)
    }

    async fn exists(&self, key: &Key) -> StoreResult<bool> {
        if self.0.head(key).await?.is_some() {
            return Ok(true);
        }
        let mut below = self.0.store.list(Some(&self.0.path(key)));
        Ok(below.try_next().await.map_err(io)?.is_some())
    }

    async fn has(&self, key: &Key) -> StoreResult<bool> {
        Ok(self.0.head(key).await?.is_some())
    }

    async fn list(&self, prefix: &Key) -> StoreResult<Vec<String>> {
        let r = self.0.store.list_with_delimiter(Some(&self.0.path(prefix))).await.map_err(io)?;
        let mut out: Vec<String> = r.common_prefixes.iter().filter_map(last_part).collect();
        out.extend(r.objects.iter().filter_map(|m| last_part(&m.location)));
        Ok(out)
    }

    async fn writable(&self) -> bool {
        let probe = layout::tmp();
        let ok = self.0.put(&probe, Bytes::from_static(b"ready")).await.is_ok();
        let _ = self.0.delete(&probe).await;
        ok
    }

    async fn readable(&self) -> bool {
        self.0.store.list_with_delimiter(Some(&self.0.path(&layout::root(layout::INGEST)))).await.is_ok()
    }

    /// Local spools older than `age` whose ingest has no state in the bucket (a fill cut
    /// short before its first part, a crash mid-removal).
    async fn sweep_temporaries(&self, age: Duration) {
        let Ok(mut rd) = tokio::fs::read_dir(self.0.scratch.join(layout::INGEST)).await else { return };
        while let Ok(Some(e)) = rd.next_entry().await {
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<UploadId>().ok()) else { continue };
            let old = e
                .metadata()
                .await
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() >= age)
                .unwrap_or(false);
            if old && matches!(self.0.head(&layout::ingest_state(&id)).await, Ok(None)) {
                let _ = tokio::fs::remove_dir_all(e.path()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_parts_fit_the_limits() {
        const MIB: u64 = 1 << 20;
        assert_eq!(copy_part_size(5 * MIB, 20 * MIB), 5 * MIB);
        assert_eq!(copy_part_size(5 << 30, 6 << 30), 256 * MIB);
        // Never below S3's minimum part, never more than 10,000 parts.
        assert_eq!(copy_part_size(MIB, 20 * MIB), 5 * MIB);
        let huge = 5u64 << 40;
        assert!(huge.div_ceil(copy_part_size(256 * MIB, huge)) <= 10_000);
    }

    #[test]
    fn copy_source_keys_are_encoded() {
        assert_eq!(encode_key("reg/ingest/0190-ab/data"), "reg/ingest/0190-ab/data");
        assert_eq!(encode_key("a b+c%/d"), "a%20b%2Bc%25/d");
    }

    #[test]
    fn part_copy_answers_are_read() {
        let xml = "<?xml version=\"1.0\"?><CopyPartResult><LastModified>x</LastModified>\
                   <ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag></CopyPartResult>";
        assert_eq!(xml_value(xml, "ETag").as_deref(), Some("\"9b2cf535f27731c974343645a3985328\""));
        assert_eq!(xml_value("<Error><Code>InternalError</Code></Error>", "ETag"), None);
    }
}
