//! Wiring: builds the application state shared by every request ([`App`], defined by `api`,
//! which is all it serves) and its background work.

use std::sync::Arc;

use crate::config::{BackendKind, Config};
use crate::proxy::Proxy;
use crate::registry::Registry;
use crate::storage::{S3Backend, Store, StoreConfig};

use crate::api::App;

impl App {
    pub async fn new(
        cfg: Config,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> anyhow::Result<Arc<App>> {
        crate::hooks::init(&cfg.storage.root);
        let cluster = crate::cluster::Cluster::from_config(&cfg)?;
        // Replicas sharing the store: what one caches, another may delete.
        let cache_ttl = cluster.coordinated().then_some(crate::storage::SHARED_CACHE_TTL);
        let store = match cfg.storage.backend {
            BackendKind::Fs => {
                Store::open(&StoreConfig {
                    root: cfg.storage.root.clone(),
                    fsync: cfg.storage.fsync,
                    descriptor_cache_capacity: cfg.cache.descriptors,
                    cache_ttl,
                })
                .await?
            }
            BackendKind::S3 => {
                let s3 = S3Backend::open(&cfg.storage.s3, &cfg.storage.root, cfg.storage.fsync).await?;
                Store::with_backend(Arc::new(s3), cfg.cache.descriptors, cache_ttl)
            }
        };
        cluster.share(&store);
        let proxy = Proxy::new(&cfg, Some(cfg.proxy.default_upstream.as_str()))?.with_cluster(cluster.clone());
        let rate_limiter = crate::limits::RateLimiter::new(&cfg.server.rate_limit).map(Arc::new);
        let upload_quota = crate::limits::UploadQuota::new(&cfg.uploads);
        let auth = crate::auth::Auth::from_config(&cfg.auth)?;
        let admin_token = match &cfg.auth.admin_token_file {
            Some(f) => Some(
                crate::auth::admin::AdminToken::load(f)
                    .map_err(|why| anyhow::anyhow!("auth.admin_token_file: {why}"))?,
            ),
            None => None,
        };
        // This replica among others on the store (`[redis]`, `[cluster]`); alone without Redis.
        let registry = Registry::new(store, proxy, cluster);
        Ok(Arc::new(App { cfg, registry, metrics, rate_limiter, upload_quota, auth, admin_token }))
    }

    /// Background work: the idle upload session sweep, the cache lifecycle (usage checks,
    /// eviction, access flushes, GC). Runs until the runtime stops; the lifecycle is returned
    /// so that a clean stop saves its index ([`crate::lifecycle::Lifecycle::save`]).
    pub fn spawn_background(self: &Arc<App>) -> Arc<crate::lifecycle::Lifecycle> {
        let lifecycle = crate::lifecycle::Lifecycle::new(self.registry.store().clone(), &self.cfg.cache);
        lifecycle.spawn();
        let app = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(app.cfg.uploads.sweep_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let store = app.registry.store();
            loop {
                tick.tick().await;
                let n = store.sweep_uploads(app.cfg.uploads.session_ttl).await;
                if n > 0 {
                    tracing::info!(removed = n, "swept idle upload sessions");
                }
                app.upload_quota.prune(store).await;
                let writable = store.writable().await;
                if !writable {
                    tracing::warn!("the store does not accept writes (full?): cache hits are still served");
                    store.space_needed();
                }
                crate::metrics::store_writable(writable);
                if let Some(metrics) = &app.metrics {
                    metrics.run_upkeep();
                }
            }
        });
        lifecycle
    }
}

/// The start-up summary: who may write what. Logged when serving starts; without auth the
/// last line (the registry is open to anyone) as a warning.
pub fn summary(app: &App) -> Vec<String> {
    let mut out = Vec::new();
    let proxy = app.registry.proxy();
    if proxy.is_offline() {
        out.push(
            "offline (proxy.offline): serving from the store only; no upstream is contacted, misses are 404s"
                .to_string(),
        );
    }
    let mirrors: Vec<String> = proxy.upstreams().iter().map(|u| format!("{}/", u.namespace)).collect();
    match proxy.default_upstream() {
        Some(up) if proxy.local_namespaces().is_empty() => out.push(format!(
            "local namespaces: none; every plain name is a read-only mirror of {}: pushes are refused \
             until proxy.local_namespaces names the repositories that are local",
            up.host
        )),
        Some(up) => out.push(format!(
            "local namespaces (pushable): {}; every other plain name is a read-only mirror of {}",
            proxy.local_namespaces().join(", "),
            up.host
        )),
        None => out.push("no default upstream: every plain name is a local, pushable repository".to_string()),
    }
    if !mirrors.is_empty() {
        out.push(format!("upstream namespaces (read-only, by ns=, path prefix or cache name): {}", mirrors.join(", ")));
    }
    let admin = match (&app.auth, &app.admin_token) {
        (_, Some(_)) if app.auth.is_some() => "/admin/*: administrators by the rules, or the admin token",
        (_, Some(_)) => "/admin/*: the admin token (auth.admin_token_file) only",
        (Some(_), None) => "/admin/*: administrators by the rules",
        (None, None) => "/admin/* is off (no [auth] htpasswd and no auth.admin_token_file)",
    };
    out.push(admin.to_string());
    match &app.auth {
        Some(auth) => out.extend(auth.describe()),
        None => out.push(
            "no client authentication is configured ([auth] htpasswd): this is an open registry; anyone who can \
             reach it may pull every repository, push and delete where names are local, and read /metrics"
                .to_string()
                + if app.admin_token.is_some() { "" } else { "; /admin/* is off" },
        ),
    }
    out
}

/// The files a config names, each read and checked by the layer that owns it: what
/// [`Config::validate`] runs at start-up and in `check-config`.
pub struct ConfigFiles;

impl crate::config::FileChecks for ConfigFiles {
    fn tls(&self, cfg: &crate::config::TlsConfig) -> Result<(), (&'static str, String)> {
        crate::tls::TlsFiles::load(cfg).map(drop).map_err(|e| (e.key(), e.to_string()))
    }
    fn admin_token(&self, path: &std::path::Path) -> Result<(), String> {
        crate::auth::admin::AdminToken::load(path).map(drop)
    }
    fn htpasswd(&self, path: &std::path::Path) -> Result<(), String> {
        crate::auth::htpasswd::Users::load(path).map(drop).map_err(|e| e.to_string())
    }
    fn ca_file(&self, path: &std::path::Path) -> Result<(), String> {
        crate::upstream::ca::load_ca_file(path).map(drop).map_err(|e| e.to_string())
    }
}

/// The fleet's shared upstream tokens (`upstream::TokenFleet`) over this replica's cluster.
#[async_trait::async_trait]
impl crate::upstream::TokenFleet for Arc<crate::cluster::Cluster> {
    fn coordinated(&self) -> bool {
        crate::cluster::Cluster::coordinated(self)
    }
    async fn get_value(&self, name: &str) -> Option<String> {
        crate::cluster::Cluster::get_value(self, name).await
    }
    async fn set_value(&self, name: &str, value: &str, ttl: std::time::Duration) {
        crate::cluster::Cluster::set_value(self, name, value, ttl).await
    }
    async fn once<'a>(
        &'a self,
        name: &str,
        check: crate::upstream::Check<'a>,
        work: crate::upstream::Work<'a>,
    ) -> Result<Arc<crate::upstream::Token>, String> {
        crate::cluster::Cluster::once(self, name, check, work).await
    }
}
