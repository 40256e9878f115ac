//! Stevedore under test on a config file: the real binary on 127.0.0.1:0, JSON logs and the
//! access log (`stevedore::access`, one line per request with its query and cache outcome)
//! captured to a file, so tests can see exactly what each client sent. Plus the pull-through
//! config and request-path helpers. (For a server on command-line arguments only, see
//! [`super::server::Server`].)

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proc::{self, Daemon};

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

pub struct Stevedore {
    daemon: Daemon,
    /// `127.0.0.1:PORT`
    pub addr: String,
    root: PathBuf,
    /// The config file it runs on.
    pub config: PathBuf,
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
    /// Starts Stevedore on `config` in a temporary directory of its own (see
    /// [`Stevedore::start_in`]). From async tests: needs the multi-thread runtime.
    pub fn start(config: &str) -> Stevedore {
        let tmp = tempfile::Builder::new().prefix("stevedore-proxy-").tempdir().expect("tempdir");
        let mut sd = tokio::task::block_in_place(|| Stevedore::start_in(tmp.path(), config));
        sd._tmp = Some(tmp);
        sd
    }

    /// Writes `config` (TOML) to `dir/stevedore.toml` and starts the server with its store in
    /// `dir/data`; waits for its "listening" line. The config must set `[proxy]
    /// default_upstream` and name loopback endpoints only; this is checked here so no test can
    /// reach outside.
    pub fn start_in(dir: &Path, config: &str) -> Stevedore {
        check_loopback_only(config);
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("stevedore.toml");
        std::fs::write(&cfg, config).unwrap();
        let root = dir.join("data");
        let mut cmd = proc::with_pdeathsig(env!("CARGO_BIN_EXE_stevedore"));
        cmd.arg("--log-format")
            .arg("json")
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--root")
            .arg(&root)
            .env("RUST_LOG", "warn,stevedore::access=info");
        let mut daemon = Daemon::spawn("stevedore", cmd, &dir.join("stevedore.log"));
        let mut addr = String::new();
        daemon.wait_ready(Duration::from_secs(30), || {
            let log = std::fs::read_to_string(dir.join("stevedore.log")).unwrap_or_default();
            match log.lines().find_map(|l| l.strip_prefix("stevedore listening on ")) {
                Some(a) => {
                    addr = a.trim().to_string();
                    true
                }
                None => false,
            }
        });
        Stevedore { daemon, addr, root, config: cfg, _tmp: None }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.clone()
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every request logged so far, in order.
    pub fn requests(&self) -> Vec<Access> {
        let mut out = Vec::new();
        for line in self.daemon.log_text().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["target"] != "stevedore::access" {
                continue;
            }
            let f = &v["fields"];
            out.push(Access {
                method: f["method"].as_str().unwrap_or_default().to_string(),
                uri: f["uri"].as_str().unwrap_or_default().to_string(),
                status: f["status"].as_u64().unwrap_or(0) as u16,
                cache: f["cache"].as_str().unwrap_or_default().to_string(),
            });
        }
        out
    }

    /// Requests logged after the first `mark` (a previous `requests().len()`); waits briefly
    /// for log lines still being written.
    pub fn requests_since(&self, mark: usize) -> Vec<Access> {
        std::thread::sleep(Duration::from_millis(100));
        let mut all = self.requests();
        all.split_off(mark.min(all.len()))
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
