//! Cache lifecycle: the size cap and LRU eviction (real Distribution upstream), eviction
//! while pulls and fills are in progress, GC under concurrent pushes, fsck, and a store that
//! cannot be written (a full disk: a small tmpfs mounted by the test, root needed, as for
//! tests/clients.rs) that keeps serving what it holds. Real parts on loopback: the
//! `stevedore` binary, Distribution, a scripted fake upstream. Images of a few hundred KiB
//! against caps of a few hundred KiB.
//!
//! `tests/lifecycle_s3.rs` runs the same tests on S3 (moto), but the full-disk one: it needs
//! a filesystem that fills up, and moto has no quota.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::data::bytes;
use common::distribution::Distribution;
use common::fake::Fake;
use common::fake::Plan;
use common::http::{assert_content, assert_json_error, client, get_manifest, hdr, read};
use common::oci::{self, Image};
use common::s3::{cli_config, suite_backend, Backend};
use common::stevedore::cli;
use common::stevedore::{config, Dialect, Stevedore};
use common::store::{
    assert_blobs_intact, assert_stored_blobs_intact, blob_path, dangling, has_blob, ingest_leftovers, ingests_left,
    overwrite_blob, remove_blob, revisions, stored_blob, stored_object, stored_tags,
};
use common::wait_until;

/// A tmpfs of `size` mounted on `dir` for the test; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        assert_eq!(common::proc::euid(), 0, "tests/lifecycle.rs mounts a tmpfs to fill a disk: run it as root");
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir);
        common::proc::run_ok("mount -t tmpfs", cmd, Duration::from_secs(30));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` to the last byte with the file `dir/filler`.
fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    for size in [1 << 20, 4096, 1] {
        let chunk = vec![0xa5u8; size];
        loop {
            match f.write(&chunk) {
                Ok(n) if n == size => continue,
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let probe = std::fs::write(dir.join("probe"), b"x");
    assert!(probe.is_err(), "the filesystem is not full after filling it");
    path
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?.split(' ').nth(1)?.parse().ok()
}

/// A full disk: cache hits and stale tags are still served (also with the upstream down),
/// `/readyz` stays ready, a revalidation that cannot be recorded serves the cached tag stale
/// (`stale-write-failed`), fills and pushes fail with 507 and leave nothing behind, and
/// service resumes once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_serves_hits_and_stale_tags_refuses_writes_cleanly_and_recovers() {
    // Filesystem only: the test fills the store's filesystem (a tmpfs) to the last byte, and
    // moto, the S3 of the tests, has no quota to fill. The twin `lifecycle_s3` says so and
    // runs the rest of this file.
    if suite_backend() == Backend::S3 {
        eprintln!("not run on S3: a full disk needs a filesystem store (moto has no quota)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let _tmpfs = Tmpfs::mount(&mnt, "48m");
    let root = mnt.join("store");
    let mut fake = Fake::start().await;
    let cfg = config("up.test", &[("up.test", &fake.url(), "tag_ttl = \"0s\"")]).replacen(
        "[proxy]\n",
        "[proxy]\nlocal_namespaces = [\"local/*\"]\n",
        1,
    );
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let http = client();
    let reg = sd.registry();
    let img = fake.add_image("team/app", "v1", 41, &[300_000, 200_000]);
    let tag_url = sd.url(&Dialect::Ns.path("up.test", "team/app", "manifests/v1"));
    let blob_url = |d: &str| sd.url(&Dialect::Ns.path("up.test", "team/app", &format!("blobs/{d}")));
    let r = get_manifest(&http, tag_url.clone()).await;
    assert_content(&r, &img.digest, &img.manifest, "first pull");
    for (d, b) in &img.blobs {
        assert_content(&read(http.get(blob_url(d))).await, d, b, "first pull blob");
        let cached = wait_until(Duration::from_secs(20), || blob_path(&root, d).exists()).await;
        assert!(cached, "{d} was not committed");
    }
    let local = bytes(44, 100_000);
    let local_digest = reg.push_blob("local/app", &local).await;
    let uncached = bytes(45, 2 << 20);
    let uncached_digest = fake.add_blob(&uncached);

    let filler = fill_up(&mnt);
    let hits_are_served = |phase: &'static str| {
        let (http, reg, img, local, local_digest) = (&http, &reg, &img, &local, &local_digest);
        let blob_url = &blob_url;
        async move {
            for (d, b) in &img.blobs {
                let r = read(http.get(blob_url(d))).await;
                assert_content(&r, d, b, &format!("{phase}: cached blob"));
                assert_eq!(r.cache(), "hit", "{phase}: cached blob");
            }
            reg.assert_blob("local/app", local_digest, local).await;
            let r = read(http.get(reg.url("/readyz"))).await;
            assert_eq!(r.status, 200, "{phase}: /readyz ({})", r.text());
        }
    };

    // Full, upstream up: the tag is revalidated (refreshing its age needs no space on the
    // filesystem store; where it does, the cached digest is served stale).
    let r = get_manifest(&http, tag_url.clone()).await;
    assert_content(&r, &img.digest, &img.manifest, "full: tag revalidated");
    assert!(["revalidated", "stale-write-failed"].contains(&r.cache().as_str()), "full: outcome {}", r.cache());
    hits_are_served("full").await;
    // The tag moved upstream: the new manifest cannot be stored, the cached one is served.
    let moved = fake.add_image("team/app", "v1", 46, &[1000]);
    let r = get_manifest(&http, tag_url.clone()).await;
    assert_content(&r, &img.digest, &img.manifest, "full: tag moved upstream");
    assert_eq!(r.cache(), "stale-write-failed", "full: tag moved upstream");
    assert!(hdr(&r.headers, "warning").unwrap_or_default().starts_with("110 "), "full: Warning header");
    // A fill and a push are refused cleanly and leave nothing.
    let r = read(http.get(blob_url(&uncached_digest))).await;
    assert!(
        r.status == 507 || r.error.is_some(),
        "full: a fill was served whole ({} {} bytes)",
        r.status,
        r.body.len()
    );
    if r.status == 507 {
        assert_json_error(&r, 507, "UNAVAILABLE", "full: fill");
    }
    let r = read(
        reg.req(
            reqwest::Method::POST,
            &format!("/v2/local/app/blobs/uploads/?digest={}", common::data::sha256(&uncached)),
        )
        .header("content-type", "application/octet-stream")
        .body(uncached.clone()),
    )
    .await;
    assert_json_error(&r, 507, "UNAVAILABLE", "full: push");
    let clean = wait_until(Duration::from_secs(10), || ingest_leftovers(&root).is_empty()).await;
    assert!(clean, "full: ingests left behind: {:?}", ingest_leftovers(&root));
    assert!(!blob_path(&root, &uncached_digest).exists(), "full: a failed fill was committed");
    let metrics = read(http.get(sd.url("/metrics"))).await.text();
    assert_eq!(metric(&metrics, "stevedore_store_writable"), Some(0.0), "{metrics}");
    assert!(metric(&metrics, "stevedore_store_write_failures_total").unwrap_or(0.0) >= 3.0, "{metrics}");
    let logged = sd.access_lines().iter().any(|l| l["cache"] == "stale-write-failed");
    assert!(logged, "the access log does not say a tag was served stale for a write failure");
    // Full, upstream down: hits and stale tags still served.
    fake.fail_with(Some(503));
    let r = get_manifest(&http, tag_url.clone()).await;
    assert_content(&r, &img.digest, &img.manifest, "full, upstream 503: tag");
    assert_eq!(r.cache(), "stale");
    hits_are_served("full, upstream 503").await;
    fake.fail_with(None);
    assert_blobs_intact(&root);

    // Space freed: the moved tag, the fill and the push go through.
    std::fs::remove_file(&filler).unwrap();
    let r = get_manifest(&http, tag_url.clone()).await;
    assert_content(&r, &moved.digest, &moved.manifest, "freed: the moved tag");
    let r = read(http.get(blob_url(&uncached_digest))).await;
    assert_content(&r, &uncached_digest, &uncached, "freed: fill");
    reg.push_blob("local/app", &uncached).await;
    let r = read(http.get(sd.url("/readyz"))).await;
    assert_eq!((r.status, r.text()), (200, "ready\n".to_string()), "freed: /readyz");

    // Full again with the upstream gone: still serving.
    let _filler = fill_up(&mnt);
    fake.stop().await;
    let r = get_manifest(&http, tag_url.clone()).await;
    assert_content(&r, &moved.digest, &moved.manifest, "full, upstream gone: tag");
    assert_eq!(r.cache(), "stale");
    hits_are_served("full, upstream gone").await;
    assert_blobs_intact(&root);
}

const HOST: &str = "upstream.test";
const LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn metrics_text(sd: &Stevedore) -> String {
    read(client().get(sd.url("/metrics"))).await.text()
}

/// Polls `/metrics` until `cond` holds on it (bounded by `limit`); the last text.
async fn wait_metrics(sd: &Stevedore, limit: Duration, cond: impl Fn(&str) -> bool) -> (bool, String) {
    let end = std::time::Instant::now() + limit;
    loop {
        let text = metrics_text(sd).await;
        if cond(&text) {
            return (true, text);
        }
        if std::time::Instant::now() >= end {
            return (false, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn used(text: &str, kind: &str) -> f64 {
    metric(text, &format!("stevedore_store_used_bytes{{kind=\"{kind}\"}}")).unwrap_or(-1.0)
}

/// Pulls `img` (manifest by tag, then every blob) from `repo` of the upstream through
/// Stevedore and checks every digest and byte.
async fn pull(sd: &Stevedore, repo: &str, tag: &str, img: &Image, what: &str) {
    let http = client();
    let r = get_manifest(&http, sd.url(&Dialect::Ns.path(HOST, repo, &format!("manifests/{tag}")))).await;
    assert_content(&r, &img.manifest.digest, &img.manifest.data, &format!("{what}: manifest"));
    for b in img.blobs() {
        let r = read(http.get(sd.url(&Dialect::Ns.path(HOST, repo, &format!("blobs/{}", b.digest))))).await;
        assert_content(&r, &b.digest, &b.data, &format!("{what}: blob"));
    }
}

/// How many usage checks (measure, apply the cap) the server has done.
fn usage_checks(text: &str) -> f64 {
    metric(text, "stevedore_cache_usage_checks_total").unwrap_or(0.0)
}

fn image_bytes(img: &Image) -> usize {
    img.blobs().iter().map(|b| b.size()).sum::<usize>() + img.manifest.size()
}

/// With a real upstream and a cap of 700 KiB: pulling seven images of ~200 KiB brings the
/// proxied content under the low mark; the most recently used images stay complete and pull
/// with the upstream stopped; evicted images are gone with their tags and blobs; no manifest
/// left references a missing blob; pushed and imported content is untouched and reported
/// beside the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_past_the_cap_evicts_least_recently_used_images_whole_and_keeps_pushed_and_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let dist = Distribution::start(false);
    let imgs: Vec<Image> = (0..7).map(|i| oci::make_image(1500 + i, 2, 100_000, "amd64", "linux")).collect();
    for (i, img) in imgs.iter().enumerate() {
        dist.registry().push_image(&format!("lib/img{i}"), img, Some("v1")).await;
    }
    let (max, high, low) = (700u64 << 10, (700u64 << 10) as f64 * 0.95, (700u64 << 10) as f64 * 0.85);
    let cfg = config(HOST, &[(HOST, &dist.url(), "tag_ttl = \"1h\"")]).replacen(
        "[proxy]\n",
        "[proxy]\nlocal_namespaces = [\"local/*\"]\n",
        1,
    ) + &format!("\n[cache]\nmax_size = {max}\ncheck_interval = \"1s\"\naccess_flush_interval = \"1s\"\n");
    let cfg_path = tmp.path().join("stevedore.toml");
    std::fs::write(&cfg_path, cli_config(&root, &cfg)).unwrap();
    // Imported before the server starts: an image in the upstream's cache, bigger than the cap's slack.
    let imported = oci::make_image(1600, 2, 150_000, "amd64", "linux");
    let layout = tmp.path().join("layout");
    oci::write_image_layout(&layout, &imported, "v1");
    let out = cli(
        &[
            "import",
            "--config",
            s(&cfg_path),
            "--root",
            s(&root),
            "--repository",
            &format!("{HOST}/lib/imported"),
            s(&layout),
        ],
        LIMIT,
    );
    assert!(out.status.success(), "import: {}", out.describe());

    let sd = Stevedore::builder()
        .config(&cfg)
        .root(&root)
        .rust_log("warn,stevedore::access=info,stevedore::lifecycle=info")
        .start();
    let reg = sd.registry();
    let pushed = oci::make_image(1700, 2, 200_000, "amd64", "linux");
    reg.push_image("local/app", &pushed, Some("v1")).await;
    for (i, img) in imgs.iter().enumerate() {
        pull(&sd, &format!("lib/img{i}"), "v1", img, &format!("img{i}")).await;
    }
    let total: usize = imgs.iter().map(image_bytes).sum();
    assert!(total as f64 > 2.0 * high, "the test pulls more than the cap ({total} bytes)");
    // Every eviction past the high mark went under the low mark; at rest the cap holds: once
    // every fill has ended, a usage check that started after that (not one measured mid-pull).
    let filled = wait_until(LIMIT, || ingests_left(&sd).is_empty()).await;
    assert!(filled, "fills did not end: {:?}", ingests_left(&sd));
    let checks = usage_checks(&metrics_text(&sd).await);
    let (ok, text) = wait_metrics(&sd, Duration::from_secs(30), |t| {
        usage_checks(t) >= checks + 2.0 && (0.0..=high).contains(&used(t, "proxied"))
    })
    .await;
    assert!(ok, "proxied usage did not come under the high mark {high}:\n{text}");
    let evictions: Vec<f64> = sd
        .log_text()
        .lines()
        .filter(|l| l.contains("evicted least recently used proxied content"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["fields"]["proxied_after"].as_f64())
        .collect();
    assert!(!evictions.is_empty(), "no eviction logged:\n{text}\n{}", sd.problems());
    assert!(
        evictions.iter().all(|p| *p <= low),
        "an eviction stopped above the low mark {low}: {evictions:?}\n{}",
        sd.problems()
    );
    assert!(metric(&text, "stevedore_cache_evicted_bytes_total").unwrap_or(0.0) > 0.0, "{text}");
    assert!(metric(&text, "stevedore_cache_evicted_items_total").unwrap_or(0.0) >= 3.0, "{text}");
    assert!(used(&text, "pushed") >= image_bytes(&pushed) as f64, "pushed usage: {text}");
    assert!(used(&text, "imported") >= image_bytes(&imported) as f64, "imported usage: {text}");
    assert!(metric(&text, "stevedore_cache_oldest_access_seconds").is_some(), "{text}");

    // In the store: what is left is coherent; the oldest images are gone whole, tags included.
    let left = dangling(&sd);
    assert!(left.is_empty(), "present content references absent content: {left:#?}");
    let revs = revisions(&sd);
    let tags = stored_tags(&sd);
    let has = |repo: &str, d: &str| revs.iter().any(|(r, x)| r == &format!("{HOST}/{repo}") && x == d);
    for (i, img) in imgs.iter().enumerate().take(2) {
        assert!(!has(&format!("lib/img{i}"), &img.manifest.digest), "img{i} (least recently used) was kept");
        for b in img.blobs() {
            assert!(!has_blob(&sd, &b.digest), "img{i}: blob {} of an evicted image left", b.digest);
        }
        let repo = format!("{HOST}/lib/img{i}");
        assert!(
            !tags.iter().any(|(r, t, _)| r == &repo && t == "v1"),
            "img{i}: the tag of an evicted manifest is left"
        );
    }
    assert!(has("lib/imported", &imported.manifest.digest), "the imported image was evicted");

    // The upstream gone: the most recently used images, the pushed and the imported one pull whole.
    drop(dist);
    for i in [6usize, 5] {
        pull(&sd, &format!("lib/img{i}"), "v1", &imgs[i], &format!("img{i}, upstream gone")).await;
    }
    pull(&sd, "lib/imported", "v1", &imported, "imported, upstream gone").await;
    let r = get_manifest(&client(), reg.url("/v2/local/app/manifests/v1")).await;
    assert_content(&r, &pushed.manifest.digest, &pushed.manifest.data, "pushed manifest");
    for b in pushed.blobs() {
        reg.assert_blob("local/app", &b.digest, &b.data).await;
    }
    let r = get_manifest(&client(), sd.url(&Dialect::Ns.path(HOST, "lib/img0", "manifests/v1"))).await;
    assert_ne!(r.status, 200, "an evicted image was served with the upstream gone");
    assert_stored_blobs_intact(&sd);
}

/// Eviction running while an image is being pulled (a layer still filling from a slow
/// upstream) leaves that image alone: the pull completes with correct digests; other,
/// older content is evicted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_being_pulled_and_a_fill_in_progress_survive_eviction() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let fake = Fake::start().await;
    let a = fake.add_image("team/a", "v1", 61, &[200_000, 200_000]);
    let b = fake.add_image("team/b", "v1", 62, &[200_000]);
    let c = fake.add_image("team/c", "v1", 63, &[200_000]);
    let cfg = config(HOST, &[(HOST, &fake.url(), "tag_ttl = \"1h\"")])
        + "\n[cache]\nmax_size = \"600KiB\"\ncheck_interval = \"1s\"\naccess_flush_interval = \"1s\"\n";
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let http = client();
    let url = |repo: &str, rest: &str| sd.url(&Dialect::Ns.path(HOST, repo, rest));
    // A: the manifest, the config and the first layer, then the second layer slowly.
    let r = get_manifest(&http, url("team/a", "manifests/v1")).await;
    assert_content(&r, &a.digest, &a.manifest, "a: manifest");
    for (d, body) in &a.blobs[..2] {
        assert_content(&read(http.get(url("team/a", &format!("blobs/{d}")))).await, d, body, "a: blob");
    }
    let (slow_d, slow_body) = a.blobs[2].clone();
    // Half the layer, then nothing until eviction has run.
    let (plan, open) = Plan::new(slow_body.clone()).slow(8 << 10, Duration::from_millis(20)).hold_after(100_000);
    fake.plan(&slow_d, plan);
    let slow = tokio::spawn({
        let (http, u) = (http.clone(), url("team/a", &format!("blobs/{slow_d}")));
        async move { read(http.get(u)).await }
    });
    // B then C push the cache over its cap while A's layer is still filling.
    for (repo, img) in [("team/b", &b), ("team/c", &c)] {
        let r = get_manifest(&http, url(repo, "manifests/v1")).await;
        assert_content(&r, &img.digest, &img.manifest, repo);
        for (d, body) in &img.blobs {
            assert_content(&read(http.get(url(repo, &format!("blobs/{d}")))).await, d, body, repo);
        }
    }
    let (evicted, text) = wait_metrics(&sd, Duration::from_secs(20), |t| {
        metric(t, "stevedore_cache_evicted_items_total").unwrap_or(0.0) > 0.0
    })
    .await;
    assert!(evicted, "nothing was evicted past the cap:\n{text}");
    assert!(!slow.is_finished(), "the held fill ended before eviction ran: the test proves nothing");
    open.send(true).unwrap();
    let r = slow.await.unwrap();
    assert_content(&r, &slow_d, &slow_body, "a: the layer filling while eviction ran");
    // A is whole: every blob (hits, or fetched again) and its manifest.
    let r = get_manifest(&http, url("team/a", "manifests/v1")).await;
    assert_content(&r, &a.digest, &a.manifest, "a: manifest after eviction");
    for (d, body) in &a.blobs {
        assert_content(&read(http.get(url("team/a", &format!("blobs/{d}")))).await, d, body, "a: after eviction");
    }
    // Settled under the cap (A and at most one more image fit under the low mark): measured
    // by a usage check that started after every fill ended.
    let low = (600u64 << 10) as f64 * 0.85;
    let filled = wait_until(LIMIT, || ingests_left(&sd).is_empty()).await;
    assert!(filled, "fills did not end: {:?}", ingests_left(&sd));
    let checks = usage_checks(&metrics_text(&sd).await);
    let (ok, text) = wait_metrics(&sd, Duration::from_secs(20), |t| {
        usage_checks(t) >= checks + 2.0 && (0.0..=low).contains(&used(t, "proxied"))
    })
    .await;
    assert!(ok, "proxied usage did not come under the low mark {low}:\n{text}");
    let revs = revisions(&sd);
    assert!(revs.iter().any(|(_, d)| d == &a.digest), "the image being pulled was evicted: {revs:?}");
    assert!(!revs.iter().any(|(_, d)| d == &b.digest), "b, the least recently used, was kept: {revs:?}");
    let left = dangling(&sd);
    assert!(left.is_empty(), "present content references absent content: {left:#?}");
    assert_stored_blobs_intact(&sd);
}

fn local_config(extra: &str) -> String {
    format!("[proxy]\ndefault_upstream = \"\"\n\n[cache]\n{extra}\n")
}

/// Online GC of pushed repositories while pushes go on: blobs of deleted manifests are
/// reclaimed; every manifest pushed during the runs keeps every blob (including one it
/// shares with the deleted manifest, found by HEAD and not uploaded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_under_concurrent_pushes_reclaims_garbage_and_loses_no_blob_of_a_pushed_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let cfg = local_config("gc_interval = \"1s\"\ngc_grace = \"3s\"\naccess_flush_interval = \"1s\"");
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let reg = sd.registry();
    let garbage = oci::make_image(2100, 2, 50_000, "amd64", "linux");
    reg.push_image("team/app", &garbage, Some("old")).await;
    let kept = oci::make_image(2101, 1, 50_000, "amd64", "linux");
    reg.push_image("team/kept", &kept, Some("v1")).await;
    let r = reg.delete(&format!("/v2/team/app/manifests/{}", garbage.manifest.digest)).await;
    assert_eq!(r.status().as_u16(), 202, "deleting the manifest");
    let shared = &garbage.layers[0];
    // Pushes while GC runs every second: each new image shares the deleted image's first
    // layer (pushed only when the registry does not have it any more).
    let mut pushed = Vec::new();
    let mut refused = 0;
    let started = std::time::Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(8) && i < 40 {
        let mut img = oci::make_image(2200 + i, 1, 20_000, "amd64", "linux");
        img.layers.push(shared.clone());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::MT_MANIFEST,
            "config": img.config.descriptor(),
            "layers": img.layers.iter().map(oci::Blob::descriptor).collect::<Vec<_>>(),
        });
        img.manifest = oci::Blob::new(oci::MT_MANIFEST, serde_json::to_vec(&manifest).unwrap());
        reg.upload_blob("team/app", &img.config.data).await;
        reg.upload_blob("team/app", &img.layers[0].data).await;
        let head = reg.head(&format!("/v2/team/app/blobs/{}", shared.digest)).await;
        if head.status().as_u16() != 200 {
            reg.upload_blob("team/app", &shared.data).await;
        }
        let put = reg.try_put_manifest("team/app", &format!("p{i}"), oci::MT_MANIFEST, img.manifest.data.clone()).await;
        match put {
            Ok(_) => pushed.push((i, img)),
            // A push slower than the grace period may find its blobs collected: refused,
            // never accepted with a blob missing.
            Err(e) if e.to_string().contains("MANIFEST_BLOB_UNKNOWN") => refused += 1,
            Err(e) => panic!("pushing p{i} while GC runs: {e}"),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The deleted image's own blobs go once past the grace period.
    let unique: Vec<&oci::Blob> = vec![&garbage.layers[1], &garbage.config];
    let reclaimed = wait_until(Duration::from_secs(30), || unique.iter().all(|b| !has_blob(&sd, &b.digest))).await;
    assert!(reclaimed, "the deleted manifest's blobs were not reclaimed");
    let text = metrics_text(&sd).await;
    assert!(metric(&text, "stevedore_gc_runs_total{result=\"ok\"}").unwrap_or(0.0) >= 2.0, "{text}");
    assert!(metric(&text, "stevedore_gc_reclaimed_bytes_total").unwrap_or(0.0) > 0.0, "{text}");
    assert!(pushed.len() >= 5 && pushed.len() > refused, "{} pushes accepted, {refused} refused", pushed.len());
    for (i, img) in &pushed {
        let r = get_manifest(&client(), reg.url(&format!("/v2/team/app/manifests/p{i}"))).await;
        assert_content(&r, &img.manifest.digest, &img.manifest.data, "a manifest pushed during GC");
        for b in img.blobs() {
            reg.assert_blob("team/app", &b.digest, &b.data).await;
        }
    }
    for b in kept.blobs() {
        reg.assert_blob("team/kept", &b.digest, &b.data).await;
    }
    let left = dangling(&sd);
    assert!(left.is_empty(), "{left:#?}");

    // `stevedore gc`: a dry run names what would go and removes nothing; the run removes it.
    // (The server runs without online GC for this part.)
    let mut sd = sd;
    sd.terminate(Duration::from_secs(20));
    let mut sd = Stevedore::builder().config(&local_config("gc_interval = \"0s\"")).root(&root).start();
    let r = sd.registry().delete(&format!("/v2/team/kept/manifests/{}", kept.manifest.digest)).await;
    assert_eq!(r.status().as_u16(), 202);
    sd.terminate(Duration::from_secs(20));
    let gc_cfg = tmp.path().join("gc.toml");
    std::fs::write(&gc_cfg, cli_config(&root, &local_config("gc_grace = \"0s\""))).unwrap();
    let out = cli(&["gc", "--config", s(&gc_cfg), "--root", s(&root), "--dry-run"], LIMIT);
    assert!(out.status.success(), "{}", out.describe());
    for b in kept.blobs() {
        assert!(out.stdout.contains(&b.digest), "dry run does not name {}: {}", b.digest, out.stdout);
        assert!(has_blob(&sd, &b.digest), "a dry run removed {}", b.digest);
    }
    let out = cli(&["gc", "--config", s(&gc_cfg), "--root", s(&root)], LIMIT);
    assert!(out.status.success(), "{}", out.describe());
    for b in kept.blobs() {
        assert!(!has_blob(&sd, &b.digest), "gc left {}: {}", b.digest, out.stdout);
    }
    for (_, img) in &pushed {
        for b in img.blobs() {
            assert!(has_blob(&sd, &b.digest), "gc removed {} of a kept manifest", b.digest);
        }
    }
}

/// fsck finds content whose bytes were altered on disk, a dangling link, a dangling tag and
/// a leftover upload; exits non-zero; `--repair` fixes all of it and exits zero; a second
/// run finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_finds_corrupt_blobs_and_dangling_links_and_repair_fixes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let cfg = local_config("");
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let reg = sd.registry();
    let good = oci::make_image(2300, 2, 30_000, "amd64", "linux");
    reg.push_image("team/good", &good, Some("v1")).await;
    let bad = oci::make_image(2301, 2, 30_000, "amd64", "linux");
    reg.push_image("team/bad", &bad, Some("v1")).await;
    let lone = bytes(2302, 10_000);
    let lone_digest = reg.push_blob("team/lone", &lone).await;
    let _session = reg.start_upload("team/lone").await;
    let mut sd = sd;
    sd.terminate(Duration::from_secs(20));

    // Altered bytes (same length), a blob gone from under its link: files on the filesystem,
    // objects in the bucket on S3.
    let corrupt = &bad.layers[1].digest;
    let mut data = stored_blob(&sd, corrupt).expect("the blob to corrupt is stored");
    data[100] ^= 0xff;
    overwrite_blob(&sd, corrupt, &data);
    remove_blob(&sd, &lone_digest);
    let fsck_cfg = tmp.path().join("fsck.toml");
    // Any idle upload is a leftover for this run.
    let text = format!("[uploads]\nsession_ttl = \"1ms\"\n{}", local_config(""));
    std::fs::write(&fsck_cfg, cli_config(&root, &text)).unwrap();
    assert!(!ingests_left(&sd).is_empty(), "the upload session is not in the store");

    let out = cli(&["fsck", "--config", s(&fsck_cfg), "--root", s(&root)], LIMIT);
    assert!(!out.status.success(), "fsck found nothing: {}", out.describe());
    assert!(out.stdout.contains(&format!("corrupt content {corrupt}")), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("dangling link team/lone@{lone_digest}")), "{}", out.stdout);
    assert!(has_blob(&sd, corrupt), "fsck without --repair removed a blob");
    assert!(ingests_left(&sd).is_empty(), "the leftover upload was not removed: {:?}", ingests_left(&sd));

    let out = cli(&["fsck", "--config", s(&fsck_cfg), "--root", s(&root), "--repair", "--rebuild-index"], LIMIT);
    assert!(out.status.success(), "fsck --repair: {}", out.describe());
    assert!(!has_blob(&sd, corrupt), "the corrupt blob is still there");
    assert!(
        out.stdout.contains(&format!("manifest team/bad@{} needs absent content", bad.manifest.digest)),
        "{}",
        out.stdout
    );
    let out = cli(&["fsck", "--config", s(&fsck_cfg), "--root", s(&root)], LIMIT);
    assert!(out.status.success() && !out.stdout.contains("problem:"), "after repair: {}", out.describe());
    assert!(dangling(&sd).is_empty(), "{:#?}", dangling(&sd));
    assert_stored_blobs_intact(&sd);

    // The store serves what is sound; the broken image is gone, not half there.
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let reg = sd.registry();
    for b in good.blobs() {
        reg.assert_blob("team/good", &b.digest, &b.data).await;
    }
    let r = get_manifest(&client(), reg.url("/v2/team/bad/manifests/v1")).await;
    assert_eq!(r.status, 404, "a manifest whose layer was corrupt is still served");
    let r = read(client().get(reg.url(&format!("/v2/team/lone/blobs/{lone_digest}")))).await;
    assert_eq!(r.status, 404);
}

/// Calls across the storage seam so far, not counting the heartbeat's (by `op`).
fn backend_requests(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("stevedore_backend_requests_total{")) {
        if !l.contains("purpose=\"serve\"") {
            continue;
        }
        let op = l.split("op=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?").to_string();
        let n: f64 = l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry(op).or_insert(0.0) += n;
    }
    out
}

fn total(m: &std::collections::BTreeMap<String, f64>) -> f64 {
    m.values().sum()
}

/// The lifecycle's config for the idle tests: every periodic task once a second.
fn idle_config(upstream: &str, extra: &str) -> String {
    config(HOST, &[(HOST, upstream, "tag_ttl = \"1h\"")])
        + "\n[cache]\ncheck_interval = \"1s\"\naccess_flush_interval = \"1s\"\ngc_interval = \"1s\"\ngc_grace = \"1s\"\n"
        + extra
        + "\n[uploads]\nsweep_interval = \"1s\"\n"
}

/// Pulls `n` small blobs (seeded from `seed`) through `sd` from the fake; their bytes.
async fn pull_small_blobs(sd: &Stevedore, fake: &Fake, seed: u64, n: usize) -> u64 {
    let http = client();
    let mut sum = 0;
    for i in 0..n {
        let data = bytes(seed + i as u64, 512 + (i % 7) * 100);
        let d = fake.add_blob(&data);
        let url = sd.url(&Dialect::Ns.path(HOST, &format!("lib/small{}", i % 5), &format!("blobs/{d}")));
        assert_content(&read(http.get(url)).await, &d, &data, &format!("small blob {i}"));
        sum += data.len() as u64;
    }
    let filled = wait_until(LIMIT, || ingests_left(sd).is_empty()).await;
    assert!(filled, "fills did not end: {:?}", ingests_left(sd));
    sum
}

/// A pull's own uses right after its fills commit are not written again (issue #25: one
/// request per blob pulled, on S3): each commit wrote its blob's access record; hits on the
/// same blobs a moment later, then the access flush of a clean stop, leave those records as
/// they were (before, the flush rewrote every one of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_right_after_a_fill_do_not_rewrite_its_access_record() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let fake = Fake::start().await;
    let cfg = config(HOST, &[(HOST, &fake.url(), "tag_ttl = \"1h\"")]) + "\n[cache]\naccess_flush_interval = \"1h\"\n";
    let mut sd = Stevedore::builder().config(&cfg).root(&root).start();
    let (seed, n) = (9100, 8);
    pull_small_blobs(&sd, &fake, seed, n).await;
    let http = client();
    let mut records = Vec::new();
    for i in 0..n {
        let data = bytes(seed + i as u64, 512 + (i % 7) * 100);
        let d = common::data::sha256(&data);
        let key = format!("meta/access/{}", d.replacen(':', "/", 1));
        let record = stored_object(&sd, &key).unwrap_or_else(|| panic!("no access record for {d} after its fill"));
        // Used again: a hit.
        let url = sd.url(&Dialect::Ns.path(HOST, &format!("lib/small{}", i % 5), &format!("blobs/{d}")));
        assert_content(&read(http.get(url)).await, &d, &data, &format!("small blob {i}, again"));
        records.push((d, key, record));
    }
    let status = sd.terminate(LIMIT).expect("the server stops on SIGTERM");
    assert!(status.success(), "clean stop: {status:?}\n{}", sd.problems());
    for (d, key, record) in &records {
        let now = stored_object(&sd, key);
        assert_eq!(
            now.as_deref().map(String::from_utf8_lossy),
            Some(String::from_utf8_lossy(record)),
            "the access record of {d} was written again within a minute of its commit's"
        );
    }
}

/// Waits for two usage checks that report `proxied` bytes of proxied content.
async fn settled_usage(sd: &Stevedore, proxied: u64, what: &str) -> String {
    let checks = usage_checks(&metrics_text(sd).await);
    let (ok, text) =
        wait_metrics(sd, LIMIT, |t| usage_checks(t) >= checks + 2.0 && used(t, "proxied") == proxied as f64).await;
    assert!(ok, "{what}: proxied usage is not {proxied}:\n{text}");
    text
}

/// What one idle store of `n` pulled blobs costs: backend calls while idle (5 s, every
/// periodic task running once a second), and at a clean restart.
struct IdleCost {
    idle: f64,
    idle_ops: std::collections::BTreeMap<String, f64>,
    restart: f64,
    restart_ops: std::collections::BTreeMap<String, f64>,
    /// From the restart to the second usage check it made.
    restart_secs: f64,
}

const IDLE: Duration = Duration::from_secs(5);

async fn idle_cost(n: usize) -> IdleCost {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let fake = Fake::start().await;
    let cfg = idle_config(&fake.url(), "max_size = \"64MiB\"\n");
    let mut sd = Stevedore::builder().config(&cfg).root(&root).start();
    let bytes_pulled = pull_small_blobs(&sd, &fake, 7000 + n as u64 * 10, n).await;
    settled_usage(&sd, bytes_pulled, &format!("n={n}")).await;
    // The pulls' uses are written by the access flush (one record per blob used): idle
    // starts once a flush interval and more have passed with nothing written.
    let end = std::time::Instant::now() + LIMIT;
    let mut before = backend_requests(&metrics_text(&sd).await);
    loop {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let now = backend_requests(&metrics_text(&sd).await);
        let flushed = |m: &std::collections::BTreeMap<String, f64>| m.get("put").copied().unwrap_or(0.0);
        if flushed(&now) == flushed(&before) {
            before = now;
            break;
        }
        assert!(std::time::Instant::now() < end, "n={n}: the access flushes did not end: {now:?}");
        before = now;
    }
    tokio::time::sleep(IDLE).await;
    let after = backend_requests(&metrics_text(&sd).await);
    let idle_ops: std::collections::BTreeMap<String, f64> = after
        .iter()
        .map(|(op, v)| (op.clone(), v - before.get(op).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let idle = total(&idle_ops);

    // A clean stop saves the index with its marker: the next start loads it, walks nothing.
    let status = sd.terminate(LIMIT).expect("the server stops on SIGTERM");
    assert!(status.success(), "n={n}: clean stop: {status:?}\n{}", sd.problems());
    drop(sd);
    let started = std::time::Instant::now();
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let text = settled_usage(&sd, bytes_pulled, &format!("n={n}, restarted")).await;
    let restart_secs = started.elapsed().as_secs_f64().ceil();
    assert_eq!(
        metric(&text, "stevedore_cache_index_rebuilds_total{reason=\"start\"}"),
        None,
        "n={n}: the restart after a clean stop rebuilt the index"
    );
    let restart_ops = backend_requests(&text);
    let restart = total(&restart_ops);
    IdleCost { idle, idle_ops, restart, restart_ops, restart_secs }
}

/// An idle mirror costs nothing whatever its store holds (issue #25): with N = 40 and
/// N = 400 small blobs pulled through, usage checks, GC, the sweep and access flushes once a
/// second, the idle server's calls across the storage seam (`stevedore_backend_requests_total`,
/// heartbeat apart) stay under one bound for both, a handful a second; a restart after a
/// clean stop loads the saved index instead of walking the store (no `walk`, no per-blob
/// request) and knows the same usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_costs_the_same_few_backend_requests_whatever_the_store_holds() {
    // Per second of idling: a usage check (one read of the store's generation), a GC pass
    // (the same), the upload sweep (temporaries, ingests, a write probe), with room for one
    // interval's jitter; never anything per blob.
    let idle_bound = 10.0 * (IDLE.as_secs() + 1) as f64;
    for n in [40usize, 400] {
        let c = idle_cost(n).await;
        // A start: the saved index, its marker and the generation, then idling until the
        // second usage check.
        let restart_bound = 12.0 + 10.0 * c.restart_secs;
        eprintln!("n={n}: idle {} calls {:?}; restart {} calls {:?}", c.idle, c.idle_ops, c.restart, c.restart_ops);
        let phases = [
            (format!("{IDLE:?} of idling"), c.idle, &c.idle_ops, idle_bound),
            ("a clean restart to its second check".to_string(), c.restart, &c.restart_ops, restart_bound),
        ];
        for (phase, calls, ops, bound) in phases {
            assert!(calls <= bound, "n={n}: {calls} backend calls in {phase} (bound {bound}): {ops:?}");
            assert_eq!(ops.get("walk"), None, "n={n}: the store was walked in {phase}: {ops:?}");
        }
    }
}

/// A server killed with SIGKILL leaves no clean-shutdown marker: the next start rebuilds the
/// index by one walk, knows the usage the killed one had, and the cap holds: pulling past it
/// evicts down under the high mark, the content pulled before the kill first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_the_index_is_rebuilt_and_the_cap_still_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let fake = Fake::start().await;
    let max = 60_000u64;
    let high = max as f64 * 0.95;
    let cfg = idle_config(&fake.url(), &format!("max_size = {max}\n"));
    let mut sd = Stevedore::builder().config(&cfg).root(&root).start();
    let first = pull_small_blobs(&sd, &fake, 9100, 40).await;
    assert!((first as f64) < high, "the first pulls stay under the cap ({first})");
    settled_usage(&sd, first, "before the kill").await;
    // A clean stop and start first: the marker is consumed by the start (a crash from then
    // on is not a clean stop).
    sd.terminate(LIMIT).expect("the server stops on SIGTERM");
    drop(sd);
    let mut sd = Stevedore::builder().config(&cfg).root(&root).start();
    settled_usage(&sd, first, "after a clean restart").await;
    let second = pull_small_blobs(&sd, &fake, 9200, 10).await;
    settled_usage(&sd, first + second, "after more pulls").await;
    sd.kill();
    drop(sd);

    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let text = settled_usage(&sd, first + second, "after the kill").await;
    assert_eq!(
        metric(&text, "stevedore_cache_index_rebuilds_total{reason=\"start\"}"),
        Some(1.0),
        "the index was not rebuilt by one walk at the start:\n{text}"
    );
    // Past the cap: eviction brings proxied usage under the high mark.
    let third = pull_small_blobs(&sd, &fake, 9300, 40).await;
    assert!((first + second + third) as f64 > high, "the test pulls past the cap");
    let checks = usage_checks(&metrics_text(&sd).await);
    let (ok, text) =
        wait_metrics(&sd, LIMIT, |t| usage_checks(t) >= checks + 2.0 && (0.0..=high).contains(&used(t, "proxied")))
            .await;
    assert!(ok, "proxied usage did not come under the high mark {high} after the rebuild:\n{text}");
    assert!(metric(&text, "stevedore_cache_evicted_items_total").unwrap_or(0.0) > 0.0, "{text}");
    // The least recently used blobs (pulled before the kill) went first; the last pulled stay.
    let http = client();
    let d = common::data::sha256(&bytes(9300 + 39, 512 + (39 % 7) * 100));
    let r = read(http.get(sd.url(&Dialect::Ns.path(HOST, "lib/small4", &format!("blobs/{d}"))))).await;
    assert_eq!(r.cache(), "hit", "the most recently pulled blob was evicted");
    let d = common::data::sha256(&bytes(9100, 512));
    assert!(!has_blob(&sd, &d), "the least recently used blob (pulled before the kill) was kept");
    assert_stored_blobs_intact(&sd);
}

/// Upload sessions count against the cap (issue #22): with proxied content just under the
/// high mark, a chunked upload left open (POST + PATCH, no final PUT) brings proxied + ingest
/// past it; the next usage check evicts proxied content down to the low mark less the
/// session's bytes, and `/metrics` shows them as `kind="ingest"` (so does `/status.json`).
/// Finishing the upload moves them to `pushed`; a session a previous process left is counted
/// from its recorded offset at the start, and when the sweep removes it the count drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_sessions_count_against_the_cap_and_evict_proxied_content() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let fake = Fake::start().await;
    let (max, blob, n) = (200_000u64, 15_000usize, 10usize);
    let (high, low) = (max as f64 * 0.95, max as f64 * 0.85);
    let cfg = |extra: &str| {
        idle_config(&fake.url(), &format!("max_size = {max}\n"))
            .replacen("[proxy]\n", "[proxy]\nlocal_namespaces = [\"local/*\"]\n", 1)
            .replacen("[uploads]\n", &format!("[uploads]\n{extra}"), 1)
            // The pushed blob has no manifest: the online GC leaves it alone within the grace.
            .replacen("gc_grace = \"1s\"", "gc_grace = \"1h\"", 1)
    };
    let mut sd = Stevedore::builder().config(&cfg("")).root(&root).start();
    let http = client();
    let mut pulled = Vec::new();
    for i in 0..n {
        let data = bytes(9500 + i as u64, blob);
        let d = fake.add_blob(&data);
        let url = sd.url(&Dialect::Ns.path(HOST, &format!("lib/big{i}"), &format!("blobs/{d}")));
        assert_content(&read(http.get(url)).await, &d, &data, &format!("blob {i}"));
        pulled.push(d);
    }
    let filled = wait_until(LIMIT, || ingests_left(&sd).is_empty()).await;
    assert!(filled, "fills did not end: {:?}", ingests_left(&sd));
    let proxied = (blob * n) as u64;
    assert!((proxied as f64) < high, "the pulls stay under the high mark ({proxied})");
    let text = settled_usage(&sd, proxied, "before the upload").await;
    assert!(used(&text, "ingest") <= 0.0, "no session yet:\n{text}");
    assert_eq!(metric(&text, "stevedore_cache_evicted_items_total").unwrap_or(0.0), 0.0, "{text}");

    // A session holding 60 000 bytes: proxied + ingest = 210 000 > the high mark.
    let reg = sd.registry();
    let up = bytes(9600, 60_000);
    let digest = common::data::sha256(&up);
    let loc = reg.start_upload("local/app").await;
    let (loc, stored) = reg
        .try_patch(&loc, 0, up.len() as u64, reqwest::Body::from(up.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, up.len() as u64);
    let target = low - up.len() as f64;
    let checks = usage_checks(&metrics_text(&sd).await);
    let (ok, text) = wait_metrics(&sd, LIMIT, |t| {
        usage_checks(t) >= checks + 2.0 && used(t, "ingest") == up.len() as f64 && used(t, "proxied") <= target
    })
    .await;
    assert!(
        ok,
        "with {} bytes in an open upload session, proxied usage did not come down to {target} (low mark less \
         the session) or the session's bytes are not shown as kind=\"ingest\":\n{text}",
        up.len()
    );
    assert!(metric(&text, "stevedore_cache_evicted_items_total").unwrap_or(0.0) >= 3.0, "{text}");
    let kept = pulled.iter().filter(|d| has_blob(&sd, d)).count();
    assert!(kept * blob <= target as usize, "{kept} of the pulled blobs are still stored (target {target})");
    assert!(kept > 0, "everything proxied was evicted (target {target})");
    let status: serde_json::Value = serde_json::from_slice(&read(http.get(sd.url("/status.json"))).await.body).unwrap();
    assert_eq!(status["store"]["used_bytes"]["ingest"], up.len() as u64, "{status:#}");

    // Finished: the bytes are pushed content, no longer in progress.
    reg.try_finish(&loc, &digest, None).await.unwrap_or_else(|e| panic!("{e}"));
    let checks = usage_checks(&metrics_text(&sd).await);
    let (ok, text) = wait_metrics(&sd, LIMIT, |t| {
        usage_checks(t) >= checks + 1.0 && used(t, "ingest") == 0.0 && used(t, "pushed") >= up.len() as f64
    })
    .await;
    assert!(ok, "after the final PUT the session's bytes are not pushed content:\n{text}");
    reg.assert_blob("local/app", &digest, &up).await;

    // A session left open across a clean restart is counted by the new process; swept, it
    // is not.
    let left = bytes(9700, 30_000);
    let loc = reg.start_upload("local/app").await;
    reg.try_patch(&loc, 0, left.len() as u64, reqwest::Body::from(left.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (ok, text) = wait_metrics(&sd, LIMIT, |t| used(t, "ingest") == left.len() as f64).await;
    assert!(ok, "the open session's bytes are not shown:\n{text}");
    sd.terminate(LIMIT).expect("the server stops on SIGTERM");
    drop(sd);
    let mut sd = Stevedore::builder().config(&cfg("")).root(&root).start();
    let (ok, text) = wait_metrics(&sd, LIMIT, |t| used(t, "ingest") == left.len() as f64).await;
    assert!(ok, "the session a previous process left is not counted after the restart:\n{text}");
    assert!(!ingests_left(&sd).is_empty(), "the open session is gone");
    sd.terminate(LIMIT).expect("the server stops on SIGTERM");
    drop(sd);
    let sd = Stevedore::builder().config(&cfg("session_ttl = \"1s\"\n")).root(&root).start();
    let (ok, text) = wait_metrics(&sd, LIMIT, |t| used(t, "ingest") == 0.0 && ingests_left(&sd).is_empty()).await;
    assert!(ok, "the swept session is still counted (or not swept: {:?}):\n{text}", ingests_left(&sd));
    sd.registry().assert_blob("local/app", &digest, &up).await;
}
