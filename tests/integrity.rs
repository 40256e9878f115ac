//! "201 means stored" (issue #22): what a client was told is stored stays readable while the
//! store removes content around it. Each test pauses one operation of the real binary at a
//! named pause point (cargo feature `test-hooks`, `src/hooks.rs`), runs the other operation
//! against it, resumes, and checks the bytes a client gets back:
//!
//! 1. eviction decided and about to delete a proxied image while a client pushes one of its
//!    layers to a local repository; online GC about to remove blobs a manifest PUT has just
//!    checked;
//! 2. `stevedore gc` beside a running server refuses (exit 2, naming the replica); after an
//!    allowed offline gc or the server's own online GC, a docker-style re-push (HEAD, upload
//!    what is missing, PUT the manifest) ends with everything stored;
//! 3. `stevedore fsck --repair` beside a running server refuses; a read-only `fsck` paused
//!    after its snapshot while a push commits does not call the new content absent.
//!
//! A test never waits on timing to order two operations: it waits for a pause point. Where
//! the order depends on the protocol (an operation may block on a guard the other holds: the
//! point `guard.wait` is passed just before a guard acquisition that has to wait), the test
//! waits for whichever point comes first.
//!
//! `tests/integrity_s3.rs` runs the same tests on S3 (moto).

mod common;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use common::data::{bytes, sha256};
use common::fake::Fake;
use common::http::{assert_content, client, get_manifest, read, Registry};
use common::oci::{self, Image};
use common::pause::Pauses;
use common::s3::cli_config;
use common::stevedore::{cli, config, Dialect, Stevedore};
use common::store::{has_blob, ingests_left, stored_keys};
use common::wait_until;

const HOST: &str = "up.test";
const LIMIT: Duration = Duration::from_secs(60);
/// How long a test waits for an operation to reach a pause point.
const REACH: Duration = Duration::from_secs(30);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn local_config(cache: &str) -> String {
    format!("[proxy]\ndefault_upstream = \"\"\n\n[cache]\n{cache}\n")
}

/// A server on `root` whose pause points `points` are armed, pausing in `pauses`.
fn paused_server(cfg: &str, root: &Path, pauses: &Pauses, points: &[&str]) -> Stevedore {
    paused_server_on_arm(cfg, root, pauses, points, &[])
}

/// [`paused_server`], and `on_arm` pause at the next pass after each [`Pauses::arm`].
fn paused_server_on_arm(cfg: &str, root: &Path, pauses: &Pauses, points: &[&str], on_arm: &[&str]) -> Stevedore {
    Stevedore::builder()
        .config(cfg)
        .root(root)
        .env("STEVEDORE_PAUSE", &points.join(","))
        .env("STEVEDORE_PAUSE_ON_ARM", &on_arm.join(","))
        .env("STEVEDORE_PAUSE_DIR", s(pauses.dir()))
        .start()
}

/// Pulls through `fake` as upstream `HOST`, `local/*` pushed to, a cache of 500 KiB checked
/// and flushed every second.
fn small_cache_config(fake: &Fake) -> String {
    config(HOST, &[(HOST, &fake.url(), "tag_ttl = \"1h\"")]).replacen(
        "[proxy]\n",
        "[proxy]\nlocal_namespaces = [\"local/*\"]\n",
        1,
    ) + "\n[cache]\nmax_size = \"500KiB\"\ncheck_interval = \"1s\"\naccess_flush_interval = \"1s\"\n"
}

/// Waits until one of `names` is reached; returns it.
async fn first_reached(p: &Pauses, names: &[&'static str], limit: Duration) -> &'static str {
    let mut found = None;
    let ok = wait_until(limit, || {
        found = names.iter().find(|n| p.is_reached(n)).copied();
        found.is_some()
    })
    .await;
    assert!(ok, "none of the pause points {names:?} was reached within {limit:?}");
    found.unwrap()
}

/// A one-shot command (`gc`, `fsck`) run in the background, with its own environment.
fn spawn_cli(args: Vec<String>, env: Vec<(String, String)>) -> tokio::task::JoinHandle<common::proc::Out> {
    tokio::task::spawn_blocking(move || {
        let mut cmd = common::proc::with_pdeathsig(env!("CARGO_BIN_EXE_stevedore"));
        cmd.args(&args);
        cmd.env("RUST_LOG", "warn");
        cmd.envs(env);
        for v in ["STEVEDORE_LOG_FORMAT", "STEVEDORE_CONFIG"] {
            cmd.env_remove(v);
        }
        common::proc::run(&format!("stevedore {}", args[0]), cmd, LIMIT)
    })
}

/// The docker push of `img`: HEAD every blob, upload only those the registry does not have,
/// then PUT the manifest; then every part must pull back, byte for byte.
async fn docker_push_and_pull(reg: &Registry, repo: &str, img: &Image, tag: &str, what: &str) {
    for b in img.blobs() {
        let head = reg.head(&format!("/v2/{repo}/blobs/{}", b.digest)).await;
        if head.status().as_u16() != 200 {
            reg.upload_blob(repo, &b.data).await;
        }
    }
    let put = reg.put_manifest(repo, tag, &img.manifest.media_type, &img.manifest.data).await;
    assert_eq!(put.status().as_u16(), 201, "{what}: PUT manifest {repo}:{tag}");
    pull_local(reg, repo, tag, img, what).await;
}

/// Manifest by `reference` and every blob of `img` from local `repo`, checked.
async fn pull_local(reg: &Registry, repo: &str, reference: &str, img: &Image, what: &str) {
    let r = get_manifest(&client(), reg.url(&format!("/v2/{repo}/manifests/{reference}"))).await;
    assert_content(&r, &img.manifest.digest, &img.manifest.data, &format!("{what}: GET manifest {repo}:{reference}"));
    for b in img.blobs() {
        let r = read(client().get(reg.url(&format!("/v2/{repo}/blobs/{}", b.digest)))).await;
        assert_content(&r, &b.digest, &b.data, &format!("{what}: GET blob {repo}@{}", b.digest));
    }
}

/// The layer pushed to `local/app` reads back byte for byte; an image of it and a config of
/// its own (`seed`) is pushed as `local/app:v1` (201) and pulls back whole.
async fn uses_pushed_layer(reg: &Registry, layer_d: &str, layer: &[u8], seed: u64, what: &str) {
    let r = read(client().get(reg.url(&format!("/v2/local/app/blobs/{layer_d}")))).await;
    assert_content(&r, layer_d, layer, &format!("{what}: GET from local/app"));
    let config_blob = oci::Blob::new(oci::MT_CONFIG, bytes(seed, 500));
    reg.upload_blob("local/app", &config_blob.data).await;
    let img = image_of(config_blob, vec![oci::Blob::new(oci::MT_LAYER_GZIP, layer.to_vec())]);
    let put = reg.put_manifest("local/app", "v1", oci::MT_MANIFEST, &img.manifest.data).await;
    assert_eq!(put.status().as_u16(), 201, "{what}: a manifest using it");
    pull_local(reg, "local/app", "v1", &img, &format!("{what}: the image using it")).await;
}

/// An image of `config` and `layers` (its manifest built from them).
fn image_of(config: oci::Blob, layers: Vec<oci::Blob>) -> Image {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(oci::Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = oci::Blob::new(oci::MT_MANIFEST, serde_json::to_vec(&manifest).unwrap());
    Image { config, layers, manifest, diff_ids: Vec::new(), files: Vec::new() }
}

/// The replica heartbeats in the store: their ids.
fn replica_ids(sd: &Stevedore) -> Vec<String> {
    stored_keys(sd, "meta/replicas/").iter().filter_map(|k| k.rsplit('/').next().map(str::to_string)).collect()
}

/// Pulls `img` (tag `v1`) from the upstream's `repo` through `sd`: the manifest, then every
/// blob, each checked. The future borrows neither.
fn pull_through(sd: &Stevedore, repo: &'static str, img: &common::fake::FakeImage) -> impl Future<Output = ()> {
    let url = |rest: &str| sd.url(&Dialect::Ns.path(HOST, repo, rest));
    let manifest_url = url("manifests/v1");
    let blobs: Vec<_> =
        img.blobs.iter().map(|(d, body)| (url(&format!("blobs/{d}")), d.clone(), body.clone())).collect();
    let (digest, manifest) = (img.digest.clone(), img.manifest.clone());
    async move {
        let http = client();
        let r = get_manifest(&http, manifest_url).await;
        assert_content(&r, &digest, &manifest, repo);
        for (u, d, body) in blobs {
            assert_content(&read(http.get(u)).await, &d, &body, repo);
        }
    }
}

/// A server with a cache of 500 KiB that pulled image A then image B through it (past the
/// high mark) and whose eviction, having decided to evict A (the least recently used), is
/// paused at `evict.before_delete`; `points` armed. The server, its pauses, A, the upstream.
async fn evicting(dir: &Path, points: &[&str]) -> (Stevedore, Pauses, common::fake::FakeImage, Fake) {
    let root = dir.join("store");
    let pauses = Pauses::in_dir(&dir.join("pause"));
    let fake = Fake::start().await;
    let a = fake.add_image("team/a", "v1", 71, &[200_000, 200_000]);
    let b = fake.add_image("team/b", "v1", 72, &[200_000]);
    let cfg = small_cache_config(&fake);
    let sd = paused_server(&cfg, &root, &pauses, points);
    // A, then B (manifest first): past the high mark, A (least recently used) is evicted.
    for (repo, img) in [("team/a", &a), ("team/b", &b)] {
        pull_through(&sd, repo, img).await;
    }
    pauses.reached("evict.before_delete", REACH).await;
    (sd, pauses, a, fake)
}

/// An access flush has written the batched uses of image A (pulled twice: its records are
/// newer than its commits) and is paused before the index hears of them when pulling image B
/// takes the cache past its high mark. The eviction still knows A's uses: it evicts A, the
/// least recently used, and keeps B, the image just pulled. (Before, the flush took the uses
/// out of the batch first: the eviction re-read A's newer records, took A for used since
/// its scan, kept it, and evicted B.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_beside_an_access_flush_evicts_the_least_recently_used_image() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let pauses = Pauses::in_dir(&tmp.path().join("pause"));
    let mut fake = Fake::start().await;
    let a = fake.add_image("team/a", "v1", 81, &[200_000, 200_000]);
    let b = fake.add_image("team/b", "v1", 82, &[200_000]);
    let cfg = config(HOST, &[(HOST, &fake.url(), "tag_ttl = \"1h\"")])
        + "\n[cache]\nmax_size = \"500KiB\"\ncheck_interval = \"1s\"\naccess_flush_interval = \"3s\"\n";
    let sd = paused_server(&cfg, &root, &pauses, &["access.flush_written"]);
    let pull = |repo: &'static str, img: &common::fake::FakeImage| pull_through(&sd, repo, img);
    // A twice (the second pull is served from the cache: uses after A's commits), under the
    // high mark; then the flush writes those uses and pauses.
    pull("team/a", &a).await;
    // Uses are recorded in milliseconds: the second pull's are after the first's commits.
    tokio::time::sleep(Duration::from_millis(5)).await;
    pull("team/a", &a).await;
    pauses.reached("access.flush_written", REACH).await;
    pull("team/b", &b).await;
    let evicted = wait_until(LIMIT, || a.blobs.iter().all(|(d, _)| !has_blob(&sd, d))).await;
    assert!(evicted, "A (least recently used) was not evicted while the flush was paused:\n{}", sd.problems());
    for (d, _) in &b.blobs {
        assert!(has_blob(&sd, d), "B's blob {d} (just pulled) was evicted:\n{}", sd.problems());
    }
    pauses.go("access.flush_written").await;
    fake.stop().await;
    pull("team/b", &b).await;
}

/// Scenario 1, the mount window: eviction is about to delete a pulled-through image when a
/// client mounts one of its layers into a local repository (`from` the upstream's name). A
/// 201 means the layer is stored (it pulls back); otherwise the registry opened an upload
/// session (202) and the client's upload stores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_mounted_while_eviction_deletes_it_is_stored_or_uploaded() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd, pauses, a, _fake) =
        evicting(tmp.path(), &["evict.before_delete", "mount.after_check", "guard.wait"]).await;
    let reg = sd.registry();
    let (layer_d, layer) = a.blobs[1].clone();
    let mount = tokio::spawn({
        let (reg, d) = (reg.clone(), layer_d.clone());
        async move {
            let r = reg.post(&format!("/v2/local/app/blobs/uploads/?mount={d}&from=team/a"), Vec::new()).await;
            (r.status().as_u16(), common::http::hdr(r.headers(), "location"))
        }
    });
    match first_reached(&pauses, &["mount.after_check", "guard.wait"], REACH).await {
        "mount.after_check" => {
            pauses.go("mount.after_check").await;
            pauses.go("evict.before_delete").await;
        }
        _ => {
            pauses.go("guard.wait").await;
            pauses.go("evict.before_delete").await;
        }
    }
    let (status, location) = mount.await.unwrap();
    match status {
        201 => {}
        202 => {
            let loc = location.expect("a 202 without Location");
            let put = reg.finish_upload(&loc, &layer_d, layer.clone()).await;
            assert_eq!(put.status().as_u16(), 201, "the upload after a refused mount");
        }
        other => panic!("mount during eviction answered {other}"),
    }
    let r = read(client().get(reg.url(&format!("/v2/local/app/blobs/{layer_d}")))).await;
    assert_content(&r, &layer_d, &layer, &format!("a layer mounted ({status}) while eviction deleted it"));
}

/// Scenario 1: eviction has decided to evict a pulled-through image (it is about to delete
/// it) when a client pushes one of its layers to a local repository. The push answers 201;
/// after eviction is done the layer is stored: GET returns its bytes, a manifest using it is
/// accepted and pulls back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_pushed_while_eviction_deletes_it_stays_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd, pauses, a, _fake) =
        evicting(tmp.path(), &["evict.before_delete", "commit.after_publish", "guard.wait"]).await;
    let reg = sd.registry();

    // The CI job pushes an image built FROM A: A's first layer, and a config of its own.
    let (layer_d, layer) = a.blobs[1].clone();
    assert!(has_blob(&sd, &layer_d), "the layer is not in the store before the push");
    let push = tokio::spawn({
        let (reg, layer) = (reg.clone(), layer.clone());
        async move {
            let loc = reg.start_upload("local/app").await;
            reg.finish_upload(&loc, &sha256(&layer), layer).await.status().as_u16()
        }
    });
    match first_reached(&pauses, &["commit.after_publish", "guard.wait"], REACH).await {
        // The push's commit went through while eviction holds nothing that stops it.
        "commit.after_publish" => {
            pauses.go("commit.after_publish").await;
            pauses.go("evict.before_delete").await;
        }
        // The push waits for eviction's guard: eviction finishes, then the push commits.
        _ => {
            pauses.go("guard.wait").await;
            pauses.go("evict.before_delete").await;
            pauses.reached("commit.after_publish", REACH).await;
            pauses.go("commit.after_publish").await;
        }
    }
    let status = push.await.unwrap();
    assert_eq!(status, 201, "the push of {layer_d} during eviction");
    uses_pushed_layer(&reg, &layer_d, &layer, 73, "a layer pushed (201) while eviction deleted it").await;
    let settled = wait_until(LIMIT, || ingests_left(&sd).is_empty()).await;
    assert!(settled, "ingests left: {:?}", ingests_left(&sd));
}

/// The soak's seed 24132913650041, made deterministic: a client pushes a layer the cache
/// holds (pulled through) to a local repository while an eviction that scanned before the
/// new link is about to re-check it, and an access flush in between does not write the
/// push's use (this process wrote the layer's record moments before, at the commit). The
/// re-check still sees the use: the layer stays stored, and a manifest using it is accepted.
/// (Before, the flush took the unwritten use out of memory, the re-check read the commit's
/// record, older than its scan, and deleted the layer under the new link: the manifest PUT
/// answered MANIFEST_BLOB_UNKNOWN.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_layer_whose_use_a_flush_skipped_survives_an_eviction_that_scanned_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let pauses = Pauses::in_dir(&tmp.path().join("pause"));
    let fake = Fake::start().await;
    let a = fake.add_image("team/a", "v1", 91, &[100_000, 100_000]);
    let b = fake.add_image("team/b", "v1", 92, &[300_000]);
    let cfg = small_cache_config(&fake);
    let sd = paused_server_on_arm(
        &cfg,
        &root,
        &pauses,
        &["access.flush_written", "commit.after_publish", "evict.before_recheck"],
        &["access.flushed", "evict.done"],
    );
    let reg = sd.registry();
    let pull = |repo: &'static str, img: &common::fake::FakeImage| pull_through(&sd, repo, img);
    // A, under the high mark; the flush of its uses pauses (no flush forgets the records
    // this process wrote until it goes on).
    pull("team/a", &a).await;
    pauses.reached("access.flush_written", REACH).await;
    // The push of A's layer commits (its access record written) and pauses before the link.
    let (layer_d, layer) = a.blobs[1].clone();
    let push = tokio::spawn({
        let (reg, layer) = (reg.clone(), layer.clone());
        async move {
            let loc = reg.start_upload("local/app").await;
            reg.finish_upload(&loc, &sha256(&layer), layer).await.status().as_u16()
        }
    });
    pauses.reached("commit.after_publish", REACH).await;
    // B takes the cache past its high mark: an eviction scans (without the link to come) and
    // pauses before its re-check of A, the least recently used.
    pull("team/b", &b).await;
    pauses.reached("evict.before_recheck", REACH).await;
    // The push links the layer, uses it and answers.
    pauses.go("commit.after_publish").await;
    assert_eq!(push.await.unwrap(), 201, "the push of {layer_d}");
    // Two flushes: the paused one, then one whose batch holds the push's use (not written:
    // the commit's record is seconds old).
    pauses.arm("access.flushed");
    pauses.go("access.flush_written").await;
    pauses.reached("access.flushed", REACH).await;
    pauses.go("access.flushed").await;
    pauses.arm("access.flushed");
    pauses.reached("access.flushed", REACH).await;
    pauses.go("access.flushed").await;
    // The eviction re-checks and finishes its pass.
    pauses.arm("evict.done");
    pauses.go("evict.before_recheck").await;
    pauses.reached("evict.done", REACH).await;
    pauses.go("evict.done").await;
    assert!(has_blob(&sd, &layer_d), "the layer pushed to local/app (201) was deleted:\n{}", sd.problems());
    uses_pushed_layer(&reg, &layer_d, &layer, 93, "the layer pushed (201) during the eviction").await;
}

/// Scenario 1, the manifest PUT's window: a manifest PUT has checked its blobs when online
/// GC, having found them unreferenced past the grace period, is about to remove them. The
/// PUT answers 201, and then the image pulls back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_a_manifest_put_checked_are_not_collected_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let pauses = Pauses::in_dir(&tmp.path().join("pause"));
    let cfg = local_config("gc_interval = \"1s\"\ngc_grace = \"2s\"\naccess_flush_interval = \"1s\"");
    let sd = paused_server(&cfg, &root, &pauses, &["manifest_put.after_check", "gc.before_remove", "guard.wait"]);
    let reg = sd.registry();
    let img = oci::make_image(81, 2, 50_000, "amd64", "linux");
    for b in img.blobs() {
        reg.upload_blob("team/app", &b.data).await;
    }
    let put = tokio::spawn({
        let (reg, img) = (reg.clone(), img.clone());
        async move { reg.put_manifest("team/app", "v1", oci::MT_MANIFEST, &img.manifest.data).await.status().as_u16() }
    });
    pauses.reached("manifest_put.after_check", REACH).await;
    // GC finds the blobs unreferenced (no manifest yet) and older than the grace period.
    pauses.reached("gc.before_remove", REACH).await;
    pauses.go("gc.before_remove").await;
    let layer = img.layers[0].digest.clone();
    let mut waited = false;
    let ok = wait_until(REACH, || {
        waited = pauses.is_reached("guard.wait");
        waited || !has_blob(&sd, &layer)
    })
    .await;
    assert!(ok, "GC neither removed {layer} nor waited for the manifest PUT");
    if waited {
        pauses.go("guard.wait").await;
    }
    pauses.go("manifest_put.after_check").await;
    let status = put.await.unwrap();
    assert_eq!(status, 201, "the manifest PUT");
    pull_local(&reg, "team/app", "v1", &img, "a manifest accepted while GC ran").await;
}

/// Scenario 2: `stevedore gc` beside a running server exits 2 and names the replica (id,
/// host, pid), removing nothing; after an offline gc with no server running, and after the
/// server's own online GC, a docker-style re-push ends with the content really stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_gc_refuses_beside_a_live_server_and_a_re_push_after_gc_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let sd = Stevedore::builder().config(&local_config("gc_interval = \"0s\"")).root(&root).start();
    let reg = sd.registry();
    let img = oci::make_image(91, 2, 40_000, "amd64", "linux");
    reg.push_image("team/app", &img, Some("v1")).await;
    let r = reg.delete(&format!("/v2/team/app/manifests/{}", img.manifest.digest)).await;
    assert_eq!(r.status().as_u16(), 202, "deleting the manifest");
    let gc_cfg = tmp.path().join("gc.toml");
    std::fs::write(&gc_cfg, cli_config(&root, &local_config("gc_grace = \"0s\""))).unwrap();

    let out = cli(&["gc", "--config", s(&gc_cfg), "--root", s(&root)], LIMIT);
    assert_eq!(out.status.code(), Some(2), "stevedore gc beside a live server: {}", out.describe());
    let ids = replica_ids(&sd);
    assert_eq!(ids.len(), 1, "one heartbeat in the store: {ids:?}");
    let msg = format!("{}{}", out.stdout, out.stderr);
    for part in [ids[0].as_str(), &sd.pid().to_string(), &hostname()] {
        assert!(msg.contains(part), "the refusal does not name {part}: {}", out.describe());
    }
    for b in img.blobs() {
        assert!(has_blob(&sd, &b.digest), "a refused gc removed {}", b.digest);
    }
    // The client pushes the image again as docker does: everything is there.
    docker_push_and_pull(&reg, "team/app", &img, "v1", "re-push beside a refused gc").await;

    // No server: gc runs as always; then a server on the store takes the re-push.
    let r = reg.delete(&format!("/v2/team/app/manifests/{}", img.manifest.digest)).await;
    assert_eq!(r.status().as_u16(), 202);
    let mut sd = sd;
    sd.terminate(Duration::from_secs(20));
    let out = cli(&["gc", "--config", s(&gc_cfg), "--root", s(&root)], LIMIT);
    assert!(out.status.success(), "gc with no server: {}", out.describe());
    for b in img.blobs() {
        assert!(!has_blob(&sd, &b.digest), "gc with no server left {}: {}", b.digest, out.stdout);
    }
    let cfg = local_config("gc_interval = \"1s\"\ngc_grace = \"1s\"\naccess_flush_interval = \"1s\"");
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let reg = sd.registry();
    docker_push_and_pull(&reg, "team/app", &img, "v1", "re-push after an offline gc").await;

    // The server's online GC: blobs go; the re-push stores them again.
    let r = reg.delete(&format!("/v2/team/app/manifests/{}", img.manifest.digest)).await;
    assert_eq!(r.status().as_u16(), 202);
    let gone = wait_until(LIMIT, || img.blobs().iter().all(|b| !has_blob(&sd, &b.digest))).await;
    assert!(gone, "online GC did not collect the deleted image's blobs");
    docker_push_and_pull(&reg, "team/app", &img, "v1", "re-push after online GC").await;
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

/// Scenario 3: `stevedore fsck --repair` beside a running server exits 2 and changes
/// nothing; a read-only `fsck`, paused right after its snapshot of the content while a push
/// commits a new image, does not report the new image's content absent, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_beside_a_live_server_never_calls_new_content_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let pauses = Pauses::in_dir(&tmp.path().join("pause"));
    let sd = Stevedore::builder().config(&local_config("gc_interval = \"0s\"")).root(&root).start();
    let reg = sd.registry();
    let old = oci::make_image(101, 2, 30_000, "amd64", "linux");
    reg.push_image("team/old", &old, Some("v1")).await;
    let fsck_cfg = tmp.path().join("fsck.toml");
    std::fs::write(&fsck_cfg, cli_config(&root, &local_config(""))).unwrap();

    let args = ["fsck", "--config", s(&fsck_cfg), "--root", s(&root)].iter().map(|a| a.to_string()).collect();
    let env = vec![
        ("STEVEDORE_PAUSE".to_string(), "fsck.after_snapshot".to_string()),
        ("STEVEDORE_PAUSE_DIR".to_string(), s(pauses.dir()).to_string()),
    ];
    let fsck = spawn_cli(args, env);
    pauses.reached("fsck.after_snapshot", REACH).await;
    let new = oci::make_image(102, 2, 30_000, "amd64", "linux");
    reg.push_image("team/new", &new, Some("v1")).await;
    pauses.go("fsck.after_snapshot").await;
    let out = fsck.await.unwrap();
    for d in new.digests() {
        assert!(!out.stdout.contains(&d), "read-only fsck reported content pushed during its run: {}", out.describe());
    }
    assert!(out.status.success(), "read-only fsck beside a server on a sound store: {}", out.describe());
    pull_local(&reg, "team/new", "v1", &new, "pushed during fsck").await;
    pull_local(&reg, "team/old", "v1", &old, "pushed before fsck").await;

    let out = cli(&["fsck", "--config", s(&fsck_cfg), "--root", s(&root), "--repair"], LIMIT);
    assert_eq!(out.status.code(), Some(2), "stevedore fsck --repair beside a live server: {}", out.describe());
    let msg = format!("{}{}", out.stdout, out.stderr);
    assert!(msg.contains(&sd.pid().to_string()), "the refusal does not name the server's pid: {}", out.describe());
    for d in new.digests().iter().chain(old.digests().iter()) {
        assert!(has_blob(&sd, d), "a refused fsck --repair removed {d}");
    }
}
