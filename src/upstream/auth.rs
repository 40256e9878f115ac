//! Registry authentication against an upstream: `WWW-Authenticate` challenges, Bearer tokens
//! from the realm (cached per scope until they expire, concurrent fetches coalesced), Basic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;

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

/// Where and how to ask for a token.
pub struct TokenRequest<'a> {
    pub realm: &'a str,
    pub service: Option<&'a str>,
    pub scope: &'a str,
    pub creds: Option<&'a (String, String)>,
    /// The upstream's host, for metrics.
    pub upstream: &'a str,
}

#[derive(Clone, Debug)]
pub struct Token {
    pub value: String,
    pub expires: Instant,
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

    pub async fn forget(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    /// Gets a token from the realm; concurrent calls for one key share one request.
    pub async fn fetch(&self, http: &reqwest::Client, key: &str, req: TokenRequest<'_>) -> Result<Arc<Token>, String> {
        if let Some(t) = self.cached(key).await {
            return Ok(t);
        }
        let TokenRequest { realm, service, scope, creds, upstream } = req;
        let fut = async {
            let mut q: Vec<(&str, &str)> = vec![("scope", scope)];
            if let Some(s) = service {
                q.push(("service", s));
            }
            let mut req = http.get(realm).query(&q);
            if let Some((u, p)) = creds {
                req = req.basic_auth(u, Some(p));
            }
            let resp = req.send().await.map_err(|e| format!("token request to {realm}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("token request to {realm}: HTTP {}", resp.status()));
            }
            let body: TokenResponse = resp.json().await.map_err(|e| format!("token response from {realm}: {e}"))?;
            let value =
                body.token.or(body.access_token).ok_or_else(|| format!("token response from {realm} has no token"))?;
            // Renew a little early; registries default to 60 s when they say nothing.
            let ttl = body.expires_in.unwrap_or(60).saturating_sub(10).max(5);
            crate::metrics::token_fetched(upstream);
            Ok(Arc::new(Token { value, expires: Instant::now() + Duration::from_secs(ttl) }))
        };
        self.cache.try_get_with(key.to_string(), fut).await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
