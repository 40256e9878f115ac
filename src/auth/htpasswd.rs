//! Users from an htpasswd file as `htpasswd -B` writes it: `user:$2y$<cost>$<salt+hash>` per
//! line (`$2a$`, `$2b$`, `$2x$` too). Only bcrypt: MD5 (`$apr1$`), SHA-1 (`{SHA}`), crypt and
//! plain-text lines are refused, naming the user (never the hash).
//!
//! Verifying costs tens to hundreds of milliseconds of CPU, so it runs on the blocking pool,
//! a few at a time, and a success is remembered for [`CACHE_TTL`] under a SHA-256 of
//! (user, password, stored hash): the password itself is never kept. The file is re-read
//! when its modification time or size changes (looked at most every [`RELOAD_CHECK`]); a
//! file that no longer parses keeps the previous users, with a warning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

/// How long a verified (user, password) pair is accepted without bcrypt again.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// The file's metadata is looked at no more often than this.
const RELOAD_CHECK: Duration = Duration::from_secs(2);
/// bcrypt verifications running at once (each takes a core for its duration).
const CONCURRENT_VERIFIES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: {why}")]
    Line { path: PathBuf, line: usize, why: String },
}

/// The users of one version of the file: name → bcrypt hash.
#[derive(Default)]
pub struct Users(HashMap<String, String>);

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_tuple("Users").field(&names).finish()
    }
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, HtpasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| HtpasswdError::Read { path: path.into(), source })?;
        Users::parse(&text).map_err(|(line, why)| HtpasswdError::Line { path: path.into(), line, why })
    }

    /// Parses the file's text; on error the 1-based line and why.
    pub fn parse(text: &str) -> Result<Users, (usize, String)> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err((i + 1, "expected user:hash".into()));
            };
            if user.is_empty() {
                return Err((i + 1, "empty user name".into()));
            }
            let bcrypt = ["$2y$", "$2b$", "$2a$", "$2x$"].iter().any(|p| hash.starts_with(p));
            // What `bcrypt::verify` parses first: a line that would never verify is refused now.
            if !bcrypt || hash.parse::<bcrypt::HashParts>().is_err() {
                return Err((
                    i + 1,
                    format!("user {user:?}: only bcrypt hashes are supported (create them with `htpasswd -B`)"),
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err((i + 1, format!("user {user:?} appears twice")));
            }
        }
        Ok(Users(users))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.0.contains_key(user)
    }

    /// The highest bcrypt cost among the users' hashes (`htpasswd -B`'s default, 5, for none).
    pub fn max_cost(&self) -> u32 {
        self.0.values().filter_map(|h| h.parse::<bcrypt::HashParts>().ok()).map(|p| p.get_cost()).max().unwrap_or(5)
    }
}

/// What the file said when it was last read, and when that was checked.
struct Loaded {
    users: Arc<Users>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

/// The user database: an htpasswd file, kept fresh, and the cache of verified passwords.
pub struct Htpasswd {
    path: PathBuf,
    loaded: Mutex<Loaded>,
    verified: moka::sync::Cache<[u8; 32], ()>,
    verifies: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Htpasswd").field("path", &self.path).finish_non_exhaustive()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Htpasswd {
    pub fn open(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let stamp = stamp(path);
        let users = Arc::new(Users::load(path)?);
        Ok(Htpasswd {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded { users, stamp, checked: Instant::now() }),
            verified: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(CACHE_TTL).build(),
            verifies: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_VERIFIES)),
        })
    }

    /// The current users, re-reading the file when it changed.
    pub fn users(&self) -> Arc<Users> {
        let mut l = self.loaded.lock().unwrap();
        if l.checked.elapsed() >= RELOAD_CHECK {
            l.checked = Instant::now();
            let now = stamp(&self.path);
            if now != l.stamp {
                l.stamp = now;
                match Users::load(&self.path) {
                    Ok(u) => {
                        tracing::info!(path = %self.path.display(), users = u.len(), "htpasswd file re-read");
                        l.users = Arc::new(u);
                    }
                    Err(e) => tracing::warn!(error = %e, "htpasswd file not re-read; the previous users stay"),
                }
            }
        }
        l.users.clone()
    }

    /// Whether `password` is `user`'s. Unknown users cost a verification too, so answer times
    /// do not tell which user names exist.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let users = self.users();
        let hash = users.0.get(user).cloned();
        let key = cache_key(user, password, hash.as_deref().unwrap_or_default());
        if hash.is_some() && self.verified.contains_key(&key) {
            return true;
        }
        let Ok(_permit) = self.verifies.clone().acquire_owned().await else { return false };
        let known = hash.is_some();
        let cost = if known { 0 } else { users.max_cost() };
        let password = zeroizing(password);
        let ok = tokio::task::spawn_blocking(move || {
            let hash = hash.unwrap_or_else(|| dummy_hash(cost));
            bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let ok = ok && known;
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }
}

/// A copy of the password that is wiped when the verification is done with it.
fn zeroizing(p: &str) -> Wiped {
    Wiped(p.as_bytes().to_vec())
}

struct Wiped(Vec<u8>);

impl Wiped {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // A volatile write, so the wipe is not optimised away.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// A bcrypt hash of a random password at `cost`, verified against for unknown users: at the
/// cost of the configured hashes, so an unknown user name costs as long as a known one (made
/// once per cost).
fn dummy_hash(cost: u32) -> String {
    static DUMMIES: std::sync::LazyLock<Mutex<HashMap<u32, String>>> = std::sync::LazyLock::new(Default::default);
    let cost = cost.clamp(4, 31);
    let mut d = DUMMIES.lock().unwrap();
    d.entry(cost).or_insert_with(|| bcrypt::hash(uuid::Uuid::new_v4().to_string(), cost).unwrap_or_default()).clone()
}

fn cache_key(user: &str, password: &str, hash: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [user, password, hash] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bcrypt_lines_and_refuses_others() {
        let h = bcrypt::hash_with_result("pw", 4).unwrap().format_for_version(bcrypt::Version::TwoY);
        let u = Users::parse(&format!("# users\n\nalice:{h}\nbob:{}\n", h.replace("$2y$", "$2b$"))).unwrap();
        assert_eq!(u.len(), 2);
        assert!(u.contains("alice") && u.contains("bob"));
        for (bad, want) in [
            ("carol:$apr1$abc$def", "only bcrypt"),
            ("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "only bcrypt"),
            ("carol:plain", "only bcrypt"),
            ("carol", "user:hash"),
            (":$2y$05$abc", "empty user"),
        ] {
            let (line, why) = Users::parse(bad).unwrap_err();
            assert_eq!(line, 1);
            assert!(why.contains(want), "{bad}: {why}");
            assert!(!why.contains("apr1") && !why.contains("W6ph"), "the hash is not repeated: {why}");
        }
        let (line, why) = Users::parse(&format!("alice:{h}\nalice:{h}")).unwrap_err();
        assert!(line == 2 && why.contains("twice"), "{why}");
        assert!(!format!("{u:?}").contains("$2"), "Debug shows names only");
    }

    #[tokio::test]
    async fn verifies_caches_and_rereads() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("htpasswd");
        let h = |pw: &str| bcrypt::hash(pw, 4).unwrap();
        std::fs::write(&f, format!("alice:{}\n", h("right"))).unwrap();
        let db = Htpasswd::open(&f).unwrap();
        assert!(db.verify("alice", "right").await);
        assert!(!db.verify("alice", "wrong").await);
        assert!(!db.verify("nobody", "right").await);
        assert!(!db.verify("alice", "").await);
        // Cached under a hash of user, password and stored hash.
        assert!(db.verified.contains_key(&cache_key("alice", "right", &db.users().0["alice"])));
        // A new password in the file: the old one stops working at the next check.
        std::fs::write(&f, format!("alice:{}\nbob:{}\n", h("changed"), h("b"))).unwrap();
        db.loaded.lock().unwrap().checked -= RELOAD_CHECK;
        assert!(db.verify("alice", "changed").await);
        assert!(!db.verify("alice", "right").await, "a cached password of the old file");
        assert!(db.verify("bob", "b").await);
        // A broken file keeps the users it had.
        std::fs::write(&f, "alice:$apr1$x$y\n").unwrap();
        db.loaded.lock().unwrap().checked -= RELOAD_CHECK;
        assert!(db.verify("bob", "b").await);
    }

    #[test]
    fn dummy_hash_is_a_bcrypt_hash_at_the_cost_asked() {
        let h = dummy_hash(6);
        assert!(!bcrypt::verify("x", &h).unwrap());
        assert_eq!(h.parse::<bcrypt::HashParts>().unwrap().get_cost(), 6);
    }
}
