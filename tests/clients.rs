//! Real container clients pulling through Stevedore: containerd (`ctr` with a `hosts.toml`
//! mirror, `?ns=`), podman (`registries.conf` mirror with a `/docker.io` path prefix), Debian's
//! dockerd (`--registry-mirror`, plain names) and skopeo, all pulling the same image into one
//! cache.
//!
//! Two CNCF Distribution instances on 127.0.0.1 stand in for the upstreams: one is configured
//! in Stevedore as `docker.io` (and is the default upstream), the other as `registry.test`.
//! Every engine runs as root with all of its state in a temporary directory, inside a private
//! mount namespace where Docker Hub's names resolve to 127.0.0.1 and nothing else resolves (see
//! `common/proc.rs`): nothing here can reach beyond loopback, and a client that
//! bypassed the mirror would fail rather than succeed.
//!
//! One test with a sub-step per client: each sub-step runs even if an earlier one failed, and
//! the failure names every client that failed. Needs the packages installed by
//! `scripts/install-test-deps.sh` (it fails with that hint otherwise; it never skips).

mod common;

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use common::data::sha256;
use common::distribution::Distribution;
use common::engines::{Containerd, Dockerd, Podman};
use common::oci::{self, Image};
use common::proc::{self, require_root, run_ok, tool, Sandbox};
use common::stevedore::{show, Access, Stevedore};
use common::store;

/// The image every client pulls: `docker.io/library/small:latest`.
const SMALL: &str = "library/small";
/// The second upstream's image: `registry.test/team/other:latest`.
const OTHER: &str = "team/other";
/// Bound on any one client command.
const LIMIT: Duration = Duration::from_secs(60);

/// Upstreams, images and Stevedore, shared by every step. Field order is drop order.
struct World {
    sd: Stevedore,
    hub: Distribution,
    second: Distribution,
    small: Image,
    other: Image,
    tmp: tempfile::TempDir,
}

impl World {
    fn setup() -> World {
        require_root();
        tool("setpriv");
        tool("unshare");
        let tmp = tempfile::Builder::new().prefix("sdc-").tempdir().expect("tempdir");
        let hub = Distribution::start_in(&tmp.path().join("hub"), false);
        let second = Distribution::start_in(&tmp.path().join("second"), false);
        let small = oci::build("small", 41, 48 * 1024, false);
        let other = oci::build("other", 42, 48 * 1024, true);
        hub.push(SMALL, "latest", &small);
        second.push(OTHER, "latest", &other);
        let config = format!(
            "[storage]\nfsync = false\n\n\
             [proxy]\ndefault_upstream = \"docker.io\"\nfill_timeout = \"60s\"\nhead_cache_ttl = \"30s\"\n\n\
             [[upstreams]]\nhost = \"docker.io\"\naliases = [\"index.docker.io\", \"registry-1.docker.io\"]\n\
             endpoints = [\"{}\"]\ntag_ttl = \"1h\"\nconnect_timeout = \"5s\"\nread_timeout = \"20s\"\n\n\
             [[upstreams]]\nhost = \"registry.test\"\nendpoints = [\"{}\"]\ntag_ttl = \"1h\"\n\
             connect_timeout = \"5s\"\nread_timeout = \"20s\"\n",
            hub.url(),
            second.url()
        );
        let sd = Stevedore::start_in(&tmp.path().join("stevedore"), &config);
        World { sd, hub, second, small, other, tmp }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Stevedore's requests since `mark`, checked to be all successful.
    fn requests_since(&self, mark: usize, client: &str) -> Vec<Access> {
        let reqs = self.sd.requests_since(mark);
        assert!(!reqs.is_empty(), "{client}: no request reached Stevedore (was the mirror bypassed?)");
        let bad: Vec<&Access> = reqs.iter().filter(|a| a.status >= 400).collect();
        assert!(
            bad.is_empty(),
            "{client}: Stevedore answered with errors:\n{}\nall requests:\n{}\nStevedore log:\n{}",
            bad.iter().map(|a| format!("  {a}")).collect::<Vec<_>>().join("\n"),
            show(&reqs),
            proc::tail(&self.sd.problems(), 4000)
        );
        reqs
    }
}

/// Asserts that `reqs` fetched `repo:latest` (`path_repo` as the client names it) and every
/// blob of `img`.
fn assert_fetched(reqs: &[Access], path_repo: &str, img: &Image, client: &str) {
    let tag = format!("/v2/{path_repo}/manifests/latest");
    assert!(reqs.iter().any(|a| a.path() == tag), "{client}: no request for {tag}; requests:\n{}", show(reqs));
    for b in img.blobs() {
        let p = format!("/v2/{path_repo}/blobs/{}", b.digest);
        assert!(
            reqs.iter().any(|a| a.method == "GET" && a.path() == p),
            "{client}: no GET {p}; requests:\n{}",
            show(reqs)
        );
    }
}

/// Asserts that `reqs` holds `method path` (query ignored).
fn assert_request(reqs: &[Access], method: &str, path: &str, client: &str) {
    assert!(
        reqs.iter().any(|a| a.method == method && a.path() == path),
        "{client}: no {method} {path}; requests:\n{}",
        show(reqs)
    );
}

/// Writes `img`'s files under `dir` (to compare an unpacked root file system against).
fn write_expected(img: &Image, dir: &Path) -> PathBuf {
    for (path, data) in &img.files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    dir.to_path_buf()
}

/// Shell lines comparing every file of `img` under the directory in `$M` with `expect`.
fn cmp_lines(img: &Image, expect: &Path) -> String {
    img.files.iter().map(|(p, _)| format!("cmp -- \"$M/{p}\" \"{}/{p}\"\n", expect.display())).collect()
}

/// The chain ID of the image's top layer (what containerd names the unpacked snapshot).
fn chain_id(img: &Image) -> String {
    let mut chain = img.diff_ids[0].clone();
    for d in &img.diff_ids[1..] {
        chain = sha256(format!("{chain} {d}").as_bytes());
    }
    chain
}

/// Writes `<dir>/<host>/hosts.toml` mirroring `host` through `mirror` (a `[host."..."]` key,
/// with `extra` lines under it); the upstream of last resort (`server`) is a closed loopback
/// port, so only the mirror can serve.
fn write_hosts_toml(dir: &Path, host: &str, mirror: &str, extra: &str) {
    std::fs::create_dir_all(dir.join(host)).unwrap();
    std::fs::write(
        dir.join(host).join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:{}\"\n\n\
             [host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{extra}",
            proc::closed_port()
        ),
    )
    .unwrap();
}

/// containerd (`ctr images pull --hosts-dir`, `server` on a closed port), each case in its own
/// containerd namespace (content is not shared between them, so each fetches every blob):
/// `?ns=docker.io`, `?ns=registry.test`, and `override_path` with a `/v2/docker.io` mirror
/// path (containerd then sends the prefix *and* `?ns=docker.io`). Stevedore must echo
/// `OCI-Namespace`; digests match; the image is unpacked into the native snapshotter (chain
/// ID from the pushed diff_ids) and its files read back through `ctr images mount`.
fn containerd_step(w: &World) {
    let dir = w.dir("containerd");
    let ctd = Containerd::start(&dir);
    let plain = dir.join("certs.d");
    let mirror = format!("http://{}", w.sd.addr);
    write_hosts_toml(&plain, "docker.io", &mirror, "");
    write_hosts_toml(&plain, "registry.test", &mirror, "");
    let overridden = dir.join("certs-override.d");
    write_hosts_toml(&overridden, "docker.io", &format!("{mirror}/v2/docker.io"), "  override_path = true\n");
    let small_ref = format!("docker.io/{SMALL}:latest");
    let other_ref = format!("registry.test/{OTHER}:latest");
    let prefixed = format!("docker.io/{SMALL}");
    let cases = [
        ("docker.io ?ns=", "ns-docker", &plain, &small_ref, SMALL, "docker.io", &w.small),
        ("registry.test ?ns=", "ns-registry-test", &plain, &other_ref, OTHER, "registry.test", &w.other),
        ("docker.io override_path", "ns-override", &overridden, &small_ref, prefixed.as_str(), "docker.io", &w.small),
    ];
    for (label, namespace, hosts, reference, path_repo, ns, img) in cases {
        let client = format!("containerd ({label})");
        let mark = w.sd.requests().len();
        let pull = run_ok(
            &format!("{client}: ctr images pull {reference}"),
            ctd.ctr(
                namespace,
                &[
                    "images",
                    "pull",
                    "--hosts-dir",
                    hosts.to_str().unwrap(),
                    "--snapshotter",
                    "native",
                    "--http-dump",
                    reference,
                ],
            ),
            LIMIT,
        );
        let reqs = w.requests_since(mark, &client);
        eprintln!("{client}: requests Stevedore saw:\n{}", show(&reqs));
        let without_ns: Vec<&Access> = reqs.iter().filter(|a| a.query("ns").as_deref() != Some(ns)).collect();
        assert!(
            without_ns.is_empty(),
            "{client}: requests without ?ns={ns}:\n{}",
            without_ns.iter().map(|a| format!("  {a}")).collect::<Vec<_>>().join("\n")
        );
        assert_fetched(&reqs, path_repo, img, &client);
        // Resolve with HEAD on the tag, then fetch the manifest by digest.
        assert_request(&reqs, "HEAD", &format!("/v2/{path_repo}/manifests/latest"), &client);
        assert_request(&reqs, "GET", &format!("/v2/{path_repo}/manifests/{}", img.manifest.digest), &client);
        let echo = format!("Oci-Namespace: {ns}");
        assert!(
            pull.stderr.contains(&echo),
            "{client}: no `{echo}` in the responses ctr dumped:\n{}",
            proc::tail(&pull.stderr, 6000)
        );
        let ls = run_ok(&format!("{client}: ctr images ls"), ctd.ctr(namespace, &["images", "ls"]), LIMIT);
        let digest = ls
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference.as_str()))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_else(|| panic!("{client}: {reference} not in `ctr images ls`:\n{}", ls.stdout));
        assert_eq!(digest, img.manifest.digest, "{client}: pulled digest differs from the pushed manifest");
        let chain = chain_id(img);
        run_ok(
            &format!("{client}: unpacked snapshot {chain} (chain of the pushed diff_ids)"),
            ctd.ctr(namespace, &["snapshots", "--snapshotter", "native", "info", &chain]),
            LIMIT,
        );
        let expect = write_expected(img, &dir.join(format!("expect-{namespace}")));
        let mnt = dir.join(format!("mnt-{namespace}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let script = format!(
            "set -e\nM=\"{}\"\n$CTR images mount --snapshotter native {reference} \"$M\" >/dev/null\n{}\
             $CTR images unmount --rm \"$M\" >/dev/null\n",
            mnt.display(),
            cmp_lines(img, &expect)
        );
        run_ok(&format!("{client}: ctr images mount + compare files"), ctd.shell(namespace, &script), LIMIT);
    }
}

/// podman (`registries.conf` mirror `<stevedore>/docker.io`): requests arrive with the
/// `/v2/docker.io/` prefix and no `ns`; digest and image id match; files read back through
/// `podman image mount`.
fn podman_step(w: &World) {
    let dir = w.dir("podman");
    let p = Podman::new(&dir, &w.sd.addr);
    let reference = format!("docker.io/{SMALL}:latest");
    let mark = w.sd.requests().len();
    let policy = p.policy();
    run_ok("podman: pull", p.podman(&["pull", "--signature-policy", policy.to_str().unwrap(), &reference]), LIMIT);
    let reqs = w.requests_since(mark, "podman");
    eprintln!("podman: requests Stevedore saw:\n{}", show(&reqs));
    let odd: Vec<&Access> = reqs
        .iter()
        .filter(|a| {
            a.query("ns").is_some() || !(a.path() == "/v2/" || a.path().starts_with(&format!("/v2/docker.io/{SMALL}/")))
        })
        .collect();
    assert!(
        odd.is_empty(),
        "podman: requests outside /v2/docker.io/{SMALL}/ (or with ns):\n{}",
        odd.iter().map(|a| format!("  {a}")).collect::<Vec<_>>().join("\n")
    );
    assert_fetched(&reqs, &format!("docker.io/{SMALL}"), &w.small, "podman");
    assert_request(&reqs, "GET", "/v2/", "podman");
    assert_request(&reqs, "GET", &format!("/v2/docker.io/{SMALL}/manifests/latest"), "podman");
    let inspect = run_ok(
        "podman: image inspect",
        p.podman(&["image", "inspect", "--format", "{{.Digest}} {{.Id}}", &reference]),
        LIMIT,
    );
    let got: Vec<&str> = inspect.stdout.split_whitespace().collect();
    let config_hex = w.small.config.digest.trim_start_matches("sha256:");
    assert_eq!(
        got,
        [w.small.manifest.digest.as_str(), config_hex],
        "podman: digest and image id (manifest digest, config digest)"
    );
    let expect = write_expected(&w.small, &dir.join("expect"));
    let script = format!(
        "set -e\nM=$($PODMAN image mount {reference})\n{}$PODMAN image unmount {reference} >/dev/null\n",
        cmp_lines(&w.small, &expect)
    );
    run_ok("podman: image mount + compare files", p.shell(&script), LIMIT);
}

/// dockerd with `--registry-mirror` (the daemon cannot reach Docker Hub here, so a mirror
/// failure fails the pull): plain `/v2/library/small/...` requests with no `ns`; the pull
/// reports the pushed digest, the image id is the config digest, RootFS layers are the pushed
/// diff_ids, and a container created from it holds the image's files.
fn docker_step(w: &World) {
    let dir = w.dir("docker");
    let d = Dockerd::start(&dir, &w.sd.url(""));
    let mark = w.sd.requests().len();
    let pull = run_ok("docker: pull small", d.docker(&["pull", "small"]), LIMIT);
    let reqs = w.requests_since(mark, "docker");
    eprintln!("docker: requests Stevedore saw:\n{}", show(&reqs));
    let with_ns: Vec<&Access> = reqs.iter().filter(|a| a.query("ns").is_some()).collect();
    assert!(with_ns.is_empty(), "docker: requests with ns (the classic daemon sends none):\n{}", show(&reqs));
    assert_fetched(&reqs, SMALL, &w.small, "docker");
    // The daemon pings, resolves the tag with HEAD, then GETs the manifest by digest.
    assert_request(&reqs, "GET", "/v2/", "docker");
    assert_request(&reqs, "HEAD", &format!("/v2/{SMALL}/manifests/latest"), "docker");
    assert_request(&reqs, "GET", &format!("/v2/{SMALL}/manifests/{}", w.small.manifest.digest), "docker");
    let digest_line = format!("Digest: {}", w.small.manifest.digest);
    assert!(pull.stdout.contains(&digest_line), "docker: pull did not report `{digest_line}`:\n{}", pull.describe());
    let inspect = run_ok(
        "docker: image inspect",
        d.docker(&["image", "inspect", "--format", "{{.Id}}|{{json .RepoDigests}}|{{json .RootFS.Layers}}", "small"]),
        LIMIT,
    );
    let parts: Vec<&str> = inspect.stdout.trim().splitn(3, '|').collect();
    assert_eq!(parts.len(), 3, "docker: inspect output {:?}", inspect.stdout);
    assert_eq!(parts[0], w.small.config.digest, "docker: image id (config digest)");
    let repo_digests: Vec<String> = serde_json::from_str(parts[1]).expect("RepoDigests JSON");
    assert!(
        repo_digests.iter().any(|r| r.ends_with(&format!("small@{}", w.small.manifest.digest))),
        "docker: RepoDigests {repo_digests:?} lack the pushed manifest digest {}",
        w.small.manifest.digest
    );
    let layers: Vec<String> = serde_json::from_str(parts[2]).expect("RootFS.Layers JSON");
    assert_eq!(layers, w.small.diff_ids, "docker: RootFS layers (diff_ids)");
    run_ok(
        "docker: create a container",
        d.docker(&["create", "--network", "none", "--name", "stevedore-small", "small"]),
        LIMIT,
    );
    let out = dir.join("out");
    for (i, (path, data)) in w.small.files.iter().enumerate() {
        let dst = out.join(i.to_string());
        std::fs::create_dir_all(&out).unwrap();
        run_ok(
            &format!("docker: cp /{path} out of the container"),
            d.docker(&["cp", &format!("stevedore-small:/{path}"), dst.to_str().unwrap()]),
            LIMIT,
        );
        assert!(
            std::fs::read(&dst).ok().as_deref() == Some(data.as_slice()),
            "docker: /{path} in the container differs from the image's"
        );
    }
    run_ok("docker: rm the container", d.docker(&["rm", "stevedore-small"]), LIMIT);
}

/// skopeo with a single-component name (`<stevedore>/small`, no namespace): Stevedore adds
/// `library/` for the default upstream and serves the same digest.
fn skopeo_step(w: &World) {
    let dir = w.dir("skopeo");
    let sb = Sandbox::new(&dir.join("sandbox"));
    let layout = dir.join("layout");
    let mark = w.sd.requests().len();
    let mut cmd = sb.command(tool("skopeo"));
    cmd.args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/small:latest", w.sd.addr))
        .arg(format!("oci:{}:latest", layout.display()));
    proc::isolate_env(&mut cmd, &dir.join("home"));
    run_ok("skopeo: copy", cmd, LIMIT);
    let reqs = w.requests_since(mark, "skopeo");
    eprintln!("skopeo: requests Stevedore saw:\n{}", show(&reqs));
    assert_fetched(&reqs, "small", &w.small, "skopeo");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index.json JSON");
    assert_eq!(
        index["manifests"][0]["digest"].as_str(),
        Some(w.small.manifest.digest.as_str()),
        "skopeo: digest in the OCI layout"
    );
}

/// All dialects landed in one cache: two repositories, each blob once in the store, and each
/// blob fetched from its upstream exactly once.
fn one_cache_step(w: &World) {
    let repos = store::repo_dirs(w.sd.root());
    let want: BTreeSet<String> = [format!("docker.io/{SMALL}"), format!("registry.test/{OTHER}")].into_iter().collect();
    assert_eq!(repos, want, "repositories in Stevedore's store");
    let mut want_blobs: Vec<String> = w.small.digests();
    want_blobs.extend(w.other.digests());
    want_blobs.sort();
    assert_eq!(store::blob_files(w.sd.root()), want_blobs, "files under blobs/ (each blob once)");
    assert!(
        store::ingest_leftovers(w.sd.root()).is_empty(),
        "ingest leftovers: {:?}",
        store::ingest_leftovers(w.sd.root())
    );
    for (name, reg, repo, img) in
        [("docker.io", &w.hub, SMALL, &w.small), ("registry.test", &w.second, OTHER, &w.other)]
    {
        reg.settle();
        let gets: Vec<(String, usize)> = img
            .blobs()
            .iter()
            .map(|b| {
                let n = reg.count(&format!("\"GET /v2/{repo}/blobs/{} ", b.digest));
                (b.digest.clone(), n)
            })
            .collect();
        assert!(
            gets.iter().all(|(_, n)| *n == 1),
            "upstream {name}: blob GETs per digest should be 1 each, got {gets:?}; its log:\n{}",
            reg.requests_for(repo)
        );
        let manifest_gets = reg.count(&format!("\"GET /v2/{repo}/manifests/"));
        assert_eq!(manifest_gets, 1, "upstream {name}: manifest GETs; its log:\n{}", reg.requests_for(repo));
    }
}

/// The four clients at once on a cold image (`library/burst`, two ~2 MiB layers): every pull
/// succeeds with the pushed digest, and the upstream sees one GET per blob and one manifest
/// GET however the requests interleave.
fn concurrent_step(w: &World) {
    const BURST: &str = "library/burst";
    let burst = oci::build("burst", 43, 2 << 20, false);
    w.hub.push(BURST, "latest", &burst);
    let dir = w.dir("burst");
    // Engines first: their start-up is not part of the race.
    let ctd = Containerd::start(&dir.join("containerd"));
    let hosts = dir.join("certs.d");
    write_hosts_toml(&hosts, "docker.io", &format!("http://{}", w.sd.addr), "");
    let dockerd = Dockerd::start(&dir.join("docker"), &w.sd.url(""));
    let podman = Podman::new(&dir.join("podman"), &w.sd.addr);
    let sb = Sandbox::new(&dir.join("skopeo-sandbox"));
    let layout = dir.join("skopeo-layout");
    let reference = format!("docker.io/{BURST}:latest");
    let mut skopeo = sb.command(tool("skopeo"));
    skopeo
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/burst:latest", w.sd.addr))
        .arg(format!("oci:{}:latest", layout.display()));
    proc::isolate_env(&mut skopeo, &dir.join("skopeo-home"));
    let policy = podman.policy();
    let pulls = vec![
        (
            "containerd",
            ctd.ctr(
                "burst",
                &["images", "pull", "--hosts-dir", hosts.to_str().unwrap(), "--snapshotter", "native", &reference],
            ),
        ),
        ("podman", podman.podman(&["pull", "--signature-policy", policy.to_str().unwrap(), &reference])),
        ("docker", dockerd.docker(&["pull", "burst"])),
        ("skopeo", skopeo),
    ];
    let mark = w.sd.requests().len();
    let outs: Vec<(&str, proc::Out)> = std::thread::scope(|s| {
        let handles: Vec<_> = pulls
            .into_iter()
            .map(|(name, cmd)| s.spawn(move || (name, proc::run(&format!("{name}: pull burst"), cmd, LIMIT))))
            .collect();
        handles.into_iter().map(|h| h.join().expect("pull thread")).collect()
    });
    let reqs = w.sd.requests_since(mark);
    eprintln!("concurrent pulls: requests Stevedore saw:\n{}", show(&reqs));
    let failed: Vec<String> =
        outs.iter().filter(|(_, o)| !o.status.success()).map(|(n, o)| format!("{n}: {}", o.describe())).collect();
    assert!(
        failed.is_empty(),
        "concurrent pulls failed:\n{}\nStevedore requests:\n{}\nStevedore log:\n{}",
        failed.join("\n"),
        show(&reqs),
        proc::tail(&w.sd.problems(), 4000)
    );
    let digest = &burst.manifest.digest;
    let ls = run_ok("containerd: ctr images ls", ctd.ctr("burst", &["images", "ls"]), LIMIT);
    assert!(
        ls.stdout.lines().any(|l| l.starts_with(&reference) && l.contains(digest.as_str())),
        "containerd: {reference} with {digest} not in:\n{}",
        ls.stdout
    );
    let pi = run_ok(
        "podman: image inspect",
        podman.podman(&["image", "inspect", "--format", "{{.Digest}}", &reference]),
        LIMIT,
    );
    assert_eq!(pi.stdout.trim(), digest, "podman: digest");
    let docker_out = &outs.iter().find(|(n, _)| *n == "docker").unwrap().1;
    assert!(docker_out.stdout.contains(&format!("Digest: {digest}")), "docker: digest:\n{}", docker_out.describe());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index.json JSON");
    assert_eq!(index["manifests"][0]["digest"].as_str(), Some(digest.as_str()), "skopeo: digest");
    w.hub.settle();
    let gets: Vec<(String, usize)> = burst
        .blobs()
        .iter()
        .map(|b| {
            let n = w.hub.count(&format!("\"GET /v2/{BURST}/blobs/{} ", b.digest));
            (b.digest.clone(), n)
        })
        .collect();
    assert!(
        gets.iter().all(|(_, n)| *n == 1),
        "upstream: blob GETs per digest should be 1 each, got {gets:?}; its log:\n{}\nStevedore:\n{}",
        w.hub.requests_for(BURST),
        show(&reqs)
    );
    let manifest_gets = w.hub.count(&format!("\"GET /v2/{BURST}/manifests/"));
    assert_eq!(
        manifest_gets,
        1,
        "upstream: manifest GETs; its log:\n{}\nStevedore:\n{}",
        w.hub.requests_for(BURST),
        show(&reqs)
    );
}

/// Host paths the engines write to when not confined; (path, exists, mtime) of each.
fn host_fingerprint() -> Vec<(String, bool, Option<SystemTime>)> {
    [
        "/var/lib/containers",
        "/var/lib/docker",
        "/var/lib/containerd",
        "/run/containerd",
        "/run/docker",
        "/run/containers",
        "/run/libpod",
        "/opt/containerd",
        "/etc/docker",
        "/etc/containerd",
        "/etc/cni",
    ]
    .iter()
    .map(|p| {
        let m = std::fs::symlink_metadata(p).ok();
        (p.to_string(), m.is_some(), m.and_then(|m| m.modified().ok()))
    })
    .collect()
}

fn describe_path(p: &(String, bool, Option<SystemTime>)) -> String {
    match p {
        (_, false, _) => "absent".into(),
        (_, true, t) => format!("present (mtime {t:?})"),
    }
}

/// One sub-step of the test.
type Step = fn(&World);

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

#[test]
fn containerd_podman_docker_and_skopeo_pull_through_one_cache() {
    let start = Instant::now();
    let before = host_fingerprint();
    let w = World::setup();
    eprintln!("setup (2 upstreams, 2 images pushed, Stevedore): {:?}", start.elapsed());
    let steps: [(&str, Step); 6] = [
        ("containerd", containerd_step),
        ("podman", podman_step),
        ("docker", docker_step),
        ("skopeo", skopeo_step),
        ("one cache (store + upstream counts)", one_cache_step),
        ("all four clients at once", concurrent_step),
    ];
    let mut failures = Vec::new();
    for (name, step) in steps {
        let t = Instant::now();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| step(&w)));
        eprintln!("{name}: {} in {:?}", if r.is_ok() { "ok" } else { "FAILED" }, t.elapsed());
        if let Err(e) = r {
            failures.push(format!("[{name}] {}", panic_message(&*e)));
        }
    }
    let changed: Vec<String> = before
        .iter()
        .zip(host_fingerprint())
        .filter(|(b, a)| **b != *a)
        .map(|(b, a)| format!("  {}: {} -> {}", b.0, describe_path(b), describe_path(&a)))
        .collect();
    if !changed.is_empty() {
        failures.push(format!(
            "[host isolation] host paths changed while the engines ran (the sandbox leaked):\n{}",
            changed.join("\n")
        ));
    }
    drop(w);
    eprintln!("total: {:?}", start.elapsed());
    if !failures.is_empty() {
        panic!("{} client check(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
    }
}
