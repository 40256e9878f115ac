//! Processes for the tests: the external tools they need ([`tool`]), daemons in their own
//! process group (killed as a group on drop, and by the kernel if the test process dies:
//! `setpriv --pdeathsig KILL`), bounded one-shot commands, and a sandbox that keeps the
//! container engines off the host's state and off the network.
//!
//! The sandbox is a private mount namespace (`unshare --mount --propagation private`) in which
//! `/etc`, `/var/lib` and `/opt` are overlays whose upper layers live on a tmpfs, and `/run` is
//! a fresh tmpfs. So whatever an engine writes outside the directories it is given (podman's
//! `/var/lib/containers/cache`, dockerd's `/etc/docker/key.json` and `/run/docker`,
//! containerd's `/opt/containerd`) vanishes with the namespace. Inside, `/etc/hosts` maps every
//! Docker Hub name and `registry.test` to 127.0.0.1 and `/etc/resolv.conf` names a resolver on
//! 127.0.0.1 (none listens): a client that fell back from the mirror to "Docker Hub" would hit
//! a closed loopback port, never the network.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Tools the tests run: (name, absolute path, Debian package).
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
    ("redis-server", "/usr/bin/redis-server", "redis-server"),
    ("strace", "/usr/bin/strace", "strace"),
    ("chromium", "/usr/bin/chromium", "chromium"),
    ("promtool", "/usr/bin/promtool", "prometheus"),
    ("script", "/usr/bin/script", "bsdutils"),
];

/// The absolute path of `name`; panics with the install hint when it is missing (these tests
/// never skip).
pub fn tool(name: &str) -> PathBuf {
    let (_, path, package) = TOOLS.iter().find(|(n, _, _)| *n == name).unwrap_or_else(|| panic!("unknown tool {name}"));
    let p = PathBuf::from(path);
    if !p.exists() {
        panic!(
            "{name} ({path}, Debian package `{package}`) is required by this test and was not \
             found: run `bash scripts/install-test-deps.sh` as root (or `apt-get install {package}`)"
        );
    }
    p
}

/// The effective uid of the test process.
pub fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Panics unless running as root: the engines run as root daemons in mount namespaces.
pub fn require_root() {
    assert_eq!(
        euid(),
        0,
        "tests/clients.rs runs containerd, dockerd and podman as root daemons in private mount \
         namespaces: run it as root"
    );
}

/// Variables that would point a client at the host's configuration, credentials or a proxy.
const SCRUBBED_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "REGISTRY_AUTH_FILE",
    "CONTAINERS_CONF",
    "CONTAINERS_REGISTRIES_CONF",
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERD_ADDRESS",
    "CONTAINERD_NAMESPACE",
    "CONTAINERD_SNAPSHOTTER",
    "XDG_RUNTIME_DIR",
];

/// Removes the variables in [`SCRUBBED_ENV`] and points HOME, XDG dirs and TMPDIR at `home`.
pub fn isolate_env(cmd: &mut Command, home: &Path) {
    for v in SCRUBBED_ENV {
        cmd.env_remove(v);
    }
    for d in ["config", "share", "cache", "tmp"] {
        std::fs::create_dir_all(home.join(d)).expect("create home dirs");
    }
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("share"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("TMPDIR", home.join("tmp"));
}

/// Sends `sig` to every process in group `pgid`.
fn signal_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `n` bytes of `s` (on a char boundary).
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A long-running process in its own process group, stdout (and stderr, unless given a file
/// of its own) in `log`.
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    pub err_log: Option<PathBuf>,
    stopped: bool,
}

impl Daemon {
    /// Spawns `cmd` (already wrapped as wanted) in a new process group, stdout and stderr in
    /// `log`.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> Daemon {
        Daemon::spawn_logs(name, cmd, log, None)
    }

    /// [`Daemon::spawn`] with stderr in `err_log` when given.
    pub fn spawn_logs(name: &str, mut cmd: Command, log: &Path, err_log: Option<&Path>) -> Daemon {
        let f = File::create(log).expect("create daemon log");
        let err = match err_log {
            Some(p) => File::create(p).expect("create daemon error log"),
            None => f.try_clone().expect("clone log handle"),
        };
        cmd.stdin(Stdio::null()).stdout(f).stderr(err).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{name}: cannot start {:?}: {e}", cmd.get_program()));
        Daemon {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            err_log: err_log.map(Path::to_path_buf),
            stopped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the leader has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// What the daemon wrote to `log`.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Everything the daemon wrote: `log`, then the separate stderr log if any.
    pub fn all_output(&self) -> String {
        let mut s = self.log_text();
        if let Some(p) = &self.err_log {
            s.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        s
    }

    /// Polls `ready` every 100 ms until it holds; panics (with the log) if the daemon exits
    /// first or `limit` passes.
    pub fn wait_ready(&mut self, limit: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited during start-up ({status}); its log:\n{}", self.name, tail(&self.all_output(), 6000));
            }
            if ready() {
                return;
            }
            if start.elapsed() > limit {
                panic!("{} was not ready within {limit:?}; its log:\n{}", self.name, tail(&self.all_output(), 6000));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL to the group at once.
    pub fn kill(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        signal_group(self.pid(), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM to the leader only; waits up to `limit` for it to exit and returns its exit
    /// status, or `None` if it still runs then (drop or [`Daemon::kill`] ends it).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.stopped {
            return self.child.try_wait().ok().flatten();
        }
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.pid().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.stopped = true;
                signal_group(self.pid(), "KILL");
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM to the group, up to 10 s for the leader to exit, then SIGKILL to the group.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pgid = self.pid();
        if matches!(self.child.try_wait(), Ok(None)) {
            signal_group(pgid, "TERM");
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Stragglers of the group (and the leader if TERM was not enough).
        signal_group(pgid, "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a finished command printed.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn describe(&self) -> String {
        format!(
            "exit: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            tail(&self.stdout, 6000),
            tail(&self.stderr, 8000)
        )
    }
}

fn read_back(mut f: File) -> String {
    let mut s = Vec::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

/// Runs `cmd` to completion in its own process group; the group is killed and the test fails
/// if it takes longer than `limit`.
pub fn run(what: &str, mut cmd: Command, limit: Duration) -> Out {
    let out = tempfile::tempfile().expect("tempfile");
    let err = tempfile::tempfile().expect("tempfile");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(err.try_clone().expect("clone"))
        .process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: cannot run {:?}: {e}", cmd.get_program()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > limit {
            signal_group(child.id(), "KILL");
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: did not finish within {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                tail(&read_back(out), 4000),
                tail(&read_back(err), 8000)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A finished leader may leave helpers behind in its group: end them.
    signal_group(child.id(), "KILL");
    Out { status, stdout: read_back(out), stderr: read_back(err) }
}

/// [`run`], panicking with the output unless the command succeeded.
pub fn run_ok(what: &str, cmd: Command, limit: Duration) -> Out {
    let o = run(what, cmd, limit);
    assert!(o.status.success(), "{what} failed:\n{}", o.describe());
    o
}

/// The sandbox script: `sh -c SCRIPT sandbox <dir> <program> <args>...`.
const SANDBOX_SCRIPT: &str = r#"set -eu
d="$1"; shift
mount -t tmpfs -o mode=0700 sandbox "$d/ovl"
for p in /etc /var/lib /opt; do
  [ -d "$p" ] || continue
  n="$d/ovl/$(echo "$p" | tr / _)"
  mkdir -p "$n/up" "$n/work"
  mount -t overlay overlay -o "lowerdir=$p,upperdir=$n/up,workdir=$n/work" "$p"
done
mount -t tmpfs -o mode=0755 sandbox /run
[ ! -d "$d/etc" ] || cp -a "$d/etc/." /etc/
cat "$d/hosts" > /etc/hosts
cat "$d/resolv.conf" > /etc/resolv.conf
exec "$@"
"#;

/// Names that must never leave the machine: mapped to 127.0.0.1 inside the sandbox.
pub const PINNED_HOSTS: &str = "docker.io index.docker.io registry-1.docker.io auth.docker.io \
     production.cloudflare.docker.com registry.test";

/// A private mount namespace per command; see the module docs.
pub struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    /// Prepares the sandbox files in `dir`.
    pub fn new(dir: &Path) -> Sandbox {
        std::fs::create_dir_all(dir.join("ovl")).expect("sandbox dir");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n::1 localhost\n127.0.0.1 {PINNED_HOSTS}\n"))
            .unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n").unwrap();
        Sandbox { dir: dir.to_path_buf() }
    }

    /// A file every command of this sandbox finds at `/etc/<rel>` (on the overlay: the
    /// host's `/etc` is not touched), e.g. `docker/certs.d/127.0.0.1:5000/ca.crt`.
    pub fn etc_file(&self, rel: &str, contents: &str) {
        let p = self.dir.join("etc").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    /// `program` run inside the sandbox (its arguments are added by the caller). It gets
    /// SIGKILL if the thread that started it goes away.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "unshare", "--mount", "--propagation", "private"])
            .args(["--", "sh", "-c", SANDBOX_SCRIPT, "sandbox"])
            .arg(&self.dir)
            .arg(program);
        c
    }
}

/// A process outside the sandbox that still dies with the test process.
pub fn with_pdeathsig(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig", "KILL", "--"]).arg(program);
    c
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound, then released); also a free port
/// for a server to listen on.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`), one after another from a
/// per-process start: a port the kernel hands out (`:0`) may be taken by an outgoing
/// connection of a test running in parallel between this check and the server's bind (a
/// replica then failed to start, "Address already in use"); one below the range is never
/// picked by the kernel, and no two calls of one process get the same one.
pub fn closed_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOW);
    if span >= 1_000 {
        let start = std::process::id().wrapping_mul(7_919);
        for _ in 0..span {
            let port = (LOW + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// Whether a unix socket (or any file) exists at `p`.
pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// A plain `GET path` over HTTP/1.1 to 127.0.0.1:`port`, without a runtime: the status
/// code, or `None` when nothing (valid) answered within 5 s.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::Write;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
    head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}
