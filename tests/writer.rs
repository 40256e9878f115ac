//! The writer's promises (issue #22, scenarios 5 and 6 and the directory fsync of item 7):
//! - the hash state saved for a session always describes the bytes stored with it: a PATCH
//!   whose request was dropped while its state was being written cannot land that state after
//!   the next request on the session;
//! - content once stored is never replaced by other bytes (first writer wins), even when a
//!   session's saved state claims another session's bytes;
//! - a commit cut short by a crash (after the content was put in place, before the session
//!   was removed) is finished by the retried final PUT: 201, the blob readable and linked;
//! - with `fsync = true`, every directory a push creates has its parent fsynced (strace).
//!
//! `tests/writer_s3.rs` runs the same file on S3 (moto).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::data;
use common::http::Registry;
use common::pause::Pauses;
use common::s3::{suite_backend, Backend};
use common::store::{assert_stored_blobs_intact, stored_blob, stored_object};
use common::Stevedore;
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;

const LIMIT: Duration = Duration::from_secs(60);

/// The multipart part size of the test servers on S3 (`tests/common/s3.rs`).
const PART: usize = 5 << 20;

fn session_id(loc: &str) -> String {
    Registry::path_of(loc).split('?').next().unwrap().rsplit('/').next().unwrap().to_string()
}

fn state_key(id: &str) -> String {
    format!("ingest/{id}/state.json")
}

/// Replaces an ingest's state behind the server's back (a file, or an object in the bucket).
fn put_state(sd: &Stevedore, id: &str, bytes: &[u8]) {
    match &sd.bucket {
        Some(b) => b.put(&state_key(id), bytes),
        None => std::fs::write(sd.root().join(state_key(id)), bytes).unwrap(),
    }
}

/// A server whose pause points (`points`, comma-separated) use `dir`, on the store at `root`.
fn start_paused(root: &Path, dir: &Path, points: &str) -> Stevedore {
    Stevedore::builder()
        .root(root)
        .env("STEVEDORE_PAUSE", points)
        .env("STEVEDORE_PAUSE_DIR", &dir.display().to_string())
        .start()
}

/// Scenario 5 (replayed stale state): a session whose saved state is another session's
/// (same repository, same length, other bytes) must not put its bytes under the other
/// session's digest. The first blob's stored bytes stay what was sent, whatever the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_hash_state_never_replaces_stored_content() {
    let sd = Stevedore::local();
    let reg = sd.registry();
    let len = 64 * 1024;
    let a = data::bytes(51, len);
    let b = data::bytes(52, len);
    let da = data::sha256(&a);

    // Session 1 sends A; its state (offset, hash of A) is saved aside, then A is committed.
    let loc1 = reg.try_start_upload("shared/base").await.unwrap();
    let (loc1, _) = reg.try_patch(&loc1, 0, len as u64, a.clone().into()).await.unwrap();
    let stale = stored_object(&sd, &state_key(&session_id(&loc1))).expect("session 1's state");
    reg.try_finish(&loc1, &da, None).await.unwrap();
    assert_eq!(stored_blob(&sd, &da).as_deref(), Some(&a[..]), "blob A as pushed");

    // Session 2 sends B, and then its state is session 1's (a late state write, replayed).
    let loc2 = reg.try_start_upload("shared/base").await.unwrap();
    let (loc2, _) = reg.try_patch(&loc2, 0, len as u64, b.clone().into()).await.unwrap();
    put_state(&sd, &session_id(&loc2), &stale);
    let resp = reg.finish_upload(&loc2, &da, Vec::new()).await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert!(
        status == StatusCode::CREATED || status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND,
        "PUT ?digest=A on a session holding B under A's saved state: {status} {body}"
    );
    let stored = stored_blob(&sd, &da).expect("blob A is still stored");
    assert!(
        stored == a,
        "a second commit of {da} with other bytes replaced the stored content (PUT answered {status}): \
         stored bytes are {}",
        if stored == b { "session 2's bytes B".to_string() } else { format!("{} other bytes", stored.len()) }
    );
    let (st, got) = reg.try_get_blob("shared/base", &da).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(got == a, "GET {da} answers other bytes than were pushed");
    assert_stored_blobs_intact(&sd);
}

/// Scenario 5 (racing requests): a PATCH whose client went away while the session's state was
/// being written (held there by the pause point `checkpoint.state_write`), and a second PATCH
/// on the same session. The saved state must describe the stored bytes: the final PUT with
/// the first chunk's digest either stores exactly the first chunk, or is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_patch_cannot_land_its_state_after_the_next_request() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, pause_dir) = (tmp.path().join("store"), tmp.path().join("pause"));
    let sd = start_paused(&root, &pause_dir, "checkpoint.state_write");
    let pauses = Pauses::in_dir(&pause_dir);
    let reg = sd.registry();
    let len = 256 * 1024;
    let a = data::bytes(61, len);
    let b = data::bytes(62, len);
    let (da, db) = (data::sha256(&a), data::sha256(&b));
    let loc = reg.try_start_upload("race/me").await.unwrap();
    let id = session_id(&loc);

    // PATCH A by hand, so that the test can drop its connection at the pause point.
    let path = Registry::path_of(&loc);
    let mut conn = tokio::net::TcpStream::connect(&sd.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\nContent-Range: 0-{}\r\n\r\n",
        sd.addr,
        len - 1
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&a).await.unwrap();
    conn.flush().await.unwrap();
    pauses.reached("checkpoint.state_write", LIMIT).await;
    drop(conn);

    // PATCH B on the same session, from the start (on a client of its own: an answer given
    // before its body was read must not leave a closed connection in the shared pool).
    let reg_b = Registry::new(&reg.base);
    let loc_b = loc.clone();
    let mut patch_b = tokio::spawn(async move {
        let r = reg_b.patch_chunk(&loc_b, 0, &b).await;
        (r.status(), r.text().await.unwrap_or_default())
    });
    // While A's state write is held, B either waits for the session (the state write is
    // under the session lock) or, if A's state write is not covered by it, goes through.
    let early = tokio::time::timeout(Duration::from_secs(5), &mut patch_b).await;
    let before_go = stored_object(&sd, &state_key(&id));
    pauses.go("checkpoint.state_write").await;
    let b_answer = match early {
        Ok(r) => {
            let r = r.unwrap();
            // B went through while A's state write was held: wait (bounded) for the late write.
            let start = Instant::now();
            while stored_object(&sd, &state_key(&id)) == before_go && start.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r
        }
        Err(_) => tokio::time::timeout(LIMIT, patch_b).await.expect("PATCH B answers").unwrap(),
    };
    eprintln!("PATCH B answered {} {}", b_answer.0, b_answer.1);

    // Whichever chunk the session holds, its saved hash describes it.
    let r = reg.finish_upload(&loc, &da, Vec::new()).await;
    let st = r.status();
    let text = r.text().await.unwrap_or_default();
    if st == StatusCode::CREATED {
        let stored = stored_blob(&sd, &da).expect("blob A stored after a 201");
        assert!(
            stored == a,
            "PUT ?digest={da} answered 201 but the stored blob holds {} (the late state write of the \
             dropped PATCH described other bytes than the session held; PATCH B answered {})",
            if data::sha256(&stored) == db { "PATCH B's bytes".to_string() } else { "other bytes".to_string() },
            b_answer.0
        );
    } else {
        assert!(st.is_client_error(), "PUT ?digest={da}: {st} {text}");
        assert!(stored_blob(&sd, &da).is_none(), "blob A stored though its PUT answered {st}");
    }
    assert_stored_blobs_intact(&sd);
}

/// Scenario 6: the process dies right after the content was put in place (fs: the rename into
/// `blobs/`; S3: the copy to the final key) and before the session was removed. After a
/// restart, the client's retried final PUT (with its final chunk again) answers 201, and the
/// blob is readable and linked in the repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_put_cut_by_a_crash_after_the_content_is_in_place_completes_on_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, pause_dir) = (tmp.path().join("store"), tmp.path().join("pause"));
    let point = match suite_backend() {
        Backend::Fs => "commit.after_rename",
        Backend::S3 => "commit.after_copy",
    };
    // On S3 past one part, so that the upload goes through its multipart upload, the staging
    // object and the copy.
    let (first, last) = (PART + 512 * 1024, 700 * 1024);
    let blob = data::bytes(71, first + last);
    let d = data::sha256(&blob);
    let repo = "crash/retry";

    let mut sd = start_paused(&root, &pause_dir, point);
    let pauses = Pauses::in_dir(&pause_dir);
    let reg = sd.registry();
    let loc = reg.try_start_upload(repo).await.unwrap();
    let (loc, _) = reg.try_patch(&loc, 0, first as u64, blob[..first].to_vec().into()).await.unwrap();
    let reg2 = reg.clone();
    let (loc2, d2, tail) = (loc.clone(), d.clone(), blob[first..].to_vec());
    let put = tokio::spawn(async move { reg2.finish_upload(&loc2, &d2, tail).await.status() });
    pauses.reached(point, LIMIT).await;
    sd.kill();
    let _ = put.await;

    let sd = Stevedore::builder().root(&root).start();
    let reg = sd.registry();
    let r = reg.finish_upload(&loc, &d, blob[first..].to_vec()).await;
    let st = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(st, StatusCode::CREATED, "retried PUT ?digest after a crash at {point}: {text}");
    // The same client (its pooled connection): the recovery reads the retried body off the
    // connection before it answers, so the connection stays usable.
    let (st, got) = reg.try_get_blob(repo, &d).await.unwrap();
    assert_eq!(st, StatusCode::OK, "GET the blob in {repo} after the retried PUT");
    assert!(got == blob, "the blob reads back other bytes");
    let head = reg.head(&format!("/v2/{repo}/blobs/{d}")).await;
    assert_eq!(head.status(), StatusCode::OK, "HEAD the blob in {repo}: linked");
    assert_eq!(stored_blob(&sd, &d).as_deref().map(data::sha256), Some(d.clone()));
    assert_stored_blobs_intact(&sd);
}

/// With `fsync = true`, every directory one push into a new repository creates has its
/// parent directory fsynced after its creation (the server traced by strace). Directories
/// gone by the end of the push (the ingests of committed uploads and manifests) are left out:
/// a crash loses nothing with them; an upload session left open is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_directory_a_push_creates_is_fsynced_into_its_parent() {
    if suite_backend() == Backend::S3 {
        // The bucket has no directories; the S3 twin runs the rest of this file.
        eprintln!("not run on S3: object stores have no directories to fsync");
        return;
    }
    let strace = common::proc::tool("strace");
    let sd = Stevedore::local();
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace");
    let mut tracer = std::process::Command::new(&strace)
        .args(["-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,mkdir,mkdirat", "-o"])
        .arg(&trace)
        .args(["-p", &sd.pid().to_string()])
        .spawn()
        .expect("strace starts");
    // strace prints nothing until attached: wait for its first line.
    let reg = sd.registry();
    let start = Instant::now();
    loop {
        // Any traced call: a push of a throwaway blob creates directories.
        let probe = data::bytes(80 + start.elapsed().as_millis() as u64, 1000);
        reg.try_post_monolithic("probe/attach", &data::sha256(&probe), probe).await.unwrap();
        if std::fs::metadata(&trace).map(|m| m.len() > 0).unwrap_or(false) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "strace did not attach within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mark = std::fs::read_to_string(&trace).unwrap().lines().count();

    // One push of an image into a new repository.
    let layer = data::bytes(91, 300 * 1024);
    let dl = data::sha256(&layer);
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let dc = data::sha256(&config);
    let loc = reg.try_start_upload("fresh/repo").await.unwrap();
    let (loc, _) = reg.try_patch(&loc, 0, layer.len() as u64, layer.clone().into()).await.unwrap();
    reg.try_finish(&loc, &dl, None).await.unwrap();
    reg.try_post_monolithic("fresh/repo", &dc, config.clone()).await.unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": dl, "size": layer.len()}],
    });
    let r = reg
        .put_manifest("fresh/repo", "v1", "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes())
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "manifest PUT");
    // And a session left open: its directory must survive a crash too.
    reg.try_start_upload("fresh/repo").await.unwrap();
    // The server answered: every fsync of the push has returned. Let strace write its lines.
    let _ = tracer.kill();
    let _ = tracer.wait();
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().skip(mark).collect();
    let problems = unsynced_dirs(&lines, sd.root());
    assert!(
        problems.created > 0,
        "the push created no directory under {} (trace:\n{})",
        sd.root().display(),
        lines.join("\n")
    );
    assert!(
        problems.unsynced.is_empty(),
        "directories created by the push whose parent was never fsynced after: {:?}\n(trace:\n{})",
        problems.unsynced,
        lines.join("\n")
    );
}

struct DirCheck {
    created: usize,
    unsynced: Vec<PathBuf>,
}

/// From strace lines (`-f -y`): directories created under `root` (mkdir/mkdirat `= 0`) and
/// still there, for which no fsync/fdatasync of their parent directory follows. A call another thread cut in
/// two (`<unfinished ...>` … `<... mkdir resumed>`) counts where it returned.
fn unsynced_dirs(lines: &[&str], root: &Path) -> DirCheck {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut created: Vec<(usize, PathBuf)> = Vec::new();
    let mut synced: Vec<(usize, PathBuf)> = Vec::new();
    // Calls started and not returned yet, by thread: their first part.
    let mut pending: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (i, l) in lines.iter().enumerate() {
        let Some((tid, rest)) = l.split_once(' ') else { continue };
        let rest = rest.trim_start();
        if rest.ends_with("<unfinished ...>") {
            pending.insert(tid.to_string(), rest.to_string());
            continue;
        }
        let whole = if rest.starts_with("<... ") {
            let Some(first) = pending.remove(tid) else { continue };
            let tail = rest.split_once("resumed>").map(|(_, t)| t).unwrap_or_default();
            format!("{}{tail}", first.trim_end_matches("<unfinished ...>"))
        } else {
            rest.to_string()
        };
        let l = whole.as_str();
        if (l.starts_with("mkdir(") || l.starts_with("mkdirat(")) && l.trim_end().ends_with("= 0") {
            // The first quoted argument is the path (mkdirat's dirfd is AT_FDCWD or `N</dir>`).
            let quoted = l.split('"').nth(1).unwrap_or_default();
            let p = PathBuf::from(quoted);
            let p = if p.is_absolute() {
                p
            } else if let Some(dir) = l.split('<').nth(1).and_then(|s| s.split('>').next()) {
                Path::new(dir).join(p)
            } else {
                continue;
            };
            if p.starts_with(&root) && p.exists() {
                created.push((i, p));
            }
        } else if (l.starts_with("fsync(") || l.starts_with("fdatasync(")) && l.trim_end().ends_with("= 0") {
            if let Some(dir) = l.split('<').nth(1).and_then(|s| s.split('>').next()) {
                synced.push((i, PathBuf::from(dir)));
            }
        }
    }
    let unsynced = created
        .iter()
        .filter(|(at, p)| {
            let parent = p.parent().unwrap();
            !synced.iter().any(|(i, d)| i > at && d == parent)
        })
        .map(|(_, p)| p.clone())
        .collect();
    DirCheck { created: created.len(), unsynced }
}

/// Bytes stored so far for the ingest `id`: its data file (fs) or spooled parts (S3), all
/// under `<root>/ingest/<id>/`.
fn ingest_bytes(sd: &Stevedore, id: &str) -> u64 {
    let dir = sd.root().join("ingest").join(id);
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name() != "state.json")
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Uploads whose clients stop mid-body hold no blocking-pool thread while they wait: with
/// the pool bounded at 2 threads (`STEVEDORE_TEST_MAX_BLOCKING_THREADS`), three PATCHes that
/// sent 2 MiB and then stall each have those bytes stored, a push and a pull of another blob
/// complete meanwhile, and once the stalled clients send the rest, every session commits
/// exactly the bytes sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_hold_no_blocking_thread_while_they_wait() {
    use bytes::Bytes;
    const SENT: usize = (2 << 20) + 100_000;
    let sd = Stevedore::builder().env("STEVEDORE_TEST_MAX_BLOCKING_THREADS", "2").start();
    let reg = sd.registry();
    let mut slow = Vec::new();
    for i in 0..3u64 {
        let data = data::bytes(700 + i, SENT + 700_000);
        let loc = reg.try_start_upload("team/slow").await.unwrap();
        let (tx, patch) = reg.patch_fed(&loc, 0, data.len() as u64);
        for piece in data[..SENT].chunks(256 << 10) {
            tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        slow.push((session_id(&loc), data, tx, patch));
    }
    // Each stalled session's first 2 MiB are stored: no writer is left waiting for a thread
    // that another, waiting for its client, holds.
    let stored =
        common::wait_until(Duration::from_secs(30), || slow.iter().all(|(id, ..)| ingest_bytes(&sd, id) >= 2 << 20))
            .await;
    let have: Vec<u64> = slow.iter().map(|(id, ..)| ingest_bytes(&sd, id)).collect();
    assert!(stored, "the stalled uploads' first 2 MiB are not all stored after 30 s: {have:?} bytes");

    // Meanwhile the rest of the server works: a push (1.5 MiB, two batches) and its pull.
    let other = data::bytes(799, 1_500_000);
    let pushed = tokio::time::timeout(Duration::from_secs(30), async {
        let digest = reg.push_blob("team/other", &other).await;
        reg.assert_blob("team/other", &digest, &other).await;
    })
    .await;
    assert!(pushed.is_ok(), "a push and pull beside three stalled uploads did not finish in 30 s");

    // The stalled clients finish: each session holds exactly what its client sent.
    for (_, data, tx, patch) in slow {
        for piece in data[SENT..].chunks(256 << 10) {
            tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        drop(tx);
        let (loc, stored) = patch.await.unwrap().unwrap_or_else(|e| panic!("the stalled PATCH: {e}"));
        assert_eq!(stored, data.len() as u64);
        let digest = data::sha256(&data);
        reg.try_finish(&loc, &digest, None).await.unwrap_or_else(|e| panic!("PUT after the stall: {e}"));
        reg.assert_blob("team/slow", &digest, &data).await;
    }
    assert_stored_blobs_intact(&sd);
}
