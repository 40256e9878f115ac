//! Client authentication and authorization (`[auth]`; off, an open registry, without
//! `auth.htpasswd`).
//!
//! - Who a caller is ([`Auth::identify`]), in this order: a verified client certificate the
//!   server mapped to a user name ([`ClientCert`], a request extension: the mTLS hook),
//!   `Authorization: Basic` checked against the htpasswd file ([`htpasswd`]), `Authorization:
//!   Bearer` with a token this registry issued ([`tokens`]); else anonymous.
//! - What it may do: [`rules::Rules::allows`] on the repository's full name (the one place a
//!   grant is decided), and for a token also the token's `access` claim for the name the
//!   client used. The namespace rule (`proxy::Proxy::writable`) comes on top: an upstream's
//!   name is never writable, whoever asks.
//! - Refusals: a caller that did not log in (or whose credentials are wrong, or whose token
//!   does not cover the request though the rules would allow it) gets `401 UNAUTHORIZED`
//!   with a `WWW-Authenticate: Bearer realm=…,service=…,scope=…` challenge, so it can log in
//!   (or fetch a token for this scope); a caller that is known but not allowed gets `403
//!   DENIED`.
//! - `GET /token` (and the OAuth2 `POST /token` form containerd uses) is the token endpoint:
//!   Basic credentials (or the form's `username`/`password`, never the query string's) or
//!   none, `service`, `scope`s; it answers a short-lived ES256 JWT whose
//!   `access` lists only what the rules grant.
//!
//! Secrets (passwords, tokens, the `Authorization` header) never reach logs, errors or
//! `Debug` output.

pub mod admin;
pub mod htpasswd;
pub mod rules;
pub mod tokens;

use std::sync::Arc;

use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;

use crate::config::{Action, AnonymousAccess, AuthConfig, MetricsAccess};
use crate::error::{ApiError, ApiResult, Code};
use crate::oci::RepoName;
use rules::{Rules, Who};
use tokens::{Access, Granted, Scope, Tokens};

/// Request extension (the hook for TLS serving): the connection is TLS, so the default token
/// realm is `https://`.
#[derive(Clone, Copy, Debug)]
pub struct Secure;

/// A verified client certificate (mTLS, `server.tls.client_ca`): the server puts it on every
/// request of a TLS connection whose client presented one, beside `limits::ClientAddr`. The
/// certificate chained to a configured client CA and is valid now; `subject` is its common
/// name, else its first DNS (or URI) subject alternative name. The mTLS login: it stands for
/// a login as the user its subject names, like a right password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub subject: String,
}

/// What auth reads of a request (its own view, whoever serves the request): the headers,
/// the authority, whether it came over TLS, a verified client certificate's subject.
struct RequestView<'a> {
    headers: &'a HeaderMap,
    authority: Option<&'a str>,
    tls: bool,
    certificate: Option<&'a str>,
}

impl<'a> RequestView<'a> {
    fn of(parts: &'a Parts) -> RequestView<'a> {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()));
        RequestView {
            headers: &parts.headers,
            authority,
            tls: parts.extensions.get::<Secure>().is_some() || parts.uri.scheme_str() == Some("https"),
            certificate: parts.extensions.get::<ClientCert>().map(|c| c.subject.as_str()),
        }
    }
}

/// What a request needs.
#[derive(Clone, Debug)]
pub enum Need {
    /// `/v2/`: a login (any valid credentials or token).
    Base,
    /// `/v2/_catalog`: listing (`registry:catalog:*`); entries are filtered by pull rights.
    Catalog,
    /// `action` on a repository: `asked` as the client named it (the token scope), `full` as
    /// the rules see it.
    Repo { asked: String, full: String, action: Action },
}

/// The authorized caller of one request.
#[derive(Clone)]
pub struct Caller {
    /// `None`: no auth configured, everything is allowed.
    auth: Option<Arc<Auth>>,
    who: Who,
    token: Option<Granted>,
}

impl Caller {
    /// The caller of a registry without auth: may do anything.
    pub fn open() -> Caller {
        Caller { auth: None, who: Who::Anonymous, token: None }
    }

    pub fn who(&self) -> &Who {
        &self.who
    }

    /// Whether the caller may do `action` on `asked` (the name it used; `full` for the rules).
    pub fn may(&self, asked: &str, full: &str, action: Action) -> bool {
        let Some(auth) = &self.auth else { return true };
        auth.rules.allows(&self.who, full, action)
            && self.token.as_ref().is_none_or(|t| t.covers("repository", asked, action.as_str()))
    }

    /// Whether a `_catalog` entry (a full name) is shown to the caller: it may pull it.
    pub fn may_list(&self, full: &str) -> bool {
        self.auth.as_ref().is_none_or(|a| a.rules.allows(&self.who, full, Action::Pull))
    }
}

/// Credentials as presented. `Debug` never shows the secret parts.
enum Presented {
    None,
    Basic { user: String, password: String },
    Bearer(String),
    Certificate(String),
    Malformed,
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Presented::None => f.write_str("None"),
            Presented::Basic { user, .. } => write!(f, "Basic({user:?}, <redacted>)"),
            Presented::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Presented::Certificate(u) => write!(f, "Certificate({u:?})"),
            Presented::Malformed => f.write_str("Malformed"),
        }
    }
}

fn presented(h: &HeaderMap, certificate: Option<&str>) -> Presented {
    if let Some(c) = certificate {
        return Presented::Certificate(c.to_string());
    }
    let Some(v) = h.get(header::AUTHORIZATION) else { return Presented::None };
    let Ok(v) = v.to_str() else { return Presented::Malformed };
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(rest) else { return Presented::Malformed };
        let Ok(text) = String::from_utf8(raw) else { return Presented::Malformed };
        match text.split_once(':') {
            Some((u, p)) if !u.is_empty() => Presented::Basic { user: u.to_string(), password: p.to_string() },
            _ => Presented::Malformed,
        }
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Presented::Bearer(rest.to_string())
    } else {
        Presented::Malformed
    }
}

/// Who a request comes from, once its credentials checked out.
struct Identity {
    who: Who,
    token: Option<Granted>,
    /// Credentials were presented (a login), not merely absent.
    logged_in: bool,
}

/// Why credentials were refused.
enum Refused {
    BadPassword,
    BadToken,
    Malformed,
}

/// The authentication and authorization state (built once from `[auth]`).
pub struct Auth {
    users: htpasswd::Htpasswd,
    rules: Rules,
    tokens: Tokens,
    anonymous: AnonymousAccess,
    realm: Option<String>,
    service: String,
    metrics: MetricsAccess,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("users", &self.users).field("service", &self.service).finish_non_exhaustive()
    }
}

impl Auth {
    /// `None` when auth is off (no `auth.htpasswd`).
    pub fn from_config(cfg: &AuthConfig) -> anyhow::Result<Option<Arc<Auth>>> {
        let Some(path) = &cfg.htpasswd else { return Ok(None) };
        let users = htpasswd::Htpasswd::open(path)?;
        let tokens = Tokens::new(cfg.token_key_file.as_deref(), &cfg.service, cfg.token_ttl)?;
        Ok(Some(Arc::new(Auth {
            users,
            rules: Rules::new(cfg),
            tokens,
            anonymous: cfg.anonymous,
            realm: cfg.realm.clone(),
            service: cfg.service.clone(),
            metrics: cfg.metrics,
        })))
    }

    async fn identify(&self, req: &RequestView<'_>) -> Result<Identity, Refused> {
        match presented(req.headers, req.certificate) {
            Presented::None => Ok(Identity { who: Who::Anonymous, token: None, logged_in: false }),
            Presented::Certificate(u) => Ok(Identity { who: Who::User(u), token: None, logged_in: true }),
            Presented::Basic { user, password } => {
                if self.users.verify(&user, &password).await {
                    Ok(Identity { who: Who::User(user), token: None, logged_in: true })
                } else {
                    tracing::info!(user = %user, "refused a login: wrong user name or password");
                    Err(Refused::BadPassword)
                }
            }
            Presented::Bearer(t) => match self.tokens.verify(&t) {
                Ok(g) => {
                    let who = if g.sub.is_empty() { Who::Anonymous } else { Who::User(g.sub.clone()) };
                    Ok(Identity { who, token: Some(g), logged_in: true })
                }
                Err(e) => {
                    tracing::debug!(error = %e, "refused a bearer token");
                    Err(Refused::BadToken)
                }
            },
            Presented::Malformed => Err(Refused::Malformed),
        }
    }

    /// The token endpoint's URL for challenges: `auth.realm`, else `/token` on the scheme and
    /// host the client used.
    fn realm(&self, req: &RequestView<'_>) -> String {
        if let Some(r) = &self.realm {
            return r.clone();
        }
        let host = req
            .authority
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b)))
            .unwrap_or("localhost");
        format!("{}://{host}/token", if req.tls { "https" } else { "http" })
    }

    /// `401 UNAUTHORIZED` with the Bearer challenge for `scope`.
    fn challenge(&self, req: &RequestView<'_>, scope: Option<&str>, error: Option<&str>, detail: &str) -> ApiError {
        let mut c = format!("Bearer realm=\"{}\",service=\"{}\"", self.realm(req), self.service);
        if let Some(s) = scope {
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error=\"{e}\""));
        }
        ApiError::new(Code::Unauthorized).detail(detail.to_string()).header(header::WWW_AUTHENTICATE, c)
    }

    /// Who the caller is and whether it may do what it asks; the refusal to send otherwise.
    pub async fn authorize(self: &Arc<Auth>, parts: &Parts, need: &Need) -> Result<Caller, ApiError> {
        let req = &RequestView::of(parts);
        let scope = match need {
            Need::Base => None,
            Need::Catalog => Some("registry:catalog:*".to_string()),
            Need::Repo { asked, action, .. } => Some(format!(
                "repository:{asked}:{}",
                match action {
                    Action::Push => "pull,push",
                    a => a.as_str(),
                }
            )),
        };
        let id = match self.identify(req).await {
            Ok(id) => id,
            Err(r) => {
                let (error, detail) = match r {
                    Refused::BadPassword => (None, "wrong user name or password"),
                    Refused::BadToken => (Some("invalid_token"), "the token is invalid or expired"),
                    Refused::Malformed => (Some("invalid_request"), "the Authorization header is not understood"),
                };
                return Err(self.challenge(req, scope.as_deref(), error, detail));
            }
        };
        let caller = Caller { auth: Some(self.clone()), who: id.who, token: id.token };
        let anonymous = caller.who.is_anonymous();
        let login = |detail: &str| self.challenge(req, scope.as_deref(), None, detail);
        match need {
            Need::Base if id.logged_in => Ok(caller),
            Need::Base => Err(login("log in to use this registry")),
            Need::Catalog => {
                let allowed = match &caller.token {
                    Some(t) => t.covers("registry", "catalog", "*"),
                    None => !anonymous || self.anonymous == AnonymousAccess::Pull,
                };
                match allowed {
                    true => Ok(caller),
                    false if anonymous && caller.token.is_none() => Err(login("log in to list repositories")),
                    false => Err(self.challenge(
                        req,
                        scope.as_deref(),
                        Some("insufficient_scope"),
                        "the token does not cover the catalog",
                    )),
                }
            }
            Need::Repo { asked, full, action } => {
                let by_rules = self.rules.allows(&caller.who, full, *action);
                let by_token = caller.token.as_ref().is_none_or(|t| t.covers("repository", asked, action.as_str()));
                match (by_rules, by_token) {
                    (true, true) => Ok(caller),
                    (true, false) => Err(self.challenge(
                        req,
                        scope.as_deref(),
                        Some("insufficient_scope"),
                        &format!("the token does not grant {} on {asked}", action.as_str()),
                    )),
                    (false, _) if anonymous => Err(login(&format!("log in to {} {asked}", action.as_str()))),
                    (false, _) => Err(ApiError::new(Code::Denied).detail(format!(
                        "{} may not {} {full}",
                        caller.who,
                        action.as_str()
                    ))),
                }
            }
        }
    }

    /// Who logged in for an operator endpoint (`/metrics`, `/admin/…`): operators and
    /// scrapers log in with Basic (or a client certificate); tokens are scoped to repositories.
    /// Anything else is `401` with a Basic challenge saying `why`.
    async fn operator(&self, parts: &Parts, why: &str) -> Result<Who, ApiError> {
        let req = &RequestView::of(parts);
        let basic = || {
            ApiError::new(Code::Unauthorized)
                .detail(why.to_string())
                .header(header::WWW_AUTHENTICATE, format!("Basic realm=\"{}\"", self.service))
        };
        match presented(req.headers, req.certificate) {
            Presented::Basic { .. } | Presented::Certificate(_) => {
                self.identify(req).await.map(|id| id.who).map_err(|_| basic())
            }
            _ => Err(basic()),
        }
    }

    /// Whether the caller may read `/metrics` (`auth.metrics`).
    pub async fn metrics_allowed(&self, parts: &Parts) -> Result<(), ApiError> {
        if self.metrics == MetricsAccess::Open {
            return Ok(());
        }
        let who = self.operator(parts, "log in to read the metrics").await?;
        match self.metrics {
            MetricsAccess::Admin if !self.rules.is_admin(&who) => {
                Err(ApiError::new(Code::Denied).detail(format!("{who} is not an administrator (admin on \"*\")")))
            }
            _ => Ok(()),
        }
    }

    /// Whether the caller may read an operator page at `level` (`auth.status`).
    pub async fn operator_allowed(&self, parts: &Parts, level: MetricsAccess, why: &str) -> Result<(), ApiError> {
        if level == MetricsAccess::Open {
            return Ok(());
        }
        let who = self.operator(parts, why).await?;
        match level {
            MetricsAccess::Admin if !self.rules.is_admin(&who) => {
                Err(ApiError::new(Code::Denied).detail(format!("{who} is not an administrator (admin on \"*\")")))
            }
            _ => Ok(()),
        }
    }

    /// Whether the caller may use an admin endpoint (`POST /admin/prefetch`) on these
    /// repositories (full names): a login whose rules grant `admin` on every one of them.
    pub async fn admin_allowed(&self, parts: &Parts, fulls: &[String]) -> Result<(), ApiError> {
        let who = self.operator(parts, "log in to use the admin endpoints").await?;
        match fulls.iter().find(|f| !self.rules.allows(&who, f, Action::Admin)) {
            Some(f) => Err(ApiError::new(Code::Denied).detail(format!("{who} may not administer {f} (admin)"))),
            None => Ok(()),
        }
    }

    /// The grants for `who` among `scopes` (repository names resolved as plain names are).
    /// `full_name`: a repository's full name as the rules match it (the namespace mapping's).
    fn grant(&self, who: &Who, scopes: &[Scope], full_name: &FullName<'_>) -> Vec<Access> {
        let mut out: Vec<Access> = Vec::new();
        for s in scopes {
            let actions: Vec<String> = match s.kind.as_str() {
                "repository" => {
                    let Ok(name) = s.name.parse::<RepoName>() else { continue };
                    let full = full_name(&name);
                    let mut wanted: Vec<Action> = Vec::new();
                    for a in &s.actions {
                        match a.as_str() {
                            "*" => wanted.extend([Action::Pull, Action::Push, Action::Delete]),
                            a => wanted.extend(Action::parse(a)),
                        }
                    }
                    wanted.sort();
                    wanted.dedup();
                    wanted
                        .into_iter()
                        .filter(|a| self.rules.allows(who, &full, *a))
                        .map(|a| a.as_str().to_string())
                        .collect()
                }
                "registry"
                    if s.name == "catalog" && (!who.is_anonymous() || self.anonymous == AnonymousAccess::Pull) =>
                {
                    vec!["*".to_string()]
                }
                _ => continue,
            };
            if actions.is_empty() {
                continue;
            }
            match out.iter_mut().find(|a| a.kind == s.kind && a.name == s.name) {
                Some(a) => {
                    for x in actions {
                        if !a.actions.contains(&x) {
                            a.actions.push(x);
                        }
                    }
                }
                None => out.push(Access { kind: s.kind.clone(), name: s.name.clone(), actions }),
            }
        }
        out
    }

    /// The start-up summary's lines about access.
    pub fn describe(&self) -> Vec<String> {
        let mut out = vec![format!(
            "client authentication is on: {} users from the htpasswd file, Basic or tokens from /token \
             (service {:?}, tokens valid {})",
            self.users.users().len(),
            self.service,
            humantime::format_duration(self.tokens.ttl())
        )];
        out.extend(self.rules.describe());
        out.push(format!(
            "/metrics: {}",
            match self.metrics {
                MetricsAccess::Open => "open to anyone (auth.metrics = \"open\")",
                MetricsAccess::Authenticated => "any logged-in user",
                MetricsAccess::Admin => "administrators only",
            }
        ));
        out
    }
}

/// The token endpoint's parameters, from the query (GET) or the query and form (POST); a
/// login (`username`, `password`) only from the form.
#[derive(Default)]
struct TokenRequest {
    service: Option<String>,
    scopes: Vec<Scope>,
    /// From the OAuth2 form (`grant_type=password`); `Debug` is not derived.
    form_login: Option<(String, String)>,
    grant_type: Option<String>,
}

impl TokenRequest {
    fn parse(pairs: impl Iterator<Item = (String, String)>) -> TokenRequest {
        let mut r = TokenRequest::default();
        let (mut user, mut password) = (None, None);
        for (k, v) in pairs {
            match k.as_str() {
                "service" => r.service = Some(v),
                // One scope per parameter (docker), or several separated by spaces (OAuth2).
                "scope" => r.scopes.extend(v.split(' ').filter_map(Scope::parse)),
                "username" => user = Some(v),
                "password" => password = Some(v),
                "grant_type" => r.grant_type = Some(v),
                _ => {}
            }
        }
        if let (Some(u), Some(p)) = (user, password) {
            r.form_login = Some((u, p));
        }
        r
    }
}

/// A repository's full name as the rules match it (`<upstream host>/<name there>` for a
/// proxied one): the caller's namespace mapping.
pub type FullName<'a> = dyn Fn(&RepoName) -> String + Send + Sync + 'a;

/// The token endpoint's answer (`GET`/`POST /token`) to a request of `parts` whose POST form,
/// if any, is `form`: query and form parameters, Basic credentials, or the form's login.
pub async fn issue(auth: &Auth, parts: &Parts, form: Option<&[u8]>, full_name: &FullName<'_>) -> ApiResult {
    // Credentials never come from the query string (it is logged, kept in proxies' logs and
    // browser histories): only from the `Authorization` header or a POST form body.
    let query = form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .filter(|(k, _)| k != "username" && k != "password");
    let mut r = match form {
        Some(bytes) => TokenRequest::parse(query.chain(form_urlencoded::parse(bytes).into_owned())),
        None => TokenRequest::parse(query),
    };
    let req = &RequestView::of(parts);
    let unauthorized = |detail: &str| {
        ApiError::new(Code::Unauthorized)
            .detail(detail.to_string())
            .header(header::WWW_AUTHENTICATE, format!("Basic realm=\"{}\"", auth.service))
    };
    if let Some(s) = &r.service {
        if *s != auth.service {
            return Err(ApiError::new(Code::Denied)
                .status(StatusCode::BAD_REQUEST)
                .detail(format!("this token server issues tokens for service {:?}", auth.service)));
        }
    }
    if r.grant_type.as_deref().is_some_and(|g| g != "password") {
        // No refresh tokens are issued, so there is none to redeem.
        return Err(unauthorized("only grant_type=password is supported"));
    }
    let who = match (r.form_login.take(), presented(req.headers, req.certificate)) {
        (Some((user, password)), _) | (None, Presented::Basic { user, password }) => {
            if !auth.users.verify(&user, &password).await {
                tracing::info!(user = %user, "refused a token: wrong user name or password");
                return Err(unauthorized("wrong user name or password"));
            }
            Who::User(user)
        }
        (None, Presented::Certificate(u)) => Who::User(u),
        (None, Presented::None) if auth.anonymous == AnonymousAccess::Pull => Who::Anonymous,
        (None, Presented::None) => return Err(unauthorized("log in: this registry has no anonymous access")),
        (None, Presented::Bearer(_) | Presented::Malformed) => {
            return Err(unauthorized("log in with a user name and password"));
        }
    };
    let access = auth.grant(&who, &r.scopes, full_name);
    let (token, issued) = auth.tokens.issue(who.name(), access).map_err(ApiError::internal)?;
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": auth.tokens.ttl().as_secs(),
        "issued_at": humantime::format_rfc3339_seconds(issued).to_string(),
    });
    let mut resp = (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `/metrics` behind `auth.metrics`.
pub async fn metrics_gate(auth: Option<&Auth>, parts: &Parts) -> Result<(), ApiError> {
    match auth {
        Some(a) => a.metrics_allowed(parts).await,
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_parsed_and_never_shown() {
        let mut h = HeaderMap::new();
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        h.insert(header::AUTHORIZATION, format!("Basic {b64}").parse().unwrap());
        match presented(&h, None) {
            Presented::Basic { user, password } => assert_eq!((user.as_str(), password.as_str()), ("alice", "pa:ss")),
            p => panic!("{p:?}"),
        }
        assert!(!format!("{:?}", presented(&h, None)).contains("pa:ss"));
        h.insert(header::AUTHORIZATION, "bearer abc.def.ghi".parse().unwrap());
        assert!(matches!(presented(&h, None), Presented::Bearer(t) if t == "abc.def.ghi"));
        assert!(!format!("{:?}", presented(&h, None)).contains("abc"));
        for bad in ["Basic !!!", "Basic", "Digest x", "Bearer "] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert!(matches!(presented(&h, None), Presented::Malformed), "{bad}");
        }
        assert!(matches!(presented(&h, Some("carol")), Presented::Certificate(u) if u == "carol"));
    }

    #[test]
    fn token_requests_parse_get_and_oauth_forms() {
        let pairs = |s: &str| form_urlencoded::parse(s.as_bytes()).into_owned().collect::<Vec<_>>().into_iter();
        let r = TokenRequest::parse(pairs(
            "service=svc&scope=repository:a:pull&scope=repository:b:pull,push&account=alice&client_id=docker",
        ));
        assert_eq!(r.service.as_deref(), Some("svc"));
        assert_eq!(r.scopes.len(), 2);
        assert!(r.form_login.is_none());
        let r = TokenRequest::parse(pairs(
            "grant_type=password&username=alice&password=p%26w&service=svc&scope=repository:a:pull%20repository:b:push",
        ));
        assert_eq!(r.scopes.len(), 2);
        assert_eq!(r.form_login, Some(("alice".into(), "p&w".into())));
    }
}
