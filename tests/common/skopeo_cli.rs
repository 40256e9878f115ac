//! Runs the real `skopeo` binary, isolated from the machine's state.
//!
//! Isolation: skopeo (containers/image) keeps a "blob info cache" (known blob locations,
//! compression pairs). For root it lives in `/var/lib/containers/cache`, shared by every run on
//! the machine, which lets later runs skip or mount blobs because of earlier tests. For a
//! non-root user it lives in `$XDG_DATA_HOME/containers/cache` (`~/.local/share/...`).
//! containers/image decides "root or not" with `rootless.GetRootlessEUID()`, which honours
//! `_CONTAINERS_ROOTLESS_UID` before `geteuid()`. So every [`Skopeo`] gets its own throwaway
//! HOME / XDG dirs, and `_CONTAINERS_ROOTLESS_UID` names an unprivileged uid when we are root:
//! the cache (and auth/registries config lookups) then land in the throwaway HOME.
//! [`Skopeo::assert_cache_isolated`] checks after a run that the cache file really is there,
//! so a skopeo that stops honouring this fails loudly instead of sharing state.
//!
//! Signature policy: `--insecure-policy`, so `/etc/containers/policy.json` does not matter.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::proc::{self, euid, tail};

pub const INSTALL_HINT: &str =
    "skopeo is required by this test and was not found: run `bash scripts/install-test-deps.sh` \
     (or `apt-get install skopeo`)";

/// Upper bound for one skopeo run.
pub const SKOPEO_TIMEOUT_SECS: u64 = 300;

pub struct Skopeo {
    home: tempfile::TempDir,
}

impl Skopeo {
    /// Panics with the install hint if skopeo is missing: these tests never skip.
    pub fn new() -> Skopeo {
        match Command::new("skopeo").arg("--version").stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("{INSTALL_HINT}\n`skopeo --version` failed: {o:?}"),
            Err(e) => panic!("{INSTALL_HINT}\n({e})"),
        }
        let home = tempfile::Builder::new().prefix("skopeo-home-").tempdir().expect("tempdir");
        for d in ["share", "config", "cache", "run"] {
            std::fs::create_dir_all(home.path().join(d)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path().join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        Skopeo { home }
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Where containers/image must put its blob info cache for this instance.
    pub fn cache_dir(&self) -> PathBuf {
        self.home.path().join("share").join("containers").join("cache")
    }

    /// skopeo under coreutils `timeout`, so a hung transfer fails the test instead of CI.
    fn command(&self) -> Command {
        let mut c = Command::new("timeout");
        c.args(["--kill-after=10", &SKOPEO_TIMEOUT_SECS.to_string(), "skopeo"]);
        let h = self.home.path();
        let rootless_uid = match euid() {
            0 => 65534,
            u => u,
        };
        // HOME, XDG config/data/cache dirs and TMPDIR in the throwaway HOME, no proxy or
        // container configuration from the environment.
        proc::isolate_env(&mut c, h);
        c.env_remove("_CONTAINERS_USERNS_CONFIGURED")
            .env("XDG_RUNTIME_DIR", h.join("run"))
            .env("_CONTAINERS_ROOTLESS_UID", rootless_uid.to_string())
            .env("_CONTAINERS_ROOTLESS_GID", rootless_uid.to_string())
            .stdin(Stdio::null());
        c
    }

    /// Runs `skopeo --insecure-policy <args>`; panics with its output unless it succeeds.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.run_unchecked(args);
        if !out.status.success() {
            let timed_out = matches!(out.status.code(), Some(124) | Some(137));
            panic!(
                "skopeo {:?} failed ({}{}):\n--- stdout\n{}\n--- stderr\n{}",
                args,
                out.status,
                if timed_out { format!(", timed out after {SKOPEO_TIMEOUT_SECS} s") } else { String::new() },
                String::from_utf8_lossy(&out.stdout),
                tail(&String::from_utf8_lossy(&out.stderr), 8000)
            );
        }
        out
    }

    pub fn run_unchecked(&self, args: &[&str]) -> Output {
        self.command().arg("--insecure-policy").args(args).output().expect("run skopeo")
    }

    /// `skopeo copy` with TLS verification off on both sides (Stevedore serves plain HTTP);
    /// returns stderr (useful with `--debug`).
    pub fn copy(&self, extra: &[&str], src: &str, dst: &str) -> String {
        let mut args = vec!["copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--retry-times=0"];
        args.extend_from_slice(extra);
        args.push(src);
        args.push(dst);
        let out = self.run(&args);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `skopeo inspect --raw` of a `docker://` reference: the exact manifest bytes served.
    pub fn inspect_raw(&self, image: &str) -> Vec<u8> {
        self.run(&["inspect", "--raw", "--tls-verify=false", image]).stdout
    }

    /// Panics unless skopeo wrote its blob info cache inside this instance's HOME.
    pub fn assert_cache_isolated(&self) {
        let dir = self.cache_dir();
        let found = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with("blob-info-cache")))
            .unwrap_or(false);
        assert!(
            found,
            "skopeo did not put its blob info cache in the isolated {}; runs would share state \
             (see tests/common/skopeo_cli.rs)",
            dir.display()
        );
    }
}
