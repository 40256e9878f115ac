//! Black-box HTTP conformance tests for Stevedore's OCI distribution-spec v1.1 API.
//!
//! Every test starts its own `stevedore serve` on a fresh temporary store
//! ([`common::stevedore::Stevedore::local`]) and talks to it over HTTP only, through the
//! shared client [`common::http::Registry`].

mod common;

use common::data::{bytes, sha256, sha512};
use common::http::{hdr, Registry};
use common::oci::{
    MT_CONFIG as OCI_CONFIG, MT_DOCKER_CONFIG as DOCKER_CONFIG, MT_DOCKER_LAYER as DOCKER_LAYER,
    MT_DOCKER_MANIFEST as DOCKER_MANIFEST, MT_INDEX as OCI_INDEX, MT_LAYER_GZIP as OCI_LAYER,
    MT_MANIFEST as OCI_MANIFEST,
};
use common::Stevedore;
use reqwest::header::HeaderMap;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const OCI_NONDIST: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

const EMPTY_SHA256: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// sha256 of the two bytes `{}` (the OCI empty descriptor's content).
const EMPTY_JSON_SHA256: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// An OCI descriptor for `content`.
fn desc(media_type: &str, content: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(content), "size": content.len()})
}

/// A header that must be present.
fn must_hdr(headers: &HeaderMap, name: &str) -> String {
    hdr(headers, name).unwrap_or_else(|| panic!("missing header {name}; headers: {headers:?}"))
}

fn body_text(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.len() > 600 {
        format!("{}…", &s[..600])
    } else {
        s.into_owned()
    }
}

/// Asserts the status and returns the headers and body.
async fn expect(resp: Response, status: u16) -> (HeaderMap, bytes::Bytes) {
    let st = resp.status().as_u16();
    let url = resp.url().to_string();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("read body");
    assert_eq!(st, status, "{url}: expected {status}, got {st}; headers {headers:?}; body: {}", body_text(&body));
    (headers, body)
}

/// Asserts an error response: status, `Content-Type: application/json`, and a body of the
/// form `{"errors":[{"code":..,"message":..,"detail":..}]}` containing `code`.
async fn expect_error(resp: Response, status: u16, code: &str) {
    let url = resp.url().to_string();
    let (headers, body) = expect(resp, status).await;
    check_error_body(&url, &headers, &body, code);
}

fn check_error_body(url: &str, headers: &HeaderMap, body: &[u8], code: &str) {
    let ct = hdr(headers, "content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "{url}: error Content-Type should be application/json, got {ct:?}; body: {}",
        body_text(body)
    );
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{url}: error body is not JSON ({e}): {}", body_text(body)));
    let errors = v["errors"].as_array().unwrap_or_else(|| panic!("{url}: no errors array in {v}"));
    assert!(!errors.is_empty(), "{url}: empty errors array");
    for e in errors {
        assert!(e["code"].is_string(), "{url}: error without string code: {e}");
        assert!(e["message"].is_string(), "{url}: error without string message: {e}");
    }
    let codes: Vec<&str> = errors.iter().filter_map(|e| e["code"].as_str()).collect();
    assert!(codes.contains(&code), "{url}: expected error code {code}, got {codes:?}");
}

/// Asserts a 4xx error whose code is one of `codes`.
async fn expect_error_one_of(resp: Response, status: u16, codes: &[&str]) {
    let url = resp.url().to_string();
    let (headers, body) = expect(resp, status).await;
    let v: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{url}: error body is not JSON ({e}): {}", body_text(&body)));
    let got: Vec<String> = v["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["code"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    assert!(got.iter().any(|c| codes.contains(&c.as_str())), "{url}: expected one of {codes:?}, got {got:?}");
    check_error_body(&url, &headers, &body, &got[0]);
}

/// Asserts the status is 4xx (never 5xx, never success).
async fn expect_4xx(resp: Response) -> u16 {
    let st = resp.status().as_u16();
    let url = resp.url().to_string();
    let body = resp.bytes().await.unwrap_or_default();
    assert!((400..500).contains(&st), "{url}: expected a 4xx, got {st}: {}", body_text(&body));
    st
}

/// Parses `Range: 0-<n>` from an upload response.
fn upload_range(headers: &HeaderMap) -> String {
    must_hdr(headers, "range")
}

/// `</path?query>; rel="next"` → `/path?query`.
fn link_target(link: &str) -> String {
    let start = link.find('<').expect("Link has <") + 1;
    let end = link.find('>').expect("Link has >");
    assert!(link[end..].contains("rel=\"next\""), "Link without rel=\"next\": {link}");
    link[start..end].to_string()
}

/// A plain local registry on a fresh store, and the client for it.
fn start() -> (Stevedore, Registry) {
    let sd = Stevedore::local();
    let reg = sd.registry();
    (sd, reg)
}

/// Pushes a config blob and one layer and an OCI image manifest referencing them.
/// `reference` is a tag, or "" to push by digest. Returns (digest, manifest bytes).
async fn push_seed_image(reg: &Registry, repo: &str, reference: &str, seed: u64) -> (String, Vec<u8>) {
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "seed": seed})).unwrap();
    let layer = bytes(seed, 128);
    reg.push_blob(repo, &config).await;
    reg.push_blob(repo, &layer).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config),
        "layers": [desc(OCI_LAYER, &layer)],
    }))
    .unwrap();
    let d = sha256(&m);
    let reference = if reference.is_empty() { d.clone() } else { reference.to_string() };
    reg.push_manifest(repo, &reference, OCI_MANIFEST, &m).await;
    (d, m)
}

/// Sends raw bytes on a fresh TCP connection (no client-side URL normalisation) and returns
/// the response status code.
async fn raw_status(reg: &Registry, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(reg.host()).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        loop {
            let n = s.read(&mut tmp).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&tmp[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let line = text.lines().next().unwrap_or_default().to_string();
        line.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no status line in response to {request:?}: {text:?}"))
    };
    tokio::time::timeout(Duration::from_secs(15), fut).await.expect("raw request timed out")
}

fn raw_get(reg: &Registry, method: &str, path: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", reg.host())
}

// ---------------------------------------------------------------------------------------------
// Base endpoint and error format
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn base_endpoint_returns_200_with_api_version() {
    let (_sd, reg) = start();
    let (h, _) = expect(reg.get("/v2/").await, 200).await;
    assert_eq!(must_hdr(&h, "docker-distribution-api-version"), "registry/2.0");
    let (h, _) = expect(reg.head("/v2/").await, 200).await;
    assert_eq!(must_hdr(&h, "docker-distribution-api-version"), "registry/2.0");
}

#[tokio::test]
async fn errors_are_json_with_code_and_message() {
    let (_sd, reg) = start();
    reg.push_blob("some/repo", b"present").await;
    let d = sha256(b"nothing here");
    let r = reg.get(&format!("/v2/some/repo/blobs/{d}")).await;
    let (h, body) = expect(r, 404).await;
    let ct = must_hdr(&h, "content-type");
    assert!(ct.starts_with("application/json"), "{ct}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    let obj = v.as_object().unwrap();
    assert!(obj.contains_key("errors"), "{v}");
    let e = &v["errors"][0];
    assert_eq!(e["code"], "BLOB_UNKNOWN");
    assert!(!e["message"].as_str().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Names, tags and digests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_repository_names_are_rejected() {
    let (_sd, reg) = start();
    let d = sha256(b"x");
    let long = "a".repeat(256);
    let long_multi = format!("{}/{}", "a".repeat(127), "b".repeat(128)); // 256 chars
    let bad = [
        "UPPER",
        "Upper/case",
        "a..b",
        "-a",
        "a-",
        "_a",
        "a_",
        ".a",
        "a.",
        "a_-b",
        "a___b",
        "a.-b",
        "a/B",
        "a/-b",
        "a/b.",
        long.as_str(),
        long_multi.as_str(),
    ];
    for name in bad {
        expect_error(reg.get(&format!("/v2/{name}/blobs/{d}")).await, 400, "NAME_INVALID").await;
        expect_error(reg.get(&format!("/v2/{name}/manifests/latest")).await, 400, "NAME_INVALID").await;
        expect_error(reg.get(&format!("/v2/{name}/tags/list")).await, 400, "NAME_INVALID").await;
        expect_error(reg.post(&format!("/v2/{name}/blobs/uploads/"), vec![]).await, 400, "NAME_INVALID").await;
        expect_error(reg.get(&format!("/v2/{name}/referrers/{d}")).await, 400, "NAME_INVALID").await;
    }
    // Nothing was created by the rejected POSTs.
    let (_, body) = expect(reg.get("/v2/_catalog").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["repositories"], json!([]), "{v}");
}

#[tokio::test]
async fn valid_repository_names_are_accepted() {
    let (_sd, reg) = start();
    let d = sha256(b"x");
    let long = "a".repeat(255);
    let long_multi = format!("{}/{}", "a".repeat(127), "b".repeat(127)); // 255 chars
    let good = [
        "a",
        "0",
        "a.b",
        "a_b",
        "a__b",
        "a-b",
        "a---b",
        "library/ubuntu",
        "a/b/c/d/e",
        "x9.y_z__w-v",
        long.as_str(),
        long_multi.as_str(),
    ];
    for name in good {
        let r = reg.get(&format!("/v2/{name}/blobs/{d}")).await;
        expect_error_one_of(r, 404, &["BLOB_UNKNOWN", "NAME_UNKNOWN"]).await;
    }
    // And they really work for a push.
    for name in good {
        let content = format!("content for {name}").into_bytes();
        let d = reg.push_blob(name, &content).await;
        reg.assert_blob(name, &d, &content).await;
    }
}

#[tokio::test]
async fn names_containing_route_keywords() {
    // `blobs`, `manifests`, `tags`, `uploads` and `referrers` are valid name components.
    let (_sd, reg) = start();
    for repo in ["a/blobs/b", "x/manifests/y", "t/tags/list", "r/referrers/s"] {
        let content = format!("blob in {repo}").into_bytes();
        let d = reg.push_blob(repo, &content).await;
        reg.assert_blob(repo, &d, &content).await;
        let (md, m) = push_seed_image(&reg, repo, "v1", 7).await;
        let (_, body) = expect(reg.get(&format!("/v2/{repo}/manifests/v1")).await, 200).await;
        assert_eq!(&body[..], &m[..]);
        assert_eq!(reg.tags(repo).await, vec!["v1"]);
        let (_, v) = reg.referrers(repo, &md, None).await;
        assert_eq!(v["manifests"], json!([]));
        let loc = reg.start_upload(repo).await;
        expect(reg.get(&loc).await, 204).await;
    }
}

/// A reference that is neither a tag nor a digest names no manifest: GET and HEAD answer 404
/// `MANIFEST_UNKNOWN` (the conformance suite's `.INVALID_MANIFEST_NAME`); a PUT under it is
/// 400 `TAG_INVALID`.
#[tokio::test]
async fn invalid_tags_are_unknown_to_get_and_invalid_to_put() {
    let (_sd, reg) = start();
    let (_, m) = push_seed_image(&reg, "repo", "ok", 1).await;
    let long = "t".repeat(129);
    for tag in [".INVALID_MANIFEST_NAME", ".hidden", "-dash", "tag!", "tag%20space", long.as_str()] {
        expect_error(reg.put_manifest("repo", tag, OCI_MANIFEST, &m).await, 400, "TAG_INVALID").await;
        expect_error(reg.get(&format!("/v2/repo/manifests/{tag}")).await, 404, "MANIFEST_UNKNOWN").await;
        expect(reg.head(&format!("/v2/repo/manifests/{tag}")).await, 404).await;
    }
    // Boundary: 128 characters and the full alphabet are fine.
    let max = format!("_{}", "A.b-9".repeat(25)) + "xx"; // 1 + 125 + 2 = 128
    assert_eq!(max.len(), 128);
    for tag in [max.as_str(), "_", "0", "v1.2.3-rc_1", "A", "a..b--c__"] {
        let d = reg.push_manifest("repo", tag, OCI_MANIFEST, &m).await;
        let (h, _) = expect(reg.get(&format!("/v2/repo/manifests/{tag}")).await, 200).await;
        assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    }
    // Bad tags in `?tag=` on a PUT by digest.
    let d = sha256(&m);
    for tag in [".bad", "-bad", "has%20space"] {
        let r = reg
            .send(
                reg.req(Method::PUT, &format!("/v2/repo/manifests/{d}?tag={tag}"))
                    .header("content-type", OCI_MANIFEST)
                    .body(m.clone()),
            )
            .await;
        expect_error(r, 400, "TAG_INVALID").await;
    }
    // A reference containing ':' is parsed as a digest.
    expect_error(reg.get("/v2/repo/manifests/foo:bar").await, 400, "DIGEST_INVALID").await;
    expect_error(reg.put_manifest("repo", "foo:bar", OCI_MANIFEST, &m).await, 400, "DIGEST_INVALID").await;
}

#[tokio::test]
async fn invalid_digests_are_rejected() {
    let (_sd, reg) = start();
    let hex64 = "a".repeat(64);
    let bad = vec![
        "notadigest".to_string(),
        "sha256:abc".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "g".repeat(64)),
        format!("sha256:{}", "a".repeat(65)),
        format!("sha256:{}", "a".repeat(63)),
        format!("SHA256:{hex64}"),
        format!("sha512:{hex64}"),
        format!("sha512:{}", "a".repeat(127)),
        format!("sha256:{hex64}:x"),
        "md5:abc".to_string(),
        format!("md5:{}", "a".repeat(32)),
        format!("foo:{hex64}"),
        format!(":{hex64}"),
        "sha256:".to_string(),
    ];
    let content = b"digest test".to_vec();
    reg.push_blob("repo", &content).await;
    for d in &bad {
        expect_error(reg.get(&format!("/v2/repo/blobs/{d}")).await, 400, "DIGEST_INVALID").await;
        expect(reg.head(&format!("/v2/repo/blobs/{d}")).await, 400).await;
        expect_error(reg.delete(&format!("/v2/repo/blobs/{d}")).await, 400, "DIGEST_INVALID").await;
        expect_error(
            reg.post(&format!("/v2/repo/blobs/uploads/?digest={d}"), content.clone()).await,
            400,
            "DIGEST_INVALID",
        )
        .await;
        let loc = reg.start_upload("repo").await;
        expect_error(reg.finish_upload(&loc, d, content.clone()).await, 400, "DIGEST_INVALID").await;
        if d.contains(':') {
            expect_error(reg.get(&format!("/v2/repo/manifests/{d}")).await, 400, "DIGEST_INVALID").await;
            expect_error(reg.delete(&format!("/v2/repo/manifests/{d}")).await, 400, "DIGEST_INVALID").await;
        }
        expect_error(reg.get(&format!("/v2/repo/referrers/{d}")).await, 400, "DIGEST_INVALID").await;
    }
}

// ---------------------------------------------------------------------------------------------
// Blobs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn blob_get_and_head() {
    let (_sd, reg) = start();
    let content = bytes(1, 1000);
    let d = reg.push_blob("repo", &content).await;

    let (h, body) = expect(reg.get(&format!("/v2/repo/blobs/{d}")).await, 200).await;
    assert!(body[..] == content[..]);
    assert_eq!(must_hdr(&h, "content-length"), "1000");
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    assert_eq!(must_hdr(&h, "etag"), format!("\"{d}\""));
    assert_eq!(must_hdr(&h, "accept-ranges"), "bytes");
    assert_eq!(must_hdr(&h, "content-type"), "application/octet-stream");

    let (h, body) = expect(reg.head(&format!("/v2/repo/blobs/{d}")).await, 200).await;
    assert!(body.is_empty(), "HEAD has no body");
    assert_eq!(must_hdr(&h, "content-length"), "1000");
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    assert_eq!(must_hdr(&h, "etag"), format!("\"{d}\""));
    assert_eq!(must_hdr(&h, "accept-ranges"), "bytes");
    assert_eq!(must_hdr(&h, "content-type"), "application/octet-stream");
}

#[tokio::test]
async fn blob_range_requests() {
    let (_sd, reg) = start();
    let content = bytes(2, 100);
    let d = reg.push_blob("repo", &content).await;
    let path = format!("/v2/repo/blobs/{d}");
    let cases: &[(&str, usize, usize)] = &[
        ("bytes=10-19", 10, 19),
        ("bytes=0-0", 0, 0),
        ("bytes=0-99", 0, 99),
        ("bytes=99-99", 99, 99),
        ("bytes=90-", 90, 99),
        ("bytes=0-", 0, 99),
        ("bytes=-5", 95, 99),
        ("bytes=-100", 0, 99),
        // RFC 9110 14.1.2: a last-pos past the end is truncated; a longer suffix is the whole.
        ("bytes=50-1000", 50, 99),
        ("bytes=-500", 0, 99),
    ];
    for &(range, a, b) in cases {
        let r = reg.send(reg.req(Method::GET, &path).header("range", range)).await;
        let (h, body) = expect(r, 206).await;
        assert_eq!(must_hdr(&h, "content-range"), format!("bytes {a}-{b}/100"), "{range}");
        assert_eq!(&body[..], &content[a..=b], "{range}");
        assert_eq!(must_hdr(&h, "content-length"), (b - a + 1).to_string(), "{range}");
    }
    for range in ["bytes=100-", "bytes=100-200", "bytes=1000-2000"] {
        let r = reg.send(reg.req(Method::GET, &path).header("range", range)).await;
        let (h, _) = expect(r, 416).await;
        assert_eq!(must_hdr(&h, "content-range"), "bytes */100", "{range}");
    }
}

#[tokio::test]
async fn blob_unknown_is_404() {
    let (_sd, reg) = start();
    reg.push_blob("repo", b"something").await;
    let d = sha256(b"unknown");
    expect_error(reg.get(&format!("/v2/repo/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    let (_, body) = expect(reg.head(&format!("/v2/repo/blobs/{d}")).await, 404).await;
    assert!(body.is_empty());
    // Repository that does not exist at all.
    expect_error_one_of(reg.get(&format!("/v2/nope/blobs/{d}")).await, 404, &["BLOB_UNKNOWN", "NAME_UNKNOWN"]).await;
    let d512 = sha512(b"unknown");
    expect_error(reg.get(&format!("/v2/repo/blobs/{d512}")).await, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn blob_is_scoped_to_its_repository() {
    let (_sd, reg) = start();
    let content = bytes(3, 50);
    let d = reg.push_blob("a", &content).await;
    reg.push_blob("b", b"other").await;
    expect_error(reg.get(&format!("/v2/b/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    expect(reg.head(&format!("/v2/b/blobs/{d}")).await, 404).await;
    expect_error(reg.get(&format!("/v2/a/b/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    expect_error(reg.delete(&format!("/v2/b/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    reg.assert_blob("a", &d, &content).await;
}

#[tokio::test]
async fn blob_delete() {
    let (_sd, reg) = start();
    let content = bytes(4, 300);
    let d = reg.push_blob("repo", &content).await;
    reg.push_blob("other", &content).await;
    expect(reg.delete(&format!("/v2/repo/blobs/{d}")).await, 202).await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    expect(reg.head(&format!("/v2/repo/blobs/{d}")).await, 404).await;
    expect_error(reg.delete(&format!("/v2/repo/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    // The same content in another repository is untouched.
    reg.assert_blob("other", &d, &content).await;
    // Unknown blob.
    let u = sha256(b"never pushed");
    expect_error(reg.delete(&format!("/v2/repo/blobs/{u}")).await, 404, "BLOB_UNKNOWN").await;
    // A manifest can no longer reference it in this repository.
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("repo", &config).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config), "layers": [desc(OCI_LAYER, &content)]
    }))
    .unwrap();
    expect_error(reg.put_manifest("repo", "t", OCI_MANIFEST, &m).await, 400, "MANIFEST_BLOB_UNKNOWN").await;
    // It can be pushed again.
    reg.push_blob("repo", &content).await;
    reg.assert_blob("repo", &d, &content).await;
}

#[tokio::test]
async fn large_blobs_monolithic_and_chunked() {
    // Well over common default request-body limits (axum: 2 MiB).
    let (_sd, reg) = start();
    let content = bytes(5, 5 * 1024 * 1024 + 17);
    let d = reg.push_blob("big", &content).await;
    reg.assert_blob("big", &d, &content).await;

    let content2 = bytes(6, 6 * 1024 * 1024 + 3);
    let d2 = sha256(&content2);
    let mut loc = reg.start_upload("big").await;
    let split = 3 * 1024 * 1024;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content2[..split]).await, 202).await;
    assert_eq!(upload_range(&h), format!("0-{}", split - 1));
    loc = must_hdr(&h, "location");
    let (h, _) = expect(reg.patch_chunk(&loc, split, &content2[split..]).await, 202).await;
    assert_eq!(upload_range(&h), format!("0-{}", content2.len() - 1));
    loc = must_hdr(&h, "location");
    expect(reg.finish_upload(&loc, &d2, vec![]).await, 201).await;
    reg.assert_blob("big", &d2, &content2).await;

    // Ranged read in the middle of a large blob.
    let r =
        reg.send(reg.req(Method::GET, &format!("/v2/big/blobs/{d2}")).header("range", "bytes=4000000-4000099")).await;
    let (h, body) = expect(r, 206).await;
    assert_eq!(must_hdr(&h, "content-range"), format!("bytes 4000000-4000099/{}", content2.len()));
    assert_eq!(&body[..], &content2[4000000..4000100]);
}

// ---------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upload_post_opens_session() {
    let (_sd, reg) = start();
    let r = reg.post("/v2/repo/blobs/uploads/", vec![]).await;
    let (h, _) = expect(r, 202).await;
    let loc = must_hdr(&h, "location");
    let uuid = must_hdr(&h, "docker-upload-uuid");
    assert!(!uuid.is_empty());
    assert_eq!(loc, format!("/v2/repo/blobs/uploads/{uuid}"));
    assert!(!loc.contains('?'), "Location must have no query: {loc}");
    assert_eq!(must_hdr(&h, "range"), "0-0");

    // Each POST opens a distinct session.
    let loc2 = reg.start_upload("repo").await;
    assert_ne!(loc, loc2);

    // Status of an empty session.
    let (h, body) = expect(reg.get(&loc).await, 204).await;
    assert!(body.is_empty());
    assert_eq!(must_hdr(&h, "range"), "0-0");
    assert_eq!(must_hdr(&h, "docker-upload-uuid"), uuid);
    let sloc = must_hdr(&h, "location");
    assert!(sloc.starts_with(&format!("/v2/repo/blobs/uploads/{uuid}")), "{sloc}");
}

#[tokio::test]
async fn upload_monolithic_post_with_digest() {
    let (_sd, reg) = start();
    let content = bytes(10, 4096);
    let d = sha256(&content);
    let r = reg.post(&format!("/v2/repo/blobs/uploads/?digest={d}"), content.clone()).await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/blobs/{d}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    reg.assert_blob("repo", &d, &content).await;
    // Pushing the same content again is fine.
    reg.push_blob("repo", &content).await;
    reg.assert_blob("repo", &d, &content).await;
}

#[tokio::test]
async fn upload_monolithic_post_wrong_digest_stores_nothing() {
    let (_sd, reg) = start();
    let content = bytes(11, 500);
    let claimed = sha256(b"something else");
    let real = sha256(&content);
    let r = reg.post(&format!("/v2/repo/blobs/uploads/?digest={claimed}"), content.clone()).await;
    expect_error(r, 400, "DIGEST_INVALID").await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{claimed}")).await, 404, "BLOB_UNKNOWN").await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{real}")).await, 404, "BLOB_UNKNOWN").await;
    // Same with a sha512 digest.
    let claimed512 = sha512(b"something else");
    let r = reg.post(&format!("/v2/repo/blobs/uploads/?digest={claimed512}"), content.clone()).await;
    expect_error(r, 400, "DIGEST_INVALID").await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{claimed512}")).await, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn upload_post_then_single_put() {
    let (_sd, reg) = start();
    let content = bytes(12, 2048);
    let d = sha256(&content);
    let loc = reg.start_upload("repo").await;
    let (h, _) = expect(reg.finish_upload(&loc, &d, content.clone()).await, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/blobs/{d}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    reg.assert_blob("repo", &d, &content).await;
    // The session is finished.
    expect_error(reg.get(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
}

#[tokio::test]
async fn upload_chunked() {
    let (_sd, reg) = start();
    let content = bytes(13, 3000);
    let d = sha256(&content);
    let loc0 = reg.start_upload("repo").await;
    let uuid = loc0.rsplit('/').next().unwrap().to_string();
    let mut loc = loc0.clone();
    let mut offset = 0;
    for chunk in [&content[..1000], &content[1000..1001], &content[1001..2500], &content[2500..]] {
        let (h, _) = expect(reg.patch_chunk(&loc, offset, chunk).await, 202).await;
        offset += chunk.len();
        assert_eq!(upload_range(&h), format!("0-{}", offset - 1));
        assert_eq!(must_hdr(&h, "docker-upload-uuid"), uuid);
        loc = must_hdr(&h, "location");
        assert!(loc.starts_with(&format!("/v2/repo/blobs/uploads/{uuid}")), "{loc}");
        let (h, _) = expect(reg.get(&loc).await, 204).await;
        assert_eq!(upload_range(&h), format!("0-{}", offset - 1));
        assert_eq!(must_hdr(&h, "docker-upload-uuid"), uuid);
        must_hdr(&h, "location");
    }
    let (h, _) = expect(reg.finish_upload(&loc, &d, vec![]).await, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/blobs/{d}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    reg.assert_blob("repo", &d, &content).await;
}

#[tokio::test]
async fn upload_chunked_with_final_chunk_in_put() {
    let (_sd, reg) = start();
    let content = bytes(14, 1500);
    let d = sha256(&content);
    let loc = reg.start_upload("repo").await;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content[..700]).await, 202).await;
    let loc = must_hdr(&h, "location");
    let (h, _) = expect(reg.finish_upload(&loc, &d, content[700..].to_vec()).await, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/blobs/{d}"));
    reg.assert_blob("repo", &d, &content).await;

    // The closing PUT may carry the final chunk's Content-Range.
    let content = bytes(114, 900);
    let d = sha256(&content);
    let loc = reg.start_upload("repo").await;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content[..400]).await, 202).await;
    let loc = must_hdr(&h, "location");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = reg
        .send(
            reg.req(Method::PUT, &format!("{loc}{sep}digest={d}"))
                .header("content-type", "application/octet-stream")
                .header("content-range", "400-899")
                .body(content[400..].to_vec()),
        )
        .await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/blobs/{d}"));
    reg.assert_blob("repo", &d, &content).await;
}

#[tokio::test]
async fn upload_patch_streamed_without_content_range() {
    let (_sd, reg) = start();
    let content = bytes(15, 10_000);
    let d = sha256(&content);
    let mut loc = reg.start_upload("repo").await;
    let mut offset = 0;
    for part in [&content[..4000], &content[4000..]] {
        let pieces: Vec<Result<bytes::Bytes, std::io::Error>> =
            part.chunks(999).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
        let body = reqwest::Body::wrap_stream(futures::stream::iter(pieces));
        let r =
            reg.send(reg.req(Method::PATCH, &loc).header("content-type", "application/octet-stream").body(body)).await;
        let (h, _) = expect(r, 202).await;
        offset += part.len();
        assert_eq!(upload_range(&h), format!("0-{}", offset - 1));
        must_hdr(&h, "docker-upload-uuid");
        loc = must_hdr(&h, "location");
    }
    // A plain PATCH (Content-Length, no Content-Range) also appends.
    let extra = b"tail".to_vec();
    let r = reg.send(reg.req(Method::PATCH, &loc).body(extra.clone())).await;
    let (h, _) = expect(r, 202).await;
    assert_eq!(upload_range(&h), format!("0-{}", content.len() + extra.len() - 1));
    let loc = must_hdr(&h, "location");
    let mut all = content.clone();
    all.extend_from_slice(&extra);
    let d_all = sha256(&all);
    assert_ne!(d, d_all);
    expect(reg.finish_upload(&loc, &d_all, vec![]).await, 201).await;
    reg.assert_blob("repo", &d_all, &all).await;
}

#[tokio::test]
async fn upload_out_of_order_chunk_is_416_and_session_unchanged() {
    let (_sd, reg) = start();
    let content = bytes(16, 30);
    let d = sha256(&content);
    let loc = reg.start_upload("repo").await;

    // First chunk not starting at 0.
    expect(reg.patch_chunk(&loc, 5, &content[5..10]).await, 416).await;
    let (h, _) = expect(reg.get(&loc).await, 204).await;
    assert_eq!(upload_range(&h), "0-0");

    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content[..10]).await, 202).await;
    assert_eq!(upload_range(&h), "0-9");
    let loc = must_hdr(&h, "location");

    // Overlapping, repeated and gapped chunks.
    expect(reg.patch_chunk(&loc, 5, &content[5..15]).await, 416).await;
    expect(reg.patch_chunk(&loc, 0, &content[..10]).await, 416).await;
    expect(reg.patch_chunk(&loc, 20, &content[20..30]).await, 416).await;
    let (h, _) = expect(reg.get(&loc).await, 204).await;
    assert_eq!(upload_range(&h), "0-9");

    // The correct next chunk still succeeds.
    let (h, _) = expect(reg.patch_chunk(&loc, 10, &content[10..]).await, 202).await;
    assert_eq!(upload_range(&h), "0-29");
    let loc = must_hdr(&h, "location");
    expect(reg.finish_upload(&loc, &d, vec![]).await, 201).await;
    reg.assert_blob("repo", &d, &content).await;
}

#[tokio::test]
async fn upload_put_with_wrong_or_missing_digest() {
    let (_sd, reg) = start();
    let content = bytes(17, 256);
    let wrong = sha256(b"wrong");

    let loc = reg.start_upload("repo").await;
    let r = reg.finish_upload(&loc, &wrong, content.clone()).await;
    expect_error(r, 400, "DIGEST_INVALID").await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{wrong}")).await, 404, "BLOB_UNKNOWN").await;
    let real = sha256(&content);
    expect_error(reg.get(&format!("/v2/repo/blobs/{real}")).await, 404, "BLOB_UNKNOWN").await;

    // Chunked data, wrong digest at the end.
    let loc = reg.start_upload("repo").await;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content).await, 202).await;
    let loc = must_hdr(&h, "location");
    expect_error(reg.finish_upload(&loc, &wrong, vec![]).await, 400, "DIGEST_INVALID").await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{real}")).await, 404, "BLOB_UNKNOWN").await;

    // PUT without any digest.
    let loc = reg.start_upload("repo").await;
    let r = reg.send(reg.req(Method::PUT, &loc).body(content.clone())).await;
    expect_error(r, 400, "DIGEST_INVALID").await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{real}")).await, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn upload_cancel_with_delete() {
    let (_sd, reg) = start();
    let content = bytes(18, 100);
    let loc = reg.start_upload("repo").await;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content).await, 202).await;
    let loc = must_hdr(&h, "location");
    expect(reg.delete(&loc).await, 204).await;
    expect_error(reg.get(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(reg.patch_chunk(&loc, 100, b"more").await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let d = sha256(&content);
    expect_error(reg.finish_upload(&loc, &d, vec![]).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(reg.delete(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn upload_unknown_session() {
    let (_sd, reg) = start();
    reg.start_upload("repo").await;
    let d = sha256(b"x");
    for id in ["garbage", "00000000-0000-4000-8000-000000000000", "a1b2c3", "0"] {
        let loc = format!("/v2/repo/blobs/uploads/{id}");
        expect_error(reg.get(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
        expect_error(reg.patch_chunk(&loc, 0, b"abc").await, 404, "BLOB_UPLOAD_UNKNOWN").await;
        expect_error(reg.finish_upload(&loc, &d, b"x".to_vec()).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
        expect_error(reg.delete(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    }
}

#[tokio::test]
async fn upload_session_is_scoped_to_its_repository() {
    let (_sd, reg) = start();
    let content = bytes(19, 64);
    let d = sha256(&content);
    let loc = reg.start_upload("a").await;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content[..32]).await, 202).await;
    let loc = must_hdr(&h, "location");
    let other = loc.replacen("/v2/a/", "/v2/b/", 1);
    assert_ne!(loc, other);
    reg.start_upload("b").await;
    expect_error(reg.get(&other).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(reg.patch_chunk(&other, 32, &content[32..]).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(reg.finish_upload(&other, &d, content[32..].to_vec()).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(reg.delete(&other).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(reg.get(&format!("/v2/b/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    // The session in `a` was untouched by all of that.
    let (h, _) = expect(reg.get(&loc).await, 204).await;
    assert_eq!(upload_range(&h), "0-31");
    expect(reg.finish_upload(&loc, &d, content[32..].to_vec()).await, 201).await;
    reg.assert_blob("a", &d, &content).await;
    expect_error(reg.get(&format!("/v2/b/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn zero_byte_blob() {
    let (_sd, reg) = start();
    assert_eq!(sha256(b""), EMPTY_SHA256);
    let d = reg.push_blob("repo", b"").await;
    assert_eq!(d, EMPTY_SHA256);
    let (h, body) = expect(reg.get(&format!("/v2/repo/blobs/{d}")).await, 200).await;
    assert!(body.is_empty());
    assert_eq!(must_hdr(&h, "content-length"), "0");
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    let (h, _) = expect(reg.head(&format!("/v2/repo/blobs/{d}")).await, 200).await;
    assert_eq!(must_hdr(&h, "content-length"), "0");
    // Every range of an empty blob is unsatisfiable.
    let r = reg.send(reg.req(Method::GET, &format!("/v2/repo/blobs/{d}")).header("range", "bytes=0-")).await;
    let (h, _) = expect(r, 416).await;
    assert_eq!(must_hdr(&h, "content-range"), "bytes */0");

    // Via POST + PUT with no body at all.
    let loc = reg.start_upload("repo2").await;
    let (h, _) = expect(reg.finish_upload(&loc, EMPTY_SHA256, vec![]).await, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo2/blobs/{EMPTY_SHA256}"));
    reg.assert_blob("repo2", EMPTY_SHA256, b"").await;

    // sha512 of nothing.
    let d512 = reg.push_blob_as("repo3", b"", &sha512(b"")).await;
    reg.assert_blob("repo3", &d512, b"").await;
}

#[tokio::test]
async fn sha512_blobs_monolithic_and_chunked() {
    let (_sd, reg) = start();
    let content = bytes(20, 5000);
    let d = sha512(&content);
    let r = reg.post(&format!("/v2/repo/blobs/uploads/?digest={d}"), content.clone()).await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/blobs/{d}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    let (h, body) = expect(reg.get(&format!("/v2/repo/blobs/{d}")).await, 200).await;
    assert!(body[..] == content[..]);
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    assert_eq!(must_hdr(&h, "content-length"), "5000");
    let (h, _) = expect(reg.head(&format!("/v2/repo/blobs/{d}")).await, 200).await;
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    let r = reg.send(reg.req(Method::GET, &format!("/v2/repo/blobs/{d}")).header("range", "bytes=10-20")).await;
    let (_, body) = expect(r, 206).await;
    assert_eq!(&body[..], &content[10..=20]);

    // Chunked, finished with a sha512 digest.
    let content2 = bytes(21, 7000);
    let d2 = sha512(&content2);
    let loc = reg.start_upload("repo").await;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, &content2[..3000]).await, 202).await;
    let loc = must_hdr(&h, "location");
    let (h, _) = expect(reg.patch_chunk(&loc, 3000, &content2[3000..]).await, 202).await;
    let loc = must_hdr(&h, "location");
    let (h, _) = expect(reg.finish_upload(&loc, &d2, vec![]).await, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/blobs/{d2}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d2);
    reg.assert_blob("repo", &d2, &content2).await;

    // Delete by sha512.
    expect(reg.delete(&format!("/v2/repo/blobs/{d2}")).await, 202).await;
    expect_error(reg.get(&format!("/v2/repo/blobs/{d2}")).await, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn mount_from_repository() {
    let (_sd, reg) = start();
    let content = bytes(22, 777);
    let d = reg.push_blob("src", &content).await;
    let r = reg.post(&format!("/v2/dst/blobs/uploads/?mount={d}&from=src"), vec![]).await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/dst/blobs/{d}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    reg.assert_blob("dst", &d, &content).await;
    // Deleting from the source keeps the mounted copy.
    expect(reg.delete(&format!("/v2/src/blobs/{d}")).await, 202).await;
    reg.assert_blob("dst", &d, &content).await;

    // `from` no longer has it: a session, not a mount.
    let r = reg.post(&format!("/v2/dst3/blobs/uploads/?mount={d}&from=src"), vec![]).await;
    let (h, _) = expect(r, 202).await;
    must_hdr(&h, "docker-upload-uuid");
    expect_error(reg.get(&format!("/v2/dst3/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;

    // sha512 mount.
    let content2 = bytes(23, 99);
    let d2 = reg.push_blob_as("src", &content2, &sha512(&content2)).await;
    let r = reg.post(&format!("/v2/dst2/blobs/uploads/?mount={d2}&from=src"), vec![]).await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/dst2/blobs/{d2}"));
    reg.assert_blob("dst2", &d2, &content2).await;
}

#[tokio::test]
async fn mount_of_blob_not_in_from_opens_session() {
    let (_sd, reg) = start();
    let content = bytes(24, 100);
    let d = reg.push_blob("has", &content).await;
    reg.push_blob("empty", b"unrelated").await;

    // `from` does not have it (although another repository does): a normal upload session.
    for from in ["empty", "doesnotexist"] {
        let r = reg.post(&format!("/v2/dst/blobs/uploads/?mount={d}&from={from}"), vec![]).await;
        let (h, _) = expect(r, 202).await;
        let loc = must_hdr(&h, "location");
        let uuid = must_hdr(&h, "docker-upload-uuid");
        assert_eq!(loc, format!("/v2/dst/blobs/uploads/{uuid}"));
        expect_error(reg.get(&format!("/v2/dst/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
        let (h, _) = expect(reg.get(&loc).await, 204).await;
        assert_eq!(upload_range(&h), "0-0");
        // The session works.
        expect(reg.finish_upload(&loc, &d, content.clone()).await, 201).await;
        reg.assert_blob("dst", &d, &content).await;
        expect(reg.delete(&format!("/v2/dst/blobs/{d}")).await, 202).await;
    }

    // A blob the registry does not have at all, without `from`: also a session.
    let unknown = sha256(b"not anywhere");
    let r = reg.post(&format!("/v2/dst/blobs/uploads/?mount={unknown}"), vec![]).await;
    let (h, _) = expect(r, 202).await;
    let loc = must_hdr(&h, "location");
    expect(reg.get(&loc).await, 204).await;
}

#[tokio::test]
async fn mount_without_from() {
    // Without `from` nothing is mounted (a blob is linked only from a repository the client
    // names, so a deleted blob stays deleted): the spec's fallback, a 202 upload session.
    let (_sd, reg) = start();
    let content = bytes(25, 321);
    let d = reg.push_blob("somewhere", &content).await;
    let r = reg.post(&format!("/v2/elsewhere/blobs/uploads/?mount={d}"), vec![]).await;
    let (h, _) = expect(r, 202).await;
    assert!(must_hdr(&h, "location").starts_with("/v2/elsewhere/blobs/uploads/"), "{h:?}");
    expect_error(reg.get(&format!("/v2/elsewhere/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
    // A deleted blob cannot be mounted back without `from` either.
    expect(reg.delete(&format!("/v2/somewhere/blobs/{d}")).await, 202).await;
    let r = reg.post(&format!("/v2/again/blobs/uploads/?mount={d}"), vec![]).await;
    expect(r, 202).await;
    expect_error(reg.get(&format!("/v2/again/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn mount_with_invalid_arguments() {
    let (_sd, reg) = start();
    let r = reg.post("/v2/dst/blobs/uploads/?mount=sha256:nothex&from=src", vec![]).await;
    expect_error(r, 400, "DIGEST_INVALID").await;
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

/// Pushes a config and layer in `repo` and returns a hand-formatted (non-canonical) OCI
/// image manifest referencing them.
async fn odd_image_manifest(reg: &Registry, repo: &str, seed: u64) -> Vec<u8> {
    let config = format!("{{\"architecture\":\"arm64\",\"os\":\"linux\",\"n\":{seed}}}").into_bytes();
    let layer = bytes(seed, 333);
    reg.push_blob(repo, &config).await;
    reg.push_blob(repo, &layer).await;
    format!(
        "{{\n   \"schemaVersion\" : 2,\n\t\"mediaType\": \"{OCI_MANIFEST}\",\n  \"config\": {{ \"mediaType\": \"{OCI_CONFIG}\", \"digest\": \"{}\", \"size\": {} }},\n  \"layers\": [\n    {{\"mediaType\":\"{OCI_LAYER}\",\"digest\":\"{}\",\"size\":{}}}\n  ]\n}}\n\n",
        sha256(&config),
        config.len(),
        sha256(&layer),
        layer.len()
    )
    .into_bytes()
}

async fn assert_manifest(reg: &Registry, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
    let d = sha256(bytes);
    let path = format!("/v2/{repo}/manifests/{reference}");
    let (h, body) = expect(reg.get(&path).await, 200).await;
    assert!(body[..] == bytes[..], "{path}: manifest bytes differ: {}", body_text(&body));
    assert_eq!(must_hdr(&h, "content-type"), media_type, "{path}");
    assert_eq!(must_hdr(&h, "docker-content-digest"), d, "{path}");
    assert_eq!(must_hdr(&h, "content-length"), bytes.len().to_string(), "{path}");
    assert!(!must_hdr(&h, "etag").is_empty());
    let (h, body) = expect(reg.head(&path).await, 200).await;
    assert!(body.is_empty());
    assert_eq!(must_hdr(&h, "content-type"), media_type, "HEAD {path}");
    assert_eq!(must_hdr(&h, "docker-content-digest"), d, "HEAD {path}");
    assert_eq!(must_hdr(&h, "content-length"), bytes.len().to_string(), "HEAD {path}");
    assert!(!must_hdr(&h, "etag").is_empty());
}

#[tokio::test]
async fn manifest_put_and_get_by_tag_and_digest() {
    let (_sd, reg) = start();
    let m = odd_image_manifest(&reg, "repo", 30).await;
    let d = sha256(&m);
    let r = reg.put_manifest("repo", "v1", OCI_MANIFEST, &m).await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/manifests/{d}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    assert_manifest(&reg, "repo", "v1", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "repo", &d, OCI_MANIFEST, &m).await;

    // PUT by digest works as well, and re-PUT is idempotent.
    let m2 = odd_image_manifest(&reg, "repo", 31).await;
    let d2 = sha256(&m2);
    reg.push_manifest("repo", &d2, OCI_MANIFEST, &m2).await;
    reg.push_manifest("repo", &d2, OCI_MANIFEST, &m2).await;
    assert_manifest(&reg, "repo", &d2, OCI_MANIFEST, &m2).await;
    assert_eq!(reg.tags("repo").await, vec!["v1"]);

    // Moving a tag.
    reg.push_manifest("repo", "v1", OCI_MANIFEST, &m2).await;
    assert_manifest(&reg, "repo", "v1", OCI_MANIFEST, &m2).await;
    assert_manifest(&reg, "repo", &d, OCI_MANIFEST, &m).await;
}

#[tokio::test]
async fn manifest_put_by_digest_with_tag_parameters() {
    let (_sd, reg) = start();
    let m = odd_image_manifest(&reg, "repo", 32).await;
    let d = sha256(&m);
    let r = reg
        .send(
            reg.req(Method::PUT, &format!("/v2/repo/manifests/{d}?tag=alpha&tag=beta&tag=gamma"))
                .header("content-type", OCI_MANIFEST)
                .body(m.clone()),
        )
        .await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "location"), format!("/v2/repo/manifests/{d}"));
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    for t in ["alpha", "beta", "gamma"] {
        assert_manifest(&reg, "repo", t, OCI_MANIFEST, &m).await;
    }
    assert_eq!(reg.tags("repo").await, vec!["alpha", "beta", "gamma"]);
}

#[tokio::test]
async fn manifest_index_and_nested_index() {
    let (_sd, reg) = start();
    let (d1, m1) = push_seed_image(&reg, "repo", "", 33).await;
    let (d2, m2) = push_seed_image(&reg, "repo", "", 34).await;
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d1, "size": m1.len(), "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": d2, "size": m2.len(), "platform": {"architecture": "arm64", "os": "linux"}},
        ],
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }))
    .unwrap();
    let di = reg.push_manifest("repo", "multi", OCI_INDEX, &index).await;
    assert_manifest(&reg, "repo", "multi", OCI_INDEX, &index).await;
    assert_manifest(&reg, "repo", &di, OCI_INDEX, &index).await;

    let nested = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_INDEX, "digest": di, "size": index.len()},
            {"mediaType": OCI_MANIFEST, "digest": d1, "size": m1.len()},
        ],
    }))
    .unwrap();
    let dn = reg.push_manifest("repo", "nested", OCI_INDEX, &nested).await;
    assert_manifest(&reg, "repo", "nested", OCI_INDEX, &nested).await;
    assert_manifest(&reg, "repo", &dn, OCI_INDEX, &nested).await;

    // Empty index is valid.
    let empty = format!("{{\"schemaVersion\":2,\"mediaType\":\"{OCI_INDEX}\",\"manifests\":[]}}").into_bytes();
    reg.push_manifest("repo", "empty", OCI_INDEX, &empty).await;
    assert_manifest(&reg, "repo", "empty", OCI_INDEX, &empty).await;
}

#[tokio::test]
async fn manifest_docker_schema2_and_manifest_list() {
    let (_sd, reg) = start();
    let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#.to_vec();
    let layer = bytes(35, 200);
    reg.push_blob("docker", &config).await;
    reg.push_blob("docker", &layer).await;
    let m = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": desc(DOCKER_CONFIG, &config),
        "layers": [desc(DOCKER_LAYER, &layer)],
    }))
    .unwrap();
    let d = reg.push_manifest("docker", "latest", DOCKER_MANIFEST, &m).await;
    assert_manifest(&reg, "docker", "latest", DOCKER_MANIFEST, &m).await;
    assert_manifest(&reg, "docker", &d, DOCKER_MANIFEST, &m).await;

    let list = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": d, "size": m.len(), "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let dl = reg.push_manifest("docker", "list", DOCKER_LIST, &list).await;
    assert_manifest(&reg, "docker", "list", DOCKER_LIST, &list).await;
    assert_manifest(&reg, "docker", &dl, DOCKER_LIST, &list).await;

    // Foreign layers need not exist.
    let foreign = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": desc(DOCKER_CONFIG, &config),
        "layers": [
            {"mediaType": DOCKER_FOREIGN, "digest": sha256(b"windows base layer"), "size": 18,
             "urls": ["https://example.invalid/layer.tar.gz"]},
            desc(DOCKER_LAYER, &layer),
        ],
    }))
    .unwrap();
    reg.push_manifest("docker", "foreign", DOCKER_MANIFEST, &foreign).await;
    assert_manifest(&reg, "docker", "foreign", DOCKER_MANIFEST, &foreign).await;
}

#[tokio::test]
async fn manifest_artifact_with_empty_config() {
    let (_sd, reg) = start();
    assert_eq!(sha256(b"{}"), EMPTY_JSON_SHA256);
    reg.push_blob("art", b"{}").await;
    let payload = b"an sbom document".to_vec();
    reg.push_blob("art", &payload).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2, "data": "e30="},
        "layers": [
            {"mediaType": "application/vnd.example.sbom.v1+json", "digest": sha256(&payload), "size": payload.len(),
             "annotations": {"org.opencontainers.image.title": "sbom.json"}},
        ],
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }))
    .unwrap();
    let d = reg.push_manifest("art", "sbom", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "art", "sbom", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "art", &d, OCI_MANIFEST, &m).await;

    // Artifact whose only layer is the empty descriptor too.
    let m2 = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.marker",
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2},
        "layers": [{"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2}],
    }))
    .unwrap();
    reg.push_manifest("art", "marker", OCI_MANIFEST, &m2).await;
    assert_manifest(&reg, "art", "marker", OCI_MANIFEST, &m2).await;

    // The config blob is a normal blob.
    reg.assert_blob("art", EMPTY_JSON_SHA256, b"{}").await;
}

#[tokio::test]
async fn manifest_with_unknown_fields_is_served_byte_for_byte() {
    let (_sd, reg) = start();
    let config = br#"{"architecture":"amd64","os":"linux","x-unknown":{"deep":[1,2,3]}}"#.to_vec();
    reg.push_blob("repo", &config).await;
    let m = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"zzz-extra\":[1,{{\"a\":null}}],\"config\":{{\"mediaType\":\"{OCI_CONFIG}\",\"digest\":\"{}\",\"size\":{},\"x-desc-extra\":true}},\"layers\":[],\"annotations\":{{\"k\":\"\\u00e9\\n\"}},\"aaa-unknown\":\"v\"}}",
        sha256(&config),
        config.len()
    )
    .into_bytes();
    let d = reg.push_manifest("repo", "extra", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "repo", "extra", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "repo", &d, OCI_MANIFEST, &m).await;
    reg.assert_blob("repo", &sha256(&config), &config).await;
}

#[tokio::test]
async fn manifest_image_without_layers() {
    let (_sd, reg) = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("repo", &config).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config),
        "layers": [],
    }))
    .unwrap();
    let d = reg.push_manifest("repo", "nolayers", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "repo", &d, OCI_MANIFEST, &m).await;

    // A zero-byte layer.
    reg.push_blob("repo", b"").await;
    let m2 = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config),
        "layers": [desc(OCI_LAYER, b"")],
    }))
    .unwrap();
    reg.push_manifest("repo", "emptylayer", OCI_MANIFEST, &m2).await;
    assert_manifest(&reg, "repo", "emptylayer", OCI_MANIFEST, &m2).await;
}

#[tokio::test]
async fn manifest_referencing_missing_blobs_is_rejected() {
    let (_sd, reg) = start();
    let config = br#"{"os":"linux","missing":"test"}"#.to_vec();
    let layer = bytes(36, 100);
    let missing = bytes(37, 100);
    reg.push_blob("repo", &config).await;
    reg.push_blob("repo", &layer).await;
    // Blobs that exist, but only in another repository.
    let other_cfg = br#"{"os":"linux","other":true}"#.to_vec();
    let other_layer = bytes(38, 100);
    reg.push_blob("other", &other_cfg).await;
    reg.push_blob("other", &other_layer).await;

    let cases = vec![
        (
            "missing config",
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, b"{\"never\":1}"), "layers": [desc(OCI_LAYER, &layer)]}),
        ),
        (
            "missing layer",
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, &config), "layers": [desc(OCI_LAYER, &layer), desc(OCI_LAYER, &missing)]}),
        ),
        (
            "config in other repo",
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, &other_cfg), "layers": [desc(OCI_LAYER, &layer)]}),
        ),
        (
            "layer in other repo",
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, &config), "layers": [desc(OCI_LAYER, &other_layer)]}),
        ),
    ];
    for (what, m) in cases {
        let bytes = serde_json::to_vec(&m).unwrap();
        let d = sha256(&bytes);
        let r = reg.put_manifest("repo", "t", OCI_MANIFEST, &bytes).await;
        let url = r.url().to_string();
        let (h, body) = expect(r, 400).await;
        check_error_body(&format!("{url} ({what})"), &h, &body, "MANIFEST_BLOB_UNKNOWN");
        expect_error(reg.get(&format!("/v2/repo/manifests/{d}")).await, 404, "MANIFEST_UNKNOWN").await;
    }
    // Docker manifest with a missing layer.
    let m = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": desc(DOCKER_CONFIG, &config), "layers": [desc(DOCKER_LAYER, &missing)]}))
    .unwrap();
    expect_error(reg.put_manifest("repo", "t", DOCKER_MANIFEST, &m).await, 400, "MANIFEST_BLOB_UNKNOWN").await;

    // Index whose child is missing, or only present in another repository.
    let (dother, mother) = push_seed_image(&reg, "other", "x", 39).await;
    let (dhere, mhere) = push_seed_image(&reg, "repo", "", 40).await;
    for (what, child_d, child_len) in [
        ("missing child", sha256(b"no such manifest"), 100usize),
        ("child in other repo", dother.clone(), mother.len()),
    ] {
        let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": dhere, "size": mhere.len()},
            {"mediaType": OCI_MANIFEST, "digest": child_d, "size": child_len},
        ]}))
        .unwrap();
        let r = reg.put_manifest("repo", "idx", OCI_INDEX, &idx).await;
        let url = r.url().to_string();
        let (h, body) = expect(r, 400).await;
        check_error_body(&format!("{url} ({what})"), &h, &body, "MANIFEST_BLOB_UNKNOWN");
    }
    let list = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": sha256(b"nope"), "size": 10},
    ]}))
    .unwrap();
    expect_error(reg.put_manifest("repo", "list", DOCKER_LIST, &list).await, 400, "MANIFEST_BLOB_UNKNOWN").await;
    // Nothing got tagged.
    assert!(reg.tags("repo").await.is_empty());
}

#[tokio::test]
async fn manifest_with_nondistributable_layers_never_pushed() {
    let (_sd, reg) = start();
    let config = br#"{"os":"windows"}"#.to_vec();
    reg.push_blob("win", &config).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config),
        "layers": [
            {"mediaType": OCI_NONDIST, "digest": sha256(b"foreign layer 1"), "size": 12345,
             "urls": ["https://example.invalid/1"]},
            {"mediaType": DOCKER_FOREIGN, "digest": sha256(b"foreign layer 2"), "size": 999},
        ],
    }))
    .unwrap();
    let d = reg.push_manifest("win", "ltsc", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "win", &d, OCI_MANIFEST, &m).await;
}

#[tokio::test]
async fn manifest_with_subject_returns_oci_subject() {
    let (_sd, reg) = start();
    reg.push_blob("repo", b"{}").await;
    // Subject that does not exist (yet).
    let ghost = sha256(b"ghost subject manifest");
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2},
        "layers": [{"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": ghost, "size": 1234},
    }))
    .unwrap();
    let d = sha256(&m);
    let r = reg.put_manifest("repo", &d, OCI_MANIFEST, &m).await;
    let (h, _) = expect(r, 201).await;
    assert_eq!(must_hdr(&h, "oci-subject"), ghost);
    assert_eq!(must_hdr(&h, "docker-content-digest"), d);
    assert_manifest(&reg, "repo", &d, OCI_MANIFEST, &m).await;

    // Existing subject, pushed by tag.
    let (sd, sm) = push_seed_image(&reg, "repo", "base", 41).await;
    let m2 = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": sd, "size": sm.len()},
    }))
    .unwrap();
    let (h, _) = expect(reg.put_manifest("repo", "sig", OCI_MANIFEST, &m2).await, 201).await;
    assert_eq!(must_hdr(&h, "oci-subject"), sd);

    // An index with artifactType and subject.
    let idx = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(&m2), "size": m2.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": sd, "size": sm.len()},
    }))
    .unwrap();
    let (h, _) = expect(reg.put_manifest("repo", "bundle", OCI_INDEX, &idx).await, 201).await;
    assert_eq!(must_hdr(&h, "oci-subject"), sd);
    assert_manifest(&reg, "repo", "bundle", OCI_INDEX, &idx).await;

    // No subject, no OCI-Subject header.
    let (_, plain) = push_seed_image(&reg, "repo", "", 42).await;
    let (h, _) = expect(reg.put_manifest("repo", "plain", OCI_MANIFEST, &plain).await, 201).await;
    assert!(hdr(&h, "oci-subject").is_none());
}

#[tokio::test]
async fn manifest_invalid_is_rejected() {
    let (_sd, reg) = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("repo", &config).await;
    let cfg = desc(OCI_CONFIG, &config);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("not json", OCI_MANIFEST, b"this is not json".to_vec()),
        ("empty body", OCI_MANIFEST, Vec::new()),
        ("truncated json", OCI_MANIFEST, b"{\"schemaVersion\": 2, \"config\": {".to_vec()),
        ("json array", OCI_MANIFEST, b"[1,2,3]".to_vec()),
        ("empty object", OCI_MANIFEST, b"{}".to_vec()),
        ("no config", OCI_MANIFEST, serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []})).unwrap()),
        ("schemaVersion 1", OCI_MANIFEST, serde_json::to_vec(&json!({"schemaVersion": 1, "mediaType": OCI_MANIFEST, "config": cfg, "layers": []})).unwrap()),
        ("schemaVersion 3", OCI_MANIFEST, serde_json::to_vec(&json!({"schemaVersion": 3, "mediaType": OCI_MANIFEST, "config": cfg, "layers": []})).unwrap()),
        ("schemaVersion string", OCI_MANIFEST, serde_json::to_vec(&json!({"schemaVersion": "2", "mediaType": OCI_MANIFEST, "config": cfg, "layers": []})).unwrap()),
        ("no schemaVersion", OCI_MANIFEST, serde_json::to_vec(&json!({"mediaType": OCI_MANIFEST, "config": cfg, "layers": []})).unwrap()),
        ("layers not an array", OCI_MANIFEST, serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": {}})).unwrap()),
        ("config without digest", OCI_MANIFEST, serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "size": 2}, "layers": []})).unwrap()),
        ("index without manifests", OCI_INDEX, serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX})).unwrap()),
        ("index schemaVersion 1", OCI_INDEX, serde_json::to_vec(&json!({"schemaVersion": 1, "mediaType": OCI_INDEX, "manifests": []})).unwrap()),
        ("docker manifest without config", DOCKER_MANIFEST, serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []})).unwrap()),
        ("invalid utf-8", OCI_MANIFEST, vec![b'{', 0xff, 0xfe, b'}']),
    ];
    for (what, mt, body) in cases {
        let r = reg.put_manifest("repo", "bad", mt, &body).await;
        let url = r.url().to_string();
        let (h, b) = expect(r, 400).await;
        check_error_body(&format!("{url} ({what})"), &h, &b, "MANIFEST_INVALID");
    }
    expect_error(reg.get("/v2/repo/manifests/bad").await, 404, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_size_limit() {
    let (_sd, reg) = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("repo", &config).await;
    const LIMIT: usize = 4 * 1024 * 1024;
    let build = |total: usize| -> Vec<u8> {
        let head = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"config\":{{\"mediaType\":\"{OCI_CONFIG}\",\"digest\":\"{}\",\"size\":{}}},\"layers\":[],\"annotations\":{{\"pad\":\"",
            sha256(&config),
            config.len()
        );
        let tail = "\"}}";
        let pad = total - head.len() - tail.len();
        let mut v = head.into_bytes();
        v.extend(std::iter::repeat_n(b'p', pad));
        v.extend_from_slice(tail.as_bytes());
        assert_eq!(v.len(), total);
        v
    };
    // Exactly 4 MiB is accepted.
    let ok = build(LIMIT);
    let d = reg.push_manifest("repo", "big", OCI_MANIFEST, &ok).await;
    let (_, body) = expect(reg.get(&format!("/v2/repo/manifests/{d}")).await, 200).await;
    assert!(body[..] == ok[..]);
    // One byte more is not.
    let too_big = build(LIMIT + 1);
    expect_error(reg.put_manifest("repo", "toobig", OCI_MANIFEST, &too_big).await, 413, "SIZE_INVALID").await;
    // Far over the limit: the server may answer 413 before reading everything and close the
    // connection, so a transport error while sending is tolerated; any answer must be 413.
    let huge = build(LIMIT * 2);
    let sent =
        reg.req(Method::PUT, "/v2/repo/manifests/huge").header("content-type", OCI_MANIFEST).body(huge).send().await;
    if let Ok(r) = sent {
        expect_error(r, 413, "SIZE_INVALID").await;
    }
    expect_error(reg.get("/v2/repo/manifests/huge").await, 404, "MANIFEST_UNKNOWN").await;
    expect_error(reg.get("/v2/repo/manifests/toobig").await, 404, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_put_by_digest_mismatch() {
    let (_sd, reg) = start();
    let (_, m) = push_seed_image(&reg, "repo", "", 43).await;
    let wrong = sha256(b"not the manifest");
    expect_error(reg.put_manifest("repo", &wrong, OCI_MANIFEST, &m).await, 400, "DIGEST_INVALID").await;
    expect_error(reg.get(&format!("/v2/repo/manifests/{wrong}")).await, 404, "MANIFEST_UNKNOWN").await;
    let wrong512 = sha512(b"not the manifest");
    expect_error(reg.put_manifest("repo", &wrong512, OCI_MANIFEST, &m).await, 400, "DIGEST_INVALID").await;
    expect_error(reg.get(&format!("/v2/repo/manifests/{wrong512}")).await, 404, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_sha512() {
    let (_sd, reg) = start();
    let config = br#"{"os":"linux","sha":512}"#.to_vec();
    let layer = bytes(44, 64);
    let cd = reg.push_blob_as("repo", &config, &sha512(&config)).await;
    let ld = reg.push_blob_as("repo", &layer, &sha512(&layer)).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    let d512 = sha512(&m);
    let r = reg.put_manifest("repo", &d512, OCI_MANIFEST, &m).await;
    let (h, _) = expect(r, 201).await;
    let loc = must_hdr(&h, "location");
    assert!(
        loc == format!("/v2/repo/manifests/{d512}") || loc == format!("/v2/repo/manifests/{}", sha256(&m)),
        "Location {loc}"
    );
    let dcd = must_hdr(&h, "docker-content-digest");
    assert!(dcd == d512 || dcd == sha256(&m), "Docker-Content-Digest {dcd}");
    let (h, body) = expect(reg.get(&format!("/v2/repo/manifests/{d512}")).await, 200).await;
    assert!(body[..] == m[..]);
    assert_eq!(must_hdr(&h, "content-type"), OCI_MANIFEST);
    let (_, body) = expect(reg.get(&loc).await, 200).await;
    assert!(body[..] == m[..]);
    expect(reg.head(&format!("/v2/repo/manifests/{d512}")).await, 200).await;

    // sha512 with tags.
    let r = reg
        .send(
            reg.req(Method::PUT, &format!("/v2/repo/manifests/{d512}?tag=t512"))
                .header("content-type", OCI_MANIFEST)
                .body(m.clone()),
        )
        .await;
    expect(r, 201).await;
    let (_, body) = expect(reg.get("/v2/repo/manifests/t512").await, 200).await;
    assert!(body[..] == m[..]);

    // Index referring to a manifest by sha512.
    let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": d512, "size": m.len()}]}))
    .unwrap();
    reg.push_manifest("repo", "idx512", OCI_INDEX, &idx).await;

    // Delete by sha512.
    expect(reg.delete(&format!("/v2/repo/manifests/{d512}")).await, 202).await;
    expect_error(reg.get(&format!("/v2/repo/manifests/{d512}")).await, 404, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_unknown_is_404() {
    let (_sd, reg) = start();
    push_seed_image(&reg, "repo", "exists", 45).await;
    push_seed_image(&reg, "other", "only-in-other", 46).await;
    let d = sha256(b"no manifest");
    expect_error(reg.get("/v2/repo/manifests/nope").await, 404, "MANIFEST_UNKNOWN").await;
    expect_error(reg.get(&format!("/v2/repo/manifests/{d}")).await, 404, "MANIFEST_UNKNOWN").await;
    let (_, body) = expect(reg.head("/v2/repo/manifests/nope").await, 404).await;
    assert!(body.is_empty());
    expect(reg.head(&format!("/v2/repo/manifests/{d}")).await, 404).await;
    // Tags and manifests are per repository.
    expect_error(reg.get("/v2/repo/manifests/only-in-other").await, 404, "MANIFEST_UNKNOWN").await;
    let (od, _) = push_seed_image(&reg, "other", "", 47).await;
    expect_error(reg.get(&format!("/v2/repo/manifests/{od}")).await, 404, "MANIFEST_UNKNOWN").await;
    // A repository that does not exist.
    expect_error_one_of(reg.get("/v2/ghost/manifests/latest").await, 404, &["MANIFEST_UNKNOWN", "NAME_UNKNOWN"]).await;
}

#[tokio::test]
async fn manifest_delete_by_digest_removes_all_its_tags() {
    let (_sd, reg) = start();
    let (d, m) = push_seed_image(&reg, "repo", "t1", 48).await;
    let r = reg
        .send(
            reg.req(Method::PUT, &format!("/v2/repo/manifests/{d}?tag=t2"))
                .header("content-type", OCI_MANIFEST)
                .body(m),
        )
        .await;
    expect(r, 201).await;
    let (keep, keep_m) = push_seed_image(&reg, "repo", "keep", 49).await;
    assert_eq!(reg.tags("repo").await, vec!["keep", "t1", "t2"]);

    expect(reg.delete(&format!("/v2/repo/manifests/{d}")).await, 202).await;
    expect_error(reg.get(&format!("/v2/repo/manifests/{d}")).await, 404, "MANIFEST_UNKNOWN").await;
    expect(reg.head(&format!("/v2/repo/manifests/{d}")).await, 404).await;
    for t in ["t1", "t2"] {
        expect_error(reg.get(&format!("/v2/repo/manifests/{t}")).await, 404, "MANIFEST_UNKNOWN").await;
        expect(reg.head(&format!("/v2/repo/manifests/{t}")).await, 404).await;
    }
    assert_eq!(reg.tags("repo").await, vec!["keep"]);
    assert_manifest(&reg, "repo", &keep, OCI_MANIFEST, &keep_m).await;
    // Deleting again, or something never pushed.
    expect_error(reg.delete(&format!("/v2/repo/manifests/{d}")).await, 404, "MANIFEST_UNKNOWN").await;
    let u = sha256(b"never");
    expect_error(reg.delete(&format!("/v2/repo/manifests/{u}")).await, 404, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_delete_by_tag_removes_only_the_tag() {
    let (_sd, reg) = start();
    let (d, m) = push_seed_image(&reg, "repo", "t1", 50).await;
    reg.push_manifest("repo", "t2", OCI_MANIFEST, &m).await;
    expect(reg.delete("/v2/repo/manifests/t1").await, 202).await;
    expect_error(reg.get("/v2/repo/manifests/t1").await, 404, "MANIFEST_UNKNOWN").await;
    expect(reg.head("/v2/repo/manifests/t1").await, 404).await;
    assert_manifest(&reg, "repo", &d, OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "repo", "t2", OCI_MANIFEST, &m).await;
    assert_eq!(reg.tags("repo").await, vec!["t2"]);
    expect_error(reg.delete("/v2/repo/manifests/t1").await, 404, "MANIFEST_UNKNOWN").await;
    expect_error(reg.delete("/v2/repo/manifests/never").await, 404, "MANIFEST_UNKNOWN").await;
    // The tag can be re-created.
    reg.push_manifest("repo", "t1", OCI_MANIFEST, &m).await;
    assert_manifest(&reg, "repo", "t1", OCI_MANIFEST, &m).await;
}

// ---------------------------------------------------------------------------------------------
// Tags list
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tags_list_is_sorted() {
    let (_sd, reg) = start();
    let (_, m) = push_seed_image(&reg, "library/app", "zeta", 60).await;
    // Only tags whose order is the same byte-wise and case-insensitively (the spec says
    // "lexical order (i.e. case-insensitive alphanumeric order)").
    for t in ["b", "a", "1.0", "10", "9", "a_b", "a-b", "a.b", "b0", "0"] {
        reg.push_manifest("library/app", t, OCI_MANIFEST, &m).await;
    }
    let (h, body) = expect(reg.get("/v2/library/app/tags/list").await, 200).await;
    assert!(must_hdr(&h, "content-type").starts_with("application/json"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["name"], "library/app");
    let expected = vec!["0", "1.0", "10", "9", "a", "a-b", "a.b", "a_b", "b", "b0", "zeta"];
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
    assert_eq!(v["tags"], json!(expected));
    assert!(hdr(&h, "link").is_none(), "no Link without n");
}

#[tokio::test]
async fn tags_list_pagination() {
    let (_sd, reg) = start();
    let (_, m) = push_seed_image(&reg, "repo", "e", 61).await;
    for t in ["c", "a", "d", "b"] {
        reg.push_manifest("repo", t, OCI_MANIFEST, &m).await;
    }
    // n=2: a, b and a Link to the rest.
    let (h, body) = expect(reg.get("/v2/repo/tags/list?n=2").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["name"], "repo");
    assert_eq!(v["tags"], json!(["a", "b"]));
    let link = must_hdr(&h, "link");
    assert_eq!(link, "</v2/repo/tags/list?n=2&last=b>; rel=\"next\"");

    // Follow it.
    let (h, body) = expect(reg.get(&link_target(&link)).await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["c", "d"]));
    let link = must_hdr(&h, "link");
    assert_eq!(link, "</v2/repo/tags/list?n=2&last=d>; rel=\"next\"");
    let (h, body) = expect(reg.get(&link_target(&link)).await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["e"]));
    assert!(hdr(&h, "link").is_none(), "last page has no Link");

    // Exactly the remaining count: no Link.
    let (h, body) = expect(reg.get("/v2/repo/tags/list?n=2&last=c").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["d", "e"]));
    assert!(hdr(&h, "link").is_none());

    // n larger than everything.
    let (h, body) = expect(reg.get("/v2/repo/tags/list?n=100").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["a", "b", "c", "d", "e"]));
    assert!(hdr(&h, "link").is_none());

    // `last` alone; `last` with n; `last` at the end.
    let (_, body) = expect(reg.get("/v2/repo/tags/list?last=b").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["c", "d", "e"]));
    let (_, body) = expect(reg.get("/v2/repo/tags/list?last=b&n=1").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!(["c"]));

    // n=0: an empty list and no Link (spec: MUST).
    let (h, body) = expect(reg.get("/v2/repo/tags/list?n=0").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!([]));
    assert!(hdr(&h, "link").is_none(), "n=0 must not have a Link");
    let (h, body) = expect(reg.get("/v2/repo/tags/list?last=e").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!([]));
    assert!(hdr(&h, "link").is_none());

    // n=1 walks everything one by one.
    let mut seen = Vec::new();
    let mut next = Some("/v2/repo/tags/list?n=1".to_string());
    while let Some(p) = next {
        let (h, body) = expect(reg.get(&p).await, 200).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        let tags = v["tags"].as_array().unwrap();
        assert!(tags.len() <= 1);
        seen.extend(tags.iter().map(|t| t.as_str().unwrap().to_string()));
        next = hdr(&h, "link").map(|l| link_target(&l));
        assert!(seen.len() <= 5, "pagination does not terminate");
    }
    assert_eq!(seen, vec!["a", "b", "c", "d", "e"]);
}

#[tokio::test]
async fn tags_list_unknown_repository() {
    let (_sd, reg) = start();
    push_seed_image(&reg, "known", "v1", 62).await;
    expect_error(reg.get("/v2/unknown/tags/list").await, 404, "NAME_UNKNOWN").await;
    expect_error(reg.get("/v2/known/sub/tags/list").await, 404, "NAME_UNKNOWN").await;
}

#[tokio::test]
async fn tags_list_empty_when_all_tags_deleted() {
    let (_sd, reg) = start();
    let (d, _) = push_seed_image(&reg, "repo", "only", 63).await;
    expect(reg.delete("/v2/repo/manifests/only").await, 202).await;
    let (_, body) = expect(reg.get("/v2/repo/tags/list").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["name"], "repo");
    assert_eq!(v["tags"], json!([]), "{v}");
    // Still true after the manifest itself is deleted.
    expect(reg.delete(&format!("/v2/repo/manifests/{d}")).await, 202).await;
    let (_, body) = expect(reg.get("/v2/repo/tags/list").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!([]), "{v}");

    // A repository with only untagged manifests.
    push_seed_image(&reg, "untagged", "", 64).await;
    let (_, body) = expect(reg.get("/v2/untagged/tags/list").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], json!([]), "{v}");
}

// ---------------------------------------------------------------------------------------------
// Referrers
// ---------------------------------------------------------------------------------------------

struct Referrer {
    digest: String,
    bytes: Vec<u8>,
    media_type: &'static str,
    artifact_type: String,
    annotations: Option<Value>,
}

/// An artifact manifest (empty config) with `subject`; pushed by `reference` ("" = digest).
async fn push_artifact(
    reg: &Registry,
    repo: &str,
    reference: &str,
    subject: &str,
    artifact_type: &str,
    annotations: Option<Value>,
) -> Referrer {
    reg.push_blob(repo, b"{}").await;
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2},
        "layers": [{"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 100},
    });
    if let Some(a) = &annotations {
        m["annotations"] = a.clone();
    }
    let bytes = serde_json::to_vec(&m).unwrap();
    let d = sha256(&bytes);
    let reference = if reference.is_empty() { d.clone() } else { reference.to_string() };
    let (h, _) = expect(reg.put_manifest(repo, &reference, OCI_MANIFEST, &bytes).await, 201).await;
    assert_eq!(must_hdr(&h, "oci-subject"), subject);
    Referrer { digest: d, bytes, media_type: OCI_MANIFEST, artifact_type: artifact_type.to_string(), annotations }
}

/// Asserts the referrers list equals `expected` (in any order), descriptor by descriptor.
fn check_referrers(v: &Value, expected: &[&Referrer]) {
    let got = v["manifests"].as_array().expect("manifests array");
    let by_digest: BTreeMap<String, &Value> =
        got.iter().map(|d| (d["digest"].as_str().expect("digest").to_string(), d)).collect();
    assert_eq!(got.len(), by_digest.len(), "duplicate referrers: {v}");
    let want: Vec<&str> = expected.iter().map(|r| r.digest.as_str()).collect();
    let have: Vec<&str> = by_digest.keys().map(|s| s.as_str()).collect();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(have, want_sorted, "referrers set: {v}");
    for r in expected {
        let dsc = by_digest[&r.digest];
        assert_eq!(dsc["mediaType"], r.media_type, "{dsc}");
        assert_eq!(dsc["size"], r.bytes.len(), "{dsc}");
        assert_eq!(dsc["artifactType"], r.artifact_type.as_str(), "{dsc}");
        match &r.annotations {
            Some(a) => assert_eq!(&dsc["annotations"], a, "{dsc}"),
            None => assert!(
                dsc.get("annotations").is_none() || dsc["annotations"] == json!({}) || dsc["annotations"].is_null(),
                "unexpected annotations: {dsc}"
            ),
        }
    }
}

#[tokio::test]
async fn referrers_list() {
    let (_sd, reg) = start();
    let (subject, _) = push_seed_image(&reg, "repo", "base", 70).await;

    let sig = push_artifact(
        &reg,
        "repo",
        "",
        &subject,
        "application/vnd.example.signature",
        Some(json!({"org.example.kind": "sig", "org.opencontainers.image.created": "2024-05-01T00:00:00Z"})),
    )
    .await;
    let sbom =
        push_artifact(&reg, "repo", "sbom-tag", &subject, "application/vnd.example.sbom", Some(json!({"k": "v"})))
            .await;

    // Image manifest without artifactType: its config mediaType is the artifactType.
    let cfg_type = "application/vnd.example.config.v1+json";
    let cfg = br#"{"custom":"config"}"#.to_vec();
    reg.push_blob("repo", &cfg).await;
    let img_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(cfg_type, &cfg),
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
    }))
    .unwrap();
    let img_d = reg.push_manifest("repo", &sha256(&img_bytes), OCI_MANIFEST, &img_bytes).await;
    let img = Referrer {
        digest: img_d,
        bytes: img_bytes,
        media_type: OCI_MANIFEST,
        artifact_type: cfg_type.into(),
        annotations: None,
    };

    // An index with artifactType and subject.
    let idx_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle",
        "manifests": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
        "annotations": {"bundle": "yes"},
    }))
    .unwrap();
    let idx_d = reg.push_manifest("repo", "bundle", OCI_INDEX, &idx_bytes).await;
    let idx = Referrer {
        digest: idx_d,
        bytes: idx_bytes,
        media_type: OCI_INDEX,
        artifact_type: "application/vnd.example.bundle".into(),
        annotations: Some(json!({"bundle": "yes"})),
    };

    // Noise: a manifest without subject, a referrer of another subject, and a referrer of
    // the same digest in another repository.
    push_seed_image(&reg, "repo", "plain", 71).await;
    let (other_subject, _) = push_seed_image(&reg, "repo", "other", 72).await;
    let other_ref = push_artifact(&reg, "repo", "", &other_subject, "application/vnd.example.signature", None).await;
    let elsewhere = push_artifact(&reg, "elsewhere", "", &subject, "application/vnd.example.signature", None).await;

    let (h, v) = reg.referrers("repo", &subject, None).await;
    assert!(hdr(&h, "oci-filters-applied").is_none());
    check_referrers(&v, &[&sig, &sbom, &img, &idx]);

    let (_, v) = reg.referrers("repo", &other_subject, None).await;
    check_referrers(&v, &[&other_ref]);
    let (_, v) = reg.referrers("elsewhere", &subject, None).await;
    check_referrers(&v, &[&elsewhere]);
    let (_, v) = reg.referrers("elsewhere", &other_subject, None).await;
    check_referrers(&v, &[]);
}

#[tokio::test]
async fn referrers_filter_by_artifact_type() {
    let (_sd, reg) = start();
    let (subject, _) = push_seed_image(&reg, "repo", "base", 73).await;
    let a = push_artifact(&reg, "repo", "", &subject, "application/vnd.example.a", Some(json!({"n": "1"}))).await;
    let b1 = push_artifact(&reg, "repo", "", &subject, "application/vnd.example.b", Some(json!({"n": "2"}))).await;
    let b2 = push_artifact(&reg, "repo", "", &subject, "application/vnd.example.b", Some(json!({"n": "3"}))).await;
    let plus = push_artifact(&reg, "repo", "", &subject, "application/vnd.example.c+json", None).await;

    let (h, v) = reg.referrers("repo", &subject, Some("application/vnd.example.b")).await;
    assert_eq!(must_hdr(&h, "oci-filters-applied"), "artifactType");
    check_referrers(&v, &[&b1, &b2]);

    let (h, v) = reg.referrers("repo", &subject, Some("application/vnd.example.a")).await;
    assert_eq!(must_hdr(&h, "oci-filters-applied"), "artifactType");
    check_referrers(&v, &[&a]);

    // '+' must be percent-decoded, not turned into a space.
    let (h, v) = reg.referrers("repo", &subject, Some("application/vnd.example.c+json")).await;
    assert_eq!(must_hdr(&h, "oci-filters-applied"), "artifactType");
    check_referrers(&v, &[&plus]);

    let (h, v) = reg.referrers("repo", &subject, Some("application/vnd.example.none")).await;
    assert_eq!(must_hdr(&h, "oci-filters-applied"), "artifactType");
    check_referrers(&v, &[]);

    let (_, v) = reg.referrers("repo", &subject, None).await;
    check_referrers(&v, &[&a, &b1, &b2, &plus]);
}

#[tokio::test]
async fn referrers_of_unknown_subject_is_empty() {
    let (_sd, reg) = start();
    push_seed_image(&reg, "repo", "x", 74).await;
    let (_, v) = reg.referrers("repo", &sha256(b"nothing refers to me"), None).await;
    assert_eq!(v["manifests"], json!([]));
    let (_, v) = reg.referrers("repo", &sha512(b"nothing refers to me"), None).await;
    assert_eq!(v["manifests"], json!([]));
    // Even in a repository that does not exist.
    let (_, v) = reg.referrers("ghost", &sha256(b"nothing"), None).await;
    assert_eq!(v["manifests"], json!([]));
}

#[tokio::test]
async fn referrers_before_subject_exists_and_after_delete() {
    let (_sd, reg) = start();
    // Compute the subject's digest first, push the referrers, then the subject.
    let config = br#"{"os":"linux","late":true}"#.to_vec();
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(OCI_CONFIG, &config), "layers": []
    }))
    .unwrap();
    let subject = sha256(&m);
    let r1 = push_artifact(&reg, "repo", "r1", &subject, "application/vnd.example.x", Some(json!({"i": "1"}))).await;
    let r2 = push_artifact(&reg, "repo", "", &subject, "application/vnd.example.y", None).await;
    let (_, v) = reg.referrers("repo", &subject, None).await;
    check_referrers(&v, &[&r1, &r2]);

    reg.push_blob("repo", &config).await;
    reg.push_manifest("repo", "subject", OCI_MANIFEST, &m).await;
    let (_, v) = reg.referrers("repo", &subject, None).await;
    check_referrers(&v, &[&r1, &r2]);

    // Deleting only the tag of a referrer keeps it (the manifest still exists).
    expect(reg.delete("/v2/repo/manifests/r1").await, 202).await;
    let (_, v) = reg.referrers("repo", &subject, None).await;
    check_referrers(&v, &[&r1, &r2]);

    // Deleting the referrer manifest removes it.
    expect(reg.delete(&format!("/v2/repo/manifests/{}", r1.digest)).await, 202).await;
    let (_, v) = reg.referrers("repo", &subject, None).await;
    check_referrers(&v, &[&r2]);
    expect(reg.delete(&format!("/v2/repo/manifests/{}", r2.digest)).await, 202).await;
    let (_, v) = reg.referrers("repo", &subject, None).await;
    check_referrers(&v, &[]);
}

#[tokio::test]
async fn referrers_sha512() {
    let (_sd, reg) = start();
    let config = br#"{"os":"linux","s":"512"}"#.to_vec();
    let cd = reg.push_blob_as("repo", &config, &sha512(&config)).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()}, "layers": []
    }))
    .unwrap();
    let subject = sha512(&m);
    let (h, _) = expect(reg.put_manifest("repo", &subject, OCI_MANIFEST, &m).await, 201).await;
    assert!(hdr(&h, "oci-subject").is_none());
    let r =
        push_artifact(&reg, "repo", "sig", &subject, "application/vnd.example.sig512", Some(json!({"a": "b"}))).await;
    let (_, v) = reg.referrers("repo", &subject, None).await;
    check_referrers(&v, &[&r]);
    let (h, v) = reg.referrers("repo", &subject, Some("application/vnd.example.sig512")).await;
    assert_eq!(must_hdr(&h, "oci-filters-applied"), "artifactType");
    check_referrers(&v, &[&r]);
    // The sha256 of the same subject bytes is a different digest with no referrers.
    let (_, v) = reg.referrers("repo", &sha256(&m), None).await;
    check_referrers(&v, &[]);
}

// ---------------------------------------------------------------------------------------------
// Catalog
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn catalog_lists_sorted_repositories_with_pagination() {
    let (_sd, reg) = start();
    let (_, body) = expect(reg.get("/v2/_catalog").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["repositories"], json!([]));

    let names = ["zeta", "beta", "alpha/one", "alpha", "alpha-x", "gamma/a/b"];
    for (i, n) in names.iter().enumerate() {
        push_seed_image(&reg, n, "latest", 80 + i as u64).await;
    }
    let mut sorted = names.to_vec();
    sorted.sort();
    assert_eq!(sorted, vec!["alpha", "alpha-x", "alpha/one", "beta", "gamma/a/b", "zeta"]);

    let (h, body) = expect(reg.get("/v2/_catalog").await, 200).await;
    assert!(must_hdr(&h, "content-type").starts_with("application/json"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["repositories"], json!(sorted));
    assert!(hdr(&h, "link").is_none());

    let (h, body) = expect(reg.get("/v2/_catalog?n=2").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["repositories"], json!(["alpha", "alpha-x"]));
    let link = must_hdr(&h, "link");
    assert_eq!(link, "</v2/_catalog?n=2&last=alpha-x>; rel=\"next\"");

    // Walk with n=2 by following Link.
    let mut seen: Vec<String> = Vec::new();
    let mut next = Some("/v2/_catalog?n=2".to_string());
    let mut pages = 0;
    while let Some(p) = next {
        pages += 1;
        assert!(pages <= 4, "catalog pagination does not terminate");
        let (h, body) = expect(reg.get(&p).await, 200).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        let repos = v["repositories"].as_array().unwrap();
        assert!(repos.len() <= 2);
        seen.extend(repos.iter().map(|r| r.as_str().unwrap().to_string()));
        next = hdr(&h, "link").map(|l| link_target(&l));
    }
    assert_eq!(seen, sorted);
    assert_eq!(pages, 3, "6 repositories with n=2 is exactly 3 pages");

    let (h, body) = expect(reg.get("/v2/_catalog?last=beta").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["repositories"], json!(["gamma/a/b", "zeta"]));
    assert!(hdr(&h, "link").is_none());
    let (_, body) = expect(reg.get("/v2/_catalog?n=1&last=alpha-x").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["repositories"], json!(["alpha/one"]));
}

// ---------------------------------------------------------------------------------------------
// Methods and hostile input
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_method_is_405_unsupported() {
    let (_sd, reg) = start();
    let d = reg.push_blob("repo", b"abc").await;
    let loc = reg.start_upload("repo").await;
    let cases: Vec<(Method, String)> = vec![
        (Method::POST, "/v2/repo/manifests/x".into()),
        (Method::PATCH, "/v2/repo/manifests/x".into()),
        (Method::POST, format!("/v2/repo/blobs/{d}")),
        (Method::PUT, format!("/v2/repo/blobs/{d}")),
        (Method::PATCH, format!("/v2/repo/blobs/{d}")),
        (Method::POST, "/v2/repo/tags/list".into()),
        (Method::DELETE, "/v2/repo/tags/list".into()),
        (Method::PUT, format!("/v2/repo/referrers/{d}")),
        (Method::DELETE, format!("/v2/repo/referrers/{d}")),
        (Method::POST, "/v2/_catalog".into()),
        (Method::DELETE, "/v2/_catalog".into()),
        (Method::POST, loc.clone()),
    ];
    for (m, p) in cases {
        let r = reg.send(reg.req(m.clone(), &p).body(Vec::new())).await;
        let url = format!("{m} {}", r.url());
        let (h, b) = expect(r, 405).await;
        check_error_body(&url, &h, &b, "UNSUPPORTED");
    }
    // The blob and the session are unaffected.
    reg.assert_blob("repo", &d, b"abc").await;
    expect(reg.get(&loc).await, 204).await;
}

#[tokio::test]
async fn hostile_paths_never_5xx() {
    let (_sd, reg) = start();
    let content = b"secret".to_vec();
    let d = reg.push_blob("b", &content).await;
    let hexpart = &d["sha256:".len()..];
    let paths = vec![
        format!("/v2/a/../b/blobs/{d}"),
        format!("/v2/%2e%2e/b/blobs/{d}"),
        format!("/v2/a/%2e%2e/b/blobs/{d}"),
        format!("/v2/a/%2E%2E/%2E%2E/b/blobs/{d}"),
        format!("/v2/a%2f..%2fb/blobs/{d}"),
        format!("/v2/../../etc/blobs/{d}"),
        format!("/v2/b/blobs/sha256:..%2f..%2f{hexpart}"),
        "/v2/b/blobs/..%2f..%2f..%2fetc%2fpasswd".into(),
        "/v2/b/blobs/sha256:%00".into(),
        "/v2/b/manifests/..%2f..%2fx".into(),
        "/v2/b/manifests/%2e%2e".into(),
        "/v2/b/manifests/..".into(),
        "/v2/b/blobs/uploads/..%2f..%2f..%2fetc".into(),
        "/v2/b/blobs/uploads/%2e%2e".into(),
        "/v2/b/blobs/uploads/../../../../etc/passwd".into(),
        "/v2/b/tags/list?n=abc".into(),
        "/v2/b/tags/list?n=-1".into(),
        "/v2/b/tags/list?n=1.5".into(),
        "/v2/_catalog?n=abc".into(),
        "/v2/_catalog?n=-5".into(),
        "/v2/b%00/blobs/x".into(),
        format!("/v2/{}/blobs/{d}", "a/".repeat(2000)),
    ];
    for p in &paths {
        for method in ["GET", "HEAD", "DELETE", "PATCH", "PUT"] {
            let st = raw_status(&reg, &raw_get(&reg, method, p)).await;
            assert!((400..500).contains(&st), "{method} {p}: expected a 4xx, got {st}");
        }
    }
    // Non-numeric n is a client error for GET.
    for p in ["/v2/b/tags/list?n=abc", "/v2/_catalog?n=abc", "/v2/b/tags/list?n=-1"] {
        expect_4xx(reg.get(p).await).await;
    }
    for p in ["/v2/b/tags/list?n=99999999999999999999999999", "/v2/_catalog?n=99999999999999999999999999"] {
        let st = raw_status(&reg, &raw_get(&reg, "GET", p)).await;
        assert!(st < 500, "{p}: got {st}");
    }
    // Everything is still there and the server is alive.
    reg.assert_blob("b", &d, &content).await;
    expect(reg.get("/v2/").await, 200).await;
    // No repository was created by any of this.
    let (_, body) = expect(reg.get("/v2/_catalog").await, 200).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["repositories"], json!(["b"]), "only the repository the blob was pushed to: {v}");
}

#[tokio::test]
async fn hostile_content_range_and_range_headers() {
    let (_sd, reg) = start();
    let loc = reg.start_upload("repo").await;
    let (h, _) = expect(reg.patch_chunk(&loc, 0, b"0123456789").await, 202).await;
    let loc = must_hdr(&h, "location");
    let bad_ranges = [
        "0-18446744073709551616",
        "18446744073709551615-18446744073709551615",
        "99999999999999999999999999-99999999999999999999999999",
        "10-18446744073709551615",
        "18446744073709551614-18446744073709551615",
        "5-2",
        "-1-5",
        "abc",
        "-",
    ];
    for cr in bad_ranges {
        let r = reg
            .send(
                reg.req(Method::PATCH, &loc)
                    .header("content-type", "application/octet-stream")
                    .header("content-range", cr)
                    .body(b"abcd".to_vec()),
            )
            .await;
        let st = r.status().as_u16();
        let body = r.bytes().await.unwrap_or_default();
        assert!(st == 400 || st == 416, "Content-Range {cr:?}: expected 400 or 416, got {st}: {}", body_text(&body));
        // A rejected chunk leaves the session where it was.
        let (h, _) = expect(reg.get(&loc).await, 204).await;
        assert_eq!(upload_range(&h), "0-9", "session offset after the rejected Content-Range {cr:?}");
    }
    // Content-Range that disagrees with the body length: rejected, so rolled back.
    let r = reg.send(reg.req(Method::PATCH, &loc).header("content-range", "10-19").body(b"abcd".to_vec())).await;
    expect_4xx(r).await;
    let (h, _) = expect(reg.get(&loc).await, 204).await;
    assert_eq!(upload_range(&h), "0-9", "session offset after a chunk shorter than its Content-Range");
    // The session goes on from there, and none of the rejected bytes are in the blob.
    let (h, _) = expect(reg.patch_chunk(&loc, 10, b"ABCDEF").await, 202).await;
    assert_eq!(upload_range(&h), "0-15");
    let loc = must_hdr(&h, "location");
    let whole = b"0123456789ABCDEF";
    expect(reg.finish_upload(&loc, &sha256(whole), vec![]).await, 201).await;
    reg.assert_blob("repo", &sha256(whole), whole).await;

    // Range headers on a blob.
    let content = bytes(90, 64);
    let d = reg.push_blob("repo", &content).await;
    for range in [
        "bytes=18446744073709551615-",
        "bytes=0-18446744073709551616",
        "bytes=99999999999999999999999-",
        "bytes=-99999999999999999999999",
        "bytes=5-2",
        "bytes=abc",
        "bytes=",
        "bytes=-0",
        "items=0-5",
        "garbage",
    ] {
        let r = reg.send(reg.req(Method::GET, &format!("/v2/repo/blobs/{d}")).header("range", range)).await;
        let st = r.status().as_u16();
        let h = r.headers().clone();
        let body = r.bytes().await.unwrap_or_default();
        assert!(st == 200 || st == 206 || st == 416, "Range {range:?}: got {st}");
        match st {
            200 => assert!(body[..] == content[..], "Range {range:?}: 200 must be the whole blob"),
            416 => assert_eq!(must_hdr(&h, "content-range"), "bytes */64", "Range {range:?}"),
            _ => {
                let cr = must_hdr(&h, "content-range");
                assert!(cr.starts_with("bytes ") && cr.ends_with("/64"), "Range {range:?}: {cr}");
            }
        }
    }
    // Ranges past the end on a clamp: bytes=0-18446744073709551616 may be 206 (whole) or 416,
    // handled above. The server is still alive:
    expect(reg.get("/v2/").await, 200).await;
}

#[tokio::test]
async fn hostile_manifest_bodies() {
    let (_sd, reg) = start();
    // Deeply nested JSON.
    let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000)).into_bytes();
    expect_error(reg.put_manifest("repo", "deep", OCI_MANIFEST, &deep).await, 400, "MANIFEST_INVALID").await;
    let deep_obj = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"annotations\":{}{}}}",
        "{\"a\":".repeat(100_000),
        "}".repeat(100_000)
    )
    .into_bytes();
    expect_4xx(reg.put_manifest("repo", "deep2", OCI_MANIFEST, &deep_obj).await).await;

    // Descriptors carrying traversal attempts in their digests.
    for bad in ["sha256:../../../../etc/passwd", "../../etc/passwd", "sha256:", "sha256:%2e%2e"] {
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": bad, "size": 2}, "layers": []
        }))
        .unwrap();
        let r = reg.put_manifest("repo", "trav", OCI_MANIFEST, &m).await;
        expect_error_one_of(r, 400, &["MANIFEST_INVALID", "DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN"]).await;
        let s = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": bad, "size": 2}
        }))
        .unwrap();
        let r = reg.put_manifest("repo", "trav", OCI_INDEX, &s).await;
        expect_error_one_of(r, 400, &["MANIFEST_INVALID", "DIGEST_INVALID"]).await;
    }
    expect_error(reg.get("/v2/repo/manifests/trav").await, 404, "MANIFEST_UNKNOWN").await;

    // Huge declared sizes and negative sizes.
    reg.push_blob("repo", b"{}").await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_SHA256, "size": -5}, "layers": []
    }))
    .unwrap();
    let r = reg.put_manifest("repo", "neg", OCI_MANIFEST, &m).await;
    assert!(r.status().as_u16() < 500, "negative size: {}", r.status());
    expect(reg.get("/v2/").await, 200).await;
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_of_the_same_content() {
    let (_sd, reg) = start();
    let content = std::sync::Arc::new(bytes(95, 256 * 1024));
    let d = sha256(&content);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let reg = reg.clone();
        let content = content.clone();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let r = reg.post(&format!("/v2/repo/blobs/uploads/?digest={d}"), content.to_vec()).await;
                expect(r, 201).await;
            } else {
                let loc = reg.start_upload("repo").await;
                let half = content.len() / 2;
                let (h, _) = expect(reg.patch_chunk(&loc, 0, &content[..half]).await, 202).await;
                let loc = must_hdr(&h, "location");
                let (h, _) = expect(reg.patch_chunk(&loc, half, &content[half..]).await, 202).await;
                let loc = must_hdr(&h, "location");
                expect(reg.finish_upload(&loc, &d, vec![]).await, 201).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task panicked");
    }
    reg.assert_blob("repo", &d, &content).await;

    // Concurrent manifest pushes to distinct tags of one repository, and to one tag.
    let (_, m) = push_seed_image(&reg, "repo", "base", 96).await;
    let m = std::sync::Arc::new(m);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let reg = reg.clone();
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            reg.push_manifest("repo", &format!("t{i:02}"), OCI_MANIFEST, &m).await;
            reg.push_manifest("repo", "same", OCI_MANIFEST, &m).await;
        }));
    }
    for t in tasks {
        t.await.expect("task panicked");
    }
    let mut expected: Vec<String> = (0..16).map(|i| format!("t{i:02}")).collect();
    expected.push("base".into());
    expected.push("same".into());
    expected.sort();
    assert_eq!(reg.tags("repo").await, expected);
}

/// Idle upload sessions are removed after `uploads.session_ttl`, counted from their last chunk
/// (not from their creation), and never while a chunk is being received; sessions created
/// while the server has just started (its first sweep runs then) are no exception. With a 3 s
/// TTL swept every 100 ms, a wrong sweep would remove the busy sessions here, and a sweep that
/// does nothing would keep the idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_sessions_created_at_startup_survive() {
    use futures::StreamExt;
    use std::time::Instant;
    const TTL: Duration = Duration::from_secs(3);
    let sd = Stevedore::builder()
        .config("[proxy]\ndefault_upstream = \"\"\n\n[uploads]\nsession_ttl = \"3s\"\nsweep_interval = \"100ms\"\n")
        .start();
    let reg = sd.registry();

    // Left idle from the start: swept once the TTL has passed, not before.
    let idle_opened = Instant::now();
    let idle = reg.start_upload("repo").await;

    // Busy: a chunk every 750 ms for 7.5 s, more than twice the TTL after its creation.
    let busy = {
        let reg = reg.clone();
        tokio::spawn(async move {
            let content = bytes(300, 10 * 1000);
            let mut loc = reg.start_upload("repo").await;
            for (i, chunk) in content.chunks(1000).enumerate() {
                tokio::time::sleep(Duration::from_millis(750)).await;
                let (h, _) = expect(reg.patch_chunk(&loc, i * 1000, chunk).await, 202).await;
                assert_eq!(upload_range(&h), format!("0-{}", (i + 1) * 1000 - 1), "busy session, chunk {i}");
                loc = must_hdr(&h, "location");
            }
            expect(reg.finish_upload(&loc, &sha256(&content), vec![]).await, 201).await;
            reg.assert_blob("repo", &sha256(&content), &content).await;
        })
    };

    // One chunk that takes longer than the TTL to arrive (16 pieces, 250 ms apart).
    let slow = {
        let reg = reg.clone();
        tokio::spawn(async move {
            let content = bytes(301, 16 * 1024);
            let loc = reg.start_upload("repo").await;
            let pieces: Vec<Vec<u8>> = content.chunks(1024).map(<[u8]>::to_vec).collect();
            let body = futures::stream::iter(pieces).then(|p| async move {
                tokio::time::sleep(Duration::from_millis(250)).await;
                Ok::<_, std::io::Error>(p)
            });
            let started = Instant::now();
            let r = reg
                .send(
                    reg.req(Method::PATCH, &loc)
                        .header("content-type", "application/octet-stream")
                        .body(reqwest::Body::wrap_stream(body)),
                )
                .await;
            assert!(started.elapsed() > TTL, "the slow chunk took only {:?}", started.elapsed());
            let (h, _) = expect(r, 202).await;
            assert_eq!(upload_range(&h), format!("0-{}", content.len() - 1), "slow chunk");
            let loc = must_hdr(&h, "location");
            expect(reg.finish_upload(&loc, &sha256(&content), vec![]).await, 201).await;
            reg.assert_blob("repo", &sha256(&content), &content).await;
        })
    };

    // Many short uploads while the server has just started.
    let mut tasks = Vec::new();
    for i in 0..48u64 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let content = bytes(200 + i, 64);
            let loc = reg.start_upload("repo").await;
            let (h, _) = expect(reg.patch_chunk(&loc, 0, &content).await, 202).await;
            let loc = must_hdr(&h, "location");
            expect(reg.finish_upload(&loc, &sha256(&content), vec![]).await, 201).await;
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{} of 48 uploads failed: {:?}", failures.len(), failures.first());

    // The idle session answers until the TTL has passed, then is gone (bounded wait).
    let gone_after = loop {
        let r = reg.get(&idle).await;
        let (st, age) = (r.status().as_u16(), idle_opened.elapsed());
        let _ = r.bytes().await;
        match st {
            204 => {}
            404 => break age,
            other => panic!("idle session {idle}: GET answered {other} after {age:?}"),
        }
        assert!(age < TTL + Duration::from_secs(10), "idle session {idle} still there {age:?} after its creation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // (File times may lag the clock by a tick. On S3 the state records its last activity in
    // millis: an object's whole-second Last-Modified is not what counts.)
    assert!(gone_after + Duration::from_millis(50) >= TTL, "idle session swept after {gone_after:?}, before the TTL");
    let r = reg.finish_upload(&idle, &sha256(b""), vec![]).await;
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN").await;

    busy.await.expect("busy session");
    slow.await.expect("slow session");
}

/// With a default upstream that does not answer (port 1 on loopback is closed), pushes to
/// plain names in `proxy.local_namespaces` still work: the existence checks pushing clients
/// make with HEAD get the local "not found", not an upstream error. A GET for a name outside
/// the local namespaces goes to the upstream and reports the outage.
#[tokio::test]
async fn pushes_work_while_the_default_upstream_is_down() {
    let sd = Stevedore::builder()
        .config("[proxy]\ndefault_upstream = \"\"\nlocal_namespaces = [\"team/app\"]\n")
        .args(&["--upstream", "http://127.0.0.1:1"])
        .start();
    let reg = sd.registry();
    let config = b"{}".to_vec();
    let layer = bytes(7, 4096);
    let (dc, dl) = (sha256(&config), sha256(&layer));
    for d in [&dc, &dl] {
        let r = reg.head(&format!("/v2/team/app/blobs/{d}")).await;
        assert_eq!(r.status().as_u16(), 404, "HEAD blob before the push");
    }
    reg.push_blob("team/app", &config).await;
    reg.push_blob("team/app", &layer).await;
    let r = reg.head("/v2/team/app/manifests/v1").await;
    assert_eq!(r.status().as_u16(), 404, "HEAD manifest before the push");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .unwrap();
    let r = reg
        .send(
            reg.req(Method::PUT, "/v2/team/app/manifests/v1")
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(manifest.clone()),
        )
        .await;
    expect(r, 201).await;
    let (h, body) = expect(reg.get("/v2/team/app/manifests/v1").await, 200).await;
    assert!(body[..] == manifest[..]);
    assert_eq!(must_hdr(&h, "docker-content-digest"), sha256(&manifest));
    let (_, body) = expect(reg.get(&format!("/v2/team/app/blobs/{dl}")).await, 200).await;
    assert!(body[..] == layer[..]);
    expect_error(reg.get("/v2/team/other/manifests/v1").await, 502, "UNAVAILABLE").await;
}
