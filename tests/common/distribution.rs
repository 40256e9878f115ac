//! A real upstream: CNCF Distribution (`/usr/bin/docker-registry`, Debian package
//! `docker-registry`) on 127.0.0.1 with filesystem storage, optionally behind htpasswd Basic
//! auth, optionally over TLS with a certificate from a test CA ([`TestPki`]). Its access log (stdout) is captured to a file so tests can count the requests it
//! served; it runs as a [`Daemon`] (own process group, dies with the test process).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::http::Registry;
use super::http::{client, client_trusting};
use super::oci::Image;
use super::proc::{self, tool, Daemon};
use super::rt;
use super::tls::{https_get_status, TestPki};
use super::{wait_log_settled, wait_until_blocking};

pub const USER: &str = "tester";
pub const PASSWORD: &str = "s3cret-pass";
/// `htpasswd -Bbn tester s3cret-pass` (bcrypt, cost 5), for machines without apache2-utils.
const FIXED_HTPASSWD: &str = "tester:$2b$05$sTiDbULwXSQGNRHfg6OB9uUBDe764tetaV6byHbYaJzWxJow6t/K6";

pub struct Distribution {
    pub port: u16,
    daemon: Daemon,
    sentinels: AtomicUsize,
    /// The CA's PEM when serving HTTPS.
    ca_pem: Option<String>,
    /// Set when Distribution runs in a temporary directory of its own.
    _tmp: Option<tempfile::TempDir>,
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

impl Distribution {
    /// Starts Distribution in a temporary directory of its own; see [`Distribution::start_in`].
    pub fn start(auth: bool) -> Distribution {
        let tmp = tempfile::Builder::new().prefix("distribution-").tempdir().expect("tempdir");
        let mut d = Distribution::start_in(tmp.path(), auth);
        d._tmp = Some(tmp);
        d
    }

    /// Starts Distribution over HTTPS (no auth) in a temporary directory of its own, with the
    /// server certificate and key of `pki`.
    pub fn start_tls(pki: &TestPki) -> Distribution {
        let tmp = tempfile::Builder::new().prefix("distribution-tls-").tempdir().expect("tempdir");
        let mut d = Distribution::start_with(tmp.path(), false, Some(pki));
        d._tmp = Some(tmp);
        d
    }

    /// Starts Distribution with filesystem storage (deletes enabled) and logs under `dir`,
    /// with htpasswd Basic auth for [`USER`] when `auth`, and waits for `/v2/` to answer.
    /// Panics with the install hint when the binary is missing.
    pub fn start_in(dir: &Path, auth: bool) -> Distribution {
        Distribution::start_with(dir, auth, None)
    }

    /// [`Distribution::start_in`], over HTTPS with `tls`'s server certificate when given.
    fn start_with(dir: &Path, auth: bool, tls: Option<&TestPki>) -> Distribution {
        let bin = tool("docker-registry");
        let ca_pem = tls.map(|p| p.ca_pem.clone());
        std::fs::create_dir_all(dir).unwrap();
        let mut last = String::new();
        for attempt in 0..3 {
            let port = proc::closed_port();
            let mut cfg = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: stevedore-test-secret\n",
                dir.join("storage").display()
            );
            // Under `http:`, which the format string above ends with.
            if let Some(pki) = tls {
                cfg.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    pki.cert_file.display(),
                    pki.key_file.display()
                ));
            }
            if auth {
                let file = dir.join("htpasswd");
                std::fs::write(&file, format!("{}\n", htpasswd_line())).unwrap();
                cfg.push_str(&format!("auth:\n  htpasswd:\n    realm: stevedore-test\n    path: {}\n", file.display()));
            }
            let cfg_path = dir.join("config.yml");
            std::fs::write(&cfg_path, cfg).unwrap();
            let mut cmd = proc::with_pdeathsig(&bin);
            cmd.arg("serve").arg(&cfg_path);
            for (k, _) in std::env::vars() {
                if k.starts_with("REGISTRY_") || k.to_ascii_lowercase().ends_with("_proxy") {
                    cmd.env_remove(k);
                }
            }
            let access_log = dir.join(format!("access-{attempt}.log"));
            let err_log = dir.join(format!("registry-{attempt}.err"));
            let mut daemon = Daemon::spawn_logs("docker-registry", cmd, &access_log, Some(&err_log));
            let mut exited = None;
            let up = wait_until_blocking(Duration::from_secs(20), || {
                exited = daemon.exit_status();
                exited.is_some() || matches!(get_status(port, "/v2/", ca_pem.as_deref()), Some(200 | 401))
            });
            match exited {
                Some(status) => last = format!("exited with {status}: {}", daemon.all_output()),
                None if up => {
                    return Distribution { port, daemon, sentinels: AtomicUsize::new(0), ca_pem, _tmp: None };
                }
                None => last = format!("/v2/ did not answer within 20 s: {}", daemon.all_output()),
            }
            if !last.contains("address already in use") {
                break;
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    /// `http://127.0.0.1:PORT`, or `https://…` over TLS.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A client for pushing to and probing this registry (trusting its test CA over TLS).
    pub fn client(&self) -> reqwest::Client {
        match &self.ca_pem {
            Some(pem) => client_trusting(pem),
            None => client(),
        }
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        self.daemon.log_text()
    }

    /// The file the access log is written to.
    pub fn access_log_path(&self) -> PathBuf {
        self.daemon.log.clone()
    }

    /// Access-log lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.access_log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Blob GETs served for `repo`.
    pub fn blob_gets(&self, repo: &str) -> usize {
        self.count(&format!("\"GET /v2/{repo}/blobs/"))
    }

    /// Pulls of `repo` in the access log (pushes left out), for failure messages.
    pub fn requests_for(&self, repo: &str) -> String {
        let needle = format!(" /v2/{repo}/");
        self.access_log()
            .lines()
            .filter(|l| l.contains(&needle) && !l.contains("\"PUT ") && !l.contains("\"POST "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until every request answered so far is in the access log. Distribution writes a
    /// line once the handler returned, which may be after the client has the whole answer:
    /// so send a sentinel request, then wait for its line and for the log to stop growing
    /// (the same length for 100 ms). Bounded (10 s).
    pub fn settle(&self) {
        let n = self.sentinels.fetch_add(1, Ordering::SeqCst);
        let needle = format!("/v2/zz-sentinel-{n}/tags/list");
        let _ = get_status(self.port, &needle, self.ca_pem.as_deref());
        let probe = || {
            let log = self.access_log();
            (log.contains(&needle), log.len())
        };
        wait_log_settled(Duration::from_secs(10), Duration::from_millis(100), probe, "Distribution's access log");
    }

    /// The distribution client for this registry (trusting its test CA over TLS).
    pub fn registry(&self) -> Registry {
        Registry::with_client(&self.url(), self.client())
    }

    /// Pushes `img` as `repo:tag` (no credentials), from synchronous code.
    pub fn push(&self, repo: &str, tag: &str, img: &Image) {
        rt().block_on(self.registry().push_image(repo, img, Some(tag)));
    }
}

/// A plain `GET path` to 127.0.0.1:`port`, over TLS trusting `ca_pem` when given.
fn get_status(port: u16, path: &str, ca_pem: Option<&str>) -> Option<u16> {
    match ca_pem {
        Some(pem) => https_get_status(port, path, pem),
        None => proc::http_get_status(port, path),
    }
}
