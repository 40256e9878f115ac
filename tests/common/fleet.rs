//! Several Stevedore replicas on one S3 bucket (moto), coordinated through one Redis, in
//! front of one upstream: the replica tests' set-up. Every replica is started by the one
//! launcher ([`super::stevedore::Builder`]) with its own scratch root, the bucket of the
//! fleet's first root ([`super::stevedore::Builder::bucket_of`]), and
//! `cluster.advertise` naming the port it listens on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::proc;
use super::redis::Redis;
use super::s3::Backend;
use super::stevedore::{config, Stevedore};

/// The fleet's shared secret (`cluster.secret`).
pub const SECRET: &str = "fleet-secret-0123456789abcdef";

pub struct Fleet {
    pub redis: Option<Redis>,
    /// The upstream's `host:port` (also its endpoint on loopback).
    pub upstream: String,
    /// Extra TOML appended to every replica's config.
    pub extra: String,
    /// Environment every replica starts with (test hooks).
    pub env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    /// Each replica's port and root, by index (kept across restarts).
    slots: Vec<(u16, PathBuf)>,
    pub replicas: Vec<Option<Stevedore>>,
}

impl Fleet {
    /// `n` replicas with Redis in front of `upstream` (`127.0.0.1:PORT`).
    pub fn start(n: usize, upstream: &str, extra: &str) -> Fleet {
        Fleet::start_with(n, upstream, extra, true)
    }

    /// As [`Fleet::start`]; without Redis when `redis` is false.
    pub fn start_with(n: usize, upstream: &str, extra: &str, redis: bool) -> Fleet {
        Fleet::start_env(n, upstream, extra, redis, &[])
    }

    /// As [`Fleet::start_with`], every replica with the environment `env` (test hooks such
    /// as `STEVEDORE_TEST_FILL_BYTES_PER_SEC`).
    pub fn start_env(n: usize, upstream: &str, extra: &str, redis: bool, env: &[(&str, &str)]) -> Fleet {
        let dir = tempfile::Builder::new().prefix("fleet-").tempdir().expect("tempdir");
        let slots = (0..n).map(|i| (proc::closed_port(), dir.path().join(format!("r{i}")))).collect();
        let mut f = Fleet {
            redis: redis.then(Redis::start),
            upstream: upstream.to_string(),
            extra: extra.to_string(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            dir,
            slots,
            replicas: Vec::new(),
        };
        for i in 0..n {
            let r = f.spawn(i);
            f.replicas.push(Some(r));
        }
        f
    }

    /// The config replica `i` runs on.
    pub fn config_of(&self, i: usize) -> String {
        let (port, _) = &self.slots[i];
        let mut c = config(&self.upstream, &[(&self.upstream, &format!("http://{}", self.upstream), "")]);
        if let Some(r) = &self.redis {
            c.push_str(&format!("\n[redis]\nurl = \"{}\"\ntimeout = \"1s\"\n", r.url()));
        }
        c.push_str(&format!(
            "\n[cluster]\nsecret = \"{SECRET}\"\nadvertise = \"http://127.0.0.1:{port}\"\nlease_ttl = \"3s\"\nheartbeat_interval = \"1s\"\n"
        ));
        c.push_str(&self.extra);
        c
    }

    /// Starts replica `i` (on its port, root and the fleet's bucket); panics if it does not
    /// start.
    pub fn spawn(&self, i: usize) -> Stevedore {
        self.try_spawn(i, &self.config_of(i)).unwrap_or_else(|log| panic!("replica {i}: {log}"))
    }

    /// Starts replica `i` on `config`; `Err` with its log when it exits during start-up.
    pub fn try_spawn(&self, i: usize, config: &str) -> Result<Stevedore, String> {
        let (port, root) = &self.slots[i];
        std::fs::create_dir_all(root).unwrap();
        let mut b = Stevedore::builder();
        for (k, v) in &self.env {
            b = b.env(k, v);
        }
        // Fills log their commit (info), so tests can tell which replica fetched a blob.
        b.rust_log("warn,stevedore::access=info,stevedore::proxy::fill=info")
            .backend(Backend::S3)
            .dir(&self.dir.path().join(format!("d{i}")))
            .root(root)
            .bucket_of(&self.slots[0].1)
            .port(*port)
            .config(config)
            .try_start()
    }

    /// Adds a replica slot (not started) and returns its index.
    pub fn add_slot(&mut self) -> usize {
        let i = self.slots.len();
        self.slots.push((proc::closed_port(), self.dir.path().join(format!("r{i}"))));
        self.replicas.push(None);
        i
    }

    /// Replica `i`, running.
    pub fn at(&self, i: usize) -> &Stevedore {
        self.replicas[i].as_ref().expect("replica is running")
    }

    /// SIGKILLs replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut r) = self.replicas[i].take() {
            r.kill();
        }
    }

    /// Starts replica `i` again (after [`Fleet::kill`]).
    pub fn restart(&mut self, i: usize) {
        assert!(self.replicas[i].is_none(), "replica {i} still runs");
        let r = self.spawn(i);
        self.replicas[i] = Some(r);
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn root_of(&self, i: usize) -> &PathBuf {
        &self.slots[i].1
    }

    /// `http://127.0.0.1:PORT<path>` of replica `i` (known whether it runs or not).
    pub fn url_of(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.slots[i].0)
    }

    /// The replica whose advertised URL is `advertise`.
    pub fn index_of(&self, advertise: &str) -> Option<usize> {
        self.slots.iter().position(|(port, _)| advertise.trim_end_matches('/') == format!("http://127.0.0.1:{port}"))
    }

    /// The replica holding the fleet's lease `name` (`fill:sha256:…`), as Redis says.
    pub fn lease_holder(&self, name: &str) -> Option<usize> {
        let redis = self.redis.as_ref()?;
        let reply = redis.command(&["GET", &format!("stevedore:{name}")]);
        // `$<len>\r\n<replica> <advertise> <token>\r\n`, or `$-1` when nobody holds it.
        let value = reply.split("\r\n").nth(1)?;
        self.index_of(value.split(' ').nth(1)?)
    }

    /// The sum of the samples of metric `name` (all label sets) on running replica `i`.
    pub async fn metric(&self, i: usize, name: &str) -> f64 {
        let text = super::http::read(super::http::client().get(self.at(i).url("/metrics"))).await.text();
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits (bounded by `limit`) until metric `name` is `value` on every running replica.
    pub async fn wait_metric(&self, name: &str, value: f64, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            let mut all = true;
            for i in (0..self.len()).filter(|i| self.replicas[*i].is_some()) {
                all &= self.metric(i, name).await == value;
            }
            if all {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A blob GET read to its end through SHA-256, never kept in memory.
#[derive(Debug)]
pub struct Pull {
    /// `None` when no response came (refused, reset before the head).
    pub status: Option<u16>,
    pub cache: String,
    pub content_length: Option<u64>,
    pub len: u64,
    /// `sha256:<hex>` of the body received.
    pub digest: String,
    /// The error body of a non-2xx answer (small), lossily decoded.
    pub error_body: String,
    /// Why the request or the body broke.
    pub error: Option<String>,
    pub first_byte: Option<Instant>,
    pub done: Instant,
}

impl Pull {
    /// A 200 with every byte, hashing to `digest`.
    pub fn complete(&self, digest: &str, size: u64) -> bool {
        self.status == Some(200) && self.error.is_none() && self.len == size && self.digest == digest
    }

    /// A failure a client can tell from success: no response, a body that broke (never a
    /// clean short end), or a 5xx with the spec's error body.
    pub fn clean_error(&self) -> bool {
        match self.status {
            None => self.error.is_some(),
            Some(200) => self.error.is_some(),
            Some(s) if s >= 500 => serde_json::from_str::<serde_json::Value>(&self.error_body)
                .is_ok_and(|v| v["errors"][0]["code"].is_string()),
            _ => false,
        }
    }
}

/// `GET url`, hashing the body as it arrives; `first` is set at the first body byte.
pub async fn pull(http: &reqwest::Client, url: &str, first: Option<&AtomicBool>) -> Pull {
    use futures::StreamExt;
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut p = Pull {
        status: None,
        cache: String::new(),
        content_length: None,
        len: 0,
        digest: String::new(),
        error_body: String::new(),
        error: None,
        first_byte: None,
        done: Instant::now(),
    };
    match http.get(url).send().await {
        Err(e) => p.error = Some(super::http::error_chain(&e)),
        Ok(resp) => {
            p.status = Some(resp.status().as_u16());
            p.cache = super::http::hdr(resp.headers(), "x-stevedore-cache").unwrap_or_default();
            p.content_length = resp.content_length();
            let ok = resp.status().is_success();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => {
                        if !c.is_empty() && p.first_byte.is_none() {
                            p.first_byte = Some(Instant::now());
                            if let Some(f) = first {
                                f.store(true, Ordering::SeqCst);
                            }
                        }
                        p.len += c.len() as u64;
                        h.update(&c);
                        if !ok && p.error_body.len() < 64 << 10 {
                            p.error_body.push_str(&String::from_utf8_lossy(&c));
                        }
                    }
                    Err(e) => {
                        p.error = Some(super::http::error_chain(&e));
                        break;
                    }
                }
            }
        }
    }
    p.digest = format!("sha256:{}", super::data::hex(&h.finalize()));
    p.done = Instant::now();
    p
}

/// Pushes `len` bytes of generated data (`seed`) to `registry` as a blob of `repo`, streamed
/// (never in memory); returns its digest.
pub async fn push_generated(registry: &super::http::Registry, repo: &str, seed: u64, len: u64) -> String {
    let digest = tokio::task::spawn_blocking(move || super::data::stream_digest(seed, 0, len)).await.unwrap();
    let loc = registry.try_start_upload(repo).await.expect("POST upload to the upstream");
    let body = reqwest::Body::wrap_stream(super::data::byte_stream(seed, 0, len));
    registry.try_finish(&loc, &digest, Some((len, body))).await.expect("PUT the blob to the upstream");
    digest
}
