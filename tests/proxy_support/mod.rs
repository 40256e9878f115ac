//! Shared helpers for the pull-through tests (`tests/proxy.rs`, `tests/proxy_upstream.rs`):
//! starting Stevedore with a config file, an HTTP client, store inspection and error checks.
//! Not a test target itself.
#![allow(dead_code)]

pub mod distribution;
pub mod fake;
pub mod push;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::HeaderMap;
use sha2::{Digest, Sha256};

use crate::common::Server;

/// `sha256:<hex>` of `data` (hex encoded by hand: sha2 0.11 has no hex feature here).
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

/// `len` deterministic pseudo-random bytes for `seed` (splitmix64).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    while out.len() < len {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A client for talking to Stevedore and upstreams on loopback: no proxy from the
/// environment, no redirects, and a bound on every request so nothing hangs a test.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

pub fn hdr(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The `Content-Length` header as sent (reqwest's `content_length()` reports 0 for HEAD).
pub fn content_length_header(h: &HeaderMap) -> Option<u64> {
    hdr(h, "content-length").and_then(|v| v.parse().ok())
}

/// Accept header for manifests, as a pulling client sends it.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Stevedore started on a config file written to a temporary directory (store beside it).
pub struct Stevedore {
    pub server: Server,
    pub config: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Stevedore {
    /// Starts Stevedore with `config` (TOML). The config must set `[proxy] default_upstream`
    /// and name loopback endpoints only; this is checked here so no test can reach outside.
    pub fn start(config: &str) -> Stevedore {
        check_config_is_loopback_only(config);
        let tmp = tempfile::Builder::new().prefix("stevedore-proxy-").tempdir().expect("tempdir");
        let path = tmp.path().join("stevedore.toml");
        std::fs::write(&path, config).expect("write config");
        let root = tmp.path().join("data");
        let args = ["--config", path.to_str().expect("utf-8 path")];
        let server = tokio::task::block_in_place(|| Server::start_at(&root, &args));
        Stevedore { server, config: path, _tmp: tmp }
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    pub fn root(&self) -> &Path {
        &self.server.root
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.server.host()
    }
}

/// Panics unless the config sets `default_upstream` under `[proxy]` and every endpoint URL
/// is on 127.0.0.1.
pub fn check_config_is_loopback_only(config: &str) {
    let mut in_proxy = false;
    let mut default_set = false;
    for line in config.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_proxy = l == "[proxy]";
        }
        if in_proxy && l.starts_with("default_upstream") {
            default_set = true;
        }
        if l.starts_with("endpoints") {
            let urls: Vec<&str> = l.split('"').skip(1).step_by(2).collect();
            assert!(!urls.is_empty(), "config line without endpoints: {l}");
            for u in urls {
                assert!(u.starts_with("http://127.0.0.1:"), "test config names a non-loopback endpoint {u:?}");
            }
        }
    }
    assert!(default_set, "test configs must set [proxy] default_upstream explicitly");
}

/// Every committed content digest under `<root>/blobs`, as `sha256:<hex>`.
pub fn blob_files(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(algs) = std::fs::read_dir(root.join("blobs")) else {
        return out;
    };
    for alg in algs.flatten() {
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for pre in std::fs::read_dir(alg.path()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(pre.path()).into_iter().flatten().flatten() {
                out.insert(format!("{alg_name}:{}", f.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// The path of blob `digest` in the store.
pub fn blob_path(root: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("alg:hex");
    root.join("blobs").join(alg).join(&hex[..2]).join(hex)
}

/// Files left under `<root>/ingest` (fills spool to `ingest/tmp-*`).
pub fn ingest_leftovers(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("ingest")).into_iter().flatten().flatten().map(|e| e.path()).collect()
}

/// Repositories in the store: directories under `repos/` that hold `_layers` or
/// `_manifests`, relative to `repos/`.
pub fn repo_dirs(root: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('_') {
                let rel = dir.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.insert(rel);
            } else {
                walk(base, &e.path(), out);
            }
        }
    }
    let base = root.join("repos");
    let mut out = BTreeSet::new();
    walk(&base, &base, &mut out);
    out
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response read to its end, or as far as it went.
pub struct Read {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The body stream's error, if it broke.
    pub error: Option<String>,
    /// When the first non-empty body chunk arrived.
    pub first_byte: Option<Instant>,
    pub done: Instant,
}

impl Read {
    pub fn cache(&self) -> String {
        hdr(&self.headers, "x-stevedore-cache").unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` and reads the body chunk by chunk, keeping what arrived if the stream breaks.
pub async fn read(req: reqwest::RequestBuilder) -> Read {
    let resp = req.send().await.expect("request failed before a response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    let mut error = None;
    let mut first_byte = None;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if !c.is_empty() && first_byte.is_none() {
                    first_byte = Some(Instant::now());
                }
                body.extend_from_slice(&c);
            }
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(inner) = src {
                    s.push_str(": ");
                    s.push_str(&inner.to_string());
                    src = inner.source();
                }
                error = Some(s);
                break;
            }
        }
    }
    Read { status, headers, body, error, first_byte, done: Instant::now() }
}

/// The answer is a distribution-spec error: `status`, JSON, `errors[0].code == code`.
pub fn assert_json_error(r: &Read, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: status (body {})", r.text());
    assert!(r.error.is_none(), "{what}: error body broke: {:?}", r.error);
    let ct = hdr(&r.headers, "content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "{what}: Content-Type {ct:?} (body {})", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {}", r.text()));
    assert_eq!(v["errors"][0]["code"].as_str(), Some(code), "{what}: error code in {v}");
    assert!(v["errors"][0]["message"].is_string(), "{what}: error without message: {v}");
}

/// A config whose upstreams are `(host, endpoint, extra TOML lines)`.
pub fn config(default: &str, upstreams: &[(&str, &str, &str)]) -> String {
    let mut s =
        format!("[proxy]\ndefault_upstream = \"{default}\"\nfill_timeout = \"60s\"\nhead_cache_ttl = \"30s\"\n");
    for (host, endpoint, extra) in upstreams {
        s.push_str(&format!(
            "\n[[upstreams]]\nhost = \"{host}\"\nendpoints = [\"{endpoint}\"]\n\
             connect_timeout = \"5s\"\nread_timeout = \"20s\"\n{extra}\n"
        ));
    }
    s
}

/// How a client names the upstream.
#[derive(Clone, Copy, Debug)]
pub enum Dialect {
    /// `?ns=<host>` (containerd)
    Ns,
    /// `/v2/<host>/<repo>/…` (podman, CRI-O)
    Prefix,
    /// `/v2/<repo>/…`, filled from the default upstream (docker `registry-mirrors`)
    Plain,
}

pub const DIALECTS: [Dialect; 3] = [Dialect::Ns, Dialect::Prefix, Dialect::Plain];

impl Dialect {
    /// The request path for `rest` (`manifests/<ref>`, `blobs/<digest>`) of `repo` at `host`.
    pub fn path(self, host: &str, repo: &str, rest: &str) -> String {
        match self {
            Dialect::Ns => format!("/v2/{repo}/{rest}?ns={host}"),
            Dialect::Prefix => format!("/v2/{host}/{repo}/{rest}"),
            Dialect::Plain => format!("/v2/{repo}/{rest}"),
        }
    }
}

pub async fn get_manifest(http: &reqwest::Client, url: String) -> Read {
    read(http.get(url).header("accept", MANIFEST_ACCEPT)).await
}

/// A 200 carrying exactly `body`, with `digest` in `Docker-Content-Digest`.
pub fn assert_content(r: &Read, digest: &str, body: &[u8], what: &str) {
    assert_eq!(r.status, 200, "{what}: status (body {})", r.text());
    assert!(r.error.is_none(), "{what}: body broke: {:?}", r.error);
    assert_eq!(hdr(&r.headers, "docker-content-digest").as_deref(), Some(digest), "{what}: Docker-Content-Digest");
    assert_eq!(sha256(&r.body), digest, "{what}: served bytes hash");
    assert!(r.body == body, "{what}: served bytes differ");
}
