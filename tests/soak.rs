//! A randomized, seeded soak of the store's promise "201 means stored" (issue #22, item 9;
//! docs: /work/shared/INTEGRITY.md): one server on a filesystem store with a tiny cache cap,
//! a short usage check and online GC on short timers, in front of the scripted fake upstream
//! (tests/common/fake.rs) serving a few small images that share layers. Each step runs 2–4
//! operations at once:
//!
//! - pushes to local repositories (`local/app<k>`) of images sharing layers with each other
//!   and with the upstream's images: each blob monolithic, in one `PUT`, in `PATCH` chunks or
//!   by cross-repository mount, sometimes after a `HEAD` that finds it (docker's way), then the
//!   manifest `PUT` under a new tag;
//! - pulls through the cache of the upstream's images (manifest by tag, every blob), in the
//!   three ways clients name an upstream;
//! - manifest `DELETE`s by digest (the image is no longer expected);
//! - an offline `stevedore gc` beside the live server (at three random steps): it should exit 2
//!   naming the live server; an exit 0 (it ran) is recorded, the invariants are checked after
//!   it, and the seed fails at its end;
//! - a `kill -9` of the server during a random step, and a restart on the same store.
//!
//! After every step:
//! 1. every manifest acknowledged 201 and not deleted by a client pulls back complete: by
//!    digest and by each of its tags, and every blob it references, full bytes, right digest;
//! 2. nothing unverified is visible: every file under `blobs/` hashes to its name;
//!
//! and every 25 steps and at the end, once every fill has ended and two usage checks have run
//! since:
//! 3. proxied content on disk (every blob but what a local repository links or holds, and
//!    what a live pushed image needs) is at most the cap.
//!
//! Operations never sleep to order a race: they run at once, and the seed picks what runs
//! together. A manifest `PUT` refused `MANIFEST_BLOB_UNKNOWN` right after every blob of it was
//! acknowledged 201 (within `gc_grace`) also fails the seed.
//!
//! `STEVEDORE_SOAK_SEEDS=N` (default 3) seeds of `STEVEDORE_SOAK_SECS=S` (default 20) seconds
//! each, and at least [`MIN_OPS`] operations and one kill each; seeds are random unless
//! `STEVEDORE_SOAK_SEED=<n>[,<n>…]` names them. A failure prints its seed, the violated
//! invariant, the last [`LOG_LINES`] operations and the server's warnings, and keeps the
//! store's directory.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::data::{bytes, sha256, Rng};
use common::fake::Fake;
use common::http::{error_chain, hdr, Registry, MANIFEST_ACCEPT};
use common::oci::{Blob, MT_CONFIG, MT_LAYER_GZIP, MT_MANIFEST};
use common::stevedore::{cli, config, Dialect, Stevedore, DIALECTS};
use common::store::{blob_problems_live, blob_sizes_live, ingest_leftovers, local_repo_digests};
use futures::future::{join_all, BoxFuture, FutureExt};
use reqwest::header::CONTENT_LENGTH;
use reqwest::{Body, Method};
use serde_json::json;

const HOST: &str = "up.test";
/// `[cache] max_size`: one or two of the upstream's images, so that most pulls evict.
const CAP: u64 = 160 << 10;
const GC_GRACE: Duration = Duration::from_secs(3);
const MIN_OPS: usize = 300;
const LOG_LINES: usize = 30;
/// Local repositories pushed to.
const REPOS: u64 = 6;
/// At most this many steps per seed, whatever the clock says.
const MAX_STEPS: usize = 5000;
/// Live pushed images past which deletes are favoured.
const LIVE_SOFT_MAX: usize = 10;
/// The invariant of the cap is checked every this many steps.
const SETTLE_EVERY: usize = 25;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The seeds to run: `STEVEDORE_SOAK_SEED`, else `STEVEDORE_SOAK_SEEDS` random ones.
fn seeds() -> Vec<u64> {
    if let Ok(list) = std::env::var("STEVEDORE_SOAK_SEED") {
        return list
            .split(',')
            .map(|s| {
                let s = s.trim();
                let parsed = match s.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => s.parse(),
                };
                parsed.unwrap_or_else(|_| panic!("STEVEDORE_SOAK_SEED: {s:?} is not a number"))
            })
            .collect();
    }
    let n = env_u64("STEVEDORE_SOAK_SEEDS", 3);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut rng = Rng::new(nanos ^ u64::from(std::process::id()) << 32);
    (0..n).map(|_| rng.next_u64() >> 16).collect()
}

// -------------------------------------------------------------------------------------------
// Content: the upstream's images and the images pushed, sharing layers

/// An image: its config and layers (config first), and its manifest.
#[derive(Clone, Debug)]
struct Img {
    blobs: Vec<Blob>,
    manifest: Blob,
}

fn image(config: Blob, layers: Vec<Blob>) -> Img {
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    }))
    .unwrap();
    let mut blobs = vec![config];
    blobs.extend(layers);
    Img { blobs, manifest: Blob::new(MT_MANIFEST, manifest) }
}

fn config_blob(seed: u64, name: &str) -> Blob {
    let c = json!({"architecture": "amd64", "os": "linux", "config": {"Env": [format!("IMG={name}"), format!("SEED={seed}")]},
        "rootfs": {"type": "layers", "diff_ids": []}});
    Blob::new(MT_CONFIG, serde_json::to_vec(&c).unwrap())
}

struct Content {
    seed: u64,
    /// Served by the upstream as `team/u<i>:v1`.
    upstream: Vec<Img>,
    /// The upstream images' layers.
    up_layers: Vec<Blob>,
    /// Those and layers only ever pushed.
    all_layers: Vec<Blob>,
}

/// `n` different blobs of `pool`.
fn pick(pool: &[Blob], n: u64, rng: &mut Rng) -> Vec<Blob> {
    let mut out: Vec<Blob> = Vec::new();
    while out.len() < n as usize {
        let b = &pool[rng.range(0, pool.len() as u64 - 1) as usize];
        if !out.iter().any(|o| o.digest == b.digest) {
            out.push(b.clone());
        }
    }
    out
}

impl Content {
    fn new(seed: u64, rng: &mut Rng) -> Content {
        let layer = |tag: u64, i: u64, size: u64| {
            Blob::new(MT_LAYER_GZIP, bytes(seed.wrapping_mul(1000) + tag + i, size as usize))
        };
        let up_layers: Vec<Blob> = (0..16).map(|i| layer(100, i, rng.range(16 << 10, 64 << 10))).collect();
        let local_layers: Vec<Blob> = (0..8).map(|i| layer(200, i, rng.range(4 << 10, 32 << 10))).collect();
        let upstream =
            (0..8).map(|i| image(config_blob(seed, &format!("u{i}")), pick(&up_layers, 2, rng))).collect::<Vec<_>>();
        let all_layers: Vec<Blob> = up_layers.iter().chain(&local_layers).cloned().collect();
        Content { seed, upstream, up_layers, all_layers }
    }

    /// An image to push (its config names `i`): on `base` if given, else most on an upstream
    /// layer (a base image pulled through the mirror), plus one to three layers of any kind.
    fn recipe(&self, i: usize, base: Option<Blob>, rng: &mut Rng) -> Img {
        let n = rng.range(1, 3);
        let mut layers = match base {
            Some(b) => vec![b],
            None if rng.range(0, 2) > 0 => pick(&self.up_layers, 1, rng),
            None => Vec::new(),
        };
        for b in pick(&self.all_layers, n, rng) {
            if !layers.iter().any(|l| l.digest == b.digest) {
                layers.push(b);
            }
        }
        image(config_blob(self.seed, &format!("r{i}")), layers)
    }
}

// -------------------------------------------------------------------------------------------
// Operations

/// How a push sends one blob.
#[derive(Clone, Debug)]
enum Mode {
    Monolithic,
    OnePut,
    Chunked(usize),
    Mount(String),
}

#[derive(Clone, Debug)]
enum Op {
    Push { repo: String, recipe: usize, img: Img, tag: String, modes: Vec<Mode>, head_first: bool },
    Pull { image: usize, dialect: Dialect },
    Delete { repo: String, digest: String },
    OfflineGc,
}

/// What an operation changed in what is expected.
#[derive(Debug)]
enum Effect {
    None,
    Pushed {
        repo: String,
        digest: String,
        recipe: usize,
        tag: String,
    },
    Deleted {
        repo: String,
        digest: String,
    },
    /// A delete whose answer was lost: the manifest may or may not be there.
    MaybeDeleted {
        repo: String,
        digest: String,
    },
    GcRan,
}

struct Done {
    line: String,
    effect: Effect,
    /// The broken promise, if any.
    violation: Option<String>,
    /// No (complete) answer: expected only when the server was killed during the step.
    transport: bool,
}

impl Done {
    fn ok(line: String, effect: Effect) -> Done {
        Done { line, effect, violation: None, transport: false }
    }
    fn broken(line: String, violation: String) -> Done {
        Done { line, effect: Effect::None, violation: Some(violation), transport: false }
    }
    fn lost(line: String, effect: Effect) -> Done {
        Done { line, effect, violation: None, transport: true }
    }
}

/// A GET read to its end: `Err` for a transport error (with its chain).
async fn get(reg: &Registry, path: &str, manifest: bool) -> Result<(u16, Option<String>, Vec<u8>), String> {
    let mut rb = reg.req(Method::GET, path);
    if manifest {
        rb = rb.header("accept", MANIFEST_ACCEPT);
    }
    let resp = rb.send().await.map_err(|e| error_chain(&e))?;
    let st = resp.status().as_u16();
    let dcd = hdr(resp.headers(), "docker-content-digest");
    let body = resp.bytes().await.map_err(|e| error_chain(&e))?.to_vec();
    Ok((st, dcd, body))
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    s.chars().take(300).collect()
}

/// `GET path` must answer 200 with exactly `want`'s bytes (and its digest in
/// `Docker-Content-Digest`). `Err(None)`: transport error; `Err(Some(msg))`: wrong answer.
async fn expect_content(reg: &Registry, path: &str, want: &Blob, manifest: bool) -> Result<(), Option<String>> {
    let (st, dcd, body) = get(reg, path, manifest).await.map_err(|_| None)?;
    if st != 200 {
        return Err(Some(format!("GET {path} → {st}: {}", snippet(&body))));
    }
    let got = sha256(&body);
    if got != want.digest || body != want.data {
        return Err(Some(format!(
            "GET {path} → 200 with {} bytes hashing to {got}, expected {} bytes of {}",
            body.len(),
            want.size(),
            want.digest
        )));
    }
    if dcd.as_deref() != Some(want.digest.as_str()) {
        return Err(Some(format!("GET {path} → 200, Docker-Content-Digest {dcd:?}, expected {}", want.digest)));
    }
    Ok(())
}

/// Sends one blob of a push; `Ok(true)` when it was acknowledged 201 (or mounted), `Ok(false)`
/// when a `HEAD` found it and nothing was sent.
async fn push_blob(
    reg: &Registry,
    repo: &str,
    b: &Blob,
    mode: &Mode,
    head_first: bool,
) -> Result<bool, (bool, String)> {
    let transport = |e: reqwest::Error| (true, error_chain(&e));
    let proto = |e: common::http::HttpErr| (e.is_transport(), e.to_string());
    if head_first {
        let st = reg.try_head_blob(repo, &b.digest).await.map_err(proto)?;
        if st.as_u16() == 200 {
            return Ok(false);
        }
    }
    let d = &b.digest;
    match mode {
        Mode::Monolithic => reg.try_post_monolithic(repo, d, b.data.clone()).await.map_err(proto)?,
        Mode::OnePut => {
            let loc = reg.try_start_upload(repo).await.map_err(proto)?;
            let body = Some((b.size() as u64, Body::from(b.data.clone())));
            reg.try_finish(&loc, d, body).await.map_err(proto)?;
        }
        Mode::Chunked(n) => {
            let loc = reg.try_start_upload(repo).await.map_err(proto)?;
            let step = b.size().div_ceil(*n).max(1);
            let mut loc = loc;
            let mut at = 0usize;
            while at < b.size() {
                let end = (at + step).min(b.size());
                let body = Body::from(b.data[at..end].to_vec());
                (loc, _) = reg.try_patch(&loc, at as u64, (end - at) as u64, body).await.map_err(proto)?;
                at = end;
            }
            reg.try_finish(&loc, d, None).await.map_err(proto)?;
        }
        Mode::Mount(from) => {
            let path = format!("/v2/{repo}/blobs/uploads/?mount={d}&from={from}");
            let resp = reg.req(Method::POST, &path).header(CONTENT_LENGTH, "0").send().await.map_err(transport)?;
            match resp.status().as_u16() {
                201 => {}
                202 => {
                    // Not mountable (any more): the session it opened takes the blob.
                    let loc = hdr(resp.headers(), "location").unwrap_or_default();
                    let body = Some((b.size() as u64, Body::from(b.data.clone())));
                    reg.try_finish(&loc, d, body).await.map_err(proto)?;
                }
                st => {
                    let body = resp.text().await.unwrap_or_default();
                    return Err((false, format!("POST {path} → {st}: {body}")));
                }
            }
        }
    }
    Ok(true)
}

async fn run_op(reg: Registry, content: Arc<Content>, op: Op, gc_cmd: Arc<(PathBuf, PathBuf, u32)>) -> Done {
    match op {
        Op::Push { repo, recipe, img, tag, modes, head_first } => {
            let what = format!("push r{recipe} to {repo}:{tag} ({modes:?}, head first: {head_first})");
            let mut acked = Vec::new();
            let mut skipped = Vec::new();
            for (b, mode) in img.blobs.iter().zip(&modes) {
                match push_blob(&reg, &repo, b, mode, head_first).await {
                    Ok(true) => acked.push(Instant::now()),
                    Ok(false) => skipped.push(b.digest.clone()),
                    Err((true, e)) => return Done::lost(format!("{what}: blob {}: {e}", b.digest), Effect::None),
                    Err((false, e)) => {
                        return Done::broken(format!("{what}: blob refused"), format!("{what}: blob {}: {e}", b.digest))
                    }
                }
            }
            let m = &img.manifest;
            match reg.try_put_manifest(&repo, &tag, MT_MANIFEST, m.data.clone()).await {
                Ok(_) => Done::ok(
                    format!("{what}: 201 {} (HEAD found {} blobs)", m.digest, skipped.len()),
                    Effect::Pushed { repo, digest: m.digest.clone(), recipe, tag },
                ),
                Err(e) if e.is_transport() => Done::lost(format!("{what}: manifest PUT: {e}"), Effect::None),
                Err(e) => {
                    let msg = e.to_string();
                    let oldest = acked.iter().min().map(|t| t.elapsed());
                    let fresh = oldest.is_some_and(|age| age < GC_GRACE);
                    if msg.contains("MANIFEST_BLOB_UNKNOWN") && skipped.is_empty() && fresh {
                        Done::broken(
                            format!("{what}: manifest refused"),
                            format!(
                                "{what}: every blob was acknowledged 201 (the first {:?} ago, gc_grace {GC_GRACE:?}), \
                                 then the manifest PUT was refused: {msg}",
                                oldest.unwrap()
                            ),
                        )
                    } else if msg.contains("MANIFEST_BLOB_UNKNOWN") {
                        // A blob a HEAD found (or acknowledged longer than gc_grace ago) may be
                        // collected before the manifest needs it.
                        Done::ok(format!("{what}: manifest refused (HEAD-found {skipped:?}): {msg}"), Effect::None)
                    } else {
                        Done::broken(format!("{what}: manifest refused"), format!("{what}: manifest PUT: {msg}"))
                    }
                }
            }
        }
        Op::Pull { image, dialect } => {
            let img = &content.upstream[image];
            let repo = format!("team/u{image}");
            let what = format!("pull {repo}:v1 ({dialect:?})");
            let path = dialect.path(HOST, &repo, "manifests/v1");
            if let Err(e) = expect_content(&reg, &path, &img.manifest, true).await {
                return match e {
                    None => Done::lost(format!("{what}: manifest: transport error"), Effect::None),
                    Some(e) => Done::broken(format!("{what}: manifest wrong"), format!("pull through the cache: {e}")),
                };
            }
            for b in &img.blobs {
                let path = dialect.path(HOST, &repo, &format!("blobs/{}", b.digest));
                if let Err(e) = expect_content(&reg, &path, b, false).await {
                    return match e {
                        None => Done::lost(format!("{what}: blob {}: transport error", b.digest), Effect::None),
                        Some(e) => Done::broken(format!("{what}: blob wrong"), format!("pull through the cache: {e}")),
                    };
                }
            }
            Done::ok(format!("{what}: ok"), Effect::None)
        }
        Op::Delete { repo, digest } => {
            let what = format!("DELETE {repo}@{digest}");
            let path = format!("/v2/{repo}/manifests/{digest}");
            match reg.req(Method::DELETE, &path).send().await {
                Err(e) => Done::lost(format!("{what}: {}", error_chain(&e)), Effect::MaybeDeleted { repo, digest }),
                Ok(r) if r.status().as_u16() == 202 => {
                    Done::ok(format!("{what}: 202"), Effect::Deleted { repo, digest })
                }
                Ok(r) => {
                    let st = r.status().as_u16();
                    let body = r.text().await.unwrap_or_default();
                    Done::broken(
                        format!("{what}: {st}"),
                        format!("{what}: a manifest acknowledged 201 and not deleted → {st}: {body}"),
                    )
                }
            }
        }
        Op::OfflineGc => {
            let (cfg, root, pid) = (gc_cmd.0.clone(), gc_cmd.1.clone(), gc_cmd.2);
            let out = tokio::task::spawn_blocking(move || {
                cli(&["gc", "--config", s(&cfg), "--root", s(&root)], Duration::from_secs(60))
            })
            .await
            .unwrap();
            let code = out.status.code();
            let last = |t: &str| t.lines().last().unwrap_or_default().to_string();
            match code {
                Some(2) if out.stderr.contains(&pid.to_string()) || out.stdout.contains(&pid.to_string()) => {
                    Done::ok(format!("offline gc: refused (exit 2): {}", last(&out.stderr)), Effect::None)
                }
                Some(2) => Done::broken(
                    "offline gc: exit 2 without naming the server".into(),
                    format!(
                        "offline gc beside the live server (pid {pid}) exited 2 without naming it:\n{}",
                        out.describe()
                    ),
                ),
                Some(0) => Done::ok(
                    format!("offline gc: RAN beside the live server (exit 0): {}", last(&out.stdout)),
                    Effect::GcRan,
                ),
                Some(1) if out.stderr.contains("garbage collection not run") => {
                    Done::ok(format!("offline gc: not run (exit 1): {}", last(&out.stderr)), Effect::None)
                }
                _ => Done::broken(
                    format!("offline gc: exit {code:?}"),
                    format!("offline gc beside the live server: unexpected outcome:\n{}", out.describe()),
                ),
            }
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// -------------------------------------------------------------------------------------------
// The soak of one seed

/// A manifest pushed and not deleted: its recipe and tags.
#[derive(Debug, Default)]
struct Live {
    recipe: usize,
    tags: BTreeSet<String>,
}

struct Soak {
    seed: u64,
    rng: Rng,
    content: Arc<Content>,
    /// Images pushed so far (a push picks one, or makes a new one).
    recipes: Vec<Img>,
    /// The step each upstream image was last pulled at.
    pulled: Vec<Option<usize>>,
    dir: PathBuf,
    root: PathBuf,
    cfg: String,
    sd: Stevedore,
    /// When the running server was started (what a killed one left is older).
    started: std::time::SystemTime,
    /// (repo, manifest digest) → what is expected of it.
    live: BTreeMap<(String, String), Live>,
    log: VecDeque<String>,
    step: usize,
    ops: usize,
    kills: usize,
    gc_ran: Vec<usize>,
    tags: usize,
}

impl Soak {
    fn note(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(format!("step {:>3}: {line}", self.step));
    }

    fn fail(&mut self, what: &str) -> ! {
        let dir = self.dir.clone();
        let log: Vec<String> = self.log.iter().cloned().collect();
        let problems = self.sd.problems();
        let problems: Vec<&str> = problems.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        panic!(
            "soak seed {seed} (rerun: STEVEDORE_SOAK_SEED={seed}) broke at step {step} ({ops} operations, {kills} kills, \
             offline gc ran beside the server at steps {gc:?}):\n{what}\n\n--- the last {n} operations\n{log}\n\n\
             --- the server's last warnings\n{problems}\n\nstore and logs kept in {dir}",
            seed = self.seed,
            step = self.step,
            ops = self.ops,
            kills = self.kills,
            gc = self.gc_ran,
            n = log.len(),
            log = log.join("\n"),
            problems = problems.join("\n"),
            dir = dir.display(),
        )
    }

    fn start(dir: &Path, cfg: &str, root: &Path) -> Stevedore {
        Stevedore::builder().dir(dir).config(cfg).root(root).rust_log("warn,stevedore::access=warn").start()
    }

    fn next_tag(&mut self) -> String {
        self.tags += 1;
        format!("t{}", self.tags)
    }

    /// The operations of one step, at most one per local repository.
    fn plan(&mut self, gc: bool) -> Vec<Op> {
        let n = self.rng.range(2, 4) as usize;
        let mut ops = Vec::new();
        let mut busy: BTreeSet<String> = BTreeSet::new();
        if gc {
            ops.push(Op::OfflineGc);
        }
        while ops.len() < n {
            let roll = self.rng.range(0, 99);
            let delete_share = if self.live.len() >= LIVE_SOFT_MAX { 45 } else { 15 };
            if roll < delete_share && !self.live.is_empty() {
                let candidates: Vec<(String, String)> =
                    self.live.keys().filter(|(r, _)| !busy.contains(r)).cloned().collect();
                if candidates.is_empty() {
                    continue;
                }
                let (repo, digest) = candidates[self.rng.range(0, candidates.len() as u64 - 1) as usize].clone();
                busy.insert(repo.clone());
                ops.push(Op::Delete { repo, digest });
            } else if roll < 60 {
                let repo = format!("local/app{}", self.rng.range(0, REPOS - 1));
                if !busy.insert(repo.clone()) {
                    continue;
                }
                // A new image now and then (its upstream layer may be cached and proxied only:
                // the push races eviction), else one pushed before (and maybe deleted since).
                if self.recipes.len() < 12 || self.rng.range(0, 2) == 0 {
                    // Half of them on a layer of the least recently pulled upstream image: the
                    // next eviction's first pick (a CI job building FROM a base it pulled).
                    let lru = self.pulled.iter().enumerate().filter_map(|(i, at)| at.map(|at| (at, i))).min();
                    let base = match lru {
                        Some((_, i)) if self.rng.range(0, 1) == 0 => {
                            let layers = &self.content.upstream[i].blobs[1..];
                            Some(layers[self.rng.range(0, layers.len() as u64 - 1) as usize].clone())
                        }
                        _ => None,
                    };
                    let img = self.content.recipe(self.recipes.len(), base, &mut self.rng);
                    self.recipes.push(img);
                }
                let recipe = self.rng.range(0, self.recipes.len() as u64 - 1) as usize;
                let img = self.recipes[recipe].clone();
                let modes = img
                    .blobs
                    .iter()
                    .map(|b| match self.rng.range(0, 3) {
                        0 => Mode::Monolithic,
                        1 => Mode::OnePut,
                        2 => Mode::Chunked(self.rng.range(2, 3) as usize),
                        _ => {
                            // From another repository whose live manifest needs it, if any.
                            let from: Vec<String> = self
                                .live
                                .iter()
                                .filter(|((r, _), l)| {
                                    r != &repo && self.recipes[l.recipe].blobs.iter().any(|x| x.digest == b.digest)
                                })
                                .map(|((r, _), _)| r.clone())
                                .collect();
                            match from.first() {
                                Some(f) => Mode::Mount(f.clone()),
                                None => Mode::OnePut,
                            }
                        }
                    })
                    .collect();
                let head_first = self.rng.range(0, 1) == 1;
                let tag = self.next_tag();
                ops.push(Op::Push { repo, recipe, img, tag, modes, head_first });
            } else {
                let image = self.rng.range(0, self.content.upstream.len() as u64 - 1) as usize;
                let dialect = DIALECTS[self.rng.range(0, 2) as usize];
                self.pulled[image] = Some(self.step);
                ops.push(Op::Pull { image, dialect });
            }
        }
        ops
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Pushed { repo, digest, recipe, tag } => {
                let live = self.live.entry((repo, digest)).or_insert_with(|| Live { recipe, tags: BTreeSet::new() });
                live.tags.insert(tag);
            }
            Effect::Deleted { repo, digest } | Effect::MaybeDeleted { repo, digest } => {
                self.live.remove(&(repo, digest));
            }
            Effect::GcRan => self.gc_ran.push(self.step),
        }
    }

    /// Invariants 1 and 2; the violations found.
    async fn check(&self) -> Vec<String> {
        let reg = self.sd.registry();
        let mut checks: Vec<BoxFuture<'_, Option<String>>> = Vec::new();
        for ((repo, digest), live) in &self.live {
            let img = &self.recipes[live.recipe];
            let what =
                format!("{repo}@{digest} (r{}, tags {:?}), acknowledged 201 and not deleted", live.recipe, live.tags);
            let mut gets: Vec<(String, &Blob, bool)> =
                vec![(format!("/v2/{repo}/manifests/{digest}"), &img.manifest, true)];
            for t in &live.tags {
                gets.push((format!("/v2/{repo}/manifests/{t}"), &img.manifest, true));
            }
            for b in &img.blobs {
                gets.push((format!("/v2/{repo}/blobs/{}", b.digest), b, false));
            }
            for (path, want, manifest) in gets {
                let (reg, what) = (reg.clone(), what.clone());
                checks.push(
                    async move {
                        match expect_content(&reg, &path, want, manifest).await {
                            Ok(()) => None,
                            Err(None) => Some(format!("{what}: GET {path}: transport error")),
                            Err(Some(e)) => Some(format!("{what}: {e}")),
                        }
                    }
                    .boxed(),
                );
            }
        }
        let mut out: Vec<String> = join_all(checks).await.into_iter().flatten().collect();
        let root = self.root.clone();
        let (_, problems) = tokio::task::spawn_blocking(move || blob_problems_live(&root)).await.unwrap();
        out.extend(problems.into_iter().map(|p| format!("unverified content visible: {p}")));
        out
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, _, body) = get(&self.sd.registry(), "/metrics", false).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split(' ').nth(1)?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Invariant 3, at rest: once every fill has ended and two usage checks ran since, the
    /// proxied content on disk is at most the cap.
    async fn check_cap(&mut self) {
        // Fills in progress of this server (upload sessions, and what a killed server left,
        // stay until swept).
        let since = self.started;
        let fills = |root: &Path| -> Vec<PathBuf> {
            ingest_leftovers(root)
                .into_iter()
                .filter(|p| p.is_dir())
                .filter(|p| {
                    !std::fs::read_to_string(p.join("state.json")).unwrap_or_default().contains("\"kind\":\"upload\"")
                })
                .filter(|p| {
                    let touched = |f: &Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
                    let last = [touched(p), touched(&p.join("data")), touched(&p.join("state.json"))]
                        .into_iter()
                        .flatten()
                        .max();
                    last.is_none_or(|t| t >= since)
                })
                .collect()
        };
        let end = Instant::now() + Duration::from_secs(30);
        while !fills(&self.root).is_empty() {
            if Instant::now() > end {
                let left = fills(&self.root);
                self.fail(&format!("fills did not end within 30 s at rest: {left:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let name = "stevedore_cache_usage_checks_total";
        let c0 = self.metric(name).await;
        let end = Instant::now() + Duration::from_secs(20);
        while self.metric(name).await < c0 + 2.0 {
            if Instant::now() > end {
                self.fail(&format!("{name} did not advance by 2 within 20 s (from {c0})"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Pinned: what a local repository links or holds, and what a live image needs.
        let mut pinned = local_repo_digests(&self.root);
        for ((_, digest), live) in &self.live {
            pinned.insert(digest.clone());
            pinned.extend(self.recipes[live.recipe].blobs.iter().map(|b| b.digest.clone()));
        }
        let blobs = blob_sizes_live(&self.root);
        let proxied: Vec<&(String, u64)> = blobs.iter().filter(|(d, _)| !pinned.contains(d)).collect();
        let bytes: u64 = proxied.iter().map(|(_, n)| n).sum();
        let pinned_bytes: u64 = blobs.iter().map(|(_, n)| n).sum::<u64>() - bytes;
        self.note(format!(
            "at rest: proxied {bytes} bytes in {} blobs (cap {CAP}), pinned {pinned_bytes} bytes",
            proxied.len()
        ));
        if bytes > CAP {
            // The server's own view, for the message.
            let (_, _, body) = get(&self.sd.registry(), "/metrics", false).await.unwrap_or_default();
            let text = String::from_utf8_lossy(&body).into_owned();
            let server: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("stevedore_store_used_bytes") || l.starts_with("stevedore_cache_"))
                .collect();
            // How much of it the upstream's images that share a layer with a pushed image hold
            // (an eviction that keeps such an image whole cannot go under the cap).
            let on_disk: BTreeMap<&String, u64> = proxied.iter().map(|(d, n)| (d, *n)).collect();
            let mut shared: BTreeMap<&String, u64> = BTreeMap::new();
            let mut images = Vec::new();
            for (i, img) in self.content.upstream.iter().enumerate() {
                if img.blobs.iter().any(|b| pinned.contains(&b.digest)) {
                    let held: Vec<&String> = img
                        .blobs
                        .iter()
                        .map(|b| &b.digest)
                        .chain([&img.manifest.digest])
                        .filter(|d| on_disk.contains_key(d))
                        .collect();
                    if !held.is_empty() {
                        images.push(format!("team/u{i}"));
                    }
                    shared.extend(held.into_iter().map(|d| (d, on_disk[d])));
                }
            }
            let shared_bytes: u64 = shared.values().sum();
            self.fail(&format!(
                "usage above the cap at rest: {bytes} bytes of proxied content on disk (cap {CAP}, pinned {pinned_bytes} \
                 bytes apart) after two usage checks; {shared_bytes} of them are the proxied part of cached images that \
                 share a layer with a pushed image ({images:?});\nthe proxied blobs: {proxied:?}\nthe server's \
                 metrics:\n{}",
                server.join("\n")
            ));
        }
    }

    async fn run(seed: u64, secs: u64) {
        let tmp = tempfile::Builder::new().prefix(&format!("stevedore-soak-{seed}-")).tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let root = dir.join("store");
        let mut rng = Rng::new(seed);
        let content = Arc::new(Content::new(seed, &mut rng));
        let upstream_images = content.upstream.len();
        let fake = Fake::start().await;
        for (i, img) in content.upstream.iter().enumerate() {
            for b in &img.blobs {
                fake.add_blob(&b.data);
            }
            let d = fake.add_manifest(MT_MANIFEST, &img.manifest.data);
            fake.set_tag(&format!("team/u{i}"), "v1", &d);
        }
        let cfg = config(HOST, &[(HOST, &fake.url(), "tag_ttl = \"1h\"")]).replacen(
            "[proxy]\n",
            "[proxy]\nlocal_namespaces = [\"local/*\"]\n",
            1,
        ) + &format!(
            "\n[cache]\nmax_size = {CAP}\ncheck_interval = \"100ms\"\naccess_flush_interval = \"100ms\"\n\
             gc_interval = \"2s\"\ngc_grace = \"{}s\"\n",
            GC_GRACE.as_secs()
        );
        let started = std::time::SystemTime::now();
        let sd = Soak::start(&dir, &cfg, &root);
        let mut soak = Soak {
            seed,
            rng,
            content,
            recipes: Vec::new(),
            pulled: vec![None; upstream_images],
            dir: dir.clone(),
            root,
            cfg,
            sd,
            started,
            live: BTreeMap::new(),
            log: VecDeque::new(),
            step: 0,
            ops: 0,
            kills: 0,
            gc_ran: Vec::new(),
            tags: 0,
        };
        // At least MIN_OPS / 4 steps run: the kill and the offline GCs fall within them.
        let kill_at = soak.rng.range(10, 60) as usize;
        let first_gc = soak.rng.range(5, 30) as usize;
        let gc_at = [first_gc, first_gc + soak.rng.range(5, 20) as usize, first_gc + soak.rng.range(25, 40) as usize];
        let t0 = Instant::now();
        let soft = Duration::from_secs(secs);
        let hard = Duration::from_secs(secs * 4 + 120);
        // A panic keeps the directory (fail() says where).
        let tmp = tmp.keep();
        while (soak.ops < MIN_OPS || t0.elapsed() < soft || soak.kills == 0) && soak.step < MAX_STEPS {
            if t0.elapsed() > hard {
                soak.fail(&format!("only {} operations in {hard:?}: the soak cannot keep its minimum", soak.ops));
            }
            soak.step += 1;
            let ops = soak.plan(gc_at.contains(&soak.step));
            let kill = soak.step == kill_at || (soak.step > kill_at && soak.kills == 0);
            let kill_after = Duration::from_millis(soak.rng.range(0, 60));
            let reg = soak.sd.registry();
            let gc_cmd = Arc::new((soak.sd.config.clone().unwrap(), soak.root.clone(), soak.sd.pid()));
            let futs: Vec<_> =
                ops.iter().map(|op| run_op(reg.clone(), soak.content.clone(), op.clone(), gc_cmd.clone())).collect();
            let pid = soak.sd.pid() as i32;
            let killer = async move {
                if kill {
                    tokio::time::sleep(kill_after).await;
                    // SAFETY: a signal to the server this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            };
            let (results, ()) = tokio::join!(join_all(futs), killer);
            soak.ops += results.len();
            let mut violations = Vec::new();
            for done in results {
                soak.note(done.line);
                if done.transport && !kill {
                    violations
                        .push(format!("no answer though the server was not killed: {}", soak.log.back().unwrap()));
                }
                violations.extend(done.violation);
                soak.apply(done.effect);
            }
            if kill {
                soak.sd.kill();
                soak.kills += 1;
                soak.ops += 1;
                soak.note(format!("kill -9 after {kill_after:?}; restart on the same store"));
                soak.started = std::time::SystemTime::now();
                soak.sd = Soak::start(&soak.dir, &soak.cfg, &soak.root);
            }
            if !violations.is_empty() {
                soak.fail(&violations.join("\n"));
            }
            let broken = soak.check().await;
            if !broken.is_empty() {
                let n = broken.len();
                let shown: Vec<String> = broken.into_iter().take(12).collect();
                soak.fail(&format!("after the step, {n} checks failed:\n{}", shown.join("\n")));
            }
            if soak.step.is_multiple_of(SETTLE_EVERY) {
                soak.check_cap().await;
            }
        }
        soak.check_cap().await;
        if !soak.gc_ran.is_empty() {
            soak.fail(&format!(
                "`stevedore gc` ran (exit 0) beside the live server at steps {:?}: expected exit 2 naming it \
                 (every other invariant held)",
                soak.gc_ran
            ));
        }
        eprintln!(
            "soak: seed {seed}: {} steps, {} operations, {} kills in {:.1} s; {} images live, {} blobs on disk; invariants held",
            soak.step,
            soak.ops,
            soak.kills,
            t0.elapsed().as_secs_f64(),
            soak.live.len(),
            blob_sizes_live(&soak.root).len()
        );
        drop(soak);
        drop(fake);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_soak_keeps_every_acknowledged_image_whole() {
    let secs = env_u64("STEVEDORE_SOAK_SECS", 20);
    let seeds = seeds();
    eprintln!("soak: seeds {seeds:?}, {secs} s each (at least {MIN_OPS} operations and one kill -9 each)");
    for seed in seeds {
        eprintln!("soak: seed {seed} (rerun: STEVEDORE_SOAK_SEED={seed})");
        Soak::run(seed, secs).await;
    }
}
