//! Support for `tests/clients.rs`: real container clients (containerd/ctr, podman, dockerd,
//! skopeo) pulling through Stevedore from CNCF Distribution upstreams, everything on loopback
//! and in temporary directories. Not a test target itself.
#![allow(dead_code)]

pub mod engines;
pub mod image;
pub mod proc;
pub mod registry;
pub mod stevedore;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Tools the client tests run: (name, absolute path, Debian package).
const TOOLS: &[(&str, &str, &str)] = &[
    ("containerd", "/usr/bin/containerd", "containerd"),
    ("ctr", "/usr/bin/ctr", "containerd"),
    ("runc", "/usr/sbin/runc", "runc"),
    ("podman", "/usr/bin/podman", "podman"),
    ("dockerd", "/usr/sbin/dockerd", "docker.io"),
    // Debian's CLI, not whatever `docker` comes first on PATH.
    ("docker", "/usr/bin/docker", "docker.io"),
    ("skopeo", "/usr/bin/skopeo", "skopeo"),
    ("docker-registry", "/usr/bin/docker-registry", "docker-registry"),
    ("setpriv", "/usr/bin/setpriv", "util-linux"),
    ("unshare", "/usr/bin/unshare", "util-linux"),
];

/// The absolute path of `name`; panics with the install hint when it is missing (these tests
/// never skip).
pub fn tool(name: &str) -> PathBuf {
    let (_, path, package) = TOOLS.iter().find(|(n, _, _)| *n == name).unwrap_or_else(|| panic!("unknown tool {name}"));
    let p = PathBuf::from(path);
    if !p.exists() {
        panic!(
            "{name} ({path}, Debian package `{package}`) is required by tests/clients.rs and was \
             not found: run `bash scripts/install-test-deps.sh` as root (or `apt-get install \
             {package}`)"
        );
    }
    p
}

/// Panics unless running as root: the engines run as root daemons in mount namespaces.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let euid =
        status.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)).expect("Uid line");
    assert_eq!(
        euid, "0",
        "tests/clients.rs runs containerd, dockerd and podman as root daemons in private mount \
         namespaces: run it as root"
    );
}

/// A small runtime for the HTTP bits (pushing, readiness probes).
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime")
    })
}

/// An HTTP client for loopback: no proxy, no redirects, bounded.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}
