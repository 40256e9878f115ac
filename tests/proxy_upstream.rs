//! Pull-through cache against a real upstream: CNCF Distribution (`/usr/bin/docker-registry`,
//! installed by `scripts/install-test-deps.sh`; these tests fail with the install hint
//! without it, they never skip). Images are generated and pushed to Distribution here, then
//! pulled through Stevedore with `?ns=`, a path prefix, a plain name (default upstream) and
//! skopeo. Distribution's access log counts what reached the upstream. One Distribution
//! serves HTTPS with a certificate from a CA made in the test (rcgen): trusted through the
//! upstream's `ca_file`, refused cleanly without it.
//!
//! Stevedore names the upstream `upstream.test` (endpoint: Distribution on 127.0.0.1), so the
//! cache namespace is `upstream.test/<repo>` whichever way a client asks.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::distribution::{Distribution, PASSWORD, USER};
use common::http::Registry;
use common::http::{assert_content, client, get_manifest, hdr, read, Read, MANIFEST_ACCEPT};
use common::oci::{self, Blob, Image};
use common::skopeo_cli::Skopeo;
use common::stevedore::{config, Dialect, Stevedore, DIALECTS};
use common::store::{assert_blobs_intact, blob_files, ingest_leftovers, repo_dirs};
use common::tls::TestPki;

const HOST: &str = "upstream.test";

/// Checks the manifest answer: exact bytes, digest, media type.
fn assert_manifest(r: &Read, m: &Blob, what: &str) {
    assert_content(r, &m.digest, &m.data, what);
    let ct = hdr(&r.headers, "content-type").unwrap_or_default();
    assert_eq!(ct.split(';').next().unwrap().trim(), m.media_type, "{what}: Content-Type");
}

/// Pulls `repo:reference` (an image) and all its blobs through Stevedore in `dialect`.
async fn pull_image(
    http: &reqwest::Client,
    sd: &Stevedore,
    dialect: Dialect,
    repo: &str,
    reference: &str,
    img: &Image,
) {
    pull_image_from(http, sd, HOST, dialect, repo, reference, img).await
}

/// [`pull_image`] through the upstream `host`.
async fn pull_image_from(
    http: &reqwest::Client,
    sd: &Stevedore,
    host: &str,
    dialect: Dialect,
    repo: &str,
    reference: &str,
    img: &Image,
) {
    let what = format!("{host} {dialect:?} {repo}:{reference}");
    let url = |rest: &str| sd.url(&dialect.path(host, repo, rest));
    let r = get_manifest(http, url(&format!("manifests/{reference}"))).await;
    assert_manifest(&r, &img.manifest, &what);
    for b in img.blobs() {
        let r = read(http.get(url(&format!("blobs/{}", b.digest)))).await;
        assert_content(&r, &b.digest, &b.data, &format!("{what}: blob"));
    }
}

/// Pulls the index `repo:tag` and every image in it.
async fn pull_index(
    http: &reqwest::Client,
    sd: &Stevedore,
    dialect: Dialect,
    repo: &str,
    tag: &str,
    index: &Blob,
    images: &[&Image],
) {
    let r = get_manifest(http, sd.url(&dialect.path(HOST, repo, &format!("manifests/{tag}")))).await;
    assert_manifest(&r, index, &format!("{dialect:?} {repo}:{tag} index"));
    for img in images {
        pull_image(http, sd, dialect, repo, &img.manifest.digest, img).await;
    }
}

/// The OCI layout skopeo wrote holds `root` under `tag` and every blob byte-for-byte.
fn assert_layout(dir: &std::path::Path, tag: &str, root: &Blob, blobs: &[&Blob]) {
    let (mt, digest) = oci::layout_ref(dir, tag);
    assert_eq!(
        (mt.as_str(), digest.as_str()),
        (root.media_type.as_str(), root.digest.as_str()),
        "{}: index.json entry for {tag}",
        dir.display()
    );
    assert!(oci::layout_blob(dir, &root.digest) == root.data);
    for b in blobs {
        assert!(oci::layout_blob(dir, &b.digest) == b.data, "{}: blob {} differs", dir.display(), b.digest);
    }
}

/// A multi-layer image and a two-platform index pushed to Distribution, pulled through
/// Stevedore with every dialect and skopeo: identical digests; one cached copy per
/// repository (`upstream.test/<repo>`), each blob once; every blob fetched from the upstream
/// once in all, and a second round of pulls makes no upstream blob GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_pull_through_every_dialect_and_skopeo_share_one_cache() {
    let reg = Distribution::start(false);
    let pusher = reg.registry();
    let app = oci::make_image(7001, 3, 1_200_000, "amd64", "linux");
    pusher.push_image("team/app", &app, Some("1.0")).await;
    let amd = oci::make_image(7002, 2, 400_000, "amd64", "linux");
    let arm = oci::make_image(7003, 2, 380_000, "arm64", "linux");
    let index = oci::make_index(&[(&amd, "amd64", None), (&arm, "arm64", Some("v8"))]);
    pusher.push_image("multi", &amd, None).await;
    pusher.push_image("multi", &arm, None).await;
    pusher.push_manifest("multi", "latest", oci::MT_INDEX, &index.data).await;

    let sd = Stevedore::start(&config(HOST, &[(HOST, &reg.url(), "tag_ttl = \"5m\"")]));
    let http = client();
    reg.settle();
    assert_eq!((reg.blob_gets("team/app"), reg.blob_gets("multi")), (0, 0), "blob GETs before any pull");

    // Round 1, cold: team/app with ?ns=, multi with skopeo through the path prefix.
    pull_image(&http, &sd, Dialect::Ns, "team/app", "1.0", &app).await;
    let sk = Skopeo::new();
    let out = tempfile::Builder::new().prefix("proxy-skopeo-").tempdir().unwrap();
    let multi_out = out.path().join("multi-1");
    let skopeo = tokio::task::block_in_place(|| {
        sk.copy(
            &["--all"],
            &format!("docker://{}/{HOST}/multi:latest", sd.host()),
            &format!("oci:{}:latest", multi_out.display()),
        )
    });
    sk.assert_cache_isolated();
    let multi_blobs: Vec<&Blob> =
        amd.blobs().into_iter().chain(arm.blobs()).chain([&amd.manifest, &arm.manifest]).collect();
    assert_layout(&multi_out, "latest", &index, &multi_blobs);
    reg.settle();
    let app_blobs = app.blobs().len();
    let cold = (reg.blob_gets("team/app"), reg.blob_gets("multi"));
    assert_eq!(
        cold,
        (app_blobs, amd.blobs().len() + arm.blobs().len()),
        "upstream blob GETs after the cold pulls (each blob once); skopeo said:\n{skopeo}\naccess log:\n{}",
        reg.access_log()
    );
    let manifest_gets = |repo: &str| reg.count(&format!("\"GET /v2/{repo}/manifests/"));
    let cold_manifests = (manifest_gets("team/app"), manifest_gets("multi"));

    // Round 2, warm: every dialect for both repositories, skopeo with a plain name and a prefix.
    for dialect in DIALECTS {
        pull_image(&http, &sd, dialect, "team/app", "1.0", &app).await;
        pull_image(&http, &sd, dialect, "team/app", &app.manifest.digest, &app).await;
        pull_index(&http, &sd, dialect, "multi", "latest", &index, &[&amd, &arm]).await;
    }
    let app_out = out.path().join("app");
    let multi_out2 = out.path().join("multi-2");
    let sk2 = Skopeo::new();
    tokio::task::block_in_place(|| {
        sk2.copy(&[], &format!("docker://{}/team/app:1.0", sd.host()), &format!("oci:{}:1.0", app_out.display()));
        sk2.copy(
            &["--all"],
            &format!("docker://{}/{HOST}/multi:latest", sd.host()),
            &format!("oci:{}:latest", multi_out2.display()),
        );
    });
    sk2.assert_cache_isolated();
    assert_layout(&app_out, "1.0", &app.manifest, &app.blobs());
    assert_layout(&multi_out2, "latest", &index, &multi_blobs);
    reg.settle();
    assert_eq!(
        (reg.blob_gets("team/app"), reg.blob_gets("multi")),
        cold,
        "warm pulls made upstream blob GETs; access log:\n{}",
        reg.access_log()
    );
    // Tags are younger than tag_ttl (5m) and digests are immutable: no manifest GETs either.
    assert_eq!(
        (manifest_gets("team/app"), manifest_gets("multi")),
        cold_manifests,
        "warm pulls made upstream manifest GETs; access log:\n{}",
        reg.access_log()
    );

    // One cached copy: one repository per upstream repository, each blob once.
    let root = sd.root();
    assert_eq!(
        repo_dirs(root).into_iter().collect::<Vec<_>>(),
        vec![format!("{HOST}/multi"), format!("{HOST}/team/app")],
        "repositories in the store"
    );
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for b in app.blobs().into_iter().chain(multi_blobs.iter().copied()) {
        expected.insert(b.digest.clone());
    }
    expected.insert(app.manifest.digest.clone());
    expected.insert(index.digest.clone());
    assert_eq!(blob_files(root).into_iter().collect::<BTreeSet<_>>(), expected, "content under blobs/");
    assert_eq!(assert_blobs_intact(root), expected.len(), "intact blobs");
    assert!(ingest_leftovers(root).is_empty(), "ingest/ leftovers: {:?}", ingest_leftovers(root));
}

/// An upstream error answer: prompt, JSON, not a success and not a 500.
async fn assert_clean_upstream_error(req: reqwest::RequestBuilder, what: &str) -> Read {
    let r = tokio::time::timeout(Duration::from_secs(20), read(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 20 s"));
    assert!(r.status >= 400 && r.status != 500, "{what}: status {} ({})", r.status, r.text());
    assert!(r.error.is_none(), "{what}: body broke: {:?}", r.error);
    let ct = hdr(&r.headers, "content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "{what}: Content-Type {ct:?}");
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", r.text()));
    assert!(v["errors"][0]["code"].is_string(), "{what}: not a registry error: {v}");
    r
}

/// Distribution with htpasswd (Basic) auth: pulls through with the configured username and
/// password; a wrong password or none is a clean JSON error, not a hang and not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_with_htpasswd_pulls_with_credentials_and_fails_cleanly_without() {
    let reg = Distribution::start(true);
    let anon = client().get(format!("{}/v2/", reg.url())).send().await.unwrap();
    assert_eq!(anon.status().as_u16(), 401, "the upstream must require auth");
    let pusher = Registry::new(&reg.url()).basic_auth(USER, PASSWORD);
    let img = oci::make_image(7101, 2, 300_000, "amd64", "linux");
    pusher.push_image("private/app", &img, Some("v1")).await;

    let sd = Stevedore::start(&config(
        "private.test",
        &[
            ("private.test", &reg.url(), &format!("username = \"{USER}\"\npassword = \"{PASSWORD}\"")),
            ("wrongpw.test", &reg.url(), &format!("username = \"{USER}\"\npassword = \"not-{PASSWORD}\"")),
            ("nocreds.test", &reg.url(), ""),
        ],
    ));
    let http = client();

    // Without valid credentials first, while nothing is cached.
    for host in ["wrongpw.test", "nocreds.test"] {
        let url = |rest: &str| sd.url(&format!("/v2/private/app/{rest}?ns={host}"));
        assert_clean_upstream_error(
            http.get(url("manifests/v1")).header("accept", MANIFEST_ACCEPT),
            &format!("{host}: manifest"),
        )
        .await;
        let layer = &img.layers[0].digest;
        assert_clean_upstream_error(http.get(url(&format!("blobs/{layer}"))), &format!("{host}: blob")).await;
        let h = tokio::time::timeout(Duration::from_secs(20), read(http.head(url(&format!("blobs/{layer}")))))
            .await
            .expect("HEAD hung");
        assert!(h.status >= 400 && h.status != 500, "{host}: HEAD blob status {}", h.status);
    }
    assert!(blob_files(sd.root()).is_empty(), "content cached without valid credentials");
    assert!(ingest_leftovers(sd.root()).is_empty());

    // With the right credentials, every dialect.
    for dialect in DIALECTS {
        pull_image_from(&http, &sd, "private.test", dialect, "private/app", "v1", &img).await;
    }
    assert_eq!(repo_dirs(sd.root()).into_iter().collect::<Vec<_>>(), vec!["private.test/private/app".to_string()]);
    // Each blob was downloaded from the upstream once, with credentials that worked.
    reg.settle();
    let log = reg.access_log();
    let ok_blob_gets =
        log.lines().filter(|l| l.contains("\"GET /v2/private/app/blobs/") && l.contains("HTTP/1.1\" 200 ")).count();
    assert_eq!(ok_blob_gets, img.blobs().len(), "successful upstream blob GETs:\n{log}");
}

/// Distribution over HTTPS, its certificate (for 127.0.0.1) issued by a CA made here. With
/// `ca_file` naming that CA, pulls through in every dialect are byte-exact and reach the
/// upstream; the same upstream without `ca_file` (system roots only) gets a clean 502
/// registry error naming the certificate problem, nothing reaches Distribution's HTTP layer,
/// nothing is cached, and Stevedore keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_over_tls_pulls_with_ca_file_and_fails_cleanly_without() {
    let pki_dir = tempfile::Builder::new().prefix("proxy-tls-pki-").tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let reg = Distribution::start_tls(&pki);
    assert!(reg.url().starts_with("https://127.0.0.1:"), "{}", reg.url());
    let pusher = reg.registry();
    let img = oci::make_image(7201, 2, 250_000, "amd64", "linux");
    pusher.push_image("secure/app", &img, Some("v1")).await;

    let ca_file = format!("ca_file = \"{}\"", pki.ca_file.display());
    let sd = Stevedore::start(&config(
        "tls.test",
        &[("tls.test", &reg.url(), &ca_file), ("untrusted.test", &reg.url(), "")],
    ));
    let http = client();

    // Without the CA first, while nothing is cached.
    let url = |rest: &str| sd.url(&format!("/v2/secure/app/{rest}?ns=untrusted.test"));
    let layer = &img.layers[0].digest;
    let requests = [
        ("manifest", http.get(url("manifests/v1")).header("accept", MANIFEST_ACCEPT)),
        (
            "manifest by digest",
            http.get(url(&format!("manifests/{}", img.manifest.digest))).header("accept", MANIFEST_ACCEPT),
        ),
        ("blob", http.get(url(&format!("blobs/{layer}")))),
    ];
    for (what, req) in requests {
        let r = assert_clean_upstream_error(req, &format!("untrusted.test: {what}")).await;
        assert_eq!(r.status, 502, "untrusted.test: {what}: {}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE", "untrusted.test: {what}: {v}");
        let detail = v["errors"][0]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("certificate"), "untrusted.test: {what}: detail does not name the certificate: {v}");
    }
    let h = tokio::time::timeout(Duration::from_secs(20), read(http.head(url(&format!("blobs/{layer}")))))
        .await
        .expect("HEAD hung");
    assert_eq!(h.status, 502, "untrusted.test: HEAD blob");
    assert!(blob_files(sd.root()).is_empty(), "content cached from an untrusted upstream");
    assert!(ingest_leftovers(sd.root()).is_empty());
    reg.settle();
    let reached = reg.requests_for("secure/app");
    assert!(reached.is_empty(), "requests over an untrusted connection reached Distribution:\n{reached}");
    let alive = read(http.get(sd.url("/v2/"))).await;
    assert_eq!(alive.status, 200, "Stevedore after the TLS failures: {}", sd.problems());
    assert!(!sd.problems().contains("panicked"), "{}", sd.problems());

    // With the CA, every dialect (plain names go to the default upstream, tls.test).
    for dialect in DIALECTS {
        pull_image_from(&http, &sd, "tls.test", dialect, "secure/app", "v1", &img).await;
    }
    assert_eq!(repo_dirs(sd.root()).into_iter().collect::<Vec<_>>(), vec!["tls.test/secure/app".to_string()]);
    reg.settle();
    let log = reg.access_log();
    // HTTP/2 or HTTP/1.1, whatever ALPN settled on.
    let ok = |prefix: &str| log.lines().filter(|l| l.contains(prefix) && l.contains("\" 200 ")).count();
    assert_eq!(ok("\"GET /v2/secure/app/blobs/"), img.blobs().len(), "upstream blob GETs over TLS (each once):\n{log}");
    assert!(ok("\"GET /v2/secure/app/manifests/v1 ") >= 1, "no upstream manifest GET over TLS:\n{log}");
}

/// A `ca_file` that is missing, empty, holds no certificate or a broken one stops
/// `check-config` and `serve` with an error naming the key, the upstream and the file.
#[test]
fn bad_ca_file_stops_check_config_and_serve_naming_upstream_and_file() {
    let dir = tempfile::Builder::new().prefix("proxy-bad-ca-").tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let key_only = std::fs::read_to_string(&pki.key_file).unwrap();
    let cases: [(&str, Option<&str>, &str); 5] = [
        ("missing.pem", None, "No such file"),
        ("empty.pem", Some(""), "no PEM certificate"),
        ("key-only.pem", Some(key_only.as_str()), "no PEM certificate"),
        ("truncated.pem", Some("-----BEGIN CERTIFICATE-----\nMIIB\n"), "not a valid PEM bundle"),
        ("garbage.pem", Some("-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n"), "certificate 1"),
    ];
    let bin = || std::process::Command::new(env!("CARGO_BIN_EXE_stevedore"));
    for (name, content, why) in cases {
        let file = dir.path().join(name);
        if let Some(c) = content {
            std::fs::write(&file, c).unwrap();
        }
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            config(
                "private.test",
                &[("private.test", "https://127.0.0.1:9", &format!("ca_file = \"{}\"", file.display()))],
            ),
        )
        .unwrap();
        let check = bin().args(["check-config", "--config"]).arg(&cfg).output().unwrap();
        let serve = bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--root"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&cfg)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        for (cmd, out) in [("check-config", check), ("serve", serve)] {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{cmd} accepted ca_file {name}: {err}");
            for needle in ["upstreams.ca_file", "private.test", &file.display().to_string(), why] {
                assert!(err.contains(needle), "{cmd}, ca_file {name}: error does not say {needle:?}: {err}");
            }
        }
    }
    // The good CA passes.
    let cfg = dir.path().join("good.toml");
    std::fs::write(
        &cfg,
        config(
            "private.test",
            &[("private.test", "https://127.0.0.1:9", &format!("ca_file = \"{}\"", pki.ca_file.display()))],
        ),
    )
    .unwrap();
    let out = bin().args(["check-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
