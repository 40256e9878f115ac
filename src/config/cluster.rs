//! `[redis]` and `[cluster]`: replicas of one store, their coordination and this replica's
//! place among them.

#[allow(unused_imports)]
use super::*;

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
            heartbeat_interval: Duration::from_secs(10),
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

    pub(super) fn validate(&self, redis: &RedisConfig) -> Result<(), ConfigError> {
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
