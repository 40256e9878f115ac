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
}

#[derive(Clone, Debug, Deserialize)]
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
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            default_upstream: "docker.io".into(),
            fill_timeout: Duration::from_secs(30 * 60),
            head_cache_ttl: Duration::from_secs(30),
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
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Root directory of the filesystem store.
    pub root: PathBuf,
    /// fsync content and directories before each rename (off only for throw-away caches).
    pub fsync: bool,
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
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Entries in the in-memory descriptor cache (digest → size, repository links).
    pub descriptors: u64,
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
        }
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig { listen: "0.0.0.0:5000".parse().unwrap(), shutdown_grace: Duration::from_secs(30) }
    }
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig { root: PathBuf::from("./data"), fsync: true }
    }
}

impl Default for UploadsConfig {
    fn default() -> UploadsConfig {
        UploadsConfig { session_ttl: Duration::from_secs(24 * 3600), sweep_interval: Duration::from_secs(600) }
    }
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig { descriptors: 100_000 }
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
        if self.uploads.session_ttl.is_zero() {
            return invalid("uploads.session_ttl", "must be longer than 0s");
        }
        if self.uploads.sweep_interval.is_zero() {
            return invalid("uploads.sweep_interval", "must be longer than 0s");
        }
        if self.cache.descriptors == 0 {
            return invalid("cache.descriptors", "must be at least 1");
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
                    _ => return invalid("upstreams.endpoints", &format!("{e:?} is not an http(s) URL")),
                }
            }
            if u.max_concurrency == 0 {
                return invalid("upstreams.max_concurrency", "must be at least 1");
            }
            if u.password.is_some() as u8 + u.password_file.is_some() as u8 + u.password_env.is_some() as u8 > 1 {
                return invalid("upstreams.password", "give one of password, password_file, password_env");
            }
            if let Some(f) = &u.ca_file {
                check_ca_file(&u.host, f)?;
            }
        }
        if !self.proxy.default_upstream.is_empty() && !seen.contains(self.proxy.default_upstream.as_str()) {
            return invalid(
                "proxy.default_upstream",
                &format!("{} is not a configured upstream", self.proxy.default_upstream),
            );
        }
        Ok(())
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

    #[test]
    fn shipped_config_matches_defaults() {
        let text = include_str!("../config/stevedore.toml");
        let c = Config::parse(text).unwrap();
        let d = Config::default();
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.storage.root, d.storage.root);
        assert_eq!(c.uploads.session_ttl, d.uploads.session_ttl);
        c.validate().unwrap();
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
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Config::parse("[server]\nlisten = \"nope\"").is_err());
        assert!(Config::parse("[storage]\nroots = \"x\"").is_err());
        let c = Config::parse("[uploads]\nsession_ttl = \"0s\"").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "uploads.session_ttl", .. })));
        let c = Config::parse("[uploads]\nsession_ttl = \"90m\"").unwrap();
        assert_eq!(c.uploads.session_ttl, Duration::from_secs(5400));
    }
}
