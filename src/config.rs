//! Configuration: a TOML file (every key optional, unknown keys refused) with command-line
//! overrides applied on top. `validate()` runs at start-up so a bad config fails early with
//! the key that is wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub uploads: UploadsConfig,
    pub cache: CacheConfig,
    pub proxy: ProxyConfig,
    /// Registries Stevedore pulls through from. Only these are ever contacted.
    pub upstreams: Vec<UpstreamConfig>,
    /// Client authentication and access rules; off (an open registry) without `htpasswd`.
    pub auth: AuthConfig,
    /// Coordination of several replicas on one store; off without `url`.
    pub redis: RedisConfig,
    /// This replica among several on one store.
    pub cluster: ClusterConfig,
    /// OpenTelemetry export of spans (issue 26); off without `otlp_endpoint`.
    pub tracing: TracingConfig,
}

/// `[tracing]`: spans exported over OTLP HTTP/protobuf. `otlp_endpoint` (e.g.
/// `http://collector:4318`, `/v1/traces` appended unless the path already ends so) wins over
/// the standard `OTEL_EXPORTER_OTLP_ENDPOINT`; with neither, no OpenTelemetry layer exists.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans (default `stevedore`).
    pub service_name: Option<String>,
}

/// `[redis]`: the coordination service of a fleet of replicas on one bucket (leases for
/// single flight across replicas, cache invalidation, shared upstream tokens). Redis is
/// coordination, never the record: it may run without persistence and be restarted; while it
/// is unreachable every replica degrades to single flight in its own process. Without `url`,
/// one replica keeps everything in process. `Debug` is written by hand: the URL's user info
/// (its password) is never shown.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: Option<String>,
    pub url_file: Option<PathBuf>,
    pub url_env: Option<String>,
    /// Prefix of every key and channel, so fleets can share one Redis (default `stevedore:`).
    pub prefix: String,
    /// A command that takes longer fails (the replica then acts on its own).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> RedisConfig {
        RedisConfig {
            url: None,
            url_file: None,
            url_env: None,
            prefix: "stevedore:".into(),
            timeout: Duration::from_secs(2),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("url_file", &self.url_file)
            .field("url_env", &self.url_env)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConfig {
    /// The URL, if configured (inline, from a file or from an environment variable).
    pub fn url(&self) -> Result<Option<String>, String> {
        read_secret("url", &self.url, &self.url_file, &self.url_env)
    }

    pub fn enabled(&self) -> bool {
        self.url.is_some() || self.url_file.is_some() || self.url_env.is_some()
    }
}

/// `[cluster]`: this replica among several on one store. `Debug` is written by hand: it never
/// shows the secret.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Shared by the replicas: authenticates their internal requests to each other.
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    /// The URL the other replicas reach this one at (`http://10.0.0.5:5000`).
    pub advertise: Option<String>,
    /// The name of an environment variable holding `advertise` (a pod's IP from the
    /// Kubernetes downward API: `STEVEDORE_ADVERTISE=http://$(POD_IP):5000`). `advertise`,
    /// when also set, wins.
    pub advertise_env: Option<String>,
    /// How long a lease (a fill, a revalidation, an upload session, eviction) outlives its
    /// holder's last renewal: a dead replica's work is taken over after about this long.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often this replica records that it is alive in the store (`meta/replicas/`).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Start even though another replica is alive on this store and no `[redis]` is
    /// configured (each replica then fetches and evicts on its own).
    pub allow_without_redis: bool,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            secret: None,
            secret_file: None,
            secret_env: None,
            advertise: None,
            advertise_env: None,
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            allow_without_redis: false,
        }
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("secret_env", &self.secret_env)
            .field("advertise", &self.advertise.as_deref().map(redact_url))
            .field("advertise_env", &self.advertise_env)
            .field("lease_ttl", &self.lease_ttl)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("allow_without_redis", &self.allow_without_redis)
            .finish()
    }
}

impl ClusterConfig {
    pub fn secret(&self) -> Result<Option<String>, String> {
        read_secret("secret", &self.secret, &self.secret_file, &self.secret_env)
    }

    /// `advertise`, or the value of the variable `advertise_env` names (set and not empty).
    pub fn advertise(&self) -> Result<Option<String>, String> {
        if let Some(a) = &self.advertise {
            return Ok(Some(a.clone()));
        }
        let Some(var) = &self.advertise_env else { return Ok(None) };
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            _ => Err(format!("advertise_env names {var}, which is not set")),
        }
    }

    fn validate(&self, redis: &RedisConfig) -> Result<(), ConfigError> {
        let invalid = |key, why: String| Err(ConfigError::Invalid { key, why });
        if self.lease_ttl < Duration::from_millis(500) {
            return invalid("cluster.lease_ttl", "must be at least 500ms".into());
        }
        if self.heartbeat_interval.is_zero() {
            return invalid("cluster.heartbeat_interval", "must be longer than 0s".into());
        }
        let advertise = self.advertise().map_err(|why| ConfigError::Invalid { key: "cluster.advertise", why })?;
        if let Some(a) = &advertise {
            match reqwest::Url::parse(a) {
                Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {}
                _ => return invalid("cluster.advertise", format!("{a:?} is not an http(s) URL")),
            }
        }
        let secret = self.secret().map_err(|why| ConfigError::Invalid { key: "cluster.secret", why })?;
        if redis.enabled() {
            match redis.url() {
                Ok(Some(u)) => match reqwest::Url::parse(&u) {
                    Ok(p) if p.scheme() == "redis" && p.host().is_some() => {}
                    Ok(p) if p.scheme() == "rediss" => {
                        return invalid("redis.url", "rediss:// (TLS) is not supported; use redis://".into())
                    }
                    _ => return invalid("redis.url", "must be redis://host:port[/db]".into()),
                },
                Ok(None) => {}
                Err(why) => return invalid("redis.url", why),
            }
            if advertise.is_none() {
                return invalid(
                    "cluster.advertise",
                    "must be set with [redis]: the URL the other replicas reach this one at".into(),
                );
            }
            match secret {
                Some(s) if s.len() >= 16 => {}
                Some(_) => return invalid("cluster.secret", "must be at least 16 characters".into()),
                None => return invalid("cluster.secret", "must be set with [redis] (shared by every replica)".into()),
            }
        }
        Ok(())
    }
}

/// `[auth]`: who may pull, push, delete. Authentication is on when `htpasswd` is set; then
/// clients log in with HTTP Basic or the Docker token flow (`GET /token`, ES256 JWTs).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Users: a file as `htpasswd -B` writes it (`user:$2y$…`, bcrypt only). Re-read when it
    /// changes.
    pub htpasswd: Option<PathBuf>,
    /// What clients that do not log in may do: `pull` (every repository) or `none`.
    pub anonymous: AnonymousAccess,
    /// Lifetime of the tokens `/token` issues.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// The token signing key (PKCS#8 PEM, ECDSA P-256). Generated and written here when the
    /// file does not exist; without it, a key is generated in memory at each start (tokens do
    /// not survive a restart and replicas cannot share them).
    pub token_key_file: Option<PathBuf>,
    /// The token endpoint's public URL, sent as the challenge's `realm` (a registry behind a
    /// TLS-terminating proxy: `https://registry.example/token`). Default: `/token` on the
    /// scheme and host the client used.
    pub realm: Option<String>,
    /// The service name in challenges and tokens (`aud` and `iss`).
    pub service: String,
    /// Who may read `/metrics`: `open`, `authenticated` (any user), `admin` (a user granted
    /// `admin` on every repository, `*`).
    pub metrics: MetricsAccess,
    /// Groups of users: `ci = ["builder", "bot"]`.
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// Access rules; none: every user may pull, push and delete everywhere.
    pub rules: Vec<AccessRule>,
    /// A file holding a token (at least 16 characters; trailing newline trimmed) that
    /// `Authorization: Bearer <token>` presents for the admin endpoints (`/admin/*`), with or
    /// without `htpasswd`. Without it and without `htpasswd`, `/admin/*` does not exist (404).
    pub admin_token_file: Option<PathBuf>,
    /// Who may read `/status` and `/status.json` (values as `metrics`); default `admin` when
    /// users are configured (`htpasswd`), `open` otherwise.
    pub status: Option<MetricsAccess>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousAccess {
    Pull,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    Open,
    Authenticated,
    Admin,
}

/// What a client may do to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
    /// Administrative endpoints (prefetch and the like); on `*`, also `auth.metrics = "admin"`.
    Admin,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            "admin" => Some(Action::Admin),
            _ => None,
        }
    }
}

/// `[[auth.rules]]`: the `users` (`"*"`: every user) and members of `groups` may do `actions`
/// on repositories matching one of `repositories` (globs as in `proxy.local_namespaces`,
/// matched against the full name: `team/app`, or `docker.io/library/nginx` for an upstream's,
/// whichever way a client names it). A caller's rights are the union of every rule that
/// names it, plus anonymous pull when `anonymous = "pull"`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessRule {
    pub repositories: Vec<String>,
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub actions: Vec<Action>,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            htpasswd: None,
            anonymous: AnonymousAccess::Pull,
            token_ttl: Duration::from_secs(300),
            token_key_file: None,
            realm: None,
            service: "stevedore".into(),
            metrics: MetricsAccess::Open,
            groups: Default::default(),
            rules: Vec::new(),
            admin_token_file: None,
            status: None,
        }
    }
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        self.htpasswd.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: String| Err(ConfigError::Invalid { key, why });
        if let Some(f) = &self.admin_token_file {
            if let Err(why) = crate::auth::admin::AdminToken::load(f) {
                return invalid("auth.admin_token_file", why);
            }
        }
        if !self.enabled() {
            let d = AuthConfig::default();
            if !self.rules.is_empty()
                || !self.groups.is_empty()
                || self.anonymous != d.anonymous
                || self.metrics != d.metrics
                || self.token_key_file.is_some()
                || self.realm.is_some()
            {
                return invalid("auth.htpasswd", "[auth] keys are set but authentication is off: set htpasswd".into());
            }
            return Ok(());
        }
        if let Some(f) = &self.htpasswd {
            if let Err(e) = crate::auth::htpasswd::Users::load(f) {
                return invalid("auth.htpasswd", e.to_string());
            }
        }
        if self.token_ttl < Duration::from_secs(1) || self.token_ttl > Duration::from_secs(24 * 3600) {
            return invalid("auth.token_ttl", "must be between 1s and 24h".into());
        }
        if self.service.is_empty() || !self.service.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\\') {
            return invalid(
                "auth.service",
                format!("{:?} must be a non-empty name without quotes or spaces", self.service),
            );
        }
        if let Some(r) = &self.realm {
            match reqwest::Url::parse(r) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() && !r.contains('"') => {}
                _ => return invalid("auth.realm", format!("{r:?} is not an http(s) URL")),
            }
        }
        if let Some(f) = &self.token_key_file {
            if f.as_os_str().is_empty() {
                return invalid("auth.token_key_file", "must not be empty".into());
            }
        }
        for (g, members) in &self.groups {
            if g.is_empty() || members.iter().any(|m| m.is_empty()) {
                return invalid("auth.groups", format!("group {g:?}: names must not be empty"));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let at = format!("rule {}", i + 1);
            if r.repositories.is_empty() || r.repositories.iter().any(|p| p.is_empty() || p.starts_with('/')) {
                return invalid("auth.rules", format!("{at}: repositories must list repository-name globs"));
            }
            for p in &r.repositories {
                if let Err(e) = crate::oci::glob::check(p) {
                    return invalid("auth.rules", format!("{at}: {:?}: {e}", shorten(p)));
                }
            }
            if r.actions.is_empty() {
                return invalid("auth.rules", format!("{at}: actions must list pull, push, delete or admin"));
            }
            if r.users.is_empty() && r.groups.is_empty() {
                return invalid("auth.rules", format!("{at}: names no users and no groups"));
            }
            if let Some(g) = r.groups.iter().find(|g| !self.groups.contains_key(*g)) {
                return invalid("auth.rules", format!("{at}: group {g:?} is not defined in [auth.groups]"));
            }
        }
        if self.metrics == MetricsAccess::Admin
            && !self.rules.iter().any(|r| r.actions.contains(&Action::Admin) && r.repositories.iter().any(|p| p == "*"))
        {
            return invalid(
                "auth.metrics",
                "\"admin\" needs a rule granting admin on repositories = [\"*\"]; nobody could read /metrics".into(),
            );
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Host of the upstream used for requests that name none (no `ns`, no path prefix);
    /// empty for none.
    pub default_upstream: String,
    /// A fill keeps going after its clients hang up, but no longer than this.
    #[serde(with = "humantime_serde")]
    pub fill_timeout: Duration,
    /// How long an upstream answer to a blob or manifest HEAD is reused.
    #[serde(with = "humantime_serde")]
    pub head_cache_ttl: Duration,
    /// Repository-name globs (`team/*`, `ci/*`) of the plain names that are local repositories
    /// (pushable) while a default upstream is configured; every other plain name is read-only
    /// content of the default upstream. `*` matches any run of characters, `/` included
    /// (`team/*` matches `team/app` and `team/a/b`); `?` matches one character. Without a
    /// default upstream every plain name is local and this list is not consulted.
    pub local_namespaces: Vec<String>,
    /// Serve strictly from the store and never contact an upstream (air-gapped sites): tags
    /// resolve from the cache, misses are 404s that say the registry is offline.
    pub offline: bool,
}

/// `Debug` is written by hand: it never shows the password or user info in endpoint URLs.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry host images are named with (`docker.io`, `ghcr.io`): matched against
    /// `ns=` and path prefixes, and the namespace its content is cached under.
    pub host: String,
    /// Other names for the same registry (`index.docker.io`, `registry-1.docker.io`).
    pub aliases: Vec<String>,
    /// Base URLs tried in order (failover). Default: `https://<host>`.
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this file (trailing newline trimmed).
    pub password_file: Option<PathBuf>,
    /// Read the password from this environment variable.
    pub password_env: Option<String>,
    /// A PEM bundle of CA certificates trusted for this upstream in addition to the system
    /// roots (a private registry with its own CA).
    pub ca_file: Option<PathBuf>,
    /// A tag resolved from upstream is served without asking again for this long.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Tags matching one of these glob patterns (`*` and `?`) never change: never revalidated.
    pub immutable_tags: Vec<String>,
    /// At most this many requests to this upstream at once.
    pub max_concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence on an upstream connection (never a limit on a whole transfer).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Token realms (URLs or origins; only scheme, host and port count) besides the
    /// upstream's own origin (scheme, host and port) that may receive its credentials. `https://auth.docker.io` is
    /// built in for `docker.io`.
    pub token_realms: Vec<String>,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |set: bool| if set { Some("<redacted>") } else { None };
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| redact_url(e)).collect();
        f.debug_struct("UpstreamConfig")
            .field("host", &self.host)
            .field("aliases", &self.aliases)
            .field("endpoints", &endpoints)
            .field("username", &self.username)
            .field("password", &redacted(self.password.is_some()))
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("ca_file", &self.ca_file)
            .field("tag_ttl", &self.tag_ttl)
            .field("immutable_tags", &self.immutable_tags)
            .field("max_concurrency", &self.max_concurrency)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("token_realms", &self.token_realms.iter().map(|r| redact_url(r)).collect::<Vec<_>>())
            .finish()
    }
}

/// `url` with any user info (`https://user:pw@host`) replaced by `<redacted>@`; text that
/// does not parse as a URL but contains an `@` before the path is redacted the same way.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut u) = reqwest::Url::parse(url) {
        if u.username().is_empty() && u.password().is_none() {
            return url.to_string();
        }
        let _ = u.set_username("");
        let _ = u.set_password(None);
        return u.as_str().replacen("://", "://<redacted>@", 1);
    }
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            default_upstream: "docker.io".into(),
            fill_timeout: Duration::from_secs(30 * 60),
            head_cache_ttl: Duration::from_secs(30),
            local_namespaces: Vec::new(),
            offline: false,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> UpstreamConfig {
        UpstreamConfig {
            host: String::new(),
            aliases: Vec::new(),
            endpoints: Vec::new(),
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            tag_ttl: Duration::from_secs(300),
            immutable_tags: Vec::new(),
            max_concurrency: 32,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            token_realms: Vec::new(),
        }
    }
}

impl UpstreamConfig {
    /// Docker Hub, as shipped.
    pub fn docker_hub() -> UpstreamConfig {
        UpstreamConfig {
            host: "docker.io".into(),
            aliases: vec!["index.docker.io".into(), "registry-1.docker.io".into()],
            endpoints: vec!["https://registry-1.docker.io".into()],
            ..UpstreamConfig::default()
        }
    }

    /// An upstream for a bare URL given with `--upstream`, named after its host[:port].
    pub fn from_url(url: &str) -> Result<UpstreamConfig, ConfigError> {
        let u = reqwest::Url::parse(url).map_err(|e| ConfigError::Invalid { key: "--upstream", why: e.to_string() })?;
        if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
            return Err(ConfigError::Invalid { key: "--upstream", why: "must be an http(s) URL or `none`".into() });
        }
        let host = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
            None => u.host_str().unwrap_or_default().to_string(),
        };
        Ok(UpstreamConfig { host, endpoints: vec![url.trim_end_matches('/').to_string()], ..UpstreamConfig::default() })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A connection must deliver a complete request head within this long (from its first
    /// byte, or from the end of the previous request on a kept-alive connection).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest silence inside a request body (an upload that sends nothing) and longest time
    /// a client may leave a response unread before the connection is cut. Never a limit on a
    /// whole transfer.
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Open client connections at most; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Open connections from one client address at most (`0`: no cap); more are closed at
    /// once. Clients behind a load balancer or NAT share one address.
    pub max_connections_per_client: usize,
    /// Streams (requests) one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Response bytes buffered per HTTP/2 stream beyond what the client's window takes.
    pub http2_max_send_buffer: ByteSize,
    /// An HTTP/2 connection with no open stream for this long is closed gracefully (GOAWAY).
    #[serde(with = "humantime_serde")]
    pub http2_idle_timeout: Duration,
    /// Requests per client address (`[server.rate_limit]`); off unless configured.
    pub rate_limit: RateLimitConfig,
    /// TLS on `listen` (`[server.tls]`): with it, `listen` speaks TLS only.
    pub tls: Option<TlsConfig>,
    /// A second listener speaking plain HTTP beside the TLS one (loopback, or behind a
    /// TLS-terminating proxy). Only with `[server.tls]`.
    pub plain_listen: Option<SocketAddr>,
}

/// `[server.tls]`: the certificate chain and key served on `server.listen`, re-read when the
/// files change (and on SIGHUP), and optional client certificates. Only paths here: no key
/// material is ever held in the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain: the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) for the first certificate of `cert`.
    pub key: PathBuf,
    /// PEM bundle of the CAs whose client certificates are accepted (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// `optional` (default with `client_ca`): a client may present a certificate;
    /// `required`: a client without a valid certificate fails the handshake.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// How often the files are checked for changes (mtime, size, inode); `0s`: only on SIGHUP.
    #[serde(default = "TlsConfig::default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl TlsConfig {
    fn default_reload_interval() -> Duration {
        Duration::from_secs(5)
    }

    /// Whether client certificates are asked for, and whether one is required.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.client_ca.as_ref().map(|_| self.client_auth.unwrap_or(ClientAuth::Optional))
    }
}

/// `server.tls.client_auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}

/// A token bucket per client address: `requests_per_second` on average, bursts of up to
/// `burst` requests. Past it, `429 TOOMANYREQUESTS` with `Retry-After`. Off when
/// `requests_per_second` is 0 (the default).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    /// Requests a client may send at once after being quiet; default two seconds' worth.
    pub burst: Option<u32>,
}

impl RateLimitConfig {
    pub fn enabled(&self) -> bool {
        self.requests_per_second > 0.0
    }

    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| (self.requests_per_second * 2.0).ceil().max(1.0) as u32)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where content lives: `fs` (under `root`) or `s3` (`[storage.s3]`).
    pub backend: BackendKind,
    /// Root directory of the filesystem store; with `backend = "s3"`, local scratch space
    /// (spools of writes in progress), never the content.
    pub root: PathBuf,
    /// fsync content and directories before each rename (off only for throw-away caches).
    pub fsync: bool,
    /// The object store, with `backend = "s3"`.
    pub s3: S3Config,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Fs,
    S3,
}

/// An S3-compatible bucket. `Debug` is written by hand: it never shows the secret key.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// The service URL (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:9000`);
    /// empty: AWS for `region`. A custom endpoint is addressed path-style.
    pub endpoint: String,
    /// Every object's key starts with this (`stevedore/`); empty for the bucket's root.
    pub prefix: String,
    /// Credentials; when none are given, the AWS environment (`AWS_ACCESS_KEY_ID`, ...,
    /// instance metadata) is used.
    pub access_key_id: Option<String>,
    pub access_key_id_file: Option<PathBuf>,
    pub access_key_id_env: Option<String>,
    pub secret_access_key: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    pub secret_access_key_env: Option<String>,
    /// Allow an `http://` endpoint (tests, a store on the same host); off: TLS only.
    pub allow_http: bool,
    /// Multipart upload part size (at least 5 MiB, S3's minimum).
    pub part_size: ByteSize,
    /// Memory for parts being uploaded, for the whole process (at least one part): writes
    /// spool to `storage.root` and wait for this budget before a part is sent.
    pub buffer_memory: ByteSize,
    /// The largest object the store copies in one `CopyObject` (S3: 5 GiB; some compatible
    /// stores allow less). A pushed blob larger than this is made visible by a server-side
    /// multipart copy (`UploadPartCopy`) in parts of at most this size.
    pub max_copy_size: ByteSize,
    /// Blob GETs are answered `307` to a presigned GET URL of the object (valid for
    /// `redirect_expiry`) instead of streamed through Stevedore; only for requests that
    /// passed authorization, the client fetches from the bucket's endpoint itself.
    pub redirect: bool,
    #[serde(with = "humantime_serde")]
    pub redirect_expiry: Duration,
    /// Blobs are written with conditional writes (`If-None-Match: *`), so that content in
    /// place is never replaced (first writer wins): `auto` detects them at start-up (a probe
    /// key in `meta/`), `always` / `never` say so. Without them a HEAD before each write keeps
    /// a blob in place (a narrower guard: two writers may both see it absent).
    pub conditional_put: ConditionalPut,
}

/// `storage.s3.conditional_put`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConditionalPut {
    #[default]
    Auto,
    Always,
    Never,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |set: bool| if set { Some("<redacted>") } else { None };
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &redact_url(&self.endpoint))
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("access_key_id_file", &self.access_key_id_file)
            .field("access_key_id_env", &self.access_key_id_env)
            .field("secret_access_key", &redacted(self.secret_access_key.is_some()))
            .field("secret_access_key_file", &self.secret_access_key_file)
            .field("secret_access_key_env", &self.secret_access_key_env)
            .field("allow_http", &self.allow_http)
            .field("part_size", &self.part_size)
            .field("buffer_memory", &self.buffer_memory)
            .field("max_copy_size", &self.max_copy_size)
            .field("redirect", &self.redirect)
            .field("redirect_expiry", &self.redirect_expiry)
            .field("conditional_put", &self.conditional_put)
            .finish()
    }
}

impl Default for S3Config {
    fn default() -> S3Config {
        S3Config {
            bucket: String::new(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            prefix: String::new(),
            access_key_id: None,
            access_key_id_file: None,
            access_key_id_env: None,
            secret_access_key: None,
            secret_access_key_file: None,
            secret_access_key_env: None,
            allow_http: false,
            part_size: ByteSize(8 << 20),
            buffer_memory: ByteSize(256 << 20),
            max_copy_size: ByteSize(5 << 30),
            redirect: false,
            redirect_expiry: Duration::from_secs(300),
            conditional_put: ConditionalPut::Auto,
        }
    }
}

/// One secret given inline, in a file (trailing newline trimmed) or in an environment
/// variable; `key` names it in errors.
pub fn read_secret(
    key: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<Option<String>, String> {
    match (inline, file, env) {
        (Some(v), _, _) => Ok(Some(v.clone())),
        (_, Some(f), _) => std::fs::read_to_string(f)
            .map(|s| Some(s.trim_end().to_string()))
            .map_err(|e| format!("{key}_file {}: {e}", f.display())),
        (_, _, Some(v)) => std::env::var(v).map(Some).map_err(|_| format!("{key}_env {v} is not set")),
        _ => Ok(None),
    }
}

impl S3Config {
    /// The access key id and secret key, if configured (both or neither).
    pub fn credentials(&self) -> Result<Option<(String, String)>, String> {
        let id = read_secret("access_key_id", &self.access_key_id, &self.access_key_id_file, &self.access_key_id_env)?;
        let secret = read_secret(
            "secret_access_key",
            &self.secret_access_key,
            &self.secret_access_key_file,
            &self.secret_access_key_env,
        )?;
        match (id, secret) {
            (Some(i), Some(s)) => Ok(Some((i, s))),
            (None, None) => Ok(None),
            _ => Err("give both access_key_id and secret_access_key (or neither, for the AWS environment)".into()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: String| Err(ConfigError::Invalid { key, why });
        if self.bucket.is_empty() {
            return invalid("storage.s3.bucket", "must be set with storage.backend = \"s3\"".into());
        }
        if self.region.is_empty() {
            return invalid("storage.s3.region", "must not be empty".into());
        }
        if !self.endpoint.is_empty() {
            match reqwest::Url::parse(&self.endpoint) {
                Ok(u) if u.scheme() == "https" || (u.scheme() == "http" && self.allow_http) => {}
                Ok(u) if u.scheme() == "http" => {
                    return invalid("storage.s3.endpoint", "is http:// but storage.s3.allow_http is off".into())
                }
                _ => {
                    return invalid(
                        "storage.s3.endpoint",
                        format!("{:?} is not an http(s) URL", redact_url(&self.endpoint)),
                    )
                }
            }
        }
        if self.prefix.starts_with('/') || self.prefix.split('/').any(|c| c == "." || c == "..") {
            return invalid("storage.s3.prefix", format!("{:?} must be a relative key prefix", self.prefix));
        }
        for (key, n) in [
            (
                "storage.s3.access_key_id",
                self.access_key_id.is_some() as u8
                    + self.access_key_id_file.is_some() as u8
                    + self.access_key_id_env.is_some() as u8,
            ),
            (
                "storage.s3.secret_access_key",
                self.secret_access_key.is_some() as u8
                    + self.secret_access_key_file.is_some() as u8
                    + self.secret_access_key_env.is_some() as u8,
            ),
        ] {
            if n > 1 {
                return invalid(key, "give one of the value, _file and _env".into());
            }
        }
        if let Err(why) = self.credentials() {
            return invalid("storage.s3.secret_access_key", why);
        }
        if self.part_size.0 < 5 << 20 || self.part_size.0 > 5 << 30 {
            return invalid("storage.s3.part_size", "must be between 5MiB and 5GiB".into());
        }
        if self.buffer_memory.0 < self.part_size.0 {
            return invalid("storage.s3.buffer_memory", "must hold at least one part (storage.s3.part_size)".into());
        }
        if self.max_copy_size.0 < 5 << 20 || self.max_copy_size.0 > 5 << 30 {
            return invalid("storage.s3.max_copy_size", "must be between 5MiB and 5GiB".into());
        }
        // SigV4 presigned URLs are valid for 7 days at most.
        if self.redirect
            && (self.redirect_expiry < Duration::from_secs(1) || self.redirect_expiry > Duration::from_secs(7 * 86400))
        {
            return invalid("storage.s3.redirect_expiry", "must be between 1s and 7 days".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadsConfig {
    /// An upload session untouched for this long is removed.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// How often idle sessions are looked for.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Open upload sessions at most, in all; past it a new session gets `429`.
    pub max_sessions: usize,
    /// Open upload sessions at most per client address.
    pub max_sessions_per_client: usize,
    /// The largest blob a client may upload (`"100GiB"`, or a number of bytes).
    pub max_size: ByteSize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Entries in the in-memory descriptor cache (digest → size, repository links).
    pub descriptors: u64,
    /// The most bytes of proxied content kept (`"200GiB"`); unset: no cap. Pushed and
    /// imported content is reported beside it and never evicted by it.
    pub max_size: Option<ByteSize>,
    /// Past this much proxied content (a fraction of `max_size` or a size), least recently
    /// used proxied content is evicted ...
    pub high_watermark: Watermark,
    /// ... until it is under this much.
    pub low_watermark: Watermark,
    /// Evict proxied content nobody used for this long (unset: no age limit).
    #[serde(with = "humantime_serde")]
    pub max_unused: Option<Duration>,
    /// How often usage is measured (and the cap and age limit applied).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Accesses are batched in memory and recorded in the store this often (and at shutdown).
    #[serde(with = "humantime_serde")]
    pub access_flush_interval: Duration,
    /// How often the online garbage collection of pushed repositories runs (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Content and links younger than this (or used since) are never collected: a blob
    /// uploaded for a manifest not pushed yet stays this long.
    #[serde(with = "humantime_serde")]
    pub gc_grace: Duration,
}

/// A watermark: a fraction of `cache.max_size` (`0.95`) or a size (`"190GiB"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Watermark {
    Fraction(f64),
    Size(ByteSize),
}

impl Watermark {
    /// The watermark in bytes for a cap of `max` bytes.
    pub fn bytes(&self, max: u64) -> u64 {
        match self {
            Watermark::Fraction(f) => (max as f64 * f) as u64,
            Watermark::Size(s) => s.0.min(max),
        }
    }
}

impl<'de> Deserialize<'de> for Watermark {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Watermark, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Float(f) if f > 0.0 && f <= 1.0 => Ok(Watermark::Fraction(f)),
            Raw::Float(f) => Err(serde::de::Error::custom(format!("{f} is not a fraction in (0, 1] (or give a size)"))),
            Raw::Text(s) => s.parse().map(Watermark::Size).map_err(serde::de::Error::custom),
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
            uploads: UploadsConfig::default(),
            cache: CacheConfig::default(),
            proxy: ProxyConfig::default(),
            upstreams: vec![UpstreamConfig::docker_hub()],
            auth: AuthConfig::default(),
            redis: RedisConfig::default(),
            cluster: ClusterConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: "0.0.0.0:5000".parse().unwrap(),
            shutdown_grace: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_client: 256,
            http2_max_concurrent_streams: 64,
            http2_max_send_buffer: ByteSize(64 << 10),
            http2_idle_timeout: Duration::from_secs(60),
            rate_limit: RateLimitConfig::default(),
            tls: None,
            plain_listen: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig { backend: BackendKind::Fs, root: PathBuf::from("./data"), fsync: true, s3: S3Config::default() }
    }
}

impl Default for UploadsConfig {
    fn default() -> UploadsConfig {
        UploadsConfig {
            session_ttl: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(600),
            max_sessions: 10_000,
            max_sessions_per_client: 1_000,
            max_size: ByteSize(100 << 30),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            descriptors: 100_000,
            max_size: None,
            high_watermark: Watermark::Fraction(0.95),
            low_watermark: Watermark::Fraction(0.85),
            max_unused: None,
            check_interval: Duration::from_secs(60),
            access_flush_interval: Duration::from_secs(30),
            gc_interval: Duration::from_secs(3600),
            gc_grace: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("{key}: {why}")]
    Invalid { key: &'static str, why: String },
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text).map_err(|source| ConfigError::Parse { path: path.into(), source: Box::new(source) })
    }

    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| Err(ConfigError::Invalid { key, why: why.into() });
        if self.storage.root.as_os_str().is_empty() {
            return invalid("storage.root", "must not be empty");
        }
        if self.storage.backend == BackendKind::S3 {
            self.storage.s3.validate()?;
        }
        self.cluster.validate(&self.redis)?;
        if self.uploads.session_ttl.is_zero() {
            return invalid("uploads.session_ttl", "must be longer than 0s");
        }
        if self.uploads.sweep_interval.is_zero() {
            return invalid("uploads.sweep_interval", "must be longer than 0s");
        }
        if self.cache.descriptors == 0 {
            return invalid("cache.descriptors", "must be at least 1");
        }
        if let Some(max) = self.cache.max_size {
            let (hi, lo) = (self.cache.high_watermark.bytes(max.0), self.cache.low_watermark.bytes(max.0));
            if lo >= hi {
                return invalid("cache.low_watermark", "must be below cache.high_watermark");
            }
        }
        if self.cache.check_interval.is_zero() || self.cache.access_flush_interval.is_zero() {
            return invalid("cache.check_interval", "must be longer than 0s (and so must access_flush_interval)");
        }
        if self.server.header_read_timeout.is_zero() {
            return invalid("server.header_read_timeout", "must be longer than 0s");
        }
        if self.server.body_idle_timeout.is_zero() {
            return invalid("server.body_idle_timeout", "must be longer than 0s");
        }
        if self.server.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        if self.server.http2_max_concurrent_streams == 0 {
            return invalid("server.http2_max_concurrent_streams", "must be at least 1");
        }
        if self.server.http2_max_send_buffer.0 < 1 << 10 || self.server.http2_max_send_buffer.0 > 16 << 20 {
            return invalid("server.http2_max_send_buffer", "must be between 1KiB and 16MiB");
        }
        if self.server.http2_idle_timeout.is_zero() {
            return invalid("server.http2_idle_timeout", "must be longer than 0s");
        }
        let rl = &self.server.rate_limit;
        if !rl.requests_per_second.is_finite() || rl.requests_per_second < 0.0 {
            return invalid("server.rate_limit.requests_per_second", "must be a number of requests, 0 for no limit");
        }
        if rl.enabled() && rl.burst() == 0 {
            return invalid("server.rate_limit.burst", "must be at least 1");
        }
        if self.uploads.max_sessions == 0 || self.uploads.max_sessions_per_client == 0 {
            return invalid("uploads.max_sessions", "must be at least 1 (and so must max_sessions_per_client)");
        }
        if self.uploads.max_size.0 == 0 {
            return invalid("uploads.max_size", "must be at least 1 byte");
        }
        match &self.server.tls {
            Some(t) => {
                if t.client_auth.is_some() && t.client_ca.is_none() {
                    return invalid("server.tls.client_auth", "needs server.tls.client_ca (the CAs to verify against)");
                }
                if self.server.plain_listen == Some(self.server.listen) && self.server.listen.port() != 0 {
                    return invalid("server.plain_listen", "must differ from server.listen");
                }
                // Read and checked as at start-up, so `check-config` finds a broken pair too.
                crate::tls::TlsFiles::load(t).map_err(|e| ConfigError::Invalid { key: e.key(), why: e.to_string() })?;
            }
            None if self.server.plain_listen.is_some() => {
                return invalid(
                    "server.plain_listen",
                    "only with [server.tls] (without TLS, server.listen speaks plain HTTP already)",
                );
            }
            None => {}
        }
        let mut seen = std::collections::HashSet::new();
        for u in &self.upstreams {
            if u.host.is_empty() || u.host.contains('/') || u.host != u.host.to_ascii_lowercase() {
                return invalid("upstreams.host", &format!("{:?} must be a lowercase registry host", u.host));
            }
            for name in std::iter::once(&u.host).chain(&u.aliases) {
                if !seen.insert(name.as_str()) {
                    return invalid("upstreams.aliases", &format!("{name} names more than one upstream"));
                }
            }
            for e in &u.endpoints {
                match reqwest::Url::parse(e) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                    _ => return invalid("upstreams.endpoints", &format!("{:?} is not an http(s) URL", redact_url(e))),
                }
            }
            if u.max_concurrency == 0 {
                return invalid("upstreams.max_concurrency", "must be at least 1");
            }
            for p in &u.immutable_tags {
                if let Err(e) = crate::oci::glob::check(p) {
                    return invalid("upstreams.immutable_tags", &format!("upstream {}: {:?}: {e}", u.host, shorten(p)));
                }
            }
            if u.password.is_some() as u8 + u.password_file.is_some() as u8 + u.password_env.is_some() as u8 > 1 {
                return invalid("upstreams.password", "give one of password, password_file, password_env");
            }
            if let Some(f) = &u.ca_file {
                check_ca_file(&u.host, f)?;
            }
            for r in &u.token_realms {
                match reqwest::Url::parse(r) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
                    _ => {
                        return invalid(
                            "upstreams.token_realms",
                            &format!("upstream {}: {:?} is not an http(s) URL", u.host, redact_url(r)),
                        )
                    }
                }
            }
        }
        for p in &self.proxy.local_namespaces {
            if p.is_empty() || p.starts_with('/') {
                return invalid("proxy.local_namespaces", &format!("{p:?} is not a repository-name glob"));
            }
            if let Err(e) = crate::oci::glob::check(p) {
                return invalid("proxy.local_namespaces", &format!("{:?}: {e}", shorten(p)));
            }
            // A pattern inside an upstream's namespace could never take effect: those names
            // are the upstream's, read-only.
            let first = p.split('/').next().unwrap_or_default();
            for u in &self.upstreams {
                let ns = u.host.replace(':', "-");
                if std::iter::once(&u.host).chain(&u.aliases).any(|n| n == first) || ns == first {
                    return invalid(
                        "proxy.local_namespaces",
                        &format!("{p:?} lies in the namespace of upstream {}, which is never local", u.host),
                    );
                }
            }
        }
        if !self.proxy.default_upstream.is_empty() && !seen.contains(self.proxy.default_upstream.as_str()) {
            return invalid(
                "proxy.default_upstream",
                &format!("{} is not a configured upstream", self.proxy.default_upstream),
            );
        }
        self.auth.validate()?;
        if self.redis.enabled() && self.auth.enabled() && self.auth.token_key_file.is_none() {
            // A key generated in memory is this replica's alone: a token it issued would be
            // refused by every other replica behind the same load balancer.
            return invalid(
                "auth.token_key_file",
                "must be set with [redis] and [auth]: every replica signs and checks tokens with one key, a file \
                 they all read (a Kubernetes Secret, a shared volume)",
            );
        }
        Ok(())
    }
}

/// A pattern as errors show it: its first 64 characters.
fn shorten(p: &str) -> String {
    match p.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &p[..i]),
        None => p.to_string(),
    }
}

/// The CA bundle must be there, readable and hold usable certificates, as at start-up: so
/// `check-config` finds a broken one too.
fn check_ca_file(host: &str, f: &std::path::Path) -> Result<(), ConfigError> {
    let why = if f.as_os_str().is_empty() {
        "must not be empty".to_string()
    } else {
        match crate::upstream::ca::load_ca_file(f) {
            Ok(_) => return Ok(()),
            Err(e) => format!("{}: {e}", f.display()),
        }
    };
    Err(ConfigError::Invalid { key: "upstreams.ca_file", why: format!("upstream {host}: {why}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No secret of any config struct shows in `Debug` output (`{:?}` and `{:#?}`) of the
    /// whole `Config`.
    #[test]
    fn debug_of_the_whole_config_shows_no_secret() {
        let c = Config::parse(
            r#"
            [redis]
            url = "redis://stevedore:redis-pw-Lp4@127.0.0.1:6379/0"
            [cluster]
            secret = "cluster-secret-Mm7-0123456789"
            advertise = "http://carl:advertise-pw-Tt5@127.0.0.1:5000"
            [storage.s3]
            bucket = "b"
            access_key_id = "AKIA-id-Nn6"
            secret_access_key = "s3-secret-Oo9"
            [[upstreams]]
            host = "up.test"
            endpoints = ["https://eve:endpoint-pw-Rr3@127.0.0.1:9"]
            username = "bob"
            password = "upstream-pw-Qq2"
            token_realms = ["https://eve:realm-pw-Ss8@127.0.0.1:9"]
            "#,
        )
        .unwrap();
        let shown = format!("{c:?}\n{c:#?}");
        for secret in [
            "redis-pw-Lp4",
            "cluster-secret-Mm7",
            "advertise-pw-Tt5",
            "s3-secret-Oo9",
            "endpoint-pw-Rr3",
            "upstream-pw-Qq2",
            "realm-pw-Ss8",
        ] {
            assert!(!shown.contains(secret), "Debug of Config shows {secret}:\n{c:#?}");
        }
        // The access key id is an identifier (it is in the bucket's own logs), not a secret.
        assert!(shown.contains("up.test") && shown.contains("AKIA-id-Nn6") && shown.contains("<redacted>"), "{c:#?}");
    }

    #[test]
    fn shipped_config_matches_defaults() {
        let text = include_str!("../config/stevedore.toml");
        let c = Config::parse(text).unwrap();
        let d = Config::default();
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.storage.root, d.storage.root);
        assert_eq!(c.uploads.session_ttl, d.uploads.session_ttl);
        assert_eq!(c.server.header_read_timeout, d.server.header_read_timeout);
        assert_eq!(c.server.body_idle_timeout, d.server.body_idle_timeout);
        assert_eq!(c.server.max_connections, d.server.max_connections);
        assert_eq!(c.server.max_connections_per_client, d.server.max_connections_per_client);
        assert_eq!(c.server.http2_max_concurrent_streams, d.server.http2_max_concurrent_streams);
        assert_eq!(c.server.http2_max_send_buffer.0, d.server.http2_max_send_buffer.0);
        assert_eq!(c.server.http2_idle_timeout, d.server.http2_idle_timeout);
        assert_eq!(c.proxy.local_namespaces, d.proxy.local_namespaces);
        assert_eq!(c.upstreams[0].token_realms, d.upstreams[0].token_realms);
        assert_eq!(c.uploads.max_sessions, d.uploads.max_sessions);
        assert_eq!(c.uploads.max_sessions_per_client, d.uploads.max_sessions_per_client);
        assert_eq!(c.uploads.max_size, d.uploads.max_size);
        assert_eq!(c.server.rate_limit.requests_per_second, d.server.rate_limit.requests_per_second);
        assert_eq!(c.auth.htpasswd, d.auth.htpasswd);
        assert_eq!(c.auth.anonymous, d.auth.anonymous);
        assert_eq!(c.auth.token_ttl, d.auth.token_ttl);
        assert_eq!(c.auth.service, d.auth.service);
        assert_eq!(c.auth.metrics, d.auth.metrics);
        assert!(c.auth.rules.is_empty() && c.auth.groups.is_empty() && c.auth.token_key_file.is_none());
        assert_eq!(c.cache.max_size, d.cache.max_size);
        assert_eq!(c.cache.high_watermark, d.cache.high_watermark);
        assert_eq!(c.cache.low_watermark, d.cache.low_watermark);
        assert_eq!(c.cache.max_unused, d.cache.max_unused);
        assert_eq!(c.cache.check_interval, d.cache.check_interval);
        assert_eq!(c.cache.access_flush_interval, d.cache.access_flush_interval);
        assert_eq!(c.cache.gc_interval, d.cache.gc_interval);
        assert_eq!(c.cache.gc_grace, d.cache.gc_grace);
        c.validate().unwrap();
    }

    #[test]
    fn auth_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("htpasswd");
        std::fs::write(&f, format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap())).unwrap();
        let with = |extra: &str| {
            Config::parse(&format!("[auth]\nhtpasswd = {:?}\n{extra}", f.display().to_string())).unwrap().validate()
        };
        with("").unwrap();
        with("anonymous = \"none\"\nmetrics = \"authenticated\"\ntoken_ttl = \"30s\"").unwrap();
        with("metrics = \"admin\"\n[[auth.rules]]\nrepositories = [\"*\"]\nusers = [\"alice\"]\nactions = [\"admin\"]")
            .unwrap();
        for (extra, key) in [
            ("token_ttl = \"0s\"", "auth.token_ttl"),
            ("service = \"a b\"", "auth.service"),
            ("realm = \"ftp://x/token\"", "auth.realm"),
            ("metrics = \"admin\"", "auth.metrics"),
            ("[[auth.rules]]\nrepositories = [\"*\"]\nusers = [\"alice\"]", "auth.rules"),
            ("[[auth.rules]]\nrepositories = [\"*\"]\nactions = [\"pull\"]", "auth.rules"),
            ("[[auth.rules]]\nrepositories = [\"*\"]\ngroups = [\"nope\"]\nactions = [\"pull\"]", "auth.rules"),
        ] {
            match with(extra) {
                Err(ConfigError::Invalid { key: k, .. }) if k == key => {}
                other => panic!("{extra}: {other:?}"),
            }
        }
        assert!(Config::parse("[auth]\nanonymous = \"maybe\"").is_err());
        assert!(Config::parse("[[auth.rules]]\nactions = [\"fly\"]").is_err());
        // [auth] keys without htpasswd: auth would silently stay off.
        let c = Config::parse("[auth]\nanonymous = \"none\"").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "auth.htpasswd", .. })));
        // A missing or non-bcrypt htpasswd file fails at start-up (and in check-config).
        std::fs::write(&f, "alice:$apr1$x$y\n").unwrap();
        let e = with("").unwrap_err().to_string();
        assert!(e.contains("auth.htpasswd") && e.contains("bcrypt") && !e.contains("apr1"), "{e}");
        std::fs::remove_file(&f).unwrap();
        assert!(matches!(with(""), Err(ConfigError::Invalid { key: "auth.htpasswd", .. })));
    }

    #[test]
    fn byte_sizes() {
        for (text, want) in [
            ("0", 0u64),
            ("512", 512),
            ("512B", 512),
            ("1KB", 1000),
            ("1KiB", 1024),
            ("1.5 GiB", 3 << 29),
            ("200GiB", 200 << 30),
            ("2TB", 2_000_000_000_000),
            ("1Ti", 1 << 40),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(want)), "{text}");
        }
        for bad in ["", "GiB", "12 parsecs", "-1GiB", "1e400", "99999999999TiB", "1.2.3MiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(ByteSize(100 << 30).to_string(), "100GiB");
        assert_eq!(ByteSize(1001).to_string(), "1001 bytes");
        let c = Config::parse("[uploads]\nmax_size = \"1MiB\"\n").unwrap();
        assert_eq!(c.uploads.max_size, ByteSize(1 << 20));
        let c = Config::parse("[uploads]\nmax_size = 4096\n").unwrap();
        assert_eq!(c.uploads.max_size, ByteSize(4096));
        assert!(Config::parse("[uploads]\nmax_size = \"lots\"\n").is_err());
    }

    #[test]
    fn cache_cap_and_watermarks() {
        let c = Config::parse(
            "[cache]\nmax_size = \"200GiB\"\nhigh_watermark = \"190GiB\"\nlow_watermark = 0.5\nmax_unused = \"30d\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let max = c.cache.max_size.unwrap().0;
        assert_eq!(max, 200 << 30);
        assert_eq!(c.cache.high_watermark.bytes(max), 190 << 30);
        assert_eq!(c.cache.low_watermark.bytes(max), 100 << 30);
        assert_eq!(c.cache.max_unused, Some(Duration::from_secs(30 * 86400)));
        let d = Config::default();
        assert_eq!((d.cache.high_watermark.bytes(1000), d.cache.low_watermark.bytes(1000)), (950, 850));
        assert!(Config::parse("[cache]\nhigh_watermark = 1.5").is_err());
        let bad = Config::parse("[cache]\nmax_size = \"1GiB\"\nhigh_watermark = 0.5\nlow_watermark = 0.6").unwrap();
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "cache.low_watermark", .. })));
    }

    #[test]
    fn upstreams() {
        let c = Config::parse(
            r#"
            [proxy]
            default_upstream = "ghcr.io"
            [[upstreams]]
            host = "ghcr.io"
            tag_ttl = "1m"
            immutable_tags = ["v*"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].tag_ttl, Duration::from_secs(60));
        let bad = Config::parse("[proxy]\ndefault_upstream = \"quay.io\"").unwrap();
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "proxy.default_upstream", .. })));
        let u = UpstreamConfig::from_url("http://127.0.0.1:5001/").unwrap();
        assert_eq!((u.host.as_str(), u.endpoints[0].as_str()), ("127.0.0.1:5001", "http://127.0.0.1:5001"));
        assert!(UpstreamConfig::from_url("ftp://x").is_err());
    }

    #[test]
    fn shipped_multi_upstream_example_is_valid() {
        let c = Config::parse(include_str!("../config/multi-upstream.toml")).unwrap();
        c.validate().unwrap();
        let hosts: Vec<&str> = c.upstreams.iter().map(|u| u.host.as_str()).collect();
        assert_eq!(hosts, ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"]);
    }

    #[test]
    fn ca_file_is_checked_by_validate() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, crate::upstream::ca::tests::ca_pem("private CA")).unwrap();
        let with_ca = |f: &str| {
            Config::parse(&format!(
                "[proxy]\ndefault_upstream = \"\"\n[[upstreams]]\nhost = \"registry.internal\"\nca_file = {f:?}\n"
            ))
            .unwrap()
        };
        with_ca(good.to_str().unwrap()).validate().unwrap();
        let missing = dir.path().join("missing.pem");
        for f in ["", missing.to_str().unwrap()] {
            let e = with_ca(f).validate().unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { key: "upstreams.ca_file", .. }), "{e}");
            assert!(e.to_string().contains("registry.internal") && e.to_string().contains(f), "{e}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = Config::parse(
            r#"
            [proxy]
            default_upstream = ""
            [[upstreams]]
            host = "registry.internal"
            endpoints = ["https://bob:hunter2-in-url@registry.internal:8443/"]
            username = "alice"
            password = "s3cret-password"
            token_realms = ["https://carol:realm-pass@auth.internal/token"]
            "#,
        )
        .unwrap();
        for text in [format!("{c:?}"), format!("{:#?}", c.upstreams[0])] {
            for secret in ["s3cret-password", "hunter2-in-url", "realm-pass", "bob:", "carol:"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(
                text.contains("<redacted>") && text.contains("alice") && text.contains("registry.internal"),
                "{text}"
            );
        }
        assert_eq!(redact_url("https://u:p@h:1/x"), "https://<redacted>@h:1/x");
        assert_eq!(redact_url("https://h/x"), "https://h/x");
        assert_eq!(redact_url("h t t p://u:p@h/x"), "h t t p://<redacted>@h/x");
        // A bad endpoint is reported without its user info.
        let bad = Config::parse(
            "[proxy]\ndefault_upstream = \"\"\n[[upstreams]]\nhost = \"x.io\"\nendpoints = [\"ftp://u:pw@x.io\"]\n",
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("upstreams.endpoints") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn server_limits_and_local_namespaces() {
        let d = Config::default();
        assert_eq!(d.server.header_read_timeout, Duration::from_secs(30));
        assert_eq!(d.server.body_idle_timeout, Duration::from_secs(60));
        assert_eq!(d.server.max_connections, 4096);
        assert_eq!(d.server.max_connections_per_client, 256);
        assert_eq!(d.server.http2_max_concurrent_streams, 64);
        assert_eq!(d.server.http2_max_send_buffer.0, 64 << 10);
        assert_eq!(d.server.http2_idle_timeout, Duration::from_secs(60));
        assert!(d.proxy.local_namespaces.is_empty());
        for (text, key) in [
            ("[server]\nheader_read_timeout = \"0s\"", "server.header_read_timeout"),
            ("[server]\nbody_idle_timeout = \"0s\"", "server.body_idle_timeout"),
            ("[server]\nmax_connections = 0", "server.max_connections"),
            ("[server]\nhttp2_max_concurrent_streams = 0", "server.http2_max_concurrent_streams"),
            ("[server]\nhttp2_max_send_buffer = \"512B\"", "server.http2_max_send_buffer"),
            ("[server]\nhttp2_idle_timeout = \"0s\"", "server.http2_idle_timeout"),
            ("[proxy]\nlocal_namespaces = [\"\"]", "proxy.local_namespaces"),
            ("[proxy]\nlocal_namespaces = [\"docker.io/*\"]", "proxy.local_namespaces"),
            ("[[upstreams]]\nhost = \"docker.io\"\ntoken_realms = [\"auth\"]", "upstreams.token_realms"),
        ] {
            let c = Config::parse(text).unwrap();
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) if k == key => {}
                other => panic!("{text}: {other:?}"),
            }
        }
        let c = Config::parse("[proxy]\nlocal_namespaces = [\"team/*\", \"ci/*\"]").unwrap();
        c.validate().unwrap();
        assert_eq!(c.proxy.local_namespaces, ["team/*", "ci/*"]);
    }

    #[test]
    fn replicas_with_auth_share_one_token_key_and_may_advertise_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, "").unwrap();
        let fleet = "[redis]\nurl = \"redis://127.0.0.1:6379/\"\n[cluster]\nsecret = \"0123456789abcdef\"\n";
        let with = |cluster: &str, auth: &str| {
            Config::parse(&format!("{fleet}{cluster}\n[auth]\nhtpasswd = {htpasswd:?}\n{auth}\n")).unwrap().validate()
        };
        let advertise = "advertise = \"http://10.0.0.5:5000\"";
        match with(advertise, "") {
            Err(ConfigError::Invalid { key: "auth.token_key_file", why }) => assert!(why.contains("one key"), "{why}"),
            other => panic!("[redis] + [auth] without a token key: {other:?}"),
        }
        with(advertise, "token_key_file = \"/run/secrets/token-key.pem\"").unwrap();
        // Without [redis], one replica may keep its key in memory.
        Config::parse(&format!("[auth]\nhtpasswd = {htpasswd:?}\n")).unwrap().validate().unwrap();

        // cluster.advertise_env: the variable must be set; the URL must be http(s).
        let var = "STEVEDORE_TEST_ADVERTISE_CONFIG";
        let key = "token_key_file = \"/k.pem\"";
        std::env::remove_var(var);
        let unset = with(&format!("advertise_env = \"{var}\""), key);
        assert!(matches!(unset, Err(ConfigError::Invalid { key: "cluster.advertise", .. })), "{unset:?}");
        std::env::set_var(var, "http://10.1.2.3:5000");
        with(&format!("advertise_env = \"{var}\""), key).unwrap();
        let c = Config::parse(&format!("[cluster]\nadvertise_env = \"{var}\"\n")).unwrap();
        assert_eq!(c.cluster.advertise().unwrap().as_deref(), Some("http://10.1.2.3:5000"));
        std::env::set_var(var, "10.1.2.3:5000");
        let bad = with(&format!("advertise_env = \"{var}\""), key);
        assert!(matches!(bad, Err(ConfigError::Invalid { key: "cluster.advertise", .. })), "{bad:?}");
        std::env::remove_var(var);
    }

    #[test]
    fn server_tls_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::tls::tests::ca("config CA");
        let (cert, key) = crate::tls::tests::leaf(&ca, Some("127.0.0.1"), &["127.0.0.1"]);
        let (c, k, cap) = (dir.path().join("s.pem"), dir.path().join("s.key"), dir.path().join("ca.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        std::fs::write(&cap, ca.pem()).unwrap();
        let tls = |extra: &str| {
            Config::parse(&format!("[server]\n{extra}\n[server.tls]\ncert = {c:?}\nkey = {k:?}\n")).unwrap()
        };
        let ok = tls("plain_listen = \"127.0.0.1:5001\"");
        ok.validate().unwrap();
        let t = ok.server.tls.as_ref().unwrap();
        assert_eq!((t.reload_interval, t.client_auth()), (Duration::from_secs(5), None));
        assert_eq!(ok.server.plain_listen, Some("127.0.0.1:5001".parse().unwrap()));
        let with_ca = Config::parse(&format!(
            "[server.tls]\ncert = {c:?}\nkey = {k:?}\nclient_ca = {cap:?}\nreload_interval = \"0s\"\n"
        ))
        .unwrap();
        with_ca.validate().unwrap();
        assert_eq!(with_ca.server.tls.as_ref().unwrap().client_auth(), Some(ClientAuth::Optional));
        let with_ca = Config::parse(&format!(
            "[server.tls]\ncert = {c:?}\nkey = {k:?}\nclient_ca = {cap:?}\nclient_auth = \"required\"\n"
        ))
        .unwrap();
        assert_eq!(with_ca.server.tls.as_ref().unwrap().client_auth(), Some(ClientAuth::Required));
        assert!(Config::parse("[server.tls]\ncert = \"a\"\nkey = \"b\"\nclient_auth = \"sometimes\"").is_err());
        assert!(Config::parse("[server.tls]\ncert = \"a\"").is_err(), "key is required");
        for (bad, key) in [
            (Config::parse("[server]\nplain_listen = \"127.0.0.1:5001\"").unwrap(), "server.plain_listen"),
            (tls("listen = \"127.0.0.1:5001\"\nplain_listen = \"127.0.0.1:5001\""), "server.plain_listen"),
            (
                Config::parse(&format!("[server.tls]\ncert = {c:?}\nkey = {k:?}\nclient_auth = \"required\"\n"))
                    .unwrap(),
                "server.tls.client_auth",
            ),
            (Config::parse(&format!("[server.tls]\ncert = {c:?}\nkey = {c:?}\n")).unwrap(), "server.tls.key"),
            (
                Config::parse(&format!("[server.tls]\ncert = \"/nonexistent.pem\"\nkey = {k:?}\n")).unwrap(),
                "server.tls.cert",
            ),
        ] {
            match bad.validate() {
                Err(ConfigError::Invalid { key: k, .. }) if k == key => {}
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[test]
    fn s3_storage() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, "file-secret-key\n").unwrap();
        let base = "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\nprefix = \"reg/\"\n";
        let c = Config::parse(&format!("{base}access_key_id = \"AKID\"\nsecret_access_key = \"inline-secret-key\"\n"))
            .unwrap();
        c.validate().unwrap();
        assert_eq!(c.storage.backend, BackendKind::S3);
        assert_eq!(c.storage.s3.credentials().unwrap(), Some(("AKID".into(), "inline-secret-key".into())));
        let text = format!("{c:?}");
        assert!(!text.contains("inline-secret-key") && text.contains("<redacted>") && text.contains("AKID"), "{text}");
        let c = Config::parse(&format!(
            "{base}access_key_id = \"AKID\"\nsecret_access_key_file = {:?}\n",
            secret_file.to_str().unwrap()
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.storage.s3.credentials().unwrap().unwrap().1, "file-secret-key");
        std::env::set_var("STEVEDORE_TEST_S3_SECRET", "env-secret-key");
        let c = Config::parse(&format!(
            "{base}access_key_id = \"AKID\"\nsecret_access_key_env = \"STEVEDORE_TEST_S3_SECRET\"\n"
        ))
        .unwrap();
        assert_eq!(c.storage.s3.credentials().unwrap().unwrap().1, "env-secret-key");
        // The default is the filesystem, and [storage.s3] is not looked at then.
        assert_eq!(Config::default().storage.backend, BackendKind::Fs);
        Config::parse("[storage.s3]\nbucket = \"\"\n").unwrap().validate().unwrap();
        for (extra, key) in [
            ("bucket = \"\"", "storage.s3.bucket"),
            ("secret_access_key = \"x\"", "storage.s3.secret_access_key"),
            ("part_size = \"1MiB\"", "storage.s3.part_size"),
            ("buffer_memory = \"1MiB\"", "storage.s3.buffer_memory"),
            ("max_copy_size = \"1MiB\"", "storage.s3.max_copy_size"),
            ("max_copy_size = \"6GiB\"", "storage.s3.max_copy_size"),
            (
                "secret_access_key_env = \"STEVEDORE_TEST_UNSET_VAR\"\naccess_key_id = \"a\"",
                "storage.s3.secret_access_key",
            ),
        ] {
            // Later keys win in this test by replacing the bucket line.
            let text = if extra.starts_with("bucket") {
                base.replace("bucket = \"b\"", extra)
            } else {
                format!("{base}{extra}\n")
            };
            match Config::parse(&text).unwrap().validate() {
                Err(ConfigError::Invalid { key: k, .. }) if k == key => {}
                other => panic!("{extra}: {other:?}"),
            }
        }
        let no_http = base.replace("allow_http = true\n", "");
        assert!(matches!(
            Config::parse(&no_http).unwrap().validate(),
            Err(ConfigError::Invalid { key: "storage.s3.endpoint", .. })
        ));
        assert!(Config::parse("[storage]\nbackend = \"gcs\"\n").is_err());
        assert!(Config::parse("[storage.s3]\nbuckett = \"b\"\n").is_err());
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Config::parse("[server]\nlisten = \"nope\"").is_err());
        assert!(Config::parse("[storage]\nroots = \"x\"").is_err());
        let c = Config::parse("[uploads]\nsession_ttl = \"0s\"").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "uploads.session_ttl", .. })));
        let c = Config::parse("[uploads]\nsession_ttl = \"90m\"").unwrap();
        assert_eq!(c.uploads.session_ttl, Duration::from_secs(5400));
    }
}

/// A number of bytes, written in the config as an integer or with a unit: `"512MiB"`,
/// `"200GiB"`, `"1.5TB"` (`K`/`M`/`G`/`T` are powers of 1000, `Ki`/`Mi`/`Gi`/`Ti` of 1024; a
/// trailing `B` is optional).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = (t[..split].trim(), t[split..].trim());
        let scale: u64 = match unit.strip_suffix(['B', 'b']).unwrap_or(unit) {
            "" => 1,
            "K" | "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")),
        };
        let bad = || format!("{s:?} is not a size (e.g. \"512MiB\", \"200GiB\" or a number of bytes)");
        if num.is_empty() {
            return Err(bad());
        }
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(scale).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"));
        }
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * scale as f64;
        if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
            return Err(format!("{s:?} is too large"));
        }
        Ok(ByteSize(v.round() as u64))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        for (unit, scale) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= scale && n.is_multiple_of(scale) {
                return write!(f, "{}{unit}", n / scale);
            }
        }
        write!(f, "{n} bytes")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}
