//! Configuration: a TOML file (every key optional, unknown keys refused) with command-line
//! overrides applied on top. `validate()` runs at start-up so a bad config fails early with
//! the key that is wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod auth;
mod cache;
mod cluster;
mod proxy;
mod server;
mod storage;
mod tls;
mod tracing;
mod uploads;
mod upstreams;

pub use auth::*;
pub use cache::*;
pub use cluster::*;
pub use proxy::*;
pub use server::*;
pub use storage::*;
pub use tls::*;
pub use tracing::*;
pub use uploads::*;
pub use upstreams::*;
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
    /// OpenTelemetry export of spans; off without `otlp_endpoint`.
    pub tracing: TracingConfig,
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

/// The files a config names, read and checked as at start-up by the layers that own them
/// (`app::ConfigFiles`): config is data and calls nothing above itself.
pub trait FileChecks {
    /// `[server.tls]`'s certificate chain, key and client CAs; `Err((key, why))`.
    fn tls(&self, cfg: &TlsConfig) -> Result<(), (&'static str, String)>;
    /// `auth.admin_token_file`.
    fn admin_token(&self, path: &std::path::Path) -> Result<(), String>;
    /// `auth.htpasswd`.
    fn htpasswd(&self, path: &std::path::Path) -> Result<(), String>;
    /// An upstream's `ca_file`.
    fn ca_file(&self, path: &std::path::Path) -> Result<(), String>;
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

    /// Checks the values, and the files they name through `files` (`app::ConfigFiles`: each
    /// read and checked by the layer that owns it, as at start-up).
    pub fn validate(&self, files: &dyn FileChecks) -> Result<(), ConfigError> {
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
                files.tls(t).map_err(|(key, why)| ConfigError::Invalid { key, why })?;
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
                check_ca_file(&u.host, f, files)?;
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
        self.auth.validate(files)?;
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
fn check_ca_file(host: &str, f: &std::path::Path, files: &dyn FileChecks) -> Result<(), ConfigError> {
    let why = if f.as_os_str().is_empty() {
        "must not be empty".to_string()
    } else {
        match files.ca_file(f) {
            Ok(()) => return Ok(()),
            Err(e) => format!("{}: {e}", f.display()),
        }
    };
    Err(ConfigError::Invalid { key: "upstreams.ca_file", why: format!("upstream {host}: {why}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files a config names, checked as at start-up.
    fn files() -> &'static crate::app::ConfigFiles {
        &crate::app::ConfigFiles
    }

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
            "eve:",
        ] {
            assert!(!shown.contains(secret), "Debug of Config shows {secret}:\n{c:#?}");
        }
        // The access key id is an identifier (it is in the bucket's own logs), not a secret.
        assert!(
            shown.contains("up.test")
                && shown.contains("AKIA-id-Nn6")
                && shown.contains("bob")
                && shown.contains("<redacted>"),
            "{c:#?}"
        );
    }

    /// Every key path `Config` reads (`server.tls.cert`, `upstreams.host`: arrays of tables by
    /// their element's keys), found by asking serde, path by path, which fields each struct
    /// has: a probe deserializer walks down one path, and at its end a struct tells its
    /// fields; anything else is a leaf.
    fn config_keys() -> std::collections::BTreeSet<String> {
        use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
        use std::cell::RefCell;

        #[derive(Debug)]
        struct Leaf;
        impl std::fmt::Display for Leaf {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("leaf")
            }
        }
        impl std::error::Error for Leaf {}
        impl de::Error for Leaf {
            fn custom<T: std::fmt::Display>(_: T) -> Leaf {
                Leaf
            }
        }
        /// Walks `path`; at its end, a struct's fields go to `found`.
        struct Probe<'a> {
            path: &'a [String],
            found: &'a RefCell<Option<Vec<&'static str>>>,
        }
        struct Down<'a> {
            probe: Option<Probe<'a>>,
        }
        impl<'de> MapAccess<'de> for Down<'_> {
            type Error = Leaf;
            fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Leaf> {
                match &self.probe {
                    Some(p) => seed.deserialize(p.path[0].as_str().into_deserializer()).map(Some),
                    None => Ok(None),
                }
            }
            fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Leaf> {
                let p = self.probe.take().unwrap();
                seed.deserialize(Probe { path: &p.path[1..], found: p.found })
            }
        }
        impl<'de> SeqAccess<'de> for Down<'_> {
            type Error = Leaf;
            fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Leaf> {
                match self.probe.take() {
                    Some(p) => seed.deserialize(p).map(Some),
                    None => Ok(None),
                }
            }
        }
        impl<'de> de::Deserializer<'de> for Probe<'_> {
            type Error = Leaf;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Leaf> {
                Err(Leaf)
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                visitor: V,
            ) -> Result<V::Value, Leaf> {
                if self.path.is_empty() {
                    *self.found.borrow_mut() = Some(fields.to_vec());
                    return visitor.visit_map(Down { probe: None });
                }
                visitor.visit_map(Down { probe: Some(self) })
            }
            fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Leaf> {
                visitor.visit_some(self)
            }
            fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Leaf> {
                visitor.visit_seq(Down { probe: Some(self) })
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
                unit_struct newtype_struct tuple tuple_struct map enum identifier ignored_any
            }
        }
        let mut keys = std::collections::BTreeSet::new();
        let mut todo = vec![Vec::<String>::new()];
        while let Some(path) = todo.pop() {
            let found = RefCell::new(None);
            let _ = Config::deserialize(Probe { path: &path, found: &found });
            match found.into_inner() {
                Some(fields) => {
                    for f in fields {
                        let mut p = path.clone();
                        p.push(f.to_string());
                        todo.push(p);
                    }
                }
                None => {
                    keys.insert(path.join("."));
                }
            }
        }
        keys
    }

    /// config/stevedore.toml documents every key `Config` reads, and only those: every
    /// commented-out `# key = value` line (and `# [table]` header) uncommented, the file still
    /// parses (so each documented key is real: unknown keys are refused), and its key paths
    /// are `Config`'s. A key named in a trailing `# or a / b` comment beside another of its
    /// table is documented as that key's alternative (they exclude each other, so the file
    /// cannot set them all). The entries of a map (`[auth.groups]`) count as the map.
    #[test]
    fn every_key_is_documented_and_every_documented_key_is_real() {
        let doc = include_str!("../../config/stevedore.toml");
        let is_key_line = |t: &str| toml::from_str::<toml::Table>(t).is_ok_and(|v| !v.is_empty());
        let is_header = |t: &str| {
            let t = t.trim();
            t.starts_with('[')
                && t.ends_with(']')
                && t.trim_matches(['[', ']'])
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        };
        let mut out = String::new();
        let mut table = String::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut alternatives = std::collections::BTreeSet::new();
        for line in doc.lines() {
            let t = line.trim_start();
            let text = match t.strip_prefix('#') {
                Some(rest) if is_header(rest) || is_key_line(rest.trim()) => rest.trim(),
                Some(_) => continue,
                None => t,
            };
            if is_header(text) {
                table = text.trim_matches(['[', ']']).to_string();
                // A table of tables starts a new element: its keys may repeat.
                seen.retain(|k: &String| !k.starts_with(&format!("{table}.")));
            } else if let Some((key, rest)) = text.split_once('=') {
                let key = key.trim();
                if key.is_empty() || key.starts_with('#') {
                    out.push_str(text);
                    out.push('\n');
                    continue;
                }
                let path = if table.is_empty() { key.to_string() } else { format!("{table}.{key}") };
                if !seen.insert(path.clone()) {
                    continue; // documented twice (set, and an example): once is enough
                }
                if let Some((_, comment)) = rest.split_once('#') {
                    if let Some(or) = comment.trim().strip_prefix("or ") {
                        for w in or.split(|c: char| !(c.is_ascii_lowercase() || c == '_')).filter(|w| w.len() > 2) {
                            alternatives.insert(if table.is_empty() { w.to_string() } else { format!("{table}.{w}") });
                        }
                    }
                }
            }
            out.push_str(text);
            out.push('\n');
        }
        // Every documented key is real.
        let parsed: Config = Config::parse(&out).unwrap_or_else(|e| panic!("the uncommented config: {e}\n{out}"));
        drop(parsed);
        let fields = config_keys();
        // The documented key paths, entries of a map folded into the map.
        fn paths(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeSet<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        paths(&p, v, out);
                    }
                }
                toml::Value::Array(a) if a.iter().all(|e| e.is_table()) && !a.is_empty() => {
                    for e in a {
                        paths(prefix, e, out);
                    }
                }
                _ => {
                    out.insert(prefix.to_string());
                }
            }
        }
        let value: toml::Value = toml::from_str(&out).unwrap();
        let mut raw = std::collections::BTreeSet::new();
        paths("", &value, &mut raw);
        let mut documented = std::collections::BTreeSet::new();
        for p in raw {
            let folded = (1..=p.split('.').count())
                .map(|n| p.split('.').take(n).collect::<Vec<_>>().join("."))
                .find(|prefix| fields.contains(prefix))
                .unwrap_or(p);
            documented.insert(folded);
        }
        documented.extend(alternatives.into_iter().filter(|a| fields.contains(a)));
        let undocumented: Vec<_> = fields.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&fields).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "keys Config reads that config/stevedore.toml does not document: {undocumented:?}\n\
             keys the file documents that Config does not read: {unknown:?}"
        );
    }

    #[test]
    fn shipped_config_matches_defaults() {
        let text = include_str!("../../config/stevedore.toml");
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
        c.validate(files()).unwrap();
    }

    #[test]
    fn auth_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("htpasswd");
        std::fs::write(&f, format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap())).unwrap();
        let with = |extra: &str| {
            Config::parse(&format!("[auth]\nhtpasswd = {:?}\n{extra}", f.display().to_string()))
                .unwrap()
                .validate(files())
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
        assert!(matches!(c.validate(files()), Err(ConfigError::Invalid { key: "auth.htpasswd", .. })));
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
        c.validate(files()).unwrap();
        let max = c.cache.max_size.unwrap().0;
        assert_eq!(max, 200 << 30);
        assert_eq!(c.cache.high_watermark.bytes(max), 190 << 30);
        assert_eq!(c.cache.low_watermark.bytes(max), 100 << 30);
        assert_eq!(c.cache.max_unused, Some(Duration::from_secs(30 * 86400)));
        let d = Config::default();
        assert_eq!((d.cache.high_watermark.bytes(1000), d.cache.low_watermark.bytes(1000)), (950, 850));
        assert!(Config::parse("[cache]\nhigh_watermark = 1.5").is_err());
        let bad = Config::parse("[cache]\nmax_size = \"1GiB\"\nhigh_watermark = 0.5\nlow_watermark = 0.6").unwrap();
        assert!(matches!(bad.validate(files()), Err(ConfigError::Invalid { key: "cache.low_watermark", .. })));
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
        c.validate(files()).unwrap();
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].tag_ttl, Duration::from_secs(60));
        let bad = Config::parse("[proxy]\ndefault_upstream = \"quay.io\"").unwrap();
        assert!(matches!(bad.validate(files()), Err(ConfigError::Invalid { key: "proxy.default_upstream", .. })));
        let u = UpstreamConfig::from_url("http://127.0.0.1:5001/").unwrap();
        assert_eq!((u.host.as_str(), u.endpoints[0].as_str()), ("127.0.0.1:5001", "http://127.0.0.1:5001"));
        assert!(UpstreamConfig::from_url("ftp://x").is_err());
    }

    #[test]
    fn shipped_multi_upstream_example_is_valid() {
        let c = Config::parse(include_str!("../../config/multi-upstream.toml")).unwrap();
        c.validate(files()).unwrap();
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
        with_ca(good.to_str().unwrap()).validate(files()).unwrap();
        let missing = dir.path().join("missing.pem");
        for f in ["", missing.to_str().unwrap()] {
            let e = with_ca(f).validate(files()).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { key: "upstreams.ca_file", .. }), "{e}");
            assert!(e.to_string().contains("registry.internal") && e.to_string().contains(f), "{e}");
        }
    }

    #[test]
    fn redact_url_and_bad_endpoints_hide_user_info() {
        assert_eq!(redact_url("https://u:p@h:1/x"), "https://<redacted>@h:1/x");
        assert_eq!(redact_url("https://h/x"), "https://h/x");
        assert_eq!(redact_url("h t t p://u:p@h/x"), "h t t p://<redacted>@h/x");
        // A bad endpoint is reported without its user info.
        let bad = Config::parse(
            "[proxy]\ndefault_upstream = \"\"\n[[upstreams]]\nhost = \"x.io\"\nendpoints = [\"ftp://u:pw@x.io\"]\n",
        )
        .unwrap();
        let e = bad.validate(files()).unwrap_err().to_string();
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
            match c.validate(files()) {
                Err(ConfigError::Invalid { key: k, .. }) if k == key => {}
                other => panic!("{text}: {other:?}"),
            }
        }
        let c = Config::parse("[proxy]\nlocal_namespaces = [\"team/*\", \"ci/*\"]").unwrap();
        c.validate(files()).unwrap();
        assert_eq!(c.proxy.local_namespaces, ["team/*", "ci/*"]);
    }

    #[test]
    fn replicas_with_auth_share_one_token_key_and_may_advertise_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, "").unwrap();
        let fleet = "[redis]\nurl = \"redis://127.0.0.1:6379/\"\n[cluster]\nsecret = \"0123456789abcdef\"\n";
        let with = |cluster: &str, auth: &str| {
            Config::parse(&format!("{fleet}{cluster}\n[auth]\nhtpasswd = {htpasswd:?}\n{auth}\n"))
                .unwrap()
                .validate(files())
        };
        let advertise = "advertise = \"http://10.0.0.5:5000\"";
        match with(advertise, "") {
            Err(ConfigError::Invalid { key: "auth.token_key_file", why }) => assert!(why.contains("one key"), "{why}"),
            other => panic!("[redis] + [auth] without a token key: {other:?}"),
        }
        with(advertise, "token_key_file = \"/run/secrets/token-key.pem\"").unwrap();
        // Without [redis], one replica may keep its key in memory.
        Config::parse(&format!("[auth]\nhtpasswd = {htpasswd:?}\n")).unwrap().validate(files()).unwrap();

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
        ok.validate(files()).unwrap();
        let t = ok.server.tls.as_ref().unwrap();
        assert_eq!((t.reload_interval, t.client_auth()), (Duration::from_secs(5), None));
        assert_eq!(ok.server.plain_listen, Some("127.0.0.1:5001".parse().unwrap()));
        let with_ca = Config::parse(&format!(
            "[server.tls]\ncert = {c:?}\nkey = {k:?}\nclient_ca = {cap:?}\nreload_interval = \"0s\"\n"
        ))
        .unwrap();
        with_ca.validate(files()).unwrap();
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
            match bad.validate(files()) {
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
        c.validate(files()).unwrap();
        assert_eq!(c.storage.backend, BackendKind::S3);
        assert_eq!(c.storage.s3.credentials().unwrap(), Some(("AKID".into(), "inline-secret-key".into())));
        let text = format!("{c:?}");
        assert!(!text.contains("inline-secret-key") && text.contains("<redacted>") && text.contains("AKID"), "{text}");
        let c = Config::parse(&format!(
            "{base}access_key_id = \"AKID\"\nsecret_access_key_file = {:?}\n",
            secret_file.to_str().unwrap()
        ))
        .unwrap();
        c.validate(files()).unwrap();
        assert_eq!(c.storage.s3.credentials().unwrap().unwrap().1, "file-secret-key");
        std::env::set_var("STEVEDORE_TEST_S3_SECRET", "env-secret-key");
        let c = Config::parse(&format!(
            "{base}access_key_id = \"AKID\"\nsecret_access_key_env = \"STEVEDORE_TEST_S3_SECRET\"\n"
        ))
        .unwrap();
        assert_eq!(c.storage.s3.credentials().unwrap().unwrap().1, "env-secret-key");
        // The default is the filesystem, and [storage.s3] is not looked at then.
        assert_eq!(Config::default().storage.backend, BackendKind::Fs);
        Config::parse("[storage.s3]\nbucket = \"\"\n").unwrap().validate(files()).unwrap();
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
            match Config::parse(&text).unwrap().validate(files()) {
                Err(ConfigError::Invalid { key: k, .. }) if k == key => {}
                other => panic!("{extra}: {other:?}"),
            }
        }
        let no_http = base.replace("allow_http = true\n", "");
        assert!(matches!(
            Config::parse(&no_http).unwrap().validate(files()),
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
        assert!(matches!(c.validate(files()), Err(ConfigError::Invalid { key: "uploads.session_ttl", .. })));
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
