//! Crash safety: concurrent pushes while the server is SIGKILLed, then restarts on the same store.
//!
//! Each round starts `stevedore` on one store root, verifies everything the previous rounds were
//! promised, runs concurrent writers (chunked uploads with many 1-8 MiB PATCHes, monolithic
//! pushes, manifest PUTs, and sessions left idle mid-upload), SIGKILLs the server after a fixed
//! delay, and checks the store on disk. A ledger records exactly what the server acknowledged:
//!
//! * every file under `blobs/` hashes to its own name (no torn or misnamed blob, ever);
//! * every blob and manifest that got 201 is served byte-identical after the restart;
//! * an upload session whose last PATCH got 202 answers `GET` with the same `Range` after the
//!   restart (across several restarts) and can be completed;
//! * a session whose PATCH was cut by the kill keeps at least the acknowledged bytes, and the
//!   bytes it reports are the ones sent (completing it must match the digest);
//! * a blob or manifest whose request was cut by the kill is either absent or intact.
//!
//! Everything is bounded: 5 rounds, a byte budget per round, timeouts on every request.

mod common;

use common::data::{self, Rng};
use common::http::{HttpErr, Registry};
use common::oci;
use common::store::assert_blobs_intact;
use common::Stevedore;
use reqwest::{Body, StatusCode};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const ROUNDS: usize = 5;
/// When to SIGKILL the server after the writers start, per round.
const KILL_AFTER_MS: [u64; ROUNDS] = [800, 300, 1600, 1100, 2300];
/// Bytes the writers may send per round (bounds disk use and runtime).
const ROUND_BUDGET: u64 = 768 * MIB;
/// Writers stop by themselves after this, killed or not.
const WRITER_DEADLINE: Duration = Duration::from_secs(30);
/// Sessions each parker leaves idle per round.
const PARKED_PER_ROUND: usize = 3;

#[derive(Clone, Debug)]
struct BlobRec {
    repo: String,
    seed: u64,
    len: u64,
    digest: String,
    /// Read back in full (GET + hash) at least once after a restart.
    verified: bool,
}

#[derive(Clone, Debug, PartialEq)]
enum SessState {
    /// No request in flight: the server acknowledged exactly `acked` bytes.
    Idle,
    /// A PATCH of `len` bytes at `acked` was in flight.
    Patching { len: u64 },
    /// The final `PUT ?digest=` was in flight.
    Finishing,
}

#[derive(Clone, Debug)]
struct SessRec {
    repo: String,
    /// Path of the latest Location.
    loc: String,
    seed: u64,
    len: u64,
    digest: String,
    acked: u64,
    state: SessState,
    /// Restarts survived while idle.
    restarts: u32,
}

impl SessRec {
    /// The blob this session uploads.
    fn blob(&self, verified: bool) -> BlobRec {
        BlobRec { repo: self.repo.clone(), seed: self.seed, len: self.len, digest: self.digest.clone(), verified }
    }
}

#[derive(Clone, Debug)]
struct ManRec {
    repo: String,
    tag: String,
    bytes: Vec<u8>,
    digest: String,
}

#[derive(Default, Debug)]
struct Stats {
    blobs_committed: usize,
    manifests_committed: usize,
    idle_sessions_checked: usize,
    idle_sessions_multi_restart: usize,
    cut_patches_checked: usize,
    cut_sessions_dropped: usize,
    cut_finishes_checked: usize,
    cut_blobs_present: usize,
    cut_blobs_absent: usize,
    sessions_completed_after_restart: usize,
    files_checked_on_disk: usize,
}

#[derive(Default)]
struct Ledger {
    next_id: u64,
    blobs: Vec<BlobRec>,
    /// Monolithic blob pushes in flight (keyed by id); left here if cut by the kill.
    pending_blobs: BTreeMap<u64, BlobRec>,
    manifests: Vec<ManRec>,
    pending_manifests: BTreeMap<u64, ManRec>,
    sessions: BTreeMap<u64, SessRec>,
    failures: Vec<String>,
    stats: Stats,
}

impl Ledger {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

#[derive(Clone)]
struct Ctx {
    reg: Registry,
    ledger: Arc<Mutex<Ledger>>,
    killed: Arc<AtomicBool>,
    budget: Arc<AtomicU64>,
    started: Instant,
}

impl Ctx {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }

    fn stopping(&self) -> bool {
        self.killed.load(Ordering::SeqCst) || self.started.elapsed() > WRITER_DEADLINE
    }

    /// Records an error unless it is the expected loss of connection after the kill.
    fn error(&self, what: &str, e: HttpErr) {
        let killed = self.killed.load(Ordering::SeqCst);
        if e.is_transport() && killed {
            return;
        }
        let when = if killed { "after the kill" } else { "before the kill" };
        self.lock().failures.push(format!("{what} ({when}): {e}"));
    }

    /// Reserves `n` bytes of this round's budget.
    fn reserve(&self, n: u64) -> bool {
        self.budget.fetch_add(n, Ordering::SeqCst) + n <= ROUND_BUDGET
    }

    /// Idles until the kill (or the deadline).
    async fn idle(&self) {
        while !self.stopping() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn seed_for(round: usize, worker: usize, n: u64) -> u64 {
    (round as u64 + 1) * 1_000_000_000 + worker as u64 * 1_000_000 + n
}

/// Chunked uploads: POST, many PATCHes of 1-8 MiB, PUT ?digest. A parker instead stops after
/// a few chunks and leaves the session idle for the restart to check.
async fn chunked_writer(ctx: Ctx, round: usize, worker: usize, park: bool) {
    let mut rng = Rng::new(seed_for(round, worker, 7));
    let repo = format!("crash/chunked{worker}");
    let mut parked = 0;
    for n in 0u64.. {
        if ctx.stopping() {
            return;
        }
        if park && parked >= PARKED_PER_ROUND {
            return ctx.idle().await;
        }
        let len = if park { rng.range(3 * MIB, 12 * MIB) } else { rng.range(6 * MIB, 24 * MIB) } + rng.range(0, 4095);
        if !ctx.reserve(len) {
            return ctx.idle().await;
        }
        let seed = seed_for(round, worker, n);
        let digest = data::stream_digest(seed, 0, len);
        // A parker sends 1..=3 chunks, always leaving some bytes unsent.
        let park_after = if park { rng.range(1, 3) } else { u64::MAX };

        let loc = match ctx.reg.try_start_upload(&repo).await {
            Ok(l) => Registry::path_of(&l),
            Err(e) => return ctx.error("POST upload", e),
        };
        let sid = {
            let mut l = ctx.lock();
            let sid = l.id();
            let rec = SessRec {
                repo: repo.clone(),
                loc: loc.clone(),
                seed,
                len,
                digest: digest.clone(),
                acked: 0,
                state: SessState::Idle,
                restarts: 0,
            };
            l.sessions.insert(sid, rec);
            sid
        };
        let mut loc = loc;
        let mut off = 0u64;
        let mut chunks_sent = 0u64;
        while off < len {
            let mut clen = rng.range(MIB, 8 * MIB).min(len - off);
            if park && chunks_sent + 1 == park_after && off + clen >= len {
                clen = (len - off) / 2; // keep the session unfinished
            }
            if clen == 0 {
                break;
            }
            ctx.lock().sessions.get_mut(&sid).unwrap().state = SessState::Patching { len: clen };
            let body = Body::from(data::bytes_at(seed, off, clen as usize));
            match ctx.reg.try_patch(&loc, off, clen, body).await {
                Ok((new_loc, stored)) => {
                    off = stored;
                    loc = Registry::path_of(&new_loc);
                    let mut l = ctx.lock();
                    let s = l.sessions.get_mut(&sid).unwrap();
                    s.acked = off;
                    s.loc = loc.clone();
                    s.state = SessState::Idle;
                }
                Err(e) => return ctx.error(&format!("PATCH {loc} at {off}+{clen}"), e),
            }
            chunks_sent += 1;
            if chunks_sent >= park_after {
                break;
            }
            if ctx.stopping() {
                return;
            }
        }
        if park {
            parked += 1;
            continue;
        }
        ctx.lock().sessions.get_mut(&sid).unwrap().state = SessState::Finishing;
        match ctx.reg.try_finish(&loc, &digest, None).await {
            Ok(()) => {
                let mut l = ctx.lock();
                l.sessions.remove(&sid);
                l.blobs.push(BlobRec { repo: repo.clone(), seed, len, digest, verified: false });
            }
            Err(e) => return ctx.error(&format!("PUT {loc}?digest="), e),
        }
    }
}

/// Pushes one whole blob, monolithic (`POST ?digest=`) or `POST` + one `PUT` with the body.
/// `seed` names the bytes in the ledger (only `digest` and `len` are used to check them).
async fn push_whole_blob(ctx: &Ctx, repo: &str, seed: u64, bytes: Vec<u8>, single_post: bool) -> bool {
    let len = bytes.len() as u64;
    let digest = data::sha256(&bytes);
    let rec = BlobRec { repo: repo.to_string(), seed, len, digest: digest.clone(), verified: false };
    let loc = if single_post {
        None
    } else {
        match ctx.reg.try_start_upload(repo).await {
            Ok(l) => Some(Registry::path_of(&l)),
            Err(e) => {
                ctx.error("POST upload", e);
                return false;
            }
        }
    };
    let id = {
        let mut l = ctx.lock();
        let id = l.id();
        l.pending_blobs.insert(id, rec.clone());
        id
    };
    let res = match &loc {
        None => ctx.reg.try_post_monolithic(repo, &digest, bytes).await,
        Some(loc) => ctx.reg.try_finish(loc, &digest, Some((len, Body::from(bytes)))).await,
    };
    match res {
        Ok(()) => {
            let mut l = ctx.lock();
            l.pending_blobs.remove(&id);
            l.blobs.push(rec);
            true
        }
        Err(e) => {
            ctx.error(&format!("whole-blob push of {digest} to {repo}"), e);
            false
        }
    }
}

async fn monolithic_writer(ctx: Ctx, round: usize, worker: usize) {
    let mut rng = Rng::new(seed_for(round, worker, 11));
    let repo = format!("crash/mono{worker}");
    for n in 0u64.. {
        if ctx.stopping() {
            return;
        }
        let len = rng.range(64 * 1024, 4 * MIB);
        if !ctx.reserve(len) {
            return ctx.idle().await;
        }
        let seed = seed_for(round, worker, n);
        if !push_whole_blob(&ctx, &repo, seed, data::bytes(seed, len as usize), n % 2 == 0).await {
            return;
        }
    }
}

/// Small images: config + layer (monolithic), then the manifest under a unique tag.
async fn manifest_writer(ctx: Ctx, round: usize, worker: usize) {
    let repo = format!("crash/images{worker}");
    for n in 0u64.. {
        if ctx.stopping() {
            return;
        }
        let seed = seed_for(round, worker, n);
        let layer = data::bytes(seed, 200_000 + n as usize);
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"seed":{seed}}}"#
        )
        .into_bytes();
        if !ctx.reserve((layer.len() + config.len()) as u64) {
            return ctx.idle().await;
        }
        let layer_digest = data::sha256(&layer);
        let config_digest = data::sha256(&config);
        let (layer_len, config_len) = (layer.len(), config.len());
        if !push_whole_blob(&ctx, &repo, seed, layer, true).await {
            return;
        }
        if !push_whole_blob(&ctx, &repo, seed, config, n % 2 == 1).await {
            return;
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::MT_MANIFEST,
            "config": {"mediaType": oci::MT_CONFIG, "digest": config_digest, "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_len}],
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let rec = ManRec {
            repo: repo.clone(),
            tag: format!("r{round}-n{n}"),
            digest: data::sha256(&bytes),
            bytes: bytes.clone(),
        };
        let id = {
            let mut l = ctx.lock();
            let id = l.id();
            l.pending_manifests.insert(id, rec.clone());
            id
        };
        match ctx.reg.try_put_manifest(&repo, &rec.tag, oci::MT_MANIFEST, bytes).await {
            Ok(_) => {
                let mut l = ctx.lock();
                l.pending_manifests.remove(&id);
                l.manifests.push(rec);
            }
            Err(e) => return ctx.error(&format!("PUT manifest {repo}:{}", rec.tag), e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification after a restart

/// GETs a blob and checks length and digest; returns a failure message if wrong.
async fn check_blob(reg: &Registry, b: &BlobRec) -> Result<(), String> {
    match reg.try_get_blob_hashed(&b.repo, &b.digest).await {
        Ok((st, _, n, d)) if st == StatusCode::OK && n == b.len && d == b.digest => Ok(()),
        Ok((st, _, n, d)) => Err(format!(
            "GET /v2/{}/blobs/{}: expected 200 with {} bytes (data seed {}), got {st} with {n} bytes hashing to {d}",
            b.repo, b.digest, b.len, b.seed
        )),
        Err(e) => Err(format!("GET /v2/{}/blobs/{}: {e}", b.repo, b.digest)),
    }
}

/// Sends `seed`'s bytes from `from` to `len` (two PATCHes) and `PUT ?digest=`.
async fn complete_session(reg: &Registry, s: &SessRec, from: u64) -> Result<(), String> {
    let mut loc = s.loc.clone();
    let mut off = from;
    let half = (s.len - off).div_ceil(2);
    while off < s.len {
        let clen = half.min(s.len - off);
        let body = Body::from(data::bytes_at(s.seed, off, clen as usize));
        let (nl, stored) = reg
            .try_patch(&loc, off, clen, body)
            .await
            .map_err(|e| format!("completing {}: PATCH at {off}: {e}", s.loc))?;
        loc = Registry::path_of(&nl);
        off = stored;
    }
    reg.try_finish(&loc, &s.digest, None).await.map_err(|e| format!("completing {}: PUT ?digest: {e}", s.loc))?;
    let b = s.blob(false);
    check_blob(reg, &b).await.map_err(|e| format!("after completing {}: {e}", s.loc))
}

/// Checks everything in the ledger against the restarted server. Completes every open session
/// when `complete_all`, otherwise about half of them, keeping the rest for the next restart.
async fn verify(reg: &Registry, root: &Path, ledger: &mut Ledger, complete_all: bool) {
    let mut failures = Vec::new();

    // Blobs acknowledged with 201: full read-back once, HEAD (+ the on-disk hash check) later,
    // full read-back again at the end.
    for b in ledger.blobs.iter_mut() {
        if !b.verified || complete_all {
            match check_blob(reg, b).await {
                Ok(()) => b.verified = true,
                Err(e) => failures.push(format!("acknowledged blob lost or changed: {e}")),
            }
        } else {
            match reg.try_head_blob(&b.repo, &b.digest).await {
                Ok(st) if st == StatusCode::OK => {}
                other => failures.push(format!("HEAD /v2/{}/blobs/{}: {other:?}", b.repo, b.digest)),
            }
        }
    }

    // Whole-blob pushes cut by the kill: absent, or present and intact.
    for (_, b) in std::mem::take(&mut ledger.pending_blobs) {
        match reg.try_head_blob(&b.repo, &b.digest).await {
            Ok(st) if st == StatusCode::NOT_FOUND => ledger.stats.cut_blobs_absent += 1,
            Ok(st) if st == StatusCode::OK => match check_blob(reg, &b).await {
                Ok(()) => {
                    ledger.stats.cut_blobs_present += 1;
                    ledger.blobs.push(BlobRec { verified: true, ..b });
                }
                Err(e) => failures.push(format!("blob cut by the kill is present but wrong: {e}")),
            },
            other => failures.push(format!("HEAD of a cut blob /v2/{}/blobs/{}: {other:?}", b.repo, b.digest)),
        }
    }

    // Manifests acknowledged with 201: by tag and by digest, byte-identical.
    for m in &ledger.manifests {
        for reference in [&m.tag, &m.digest] {
            match reg.try_get_manifest(&m.repo, reference).await {
                Ok((st, dcd, _, body)) if st == StatusCode::OK && body == m.bytes => {
                    if dcd.as_deref() != Some(m.digest.as_str()) {
                        failures.push(format!(
                            "GET manifest {}:{reference}: Docker-Content-Digest {dcd:?}, expected {}",
                            m.repo, m.digest
                        ));
                    }
                }
                Ok((st, _, _, body)) => failures.push(format!(
                    "acknowledged manifest {}:{reference} lost or changed: {st}, {} bytes hashing to {}",
                    m.repo,
                    body.len(),
                    data::sha256(&body)
                )),
                Err(e) => failures.push(format!("GET manifest {}:{reference}: {e}", m.repo)),
            }
        }
    }
    for (_, m) in std::mem::take(&mut ledger.pending_manifests) {
        match reg.try_get_manifest(&m.repo, &m.tag).await {
            Ok((st, _, _, _)) if st == StatusCode::NOT_FOUND => {}
            Ok((st, _, _, body)) if st == StatusCode::OK && body == m.bytes => ledger.manifests.push(m),
            Ok((st, _, _, body)) => failures.push(format!(
                "manifest {}:{} cut by the kill is neither absent nor intact: {st}, {} bytes",
                m.repo,
                m.tag,
                body.len()
            )),
            Err(e) => failures.push(format!("GET manifest {}:{}: {e}", m.repo, m.tag)),
        }
    }

    // Upload sessions.
    let sessions = std::mem::take(&mut ledger.sessions);
    for (i, (sid, mut s)) in sessions.into_iter().enumerate() {
        let status = reg.try_session_status(&s.loc).await;
        match s.state.clone() {
            SessState::Idle => {
                ledger.stats.idle_sessions_checked += 1;
                match status {
                    Ok((st, range)) if st == StatusCode::NO_CONTENT && (s.acked == 0 || range == Some(s.acked)) => {}
                    other => {
                        failures.push(format!(
                            "idle session {} (last PATCH got 202 with Range 0-{}, {} restart(s) ago): GET gave {other:?}, \
                             expected 204 with Range 0-{}\n    on disk: {}",
                            s.loc,
                            s.acked as i64 - 1,
                            s.restarts + 1,
                            s.acked as i64 - 1,
                            disk_report(root, &s)
                        ));
                        continue;
                    }
                }
                if s.restarts >= 1 {
                    ledger.stats.idle_sessions_multi_restart += 1;
                }
                if complete_all || i % 2 == 0 {
                    match complete_session(reg, &s, s.acked).await {
                        Ok(()) => {
                            ledger.stats.sessions_completed_after_restart += 1;
                            ledger.blobs.push(s.blob(true));
                        }
                        Err(e) => failures.push(e),
                    }
                } else {
                    s.restarts += 1;
                    ledger.sessions.insert(sid, s);
                }
            }
            SessState::Patching { len } => {
                ledger.stats.cut_patches_checked += 1;
                // The client never learnt the fate of its last PATCH, so the server may drop the
                // session (404, as CNCF Distribution does); if it keeps it, it keeps at least the
                // acknowledged bytes.
                let k = match status {
                    Ok((st, _)) if st == StatusCode::NOT_FOUND => {
                        ledger.stats.cut_sessions_dropped += 1;
                        continue;
                    }
                    Ok((st, range)) if st == StatusCode::NO_CONTENT => {
                        // "0-0" is how an empty session is usually reported.
                        let k = match range {
                            None => 0,
                            Some(1) if s.acked == 0 => 0,
                            Some(k) => k,
                        };
                        if k < s.acked || k > s.acked + len {
                            failures.push(format!(
                                "session {} with a PATCH cut by the kill (acknowledged {} bytes, {len} in flight): \
                                 Range reports {k} bytes",
                                s.loc, s.acked
                            ));
                            continue;
                        }
                        k
                    }
                    other => {
                        failures.push(format!(
                            "session {} with {} acknowledged bytes (a PATCH of {len} was cut by the kill): \
                             GET gave {other:?}, expected 204 or 404",
                            s.loc, s.acked
                        ));
                        continue;
                    }
                };
                // Whatever prefix the server kept must be exactly the bytes sent: completing the
                // session from `k` has to produce the right digest.
                match complete_session(reg, &s, k).await {
                    Ok(()) => {
                        ledger.stats.sessions_completed_after_restart += 1;
                        ledger.blobs.push(s.blob(true));
                    }
                    Err(e) => failures.push(format!("cut session resumed at {k}: {e}")),
                }
            }
            SessState::Finishing => {
                ledger.stats.cut_finishes_checked += 1;
                let b = s.blob(true);
                match reg.try_head_blob(&s.repo, &s.digest).await {
                    Ok(st) if st == StatusCode::OK => match check_blob(reg, &b).await {
                        Ok(()) => ledger.blobs.push(b),
                        Err(e) => failures.push(format!("blob of a PUT cut by the kill: {e}")),
                    },
                    // Not in the repository: the commit did not happen. The session may be gone
                    // (the client never saw a 201), but if it still answers it must be whole and
                    // completable.
                    Ok(st) if st == StatusCode::NOT_FOUND => match status {
                        Ok((st, _)) if st == StatusCode::NOT_FOUND => ledger.stats.cut_sessions_dropped += 1,
                        Ok((st, range)) if st == StatusCode::NO_CONTENT && range == Some(s.len) => {
                            match reg.try_finish(&s.loc, &s.digest, None).await {
                                Ok(()) => match check_blob(reg, &b).await {
                                    Ok(()) => {
                                        ledger.stats.sessions_completed_after_restart += 1;
                                        ledger.blobs.push(b)
                                    }
                                    Err(e) => failures.push(e),
                                },
                                Err(e) => failures.push(format!(
                                    "PUT ?digest on {} was cut by the kill; after the restart HEAD of the blob in \
                                     {} is 404 and GET on the session answers 204 with Range 0-{} (complete), but \
                                     re-sending the PUT fails: {e}\n    on disk: {}",
                                    s.loc,
                                    s.repo,
                                    s.len - 1,
                                    disk_report(root, &s)
                                )),
                            }
                        }
                        other => failures.push(format!(
                            "PUT ?digest on {} was cut by the kill; the blob is absent and the session answers \
                             {other:?}, expected 404, or 204 with Range 0-{}",
                            s.loc,
                            s.len - 1
                        )),
                    },
                    other => failures.push(format!("HEAD /v2/{}/blobs/{}: {other:?}", s.repo, s.digest)),
                }
            }
        }
    }
    ledger.failures.extend(failures);
}

/// What the store holds for a session and its blob, for failure messages.
fn disk_report(root: &Path, s: &SessRec) -> String {
    let hex = s.digest.strip_prefix("sha256:").unwrap_or(&s.digest);
    let blob = root.join("blobs").join("sha256").join(&hex[..2]).join(hex);
    let id = s.loc.split('?').next().unwrap_or("").rsplit('/').next().unwrap_or("").to_string();
    let mut found = Vec::new();
    let mut stack = vec![root.join("ingest")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            if p.is_dir() {
                if rel.contains(&id) {
                    let names: Vec<String> = std::fs::read_dir(&p)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| {
                            format!(
                                "{} ({} bytes)",
                                e.file_name().to_string_lossy(),
                                e.metadata().map(|m| m.len()).unwrap_or(0)
                            )
                        })
                        .collect();
                    found.push(format!("{rel}/ holds {names:?}"));
                } else {
                    stack.push(p);
                }
            } else if rel.contains(&id) {
                found.push(rel);
            }
        }
    }
    format!(
        "blobs/sha256/{}/{hex} {}; ingest entries for session {id}: {found:?}",
        &hex[..2],
        if blob.exists() { "exists" } else { "does not exist" }
    )
}

fn fail_if_any(ledger: &Ledger, when: &str) {
    if !ledger.failures.is_empty() {
        let shown: Vec<&String> = ledger.failures.iter().take(25).collect();
        panic!(
            "{} failure(s) {when}; stats {:?}:\n  {}",
            ledger.failures.len(),
            ledger.stats,
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
        );
    }
}

#[test]
fn sigkill_during_concurrent_pushes_loses_nothing_acknowledged() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    for (round, &kill_after_ms) in KILL_AFTER_MS.iter().enumerate() {
        let mut server = Stevedore::builder().root(&root).start();
        let reg = Registry::with_timeout(&server.url(""), Duration::from_secs(180));
        {
            let mut l = ledger.lock().unwrap();
            rt.block_on(verify(&reg, &root, &mut l, false));
            fail_if_any(&l, &format!("after restart {round}"));
        }

        let ctx = Ctx {
            reg: reg.clone(),
            ledger: ledger.clone(),
            killed: Arc::new(AtomicBool::new(false)),
            budget: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        };
        let mut tasks = Vec::new();
        for w in 0..3 {
            tasks.push(rt.spawn(chunked_writer(ctx.clone(), round, w, false)));
        }
        tasks.push(rt.spawn(chunked_writer(ctx.clone(), round, 3, true)));
        tasks.push(rt.spawn(monolithic_writer(ctx.clone(), round, 4)));
        tasks.push(rt.spawn(manifest_writer(ctx.clone(), round, 5)));

        std::thread::sleep(Duration::from_millis(kill_after_ms));
        ctx.killed.store(true, Ordering::SeqCst);
        server.kill();

        rt.block_on(async {
            for t in tasks {
                match tokio::time::timeout(Duration::from_secs(60), t).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("writer task panicked: {e}"),
                    Err(_) => panic!("a writer did not stop within 60 s of the kill"),
                }
            }
        });
        let mut l = ledger.lock().unwrap();
        l.stats.files_checked_on_disk += assert_blobs_intact(&root);
        fail_if_any(&l, &format!("during round {round}"));
        let open: Vec<_> = l.sessions.values().map(|s| (&s.state, s.acked)).collect();
        eprintln!(
            "crash round {round}: killed after {} ms; {} blobs and {} manifests acknowledged so far; open sessions {:?}",
            kill_after_ms,
            l.blobs.len(),
            l.manifests.len(),
            open
        );
    }

    // Final restart: everything is checked in full and every session is completed.
    let server = Stevedore::builder().root(&root).start();
    let reg = Registry::with_timeout(&server.url(""), Duration::from_secs(180));
    let mut l = ledger.lock().unwrap();
    rt.block_on(verify(&reg, &root, &mut l, true));
    fail_if_any(&l, "after the final restart");
    assert!(l.sessions.is_empty(), "sessions left open: {:?}", l.sessions);
    l.stats.blobs_committed = l.blobs.len();
    l.stats.manifests_committed = l.manifests.len();
    drop(server);
    l.stats.files_checked_on_disk += assert_blobs_intact(&root);
    eprintln!("crash test: {:?} in {:.1} s", l.stats, t0.elapsed().as_secs_f64());

    // The test must have exercised what it claims to check.
    assert!(l.stats.blobs_committed >= 10, "too few acknowledged blobs: {:?}", l.stats);
    assert!(l.stats.manifests_committed >= 3, "too few acknowledged manifests: {:?}", l.stats);
    assert!(l.stats.idle_sessions_checked >= ROUNDS, "too few idle sessions checked: {:?}", l.stats);
    assert!(l.stats.idle_sessions_multi_restart >= 1, "no session was checked across two restarts: {:?}", l.stats);
}

/// The `state.json` of every ingest under `<root>/ingest`, as (ingest dir, state).
fn ingest_states(root: &Path) -> Vec<(std::path::PathBuf, serde_json::Value)> {
    let mut out = Vec::new();
    for dir in common::store::ingest_leftovers(root) {
        let Ok(raw) = std::fs::read(dir.join("state.json")) else { continue };
        if let Ok(v) = serde_json::from_slice(&raw) {
            out.push((dir, v));
        }
    }
    out
}

/// An HTTP/2 client resets its stream mid-PATCH while a batch of that PATCH is still being
/// written (held back by the test hook `STEVEDORE_TEST_DELAY_WRITE_MS`), and the next request
/// on the session (the final PUT) sends other bytes. The late write must not land over the next chunk: the
/// committed blob holds exactly the bytes of its digest, on disk and when served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_reset_mid_patch_never_lets_a_late_write_corrupt_the_next_chunk() {
    const HOLD_MS: u64 = 1500;
    let sd = Stevedore::builder().env("STEVEDORE_TEST_DELAY_WRITE_MS", &HOLD_MS.to_string()).start();
    let reg = sd.registry();
    let repo = "h2/reset";
    let loc = reg.start_upload(repo).await;

    // PATCH over HTTP/2 (prior knowledge on the plain listener): 3 MiB, so that a full batch
    // is on its way to the file when the stream is reset.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", sd.port())).await.unwrap();
    let (h2c, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2c = h2c.ready().await.expect("h2 ready");
    let req = http::Request::builder()
        .method("PATCH")
        .uri(reg.url(&loc))
        .header("content-type", "application/octet-stream")
        .body(())
        .unwrap();
    let (resp, mut stream) = h2c.send_request(req, false).expect("h2 request");
    stream.send_data(bytes::Bytes::from(data::bytes(7001, 3 << 20)), false).expect("h2 data");
    let held =
        common::wait_until(Duration::from_secs(30), || sd.log_text().contains("test hook: batch write held back"))
            .await;
    assert!(held, "no batch write was held back by the test hook:\n{}", sd.log_text());
    stream.send_reset(h2::Reason::CANCEL);
    drop(resp);

    // The session as the server reports it now, then other bytes from that offset.
    let r = reg.send(reg.req(reqwest::Method::GET, &loc)).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "GET of the session after the reset");
    let range = common::http::hdr(r.headers(), "range");
    assert_eq!(range.as_deref(), Some("0-0"), "a PATCH that was reset must not be acknowledged");
    let second = data::bytes(7002, 512 << 10);
    let digest = data::sha256(&second);
    // The final PUT carries the bytes: no reopening of the session between them and the
    // commit could cut a late write off.
    let body = Some((second.len() as u64, Body::from(second.clone())));
    reg.try_finish(&loc, &digest, body).await.unwrap_or_else(|e| panic!("PUT after the reset: {e}"));

    // Every held-back write has landed (a late one included), then check.
    let landed = common::wait_until(Duration::from_secs(30), || {
        let log = sd.log_text();
        log.matches("test hook: held-back batch landed").count()
            == log.matches("test hook: batch write held back").count()
    })
    .await;
    assert!(landed, "held-back writes did not land:\n{}", sd.log_text());
    reg.assert_blob(repo, &digest, &second).await;
    let path = common::store::blob_path(sd.root(), &digest);
    let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(on_disk.len(), second.len(), "blob file size on disk");
    assert!(on_disk == second, "the blob file on disk is not the bytes of its digest");
    assert!(assert_blobs_intact(sd.root()) >= 1);
}

/// A proxy fill writes through the same writer as an upload: both leave the same kind of
/// resumable ingest (`ingest/<id>/{data,state.json}`), and a SIGKILL mid-fill leaves nothing
/// under `blobs/` that does not hash to its name. After the restart the upload resumes where
/// it was acknowledged and the blob fills again from the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_and_upload_share_the_ingest_writer_and_a_kill_mid_fill_commits_nothing() {
    use common::fake::{Fake, Plan};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let fake = Fake::start().await;
    let blob = data::bytes(7101, 6 << 20);
    let d = fake.add_blob(&blob);
    // The first GET trickles (about 5 s for the whole blob); later ones are plain.
    fake.plan(&d, Plan::new(blob.clone()).slow(256 << 10, Duration::from_millis(200)));
    let cfg = common::stevedore::config("up.test", &[("up.test", &fake.url(), "")]).replacen(
        "[proxy]\n",
        "[proxy]\nlocal_namespaces = [\"local/*\"]\n",
        1,
    );
    let mut sd = Stevedore::builder().config(&cfg).root(&root).start();
    let reg = sd.registry();

    // An upload session with 1.5 MiB acknowledged, left idle.
    let part = data::bytes(7102, 3 << 19);
    let loc = reg.start_upload("local/app").await;
    let (loc, acked) =
        reg.try_patch(&loc, 0, part.len() as u64, Body::from(part.clone())).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(acked, part.len() as u64);

    // A fill, caught mid-way.
    let url = sd.url(&format!("/v2/library/base/blobs/{d}"));
    let getter = tokio::spawn(common::http::read(common::http::client().get(url)));
    let mid_fill = common::wait_until(Duration::from_secs(30), || {
        ingest_states(&root).iter().any(|(dir, s)| {
            s["kind"] == "fill" && std::fs::metadata(dir.join("data")).map(|m| m.len() >= 1 << 20).unwrap_or(false)
        })
    })
    .await;
    assert!(mid_fill, "no fill ingest with 1 MiB of data appeared: {:?}", ingest_states(&root));

    let states = ingest_states(&root);
    let fill = states.iter().find(|(_, s)| s["kind"] == "fill").expect("fill ingest");
    let upload = states.iter().find(|(_, s)| s["kind"] == "upload").expect("upload ingest");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v.as_object().unwrap().keys().filter(|k| !["repo", "digest"].contains(&k.as_str())).cloned().collect()
    };
    assert_eq!(keys(&fill.1), keys(&upload.1), "fill and upload states differ in shape: {fill:?} / {upload:?}");
    assert_eq!(fill.1["digest"], d.as_str(), "the fill's state names its digest");
    assert!(upload.1["repo"].as_str().unwrap_or_default().ends_with("local/app"), "{upload:?}");
    assert_eq!(upload.1["offset"], part.len() as u64, "the upload's checkpoint");
    for (dir, s) in [fill, upload] {
        assert_eq!(s["alg"], "sha256", "{s}");
        assert!(dir.join("data").is_file(), "{} has no data file", dir.display());
    }

    sd.kill();
    let r = getter.await.unwrap();
    assert!(r.error.is_some() || r.body.len() < blob.len(), "a whole body was served although the fill was killed");
    assert!(!common::store::blob_path(&root, &d).exists(), "a blob killed mid-fill is under blobs/");
    assert_blobs_intact(&root);

    // Restart: the blob fills again, the upload resumes at its checkpoint.
    let sd = Stevedore::builder().config(&cfg).root(&root).start();
    let reg = sd.registry();
    reg.assert_blob("library/base", &d, &blob).await;
    assert_eq!(fake.count("GET", &format!("/v2/library/base/blobs/{d}")), 2, "upstream GETs");
    let (status, offset) = reg.try_session_status(&Registry::path_of(&loc)).await.expect("session status");
    assert_eq!((status, offset), (StatusCode::NO_CONTENT, Some(part.len() as u64)), "upload after the restart");
    let rest = data::bytes(7103, 1 << 20);
    let whole = [part.clone(), rest.clone()].concat();
    let body = Some((rest.len() as u64, Body::from(rest)));
    reg.try_finish(&Registry::path_of(&loc), &data::sha256(&whole), body).await.unwrap_or_else(|e| panic!("{e}"));
    reg.assert_blob("local/app", &data::sha256(&whole), &whole).await;
    assert!(assert_blobs_intact(&root) >= 2);
}
