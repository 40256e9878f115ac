//! A real upstream: CNCF Distribution (`/usr/bin/docker-registry`, Debian package
//! `docker-registry`) on 127.0.0.1 with filesystem storage in a temporary directory, its
//! access log (stdout) captured to a file so tests can count the requests it served.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::client;

pub const BINARY: &str = "/usr/bin/docker-registry";
pub const INSTALL_HINT: &str = "CNCF Distribution (/usr/bin/docker-registry) is required by this \
     test and was not found: run `bash scripts/install-test-deps.sh` (or `apt-get install \
     docker-registry`)";

pub const USER: &str = "tester";
pub const PASSWORD: &str = "s3cret-pass";
/// `htpasswd -Bbn tester s3cret-pass` (bcrypt, cost 5), for machines without apache2-utils.
const FIXED_HTPASSWD: &str = "tester:$2b$05$sTiDbULwXSQGNRHfg6OB9uUBDe764tetaV6byHbYaJzWxJow6t/K6";

pub struct Distribution {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    access_log: PathBuf,
    err_log: PathBuf,
    sentinels: AtomicUsize,
}

/// A bcrypt htpasswd line for [`USER`]/[`PASSWORD`]: `htpasswd -Bbn` when apache2-utils is
/// installed, else a precomputed line.
fn htpasswd_line() -> String {
    let out = Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]).stdin(Stdio::null()).output();
    match out {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if line.starts_with(&format!("{USER}:$2")) {
                return line;
            }
            FIXED_HTPASSWD.to_string()
        }
        _ => FIXED_HTPASSWD.to_string(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

impl Distribution {
    /// Starts Distribution (with htpasswd Basic auth for [`USER`] when `auth`) and waits for
    /// `/v2/` to answer. Panics with the install hint when the binary is missing.
    pub async fn start(auth: bool) -> Distribution {
        if !std::path::Path::new(BINARY).exists() {
            panic!("{INSTALL_HINT}");
        }
        let dir = tempfile::Builder::new().prefix("distribution-").tempdir().expect("tempdir");
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let storage = dir.path().join("storage");
            let mut cfg = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: stevedore-proxy-test-secret\n",
                storage.display()
            );
            if auth {
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, format!("{}\n", htpasswd_line())).unwrap();
                cfg.push_str(&format!("auth:\n  htpasswd:\n    realm: stevedore-test\n    path: {}\n", file.display()));
            }
            let cfg_path = dir.path().join("config.yml");
            std::fs::write(&cfg_path, cfg).unwrap();
            let access_log = dir.path().join(format!("access-{port}.log"));
            let err_log = dir.path().join(format!("registry-{port}.err"));
            let mut cmd = Command::new(BINARY);
            cmd.arg("serve")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&access_log).unwrap())
                .stderr(std::fs::File::create(&err_log).unwrap());
            for (k, _) in std::env::vars() {
                if k.starts_with("REGISTRY_") || k.to_ascii_lowercase().ends_with("_proxy") {
                    cmd.env_remove(k);
                }
            }
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{INSTALL_HINT}\n({e})"));
            match wait_ready(&mut child, port, &err_log).await {
                Ok(()) => {
                    return Distribution { child, port, dir, access_log, err_log, sentinels: AtomicUsize::new(0) }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let retry = e.contains("address already in use");
                    last_err = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.access_log).unwrap_or_default()
    }

    /// Access-log lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.access_log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Blob GETs served for `repo`.
    pub fn blob_gets(&self, repo: &str) -> usize {
        self.count(&format!("\"GET /v2/{repo}/blobs/"))
    }

    /// Waits until every request answered so far is in the access log: sends a sentinel
    /// request and waits for its line (the log is written after each response), then a
    /// little longer for stragglers.
    pub async fn settle(&self) {
        let n = self.sentinels.fetch_add(1, Ordering::SeqCst);
        let needle = format!("/v2/zz-sentinel-{n}/tags/list");
        let _ = client().get(format!("{}{needle}", self.url())).send().await;
        let end = Instant::now() + Duration::from_secs(10);
        while self.count(&needle) == 0 {
            assert!(Instant::now() < end, "sentinel request never reached the access log");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_ready(child: &mut Child, port: u16, err_log: &std::path::Path) -> Result<(), String> {
    let http = client();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}: {}", std::fs::read_to_string(err_log).unwrap_or_default()));
        }
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/v2/")).send().await {
            if r.status().as_u16() == 200 || r.status().as_u16() == 401 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("/v2/ did not answer within 20 s: {}", std::fs::read_to_string(err_log).unwrap_or_default()))
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
