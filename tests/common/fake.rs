//! A scripted fake upstream registry (axum on 127.0.0.1:0 inside the test process) for what a
//! real registry will not do on demand: wrong bytes, dropped connections, slow bodies, 503s,
//! Bearer challenges. Every request is recorded (method, path, query, some headers), so tests
//! can count exactly what Stevedore asked for.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::data::{bytes, sha256};
use super::http::hdr;
use super::oci::{MT_CONFIG, MT_LAYER_GZIP as MT_LAYER, MT_MANIFEST};
use serde_json::json;

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
    pub at: Instant,
}

/// How one blob GET is answered.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The bytes sent (not necessarily the blob's).
    pub body: Bytes,
    /// Announce `Content-Length: body.len()` (else chunked).
    pub content_length: bool,
    pub chunk: usize,
    /// Pause before every chunk but the first (and before a drop).
    pub delay: Duration,
    /// Break the connection after this many bytes.
    pub drop_after: Option<usize>,
    /// Stop after this many bytes until the gate opens (see [`Plan::hold_after`]).
    pub hold: Option<(usize, tokio::sync::watch::Receiver<bool>)>,
}

impl Plan {
    pub fn new(body: impl Into<Bytes>) -> Plan {
        Plan {
            body: body.into(),
            content_length: true,
            chunk: 256 * 1024,
            delay: Duration::ZERO,
            drop_after: None,
            hold: None,
        }
    }

    pub fn chunked(mut self) -> Plan {
        self.content_length = false;
        self
    }

    pub fn slow(mut self, chunk: usize, delay: Duration) -> Plan {
        self.chunk = chunk;
        self.delay = delay;
        self
    }

    pub fn drop_after(mut self, n: usize) -> Plan {
        self.drop_after = Some(n);
        self
    }

    /// Send `n` bytes, then nothing until `true` is sent on the returned gate: a fill that
    /// stays in progress for as long as a test needs, however slow the machine.
    pub fn hold_after(mut self, n: usize) -> (Plan, tokio::sync::watch::Sender<bool>) {
        let (open, gate) = tokio::sync::watch::channel(false);
        self.hold = Some((n, gate));
        (self, open)
    }
}

/// Bearer auth: every `/v2/…` request needs `Authorization: Bearer <token>`.
#[derive(Clone, Debug)]
pub struct Bearer {
    pub token: String,
    /// How long `/token` takes to answer (widens the window for concurrent fetches).
    pub delay: Duration,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Req>,
    /// (repo, tag) → manifest digest.
    tags: HashMap<(String, String), String>,
    /// digest → (media type, bytes).
    manifests: HashMap<String, (String, Bytes)>,
    /// digest → bytes.
    blobs: HashMap<String, Bytes>,
    /// digest → the only repository that has it (404 in every other; see [`Fake::blob_only_in`]).
    only_in: HashMap<String, String>,
    /// digest → plans for the next GETs (plain `blobs` once exhausted).
    plans: HashMap<String, VecDeque<Plan>>,
    /// digest → when the last byte of each complete GET answer was handed to the server.
    sent_all: HashMap<String, Vec<Instant>>,
    /// Answer every request with this status.
    fail_status: Option<u16>,
    bearer: Option<Bearer>,
    token_queries: Vec<String>,
    stopped: bool,
    /// digest → (seed, length) of a blob generated on the fly ([`Fake::add_generated_blob`]).
    generated: HashMap<String, (u64, u64)>,
    /// digest → gates for the next GETs of a generated blob ([`Fake::hold_generated`]).
    generated_holds: HashMap<String, VecDeque<(u64, tokio::sync::watch::Receiver<bool>)>>,
}

/// An image the fake serves: manifest, config and layers.
pub struct FakeImage {
    pub manifest: Vec<u8>,
    pub digest: String,
    /// (digest, bytes) of the config and every layer.
    pub blobs: Vec<(String, Vec<u8>)>,
}

pub struct FakeState {
    inner: Mutex<Inner>,
    addr: SocketAddr,
}

pub struct Fake {
    pub addr: SocketAddr,
    state: Arc<FakeState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FakeState { inner: Mutex::new(Inner::default()), addr });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Fake { addr, state, stop: Some(tx), task: Some(task) }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.state.inner.lock().unwrap())
    }

    /// Serves `bytes` as a manifest of `media_type`; returns its digest.
    pub fn add_manifest(&self, media_type: &str, bytes: &[u8]) -> String {
        let d = sha256(bytes);
        self.with(|i| i.manifests.insert(d.clone(), (media_type.to_string(), Bytes::copy_from_slice(bytes))));
        d
    }

    /// Serves `bytes` as the manifest named `digest` (wrong bytes, if they do not hash to it).
    pub fn add_manifest_as(&self, digest: &str, media_type: &str, bytes: &[u8]) {
        self.with(|i| i.manifests.insert(digest.to_string(), (media_type.to_string(), Bytes::copy_from_slice(bytes))));
    }

    /// Points `repo:tag` at manifest `digest`.
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        self.with(|i| i.tags.insert((repo.to_string(), tag.to_string()), digest.to_string()));
    }

    /// Serves `bytes` as a blob; returns its digest.
    pub fn add_blob(&self, bytes: &[u8]) -> String {
        let d = sha256(bytes);
        self.with(|i| i.blobs.insert(d.clone(), Bytes::copy_from_slice(bytes)));
        d
    }

    /// Adds an image with layers of `sizes` bytes to the fake and tags it `repo:tag`.
    pub fn add_image(&self, repo: &str, tag: &str, seed: u64, sizes: &[usize]) -> FakeImage {
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "config": {"Env": [format!("SEED={seed}")]},
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .unwrap();
        let layers: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, n)| bytes(seed * 1000 + i as u64, *n)).collect();
        let desc = |mt: &str, b: &[u8]| json!({"mediaType": mt, "digest": sha256(b), "size": b.len()});
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": desc(MT_CONFIG, &config),
            "layers": layers.iter().map(|l| desc(MT_LAYER, l)).collect::<Vec<_>>(),
        }))
        .unwrap();
        let digest = self.add_manifest(MT_MANIFEST, &manifest);
        self.set_tag(repo, tag, &digest);
        let mut blobs = vec![(self.add_blob(&config), config)];
        for l in layers {
            blobs.push((self.add_blob(&l), l));
        }
        FakeImage { manifest, digest, blobs }
    }

    /// `digest` exists in `repo` only: a HEAD or GET of it in any other repository is 404
    /// (as a registry with per-repository links answers).
    pub fn blob_only_in(&self, digest: &str, repo: &str) {
        self.with(|i| i.only_in.insert(digest.to_string(), repo.to_string()));
    }

    /// Serves the first `len` bytes of the stream `seed` ([`super::data::byte_stream`]) as a
    /// blob, generated on the fly for every GET: a blob of any size that neither the fake nor
    /// the test ever holds in memory. Returns its digest (hashed in 1 MiB pieces).
    pub fn add_generated_blob(&self, seed: u64, len: u64) -> String {
        let d = super::data::stream_digest(seed, 0, len);
        self.with(|i| i.generated.insert(d.clone(), (seed, len)));
        d
    }

    /// The next GET of generated blob `digest` sends `n` bytes, then nothing until `true` is
    /// sent on the returned gate (as [`Plan::hold_after`], for [`Fake::add_generated_blob`]).
    pub fn hold_generated(&self, digest: &str, n: u64) -> tokio::sync::watch::Sender<bool> {
        let (open, gate) = tokio::sync::watch::channel(false);
        self.with(|i| i.generated_holds.entry(digest.to_string()).or_default().push_back((n, gate)));
        open
    }

    /// Queues how the next GET of `digest` is answered.
    pub fn plan(&self, digest: &str, plan: Plan) {
        self.with(|i| i.plans.entry(digest.to_string()).or_default().push_back(plan));
    }

    /// Answer everything with `status` (None: back to normal).
    pub fn fail_with(&self, status: Option<u16>) {
        self.with(|i| i.fail_status = status);
    }

    pub fn require_bearer(&self, b: Bearer) {
        self.with(|i| i.bearer = Some(b));
    }

    pub fn requests(&self) -> Vec<Req> {
        self.with(|i| i.requests.clone())
    }

    pub fn total(&self) -> usize {
        self.with(|i| i.requests.len())
    }

    /// Requests with this method and exact path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.with(|i| i.requests.iter().filter(|r| r.method == method && r.path == path).count())
    }

    pub fn count_where(&self, f: impl Fn(&Req) -> bool) -> usize {
        self.with(|i| i.requests.iter().filter(|r| f(r)).count())
    }

    /// Query strings of the `/token` requests.
    pub fn token_queries(&self) -> Vec<String> {
        self.with(|i| i.token_queries.clone())
    }

    /// When the last byte of each complete GET answer for `digest` was handed over.
    pub fn sent_all(&self, digest: &str) -> Vec<Instant> {
        self.with(|i| i.sent_all.get(digest).cloned().unwrap_or_default())
    }

    /// A one-line-per-request dump for assertion messages.
    pub fn dump(&self) -> String {
        self.requests()
            .iter()
            .map(|r| {
                if r.query.is_empty() {
                    format!("{} {}", r.method, r.path)
                } else {
                    format!("{} {}?{}", r.method, r.path, r.query)
                }
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    }

    /// Stops listening and closes connections: the upstream is down. Requests that still
    /// reach a lingering connection get 503.
    pub async fn stop(&mut self) {
        self.with(|i| i.stopped = true);
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn json_error(status: StatusCode, code: &str) -> Response {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"fake","detail":null}}]}}"#);
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    r
}

async fn handle(State(st): State<Arc<FakeState>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let authorization = hdr(&headers, "authorization");
    let (fail, bearer, stopped) = {
        let mut i = st.inner.lock().unwrap();
        i.requests.push(Req {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            authorization: authorization.clone(),
            range: hdr(&headers, "range"),
            at: Instant::now(),
        });
        (i.fail_status, i.bearer.clone(), i.stopped)
    };
    if stopped {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE");
    }
    if path == "/token" {
        st.inner.lock().unwrap().token_queries.push(query);
        let Some(b) = bearer else {
            return json_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
        };
        tokio::time::sleep(b.delay).await;
        let mut r = Response::new(Body::from(format!(r#"{{"token":"{}","expires_in":300}}"#, b.token)));
        r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
        return r;
    }
    if let Some(s) = fail {
        return json_error(StatusCode::from_u16(s).unwrap(), "UNAVAILABLE");
    }
    if let Some(b) = &bearer {
        if authorization.as_deref() != Some(format!("Bearer {}", b.token).as_str()) {
            let mut r = json_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
            let challenge = format!(r#"Bearer realm="http://{}/token",service="fake""#, st.addr);
            r.headers_mut().insert("www-authenticate", HeaderValue::from_str(&challenge).unwrap());
            return r;
        }
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return json_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    };
    if rest.is_empty() {
        return Response::new(Body::from("{}"));
    }
    let head = method == Method::HEAD;
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        let found = {
            let i = st.inner.lock().unwrap();
            let digest = if reference.starts_with("sha256:") {
                Some(reference.to_string())
            } else {
                i.tags.get(&(repo.to_string(), reference.to_string())).cloned()
            };
            digest.and_then(|d| i.manifests.get(&d).cloned().map(|m| (d, m)))
        };
        let Some((digest, (mt, bytes))) = found else {
            return json_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        };
        let len = bytes.len();
        let mut r = Response::new(if head { Body::empty() } else { Body::from(bytes) });
        let h = r.headers_mut();
        h.insert("content-type", HeaderValue::from_str(&mt).unwrap());
        h.insert("docker-content-digest", HeaderValue::from_str(&digest).unwrap());
        h.insert("content-length", HeaderValue::from(len));
        return r;
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        let digest = digest.to_string();
        let generated = {
            let mut i = st.inner.lock().unwrap();
            if i.only_in.get(&digest).is_some_and(|only| only != repo) {
                return json_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
            }
            let g = i.generated.get(&digest).copied();
            let hold =
                if head || g.is_none() { None } else { i.generated_holds.get_mut(&digest).and_then(|q| q.pop_front()) };
            g.map(|g| (g, hold))
        };
        if let Some(((seed, len), hold)) = generated {
            let body = if head { Body::empty() } else { generated_body(st.clone(), digest.clone(), seed, len, hold) };
            let mut r = Response::new(body);
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/octet-stream"));
            h.insert("docker-content-digest", HeaderValue::from_str(&digest).unwrap());
            h.insert("content-length", HeaderValue::from(len));
            return r;
        }
        let (plan, blob) = {
            let mut i = st.inner.lock().unwrap();
            let plan = if head { None } else { i.plans.get_mut(&digest).and_then(|q| q.pop_front()) };
            (plan, i.blobs.get(&digest).cloned())
        };
        let plan = match (plan, blob) {
            (Some(p), _) => p,
            (None, Some(b)) => Plan::new(b),
            (None, None) => return json_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        };
        let len = plan.body.len();
        let body = if head { Body::empty() } else { plan_body(st.clone(), digest.clone(), plan.clone()) };
        let mut r = Response::new(body);
        let h = r.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/octet-stream"));
        h.insert("docker-content-digest", HeaderValue::from_str(&digest).unwrap());
        if plan.content_length || head {
            h.insert("content-length", HeaderValue::from(len));
        }
        return r;
    }
    json_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN")
}

/// The body of a planned GET: chunks with pauses, optionally broken off.
fn plan_body(st: Arc<FakeState>, digest: String, plan: Plan) -> Body {
    let stream = futures::stream::unfold(0usize, move |pos| {
        let (st, digest, plan) = (st.clone(), digest.clone(), plan.clone());
        async move {
            if pos == usize::MAX {
                return None;
            }
            let total = plan.body.len();
            let limit = plan.drop_after.unwrap_or(total).min(total);
            let breaks = plan.drop_after.is_some_and(|n| n < total);
            if pos >= limit && !breaks {
                return None;
            }
            if pos > 0 && !plan.delay.is_zero() {
                tokio::time::sleep(plan.delay).await;
            }
            if let Some((_, gate)) = plan.hold.as_ref().filter(|(n, _)| pos >= *n && pos < total) {
                let _ = gate.clone().wait_for(|open| *open).await;
            }
            if pos >= limit {
                // usize::MAX ends the stream after the error.
                return Some((Err(std::io::Error::other("fake upstream drops the connection")), usize::MAX));
            }
            let mut end = (pos + plan.chunk).min(limit);
            if let Some((n, _)) = plan.hold.as_ref().filter(|(n, _)| pos < *n) {
                end = end.min(*n);
            }
            let chunk = plan.body.slice(pos..end);
            if end == total {
                st.inner.lock().unwrap().sent_all.entry(digest).or_default().push(Instant::now());
            }
            Some((Ok::<Bytes, std::io::Error>(chunk), end))
        }
    });
    Body::from_stream(stream)
}

/// The body of a generated blob: `seed`'s first `len` bytes in 1 MiB pieces, stopping after
/// `hold`'s byte count until its gate opens.
fn generated_body(
    st: Arc<FakeState>,
    digest: String,
    seed: u64,
    len: u64,
    hold: Option<(u64, tokio::sync::watch::Receiver<bool>)>,
) -> Body {
    let stream = futures::stream::unfold((0u64, hold), move |(pos, hold)| {
        let (st, digest) = (st.clone(), digest.clone());
        async move {
            if pos >= len {
                return None;
            }
            let mut hold = hold;
            if hold.as_ref().is_some_and(|(n, _)| pos >= *n) {
                let (_, mut gate) = hold.take().unwrap();
                let _ = gate.wait_for(|open| *open).await;
            }
            let mut end = (pos + super::data::STREAM_CHUNK as u64).min(len);
            if let Some((n, _)) = hold.as_ref().filter(|(n, _)| pos < *n) {
                end = end.min(*n);
            }
            let mut buf = vec![0u8; (end - pos) as usize];
            super::data::fill_at(seed, pos, &mut buf);
            if end == len {
                st.inner.lock().unwrap().sent_all.entry(digest).or_default().push(Instant::now());
            }
            Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), (end, hold)))
        }
    });
    Body::from_stream(stream)
}
