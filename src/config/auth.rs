//! `[auth]` and `[[auth.rules]]`: client authentication and access rules.

#[allow(unused_imports)]
use super::*;

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

    pub(super) fn validate(&self, files: &dyn FileChecks) -> Result<(), ConfigError> {
        let invalid = |key, why: String| Err(ConfigError::Invalid { key, why });
        if let Some(f) = &self.admin_token_file {
            if let Err(why) = files.admin_token(f) {
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
            if let Err(why) = files.htpasswd(f) {
                return invalid("auth.htpasswd", why);
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
