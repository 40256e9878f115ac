//! What `/status` shows that no other part keeps: plain numbers in memory, recorded where
//! the work happens (beside the Prometheus calls) and read by the page. Process-global like
//! the metrics recorder, and at the same level: it uses nothing of the crate, so any layer may
//! record into it. Recording is a few atomic adds or a short lock; nothing here does I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Minutes kept for the "last hour" figures and the chart.
pub const MINUTES: usize = 60;

/// At most this many repositories are counted (the most pulled are kept once it is reached).
const MAX_REPOS: usize = 1000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the process started (which minute this slot holds).
    pub index: u64,
    pub hits: u64,
    pub misses: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
}

/// The last answer of an upstream (rendering never contacts one).
#[derive(Clone, Debug, Default)]
pub struct UpstreamState {
    /// `None` until a request was sent.
    pub reachable: Option<bool>,
    pub last_error: Option<String>,
    pub last_at: Option<SystemTime>,
    pub ratelimit_remaining: Option<u64>,
    /// Cached tokens: scope → when it expires (never the token).
    pub tokens: BTreeMap<String, Instant>,
}

#[derive(Clone, Debug, Default)]
pub struct LifecycleRun {
    pub last_run: Option<SystemTime>,
    pub evicted_bytes: u64,
    pub gc_last_run: Option<SystemTime>,
    pub gc_reclaimed_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct UsageFigures {
    pub proxied: u64,
    pub pushed: u64,
    pub imported: u64,
    pub measured: bool,
}

#[derive(Clone, Debug)]
pub struct ReplicaSeen {
    pub id: String,
    /// Heartbeat age when recorded, and when that was.
    pub age: Duration,
    pub at: Instant,
}

pub struct Recorder {
    started: Instant,
    started_at: SystemTime,
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_from_cache: AtomicU64,
    bytes_from_upstream: AtomicU64,
    minutes: Mutex<[Minute; MINUTES]>,
    upstreams: Mutex<BTreeMap<String, UpstreamState>>,
    lifecycle: Mutex<LifecycleRun>,
    usage: Mutex<UsageFigures>,
    replicas: Mutex<Vec<ReplicaSeen>>,
    repos: Mutex<HashMap<String, u64>>,
}

static RECORDER: LazyLock<Recorder> = LazyLock::new(|| Recorder {
    started: Instant::now(),
    started_at: SystemTime::now(),
    hits: AtomicU64::new(0),
    misses: AtomicU64::new(0),
    bytes_from_cache: AtomicU64::new(0),
    bytes_from_upstream: AtomicU64::new(0),
    minutes: Mutex::new([Minute::default(); MINUTES]),
    upstreams: Mutex::default(),
    lifecycle: Mutex::default(),
    usage: Mutex::default(),
    replicas: Mutex::default(),
    repos: Mutex::default(),
});

/// The process's recorder (created, and the uptime clock started, at the first call).
pub fn get() -> &'static Recorder {
    &RECORDER
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cache outcomes that count as a hit (answered from the store) and as a miss
/// (fetched from the upstream).
pub fn outcome_is_hit(outcome: &str) -> Option<bool> {
    match outcome {
        "hit" | "stale" | "stale-write-failed" | "revalidated" => Some(true),
        "miss" | "joined" | "peer" => Some(false),
        _ => None,
    }
}

impl Recorder {
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    fn minute(&self) -> u64 {
        self.started.elapsed().as_secs() / 60
    }

    /// A pull answered: `outcome` as the `x-stevedore-cache` header says.
    pub fn cache_outcome(&self, outcome: &str) {
        let Some(hit) = outcome_is_hit(outcome) else { return };
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        self.this_minute(|slot| if hit { slot.hits += 1 } else { slot.misses += 1 });
    }

    fn this_minute(&self, f: impl FnOnce(&mut Minute)) {
        let now = self.minute();
        let mut m = lock(&self.minutes);
        let slot = &mut m[(now % MINUTES as u64) as usize];
        if slot.index != now {
            *slot = Minute { index: now, ..Minute::default() };
        }
        f(slot)
    }

    /// Body bytes sent to a client for a pull with this cache outcome.
    pub fn served(&self, outcome: &str, n: u64) {
        match outcome_is_hit(outcome) {
            Some(true) => {
                self.bytes_from_cache.fetch_add(n, Ordering::Relaxed);
                self.this_minute(|slot| slot.bytes_from_cache += n);
            }
            Some(false) => {
                self.bytes_from_upstream.fetch_add(n, Ordering::Relaxed);
                self.this_minute(|slot| slot.bytes_from_upstream += n);
            }
            None => {}
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub fn bytes_from_cache(&self) -> u64 {
        self.bytes_from_cache.load(Ordering::Relaxed)
    }

    pub fn bytes_from_upstream(&self) -> u64 {
        self.bytes_from_upstream.load(Ordering::Relaxed)
    }

    /// The last hour, oldest minute first; minutes without a pull are zero.
    pub fn last_hour(&self) -> Vec<Minute> {
        let now = self.minute();
        let m = lock(&self.minutes);
        (0..MINUTES as u64)
            .rev()
            .map(|back| {
                let index = now.saturating_sub(back);
                let slot = m[(index % MINUTES as u64) as usize];
                if slot.index == index && back <= now {
                    slot
                } else {
                    Minute { index, ..Minute::default() }
                }
            })
            .collect()
    }

    fn upstream(&self, host: &str, f: impl FnOnce(&mut UpstreamState)) {
        let mut u = lock(&self.upstreams);
        match u.get_mut(host) {
            Some(s) => f(s),
            None => f(u.entry(host.to_string()).or_default()),
        }
    }

    /// An upstream answered (`None`) or failed (`Some(error)`); `reachable`: whether it was
    /// reached at all (a 404 is an answer, a refused connection or a 5xx is not).
    pub fn upstream_result(&self, host: &str, reachable: bool, error: Option<String>) {
        self.upstream(host, |s| {
            s.reachable = Some(reachable);
            s.last_at = Some(SystemTime::now());
            if error.is_some() || reachable {
                s.last_error = error;
            }
        });
    }

    pub fn ratelimit_remaining(&self, host: &str, remaining: u64) {
        self.upstream(host, |s| s.ratelimit_remaining = Some(remaining));
    }

    /// A token for `scope` cached until `expires` (`None`: forgotten).
    pub fn token(&self, host: &str, scope: &str, expires: Option<Instant>) {
        self.upstream(host, |s| {
            let now = Instant::now();
            s.tokens.retain(|_, e| *e > now);
            match expires {
                Some(e) => s.tokens.insert(scope.to_string(), e),
                None => s.tokens.remove(scope),
            };
        });
    }

    /// Makes the upstream known (shown as "not contacted yet").
    pub fn upstream_known(&self, host: &str) {
        self.upstream(host, |_| {});
    }

    pub fn upstreams(&self) -> BTreeMap<String, UpstreamState> {
        lock(&self.upstreams).clone()
    }

    pub fn usage(&self, proxied: u64, pushed: u64, imported: u64) {
        *lock(&self.usage) = UsageFigures { proxied, pushed, imported, measured: true };
        self.eviction(0);
    }

    pub fn usage_figures(&self) -> UsageFigures {
        *lock(&self.usage)
    }

    /// An eviction pass ran (`bytes` evicted, maybe 0).
    pub fn eviction(&self, bytes: u64) {
        let mut l = lock(&self.lifecycle);
        l.last_run = Some(SystemTime::now());
        l.evicted_bytes += bytes;
    }

    pub fn gc(&self, bytes: u64) {
        let mut l = lock(&self.lifecycle);
        l.gc_last_run = Some(SystemTime::now());
        l.gc_reclaimed_bytes += bytes;
    }

    pub fn lifecycle(&self) -> LifecycleRun {
        lock(&self.lifecycle).clone()
    }

    /// The other replicas alive on the store, as of a heartbeat.
    pub fn replicas(&self, seen: impl IntoIterator<Item = (String, Duration)>) {
        let at = Instant::now();
        *lock(&self.replicas) = seen.into_iter().map(|(id, age)| ReplicaSeen { id, age, at }).collect();
    }

    pub fn replicas_seen(&self) -> Vec<ReplicaSeen> {
        lock(&self.replicas).clone()
    }

    /// A manifest of `repo` pulled (GET answered 200).
    pub fn pulled(&self, repo: &str) {
        let mut r = lock(&self.repos);
        if let Some(n) = r.get_mut(repo) {
            *n += 1;
            return;
        }
        if r.len() >= MAX_REPOS {
            // Forget the least pulled: the table stays bounded, the most pulled stay.
            if let Some(least) = r.iter().min_by_key(|(_, n)| **n).map(|(k, _)| k.clone()) {
                r.remove(&least);
            }
        }
        r.insert(repo.to_string(), 1);
    }

    /// The `n` most pulled repositories, most first (ties by name).
    pub fn top_repositories(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = lock(&self.repos).iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_hour() {
        let r = get();
        let (h, m) = (r.hits(), r.misses());
        r.cache_outcome("hit");
        r.cache_outcome("miss");
        r.cache_outcome("joined");
        r.cache_outcome("-");
        assert_eq!((r.hits() - h, r.misses() - m), (1, 2));
        let hour = r.last_hour();
        assert_eq!(hour.len(), MINUTES);
        assert!(hour.last().unwrap().hits >= 1);
    }

    #[test]
    fn top_repositories_are_ordered() {
        let r = get();
        for _ in 0..3 {
            r.pulled("zz/top");
        }
        r.pulled("zz/second");
        let top = r.top_repositories(usize::MAX);
        let a = top.iter().position(|(n, _)| n == "zz/top").unwrap();
        let b = top.iter().position(|(n, _)| n == "zz/second").unwrap();
        assert!(a < b);
    }
}
