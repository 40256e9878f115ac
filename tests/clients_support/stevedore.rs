//! Stevedore under test: the real binary on 127.0.0.1:0 with a config file, JSON logs and the
//! access log (`stevedore::access`, one line per request with its query and cache outcome)
//! captured to a file, so tests can see exactly what each client sent.

use std::collections::BTreeSet;
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
    pub root: PathBuf,
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
                assert!(u.starts_with("http://127.0.0.1:"), "test config names a non-loopback endpoint {u:?}");
            }
        }
    }
    assert!(default_set, "test configs must set [proxy] default_upstream explicitly");
}

impl Stevedore {
    /// Writes `config` to `dir/stevedore.toml` and starts the server with its store in
    /// `dir/data`; waits for its "listening" line.
    pub fn start(dir: &Path, config: &str) -> Stevedore {
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
        Stevedore { daemon, addr, root }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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

    /// Repositories in the store: directories under `repos/` holding `_layers` or
    /// `_manifests`, relative to `repos/`.
    pub fn repo_dirs(&self) -> BTreeSet<String> {
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
                    out.insert(dir.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                } else {
                    walk(base, &e.path(), out);
                }
            }
        }
        let base = self.root.join("repos");
        let mut out = BTreeSet::new();
        walk(&base, &base, &mut out);
        out
    }

    /// Every file under `blobs/` as `alg:hex`, with how many times each name occurs.
    pub fn blob_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for alg in std::fs::read_dir(self.root.join("blobs")).into_iter().flatten().flatten() {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            for pre in std::fs::read_dir(alg.path()).into_iter().flatten().flatten() {
                for f in std::fs::read_dir(pre.path()).into_iter().flatten().flatten() {
                    out.push(format!("{alg_name}:{}", f.file_name().to_string_lossy()));
                }
            }
        }
        out.sort();
        out
    }

    /// Files left in `ingest/` (fills spool there).
    pub fn ingest_leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.join("ingest")).into_iter().flatten().flatten().map(|e| e.path()).collect()
    }
}
