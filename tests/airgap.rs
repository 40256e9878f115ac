//! Air-gapped sites: `stevedore import`, `export`, `prefetch` and `serve --offline`, with real
//! parts: skopeo writes and reads the OCI layouts and archives, CNCF Distribution is the
//! upstream prefetched from, the real binary serves what was imported. Small images only.
//!
//! An upstream that is "stopped" is a configured host on a closed loopback port: nothing
//! listens there, so any attempt to contact it would fail the request it served.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::distribution::Distribution;
use common::engines::{Containerd, Podman};
use common::http::Registry;
use common::oci::{self, Blob, Image};
use common::proc;
use common::skopeo_cli::Skopeo;
use common::stevedore::{self as launcher, cli, cli_ok};
use common::store;
use common::Stevedore;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A config whose one upstream `host` (also the default) listens nowhere.
fn stopped_upstream_config() -> (String, String) {
    let port = proc::closed_port();
    let host = format!("127.0.0.1:{port}");
    let cfg = launcher::config(&host, &[(&host, &format!("http://{host}"), "")]);
    (host, cfg)
}

/// Every file under the store's `blobs/`, `repos/` and `cache/` trees with its contents:
/// what "the store is unchanged" compares.
fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(p.strip_prefix(base).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    for tree in ["blobs", "repos", "cache"] {
        walk(root, &root.join(tree), &mut out);
    }
    out
}

/// The store holds nothing at all: no blob, no repository, no ingest left behind.
fn assert_store_empty(root: &Path, what: &str) {
    assert!(store::blob_files(root).is_empty(), "{what}: blobs were committed: {:?}", store::blob_files(root));
    assert!(store::repo_dirs(root).is_empty(), "{what}: repositories appeared: {:?}", store::repo_dirs(root));
    assert!(store::ingest_leftovers(root).is_empty(), "{what}: ingests left: {:?}", store::ingest_leftovers(root));
}

/// The manifest `repo:reference` is served with exactly `expected`'s bytes and digest.
fn assert_manifest(rt: &tokio::runtime::Runtime, reg: &Registry, repo: &str, reference: &str, expected: &Blob) {
    let (st, dcd, _, body) = rt.block_on(reg.try_get_manifest(repo, reference)).expect("GET manifest");
    assert_eq!(st.as_u16(), 200, "GET /v2/{repo}/manifests/{reference}: {}", String::from_utf8_lossy(&body));
    assert!(body == expected.data, "{repo}:{reference}: served manifest bytes differ");
    assert_eq!(dcd.as_deref(), Some(expected.digest.as_str()), "{repo}:{reference}: Docker-Content-Digest");
}

fn assert_image_served(rt: &tokio::runtime::Runtime, reg: &Registry, repo: &str, tag: &str, img: &Image) {
    assert_manifest(rt, reg, repo, tag, &img.manifest);
    assert_manifest(rt, reg, repo, &img.manifest.digest, &img.manifest);
    for b in img.blobs() {
        rt.block_on(reg.assert_blob(repo, &b.digest, &b.data));
    }
}

/// `GET path` on the server: (status, body).
fn get(rt: &tokio::runtime::Runtime, reg: &Registry, path: &str) -> (u16, String) {
    let r = rt.block_on(common::http::read(reg.req(reqwest::Method::GET, path)));
    (r.status, r.text())
}

#[test]
fn skopeo_layouts_import_beside_no_server_and_are_served_as_the_upstreams_cache() {
    let rt = rt();
    let sk = Skopeo::new();
    let tmp = tempfile::tempdir().unwrap();
    let img = oci::build("airgap-a", 11, 40_000, false);
    let src = tmp.path().join("src");
    oci::write_image_layout(&src, &img, "v1");
    // skopeo writes the layout and the archive (tag-only names, as it does).
    let sk_dir = tmp.path().join("sk-dir");
    let sk_tar = tmp.path().join("sk.tar");
    sk.copy(&[], &format!("oci:{}:v1", src.display()), &format!("oci:{}:v1", sk_dir.display()));
    sk.copy(&[], &format!("oci:{}:v1", src.display()), &format!("oci-archive:{}:v1", sk_tar.display()));

    let (host, cfg) = stopped_upstream_config();
    let mut first = Stevedore::builder().config(&cfg).start();
    let reg = first.registry();
    let root = first.root().to_path_buf();
    let config = first.config.clone().unwrap();
    let repo = format!("{host}/small");
    // How clients name it: the cache namespace as a path prefix (a ':' is not in names).
    let served = format!("{}/small", host.replace(':', "-"));
    // Asked before the import: a miss, the upstream is unreachable.
    let (st, _) = get(&rt, &reg, &format!("/v2/{served}/manifests/v1"));
    assert_ne!(st, 200, "nothing is cached yet");

    // Beside the live server the import refuses (exit 2, naming it) and changes nothing.
    let blobs_before = store::blob_files(&root);
    let out = cli(&["import", "--config", s(&config), "--root", s(&root), "--repository", &repo, s(&sk_dir)], LIMIT);
    assert_eq!(out.status.code(), Some(2), "import beside a live server:\n{}", out.describe());
    assert!(out.stderr.contains(&format!("pid {}", first.pid())), "the refusal names the server:\n{}", out.describe());
    assert_eq!(store::blob_files(&root), blobs_before, "a refused import committed blobs");
    assert!(store::repo_dirs(&root).is_empty(), "a refused import made repositories: {:?}", store::repo_dirs(&root));
    first.terminate(Duration::from_secs(20));

    // A tag-only name needs --repository.
    let out = cli(&["import", "--config", s(&config), "--root", s(&root), s(&sk_dir)], LIMIT);
    assert!(!out.status.success(), "a tag-only name without --repository must fail:\n{}", out.describe());
    assert!(out.stderr.contains("--repository"), "{}", out.describe());

    let out = cli_ok(&["import", "--config", s(&config), "--root", s(&root), "--repository", &repo, s(&sk_dir)], LIMIT);
    assert!(out.stdout.contains(&format!("{repo}:v1 {}", img.manifest.digest)), "{}", out.describe());
    // The server started again on the store serves it, by tag and by digest, as that
    // upstream's cached content, without contacting it.
    let mut server = Stevedore::builder().config(&cfg).root(&root).start();
    let reg = server.registry();
    let mark = server.requests().len();
    assert_image_served(&rt, &reg, &served, "v1", &img);
    let ns_path = format!("/v2/small/manifests/v1?ns={host}");
    let (st, body) = get(&rt, &reg, &ns_path);
    assert!(st == 200 && body.as_bytes() == img.manifest.data, "{ns_path}: {st}");
    let reqs = server.requests_since(mark);
    assert!(reqs.iter().all(|a| a.status == 200 && a.cache == "hit"), "{}", launcher::show(&reqs));
    assert!(store::repo_dirs(&root).contains(&format!("{host}/small")), "{:?}", store::repo_dirs(&root));
    store::assert_blobs_intact(&root);

    // Importing again (no server on the store) changes nothing.
    server.terminate(Duration::from_secs(20));
    let before = snapshot(&root);
    let out = cli_ok(&["import", "--config", s(&config), "--root", s(&root), "--repository", &repo, s(&sk_dir)], LIMIT);
    assert!(out.stdout.contains("(0 new"), "{}", out.describe());
    assert!(snapshot(&root) == before, "a second import changed the store");
    assert!(store::ingest_leftovers(&root).is_empty());

    // skopeo's oci-archive, into a fresh store: the same blobs.
    let other = tmp.path().join("other");
    cli_ok(&["import", "--config", s(&config), "--root", s(&other), "--repository", &repo, s(&sk_tar)], LIMIT);
    assert_eq!(store::blob_files(&other), store::blob_files(&root));
}

#[test]
fn corrupt_incomplete_and_truncated_archives_are_rejected_naming_the_entry_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("local.toml");
    std::fs::write(&cfg, "[proxy]\ndefault_upstream = \"\"\n").unwrap();
    let root = tmp.path().join("store");
    let img = oci::build("airgap-b", 12, 30_000, false);
    let import = |path: &Path| {
        cli(&["import", "--config", s(&cfg), "--root", s(&root), "--repository", "team/app", s(path)], LIMIT)
    };
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let files = oci::layout_files(&img.blobs(), &[("v1", &img.manifest)]);
    let layer = &img.layers[1];

    // A tampered blob.
    let mut tampered = files.clone();
    let entry = tampered.iter_mut().find(|(p, _)| p.ends_with(layer.hex())).unwrap();
    entry.1[100] ^= 0xff;
    let out = import(&write("tampered.tar", &oci::tar_of(&tampered)));
    assert!(!out.status.success(), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("blobs/sha256/{}", layer.hex())) && out.stderr.contains("corrupt"),
        "{}",
        out.describe()
    );
    assert_store_empty(&root, "tampered blob");

    // A manifest whose blob is missing.
    let missing: Vec<_> = files.iter().filter(|(p, _)| !p.ends_with(layer.hex())).cloned().collect();
    let out = import(&write("missing.tar", &oci::tar_of(&missing)));
    assert!(!out.status.success(), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("blobs/sha256/{}", img.manifest.hex())) && out.stderr.contains(&layer.digest),
        "the error names the manifest's entry and the missing blob:\n{}",
        out.describe()
    );
    assert_store_empty(&root, "missing blob");

    // A truncated archive: cut inside the last layer.
    let whole = oci::tar_of(&files);
    let (last, data) = files.iter().rev().find(|(p, _)| p.starts_with("blobs/")).unwrap();
    let at = whole.windows(data.len().min(512)).position(|w| w == &data[..data.len().min(512)]).unwrap();
    let out = import(&write("truncated.tar", &whole[..at + data.len() / 2]));
    assert!(!out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains(last.as_str()) && out.stderr.contains("truncated"), "{}", out.describe());
    assert_store_empty(&root, "truncated archive");

    // The same archive whole (blobs before index.json) imports.
    let out = import(&write("good.tar", &whole));
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(store::blob_files(&root).len(), img.digests().len());
    assert_eq!(store::repo_dirs(&root).into_iter().collect::<Vec<_>>(), vec!["team/app".to_string()]);
}

/// A multi-platform index (amd64, arm64) with a signature on the amd64 manifest.
struct Multi {
    amd: Image,
    arm: Image,
    index: Blob,
    sig: Blob,
    sig_blobs: Vec<Blob>,
}

impl Multi {
    fn new(seed: u64) -> Multi {
        let amd = oci::make_image(seed, 2, 20_000, "amd64", "linux");
        let arm = oci::make_image(seed + 1, 2, 20_000, "arm64", "linux");
        let index = oci::make_index(&[(&amd, "amd64", None), (&arm, "arm64", None)]);
        let (sig, sig_blobs) = oci::make_referrer(&amd.manifest, "application/vnd.example.sig", b"signed");
        Multi { amd, arm, index, sig, sig_blobs }
    }

    fn all_blobs(&self) -> Vec<&Blob> {
        let mut v = self.amd.blobs();
        v.extend(self.arm.blobs());
        v.extend([&self.amd.manifest, &self.arm.manifest, &self.sig]);
        v.extend(self.sig_blobs.iter());
        v
    }
}

fn index_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

fn ref_names(index: &Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["annotations"][oci::REF_NAME].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn exports_are_read_by_skopeo_keep_the_upstream_host_and_import_back() {
    let rt = rt();
    let sk = Skopeo::new();
    let tmp = tempfile::tempdir().unwrap();
    let m = Multi::new(300);
    let (host, cfg_text) = stopped_upstream_config();
    let cfg = tmp.path().join("stevedore.toml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    let root = tmp.path().join("store");
    // The source: a layout with full names; the signature is not named (found by its subject).
    let src = tmp.path().join("src");
    let name = format!("{host}/multi:v1");
    oci::write_layout(&src, &m.all_blobs(), &[(&name, &m.index)]);
    cli_ok(&["import", "--config", s(&cfg), "--root", s(&root), s(&src)], LIMIT);
    let sig_name = format!("{host}/multi@{}", m.sig.digest);

    // Everything, as a directory: skopeo reads it; names keep the host; the referrer is there.
    let dir = tmp.path().join("all");
    cli_ok(&["export", "--config", s(&cfg), "--root", s(&root), "--output", s(&dir)], LIMIT);
    let names = ref_names(&index_json(&dir));
    assert!(names.contains(&name) && names.contains(&sig_name), "{names:?}");
    let back = tmp.path().join("sk-back");
    sk.copy(&["--all"], &format!("oci:{}:{name}", dir.display()), &format!("oci:{}:x", back.display()));
    assert_eq!(oci::layout_ref(&back, "x").1, m.index.digest, "skopeo read the index with its digest");
    for b in m.all_blobs() {
        if b.digest != m.sig.digest && !m.sig_blobs.iter().any(|x| x.digest == b.digest) {
            assert!(oci::layout_blob(&back, &b.digest) == b.data, "blob {} through skopeo", b.digest);
        }
    }

    // One platform, as an archive: the index byte-exact, the other platform's manifest absent.
    let tar = tmp.path().join("amd.tar");
    cli_ok(
        &["export", "--config", s(&cfg), "--root", s(&root), "--platform", "linux/amd64", "--output", s(&tar), &name],
        LIMIT,
    );
    let sk_amd = tmp.path().join("sk-amd");
    // skopeo picks the platform it runs on: these machines are amd64.
    sk.copy(&[], &format!("oci-archive:{}:{name}", tar.display()), &format!("oci:{}:x", sk_amd.display()));
    assert_eq!(oci::layout_ref(&sk_amd, "x").1, m.amd.manifest.digest, "skopeo picked the amd64 manifest");
    let amd_only = tmp.path().join("amd-only");
    cli_ok(&["import", "--config", s(&cfg), "--root", s(&amd_only), s(&tar)], LIMIT);
    let blobs = store::blob_files(&amd_only);
    assert!(blobs.contains(&m.index.digest) && blobs.contains(&m.amd.manifest.digest) && blobs.contains(&m.sig.digest));
    assert!(!blobs.contains(&m.arm.manifest.digest), "arm64 was not asked for");

    // Everything as .tar.zst into a fresh store: the same content, served offline.
    let zst = tmp.path().join("all.tar.zst");
    cli_ok(&["export", "--config", s(&cfg), "--root", s(&root), "--output", s(&zst)], LIMIT);
    let fresh = tmp.path().join("fresh");
    cli_ok(&["import", "--config", s(&cfg), "--root", s(&fresh), s(&zst)], LIMIT);
    assert_eq!(store::blob_files(&fresh), store::blob_files(&root));
    let server = Stevedore::builder().config(&cfg_text).root(&fresh).args(&["--offline"]).start();
    let reg = server.registry();
    let repo = format!("{}/multi", host.replace(':', "-"));
    assert_manifest(&rt, &reg, &repo, "v1", &m.index);
    assert_image_served(&rt, &reg, &repo, &m.arm.manifest.digest, &m.arm);
    let (_, refs) = rt.block_on(reg.referrers(&repo, &m.amd.manifest.digest, None));
    assert_eq!(refs["manifests"][0]["digest"], m.sig.digest.as_str(), "{refs}");
}

#[test]
fn prefetch_from_distribution_then_serve_offline_with_the_upstream_stopped() {
    let rt = rt();
    let sk = Skopeo::new();
    let tmp = tempfile::tempdir().unwrap();
    let dist = Distribution::start_in(&tmp.path().join("distribution"), false);
    let up = dist.registry();
    let dhost = format!("127.0.0.1:{}", dist.port);
    let m = Multi::new(400);
    rt.block_on(async {
        up.push_image("multi", &m.amd, None).await;
        up.push_image("multi", &m.arm, None).await;
        up.push_manifest("multi", "v1", oci::MT_INDEX, &m.index.data).await;
        // Distribution 2.8 has no referrers API: the signature and the tag-schema index.
        for b in &m.sig_blobs {
            up.upload_blob("multi", &b.data).await;
        }
        up.push_manifest("multi", &m.sig.digest, oci::MT_MANIFEST, &m.sig.data).await;
        let mut d = m.sig.descriptor();
        d["artifactType"] = "application/vnd.example.sig".into();
        let fallback = serde_json::json!({"schemaVersion": 2, "mediaType": oci::MT_INDEX, "manifests": [d]});
        let tag = m.amd.manifest.digest.replace(':', "-");
        up.push_manifest("multi", &tag, oci::MT_INDEX, &serde_json::to_vec(&fallback).unwrap()).await;
    });
    let small: Vec<Image> = (0..3).map(|i| oci::build("airgap-small", 500 + i, 10_000, false)).collect();
    for (img, tag) in small.iter().zip(["1.0", "1.1", "2.0"]) {
        dist.push("small", tag, img);
    }

    let cfg_text = launcher::config(&dhost, &[(&dhost, &dist.url(), "")]);
    let cfg = tmp.path().join("stevedore.toml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    let root = tmp.path().join("store");
    let list = tmp.path().join("images.txt");
    std::fs::write(&list, format!("# what the site needs\n{dhost}/multi:v1\n\n{dhost}/small:1.*  # a pattern\n"))
        .unwrap();
    let prefetch = |extra: &[&str]| {
        let mut args = vec!["prefetch", "--config", s(&cfg), "--root", s(&root), "--platform", "linux/amd64"];
        args.extend_from_slice(extra);
        cli(&args, LIMIT)
    };
    let out = prefetch(&["--file", s(&list)]);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stdout.contains("prefetch: 3 ok, 0 failed"), "{}", out.describe());
    let blobs = store::blob_files(&root);
    for d in
        [&m.index.digest, &m.amd.manifest.digest, &m.sig.digest, &small[0].manifest.digest, &small[1].manifest.digest]
    {
        assert!(blobs.contains(d), "{d} was not prefetched:\n{}", out.stdout);
    }
    for b in m.amd.blobs().iter().chain(m.sig_blobs.iter().collect::<Vec<_>>().iter()) {
        assert!(blobs.contains(&b.digest), "blob {} was not prefetched", b.digest);
    }
    assert!(!blobs.contains(&m.arm.manifest.digest), "arm64 was not asked for");
    assert!(!blobs.contains(&small[2].manifest.digest), "2.0 does not match 1.*");

    // Run again: nothing is fetched twice.
    dist.settle();
    let gets = dist.blob_gets("multi") + dist.blob_gets("small");
    let out = prefetch(&["--file", s(&list)]);
    assert!(out.status.success() && out.stdout.contains("manifests, 0 blobs fetched"), "{}", out.describe());
    dist.settle();
    assert_eq!(dist.blob_gets("multi") + dist.blob_gets("small"), gets, "a second prefetch fetched blobs again");

    // What is not there fails, by name, and the exit status says so.
    let out = prefetch(&[&format!("{dhost}/nope:v1"), &format!("{dhost}/small:1.0")]);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("{dhost}/nope:v1")) && out.stdout.contains("1 ok, 1 failed"),
        "{}",
        out.describe()
    );

    // A prefetch cut short (a layer the upstream fails to serve) and run again: it completes,
    // fetching only what it did not have.
    let layer = &small[2].layers[0];
    let data_file = tmp.path().join(format!(
        "distribution/storage/docker/registry/v2/blobs/sha256/{}/{}/data",
        &layer.hex()[..2],
        layer.hex()
    ));
    std::fs::remove_file(&data_file).unwrap_or_else(|e| panic!("{}: {e}", data_file.display()));
    let two = format!("{dhost}/small:2.0");
    let out = prefetch(&[&two]);
    assert!(
        !out.status.success() && out.stderr.contains(&two) && out.stdout.contains(&layer.digest),
        "{}",
        out.describe()
    );
    assert!(store::ingest_leftovers(&root).is_empty(), "a failed fill left its ingest");
    rt.block_on(up.upload_blob("small", &layer.data));
    dist.settle();
    let before = dist.blob_gets("small");
    let out = prefetch(&[&two]);
    assert!(out.status.success(), "{}", out.describe());
    dist.settle();
    assert_eq!(dist.blob_gets("small") - before, 1, "only the missing layer is fetched again:\n{}", out.stdout);
    assert!(store::blob_files(&root).contains(&layer.digest));

    // The upstream goes away; the registry serves offline.
    drop(dist);
    let server = Stevedore::builder().config(&cfg_text).root(&root).args(&["--offline"]).start();
    let reg = server.registry();
    let ns = dhost.replace(':', "-");
    let repo = format!("{ns}/multi");
    assert_manifest(&rt, &reg, &repo, "v1", &m.index);
    assert_image_served(&rt, &reg, &repo, &m.amd.manifest.digest, &m.amd);
    assert_image_served(&rt, &reg, &format!("{ns}/small"), "1.1", &small[1]);
    let (st, body) = get(&rt, &reg, &format!("/v2/{repo}/manifests/{}", m.arm.manifest.digest));
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("MANIFEST_UNKNOWN") && body.contains("offline"), "{body}");
    let (st, body) = get(&rt, &reg, &format!("/v2/{repo}/blobs/{}", m.arm.layers[0].digest));
    assert!(st == 404 && body.contains("BLOB_UNKNOWN") && body.contains("offline"), "{st} {body}");
    let (st, body) = get(&rt, &reg, &format!("/v2/{ns}/small/manifests/9.9"));
    assert!(st == 404 && body.contains("offline"), "{st} {body}");
    let (st, body) = get(&rt, &reg, "/readyz");
    assert!(st == 200 && body.contains("offline"), "{st} {body}");
    assert!(server.log_text().contains("offline"), "the start-up summary says offline");
    let (st, body) = get(&rt, &reg, "/metrics");
    assert!(st == 200 && body.contains("stevedore_offline 1"), "{st} {body}");

    // skopeo pulls by tag and by digest with identical digests (the cache namespace as prefix).
    let by_tag = tmp.path().join("by-tag");
    sk.copy(&[], &format!("docker://{}/{ns}/small:1.0", server.host()), &format!("oci:{}:x", by_tag.display()));
    assert_eq!(oci::layout_ref(&by_tag, "x").1, small[0].manifest.digest);
    let by_digest = tmp.path().join("by-digest");
    let src = format!("docker://{}/{ns}/multi@{}", server.host(), m.amd.manifest.digest);
    sk.copy(&[], &src, &format!("oci:{}:x", by_digest.display()));
    assert_eq!(oci::layout_ref(&by_digest, "x").1, m.amd.manifest.digest);

    // containerd and podman too, by tag and by digest.
    proc::require_root();
    let by_tag = format!("{}/{ns}/small:1.0", server.host());
    let by_digest = format!("{}/{ns}/small@{}", server.host(), small[1].manifest.digest);
    let ctd = Containerd::start(&tmp.path().join("containerd"));
    for (reference, want) in [(&by_tag, &small[0]), (&by_digest, &small[1])] {
        let pull = ["images", "pull", "--plain-http", "--snapshotter", "native", reference.as_str()];
        proc::run_ok(&format!("ctr images pull {reference}"), ctd.ctr("airgap", &pull), LIMIT);
        let ls = proc::run_ok("ctr images ls", ctd.ctr("airgap", &["images", "ls"]), LIMIT);
        let digest = ls
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference.as_str()))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{}", ls.stdout));
        assert_eq!(digest, want.manifest.digest, "containerd pulled {reference}");
    }
    let podman = Podman::new(&tmp.path().join("podman"), &server.host());
    let policy = podman.policy();
    for (reference, want) in [(&by_tag, &small[0]), (&by_digest, &small[1])] {
        let pull = ["pull", "--tls-verify=false", "--signature-policy", s(&policy), reference.as_str()];
        proc::run_ok(&format!("podman pull {reference}"), podman.podman(&pull), LIMIT);
        let inspect = ["image", "inspect", "--format", "{{.Digest}}", reference.as_str()];
        let out = proc::run_ok("podman image inspect", podman.podman(&inspect), LIMIT);
        assert_eq!(out.stdout.trim(), want.manifest.digest, "podman pulled {reference}");
    }
}

#[test]
fn admin_prefetch_endpoint_fills_the_cache_through_the_running_server() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let dist = Distribution::start_in(&tmp.path().join("distribution"), false);
    let dhost = format!("127.0.0.1:{}", dist.port);
    let small: Vec<Image> = (0..3).map(|i| oci::build("admin-prefetch", 700 + i, 8_000, false)).collect();
    for (img, tag) in small.iter().zip(["1.0", "1.1", "2.0"]) {
        dist.push("small", tag, img);
    }
    // Without client authentication, the admin endpoint exists only with an admin token.
    let token_file = tmp.path().join("admin-token");
    std::fs::write(&token_file, "airgap-admin-token-0123456789\n").unwrap();
    let cfg = launcher::config(&dhost, &[(&dhost, &dist.url(), "")])
        + &format!("\n[auth]\nadmin_token_file = {:?}\n", token_file.display().to_string());
    let server = Stevedore::builder().config(&cfg).start();
    let reg = server.registry();
    let post = |body: &str| {
        let r = rt.block_on(common::http::read(
            reg.req(reqwest::Method::POST, "/admin/prefetch")
                .bearer_auth("airgap-admin-token-0123456789")
                .header("content-type", "application/json")
                .body(body.to_string()),
        ));
        (r.status, r.text())
    };

    // Bad requests get the spec's error body, and nothing is fetched.
    for bad in ["not json", r#"{"references": []}"#, r#"{"references": ["x"], "platforms": ["linux"]}"#] {
        let (st, body) = post(bad);
        assert_eq!(st, 400, "{bad}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{bad}: {e}: {body}"));
        assert!(v["errors"][0]["code"].is_string(), "{bad}: {body}");
    }
    dist.settle();
    assert_eq!(dist.blob_gets("small"), 0, "a bad request fetched something");

    // A pattern and a reference that is not upstream: 502, the report names what failed,
    // and what could be fetched was.
    let req = serde_json::json!({"references": [format!("{dhost}/small:1.*"), format!("{dhost}/nope:v1")]});
    let (st, body) = post(&req.to_string());
    assert_eq!(st, 502, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let detail = &v["errors"][0]["detail"];
    assert_eq!(detail["failed_references"], serde_json::json!([format!("{dhost}/nope:v1")]), "{body}");
    assert_eq!(detail["report"]["ok"].as_array().map(Vec::len), Some(2), "{body}");
    let blobs = store::blob_files(server.root());
    for img in &small[..2] {
        assert!(blobs.contains(&img.manifest.digest), "{} not prefetched: {body}", img.manifest.digest);
        for b in img.blobs() {
            assert!(blobs.contains(&b.digest), "blob {} not prefetched", b.digest);
        }
    }
    assert!(!blobs.contains(&small[2].manifest.digest), "2.0 does not match 1.*");

    // Everything present: 200 with the report, nothing fetched again.
    dist.settle();
    let gets = dist.blob_gets("small");
    let (st, body) = post(&serde_json::json!({"references": [format!("{dhost}/small:1.0")]}).to_string());
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["blobs_fetched"], 0, "{body}");
    assert_eq!(v["failed"], serde_json::json!([]), "{body}");
    dist.settle();
    assert_eq!(dist.blob_gets("small"), gets, "prefetching cached content fetched it again");

    // The prefetched image is served with the upstream gone.
    drop(dist);
    let ns = dhost.replace(':', "-");
    rt.block_on(async {
        for b in small[1].blobs() {
            reg.assert_blob(&format!("{ns}/small"), &b.digest, &b.data).await;
        }
    });
}

/// Every file below `<root>/<under>`, relative to `root`, sorted.
fn files_under(root: &Path, under: &str) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &root.join(under), &mut out);
    out.sort();
    out
}

/// What a reader can see of the store: every blob, link, revision, tag and referrer file
/// with its bytes, the repositories (the catalog's walk), and the imported marks.
fn visible(root: &Path) -> (BTreeMap<String, Vec<u8>>, std::collections::BTreeSet<String>, Vec<String>) {
    (snapshot(root), store::repo_dirs(root), files_under(root, "meta/imported"))
}

/// A config with no upstream: full names without a host (`team/a:v1`) are local repositories.
fn local_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("local.toml");
    std::fs::write(&cfg, "[proxy]\ndefault_upstream = \"\"\n").unwrap();
    cfg
}

/// Two repositories (`team/a`, `team/b`) and a signature of `team/a:v1` found by its subject.
struct TwoRepos {
    a: Image,
    b: Image,
    sig: Blob,
    sig_blobs: Vec<Blob>,
}

impl TwoRepos {
    fn new(seed: u64) -> TwoRepos {
        let a = oci::build("import-a", seed, 20_000, false);
        let b = oci::build("import-b", seed + 1, 20_000, false);
        let (sig, sig_blobs) = oci::make_referrer(&a.manifest, "application/vnd.example.sig", b"signed a");
        TwoRepos { a, b, sig, sig_blobs }
    }

    /// The layout as a tar: `team/a:v1`, `team/b:v1`, and the signature.
    fn archive(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let mut blobs = self.a.blobs();
        blobs.extend(self.b.blobs());
        blobs.push(&self.sig);
        blobs.extend(self.sig_blobs.iter());
        let files = oci::layout_files(&blobs, &[("team/a:v1", &self.a.manifest), ("team/b:v1", &self.b.manifest)]);
        let p = dir.join(name);
        std::fs::write(&p, oci::tar_of(&files)).unwrap();
        p
    }
}

/// Issue 22, scenario 4: a write that fails while the import commits (the second
/// repository's, stood in for EIO) leaves nothing of the archive in the store — no blob, link,
/// revision, tag, referrer entry, repository or imported mark — and the message is true.
#[test]
fn an_import_that_fails_while_committing_leaves_nothing_of_the_archive_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = local_config(tmp.path());
    let root = tmp.path().join("store");
    let two = TwoRepos::new(900);
    let tar = two.archive(tmp.path(), "two.tar");
    let args = ["import", "--config", s(&cfg), "--root", s(&root), s(&tar)];

    let out = launcher::cli_env(&args, &[("STEVEDORE_FAIL", "import.commit_repo@2")], LIMIT);
    assert!(!out.status.success(), "the injected failure must fail the import:\n{}", out.describe());
    assert!(out.stderr.contains("injected failure"), "the error names its cause:\n{}", out.describe());
    let (files, repos, marks) = visible(&root);
    let left: Vec<&String> = files.keys().chain(repos.iter()).chain(marks.iter()).collect();
    assert!(left.is_empty(), "the failed import left {left:?} in the store; it said:\n{}", out.stderr);
    assert!(out.stderr.contains("nothing was imported") && out.stderr.contains("undone"), "{}", out.describe());
    for meta in ["meta/refs", "meta/access"] {
        assert!(files_under(&root, meta).is_empty(), "{meta}: {:?}", files_under(&root, meta));
    }
    assert!(store::ingest_leftovers(&root).is_empty(), "{:?}", store::ingest_leftovers(&root));

    // A failure while the tags move (the second tag) takes the first one back too.
    let out = launcher::cli_env(&args, &[("STEVEDORE_FAIL", "import.move_tag@2")], LIMIT);
    assert!(!out.status.success(), "{}", out.describe());
    let (files, repos, marks) = visible(&root);
    let left: Vec<&String> = files.keys().chain(repos.iter()).chain(marks.iter()).collect();
    assert!(left.is_empty(), "the failed import left {left:?} in the store; it said:\n{}", out.stderr);

    // When undoing fails too (its first step), the message names what is left, and only
    // what is left is there.
    let fail = [("STEVEDORE_FAIL", "import.commit_repo@2,import.undo@1")];
    let out = launcher::cli_env(&args, &fail, LIMIT);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(!out.stderr.contains("nothing was imported"), "something was left: {}", out.describe());
    let (files, repos, _) = visible(&root);
    assert!(!files.is_empty(), "an undo step failed, yet nothing is left:\n{}", out.stderr);
    for f in files.keys() {
        let hex = f.rsplit('/').next().unwrap();
        assert!(out.stderr.contains(hex), "{f} is left and the message does not name it:\n{}", out.stderr);
    }
    assert!(repos.iter().all(|r| out.stderr.contains(r.as_str())), "{repos:?}:\n{}", out.stderr);

    // Without the failure, the same archive imports whole.
    let out = cli_ok(&args, LIMIT);
    assert!(out.stdout.contains("imported 2 references"), "{}", out.describe());
    let mut want: Vec<String> = two.a.digests().into_iter().chain(two.b.digests()).collect();
    want.push(two.sig.digest.clone());
    want.extend(two.sig_blobs.iter().map(|b| b.digest.clone()));
    want.sort();
    want.dedup();
    assert_eq!(store::blob_files(&root), want);
    let repos: Vec<String> = store::repo_dirs(&root).into_iter().collect();
    assert_eq!(repos, ["team/a", "team/b"]);
    assert_eq!(files_under(&root, "meta/imported").len(), want.len(), "every imported blob is marked");
    store::assert_blobs_intact(&root);
}

/// A failed import into a store that already held part of the archive (one of its images,
/// imported before, and a tag the archive moves) leaves that part exactly as it was: its
/// content, links, revisions, tags and imported marks.
#[test]
fn a_failed_import_leaves_what_the_store_held_before_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = local_config(tmp.path());
    let root = tmp.path().join("store");
    let two = TwoRepos::new(910);
    let old = oci::build("import-a-old", 920, 10_000, false);
    // Before: team/a:v1 is `old`, team/a:keep is the archive's `a` (with its blobs).
    let before_dir = tmp.path().join("before");
    let mut blobs = old.blobs();
    blobs.extend(two.a.blobs());
    oci::write_layout(&before_dir, &blobs, &[("team/a:v1", &old.manifest), ("team/a:keep", &two.a.manifest)]);
    cli_ok(&["import", "--config", s(&cfg), "--root", s(&root), s(&before_dir)], LIMIT);
    let before = visible(&root);
    assert!(!before.2.is_empty() && before.1.contains("team/a"), "{before:?}");

    let tar = two.archive(tmp.path(), "two.tar");
    let args = ["import", "--config", s(&cfg), "--root", s(&root), s(&tar)];
    for point in ["import.commit_repo@2", "import.move_tag@2"] {
        let out = launcher::cli_env(&args, &[("STEVEDORE_FAIL", point)], LIMIT);
        assert!(!out.status.success(), "{point}: {}", out.describe());
        let after = visible(&root);
        let changed: Vec<&String> = after
            .0
            .iter()
            .filter(|(k, v)| before.0.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(before.0.keys().filter(|k| !after.0.contains_key(*k)))
            .collect();
        assert!(changed.is_empty(), "{point}: the failed import changed {changed:?}; it said:\n{}", out.stderr);
        assert_eq!(after.1, before.1, "{point}: repositories; it said:\n{}", out.stderr);
        assert_eq!(after.2, before.2, "{point}: imported marks; it said:\n{}", out.stderr);
        assert!(store::ingest_leftovers(&root).is_empty(), "{point}: {:?}", store::ingest_leftovers(&root));
    }
    // And it completes when nothing fails: team/a:v1 moves to the archive's image.
    cli_ok(&args, LIMIT);
    let tag = std::fs::read_to_string(root.join("repos/team/a/_manifests/tags/v1")).unwrap();
    assert_eq!(tag.trim(), two.a.manifest.digest);
}

/// Repositories an import created are in the catalog of a server started on the store
/// afterwards (an import runs with no server on its store).
#[test]
fn the_catalog_lists_repositories_imported_before_the_server_started() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = local_config(tmp.path());
    let root = tmp.path().join("store");
    let two = TwoRepos::new(930);
    let tar = two.archive(tmp.path(), "two.tar");
    cli_ok(&["import", "--config", s(&cfg), "--root", s(&root), s(&tar)], LIMIT);
    let server = Stevedore::builder().config(&std::fs::read_to_string(&cfg).unwrap()).root(&root).start();
    let reg = server.registry();
    let (st, body) = get(&rt, &reg, "/v2/_catalog");
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["team/a", "team/b"]), "{body}");
    assert_image_served(&rt, &reg, "team/b", "v1", &two.b);
}

/// `prefetch` may run beside a live server (it only adds verified content): the repositories
/// it creates are in that server's catalog once its next usage check sees the store's
/// generation change, not only after a restart (issue #22: the catalog sees what an offline
/// tool added).
#[test]
fn the_catalog_lists_repositories_prefetched_beside_a_running_server() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let dist = Distribution::start_in(&tmp.path().join("distribution"), false);
    let dhost = format!("127.0.0.1:{}", dist.port);
    let img = oci::build("airgap-catalog", 950, 10_000, false);
    dist.push("fresh", "1.0", &img);
    let cfg_text = launcher::config(&dhost, &[(&dhost, &dist.url(), "")]) + "\n[cache]\ncheck_interval = \"1s\"\n";
    let cfg = tmp.path().join("stevedore.toml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    let root = tmp.path().join("store");
    let server = Stevedore::builder().config(&cfg_text).root(&root).start();
    let reg = server.registry();
    let (st, body) = get(&rt, &reg, "/v2/_catalog");
    assert_eq!(st, 200, "{body}");
    assert!(!body.contains("fresh"), "{body}");
    let out = cli(&["prefetch", "--config", s(&cfg), "--root", s(&root), &format!("{dhost}/fresh:1.0")], LIMIT);
    assert!(out.status.success(), "prefetch beside the server: {}", out.describe());
    let bound = Duration::from_secs(30);
    let end = std::time::Instant::now() + bound;
    let listed = loop {
        let (st, body) = get(&rt, &reg, "/v2/_catalog");
        assert_eq!(st, 200, "{body}");
        if body.contains("fresh") {
            break true;
        }
        if std::time::Instant::now() > end {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(listed, "the repository prefetched beside the running server is not in its catalog within {bound:?}");
}
