//! Crash consistency on the S3 backend (moto): SIGKILL mid-push and mid-fill, restart.
//! Nothing unverified is visible in the bucket, an upload session resumes at its checkpoint
//! (its multipart upload, parts and hash state recorded in its state object), and the sweep
//! aborts the multipart upload a fill killed in its commit left behind (a fill's parts go to
//! the bucket at its commit, once its readers have every byte). (`tests/crash.rs` checks the same
//! on the filesystem, reading the store's files.)

mod common;

use common::data;
use common::fake::{Fake, Plan};
use common::http::Registry;
use common::pause::Pauses;
use common::s3::Backend;
use common::Stevedore;
use futures::StreamExt;
use reqwest::{Body, StatusCode};
use std::time::Duration;

const MIB: usize = 1 << 20;

/// Bytes in the local spool of ingest `id` under `root`.
fn spooled(root: &std::path::Path, id: &str) -> u64 {
    std::fs::read_dir(root.join("ingest").join(id))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Bytes in the local spools of every ingest under `root` but `id`.
fn spooled_besides(root: &std::path::Path, id: &str) -> u64 {
    std::fs::read_dir(root.join("ingest"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str() != Some(id))
        .map(|e| spooled(root, e.file_name().to_str().unwrap_or_default()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_push_and_mid_fill_resumes_the_push_and_the_sweep_aborts_the_fill() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("scratch");
    let fake = Fake::start().await;
    // 12 MiB: the fill spans three 5 MiB parts.
    let blob = data::bytes(7201, 12 * MIB);
    let d = fake.add_blob(&blob);
    let (plan, gate) = Plan::new(blob.clone()).hold_after(11 * MIB);
    fake.plan(&d, plan);
    let cfg = common::stevedore::config("up.test", &[("up.test", &fake.url(), "")]).replacen(
        "[proxy]\n",
        "[proxy]\nlocal_namespaces = [\"local/*\"]\n",
        1,
    );
    let start = |cfg: &str| Stevedore::builder().backend(Backend::S3).config(cfg).root(&root).start();
    let pause_dir = tmp.path().join("pause");
    let pauses = Pauses::in_dir(&pause_dir);
    let mut sd = Stevedore::builder()
        .backend(Backend::S3)
        .config(&cfg)
        .root(&root)
        .env("STEVEDORE_PAUSE", "commit.parts_sent")
        .env("STEVEDORE_PAUSE_DIR", &pause_dir.display().to_string())
        .start();
    let bucket = sd.bucket.clone().expect("on S3");
    let reg = sd.registry();

    // An upload session with 12 MiB acknowledged (two parts sent, 2 MiB spooled) ...
    let first = data::bytes(7202, 12 * MIB);
    let loc = reg.start_upload("local/app").await;
    let (loc, acked) =
        reg.try_patch(&loc, 0, first.len() as u64, Body::from(first.clone())).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(acked, first.len() as u64);
    let id = Registry::path_of(&loc).split('?').next().unwrap().rsplit('/').next().unwrap().to_string();
    // ... and a chunk in flight that sends 4 MiB and then stalls.
    let stalled = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(data::bytes(7203, 4 * MIB)))])
        .chain(futures::stream::pending());
    let patch = {
        let (reg, loc) = (reg.clone(), loc.clone());
        tokio::spawn(async move { reg.try_patch(&loc, 12 << 20, 8 << 20, Body::wrap_stream(stalled)).await })
    };
    // A fill holding two full parts in its spool sends none while it streams (its clients'
    // bytes first) ...
    let url = sd.url(&format!("/v2/library/base/blobs/{d}"));
    let getter = tokio::spawn(common::http::read(common::http::client().get(url)));
    let fill_key = format!("blobs/sha256/{}/{}", &d[7..9], &d[7..]);
    let spooling =
        common::wait_until(Duration::from_secs(60), || spooled_besides(&root, &id) >= (10 * MIB) as u64).await;
    assert!(spooling, "the fill did not spool 10 MiB: {}", spooled_besides(&root, &id));
    let early: Vec<_> = bucket.multipart_uploads().into_iter().filter(|(k, _)| k == &fill_key).collect();
    assert!(early.is_empty(), "a multipart upload for a fill still streaming: {early:?}");
    // ... and is caught in its commit: every part sent, the multipart upload not completed.
    gate.send(true).unwrap();
    pauses.reached("commit.parts_sent", Duration::from_secs(60)).await;
    let caught = common::wait_until(Duration::from_secs(60), || spooled(&root, &id) >= (5 * MIB) as u64).await;
    assert!(caught, "the stalled chunk was not spooled");
    let fill_upload = bucket.multipart_uploads().into_iter().find(|(k, _)| k == &fill_key);
    let (_, fill_upload) =
        fill_upload.unwrap_or_else(|| panic!("no fill multipart upload: {:?}", bucket.multipart_uploads()));
    assert_eq!(bucket.parts(&fill_key, &fill_upload), vec![1, 2, 3], "the fill's parts, sent at its commit");
    // The client had every verified byte before the commit began.
    let r = tokio::time::timeout(Duration::from_secs(30), getter).await.expect("the client's GET ends").unwrap();
    assert!(
        r.error.is_none() && r.body == blob,
        "the client of a verified fill got {} bytes, {:?}",
        r.body.len(),
        r.error
    );
    sd.kill();
    assert!(patch.await.unwrap().is_err(), "the stalled PATCH succeeded");

    // Nothing unverified is visible; the session's state names its multipart upload.
    assert!(bucket.blobs().is_empty(), "blobs in the bucket after the kill: {:?}", bucket.blobs());
    let state: serde_json::Value =
        serde_json::from_slice(&bucket.get(&format!("ingest/{id}/state.json")).expect("session state")).unwrap();
    assert_eq!(state["offset"], 12 << 20, "{state}");
    assert_eq!(state["parts"].as_array().map(Vec::len), Some(2), "{state}");
    let upload_id = state["upload"].as_str().expect("multipart upload id in the state").to_string();
    let uploads = bucket.multipart_uploads();
    assert!(uploads.contains(&(format!("ingest/{id}/data"), upload_id.clone())), "{uploads:?}");

    // Restart: the blob fills again, the session resumes at its checkpoint.
    let sd = start(&cfg);
    let reg = sd.registry();
    reg.assert_blob("library/base", &d, &blob).await;
    assert_eq!(fake.count("GET", &format!("/v2/library/base/blobs/{d}")), 2, "upstream GETs");
    let (status, offset) = reg.try_session_status(&Registry::path_of(&loc)).await.expect("session status");
    assert_eq!((status, offset), (StatusCode::NO_CONTENT, Some(12 << 20)), "upload after the restart");
    let rest = data::bytes(7204, 3 * MIB);
    let whole = [first.clone(), rest.clone()].concat();
    let body = Some((rest.len() as u64, Body::from(rest)));
    reg.try_finish(&Registry::path_of(&loc), &data::sha256(&whole), body).await.unwrap_or_else(|e| panic!("{e}"));
    reg.assert_blob("local/app", &data::sha256(&whole), &whole).await;
    assert_eq!(bucket.assert_blobs_intact(), 2);
    assert!(
        !bucket.multipart_uploads().iter().any(|(_, u)| u == &upload_id),
        "the finished session's multipart upload is still open"
    );
    assert!(bucket.objects(&format!("ingest/{id}/")).is_empty(), "the finished session left objects");
    drop(sd);

    // The killed fill's multipart upload is abandoned: the sweep aborts it (and its state).
    let abandoned: Vec<_> = bucket.multipart_uploads().into_iter().filter(|(k, _)| k == &fill_key).collect();
    assert_eq!(abandoned.len(), 1, "{:?}", bucket.multipart_uploads());
    let sweeping = format!("{cfg}\n[uploads]\nsession_ttl = \"1s\"\nsweep_interval = \"1s\"\n");
    let _sd = start(&sweeping);
    let swept = common::wait_until(Duration::from_secs(30), || {
        bucket.multipart_uploads().is_empty() && bucket.objects("ingest/").is_empty()
    })
    .await;
    assert!(swept, "left after the sweep: {:?} {:?}", bucket.multipart_uploads(), bucket.objects("ingest/"));
    assert_eq!(bucket.assert_blobs_intact(), 2, "the sweep touched committed content");
}
