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
        Ok(())
    }
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
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Config::parse("[server]\nlisten = \"nope\"").is_err());
        assert!(Config::parse("[storage]\nroots = \"x\"").is_err());
        let c = Config::parse("[uploads]\nsession_ttl = \"0s\"").unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "uploads.session_ttl", .. })));
        let c = Config::parse("[uploads]\nsession_ttl = \"90m\"").unwrap();
        assert_eq!(c.uploads.session_ttl, Duration::from_secs(5400));
    }
}
