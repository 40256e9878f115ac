//! What operators look at: `GET /status` (a server-rendered HTML page, no script, nothing
//! loaded from elsewhere: it works air-gapped) and `GET /status.json` (the same data), behind
//! `auth.status`.
//!
//! Everything shown is already in memory: the figures of [`recorder`] (recorded where the
//! work happens), the configuration, the fills in flight and the store's running estimate of
//! proxied bytes. Rendering never walks the store and never contacts an upstream (an
//! upstream's state is the outcome of its last request).
//!
//! Layering: the recorder (`crate::status`) is plain numbers and uses nothing of the crate
//! (any layer records into it, as into `metrics`); this module and [`page`] are HTTP and read
//! the [`App`] and the registry layer.

pub mod page;

use crate::status as recorder;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::App;

/// Repositories listed as the most pulled.
pub const TOP_REPOSITORIES: usize = 10;

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    /// This replica's id.
    pub replica: String,
    pub offline: bool,
    pub store: StoreStatus,
    pub cache: CacheStatus,
    pub upstreams: Vec<UpstreamStatus>,
    pub fills: Vec<FillStatus>,
    pub lifecycle: LifecycleStatus,
    pub replicas: Vec<ReplicaStatus>,
    pub top_repositories: Vec<RepoPulls>,
    /// Hits and misses per minute over the last hour, oldest first.
    pub last_hour: Vec<MinuteStatus>,
}

#[derive(Debug, Serialize)]
pub struct StoreStatus {
    pub backend: &'static str,
    pub used_bytes: UsedBytes,
    /// Whether `used_bytes` comes from a usage check (false: none ran yet; proxied bytes are
    /// then only what was filled since the start).
    pub measured: bool,
    pub max_size: Option<u64>,
    pub high_watermark: Option<u64>,
    pub low_watermark: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct UsedBytes {
    pub proxied: u64,
    pub pushed: u64,
    pub imported: u64,
    /// Held by ingests (upload sessions, fills) now: counted against the cap, not evictable.
    pub ingest: u64,
}

#[derive(Debug, Serialize)]
pub struct CacheStatus {
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: Option<f64>,
    pub hit_ratio_1h: Option<f64>,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
    pub bytes_from_cache_1h: u64,
    pub bytes_from_upstream_1h: u64,
}

#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    pub host: String,
    /// The outcome of the last request sent there; `None`: none was sent yet.
    pub reachable: Option<bool>,
    pub last_error: Option<String>,
    pub last_request_age_seconds: Option<u64>,
    pub ratelimit_remaining: Option<u64>,
    pub tokens: Vec<TokenStatus>,
}

/// A cached upstream token: its scope and time left, never its value.
#[derive(Debug, Serialize)]
pub struct TokenStatus {
    pub scope: String,
    pub expires_in_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct FillStatus {
    pub digest: String,
    pub repository: String,
    pub bytes: u64,
    pub followers: usize,
}

#[derive(Debug, Serialize)]
pub struct LifecycleStatus {
    /// Unix seconds of the last usage check (eviction pass), if any ran.
    pub last_run: Option<u64>,
    pub evicted_bytes: u64,
    pub gc_last_run: Option<u64>,
    pub gc_reclaimed_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub id: String,
    pub heartbeat_age_seconds: u64,
    /// This process.
    pub this: bool,
}

#[derive(Debug, Serialize)]
pub struct RepoPulls {
    pub name: String,
    pub pulls: u64,
}

#[derive(Debug, Serialize)]
pub struct MinuteStatus {
    pub minutes_ago: u64,
    pub hits: u64,
    pub misses: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn ratio(hits: u64, misses: u64) -> Option<f64> {
    let all = hits + misses;
    (all > 0).then(|| hits as f64 / all as f64)
}

impl Status {
    /// The status now, from memory only.
    pub fn of(app: &App) -> Status {
        let rec = recorder::get();
        let usage = rec.usage_figures();
        // Between usage checks the proxied figure is the store's running estimate.
        let proxied = app.registry.proxied_estimate();
        let proxied = if usage.measured { proxied.max(usage.proxied) } else { proxied };
        let max = app.cfg.cache.max_size.map(|m| m.0);
        let hour = rec.last_hour();
        let (h1, m1) = hour.iter().fold((0, 0), |(h, m), x| (h + x.hits, m + x.misses));
        let now_minute = hour.last().map_or(0, |m| m.index);
        let mut states = rec.upstreams();
        let mut upstreams = Vec::new();
        for host in app.registry.upstream_hosts() {
            let s = states.remove(&host).unwrap_or_default();
            upstreams.push(upstream_status(&host, s));
        }
        let lc = rec.lifecycle();
        let mut replicas = vec![ReplicaStatus { id: app.registry.replica_id(), heartbeat_age_seconds: 0, this: true }];
        replicas.extend(rec.replicas_seen().into_iter().map(|r| ReplicaStatus {
            id: r.id,
            heartbeat_age_seconds: (r.age + r.at.elapsed()).as_secs(),
            this: false,
        }));
        let mut fills: Vec<FillStatus> = app
            .registry
            .fills_in_flight()
            .into_iter()
            .map(|(d, repository, bytes, followers)| FillStatus { digest: d.to_string(), repository, bytes, followers })
            .collect();
        fills.sort_by(|a, b| a.digest.cmp(&b.digest));
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: rec.uptime().as_secs(),
            replica: app.registry.replica_id(),
            offline: app.registry.is_offline(),
            store: StoreStatus {
                backend: match app.cfg.storage.backend {
                    crate::config::BackendKind::Fs => "fs",
                    crate::config::BackendKind::S3 => "s3",
                },
                used_bytes: UsedBytes {
                    proxied,
                    pushed: usage.pushed,
                    imported: usage.imported,
                    ingest: app.registry.ingest_bytes(),
                },
                measured: usage.measured,
                max_size: max,
                high_watermark: max.map(|m| app.cfg.cache.high_watermark.bytes(m)),
                low_watermark: max.map(|m| app.cfg.cache.low_watermark.bytes(m)),
            },
            cache: CacheStatus {
                hits: rec.hits(),
                misses: rec.misses(),
                hit_ratio: ratio(rec.hits(), rec.misses()),
                hit_ratio_1h: ratio(h1, m1),
                bytes_from_cache: rec.bytes_from_cache(),
                bytes_from_upstream: rec.bytes_from_upstream(),
                bytes_from_cache_1h: hour.iter().map(|m| m.bytes_from_cache).sum(),
                bytes_from_upstream_1h: hour.iter().map(|m| m.bytes_from_upstream).sum(),
            },
            upstreams,
            fills,
            lifecycle: LifecycleStatus {
                last_run: lc.last_run.map(unix),
                evicted_bytes: lc.evicted_bytes,
                gc_last_run: lc.gc_last_run.map(unix),
                gc_reclaimed_bytes: lc.gc_reclaimed_bytes,
            },
            replicas,
            top_repositories: rec
                .top_repositories(TOP_REPOSITORIES)
                .into_iter()
                .map(|(name, pulls)| RepoPulls { name, pulls })
                .collect(),
            last_hour: hour
                .iter()
                .map(|m| MinuteStatus { minutes_ago: now_minute - m.index, hits: m.hits, misses: m.misses })
                .collect(),
        }
    }
}

/// `/status` and `/status.json` behind `auth.status`: by default `admin` when users are
/// configured, `open` otherwise. Without users, `admin` accepts the admin token
/// (`auth.admin_token_file`) and `authenticated` nobody.
pub(super) async fn gate(app: &App, parts: &axum::http::request::Parts) -> Result<(), crate::error::ApiError> {
    let level = app.cfg.auth.status.unwrap_or(match app.auth {
        Some(_) => crate::config::MetricsAccess::Admin,
        None => crate::config::MetricsAccess::Open,
    });
    if level == crate::config::MetricsAccess::Open {
        return Ok(());
    }
    if app.admin_token.as_ref().is_some_and(|t| t.presented_in(&parts.headers)) {
        return Ok(());
    }
    match &app.auth {
        Some(a) => a.operator_allowed(parts, level, "log in to read the status page").await,
        None => Err(crate::error::ApiError::new(crate::error::Code::Unauthorized)
            .detail("the status page needs the admin token (auth.status)")),
    }
}

fn upstream_status(host: &str, s: recorder::UpstreamState) -> UpstreamStatus {
    let now = std::time::Instant::now();
    UpstreamStatus {
        host: host.to_string(),
        reachable: s.reachable,
        last_error: s.last_error,
        last_request_age_seconds: s.last_at.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
        ratelimit_remaining: s.ratelimit_remaining,
        tokens: s
            .tokens
            .into_iter()
            .filter(|(_, e)| *e > now)
            .map(|(scope, e)| TokenStatus { scope, expires_in_seconds: e.saturating_duration_since(now).as_secs() })
            .collect(),
    }
}

/// `1.5 GiB`, `12 KiB`, `300 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `3d 4h`, `5m 2s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humans() {
        assert_eq!(human_bytes(300), "300 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m 5s");
        assert_eq!(human_duration(Duration::from_secs(90000)), "1d 1h");
    }
}
