//! `stevedore prefetch [REF...]`: fills the cache from the configured upstreams with a list of
//! references (tags, digests, tag patterns such as `docker.io/library/nginx:1.27*`), for every
//! platform or the ones asked for, with their referrers (signatures, SBOMs, attestations)
//! unless turned off; `POST /admin/prefetch` runs the same [`Registry::prefetch`]. It goes
//! through the same code as a client's pull, in process: manifests through the proxy's
//! single-flight verified fetch (exact bytes), blobs through the repository check of a hit
//! ([`Registry::cached`]) and the proxy's single-flight verified fill. What the store already
//! has is not fetched again, so an interrupted prefetch completes when run again.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use super::Registry;
use crate::oci::image_ref::{wanted, ImageRef, Platform, RefError, Selector};
use crate::oci::manifest::{self, Kind};
use crate::oci::{Digest, Reference, Tag};
use crate::proxy::fill::Fill;
use crate::proxy::{tags_from_upstream, Outcome, Proxy, ProxyRepo, Target};
use crate::upstream::UpstreamError;

/// `12.3 MB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub struct PrefetchOptions<'a> {
    pub refs: &'a [String],
    /// Empty: every platform.
    pub platforms: &'a [Platform],
    pub referrers: bool,
    /// Draw a live status line per image on stderr while it is a terminal (the CLI); off in
    /// the server, whose stderr is its log.
    pub live: bool,
}

/// What a prefetch did, per reference.
#[derive(Debug, Default)]
pub struct PrefetchReport {
    pub ok: Vec<String>,
    /// (reference, why)
    pub failed: Vec<(String, String)>,
    pub manifests: usize,
    pub blobs_fetched: usize,
    pub bytes_fetched: u64,
    pub blobs_cached: usize,
}

/// Blobs of one image filled at once.
const PARALLEL_BLOBS: usize = 4;

impl Registry {
    /// Prefetches every reference; progress lines go to `out`.
    pub async fn prefetch(&self, opts: &PrefetchOptions<'_>, out: &mut (dyn Write + Send)) -> PrefetchReport {
        prefetch(self, opts, out).await
    }
}

async fn prefetch(reg: &Registry, opts: &PrefetchOptions<'_>, out: &mut (dyn Write + Send)) -> PrefetchReport {
    let proxy = &reg.proxy;
    let mut report = PrefetchReport::default();
    for r in opts.refs {
        let targets = match expand(proxy, r).await {
            Ok(t) => t,
            Err(why) => {
                let _ = writeln!(out, "FAILED {r}: {why}");
                report.failed.push((r.clone(), why));
                continue;
            }
        };
        for (p, reference) in targets {
            let shown = match &reference {
                Reference::Tag(t) => format!("{}:{t}", p.cache),
                Reference::Digest(d) => format!("{}@{d}", p.cache),
            };
            let _ = writeln!(out, "{shown}");
            match one(reg, &p, &reference, opts, out, &mut report).await {
                Ok(d) => {
                    let _ = writeln!(out, "ok {shown} {d}");
                    report.ok.push(shown);
                }
                Err(why) => {
                    let _ = writeln!(out, "FAILED {shown}: {why}");
                    report.failed.push((shown, why));
                }
            }
        }
    }
    report
}

/// The upstream repository and references a command-line reference stands for (a tag
/// pattern: every matching tag the upstream lists).
async fn expand(proxy: &Proxy, r: &str) -> Result<Vec<(ProxyRepo, Reference)>, String> {
    let parsed: ImageRef = r.parse().map_err(|e: RefError| e.why)?;
    let p = match proxy.named(parsed.host.as_deref(), &parsed.name) {
        Some(Target::Proxy { repo, .. }) => repo,
        Some(Target::Local(_)) => {
            return Err("names a local repository, not an upstream's: nothing to prefetch".into());
        }
        None => {
            return Err(format!("{} is not a configured upstream", parsed.host.as_deref().unwrap_or_default()));
        }
    };
    let refs = match parsed.selector {
        Selector::Tag(t) => vec![Reference::Tag(t)],
        Selector::None => vec![Reference::Tag("latest".parse().expect("latest is a tag"))],
        Selector::Digest(d) => vec![Reference::Digest(d)],
        Selector::Pattern(pat) => {
            crate::oci::glob::check(&pat).map_err(|e| e.to_string())?;
            let (_, body) = p
                .upstream
                .get_json(&p.remote, &format!("/v2/{}/tags/list", p.remote))
                .await
                .map_err(|e| format!("listing the upstream's tags: {e}"))?;
            let tags = tags_from_upstream(&body).ok_or("the upstream's tag list is not valid")?;
            // A long tag list is CPU work: off the async workers, which keep serving.
            let pattern = pat.clone();
            let found: Vec<Reference> = tokio::task::spawn_blocking(move || {
                tags.iter()
                    .filter(|t| crate::oci::glob::matches(&pattern, t))
                    .filter_map(|t| t.parse::<Tag>().ok())
                    .map(Reference::Tag)
                    .collect()
            })
            .await
            .map_err(|e| format!("matching the upstream's tags: {e}"))?;
            if found.is_empty() {
                return Err(format!("no tag upstream matches {pat}"));
            }
            found
        }
    };
    Ok(refs.into_iter().map(|r| (p.clone(), r)).collect())
}

/// Prefetches one reference: its manifest, the children asked for, every blob, referrers.
async fn one(
    reg: &Registry,
    p: &ProxyRepo,
    reference: &Reference,
    opts: &PrefetchOptions<'_>,
    out: &mut (dyn Write + Send),
    report: &mut PrefetchReport,
) -> Result<Digest, String> {
    crate::hooks::pause("prefetch.reference").await;
    let (store, proxy) = (&reg.store, &reg.proxy);
    let (root, _, _) = proxy.manifest(store, p, reference).await.map_err(|e| e.to_string())?;
    let mut stack = vec![root.clone()];
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let (_, outcome, _) =
            proxy.manifest(store, p, &Reference::Digest(d.clone())).await.map_err(|e| format!("manifest {d}: {e}"))?;
        report.manifests += 1;
        let Some((info, bytes)) = store.read_manifest(&p.cache, &d).await.map_err(|e| e.to_string())? else {
            return Err(format!("manifest {d} is not in the store after its fill"));
        };
        let _ = writeln!(out, "  manifest {d} {}", if outcome == Outcome::Hit { "cached" } else { "fetched" });
        let m = manifest::parse(&bytes, Some(&info.media_type)).map_err(|e| format!("manifest {d}: {e}"))?;
        match m.kind {
            Kind::Image => {
                let blobs: Vec<(Digest, u64)> = m
                    .config
                    .iter()
                    .chain(&m.layers)
                    .filter(|b| !b.embedded && !b.is_non_distributable())
                    .map(|b| (b.digest.clone(), b.size))
                    .collect();
                let live = Live::start(&d, blobs.len(), opts.live);
                let mut results = futures::stream::iter(blobs.into_iter().map(|(b, _)| {
                    let live = live.clone();
                    async move { (b.clone(), blob(reg, p, &b, &live).await) }
                }))
                .buffer_unordered(PARALLEL_BLOBS);
                let mut failed = None;
                while let Some((b, res)) = results.next().await {
                    match res {
                        Ok(Fetched::Cached) => {
                            report.blobs_cached += 1;
                            let _ = writeln!(out, "  blob {b} cached");
                        }
                        Ok(Fetched::Bytes(n)) => {
                            report.blobs_fetched += 1;
                            report.bytes_fetched += n;
                            let _ = writeln!(out, "  blob {b} fetched {}", human_bytes(n));
                        }
                        Err(e) => {
                            let _ = writeln!(out, "  blob {b} FAILED: {e}");
                            failed.get_or_insert(format!("blob {b}: {e}"));
                        }
                    }
                }
                live.stop();
                if let Some(f) = failed {
                    return Err(f);
                }
            }
            Kind::Index => {
                let raw: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                for c in raw["manifests"].as_array().into_iter().flatten() {
                    if !wanted(opts.platforms, c) {
                        continue;
                    }
                    if let Some(cd) = c["digest"].as_str().and_then(|s| s.parse::<Digest>().ok()) {
                        stack.push(cd);
                    }
                }
            }
        }
        if opts.referrers {
            for r in referrers(reg, p, &d).await? {
                stack.push(r);
            }
        }
    }
    Ok(root)
}

enum Fetched {
    Cached,
    Bytes(u64),
}

/// Makes sure the blob is in `p`'s cache: already linked, linked because the same bytes are
/// in the store and the upstream serves them there, or filled (joining a fill in flight).
async fn blob(reg: &Registry, p: &ProxyRepo, d: &Digest, live: &Live) -> Result<Fetched, String> {
    let store = &reg.store;
    if reg.cached(p, d).await.map_err(|e| e.to_string())? {
        live.done(0);
        return Ok(Fetched::Cached);
    }
    let (fill, _) = reg.proxy.fill(store, p, d);
    live.watch(&fill);
    let res = fill.finished().await;
    live.unwatch(&fill);
    res.map_err(|e| e.to_string())?;
    let size = store.blob_size(d).await.map_err(|e| e.to_string())?.unwrap_or(0);
    live.done(size);
    Ok(Fetched::Bytes(size))
}

/// A status line for one image's blobs (blobs done, bytes received), redrawn on stderr while
/// it is a terminal; nothing otherwise (the plain lines on stdout say it all).
#[derive(Clone)]
struct Live(Option<Arc<LiveState>>);

struct LiveState {
    label: String,
    total: usize,
    blobs: AtomicUsize,
    bytes: AtomicU64,
    fills: Mutex<Vec<Arc<Fill>>>,
    stop: tokio::sync::Notify,
}

impl Live {
    fn start(manifest: &Digest, total: usize, wanted: bool) -> Live {
        if !wanted || !std::io::stderr().is_terminal() {
            return Live(None);
        }
        let state = Arc::new(LiveState {
            label: format!("{}…", &manifest.to_string()[..19]),
            total,
            blobs: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            fills: Mutex::new(Vec::new()),
            stop: tokio::sync::Notify::new(),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = s.stop.notified() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                let partial: u64 = s.fills.lock().unwrap().iter().map(|f| f.progress().0).sum();
                let bytes = s.bytes.load(Ordering::Relaxed) + partial;
                eprint!(
                    "\r\x1b[K  {} {}/{} blobs, {}",
                    s.label,
                    s.blobs.load(Ordering::Relaxed),
                    s.total,
                    human_bytes(bytes)
                );
            }
            eprint!("\r\x1b[K");
        });
        Live(Some(state))
    }

    fn watch(&self, f: &Arc<Fill>) {
        if let Some(s) = &self.0 {
            s.fills.lock().unwrap().push(f.clone());
        }
    }

    fn unwatch(&self, f: &Arc<Fill>) {
        if let Some(s) = &self.0 {
            s.fills.lock().unwrap().retain(|x| !Arc::ptr_eq(x, f));
        }
    }

    fn done(&self, bytes: u64) {
        if let Some(s) = &self.0 {
            s.blobs.fetch_add(1, Ordering::Relaxed);
            s.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    fn stop(&self) {
        if let Some(s) = &self.0 {
            s.stop.notify_one();
        }
    }
}

/// The referrers of `d` upstream: the referrers API, else the tag schema (`sha256-<hex>`, an
/// index of the referrers) for registries without it. Fetching the tag caches it as well.
async fn referrers(reg: &Registry, p: &ProxyRepo, d: &Digest) -> Result<Vec<Digest>, String> {
    let (store, proxy) = (&reg.store, &reg.proxy);
    let digests = |v: &Value| -> Vec<Digest> {
        v["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["digest"].as_str().and_then(|s| s.parse().ok()))
            .collect()
    };
    match p.upstream.get_json(&p.remote, &format!("/v2/{}/referrers/{d}", p.remote)).await {
        Ok((ct, body)) if ct.as_deref().is_some_and(|c| c.contains("json")) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if v["manifests"].is_array() {
                return Ok(digests(&v));
            }
        }
        Ok(_) | Err(UpstreamError::NotFound) | Err(UpstreamError::Status(400..=499)) => {}
        Err(e) => return Err(format!("referrers of {d}: {e}")),
    }
    let Ok(tag) = format!("{}-{}", d.algorithm().as_str(), d.hex()).parse::<Tag>() else { return Ok(Vec::new()) };
    match proxy.manifest(store, p, &Reference::Tag(tag)).await {
        Ok((fallback, _, _)) => {
            let Some((_, bytes)) = store.read_manifest(&p.cache, &fallback).await.map_err(|e| e.to_string())? else {
                return Ok(Vec::new());
            };
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok(digests(&v))
        }
        Err(e) if matches!(&*e, crate::proxy::ProxyError::Upstream(UpstreamError::NotFound)) => Ok(Vec::new()),
        Err(e) => Err(format!("referrers of {d} (tag schema): {e}")),
    }
}
