//! Registry authentication against an upstream: `WWW-Authenticate` challenges, Bearer tokens
//! from the realm (cached per scope until they expire, concurrent fetches coalesced), Basic.
//!
//! **Invariant:** credentials go only where the configuration says. A realm is used only when
//! it is on the upstream endpoint's origin (scheme, host and port: another port of the same
//! host is another server) or on an origin listed in `upstreams.token_realms`
//! ([`realm_allowed`]; Distribution's `realmAllowed`, GHSA-3p65-76g6-3w7r), and never when it
//! would downgrade https to http: a refused realm gets no request at all. Redirects are
//! followed by hand ([`send_following`]): `Authorization` goes to the first URL's origin only
//! and is dropped for good at the first hop that leaves it (reqwest's own policy restores the
//! original headers on every hop, so a chain CDN → CDN would get them back).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use reqwest::header::{ACCEPT, AUTHORIZATION, LOCATION};
use reqwest::{Method, StatusCode, Url};

use futures::future::BoxFuture;

use crate::config::redact_url;

/// Redirect hops followed at most.
const MAX_REDIRECTS: usize = 5;

/// Sends `method url`, following redirects by hand. `auth` (an `Authorization` value) is sent
/// to `url`'s origin (scheme, host, port) only: a hop to any other origin goes without it, and
/// so does every hop after that. Errors name the URL without user info.
pub async fn send_following(
    http: &reqwest::Client,
    method: Method,
    url: Url,
    accept: Option<&str>,
    auth: Option<&str>,
) -> Result<reqwest::Response, String> {
    let origin = url.origin();
    let (mut method, mut url, mut auth) = (method, url, auth);
    for _ in 0..=MAX_REDIRECTS {
        let mut req = http.request(method.clone(), url.clone());
        // The trace this request is part of (`[tracing]`), as W3C `traceparent`.
        let mut traced = reqwest::header::HeaderMap::new();
        crate::telemetry::inject(&mut traced);
        req = req.headers(traced);
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        if let Some(a) = auth {
            let mut v = reqwest::header::HeaderValue::from_str(a).map_err(|_| "invalid credentials".to_string())?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{}: {}", redact_url(url.as_str()), crate::upstream::error_chain(&e.without_url())))?;
        let status = resp.status();
        let redirect = matches!(
            status,
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        );
        let Some(location) = resp.headers().get(LOCATION).filter(|_| redirect) else {
            return Ok(resp);
        };
        let next = location
            .to_str()
            .ok()
            .and_then(|l| url.join(l).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| format!("{}: HTTP {status} with an unusable Location", redact_url(url.as_str())))?;
        if next.origin() != origin {
            auth = None;
        }
        if status == StatusCode::SEE_OTHER && method != Method::HEAD {
            method = Method::GET;
        }
        url = next;
    }
    Err(format!("{}: more than {MAX_REDIRECTS} redirects", redact_url(url.as_str())))
}

/// Whether an upstream endpoint's credentials may go to token `realm`: on the endpoint's origin
/// (scheme, host, port), or on one of the `listed` origins; never https → http, never a realm with user info.
/// Returns the realm's URL, or why it is refused (naming the realm).
pub fn realm_allowed(endpoint: &Url, realm: &str, listed: &[Url]) -> Result<Url, String> {
    let shown = redact_url(realm);
    let url = Url::parse(realm).map_err(|_| format!("token realm {shown:?} is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("token realm {shown} is not an http(s) URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("token realm {shown} carries user info; refused"));
    }
    if endpoint.scheme() == "https" && url.scheme() == "http" {
        return Err(format!("token realm {shown} would downgrade https to http; refused"));
    }
    // `Url` lowercases hosts and drops default ports, so origins compare as servers do.
    if endpoint.origin() == url.origin() || listed.iter().any(|o| o.origin() == url.origin()) {
        return Ok(url);
    }
    Err(format!(
        "token realm {shown} is neither on the upstream's origin {} nor listed in upstreams.token_realms; refused",
        endpoint.origin().ascii_serialization()
    ))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Basic,
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `k="v", k2=v2` with quoted values that may contain commas.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else { break };
        let key = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_string(), &q[end + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        out.insert(key, value);
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// Where and how to ask for a token (the realm already checked by [`realm_allowed`]).
pub struct TokenRequest<'a> {
    pub realm: &'a Url,
    pub service: Option<&'a str>,
    pub scope: &'a str,
    pub creds: Option<&'a (String, String)>,
    /// The upstream's host, for metrics.
    pub upstream: &'a str,
    /// The fleet's shared token cache, when replicas coordinate through Redis.
    pub shared: Option<&'a Shared>,
}

/// Where a token is shared with the other replicas: the fleet, and the names (in Redis) of
/// the token and of the lease of its fetch. The name is a hash of the upstream, its endpoint,
/// the scope and the user name: tokens of one upstream are never offered to another (and
/// a token fetched here goes only to the upstream it was fetched for, as a cached one does).
pub struct Shared {
    pub cluster: Arc<dyn TokenFleet>,
    name: String,
}

/// What a token lookup in the fleet finds (`Ok(None)`: nothing shared yet).
pub type Check<'a> = Box<dyn Fn() -> BoxFuture<'a, Result<Option<Arc<Token>>, String>> + Send + Sync + 'a>;
/// Fetching a token from the realm (and sharing it).
pub type Work<'a> = Box<dyn FnOnce() -> BoxFuture<'a, Result<Arc<Token>, String>> + Send + 'a>;

/// The replicas a token is shared with (`cluster::Cluster` over Redis; `app` hands it over):
/// shared values and work done once across the fleet. Upstream knows no cluster type.
#[async_trait::async_trait]
pub trait TokenFleet: Send + Sync {
    /// Whether the replicas coordinate (else every replica fetches its own tokens).
    fn coordinated(&self) -> bool;
    /// A shared value, if set (and coordination answers).
    async fn get_value(&self, name: &str) -> Option<String>;
    /// Sets a shared value for `ttl` (best effort).
    async fn set_value(&self, name: &str, value: &str, ttl: Duration);
    /// Runs `work` unless another replica holds the lease `name`; then waits for it and
    /// returns what `check` finds (or runs `work` after all when it finds nothing).
    async fn once<'a>(&'a self, name: &str, check: Check<'a>, work: Work<'a>) -> Result<Arc<Token>, String>;
}

/// Milliseconds since the epoch (how shared tokens' expiry is written).
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Shared {
    pub fn new(cluster: Arc<dyn TokenFleet>, upstream: &str, key: &str, user: Option<&str>) -> Shared {
        let id = crate::oci::Digest::sha256(format!("{upstream}\n{key}\n{}", user.unwrap_or("")).as_bytes());
        Shared { cluster, name: format!("token:{}", &id.hex()[..32]) }
    }

    /// The shared token, if another replica stored one that is still valid.
    async fn get(&self) -> Option<Arc<Token>> {
        let v = self.cluster.get_value(&self.name).await?;
        let (expires_ms, value) = v.split_once(' ')?;
        let left = expires_ms.parse::<u64>().ok()?.checked_sub(unix_ms())?;
        if value.is_empty() || left < 1000 {
            return None;
        }
        Some(Arc::new(Token { value: value.to_string(), expires: Instant::now() + Duration::from_millis(left) }))
    }

    async fn put(&self, t: &Token) {
        let left = t.expires.saturating_duration_since(Instant::now());
        let expires_ms = unix_ms() + left.as_millis() as u64;
        self.cluster.set_value(&self.name, &format!("{expires_ms} {}", t.value), left).await;
    }

    /// Drops the shared token if it is `rejected` (the upstream no longer accepts it).
    async fn forget(&self, rejected: &str) {
        if self.get().await.is_some_and(|t| t.value == rejected) {
            self.cluster.set_value(&self.name, "", Duration::from_millis(1)).await;
        }
    }
}

#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub expires: Instant,
}

/// Never prints the token itself.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("value", &"<redacted>").field("expires", &self.expires).finish()
    }
}

/// Tokens per (realm, service, scope).
pub struct TokenCache {
    cache: Cache<String, Arc<Token>>,
}

impl Default for TokenCache {
    fn default() -> TokenCache {
        TokenCache { cache: Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(3600)).build() }
    }
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenCache {
    /// A cached, unexpired token for the challenge and scope.
    pub async fn cached(&self, key: &str) -> Option<Arc<Token>> {
        let t = self.cache.get(key).await?;
        if t.expires > Instant::now() {
            Some(t)
        } else {
            self.cache.invalidate(key).await;
            None
        }
    }

    /// Forgets the token of `key` here and, if it is the one the fleet shares, there too.
    pub async fn forget(&self, key: &str, shared: Option<&Shared>) {
        let had = self.cache.get(key).await;
        self.cache.invalidate(key).await;
        if let (Some(s), Some(t)) = (shared, had) {
            s.forget(&t.value).await;
        }
    }

    /// Gets a token: from the fleet's shared cache, else from the realm (one replica of the
    /// fleet at a time: a lease per token); concurrent calls for one key share one request.
    pub async fn fetch(&self, http: &reqwest::Client, key: &str, req: TokenRequest<'_>) -> Result<Arc<Token>, String> {
        if let Some(t) = self.cached(key).await {
            return Ok(t);
        }
        let fut = async {
            let Some(shared) = req.shared.filter(|s| s.cluster.coordinated()) else {
                return from_realm(http, &req).await;
            };
            let upstream = req.upstream;
            let check = move || -> BoxFuture<'_, Result<Option<Arc<Token>>, String>> {
                Box::pin(async move {
                    let t = shared.get().await;
                    if t.is_some() {
                        crate::metrics::cluster_token_shared(upstream);
                    }
                    Ok::<_, String>(t)
                })
            };
            if let Some(t) = check().await? {
                return Ok(t);
            }
            let req = &req;
            let work: Work<'_> = Box::new(move || {
                Box::pin(async move {
                    if let Some(t) = check().await? {
                        return Ok(t);
                    }
                    let t = from_realm(http, req).await?;
                    shared.put(&t).await;
                    Ok(t)
                })
            });
            let name = format!("{}:fetch", shared.name);
            shared.cluster.once(&name, Box::new(check), work).await
        };
        self.cache.try_get_with(key.to_string(), fut).await.map_err(|e| e.to_string())
    }
}

/// Asks the realm for a token.
async fn from_realm(http: &reqwest::Client, req: &TokenRequest<'_>) -> Result<Arc<Token>, String> {
    let TokenRequest { realm, service, scope, creds, upstream, .. } = *req;
    let mut url = realm.clone();
    url.query_pairs_mut().append_pair("scope", scope);
    if let Some(s) = service {
        url.query_pairs_mut().append_pair("service", s);
    }
    let basic = creds.map(|(u, p)| basic_auth(u, p));
    let resp = send_following(http, Method::GET, url, None, basic.as_deref())
        .await
        .map_err(|e| format!("token request to {realm}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("token request to {realm}: HTTP {}", resp.status()));
    }
    let body: TokenResponse = resp.json().await.map_err(|e| format!("token response from {realm}: {e}"))?;
    let value = body.token.or(body.access_token).ok_or_else(|| format!("token response from {realm} has no token"))?;
    // Renew a little early; registries default to 60 s when they say nothing.
    let ttl = body.expires_in.unwrap_or(60).saturating_sub(10).max(5);
    crate::metrics::token_fetched(upstream);
    Ok(Arc::new(Token { value, expires: Instant::now() + Duration::from_secs(ttl) }))
}

/// An `Authorization: Basic …` value.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realms() {
        let u = |s: &str| Url::parse(s).unwrap();
        let https = u("https://registry.example:443");
        let http = u("http://127.0.0.1:5000");
        let listed = [u("https://auth.example"), u("http://127.0.0.2:7000")];
        assert!(realm_allowed(&https, "https://registry.example/token", &[]).is_ok());
        assert!(realm_allowed(&https, "https://REGISTRY.example/token", &[]).is_ok());
        assert!(realm_allowed(&http, "http://127.0.0.1:5000/token", &[]).is_ok());
        assert!(realm_allowed(&https, "https://auth.example/token?x=1", &listed).is_ok());
        assert!(realm_allowed(&http, "http://127.0.0.2:7000/t", &listed).is_ok());
        for (endpoint, realm, why) in [
            (&https, "https://evil.example/token", "neither"),
            // Origin, not host: another port of the upstream's host is another server.
            (&https, "https://registry.example:8443/token", "neither"),
            (&http, "http://127.0.0.1:6000/token", "neither"),
            (&http, "http://127.0.0.2:7001/t", "neither"),
            (&https, "https://auth.example:444/token", "neither"),
            (&https, "http://registry.example/token", "downgrade"),
            (&https, "http://auth.example/token", "downgrade"),
            (&https, "https://u:pw@registry.example/token", "user info"),
            (&https, "ftp://registry.example/token", "http(s)"),
            (&https, "/token", "not a URL"),
        ] {
            let e = realm_allowed(endpoint, realm, &listed).unwrap_err();
            assert!(e.contains(why), "{realm}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn token_debug_hides_the_token() {
        let t = Token { value: "secret-token-value".into(), expires: Instant::now() };
        assert!(!format!("{t:?}").contains("secret-token-value"));
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=http://127.0.0.1:1/t"),
            Some(Challenge::Bearer { realm: "http://127.0.0.1:1/t".into(), service: None, scope: None })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }
}
