//! The real container engines, each with every bit of state in a temporary directory and run
//! in the [`Sandbox`]: a private containerd (CRI off, `native` snapshotter), dockerd on its
//! own containerd, and podman with its own storage and configuration files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::proc::{self, tool, Daemon, Sandbox};

pub struct Containerd {
    daemon: Daemon,
    pub sock: PathBuf,
    pub dir: PathBuf,
    sandbox: Sandbox,
}

impl Containerd {
    /// Starts containerd with root, state, socket and `opt` under `dir`. Namespaces do not
    /// share content (`content_sharing_policy = "isolated"`), so a pull in a fresh namespace
    /// fetches every blob again.
    pub fn start(dir: &Path) -> Containerd {
        let containerd = tool("containerd");
        tool("ctr");
        tool("runc");
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("containerd.sock");
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.devmapper\", \
             \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.btrfs\", \
             \"io.containerd.snapshotter.v1.zfs\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n  level = \"info\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            opt = dir.join("opt").display(),
        );
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config).unwrap();
        let sandbox = Sandbox::new(&dir.join("sandbox"));
        let mut cmd = sandbox.command(containerd);
        cmd.arg("--config").arg(&cfg);
        proc::isolate_env(&mut cmd, &dir.join("home"));
        let mut daemon = Daemon::spawn("containerd", cmd, &dir.join("containerd.log"));
        daemon.wait_ready(Duration::from_secs(30), || {
            proc::exists(&sock)
                && proc::run(
                    "ctr version",
                    ctr_command(&sandbox, &sock, dir, "default", &["version"]),
                    Duration::from_secs(10),
                )
                .status
                .success()
        });
        Containerd { daemon, sock, dir: dir.to_path_buf(), sandbox }
    }

    /// `ctr --address SOCK --namespace NS <args>`, in the sandbox.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> Command {
        ctr_command(&self.sandbox, &self.sock, &self.dir, ns, args)
    }

    /// `sh -c script` in the sandbox with `$CTR` set to the ctr command line for `ns`.
    pub fn shell(&self, ns: &str, script: &str) -> Command {
        let mut cmd = self.sandbox.command("sh");
        cmd.arg("-c")
            .arg(script)
            .env("CTR", format!("{} --address {} --namespace {ns}", tool("ctr").display(), self.sock.display()));
        proc::isolate_env(&mut cmd, &self.dir.join("home"));
        cmd
    }

    pub fn log(&self) -> String {
        self.daemon.log_text()
    }
}

fn ctr_command(sandbox: &Sandbox, sock: &Path, dir: &Path, ns: &str, args: &[&str]) -> Command {
    let mut cmd = sandbox.command(tool("ctr"));
    cmd.arg("--address").arg(sock).arg("--namespace").arg(ns).args(args);
    proc::isolate_env(&mut cmd, &dir.join("home"));
    cmd
}

/// dockerd (Debian's `docker.io`) on a private containerd, with data root, exec root, pid
/// file, socket and trust key under its directory; no iptables, no bridge, vfs storage, and
/// Stevedore as its only registry mirror.
pub struct Dockerd {
    // Field order is drop order: dockerd before its containerd.
    daemon: Daemon,
    pub containerd: Containerd,
    pub sock: PathBuf,
    dir: PathBuf,
}

impl Dockerd {
    pub fn start(dir: &Path, mirror: &str) -> Dockerd {
        Dockerd::start_with_etc(dir, mirror, &[])
    }

    /// [`Dockerd::start`] with files under the daemon's `/etc` (`(path below /etc, contents)`,
    /// e.g. `docker/certs.d/127.0.0.1:5000/ca.crt`), in its sandbox only.
    pub fn start_with_etc(dir: &Path, mirror: &str, etc: &[(&str, &str)]) -> Dockerd {
        let dockerd = tool("dockerd");
        tool("docker");
        std::fs::create_dir_all(dir).unwrap();
        let containerd = Containerd::start(&dir.join("containerd"));
        let sock = dir.join("docker.sock");
        let cfg = dir.join("daemon.json");
        std::fs::write(&cfg, serde_json::json!({"deprecated-key-path": dir.join("key.json")}).to_string()).unwrap();
        let sandbox = Sandbox::new(&dir.join("sandbox"));
        for (rel, contents) in etc {
            sandbox.etc_file(rel, contents);
        }
        let mut cmd = sandbox.command(dockerd);
        cmd.arg("--config-file")
            .arg(&cfg)
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .arg("--containerd")
            .arg(&containerd.sock)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
                "--storage-driver=vfs",
                "--log-level=info",
            ])
            .arg(format!("--registry-mirror={mirror}"));
        proc::isolate_env(&mut cmd, &dir.join("home"));
        let mut daemon = Daemon::spawn("dockerd", cmd, &dir.join("dockerd.log"));
        daemon.wait_ready(Duration::from_secs(40), || {
            proc::exists(&sock)
                && proc::run(
                    "docker version",
                    docker_command(&sock, dir, &["version", "--format", "{{.Server.Version}}"]),
                    Duration::from_secs(10),
                )
                .status
                .success()
        });
        Dockerd { daemon, containerd, sock, dir: dir.to_path_buf() }
    }

    /// `docker -H unix://SOCK <args>` (the CLI only talks to the daemon's socket).
    pub fn docker(&self, args: &[&str]) -> Command {
        docker_command(&self.sock, &self.dir, args)
    }

    pub fn log(&self) -> String {
        self.daemon.log_text()
    }
}

fn docker_command(sock: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(tool("docker"));
    proc::isolate_env(&mut cmd, &dir.join("cli-home"));
    cmd.env("DOCKER_CONFIG", dir.join("cli-home").join("docker"))
        .arg("-H")
        .arg(format!("unix://{}", sock.display()))
        .args(args);
    cmd
}

/// podman as root with its own storage (`vfs`), run root, tmp dir, `registries.conf`,
/// `containers.conf`, `storage.conf` and signature policy, in the sandbox.
pub struct Podman {
    dir: PathBuf,
    sandbox: Sandbox,
}

impl Podman {
    /// `mirror`: Stevedore's `host:port`; docker.io is mirrored through `<mirror>/docker.io`.
    pub fn new(dir: &Path, mirror: &str) -> Podman {
        tool("podman");
        for d in ["root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(
            dir.join("registries.conf"),
            format!(
                "unqualified-search-registries = []\n\
                 short-name-mode = \"disabled\"\n\n\
                 [[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
                 [[registry.mirror]]\nlocation = \"{mirror}/docker.io\"\ninsecure = true\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.join("runroot").display(),
                dir.join("root").display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            "[engine]\nevents_logger = \"none\"\ncgroup_manager = \"cgroupfs\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("auth.json"), r#"{"auths":{}}"#).unwrap();
        std::fs::write(dir.join("policy.json"), r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
        Podman { dir: dir.to_path_buf(), sandbox: Sandbox::new(&dir.join("sandbox")) }
    }

    /// The podman command line with its global options, as a shell word list.
    pub fn command_line(&self) -> String {
        let d = &self.dir;
        format!(
            "{} --root {} --runroot {} --tmpdir {} --storage-driver vfs --events-backend none \
             --cgroup-manager cgroupfs",
            tool("podman").display(),
            d.join("root").display(),
            d.join("runroot").display(),
            d.join("tmp").display()
        )
    }

    fn env(&self, cmd: &mut Command) {
        proc::isolate_env(cmd, &self.dir.join("home"));
        cmd.env("CONTAINERS_REGISTRIES_CONF", self.dir.join("registries.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("REGISTRY_AUTH_FILE", self.dir.join("auth.json"));
    }

    /// `podman <global options> <args>` in the sandbox.
    pub fn podman(&self, args: &[&str]) -> Command {
        let mut cmd = self.sandbox.command("sh");
        cmd.arg("-c").arg(format!("exec {} \"$@\"", self.command_line())).arg("podman").args(args);
        self.env(&mut cmd);
        cmd
    }

    /// `sh -c script` in the sandbox with `$PODMAN` set to the podman command line.
    pub fn shell(&self, script: &str) -> Command {
        let mut cmd = self.sandbox.command("sh");
        cmd.arg("-c").arg(script).env("PODMAN", self.command_line());
        self.env(&mut cmd);
        cmd
    }

    pub fn policy(&self) -> PathBuf {
        self.dir.join("policy.json")
    }
}
