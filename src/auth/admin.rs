//! The admin token (`auth.admin_token_file`): a Bearer token for the admin endpoints
//! (`/admin/*`) that works with or without `htpasswd`. Compared in constant time; `Debug`
//! never shows it.

use std::path::Path;

use axum::http::{header, HeaderMap};

/// The shortest admin token accepted.
pub const MIN_LEN: usize = 16;

#[derive(Clone)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// Reads the token from `path` (trailing newline trimmed); why not, without the token.
    pub fn load(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let t = text.trim_end_matches(['\r', '\n']);
        if t.len() < MIN_LEN {
            return Err(format!("{}: the token must be at least {MIN_LEN} characters", path.display()));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{}: the token must be printable ASCII without spaces (one line)", path.display()));
        }
        Ok(AdminToken(t.to_string()))
    }

    /// Whether the request presents this token as `Authorization: Bearer <token>`.
    pub fn presented_in(&self, h: &HeaderMap) -> bool {
        let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
        let Some((scheme, rest)) = v.trim().split_once(' ') else { return false };
        scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(rest.trim().as_bytes(), self.0.as_bytes())
    }
}

/// Equal bytes, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_checks_and_never_shows_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "short\n").unwrap();
        assert!(AdminToken::load(&f).unwrap_err().contains("at least 16"));
        std::fs::write(&f, "two words are not a token\n").unwrap();
        assert!(AdminToken::load(&f).is_err());
        std::fs::write(&f, "tok-0123456789abcdef\n").unwrap();
        let t = AdminToken::load(&f).unwrap();
        assert!(!format!("{t:?}").contains("0123"));
        let mut h = HeaderMap::new();
        assert!(!t.presented_in(&h));
        h.insert(header::AUTHORIZATION, "Bearer tok-0123456789abcdef".parse().unwrap());
        assert!(t.presented_in(&h));
        h.insert(header::AUTHORIZATION, "bearer tok-0123456789abcdeX".parse().unwrap());
        assert!(!t.presented_in(&h));
        h.insert(header::AUTHORIZATION, "Basic tok-0123456789abcdef".parse().unwrap());
        assert!(!t.presented_in(&h));
    }
}
