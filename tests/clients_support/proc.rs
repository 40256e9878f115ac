//! Processes for the client tests: daemons in their own process group (killed as a group on
//! drop, and by the kernel if the test process dies: `setpriv --pdeathsig KILL`), bounded
//! one-shot commands, and a sandbox that keeps the container engines off the host's state and
//! off the network.
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

/// A long-running process in its own process group, stdout and stderr in `log`.
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    stopped: bool,
}

impl Daemon {
    /// Spawns `cmd` (already wrapped as wanted) in a new process group.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Daemon {
        let f = File::create(log).expect("create daemon log");
        cmd.stdin(Stdio::null()).stdout(f.try_clone().expect("clone log handle")).stderr(f).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{name}: cannot start {:?}: {e}", cmd.get_program()));
        Daemon { name: name.to_string(), child, log: log.to_path_buf(), stopped: false }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the leader has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ready` every 100 ms until it holds; panics (with the log) if the daemon exits
    /// first or `limit` passes.
    pub fn wait_ready(&mut self, limit: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited during start-up ({status}); its log:\n{}", self.name, tail(&self.log_text(), 6000));
            }
            if ready() {
                return;
            }
            if start.elapsed() > limit {
                panic!("{} was not ready within {limit:?}; its log:\n{}", self.name, tail(&self.log_text(), 6000));
            }
            std::thread::sleep(Duration::from_millis(100));
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

/// A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// Whether a unix socket (or any file) exists at `p`.
pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
