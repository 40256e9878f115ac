//! The state every request is served with: the configuration, the registry layer (all the
//! content), and what the HTTP front needs beside it (metrics, limits, auth). Built by
//! `app` (wiring).

use std::sync::Arc;

use crate::config::Config;
use crate::registry::Registry;

pub struct App {
    pub cfg: Config,
    /// The content: the store, the pull-through proxy over it, the fleet of replicas.
    pub registry: Registry,
    /// Renders `/metrics`; `None` when no recorder is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Requests per client address; `None` when off.
    pub rate_limiter: Option<Arc<crate::limits::RateLimiter>>,
    pub upload_quota: crate::limits::UploadQuota,
    /// Client authentication and access rules; `None` when `[auth]` is off (open registry).
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// The Bearer token for `/admin/*` (`auth.admin_token_file`); `None` when not configured.
    pub admin_token: Option<crate::auth::admin::AdminToken>,
}

pub type AppState = Arc<App>;
