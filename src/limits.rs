//! Limits that keep one client from hurting the rest: a request rate per client address
//! (`[server.rate_limit]`) and caps on open upload sessions, in all and per client address
//! (`uploads.max_sessions`, `uploads.max_sessions_per_client`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::cluster::Cluster;
use crate::config::{RateLimitConfig, UploadsConfig};
use crate::error::{ApiError, Code};
use crate::storage::{Store, UploadId};

/// The address of the client that sent a request; the server puts it on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl ClientAddr {
    pub fn new(ip: IpAddr) -> ClientAddr {
        ClientAddr(ip.to_canonical())
    }
}

/// A token bucket per client address, as GCRA: each address has a theoretical arrival time
/// that every admitted request moves one interval on; a request that would move it more than
/// `burst` intervals ahead of now is refused.
pub struct RateLimiter {
    rate: f64,
    interval_ns: u64,
    tolerance_ns: u64,
    epoch: Instant,
    /// Addresses quiet for longer than a full bucket's refill are forgotten (their bucket would
    /// be full again anyway), so the map stays bounded by the addresses active recently.
    clients: moka::sync::Cache<IpAddr, Arc<AtomicU64>>,
}

impl RateLimiter {
    pub fn new(cfg: &RateLimitConfig) -> Option<RateLimiter> {
        if !cfg.enabled() {
            return None;
        }
        let interval_ns = ((1e9 / cfg.requests_per_second).ceil() as u64).max(1);
        let tolerance_ns = interval_ns.saturating_mul(u64::from(cfg.burst()));
        let idle = Duration::from_nanos(tolerance_ns) + Duration::from_secs(1);
        Some(RateLimiter {
            rate: cfg.requests_per_second,
            interval_ns,
            tolerance_ns,
            epoch: Instant::now(),
            clients: moka::sync::Cache::builder().max_capacity(100_000).time_to_idle(idle).build(),
        })
    }

    /// Admits one request from `ip`, or says how long until one would be admitted.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let tat = self.clients.get_with(ip, || Arc::new(AtomicU64::new(0)));
        let mut cur = tat.load(Ordering::Relaxed);
        loop {
            let next = cur.max(now) + self.interval_ns;
            let ahead = next - now;
            if ahead > self.tolerance_ns {
                return Err(Duration::from_nanos(ahead - self.tolerance_ns));
            }
            match tat.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => cur = seen,
            }
        }
    }
}

/// The rate limit middleware's state: the limiter, and the fleet whose replicas' relayed
/// requests it lets through.
#[derive(Clone)]
pub struct RateLimited {
    pub limiter: Arc<RateLimiter>,
    pub cluster: Arc<Cluster>,
}

/// Middleware: `429 TOOMANYREQUESTS` with `Retry-After` (whole seconds) for a client over its
/// rate. Health checks are never limited.
pub async fn rate_limit(State(state): State<RateLimited>, req: Request, next: Next) -> Response {
    let limiter = &state.limiter;
    if let Some(ClientAddr(ip)) = req.extensions().get::<ClientAddr>() {
        // Other replicas relay many clients' pulls from one address: their requests (with the
        // fleet's secret) are limited where the clients arrived.
        let peer =
            req.uri().path().starts_with(crate::cluster::PEER_PREFIX) && state.cluster.peer_authorized(req.headers());
        if !peer && !matches!(req.uri().path(), "/healthz" | "/readyz") {
            if let Err(wait) = limiter.check(*ip) {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                return ApiError::new(Code::TooManyRequests)
                    .detail(format!(
                        "more than {} requests per second from {ip} (server.rate_limit); retry in {secs} s",
                        limiter.rate
                    ))
                    .header(header::RETRY_AFTER, secs)
                    .into_response();
            }
        }
    }
    next.run(req).await
}

/// Caps on open upload sessions. Sessions live in the store (they survive restarts); this
/// keeps which address opened the ones this process started, and counts the store's
/// sessions only when a cap is near, so admitting a session is cheap.
pub struct UploadQuota {
    max_total: usize,
    max_per_client: usize,
    /// Sessions in the store at the last count plus those opened since: never fewer than
    /// there are. Starts at "unknown" (the first session counts the store).
    counted: AtomicUsize,
    owners: Mutex<Owners>,
}

#[derive(Default)]
struct Owners {
    by_id: HashMap<UploadId, IpAddr>,
    per_client: HashMap<IpAddr, usize>,
}

impl Owners {
    fn remove(&mut self, id: &UploadId) {
        if let Some(ip) = self.by_id.remove(id) {
            if let Some(n) = self.per_client.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_client.remove(&ip);
                }
            }
        }
    }
}

impl UploadQuota {
    pub fn new(cfg: &UploadsConfig) -> UploadQuota {
        UploadQuota {
            max_total: cfg.max_sessions,
            max_per_client: cfg.max_sessions_per_client,
            counted: AtomicUsize::new(usize::MAX),
            owners: Mutex::default(),
        }
    }

    /// May `client` open one more session? The refusal says which cap and how to raise it.
    pub async fn admit(&self, store: &Store, client: Option<ClientAddr>) -> Result<(), String> {
        if let Some(ClientAddr(ip)) = client {
            let n = self.owners.lock().unwrap().per_client.get(&ip).copied().unwrap_or(0);
            if n >= self.max_per_client {
                // Sessions the sweep removed still count here: forget them first.
                self.prune(store).await;
                let n = self.owners.lock().unwrap().per_client.get(&ip).copied().unwrap_or(0);
                if n >= self.max_per_client {
                    return Err(format!(
                        "{n} upload sessions are open from {ip}, the most one address may have \
                         (uploads.max_sessions_per_client); finish or cancel some first"
                    ));
                }
            }
        }
        if self.counted.load(Ordering::Relaxed) >= self.max_total {
            let n = match store.ingest_ids().await {
                Ok(ids) => ids.len(),
                Err(e) => {
                    tracing::warn!(error = %e, "counting upload sessions failed; admitting the session");
                    return Ok(());
                }
            };
            self.counted.store(n, Ordering::Relaxed);
            if n >= self.max_total {
                return Err(format!(
                    "{n} upload sessions are open, the most this registry allows (uploads.max_sessions); \
                     retry later"
                ));
            }
        }
        Ok(())
    }

    /// Records a session `client` opened.
    pub fn opened(&self, client: Option<ClientAddr>, id: UploadId) {
        let _ = self.counted.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_add(1)));
        if let Some(ClientAddr(ip)) = client {
            let mut o = self.owners.lock().unwrap();
            if o.by_id.insert(id, ip).is_none() {
                *o.per_client.entry(ip).or_default() += 1;
            }
        }
    }

    /// Records that a session ended (finished, cancelled).
    pub fn closed(&self, id: &UploadId) {
        self.owners.lock().unwrap().remove(id);
    }

    /// Forgets sessions that are no longer in the store (the idle sweep removed them).
    pub async fn prune(&self, store: &Store) {
        let Ok(ids) = store.ingest_ids().await else { return };
        let live: HashSet<UploadId> = ids.into_iter().collect();
        self.counted.store(live.len(), Ordering::Relaxed);
        let mut o = self.owners.lock().unwrap();
        let gone: Vec<UploadId> = o.by_id.keys().filter(|id| !live.contains(id)).copied().collect();
        for id in &gone {
            o.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_admits_a_burst_then_the_rate() {
        let rl = RateLimiter::new(&RateLimitConfig { requests_per_second: 10.0, burst: Some(5) }).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 0..5 {
            assert!(rl.check(a).is_ok(), "request {i} of the burst");
        }
        let wait = rl.check(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Another address has its own bucket.
        assert!(rl.check(b).is_ok());
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(rl.check(a).is_ok(), "one interval later, one more request");
        assert!(rl.check(a).is_err());
        assert!(RateLimiter::new(&RateLimitConfig::default()).is_none(), "off by default");
    }
}
