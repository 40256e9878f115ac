//! Stevedore under test: the one launcher. The real binary on 127.0.0.1:0 in a directory of
//! its own, stdout and stderr (JSON logs by default, the access log `stevedore::access` at
//! info: one line per request with its query and cache outcome) captured to a file, so tests
//! can see exactly what each client sent. Ready once it printed `stevedore listening on`.
//!
//! - [`Stevedore::start`] / [`Stevedore::start_in`]: on a config file (pull-through tests);
//! - [`Stevedore::local`]: a plain local registry, command-line arguments only
//!   (`--upstream none`);
//! - [`Stevedore::builder`]: a given store root (restarts on one root), extra arguments,
//!   `RUST_LOG`, text logs.
//!
//! Plus the pull-through config and request-path helpers.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::http::Registry;
use super::proc::{self, Daemon};
use super::s3::{Backend, Bucket};

/// One request as Stevedore logged it.
#[derive(Clone, Debug)]
pub struct Access {
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    pub status: u16,
    pub cache: String,
}

impl Access {
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// The value of query parameter `key`, if present.
    pub fn query(&self, key: &str) -> Option<String> {
        let q = self.uri.split_once('?')?.1;
        form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {} ({})", self.method, self.uri, self.status, self.cache)
    }
}

/// Lists requests, one per line, for failure messages.
pub fn show(reqs: &[Access]) -> String {
    reqs.iter().map(|a| format!("  {a}")).collect::<Vec<_>>().join("\n")
}

/// How the binary writes its logs (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// What to start: see [`Stevedore::builder`].
pub struct Builder {
    dir: Option<PathBuf>,
    config: Option<String>,
    root: Option<PathBuf>,
    args: Vec<String>,
    rust_log: String,
    log_format: LogFormat,
    env: Vec<(String, String)>,
    tls_ca: Option<String>,
    backend: Backend,
    s3_settings: Vec<String>,
    bucket_root: Option<PathBuf>,
    port: u16,
    bucket: Option<Bucket>,
}

impl Builder {
    /// The server speaks TLS (its config has `[server.tls]`) with a certificate `ca_pem`
    /// issued: [`Stevedore::url`] is https, [`Stevedore::registry`] trusts that CA only, and
    /// [`Stevedore::settle`] probes over TLS (or over `server.plain_listen` when set).
    pub fn https(mut self, ca_pem: &str) -> Builder {
        self.tls_ca = Some(ca_pem.to_string());
        self
    }

    /// The storage backend (default: [`super::s3::suite_backend`], S3 in the `*_s3` twin
    /// binaries). On S3 the server runs on moto, in the bucket of its store root
    /// ([`Bucket::for_root`]), and its root is local scratch only.
    pub fn backend(mut self, backend: Backend) -> Builder {
        self.backend = backend;
        self
    }

    /// Runs on S3 in this bucket (shared with other servers: replicas on one bucket, each
    /// with its own root as scratch) instead of its root's own.
    pub fn bucket(mut self, bucket: &Bucket) -> Builder {
        self.backend = Backend::S3;
        self.bucket = Some(bucket.clone());
        self
    }

    /// A `[storage.s3]` line (`buffer_memory = "10MiB"`) for a server on S3; ignored on the
    /// filesystem.
    pub fn s3_setting(mut self, line: &str) -> Builder {
        self.s3_settings.push(line.to_string());
        self
    }

    /// Listen on this port of 127.0.0.1 instead of one the server picks (a replica whose
    /// `cluster.advertise` names its own address).
    pub fn port(mut self, port: u16) -> Builder {
        self.port = port;
        self
    }

    /// On S3: the bucket of the store rooted at `root` instead of this server's own (several
    /// replicas on one bucket, each with its own scratch root).
    pub fn bucket_of(mut self, root: &Path) -> Builder {
        self.bucket_root = Some(root.to_path_buf());
        self
    }

    /// Config file, logs and (unless [`Builder::root`]) the store go under `dir` instead of a
    /// temporary directory of the server's own.
    pub fn dir(mut self, dir: &Path) -> Builder {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Runs on this config (TOML), written to `<dir>/stevedore.toml`. It must set `[proxy]
    /// default_upstream` and name loopback endpoints only (checked at start).
    pub fn config(mut self, toml: &str) -> Builder {
        self.config = Some(toml.to_string());
        self
    }

    /// The store root (`--root`), e.g. to restart on the store a killed server left.
    pub fn root(mut self, root: &Path) -> Builder {
        self.root = Some(root.to_path_buf());
        self
    }

    /// Extra arguments to `serve`. Without a config and without `--upstream`, the server
    /// gets `--upstream none`; an `--upstream` URL must be on loopback.
    pub fn args(mut self, args: &[&str]) -> Builder {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The `RUST_LOG` filter (default `warn,stevedore::access=info`).
    pub fn rust_log(mut self, filter: &str) -> Builder {
        self.rust_log = filter.to_string();
        self
    }

    /// An environment variable for the server (e.g. a test hook such as
    /// `STEVEDORE_TEST_DELAY_WRITE_MS`).
    pub fn env(mut self, key: &str, value: &str) -> Builder {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Plain text logs (`--log-format text`) instead of JSON; [`Stevedore::requests`] reads
    /// JSON only.
    pub fn text_logs(mut self) -> Builder {
        self.log_format = LogFormat::Text;
        self
    }

    /// Starts the server and waits (bounded) for its listening line. From async tests on the
    /// multi-thread runtime the wait runs in `block_in_place`.
    pub fn start(self) -> Stevedore {
        self.try_start().unwrap_or_else(|log| panic!("{log}"))
    }

    /// [`Builder::start`], but a server that exits during start-up (a refused config) is an
    /// `Err` with its log instead of a panic.
    pub fn try_start(self) -> Result<Stevedore, String> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.spawn())
            }
            _ => self.spawn(),
        }
    }

    fn spawn(self) -> Result<Stevedore, String> {
        let tmp = match &self.dir {
            Some(_) => None,
            None => Some(tempfile::Builder::new().prefix("stevedore-").tempdir().expect("tempdir")),
        };
        let dir = self.dir.clone().unwrap_or_else(|| tmp.as_ref().unwrap().path().to_path_buf());
        std::fs::create_dir_all(&dir).unwrap();
        let root = self.root.clone().unwrap_or_else(|| dir.join("data"));
        let mut cmd = proc::with_pdeathsig(env!("CARGO_BIN_EXE_stevedore"));
        cmd.arg("--log-format").arg(match self.log_format {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        });
        cmd.arg("serve").arg("--listen").arg(format!("127.0.0.1:{}", self.port)).arg("--root").arg(&root);
        let bucket = (self.backend == Backend::S3).then(|| {
            self.bucket.clone().unwrap_or_else(|| Bucket::for_root(self.bucket_root.as_ref().unwrap_or(&root)))
        });
        let text = match (&self.config, &bucket) {
            (Some(text), None) => Some(text.clone()),
            (None, None) => None,
            // The bucket's settings go into the config (one written for the purpose when the
            // test gives none).
            (text, Some(b)) => {
                let text = text.clone().unwrap_or_else(|| "[proxy]\ndefault_upstream = \"\"\n".into());
                Some(match text.find("[storage]\n") {
                    Some(at) => {
                        let (head, tail) = text.split_at(at + "[storage]\n".len());
                        let s3 = b.config() + &self.s3_settings.join("\n");
                        let (backend_line, s3_section) = s3.split_once("\n\n").unwrap();
                        format!("{head}{backend_line}\n{tail}\n{s3_section}")
                    }
                    None => format!("{text}\n[storage]\n{}{}\n", b.config(), self.s3_settings.join("\n")),
                })
            }
        };
        let config = text.as_ref().map(|text| {
            check_loopback_only(text);
            let cfg = dir.join("stevedore.toml");
            std::fs::write(&cfg, text).unwrap();
            cfg
        });
        if let Some(cfg) = &config {
            cmd.arg("--config").arg(cfg);
        }
        let upstream = self.args.iter().position(|a| a == "--upstream").map(|i| self.args.get(i + 1));
        match upstream {
            Some(Some(u)) => assert!(
                u == "none" || u.starts_with("http://127.0.0.1:") || u.starts_with("https://127.0.0.1:"),
                "test server given a non-loopback --upstream {u:?}"
            ),
            Some(None) => panic!("--upstream without a value"),
            None if self.config.is_none() => {
                cmd.arg("--upstream").arg("none");
            }
            None => {}
        }
        cmd.args(&self.args);
        cmd.env("RUST_LOG", &self.rust_log);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        for v in ["STEVEDORE_LOG_FORMAT", "STEVEDORE_CONFIG"] {
            cmd.env_remove(v);
        }
        // A fresh log file per start, so a restart in the same directory reads its own.
        let log = (0..)
            .map(|n| if n == 0 { dir.join("stevedore.log") } else { dir.join(format!("stevedore-{n}.log")) })
            .find(|p| !p.exists())
            .unwrap();
        let mut daemon = Daemon::spawn("stevedore", cmd, &log);
        let addr = wait_for_listen_line(&mut daemon, Duration::from_secs(30))?;
        // Printed before the main line, so it is there by now.
        let plain_addr = daemon
            .log_text()
            .lines()
            .find_map(|l| l.strip_prefix("stevedore plain HTTP listening on "))
            .map(|a| a.trim().to_string());
        Ok(Stevedore {
            daemon,
            addr,
            plain_addr,
            tls_ca: self.tls_ca,
            root,
            config,
            bucket,
            log_format: self.log_format,
            sentinels: AtomicUsize::new(0),
            _tmp: tmp,
        })
    }
}

/// Polls the log for `stevedore listening on <addr>` every 10 ms; `Err` with the log if the
/// process exits first; panics with the log if `limit` passes.
fn wait_for_listen_line(daemon: &mut Daemon, limit: Duration) -> Result<String, String> {
    let end = Instant::now() + limit;
    loop {
        let log = daemon.log_text();
        if let Some(a) = log.lines().find_map(|l| l.strip_prefix("stevedore listening on ")) {
            return Ok(a.trim().to_string());
        }
        if let Some(status) = daemon.exit_status() {
            return Err(format!("stevedore exited during start-up ({status}); its log:\n{}", proc::tail(&log, 6000)));
        }
        assert!(
            Instant::now() < end,
            "stevedore did not print its listening line within {limit:?}; its log:\n{}",
            proc::tail(&log, 6000)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `uri` without a leading `scheme://authority`.
fn origin_form(uri: &str) -> String {
    match uri.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/".to_string(), |i| rest[i..].to_string()),
        None => uri.to_string(),
    }
}

/// Path of the requests [`Stevedore::settle`] sends; left out of [`Stevedore::requests`].
const SENTINEL: &str = "/healthz?settle=";

pub struct Stevedore {
    daemon: Daemon,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `127.0.0.1:PORT` of the plain HTTP listener beside TLS (`server.plain_listen`), if any.
    pub plain_addr: Option<String>,
    /// The CA that issued the server's certificate, when it speaks TLS.
    pub tls_ca: Option<String>,
    root: PathBuf,
    /// The config file it runs on, if any.
    pub config: Option<PathBuf>,
    /// Its bucket, when it runs on S3.
    pub bucket: Option<Bucket>,
    log_format: LogFormat,
    sentinels: AtomicUsize,
    /// Set when Stevedore runs in a temporary directory of its own.
    _tmp: Option<tempfile::TempDir>,
}

/// Panics unless `config` sets `[proxy] default_upstream` and names only 127.0.0.1
/// endpoints: nothing in these tests may reach beyond loopback.
pub fn check_loopback_only(config: &str) {
    let mut section = String::new();
    let mut default_set = false;
    for line in config.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            section = l.to_string();
        }
        if section == "[proxy]" && l.starts_with("default_upstream") {
            default_set = true;
        }
        if l.starts_with("endpoints") {
            let urls: Vec<&str> = l.split('"').skip(1).step_by(2).collect();
            assert!(!urls.is_empty(), "config line without endpoints: {l}");
            for u in urls {
                assert!(
                    u.starts_with("http://127.0.0.1:") || u.starts_with("https://127.0.0.1:"),
                    "test config names a non-loopback endpoint {u:?}"
                );
            }
        }
    }
    assert!(default_set, "test configs must set [proxy] default_upstream explicitly");
}

impl Stevedore {
    /// What to start: by default a plain local registry (`--upstream none`) on a fresh
    /// temporary store, JSON logs, `RUST_LOG=warn,stevedore::access=info`.
    pub fn builder() -> Builder {
        Builder {
            dir: None,
            config: None,
            root: None,
            args: Vec::new(),
            rust_log: "warn,stevedore::access=info".into(),
            log_format: LogFormat::Json,
            env: Vec::new(),
            tls_ca: None,
            backend: super::s3::suite_backend(),
            s3_settings: Vec::new(),
            bucket_root: None,
            port: 0,
            bucket: None,
        }
    }

    /// A plain local registry (no upstream) on a fresh temporary store.
    pub fn local() -> Stevedore {
        Stevedore::builder().start()
    }

    /// Starts Stevedore on `config` in a temporary directory of its own (see
    /// [`Stevedore::start_in`]).
    pub fn start(config: &str) -> Stevedore {
        Stevedore::builder().config(config).start()
    }

    /// Writes `config` (TOML) to `dir/stevedore.toml` and starts the server with its store in
    /// `dir/data`; waits for its "listening" line. The config must set `[proxy]
    /// default_upstream` and name loopback endpoints only; this is checked here so no test can
    /// reach outside.
    pub fn start_in(dir: &Path, config: &str) -> Stevedore {
        Stevedore::builder().dir(dir).config(config).start()
    }

    /// `http://127.0.0.1:PORT` + `path` (`https://` when the server speaks TLS).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls_ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// `http://` + the plain listener beside TLS (`server.plain_listen`) + `path`.
    pub fn plain_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.plain_addr.as_ref().expect("no server.plain_listen"))
    }

    /// Sends SIGHUP (TLS files are re-read).
    pub fn hup(&self) {
        let st = std::process::Command::new("kill").args(["-s", "HUP", &self.pid().to_string()]).status().unwrap();
        assert!(st.success(), "kill -HUP {}", self.pid());
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.clone()
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in the listen address")
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The distribution client for this server (over TLS trusting its CA, when it speaks TLS).
    pub fn registry(&self) -> Registry {
        match &self.tls_ca {
            Some(ca) => Registry::https(&self.url(""), ca),
            None => Registry::new(&self.url("")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Peak resident set size of the server process (VmHWM), in bytes.
    pub fn vm_hwm(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// SIGKILL, no chance to clean up; waits for the process to be gone.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// SIGTERM (a graceful shutdown); waits up to `limit` for the exit. `None` if it is still
    /// running then (it gets SIGKILL on drop).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.daemon.terminate(limit)
    }

    /// The file stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.daemon.log
    }

    /// Everything the server printed so far.
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// The `fields` of every JSON access line so far, in order, sentinels left out.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        assert_eq!(self.log_format, LogFormat::Json, "access lines are read from JSON logs");
        self.daemon
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "stevedore::access")
            .map(|v| {
                // HTTP/2 requests carry an absolute URI (`https://host:port/v2/…`): keep the
                // path and query, as HTTP/1.1 logs them.
                let mut f = v["fields"].clone();
                if let Some(u) = f["uri"].as_str().map(origin_form) {
                    f["uri"] = serde_json::Value::String(u);
                }
                f
            })
            .filter(|f| !f["uri"].as_str().unwrap_or_default().starts_with(SENTINEL))
            .collect()
    }

    /// Every request logged so far, in order.
    pub fn requests(&self) -> Vec<Access> {
        self.access_lines()
            .iter()
            .map(|f| Access {
                method: f["method"].as_str().unwrap_or_default().to_string(),
                uri: f["uri"].as_str().unwrap_or_default().to_string(),
                status: f["status"].as_u64().unwrap_or(0) as u16,
                cache: f["cache"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }

    /// Requests logged after the first `mark` (a previous `requests().len()`), once the log
    /// has settled ([`Stevedore::settle`]).
    pub fn requests_since(&self, mark: usize) -> Vec<Access> {
        self.settle();
        let mut all = self.requests();
        all.split_off(mark.min(all.len()))
    }

    /// Requests logged after `mark` once `done` holds for them; panics (with what was logged)
    /// if it does not within `limit`. For a test that knows what it waits for.
    pub fn wait_requests(&self, mark: usize, limit: Duration, done: impl Fn(&[Access]) -> bool) -> Vec<Access> {
        let end = Instant::now() + limit;
        loop {
            let mut all = self.requests();
            let since = all.split_off(mark.min(all.len()));
            if done(&since) {
                return since;
            }
            assert!(Instant::now() < end, "the expected requests were not logged within {limit:?}:\n{}", show(&since));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every request answered so far is in the access log. A line is written
    /// when its response body ends (or is dropped): a body the client read to its end is
    /// logged before the client sees the end, but one a client gave up on is logged when the
    /// server notices. So: send a sentinel request and wait for its line, then until the
    /// number of access lines stays the same for 100 ms. Bounded (10 s).
    pub fn settle(&self) {
        let n = self.sentinels.fetch_add(1, Ordering::SeqCst);
        let sentinel = format!("{SENTINEL}{n}");
        let status = match (&self.plain_addr, &self.tls_ca) {
            (Some(plain), _) => proc::http_get_status(plain.rsplit(':').next().unwrap().parse().unwrap(), &sentinel),
            (None, Some(ca)) => super::tls::https_get_status(self.port(), &sentinel, ca),
            (None, None) => proc::http_get_status(self.port(), &sentinel),
        };
        assert_eq!(status, Some(200), "sentinel request {sentinel}");
        let quoted = format!("\"{sentinel}\"");
        let probe = || {
            let text = self.daemon.log_text();
            (text.contains(&quoted), text.lines().filter(|l| l.contains("\"stevedore::access\"")).count())
        };
        super::wait_log_settled(Duration::from_secs(10), Duration::from_millis(100), probe, "Stevedore's access log");
    }

    /// Warnings and errors Stevedore logged (not access lines), for failure messages.
    pub fn problems(&self) -> String {
        self.daemon.log_text().lines().filter(|l| !l.contains("\"stevedore::access\"")).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Stevedore {
    /// SIGKILL, no graceful shutdown: the store must cope, and no test waits for in-flight
    /// requests.
    fn drop(&mut self) {
        self.daemon.kill();
    }
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

/// Writes an htpasswd file for `users` (`(name, password)`), bcrypt as `htpasswd -B` writes
/// it (cost 4, the cheapest, to keep tests fast); returns its path.
pub fn write_htpasswd(path: &Path, users: &[(&str, &str)]) -> PathBuf {
    let lines: Vec<String> = users
        .iter()
        .map(|(u, p)| format!("{u}:{}", bcrypt::hash(p, 4).expect("bcrypt").replacen("$2b$", "$2y$", 1)))
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
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

/// Runs a one-shot subcommand of the binary (`import`, `export`, `prefetch`, `check-config`)
/// with `args`, bounded to `limit`; its exit status and output, never panicking on failure.
pub fn cli(args: &[&str], limit: Duration) -> proc::Out {
    cli_env(args, &[], limit)
}

/// [`cli`] with extra environment (`STEVEDORE_PAUSE`, `STEVEDORE_FAIL`, …).
pub fn cli_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> proc::Out {
    let mut cmd = proc::with_pdeathsig(env!("CARGO_BIN_EXE_stevedore"));
    cmd.args(args);
    cmd.env("RUST_LOG", "warn");
    for v in ["STEVEDORE_LOG_FORMAT", "STEVEDORE_CONFIG"] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    proc::run(&format!("stevedore {}", args.first().copied().unwrap_or_default()), cmd, limit)
}

/// [`cli`], panicking with the output unless the command succeeded.
pub fn cli_ok(args: &[&str], limit: Duration) -> proc::Out {
    let out = cli(args, limit);
    assert!(out.status.success(), "stevedore {args:?} failed:\n{}", out.describe());
    out
}
