//! Cache lifecycle: a store that cannot be written (a full disk) keeps serving what it holds.
//! Real parts on loopback: the `stevedore` binary on a small tmpfs mounted by the test (root
//! needed, as for tests/clients.rs), a scripted fake upstream.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::data::bytes;
use common::fake::Fake;
use common::http::{assert_content, assert_json_error, client, get_manifest, hdr, read};
use common::stevedore::{config, Dialect, Stevedore};
use common::store::{assert_blobs_intact, blob_path, ingest_leftovers};
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
