//! CNCF Distribution (`/usr/bin/docker-registry`) as a stand-in upstream on 127.0.0.1, its
//! access log captured to count what reached it, and a minimal pusher.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::image::TestImage;
use super::proc::{self, Daemon};
use super::{http, rt, tool};

pub struct Distribution {
    pub port: u16,
    daemon: Daemon,
    sentinels: AtomicUsize,
}

impl Distribution {
    /// Starts Distribution with filesystem storage under `dir` and waits for `/v2/`.
    pub fn start(dir: &Path) -> Distribution {
        let bin = tool("docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        let mut last = String::new();
        for attempt in 0..3 {
            let port = proc::closed_port();
            let cfg = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: stevedore-clients-test\n",
                dir.join("storage").display()
            );
            let cfg_path = dir.join("config.yml");
            std::fs::write(&cfg_path, cfg).unwrap();
            let mut cmd = proc::with_pdeathsig(&bin);
            cmd.arg("serve").arg(&cfg_path);
            for (k, _) in std::env::vars() {
                if k.starts_with("REGISTRY_") || k.to_ascii_lowercase().ends_with("_proxy") {
                    cmd.env_remove(k);
                }
            }
            let log = dir.join(format!("registry-{attempt}.log"));
            let mut daemon = Daemon::spawn("docker-registry", cmd, &log);
            let url = format!("http://127.0.0.1:{port}/v2/");
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                if daemon.exit_status().is_some() {
                    last = daemon.log_text();
                    break;
                }
                let st = rt().block_on(async { http().get(&url).send().await.map(|r| r.status().as_u16()) });
                if matches!(st, Ok(200)) {
                    return Distribution { port, daemon, sentinels: AtomicUsize::new(0) };
                }
                if Instant::now() > end {
                    last = format!("/v2/ did not answer within 20 s: {}", daemon.log_text());
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !last.contains("address already in use") {
                break;
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The access log (Distribution writes it with its other output).
    pub fn access_log(&self) -> String {
        self.daemon.log_text()
    }

    /// Access-log lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.access_log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Requests for `repo` in the access log, for failure messages.
    pub fn requests_for(&self, repo: &str) -> String {
        let needle = format!(" /v2/{repo}/");
        self.access_log()
            .lines()
            .filter(|l| l.contains(&needle) && !l.contains("\"PUT ") && !l.contains("\"POST "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until every request answered so far is in the access log: a sentinel request
    /// must show up there (the log is written after each response).
    pub fn settle(&self) {
        let n = self.sentinels.fetch_add(1, Ordering::SeqCst);
        let needle = format!("/v2/zz-sentinel-{n}/tags/list");
        let url = format!("{}{needle}", self.url());
        let _ = rt().block_on(async { http().get(&url).send().await.map(|r| r.status()) });
        let end = Instant::now() + Duration::from_secs(10);
        while self.count(&needle) == 0 {
            assert!(Instant::now() < end, "sentinel request never reached the access log");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Pushes `img` as `repo:tag`.
    pub fn push(&self, repo: &str, tag: &str, img: &TestImage) {
        let base = self.url();
        rt().block_on(async {
            for b in img.blobs() {
                push_blob(&base, repo, &b.data, &b.digest).await;
            }
            let url = format!("{base}/v2/{repo}/manifests/{tag}");
            let r = http()
                .put(&url)
                .header("content-type", &img.manifest.media_type)
                .body(img.manifest.data.clone())
                .send()
                .await
                .expect("PUT manifest");
            let st = r.status().as_u16();
            let dcd = r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
            assert_eq!(st, 201, "PUT {url}: {}", r.text().await.unwrap_or_default());
            assert_eq!(dcd.as_deref(), Some(img.manifest.digest.as_str()), "PUT {url}: digest");
        });
    }
}

async fn push_blob(base: &str, repo: &str, data: &[u8], digest: &str) {
    let r = http()
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .header("content-length", "0")
        .send()
        .await
        .expect("POST upload");
    assert_eq!(r.status().as_u16(), 202, "POST {repo} upload");
    let loc = r.headers().get("location").and_then(|v| v.to_str().ok()).expect("upload Location").to_string();
    let loc = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http()
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("PUT upload");
    let st = r.status().as_u16();
    assert_eq!(st, 201, "PUT {repo} blob {digest}: {}", r.text().await.unwrap_or_default());
}
