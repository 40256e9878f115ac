//! Test harness: runs the real `stevedore` binary on 127.0.0.1 with a temporary store.
//!
//! The server prints `stevedore listening on <addr>` on stdout once it accepts connections;
//! the harness reads that line to learn the port chosen for `--listen 127.0.0.1:0`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub root: PathBuf,
    /// Keeps the temporary store alive for servers started with [`Server::start`].
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// A plain local registry (no default upstream) on a fresh temporary store.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A fresh temporary store with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("data");
        let mut s = Server::start_at(&root, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts the binary on `root` (created if missing) with extra command-line arguments.
    /// Unless `extra` names an upstream (`--upstream`) or a config file (`--config`, which
    /// must then set `proxy.default_upstream` itself), the server gets `--upstream none`, so
    /// no test ever reaches for Docker Hub.
    pub fn start_at(root: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stevedore"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--root")
            .arg(root)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if !extra.iter().any(|a| *a == "--upstream" || *a == "--config") {
            cmd.arg("--upstream").arg("none");
        }
        let mut child = cmd.spawn().expect("spawn stevedore");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            while let Some(Ok(line)) = lines.next() {
                if !sent {
                    if let Some(a) = line.strip_prefix("stevedore listening on ") {
                        let _ = tx.send(a.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("stevedore did not report its listen address within 30 s");
            }
        };
        Server { child, addr, root: root.to_path_buf(), _tmp: None }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `127.0.0.1:PORT`, as skopeo and other clients want it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size of the server process (VmHWM), in bytes.
    pub fn vm_hwm(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
