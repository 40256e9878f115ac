//! The replica registry: each serving replica records a heartbeat in the store
//! (`meta/replicas/<id>`: advertised URL, host, pid, whether it coordinates through Redis)
//! every `cluster.heartbeat_interval`, and removes it at shutdown.
//!
//! At start-up a replica looks for others alive on the same store (a heartbeat younger than
//! three intervals). Several replicas on one store without Redis would each fetch the same
//! blobs and evict each other's content: without `[redis]` a replica refuses to start beside
//! a live one unless `cluster.allow_without_redis` is set. A heartbeat left by a process of
//! this host that no longer runs (a crash, a SIGKILL) is not a live replica: it is removed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::config::Config;
use crate::storage::Store;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub replica: String,
    pub advertise: Option<String>,
    pub host: String,
    pub pid: u32,
    pub redis: bool,
    pub started_unix_ms: u64,
}

/// Another replica alive on the store.
#[derive(Clone, Debug)]
pub struct Peer {
    pub heartbeat: Heartbeat,
    pub age: Duration,
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// How many heartbeats apart a replica looks at the others' ([`Registry::spawn`]).
const LOOK_EVERY: u64 = 3;

/// Whether a heartbeat `age` old is a live replica's: younger than three intervals.
pub fn is_live(age: Duration, interval: Duration) -> bool {
    age <= interval * 3
}

/// The replicas serving `store` now, as an offline tool sees them (nothing is removed): a
/// heartbeat younger than three `interval`s ([`is_live`]), of a process that still runs when
/// it is on this host. `gc`, `fsck --repair` and `import` refuse to run beside any.
pub async fn live(store: &Store, interval: Duration) -> anyhow::Result<Vec<Peer>> {
    let me = hostname();
    let mut out = Vec::new();
    for (_, raw, at) in store.replicas(None).await? {
        let Ok(hb) = serde_json::from_slice::<Heartbeat>(&raw) else { continue };
        let age = SystemTime::now().duration_since(at).unwrap_or_default();
        if (hb.host == me && !pid_alive(hb.pid)) || !is_live(age, interval) {
            continue;
        }
        out.push(Peer { heartbeat: hb, age });
    }
    Ok(out)
}

pub struct Registry {
    cluster: Arc<Cluster>,
    store: Arc<Store>,
    id: uuid::Uuid,
    record: Vec<u8>,
    interval: Duration,
}

impl Registry {
    pub fn new(cluster: Arc<Cluster>, store: Arc<Store>, cfg: &Config) -> Registry {
        let id: uuid::Uuid = cluster.id().parse().expect("a replica id is a UUID");
        let hb = Heartbeat {
            replica: cluster.id().to_string(),
            advertise: cluster.advertise().map(str::to_string),
            host: hostname(),
            pid: std::process::id(),
            redis: cluster.coordinated(),
            started_unix_ms: crate::storage::index::unix_now(),
        };
        let record = serde_json::to_vec(&hb).expect("heartbeat serialises");
        Registry { cluster, store, id, record, interval: cfg.cluster.heartbeat_interval }
    }

    /// Other replicas alive on the store; removes heartbeats of dead processes of this host
    /// and ones older than ten intervals.
    pub async fn others(&self) -> anyhow::Result<Vec<Peer>> {
        let me = hostname();
        let mut out = Vec::new();
        for (id, raw, at) in self.store.replicas(Some(&self.id)).await? {
            let age = SystemTime::now().duration_since(at).unwrap_or_default();
            let Ok(hb) = serde_json::from_slice::<Heartbeat>(&raw) else { continue };
            let dead_here = hb.host == me && !pid_alive(hb.pid);
            if dead_here || age > self.interval * 10 {
                let _ = self.store.remove_replica(&id).await;
                continue;
            }
            if is_live(age, self.interval) {
                out.push(Peer { heartbeat: hb, age });
            }
        }
        Ok(out)
    }

    /// The start-up check: refuses to serve beside a live replica without Redis (unless the
    /// operator allowed it), then records this replica's first heartbeat.
    pub async fn check_and_register(&self, allow_without_redis: bool) -> anyhow::Result<()> {
        let others = self.others().await?;
        if !self.cluster.coordinated() && !others.is_empty() {
            let list: Vec<String> = others
                .iter()
                .map(|p| {
                    format!(
                        "{} (host {}, pid {}, {}, seen {:.1}s ago)",
                        p.heartbeat.replica,
                        p.heartbeat.host,
                        p.heartbeat.pid,
                        p.heartbeat.advertise.as_deref().unwrap_or("no advertised URL"),
                        p.age.as_secs_f64()
                    )
                })
                .collect();
            if allow_without_redis {
                tracing::warn!(others = %list.join("; "), "other replicas serve this store and no [redis] is configured: each replica fetches and evicts on its own (cluster.allow_without_redis)");
            } else {
                anyhow::bail!(
                    "another replica is serving this store: {}. Several replicas on one store need [redis] url \
                     (and cluster.secret, cluster.advertise) to coordinate; set cluster.allow_without_redis = true \
                     to run them uncoordinated anyway",
                    list.join("; ")
                );
            }
        }
        self.store.put_replica(&self.id, &self.record).await?;
        crate::metrics::cluster_replicas(others.len() + 1);
        crate::status::get().replicas(others.iter().map(|p| (p.heartbeat.replica.clone(), p.age)));
        Ok(())
    }

    /// Refreshes the heartbeat every interval until the runtime stops: one write each
    /// interval, and every [`LOOK_EVERY`] intervals a look at the others (one list and a read
    /// per other replica) for the metrics and `/status`, which show the age as of that look
    /// plus the time since. A lone server on S3 makes 8 requests a minute at the default
    /// interval (10 s).
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            for beat in 1u64.. {
                tick.tick().await;
                self.cluster.ping().await;
                if let Err(e) = self.store.put_replica(&self.id, &self.record).await {
                    tracing::warn!(error = %e, "recording this replica's heartbeat");
                }
                if beat % LOOK_EVERY != 0 {
                    continue;
                }
                if let Ok(others) = self.others().await {
                    crate::metrics::cluster_replicas(others.len() + 1);
                    crate::status::get().replicas(others.iter().map(|p| (p.heartbeat.replica.clone(), p.age)));
                }
            }
        });
    }

    /// Removes this replica's heartbeat (graceful shutdown).
    pub async fn deregister(&self) {
        let _ = self.store.remove_replica(&self.id).await;
    }
}
