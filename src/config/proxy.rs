//! `[proxy]`: namespace mapping, the default upstream, offline.

#[allow(unused_imports)]
use super::*;

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
