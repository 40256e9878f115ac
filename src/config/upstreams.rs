//! `[[upstreams]]`: the registries pulled through from.

#[allow(unused_imports)]
use super::*;

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
