//! What the S3 backend keeps in the bucket, beyond the suites it shares with the filesystem
//! (moto, `tests/common/s3.rs`):
//! - a pushed blob larger than `storage.s3.max_copy_size` is made visible by a server-side
//!   multipart copy (`UploadPartCopy`), and nothing of the push is left;
//! - an upload session lives in the bucket: its PATCHes and its PUT can go to different
//!   processes on one bucket (replicas, each with its own scratch root), to a process whose
//!   scratch was wiped, and to one whose local spool is behind the session;
//! - a writer sends the parts after a slow one, and records them only in order.

mod common;

use common::data;
use common::http::Registry;
use common::pause::Pauses;
use common::s3::{Bucket, PART_SIZE};
use common::store::stored_blob;
use common::Stevedore;
use futures::StreamExt;
use reqwest::{Body, StatusCode};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// The session id of an upload Location.
fn session_id(loc: &str) -> String {
    Registry::path_of(loc).split('?').next().unwrap().rsplit('/').next().unwrap().to_string()
}

/// The blob's key below the store's prefix.
fn blob_key(digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').unwrap();
    format!("blobs/{alg}/{}/{hex}", &hex[..2])
}

/// A server on `bucket` with `root` as its scratch space. Two of them share the bucket
/// without Redis (requests here are sequential), which a replica refuses unless allowed.
fn replica(bucket: &Bucket, root: &Path) -> Stevedore {
    let cfg = "[proxy]\ndefault_upstream = \"\"\n\n[cluster]\nallow_without_redis = true\n";
    Stevedore::builder().bucket(bucket).root(root).config(cfg).start()
}

/// The session's state object in the bucket.
fn state(bucket: &Bucket, id: &str) -> serde_json::Value {
    serde_json::from_slice(&bucket.get(&format!("ingest/{id}/state.json")).expect("session state")).unwrap()
}

/// After a checkpoint at `offset`: every full part was sent, the bytes of the part being
/// filled are exactly the state's pieces, contiguous from the part's start to the offset, and
/// the bucket holds those piece objects and no others.
fn assert_pieces(bucket: &Bucket, id: &str, offset: u64) {
    let st = state(bucket, id);
    assert_eq!(st["offset"], offset, "{st}");
    let parts = st["parts"].as_array().map(Vec::len).unwrap_or(0) as u64;
    assert_eq!(parts, offset / PART_SIZE, "parts sent at offset {offset}: {st}");
    let mut at = parts * PART_SIZE;
    let mut want = Vec::new();
    for p in st["pieces"].as_array().expect("pieces in the state") {
        let (start, len) = (p["start"].as_u64().unwrap(), p["len"].as_u64().unwrap());
        assert_eq!(start, at, "pieces not contiguous: {st}");
        at += len;
        want.push((format!("ingest/{id}/piece/{start}"), len));
    }
    assert_eq!(at, offset, "pieces do not reach the offset: {st}");
    let have = bucket.objects(&format!("ingest/{id}/piece/"));
    want.sort();
    assert_eq!(have, want, "piece objects at offset {offset}");
}

/// Warnings and errors a server logged, but the open-registry notice.
fn warnings(sd: &Stevedore) -> Vec<String> {
    sd.problems()
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .filter(|l| !l.contains("no client authentication is configured"))
        .filter(|l| !l.contains("cluster.allow_without_redis"))
        .map(str::to_string)
        .collect()
}

/// Nothing of a finished push is left in the bucket: no ingest object, no multipart upload.
fn assert_push_gone(bucket: &Bucket) {
    assert!(bucket.objects("ingest/").is_empty(), "left under ingest/: {:?}", bucket.objects("ingest/"));
    assert!(bucket.multipart_uploads().is_empty(), "open multipart uploads: {:?}", bucket.multipart_uploads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_past_max_copy_size_is_copied_by_parts() {
    let sd = Stevedore::builder().backend(common::s3::Backend::S3).s3_setting("max_copy_size = \"5MiB\"").start();
    let bucket = sd.bucket.clone().expect("on S3");
    let reg = sd.registry();
    // ~20 MiB: four 5 MiB copy parts and a short one.
    let blob = data::bytes(9101, 20 * MIB + 12_345);
    let digest = reg.upload_blob("app", &blob).await;

    let key = blob_key(&digest);
    let stored = bucket.get(&key).expect("the blob in the bucket");
    assert_eq!(stored.len(), blob.len());
    assert_eq!(data::sha256(&stored), digest, "the copied object does not hash to its digest");
    // Completed by parts: a multipart object's ETag counts its parts (a CopyObject's does not).
    let etag = bucket.etag(&key).expect("listed");
    assert!(etag.trim_matches('"').ends_with("-5"), "the blob was not made by a 5-part copy: ETag {etag}");
    assert_push_gone(&bucket);
    reg.assert_blob("app", &digest, &blob).await;

    // At the limit it is one CopyObject.
    let small = data::bytes(9102, 5 * MIB);
    let digest = reg.upload_blob("app", &small).await;
    let etag = bucket.etag(&blob_key(&digest)).expect("listed");
    assert!(!etag.contains('-'), "a blob of max_copy_size was copied by parts: ETag {etag}");
    assert_push_gone(&bucket);
    reg.assert_blob("app", &digest, &small).await;
    assert_eq!(bucket.assert_blobs_intact(), 2);
}

/// Chunk sizes of the routed pushes: none a multiple of the part size, several crossing a
/// part boundary, one that ends exactly on one.
fn chunks() -> Vec<usize> {
    vec![3 * MIB + 17, 4 * MIB + 1000, MIB - 5, 6 * MIB + 333, 2 * MIB, 5 * MIB + 7, 11 * MIB - 1]
}

/// Pushes `blob` in [`chunks`]: chunk `i` (the last one is the final PUT's body) goes to
/// `servers[route[i]]`, with `before(i)` run first; checks the pieces after every PATCH.
/// Returns the digest.
async fn routed_push(
    bucket: &Bucket,
    servers: &mut [Stevedore; 2],
    blob: &[u8],
    route: &[usize],
    mut before: impl FnMut(usize, &mut [Stevedore; 2]),
) -> String {
    let sizes = chunks();
    assert_eq!(sizes.iter().sum::<usize>(), blob.len());
    assert_eq!(route.len(), sizes.len());
    let mut loc = servers[0].registry().start_upload("team/app").await;
    let id = session_id(&loc);
    let mut at = 0usize;
    let last = sizes.len() - 1;
    for (i, &n) in sizes[..last].iter().enumerate() {
        before(i, servers);
        let reg = servers[route[i]].registry();
        let chunk = blob[at..at + n].to_vec();
        let (next, acked) = reg
            .try_patch(&loc, at as u64, n as u64, Body::from(chunk))
            .await
            .unwrap_or_else(|e| panic!("PATCH {i} to server {}: {e}", route[i]));
        at += n;
        assert_eq!(acked, at as u64, "PATCH {i}");
        assert_pieces(bucket, &id, at as u64);
        loc = next;
    }
    before(last, servers);
    let reg = servers[route[last]].registry();
    let digest = data::sha256(blob);
    let body = Some(((blob.len() - at) as u64, Body::from(blob[at..].to_vec())));
    reg.try_finish(&loc, &digest, body).await.unwrap_or_else(|e| panic!("PUT to server {}: {e}", route[last]));
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_session_moves_between_processes_on_one_bucket() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = Bucket::for_root(&tmp.path().join("shared"));
    let roots = [tmp.path().join("a"), tmp.path().join("b")];
    let mut servers = [replica(&bucket, &roots[0]), replica(&bucket, &roots[1])];
    let blob = data::bytes(9201, chunks().iter().sum());

    // PATCHes alternate between the two; the PUT goes to the other one than the last PATCH.
    let digest = routed_push(&bucket, &mut servers, &blob, &[0, 1, 0, 1, 0, 1, 0], |_, _| {}).await;
    for (i, sd) in servers.iter().enumerate() {
        let reg = sd.registry();
        reg.assert_blob("team/app", &digest, &blob).await;
        let logged = warnings(sd);
        assert!(logged.is_empty(), "server {i} logged: {logged:?}");
    }
    assert_push_gone(&bucket);
    assert_eq!(bucket.assert_blobs_intact(), 1);

    // Again, server 0 restarted on a wiped scratch root between two PATCHes it takes (its
    // spool was in step: now it is gone), and two PATCHes in a row on server 1.
    let blob = data::bytes(9202, chunks().iter().sum());
    let digest = routed_push(&bucket, &mut servers, &blob, &[0, 1, 0, 0, 1, 1, 0], |i, servers| {
        if i == 3 {
            servers[0].kill();
            std::fs::remove_dir_all(&roots[0]).unwrap();
            servers[0] = replica(&bucket, &roots[0]);
        }
    })
    .await;
    for sd in servers.iter() {
        sd.registry().assert_blob("team/app", &digest, &blob).await;
    }
    assert_push_gone(&bucket);
    assert_eq!(bucket.assert_blobs_intact(), 2);
}

/// A process whose local spool is behind the session (it took a chunk that was cut short,
/// then another process advanced the session with other bytes) rebuilds its spool from the
/// bucket: the bytes it kept from the cut chunk are never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_behind_the_session_is_rebuilt_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = Bucket::for_root(&tmp.path().join("shared"));
    let roots = [tmp.path().join("a"), tmp.path().join("b")];
    let mut a = replica(&bucket, &roots[0]);
    let b = replica(&bucket, &roots[1]);

    // 1 MiB acknowledged by A.
    let first = data::bytes(9301, MIB);
    let loc = a.registry().start_upload("team/app").await;
    let id = session_id(&loc);
    let (loc, _) = a.registry().try_patch(&loc, 0, MIB as u64, Body::from(first.clone())).await.unwrap();
    // A takes a chunk that sends 3 MiB and stalls; it is killed with them in its spool.
    let stalled = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(data::bytes(9302, 3 * MIB)))])
        .chain(futures::stream::pending());
    let patch = {
        let (reg, loc) = (a.registry(), loc.clone());
        tokio::spawn(async move { reg.try_patch(&loc, MIB as u64, 4 * MIB as u64, Body::wrap_stream(stalled)).await })
    };
    let spool = roots[0].join("ingest").join(&id).join("1");
    // (The last batch of a chunk is spooled when it is full or the chunk ends: 2 MiB at least.)
    let caught =
        common::wait_until(Duration::from_secs(30), || std::fs::metadata(&spool).is_ok_and(|m| m.len() >= 3 << 20))
            .await;
    assert!(caught, "the stalled chunk did not reach A's spool");
    a.kill();
    assert!(patch.await.unwrap().is_err(), "the stalled PATCH succeeded");

    // B advances the session from the same offset with other bytes (2 MiB).
    let second = data::bytes(9303, 2 * MIB);
    let (loc, acked) =
        b.registry().try_patch(&loc, MIB as u64, 2 * MIB as u64, Body::from(second.clone())).await.unwrap();
    assert_eq!(acked, 3 * MIB as u64);
    assert_pieces(&bucket, &id, 3 * MIB as u64);
    // A comes back on its old spool (long enough, with the cut chunk's bytes in it) and takes
    // the next PATCH and the PUT.
    assert!(std::fs::metadata(&spool).unwrap().len() >= 3 << 20);
    let a = replica(&bucket, &roots[0]);
    let third = data::bytes(9304, 4 * MIB);
    let (loc, _) =
        a.registry().try_patch(&loc, 3 * MIB as u64, 4 * MIB as u64, Body::from(third.clone())).await.unwrap();
    assert_pieces(&bucket, &id, 7 * MIB as u64);
    let whole = [first, second, third].concat();
    let digest = data::sha256(&whole);
    a.registry().try_finish(&loc, &digest, None).await.unwrap_or_else(|e| panic!("{e}"));
    a.registry().assert_blob("team/app", &digest, &whole).await;
    b.registry().assert_blob("team/app", &digest, &whole).await;
    assert_push_gone(&bucket);
    assert_eq!(bucket.assert_blobs_intact(), 1);
}

/// With `storage.s3.redirect`, a blob GET is a 307 to a presigned URL of the object that
/// serves the blob's bytes (ranges too); HEAD and unknown blobs are answered as before, and
/// with `[auth]` on, an unauthorized GET gets its 401, never a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_gets_redirect_to_presigned_urls() {
    let tmp = tempfile::tempdir().unwrap();
    let htpasswd = common::stevedore::write_htpasswd(&tmp.path().join("htpasswd"), &[("alice", "wonderland")]);
    let cfg = format!(
        "[proxy]\ndefault_upstream = \"\"\n\n[auth]\nhtpasswd = \"{}\"\nanonymous = \"none\"\n\n[[auth.rules]]\nusers = [\"alice\"]\n\
         repositories = [\"**\"]\nactions = [\"pull\", \"push\", \"delete\"]\n",
        htpasswd.display()
    );
    let sd = Stevedore::builder()
        .backend(common::s3::Backend::S3)
        .dir(&tmp.path().join("sd"))
        .config(&cfg)
        .s3_setting("redirect = true")
        .s3_setting("redirect_expiry = \"60s\"")
        .start();
    let reg = sd.registry().basic_auth("alice", "wonderland");
    let blob = data::bytes(9401, 6 * MIB + 99);
    let digest = reg.upload_blob("team/app", &blob).await;
    let path = format!("/v2/team/app/blobs/{digest}");

    let r = reg.send(reg.req(reqwest::Method::GET, &path)).await;
    assert_eq!(r.status(), 307, "GET {path}");
    assert_eq!(common::http::hdr(r.headers(), "docker-content-digest").as_deref(), Some(digest.as_str()));
    let url = common::http::hdr(r.headers(), "location").expect("Location");
    let moto = format!("http://127.0.0.1:{}/", sd.bucket.as_ref().unwrap().port);
    assert!(url.starts_with(&moto) && url.contains("X-Amz-Signature="), "not a presigned URL: {url}");
    // The URL alone fetches the bytes, whole or in part, with no credentials of ours.
    let http = common::http::client();
    let got = http.get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    let body = got.bytes().await.unwrap();
    assert!(body.len() == blob.len() && body[..] == blob[..], "the presigned URL served other bytes");
    let part = http.get(&url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap()[..], blob[100..200]);
    // A client that follows redirects gets the blob.
    let following = reqwest::Client::builder().no_proxy().build().unwrap();
    let got = following.get(sd.url(&path)).basic_auth("alice", Some("wonderland")).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(data::sha256(&got.bytes().await.unwrap()), digest);

    // HEAD is answered here; an unknown blob is a 404; no login, no URL.
    let r = reg.send(reg.req(reqwest::Method::HEAD, &path)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(common::http::content_length_header(r.headers()), Some(blob.len() as u64));
    let unknown = data::sha256(b"not pushed");
    let r = reg.send(reg.req(reqwest::Method::GET, &format!("/v2/team/app/blobs/{unknown}"))).await;
    assert_eq!(r.status(), 404);
    let anon = sd.registry();
    let r = anon.send(anon.req(reqwest::Method::GET, &path)).await;
    assert_eq!(r.status(), 401);
    assert!(common::http::hdr(r.headers(), "location").is_none());
}

/// Parts are sent ahead of a slow one (issue #25): while part 1 of an upload is held back
/// (`s3_part.first`), parts 2..=4 are sent all the same, and the session's state records none
/// of them (a part is recorded only once every part before it landed); once part 1 lands, the
/// PATCH answers, the state records parts 1..=5, and the blob commits with the bytes sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_after_a_held_part_are_sent_but_recorded_only_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, pause_dir) = (tmp.path().join("store"), tmp.path().join("pause"));
    let sd = Stevedore::builder()
        .root(&root)
        .env("STEVEDORE_PAUSE", "s3_part.first")
        .env("STEVEDORE_PAUSE_DIR", &pause_dir.display().to_string())
        .start();
    let bucket = sd.bucket.clone().expect("an S3 store");
    let pauses = Pauses::in_dir(&pause_dir);
    let reg = sd.registry();
    let part = PART_SIZE as usize;
    let len = 5 * part + 300 * 1024;
    let blob = data::bytes(81, len);
    let d = data::sha256(&blob);
    let loc = reg.try_start_upload("ahead/parts").await.unwrap();
    let id = session_id(&loc);

    let (reg2, loc2, body) = (reg.clone(), loc.clone(), blob.clone());
    let patch = tokio::spawn(async move { reg2.try_patch(&loc2, 0, len as u64, body.into()).await });
    pauses.reached("s3_part.first", Duration::from_secs(60)).await;
    let held = state(&bucket, &id);
    let upload = held["upload"].as_str().expect("the multipart upload is recorded before its first part").to_string();
    let target = held["target"].as_str().expect("the upload's key").to_string();
    let start = Instant::now();
    let mut listed = bucket.parts(&target, &upload);
    while listed != [2, 3, 4] && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        listed = bucket.parts(&target, &upload);
    }
    assert_eq!(listed, vec![2, 3, 4], "parts sent while part 1 is held back (parts 2..=4 expected)");
    let recorded = state(&bucket, &id)["parts"].as_array().map_or(0, |p| p.len());
    assert_eq!(recorded, 0, "parts recorded in the state while part 1 has not landed");
    assert!(!patch.is_finished(), "the PATCH answered before its first part landed");

    pauses.go("s3_part.first").await;
    let (loc, stored) =
        tokio::time::timeout(Duration::from_secs(60), patch).await.expect("the PATCH answers").unwrap().unwrap();
    assert_eq!(stored, len as u64);
    assert_eq!(bucket.parts(&target, &upload), vec![1, 2, 3, 4, 5], "parts in the multipart upload");
    let recorded = state(&bucket, &id)["parts"].as_array().map_or(0, |p| p.len());
    assert_eq!(recorded, 5, "parts recorded at the PATCH's checkpoint");
    let r = reg.finish_upload(&loc, &d, Vec::new()).await;
    assert_eq!(r.status(), StatusCode::CREATED, "PUT ?digest: {}", r.text().await.unwrap_or_default());
    assert!(stored_blob(&sd, &d).as_deref() == Some(&blob[..]), "the stored blob is the bytes sent");
}
