//! Several replicas on one store: who this replica is, leases, events and shared values
//! through Redis (`[redis]`), and the replica registry in the store (`meta/replicas/`).
//!
//! Redis is coordination, never the record: everything durable is in the store. While Redis
//! is unreachable (or not configured) every call here answers "on your own"
//! ([`Claim::Alone`], `None`, no event): each replica then keeps single flight in its own
//! process, as a lone replica does, and picks coordination up again once Redis answers (the
//! connection manager reconnects by itself).
//!
//! - **Leases** ([`Cluster::claim`]): `SET key value NX PX ttl`; the value names the holder
//!   (replica id, advertised URL) and a token of this claim. The holder renews it every third
//!   of `cluster.lease_ttl` while the [`Lease`] lives and deletes it when released (both by a
//!   script that checks the token first, so a lease taken over is never renewed or deleted by
//!   its old holder). A holder that dies stops renewing: after `lease_ttl` one other replica
//!   claims it (a takeover).
//! - **Events** ([`Cluster::publish`], [`Cluster::events`]): one pub/sub channel; every
//!   replica hears every other's (its own are skipped). After a reconnection, events may have
//!   been missed: [`Event::Resync`] tells listeners to drop what they cache.
//! - **Values** ([`Cluster::get_value`], [`Cluster::set_value`]): small shared values with an
//!   expiry (upstream tokens).
//! - **Peers**: requests between replicas carry `Authorization: Bearer <cluster.secret>`
//!   ([`Cluster::peer_authorized`], [`Cluster::peer_request`]). A lease's holder is read from
//!   Redis, which is not trusted with where the secret or clients' bytes go: a holder is
//!   contacted only if the store's replica registry (the record) has a fresh heartbeat of it
//!   with the same advertised URL ([`Cluster::is_replica`]).

pub mod once;
pub mod replicas;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::config::Config;
pub use crate::storage::{fill_lease, Claim, Event, Holder, Lease};
use crate::storage::{Fleet, LeaseHandle, Store};

/// The path prefix of the replicas' internal endpoints (never routed to `/v2`).
pub const PEER_PREFIX: &str = "/_stevedore/cluster";

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    event: Event,
}

struct Redis {
    conn: ConnectionManager,
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// The last command answered (for the gauge and the log: one line per change).
    up: AtomicBool,
}

pub struct Cluster {
    /// This replica's id, new at every start (a UUID v7).
    id: String,
    /// `cluster.advertise`, without a trailing `/`.
    advertise: Option<String>,
    secret: Option<String>,
    lease_ttl: Duration,
    redis: Option<Redis>,
    events: broadcast::Sender<Event>,
    peers: reqwest::Client,
    /// `cluster.heartbeat_interval`: a heartbeat younger than three is a live replica's.
    heartbeat_interval: Duration,
    /// Holders found in the replica registry lately (cached for one heartbeat interval).
    registered: moka::sync::Cache<(String, String), ()>,
}

const RENEW: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl Cluster {
    /// From `[redis]` and `[cluster]`. Does not wait for Redis: a replica starts while Redis is
    /// down, on its own until Redis answers.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Arc<Cluster>> {
        let secret = cfg.cluster.secret().map_err(anyhow::Error::msg)?;
        let redis = match cfg.redis.url().map_err(anyhow::Error::msg)? {
            None => None,
            Some(url) => {
                let client = redis::Client::open(url.as_str())?;
                let mc = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.redis.timeout))
                    .set_response_timeout(Some(cfg.redis.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), mc)?;
                Some(Redis {
                    conn,
                    client,
                    prefix: cfg.redis.prefix.clone(),
                    timeout: cfg.redis.timeout,
                    up: AtomicBool::new(true),
                })
            }
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let peers = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(cfg.proxy.fill_timeout.min(Duration::from_secs(60)))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("stevedore/", env!("CARGO_PKG_VERSION"), " (peer)"))
            .build()?;
        let (events, _) = broadcast::channel(1024);
        let cluster = Arc::new(Cluster {
            id: uuid::Uuid::now_v7().to_string(),
            advertise: cfg
                .cluster
                .advertise()
                .map_err(anyhow::Error::msg)?
                .map(|a| a.trim_end_matches('/').to_string()),
            secret,
            lease_ttl: cfg.cluster.lease_ttl,
            redis,
            events,
            peers,
            heartbeat_interval: cfg.cluster.heartbeat_interval,
            registered: registered_cache(cfg.cluster.heartbeat_interval),
        });
        crate::metrics::cluster_redis_up(cluster.redis.is_some());
        Ok(cluster)
    }

    /// A lone replica (tests, command-line tools): no Redis, no peers.
    pub fn alone() -> Arc<Cluster> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (events, _) = broadcast::channel(16);
        Arc::new(Cluster {
            id: uuid::Uuid::now_v7().to_string(),
            advertise: None,
            secret: None,
            lease_ttl: Duration::from_secs(10),
            redis: None,
            events,
            peers: reqwest::Client::new(),
            heartbeat_interval: Duration::from_secs(5),
            registered: registered_cache(Duration::from_secs(5)),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn advertise(&self) -> Option<&str> {
        self.advertise.as_deref()
    }

    /// Whether Redis is configured (whether or not it answers right now).
    pub fn coordinated(&self) -> bool {
        self.redis.is_some()
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn key(r: &Redis, name: &str) -> String {
        format!("{}{name}", r.prefix)
    }

    /// Runs one command, bounded by `redis.timeout`; records whether Redis answered.
    async fn call<T>(&self, what: &str, f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Option<T> {
        let r = self.redis.as_ref()?;
        let res = match tokio::time::timeout(r.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", r.timeout)),
        };
        let ok = res.is_ok();
        if r.up.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("redis answers again: coordinating with the other replicas");
            } else {
                tracing::warn!(error = %res.as_ref().err().map(String::as_str).unwrap_or(""), what, "redis does not answer: single flight within this replica only until it does");
            }
            crate::metrics::cluster_redis_up(ok);
        }
        if !ok {
            crate::metrics::cluster_redis_error();
        }
        res.ok()
    }

    /// Claims the lease `name` (`fill:sha256:…`, `tag:docker.io/library/nginx:latest`).
    pub async fn claim(self: &Arc<Self>, name: &str) -> Claim {
        let Some(r) = &self.redis else { return Claim::Alone };
        let key = Cluster::key(r, name);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let value = format!("{} {} {token}", self.id, self.advertise.as_deref().unwrap_or("-"));
        let ttl = self.lease_ttl.as_millis() as u64;
        let mut conn = r.conn.clone();
        let set = redis::cmd("SET").arg(&key).arg(&value).arg("NX").arg("PX").arg(ttl).to_owned();
        let sent = Instant::now();
        let got: Option<Option<String>> = self.call("claim", set.query_async(&mut conn)).await;
        match got {
            None => Claim::Alone,
            Some(Some(_)) => Claim::Mine(RedisLease::start(self.clone(), key, value, sent)),
            Some(None) => match self.holder(name).await {
                Some(h) => Claim::Held(h),
                // Released between the two calls: try once more, else act alone.
                None => {
                    let sent = Instant::now();
                    let again: Option<Option<String>> = self.call("claim", set.query_async(&mut conn)).await;
                    match again {
                        Some(Some(_)) => Claim::Mine(RedisLease::start(self.clone(), key, value, sent)),
                        _ => match self.holder(name).await {
                            Some(h) => Claim::Held(h),
                            None => Claim::Alone,
                        },
                    }
                }
            },
        }
    }

    /// Who holds the lease `name`, if anyone (and Redis answers).
    pub async fn holder(&self, name: &str) -> Option<Holder> {
        let r = self.redis.as_ref()?;
        let mut conn = r.conn.clone();
        let v: Option<String> = self.call("holder", conn.get(Cluster::key(r, name))).await?;
        parse_holder(&v?)
    }

    /// Who holds each of the leases `names`, in one `MGET`; `None` for each when Redis does
    /// not answer.
    pub async fn holders(&self, names: &[String]) -> Vec<Option<Holder>> {
        let none = || vec![None; names.len()];
        let Some(r) = self.redis.as_ref() else { return none() };
        if names.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = names.iter().map(|n| Cluster::key(r, n)).collect();
        let mut conn = r.conn.clone();
        let mget = redis::cmd("MGET").arg(&keys).to_owned();
        let got: Option<Vec<Option<String>>> = self.call("holders", mget.query_async(&mut conn)).await;
        match got {
            Some(v) if v.len() == names.len() => v.into_iter().map(|v| v.as_deref().and_then(parse_holder)).collect(),
            _ => none(),
        }
    }

    /// Waits until nobody holds `name` (or Redis stops answering), at most `limit`; polls.
    /// Returns whether it is free.
    pub async fn wait_free(&self, name: &str, limit: Duration) -> bool {
        let end = tokio::time::Instant::now() + limit;
        loop {
            if self.holder(name).await.is_none() {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `holder` no longer holds `name` (free, or another holder: a takeover), at
    /// most `limit`, or until Redis stops answering; polls. Returns whether it let go.
    pub async fn wait_not_held_by(&self, name: &str, holder: &Holder, limit: Duration) -> bool {
        let end = tokio::time::Instant::now() + limit;
        loop {
            if self.holder(name).await.as_ref() != Some(holder) {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `PING`, so `stevedore_cluster_redis_up` follows Redis while nothing else asks it
    /// (called with every heartbeat). Whether it answered; `false` without Redis.
    pub async fn ping(&self) -> bool {
        let Some(r) = self.redis.as_ref() else { return false };
        let mut conn = r.conn.clone();
        let pong: Option<String> = self.call("ping", redis::cmd("PING").query_async(&mut conn)).await;
        pong.is_some()
    }

    /// A shared value, if set and Redis answers.
    pub async fn get_value(&self, name: &str) -> Option<String> {
        let r = self.redis.as_ref()?;
        let mut conn = r.conn.clone();
        self.call("get", conn.get(Cluster::key(r, name))).await?
    }

    /// Sets a shared value for `ttl` (best effort).
    pub async fn set_value(&self, name: &str, value: &str, ttl: Duration) {
        let Some(r) = self.redis.as_ref() else { return };
        let mut conn = r.conn.clone();
        let ms = ttl.as_millis().max(1) as u64;
        let _: Option<()> = self.call("set", conn.pset_ex(Cluster::key(r, name), value, ms)).await;
    }

    /// Tells the other replicas (best effort, in the background).
    pub fn publish(&self, event: Event) {
        let Some(r) = self.redis.as_ref() else { return };
        let mut conn = r.conn.clone();
        let channel = Cluster::key(r, "events");
        let msg = serde_json::to_string(&Envelope { from: self.id.clone(), event }).expect("event serialises");
        let timeout = r.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, conn.publish::<_, _, ()>(channel, msg)).await;
        });
    }

    /// Tells the other replicas and waits until Redis took the event (bounded by
    /// `redis.timeout`): a change whose caches must be dropped everywhere before its request
    /// is answered (a delete).
    pub async fn publish_now(&self, event: Event) {
        let Some(r) = self.redis.as_ref() else { return };
        let mut conn = r.conn.clone();
        let channel = Cluster::key(r, "events");
        let msg = serde_json::to_string(&Envelope { from: self.id.clone(), event }).expect("event serialises");
        let _: Option<()> = self.call("publish", conn.publish(channel, msg)).await;
    }

    /// The other replicas' events (and [`Event::Resync`] after a reconnection).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Listens to the events channel until the runtime stops, reconnecting as needed.
    pub fn spawn_listener(self: &Arc<Self>) {
        let Some(r) = self.redis.as_ref() else { return };
        let (client, channel, me) = (r.client.clone(), Cluster::key(r, "events"), self.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut first = true;
            loop {
                let sub = async {
                    let mut ps = client.get_async_pubsub().await?;
                    ps.subscribe(&channel).await?;
                    redis::RedisResult::Ok(ps)
                };
                match tokio::time::timeout(Duration::from_secs(5), sub).await {
                    Ok(Ok(ps)) => {
                        if !first {
                            let _ = me.events.send(Event::Resync);
                        }
                        first = false;
                        let mut stream = ps.into_on_message();
                        while let Some(msg) = stream.next().await {
                            let Ok(text) = msg.get_payload::<String>() else { continue };
                            match serde_json::from_str::<Envelope>(&text) {
                                Ok(env) if env.from != me.id => {
                                    let _ = me.events.send(env.event);
                                }
                                Ok(_) => {}
                                Err(e) => tracing::debug!(error = %e, "ignoring an event that does not parse"),
                            }
                        }
                        tracing::warn!("lost the redis events channel; resubscribing");
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "subscribing to redis events"),
                    Err(_) => tracing::debug!("subscribing to redis events: no answer"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Whether a request carries this fleet's `cluster.secret` (constant-time comparison).
    pub fn peer_authorized(&self, headers: &http::HeaderMap) -> bool {
        let Some(secret) = &self.secret else { return false };
        let Some(got) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
        let Some(got) = got.strip_prefix("Bearer ") else { return false };
        constant_time_eq(got.as_bytes(), secret.as_bytes())
    }

    /// Whether `h` is a replica serving this store: the registry (`meta/replicas/<id>`) has
    /// its heartbeat, younger than three heartbeat intervals, naming the same advertised URL.
    /// Every serving replica records one before it serves; a lease value in Redis that names
    /// anything else (a forged or stale holder) is never contacted.
    pub async fn is_replica(&self, store: &crate::storage::Store, h: &Holder) -> bool {
        let key = (h.replica.clone(), h.advertise.clone());
        if self.registered.contains_key(&key) {
            return true;
        }
        let Ok(id) = h.replica.parse::<uuid::Uuid>() else { return false };
        let Ok(Some((raw, at))) = store.replica(&id).await else { return false };
        let age = std::time::SystemTime::now().duration_since(at).unwrap_or_default();
        let ok = replicas::is_live(age, self.heartbeat_interval)
            && serde_json::from_slice::<replicas::Heartbeat>(&raw).is_ok_and(|hb| {
                hb.replica == h.replica
                    && hb.advertise.as_deref().map(|a| a.trim_end_matches('/')) == Some(h.advertise.as_str())
            });
        if ok {
            self.registered.insert(key, ());
        }
        ok
    }

    /// A request to another replica (`path` below its advertised URL), authenticated.
    pub fn peer_request(&self, method: reqwest::Method, peer: &Holder, path: &str) -> reqwest::RequestBuilder {
        let rb = self.peers.request(method, format!("{}{path}", peer.advertise));
        match &self.secret {
            Some(s) => rb.bearer_auth(s),
            None => rb,
        }
    }
}

/// A lease key's kind for metrics (`fill`, `manifest`, …): the name without the prefix.
fn lease_kind(c: &Cluster, key: &str) -> String {
    let name = c.redis.as_ref().and_then(|r| key.strip_prefix(r.prefix.as_str())).unwrap_or(key);
    once::kind_of(name).to_string()
}

fn registered_cache(ttl: Duration) -> moka::sync::Cache<(String, String), ()> {
    moka::sync::Cache::builder().max_capacity(1024).time_to_live(ttl).build()
}

fn parse_holder(v: &str) -> Option<Holder> {
    let mut it = v.split(' ');
    let replica = it.next()?.to_string();
    let advertise = it.next()?.to_string();
    Some(Holder { replica, advertise })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The store's view of the fleet ([`Fleet`]): this replica's [`Cluster`].
struct Shared(Arc<Cluster>);

#[async_trait::async_trait]
impl Fleet for Shared {
    async fn claim(&self, name: &str) -> Claim {
        self.0.claim(name).await
    }
    async fn holder(&self, name: &str) -> Option<Holder> {
        self.0.holder(name).await
    }
    async fn holders(&self, names: &[String]) -> Vec<Option<Holder>> {
        self.0.holders(names).await
    }
    async fn wait_free(&self, name: &str, limit: Duration) -> bool {
        self.0.wait_free(name, limit).await
    }
    fn wait_limit(&self) -> Duration {
        self.0.wait_limit()
    }
    fn publish(&self, event: Event) {
        self.0.publish(event)
    }
    async fn publish_now(&self, event: Event) {
        self.0.publish_now(event).await
    }
}

impl Cluster {
    /// Shares `store` with the other replicas when they coordinate (Redis configured): the
    /// store's deletions are told to them, their events invalidate its caches, its upload
    /// sessions take leases here.
    pub fn share(self: &Arc<Self>, store: &Arc<Store>) {
        if self.coordinated() {
            store.listen(Arc::new(Shared(self.clone())), self.events());
        }
    }
}

/// A lease this replica holds in Redis (what a [`Lease`] wraps): renewed in the background
/// while it lives; released (deleted, if still ours) by [`Lease::release`] or on drop.
struct RedisLease {
    cluster: Arc<Cluster>,
    key: String,
    value: String,
    renewer: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<bool>,
    /// When the request that last confirmed the lease (its claim or a renewal) was sent:
    /// Redis keeps it at most `lease_ttl` from then, whether or not a renewal is heard of.
    confirmed: Arc<std::sync::Mutex<Instant>>,
    /// How long the lease stays ours after a confirmation, less a margin for the act that
    /// follows the check (a delete reaching the backend).
    valid_for: Duration,
    released: bool,
}

impl RedisLease {
    fn start(cluster: Arc<Cluster>, key: String, value: String, sent: Instant) -> Lease {
        crate::metrics::cluster_lease(lease_kind(&cluster, &key), true);
        let (tx, lost) = watch::channel(false);
        let confirmed = Arc::new(std::sync::Mutex::new(sent));
        let valid_for = cluster.lease_ttl - cluster.lease_ttl / 5;
        let (c, k, v, at) = (cluster.clone(), key.clone(), value.clone(), confirmed.clone());
        let renewer = tokio::spawn(async move {
            let every = c.lease_ttl / 3;
            let ms = c.lease_ttl.as_millis() as u64;
            loop {
                tokio::time::sleep(every).await;
                let Some(r) = c.redis.as_ref() else { return };
                let mut conn = r.conn.clone();
                let script = redis::Script::new(RENEW);
                let mut inv = script.key(&k);
                inv.arg(&v).arg(ms);
                let sent = Instant::now();
                match c.call("renew", inv.invoke_async::<i64>(&mut conn)).await {
                    Some(1) => *at.lock().unwrap() = sent,
                    // Expired and possibly taken over: this holder must stop acting on it.
                    Some(_) => {
                        tracing::warn!(lease = %k, "a lease expired before its renewal (taken over?)");
                        let _ = tx.send(true);
                        return;
                    }
                    // Redis does not answer: keep trying; the work goes on (degraded).
                    None => {}
                }
            }
        });
        Lease::new(RedisLease { cluster, key, value, renewer, lost, confirmed, valid_for, released: false })
    }
}

impl LeaseHandle for RedisLease {
    /// Found expired at a renewal, or not confirmed for longer than Redis keeps it (renewals
    /// late on a starved process, or unanswered): another replica may hold it now.
    fn lost(&self) -> bool {
        *self.lost.borrow() || self.confirmed.lock().unwrap().elapsed() >= self.valid_for
    }

    fn release(mut self: Box<Self>) -> futures::future::BoxFuture<'static, ()> {
        self.released = true;
        self.renewer.abort();
        Box::pin(async move { release(&self.cluster, &self.key, &self.value).await })
    }
}

async fn release(c: &Cluster, key: &str, value: &str) {
    let Some(r) = c.redis.as_ref() else { return };
    let mut conn = r.conn.clone();
    let script = redis::Script::new(RELEASE);
    let mut inv = script.key(key);
    inv.arg(value);
    let _: Option<i64> = c.call("release", inv.invoke_async::<i64>(&mut conn)).await;
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        crate::metrics::cluster_lease(lease_kind(&self.cluster, &self.key), false);
        self.renewer.abort();
        if !self.released {
            let (c, k, v) = (self.cluster.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.value));
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move { release(&c, &k, &v).await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_parse() {
        assert_eq!(
            parse_holder("0190-abc http://10.0.0.5:5000 tok"),
            Some(Holder { replica: "0190-abc".into(), advertise: "http://10.0.0.5:5000".into() })
        );
        assert_eq!(parse_holder("lonely"), None);
    }

    #[test]
    fn events_round_trip() {
        let e = Envelope {
            from: "r1".into(),
            event: Event::LinkGone { repo: "repos/a".into(), digest: "sha256:00".into() },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"event\":\"link_gone\""), "{s}");
        let back: Envelope = serde_json::from_str(&s).unwrap();
        assert_eq!(back.event, e.event);
        assert_eq!(back.from, "r1");
    }

    #[test]
    fn secrets_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[tokio::test]
    async fn alone_means_no_coordination() {
        let c = Cluster::alone();
        assert!(matches!(c.claim("fill:x").await, Claim::Alone));
        assert_eq!(c.holder("fill:x").await, None);
        assert_eq!(c.get_value("k").await, None);
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, "Bearer anything".parse().unwrap());
        assert!(!c.peer_authorized(&h), "no secret: no peer is authorized");
    }
}
