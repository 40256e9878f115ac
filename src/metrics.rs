//! Prometheus metrics. The recorder is process-global (installed by `main`); without it every
//! call here is a no-op, so library code and tests need no setup.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .install_recorder()?;
    INSTALLED.store(true, Ordering::Relaxed);
    // Counters of rare events start at zero, so dashboards and alert rules see the series
    // before the first event (`deploy/grafana`, `deploy/prometheus`).
    counter!("stevedore_cache_evicted_bytes_total").increment(0);
    counter!("stevedore_cache_evicted_items_total").increment(0);
    counter!("stevedore_gc_reclaimed_bytes_total").increment(0);
    for result in ["ok", "failed"] {
        counter!("stevedore_gc_runs_total", "result" => result).increment(0);
    }
    gauge!("stevedore_fills_in_flight").increment(0.0);
    Ok(handle)
}

/// A request method as a label value: one of a fixed set, so a client sending made-up methods
/// cannot grow the number of series.
pub fn method_label(method: &http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "PUT" => "PUT",
        "POST" => "POST",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Set once the recorder is installed: from then on the handles of the series counted on
/// every request are looked up once per thread and kept ([`Handles`]); before (library code,
/// tests), every call goes to the recorder as it is (a no-op without one).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The handles of the series counted on every request (the request itself, its cache outcome,
/// its bytes, its store calls), by their labels. A handle is the recorder's own (the same
/// series in `/metrics`); keeping it saves building and hashing the labelled key and the
/// registry lookup on each request, about a tenth of a small request's CPU. Per thread, so
/// no lock; the label sets are bounded (see each function), and so are these maps.
#[derive(Default)]
struct Handles {
    requests: FxMap<(Static, Static, u16), Counter>,
    durations: FxMap<Static, Histogram>,
    cache: FxMap<(Static, Static), FxMap<Box<str>, Counter>>,
    backend: FxMap<(Static, Static, Static), Counter>,
    served: Option<Counter>,
    by_source: FxMap<Static, Counter>,
}

/// A `&'static str` label value as a key of [`Handles`]: where it is, not what it says (no
/// hashing of the text). The same text at two places is two keys for one series: harmless.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Static(usize, usize);

fn st(s: &'static str) -> Static {
    Static(s.as_ptr() as usize, s.len())
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// A multiply-rotate hasher (as rustc's FxHash) for the few small keys of [`Handles`], which
/// no client chooses: SipHash cost more than the lookup it replaces.
#[derive(Default)]
struct Fx(u64);

impl Fx {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(n.into())
    }
    fn write_u16(&mut self, n: u16) {
        self.add(n.into())
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64)
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

thread_local! {
    static HANDLES: RefCell<Handles> = RefCell::new(Handles::default());
}

/// `f` on this thread's handles; `None` when they are not kept (no recorder installed yet,
/// or the thread is exiting).
fn with_handles<R>(f: impl FnOnce(&mut Handles) -> R) -> Option<R> {
    if !INSTALLED.load(Ordering::Relaxed) {
        return None;
    }
    HANDLES.try_with(|h| h.try_borrow_mut().ok().map(|mut h| f(&mut h))).ok().flatten()
}

fn request_counter(route: &'static str, method: &'static str, status: u16) -> Counter {
    let labels = [("route", route.to_string()), ("method", method.to_string()), ("status", status.to_string())];
    counter!("stevedore_requests_total", &labels)
}

fn request_histogram(route: &'static str) -> Histogram {
    histogram!("stevedore_request_duration_seconds", "route" => route)
}

/// One answered request. Every label takes a bounded set of values: `route` is a route kind,
/// `method` goes through [`method_label`], `status` is a three-digit HTTP status.
pub fn request(route: &'static str, method: &http::Method, status: u16, duration: Duration) {
    let method = method_label(method);
    let secs = duration.as_secs_f64();
    let kept = with_handles(|h| {
        h.requests
            .entry((st(route), st(method), status))
            .or_insert_with(|| request_counter(route, method, status))
            .increment(1);
        h.durations.entry(st(route)).or_insert_with(|| request_histogram(route)).record(secs);
    });
    if kept.is_none() {
        request_counter(route, method, status).increment(1);
        request_histogram(route).record(secs);
    }
}

fn cache_counter(upstream: &str, kind: &'static str, outcome: &'static str) -> Counter {
    counter!("stevedore_cache_requests_total", "upstream" => upstream.to_string(), "kind" => kind, "outcome" => outcome)
}

/// How a pull through an upstream was answered (hit, miss, joined, stale, revalidated).
/// `upstream` is a configured upstream's host (a bounded set).
pub fn cache_outcome(upstream: &str, kind: &'static str, outcome: &'static str) {
    crate::status::get().cache_outcome(outcome);
    let kept = with_handles(|h| {
        let by_upstream = h.cache.entry((st(kind), st(outcome))).or_default();
        match by_upstream.get(upstream) {
            Some(c) => c.increment(1),
            None => {
                let c = cache_counter(upstream, kind, outcome);
                c.increment(1);
                by_upstream.insert(upstream.into(), c);
            }
        }
    });
    if kept.is_none() {
        cache_counter(upstream, kind, outcome).increment(1);
    }
}

/// Body bytes sent in successful GET answers (blobs and manifests, and also `/metrics`,
/// `/status` and the catalog), as README's metrics table says.
pub fn served_bytes(n: u64) {
    let make = || counter!("stevedore_served_bytes_total");
    let kept = with_handles(|h| h.served.get_or_insert_with(make).increment(n));
    if kept.is_none() {
        make().increment(n);
    }
}

/// Body bytes of a pull sent to a client, by where they came from: `cache` (a hit, stale or
/// revalidated answer) or `upstream` (a miss, a joined fill, a peer's relay); the cache
/// outcome as the `x-stevedore-cache` header says. Other answers (local repositories) count
/// in neither.
pub fn served_by_source(outcome: &str, n: u64) {
    let source = match crate::status::outcome_is_hit(outcome) {
        Some(true) => "cache",
        Some(false) => "upstream",
        None => return,
    };
    crate::status::get().served(outcome, n);
    let make = || counter!("stevedore_served_bytes_by_source_total", "source" => source);
    let kept = with_handles(|h| h.by_source.entry(st(source)).or_insert_with(make).increment(n));
    if kept.is_none() {
        make().increment(n);
    }
}

/// One request to an upstream, until its answer's head (or its failure): its latency.
pub fn upstream_request(upstream: &str, took: Duration) {
    histogram!("stevedore_upstream_request_duration_seconds", "upstream" => upstream.to_string())
        .record(took.as_secs_f64());
}

/// 1 when the last request to the upstream reached it (any answer but a 5xx), 0 when not.
pub fn upstream_reachable(upstream: &str, reached: bool) {
    gauge!("stevedore_upstream_reachable", "upstream" => upstream.to_string()).set(if reached { 1.0 } else { 0.0 });
}

/// The cap on proxied content (`cache.max_size`) and its watermarks, in bytes.
pub fn cache_limits(max: u64, high: u64, low: u64) {
    gauge!("stevedore_cache_max_bytes").set(max as f64);
    gauge!("stevedore_cache_high_watermark_bytes").set(high as f64);
    gauge!("stevedore_cache_low_watermark_bytes").set(low as f64);
}

/// An upstream answered 429 (rate limited): the request waits for the client's retry.
pub fn upstream_ratelimited(upstream: &str) {
    counter!("stevedore_upstream_ratelimit_waits_total", "upstream" => upstream.to_string()).increment(1);
}

/// The served TLS certificate's end of validity (unix seconds), as loaded or reloaded; the
/// gauge `stevedore_tls_certificate_expiry_seconds` (seconds left) is refreshed from it by
/// [`refresh`] at each scrape.
pub fn tls_certificate(not_after_unix: Option<i64>) {
    TLS_NOT_AFTER.store(not_after_unix.unwrap_or(i64::MIN), std::sync::atomic::Ordering::Relaxed);
    refresh();
}

static TLS_NOT_AFTER: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);

/// Gauges that count down with the clock, brought up to date (before `/metrics` renders).
pub fn refresh() {
    let t = TLS_NOT_AFTER.load(std::sync::atomic::Ordering::Relaxed);
    if t != i64::MIN {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        gauge!("stevedore_tls_certificate_expiry_seconds").set((t - now) as f64);
    }
}

/// Bytes fetched from an upstream.
pub fn upstream_bytes(upstream: &str, n: u64) {
    counter!("stevedore_upstream_bytes_total", "upstream" => upstream.to_string()).increment(n);
}

pub fn fill_started() {
    gauge!("stevedore_fills_in_flight").increment(1.0);
}

pub fn fill_finished(upstream: &str, ok: bool, took: Duration) {
    gauge!("stevedore_fills_in_flight").decrement(1.0);
    let result = if ok { "committed" } else { "failed" };
    counter!("stevedore_fills_total", "upstream" => upstream.to_string(), "result" => result).increment(1);
    histogram!("stevedore_fill_duration_seconds", "upstream" => upstream.to_string()).record(took.as_secs_f64());
}

pub fn upstream_error(upstream: &str, kind: &'static str) {
    counter!("stevedore_upstream_errors_total", "upstream" => upstream.to_string(), "kind" => kind).increment(1);
}

pub fn token_fetched(upstream: &str) {
    counter!("stevedore_upstream_token_fetches_total", "upstream" => upstream.to_string()).increment(1);
}

/// Docker Hub's `ratelimit-remaining` (`100;w=21600`).
pub fn ratelimit_remaining(upstream: &str, header: &str) {
    if let Some(v) = header.split(';').next().and_then(|n| n.trim().parse::<f64>().ok()) {
        crate::status::get().ratelimit_remaining(upstream, v as u64);
        gauge!("stevedore_upstream_ratelimit_remaining", "upstream" => upstream.to_string()).set(v);
    }
}

/// 1 while the registry is offline (`proxy.offline`).
pub fn offline(on: bool) {
    gauge!("stevedore_offline").set(if on { 1.0 } else { 0.0 });
}

pub fn store_bytes(n: u64) {
    gauge!("stevedore_store_bytes").set(n as f64);
}

/// 1 while the store accepts writes, 0 while it does not (a full disk): cache hits go on.
pub fn store_writable(ok: bool) {
    gauge!("stevedore_store_writable").set(if ok { 1.0 } else { 0.0 });
}

/// A write the store refused for lack of space (a push or fill refused, a tag served stale).
pub fn store_write_failed() {
    counter!("stevedore_store_write_failures_total").increment(1);
}

/// Bytes of content by kind as of the last usage check (kept up to date by the lifecycle,
/// never measured by walking the store), and the age in seconds of the least recently used
/// proxied content.
pub fn usage(pushed: u64, imported: u64, proxied: u64, oldest_access_secs: f64) {
    counter!("stevedore_cache_usage_checks_total").increment(1);
    crate::status::get().usage(proxied, pushed, imported);
    gauge!("stevedore_store_used_bytes", "kind" => "pushed").set(pushed as f64);
    gauge!("stevedore_store_used_bytes", "kind" => "imported").set(imported as f64);
    gauge!("stevedore_store_used_bytes", "kind" => "proxied").set(proxied as f64);
    gauge!("stevedore_cache_oldest_access_seconds").set(oldest_access_secs);
}

/// Bytes held by ingests (upload sessions, fills in progress or abandoned): counted against
/// the cap beside proxied content, never evicted. Brought up to date at every usage check and
/// before `/metrics` renders.
pub fn ingest_bytes(n: u64) {
    gauge!("stevedore_store_used_bytes", "kind" => "ingest").set(n as f64);
}

/// One call across the storage seam (`backend`: `fs`, `s3`; `op`: the call; `purpose`:
/// `heartbeat` for the replica heartbeat's own, `serve` for everything else).
pub fn backend_request(backend: &'static str, op: &'static str, purpose: &'static str) {
    let make = || counter!("stevedore_backend_requests_total", "backend" => backend, "op" => op, "purpose" => purpose);
    let kept = with_handles(|h| h.backend.entry((st(backend), st(op), st(purpose))).or_insert_with(make).increment(1));
    if kept.is_none() {
        make().increment(1);
    }
}

/// The lifecycle's index of the store was rebuilt by walking it (`reason`: `start`, a start
/// after an unclean stop or without a trusted index; `drift`; `fsck`; `shared`, a store
/// shared by replicas).
pub fn index_rebuilt(reason: &'static str) {
    counter!("stevedore_cache_index_rebuilds_total", "reason" => reason).increment(1);
}

/// Proxied content evicted (by the cap, the age limit or a full store).
pub fn evicted(bytes: u64, items: usize) {
    crate::status::get().eviction(bytes);
    counter!("stevedore_cache_evicted_bytes_total").increment(bytes);
    counter!("stevedore_cache_evicted_items_total").increment(items as u64);
}

/// One garbage collection run and the bytes it reclaimed.
pub fn gc_run(ok: bool, bytes: u64) {
    crate::status::get().gc(bytes);
    counter!("stevedore_gc_runs_total", "result" => if ok { "ok" } else { "failed" }).increment(1);
    counter!("stevedore_gc_reclaimed_bytes_total").increment(bytes);
}

/// 1 while Redis answers (or none is configured: 0 then), per replica.
pub fn cluster_redis_up(up: bool) {
    gauge!("stevedore_cluster_redis_up").set(if up { 1.0 } else { 0.0 });
}

/// A Redis command that failed or timed out (the replica acted on its own).
pub fn cluster_redis_error() {
    counter!("stevedore_cluster_redis_errors_total").increment(1);
}

/// A lease of `kind` (`fill`, `manifest`, `tag`, `token`, `upload`, `lifecycle`) taken
/// (`true`) or given up (`false`): the gauge is the leases this replica holds, by kind.
pub fn cluster_lease(kind: String, taken: bool) {
    if taken {
        counter!("stevedore_cluster_leases_taken_total", "kind" => kind.clone()).increment(1);
        gauge!("stevedore_cluster_leases_held", "kind" => kind).increment(1.0);
    } else {
        gauge!("stevedore_cluster_leases_held", "kind" => kind).decrement(1.0);
    }
}

/// This replica waited for another's lease of `kind`; `outcome`: `served` (the holder's
/// result was in the store after the wait) or `own` (it was not: the work was done here).
pub fn cluster_wait(kind: &str, outcome: &'static str) {
    counter!("stevedore_cluster_lease_waits_total", "kind" => kind.to_string(), "outcome" => outcome).increment(1);
}

/// Requests of this replica waiting for another replica's lease of `kind`, now: the gauge
/// goes up when the wait starts and down when the returned guard drops.
pub fn cluster_waiting(kind: &str) -> WaitingGuard {
    gauge!("stevedore_cluster_lease_waiting", "kind" => kind.to_string()).increment(1.0);
    WaitingGuard(kind.to_string())
}

pub struct WaitingGuard(String);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        gauge!("stevedore_cluster_lease_waiting", "kind" => std::mem::take(&mut self.0)).decrement(1.0);
    }
}

/// A cache invalidation `event` sent to (`published`) or heard from (`received`) the other
/// replicas.
pub fn cluster_event(direction: &'static str, event: &'static str) {
    counter!("stevedore_cluster_events_total", "direction" => direction, "event" => event).increment(1);
}

/// An upstream token taken from the fleet's shared cache instead of the upstream's realm.
pub fn cluster_token_shared(upstream: &str) {
    counter!("stevedore_cluster_tokens_shared_total", "upstream" => upstream.to_string()).increment(1);
}

/// A lifecycle pass (`eviction`, `gc`) skipped because another replica was running one.
pub fn cluster_lifecycle_skipped(pass: &'static str) {
    counter!("stevedore_cluster_lifecycle_skipped_total", "pass" => pass).increment(1);
}

/// A blob response relayed from the replica that fills it.
pub fn cluster_peer_stream() {
    counter!("stevedore_cluster_peer_streams_total").increment(1);
}

/// A blob response this replica served to another replica (from its fill or its store).
pub fn cluster_peer_served() {
    counter!("stevedore_cluster_peer_served_total").increment(1);
}

/// A fill's lease claimed after its holder could not serve it (it died or lost its fill).
pub fn cluster_takeover() {
    counter!("stevedore_cluster_takeovers_total").increment(1);
}

/// A fill lease naming a holder that is not a registered replica (never contacted).
pub fn cluster_unregistered_holder() {
    counter!("stevedore_cluster_unregistered_holders_total").increment(1);
}

/// A peer's relayed blob that did not hash to its digest (the client's stream was cut).
pub fn cluster_relay_mismatch() {
    counter!("stevedore_cluster_relay_mismatches_total").increment(1);
}

/// A fill that found its lease expired (Redis unreachable for a while, or a stalled fill).
pub fn cluster_fill_lease_lost() {
    counter!("stevedore_cluster_fill_leases_lost_total").increment(1);
}

/// Replicas alive on this store, as of the last heartbeat (this one included).
pub fn cluster_replicas(n: usize) {
    gauge!("stevedore_cluster_replicas").set(n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        let mut seen = std::collections::BTreeSet::new();
        for m in ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "FOO", "get", "X-1"] {
            seen.insert(method_label(&http::Method::from_bytes(m.as_bytes()).unwrap()));
        }
        assert_eq!(seen.len(), 8, "{seen:?}");
        assert_eq!(method_label(&http::Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
