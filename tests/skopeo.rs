//! Real-client tests: skopeo (containers/image) and curl against the `stevedore` binary.
//!
//! Images are generated here as OCI image layouts (gzip layers, config, manifest, index), copied
//! into Stevedore with `skopeo copy`, and copied back out; every digest must survive the round
//! trip byte-for-byte. These tests need `skopeo` and `curl` (`scripts/install-test-deps.sh`) and
//! fail loudly without them: they never skip.
//!
//! Every test uses its own [`Skopeo`] (throwaway HOME, isolated blob info cache); see
//! `tests/common/skopeo_cli.rs`.

mod common;

use common::data;
use common::http::Registry;
use common::oci::{self, Blob, Image};
use common::skopeo_cli::Skopeo;
use common::Stevedore;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use tokio::runtime::Runtime;

/// One runtime per test: reqwest's pooled connections belong to the runtime that opened them.
fn rt() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The manifest at `repo:reference` is served with exactly `expected`'s bytes, its digest in
/// `Docker-Content-Digest`, and its media type in `Content-Type`.
fn assert_manifest_served(rt: &Runtime, reg: &Registry, repo: &str, reference: &str, expected: &Blob) {
    let (st, dcd, ct, body) = rt.block_on(reg.try_get_manifest(repo, reference)).expect("GET manifest");
    assert_eq!(st.as_u16(), 200, "GET /v2/{repo}/manifests/{reference}");
    assert_eq!(data::sha256(&body), expected.digest, "{repo}:{reference}: served manifest digest");
    assert!(body == expected.data, "{repo}:{reference}: served manifest bytes differ");
    assert_eq!(dcd.as_deref(), Some(expected.digest.as_str()), "{repo}:{reference}: Docker-Content-Digest");
    let ct = ct.unwrap_or_default();
    assert_eq!(ct.split(';').next().unwrap().trim(), expected.media_type, "{repo}:{reference}: Content-Type");
}

/// Every blob is served under `repo` with identical bytes.
fn assert_blobs_served(rt: &Runtime, reg: &Registry, repo: &str, blobs: &[&Blob]) {
    for b in blobs {
        let (st, body) = rt.block_on(reg.try_get_blob(repo, &b.digest)).expect("GET blob");
        assert_eq!(st.as_u16(), 200, "GET /v2/{repo}/blobs/{}", b.digest);
        assert_eq!(data::sha256(&body), b.digest, "{repo}: blob {} bytes differ", b.digest);
    }
}

/// `skopeo inspect --raw` returns exactly the expected manifest bytes.
fn assert_inspect_raw(sk: &Skopeo, image: &str, expected: &Blob) {
    let raw = sk.inspect_raw(image);
    assert_eq!(data::sha256(&raw), expected.digest, "skopeo inspect --raw {image}: digest");
}

/// The OCI layout at `dir` names `expected` under `tag`, and holds every blob intact.
fn assert_layout_has(dir: &Path, tag: &str, expected: &Blob, blobs: &[&Blob]) {
    let (mt, digest) = oci::layout_ref(dir, tag);
    assert_eq!(digest, expected.digest, "{}: {tag} digest after the round trip", dir.display());
    assert_eq!(mt, expected.media_type, "{}: {tag} media type", dir.display());
    assert!(oci::layout_blob(dir, &expected.digest) == expected.data);
    for b in blobs {
        assert!(oci::layout_blob(dir, &b.digest) == b.data, "{}: blob {} differs", dir.display(), b.digest);
    }
}

/// What the skopeo round-trip tests start with: a Stevedore, clients for it, a scratch dir.
struct Setup {
    server: Stevedore,
    reg: Registry,
    rt: tokio::runtime::Runtime,
    sk: Skopeo,
    tmp: tempfile::TempDir,
    /// `127.0.0.1:PORT` of the server.
    host: String,
}

impl Setup {
    fn new() -> Setup {
        let server = Stevedore::local();
        let reg = server.registry();
        let host = server.host();
        Setup { server, reg, rt: rt(), sk: Skopeo::new(), tmp: tempfile::tempdir().unwrap(), host }
    }
}

#[test]
fn skopeo_copies_a_three_layer_image_in_and_out_unchanged() {
    let Setup { server: _server, reg, rt, sk, tmp, host } = Setup::new();

    let img = oci::make_image(101, 3, 1_500_000, "amd64", "linux");
    let src = tmp.path().join("src");
    oci::write_image_layout(&src, &img, "v1");

    // In.
    sk.copy(&[], &format!("oci:{}:v1", src.display()), &format!("docker://{host}/roundtrip/img:v1"));
    sk.assert_cache_isolated();
    assert_inspect_raw(&sk, &format!("docker://{host}/roundtrip/img:v1"), &img.manifest);
    assert_inspect_raw(&sk, &format!("docker://{host}/roundtrip/img@{}", img.manifest.digest), &img.manifest);
    assert_manifest_served(&rt, &reg, "roundtrip/img", "v1", &img.manifest);
    assert_manifest_served(&rt, &reg, "roundtrip/img", &img.manifest.digest, &img.manifest);
    assert_blobs_served(&rt, &reg, "roundtrip/img", &img.blobs());

    // Out, to a new OCI layout.
    let out = tmp.path().join("out");
    sk.copy(&[], &format!("docker://{host}/roundtrip/img:v1"), &format!("oci:{}:v1", out.display()));
    assert_layout_has(&out, "v1", &img.manifest, &img.blobs());

    // Registry to registry, another repository and tag.
    sk.copy(&[], &format!("docker://{host}/roundtrip/img:v1"), &format!("docker://{host}/roundtrip/copy:v2"));
    assert_inspect_raw(&sk, &format!("docker://{host}/roundtrip/copy:v2"), &img.manifest);
    assert_manifest_served(&rt, &reg, "roundtrip/copy", "v2", &img.manifest);
    assert_blobs_served(&rt, &reg, "roundtrip/copy", &img.blobs());
}

#[test]
fn skopeo_copies_a_multi_arch_index_in_and_out_unchanged() {
    let Setup { server: _server, reg, rt, sk, tmp, host } = Setup::new();

    let amd = oci::make_image(201, 2, 700_000, "amd64", "linux");
    let arm = oci::make_image(202, 2, 650_000, "arm64", "linux");
    let index = oci::make_index(&[(&amd, "amd64", None), (&arm, "arm64", Some("v8"))]);
    let mut blobs: Vec<&Blob> = amd.blobs();
    blobs.extend(arm.blobs());
    blobs.push(&amd.manifest);
    blobs.push(&arm.manifest);
    let src = tmp.path().join("src");
    oci::write_layout(&src, &blobs, &[("multi", &index)]);

    sk.copy(&["--all"], &format!("oci:{}:multi", src.display()), &format!("docker://{host}/multi/app:latest"));
    sk.assert_cache_isolated();
    assert_inspect_raw(&sk, &format!("docker://{host}/multi/app:latest"), &index);
    for img in [&amd, &arm] {
        assert_inspect_raw(&sk, &format!("docker://{host}/multi/app@{}", img.manifest.digest), &img.manifest);
        assert_manifest_served(&rt, &reg, "multi/app", &img.manifest.digest, &img.manifest);
        assert_blobs_served(&rt, &reg, "multi/app", &img.blobs());
    }
    assert_manifest_served(&rt, &reg, "multi/app", "latest", &index);
    assert_manifest_served(&rt, &reg, "multi/app", &index.digest, &index);

    // Out, all platforms, to a new OCI layout.
    let out = tmp.path().join("out");
    sk.copy(&["--all"], &format!("docker://{host}/multi/app:latest"), &format!("oci:{}:multi", out.display()));
    assert_layout_has(&out, "multi", &index, &blobs);

    // Registry to registry.
    sk.copy(&["--all"], &format!("docker://{host}/multi/app:latest"), &format!("docker://{host}/multi/mirror:stable"));
    assert_inspect_raw(&sk, &format!("docker://{host}/multi/mirror:stable"), &index);
    assert_manifest_served(&rt, &reg, "multi/mirror", "stable", &index);
    for img in [&amd, &arm] {
        assert_manifest_served(&rt, &reg, "multi/mirror", &img.manifest.digest, &img.manifest);
        assert_blobs_served(&rt, &reg, "multi/mirror", &img.blobs());
    }
}

// ---------------------------------------------------------------------------------------------
// curl

struct CurlResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl CurlResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Runs curl with `args` (method, headers, data) against `url`; panics if curl is missing.
fn curl(dir: &Path, args: &[&str], url: &str) -> CurlResponse {
    let hdr = dir.join("curl-headers");
    let body = dir.join("curl-body");
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "120", "-D"])
        .arg(&hdr)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("curl is required: run `bash scripts/install-test-deps.sh` ({e})"));
    assert!(out.status.success(), "curl {args:?} {url} failed: {}", String::from_utf8_lossy(&out.stderr));
    let status: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("http code");
    let raw = std::fs::read_to_string(&hdr).unwrap();
    let headers = raw
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = std::fs::read(&body).unwrap_or_default();
    CurlResponse { status, headers, body }
}

#[test]
fn curl_chunked_push_then_pull_with_curl_and_skopeo() {
    let server = Stevedore::local();
    let sk = Skopeo::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let host = server.host();
    let repo = "chunked/curl";

    let img: Image = oci::make_image(301, 1, 5_000_000, "amd64", "linux");
    let layer = &img.layers[0];

    // Start a session.
    let r = curl(dir, &["-X", "POST", "-H", "Content-Length: 0"], &server.url(&format!("/v2/{repo}/blobs/uploads/")));
    assert_eq!(r.status, 202, "POST uploads: {}", String::from_utf8_lossy(&r.body));
    let mut loc = Registry::path_of(r.header("location").expect("Location"));

    // Uneven chunks, each with Content-Range; Range must grow accordingly.
    let sizes = [1_000_003usize, 1_048_576, 17, 2_000_000];
    let mut off = 0usize;
    let mut chunks = sizes.to_vec();
    chunks.push(layer.size() - sizes.iter().sum::<usize>());
    for (i, len) in chunks.iter().copied().enumerate() {
        let file = dir.join(format!("chunk{i}"));
        std::fs::write(&file, &layer.data[off..off + len]).unwrap();
        let range = format!("Content-Range: {}-{}", off, off + len - 1);
        let at_file = format!("@{}", file.display());
        let r = curl(
            dir,
            &["-X", "PATCH", "-H", "Content-Type: application/octet-stream", "-H", &range, "--data-binary", &at_file],
            &server.url(&loc),
        );
        assert_eq!(r.status, 202, "PATCH chunk {i} ({range}): {}", String::from_utf8_lossy(&r.body));
        off += len;
        assert_eq!(r.header("range"), Some(format!("0-{}", off - 1).as_str()), "Range after chunk {i}");
        loc = Registry::path_of(r.header("location").expect("Location after PATCH"));

        let st = curl(dir, &[], &server.url(&loc));
        assert_eq!(st.status, 204, "GET upload status after chunk {i}");
        assert_eq!(st.header("range"), Some(format!("0-{}", off - 1).as_str()), "GET status Range after chunk {i}");
    }
    assert_eq!(off, layer.size());

    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = curl(
        dir,
        &["-X", "PUT", "-H", "Content-Length: 0"],
        &server.url(&format!("{loc}{sep}digest={}", layer.digest)),
    );
    assert_eq!(r.status, 201, "PUT ?digest: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("docker-content-digest"), Some(layer.digest.as_str()));

    // Config: monolithic POST; manifest: PUT.
    let cfg_file = dir.join("config.json");
    std::fs::write(&cfg_file, &img.config.data).unwrap();
    let r = curl(
        dir,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", cfg_file.display()),
        ],
        &server.url(&format!("/v2/{repo}/blobs/uploads/?digest={}", img.config.digest)),
    );
    assert_eq!(r.status, 201, "monolithic POST of the config: {}", String::from_utf8_lossy(&r.body));
    let man_file = dir.join("manifest.json");
    std::fs::write(&man_file, &img.manifest.data).unwrap();
    let r = curl(
        dir,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {}", oci::MT_MANIFEST),
            "--data-binary",
            &format!("@{}", man_file.display()),
        ],
        &server.url(&format!("/v2/{repo}/manifests/v1")),
    );
    assert_eq!(r.status, 201, "PUT manifest: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("docker-content-digest"), Some(img.manifest.digest.as_str()));

    // Pull with curl.
    let r = curl(dir, &[], &server.url(&format!("/v2/{repo}/blobs/{}", layer.digest)));
    assert_eq!(r.status, 200);
    assert!(r.body == layer.data, "pulled layer differs from the chunks pushed");
    assert_eq!(r.header("docker-content-digest"), Some(layer.digest.as_str()));

    // Pull with skopeo into an OCI layout.
    let out = dir.join("out");
    sk.copy(&[], &format!("docker://{host}/{repo}:v1"), &format!("oci:{}:v1", out.display()));
    assert_layout_has(&out, "v1", &img.manifest, &img.blobs());
}

/// Request lines `(METHOD, URL)` that `skopeo --debug` logged.
fn logged_requests(debug: &str) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for line in debug.lines() {
        let Some(i) = line.find("msg=\"") else {
            continue;
        };
        let msg = &line[i + 5..];
        let msg = msg.split('"').next().unwrap_or("");
        let mut parts = msg.splitn(2, ' ');
        let (Some(m), Some(u)) = (parts.next(), parts.next()) else {
            continue;
        };
        if ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"].contains(&m) && u.starts_with("http") {
            v.push((m.to_string(), u.to_string()));
        }
    }
    v
}

#[test]
fn skopeo_copy_between_repositories_mounts_blobs_instead_of_uploading() {
    let Setup { server: _server, reg, rt, sk, tmp, host } = Setup::new();

    let img = oci::make_image(401, 3, 800_000, "amd64", "linux");
    let src = tmp.path().join("src");
    oci::write_image_layout(&src, &img, "v1");
    // The same Skopeo (same blob info cache) pushes to mnt/a and then copies a → b: it knows the
    // blobs are in mnt/a on this registry and asks for a mount instead of re-uploading.
    sk.copy(&[], &format!("oci:{}:v1", src.display()), &format!("docker://{host}/mnt/a:v1"));
    let debug = sk.copy(&["--debug"], &format!("docker://{host}/mnt/a:v1"), &format!("docker://{host}/mnt/b:v1"));
    let requests = logged_requests(&debug);
    assert!(!requests.is_empty(), "could not read skopeo --debug request log:\n{debug}");

    let uploads_b = "/v2/mnt/b/blobs/uploads/";
    let to_b = |m: &str| -> Vec<&String> {
        requests.iter().filter(|(rm, u)| rm == m && u.contains(uploads_b)).map(|(_, u)| u).collect()
    };
    let query_digest = |u: &str, key: &str| -> Option<String> {
        let q = u.split_once('?')?.1;
        let v = q.split('&').find_map(|kv| kv.strip_prefix(key))?;
        Some(v.replace("%3A", ":").replace("%3a", ":"))
    };
    // skopeo always re-sends the (small) config blob; no layer data may be uploaded to b.
    let uploaded: Vec<String> = to_b("PUT").iter().filter_map(|u| query_digest(u, "digest=")).collect();
    assert!(
        uploaded.iter().all(|d| *d == img.config.digest) && to_b("PATCH").len() <= uploaded.len(),
        "copy a → b uploaded layer data instead of mounting: PUT digests {uploaded:?}, PATCHes {:?}\nall requests: {requests:#?}",
        to_b("PATCH")
    );
    let mounts: Vec<&String> = to_b("POST").into_iter().filter(|u| u.contains("mount=")).collect();
    // Every layer that was not already in b was mounted (none was: b is new).
    let mounted: BTreeSet<String> = mounts.iter().filter_map(|u| query_digest(u, "mount=")).collect();
    for l in &img.layers {
        assert!(mounted.contains(&l.digest), "layer {} was not mounted; requests: {requests:#?}", l.digest);
    }
    assert_manifest_served(&rt, &reg, "mnt/b", "v1", &img.manifest);
    assert_blobs_served(&rt, &reg, "mnt/b", &img.blobs());

    // A direct mount: 201, Location, Docker-Content-Digest, blob then served from the new repo.
    let layer = &img.layers[1];
    let url = reg.url(&format!("/v2/mnt/c/blobs/uploads/?mount={}&from=mnt/a", layer.digest));
    let resp = rt.block_on(async { reg.client.post(url).header("content-length", "0").send().await }).unwrap();
    assert_eq!(resp.status().as_u16(), 201, "direct cross-repository mount POST");
    let loc = resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(loc.ends_with(&format!("/v2/mnt/c/blobs/{}", layer.digest)), "mount Location: {loc:?}");
    assert_eq!(resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()), Some(layer.digest.as_str()));
    assert_blobs_served(&rt, &reg, "mnt/c", &[layer]);

    // Mounting a digest the registry does not have starts an ordinary session instead.
    let missing = data::sha256(b"not stored anywhere");
    let url = reg.url(&format!("/v2/mnt/d/blobs/uploads/?mount={missing}&from=mnt/a"));
    let resp = rt.block_on(async { reg.client.post(url).header("content-length", "0").send().await }).unwrap();
    assert_eq!(resp.status().as_u16(), 202, "mount of an unknown blob must fall back to a new session");
    assert!(resp.headers().get("location").is_some(), "202 without Location");
    let st = rt.block_on(reg.try_head_blob("mnt/d", &missing)).unwrap();
    assert_eq!(st.as_u16(), 404);
}
