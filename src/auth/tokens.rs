//! Bearer tokens of the Docker token flow: JWTs signed with ES256 (ECDSA P-256) carrying the
//! granted `access` (`[{type, name, actions}]`), issued for and by `auth.service` (`aud`,
//! `iss`), short-lived (`auth.token_ttl`). Verification checks the signature with our one key,
//! the algorithm, `exp` and `nbf` (with [`LEEWAY`]), `aud` and `iss`.
//!
//! The key is a PKCS#8 PEM file (`auth.token_key_file`; `openssl genpkey -algorithm EC -pkeyopt
//! ec_paramgen_curve:P-256` writes one), generated with ring and written there (mode 0600)
//! when it does not exist, or generated in memory when no file is configured.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock difference tolerated on `exp` and `nbf` (replicas' clocks).
pub const LEEWAY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    #[error("generating a signing key: {0}")]
    Generate(String),
}

/// One `access` entry: `{"type":"repository","name":"team/app","actions":["pull","push"]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// A scope a client asks for: `repository:team/app:pull,push`, `registry:catalog:*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Scope {
    /// `type[(class)]:name:actions`. The name may itself hold `:` (a `host:port/` prefix), so
    /// the actions are after the last `:`.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        let kind = kind.split('(').next().unwrap_or(kind);
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        let actions = actions.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect();
        Some(Scope { kind: kind.to_string(), name: name.to_string(), actions })
    }
}

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    #[serde(default)]
    access: Vec<Access>,
}

/// What a verified token says.
#[derive(Clone, Debug)]
pub struct Granted {
    /// The user name; empty for an anonymous token.
    pub sub: String,
    pub access: Vec<Access>,
}

impl Granted {
    /// Whether the token grants `action` on `kind:name`.
    pub fn covers(&self, kind: &str, name: &str, action: &str) -> bool {
        self.access
            .iter()
            .any(|a| a.kind == kind && a.name == name && a.actions.iter().any(|x| x == action || x == "*"))
    }
}

/// The token signer and verifier.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
    service: String,
    ttl: Duration,
    validation: Validation,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("kid", &self.kid).field("service", &self.service).finish_non_exhaustive()
    }
}

const PEM_LABEL: &str = "PRIVATE KEY";

fn pem_encode(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {PEM_LABEL}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    s
}

fn pem_decode(text: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {PEM_LABEL}-----");
    let end = format!("-----END {PEM_LABEL}-----");
    let Some(start) = text.find(&begin) else {
        if text.contains("BEGIN EC PRIVATE KEY") {
            return Err("an SEC1 \"EC PRIVATE KEY\": convert it to PKCS#8 (`openssl pkcs8 -topk8 -nocrypt`)".into());
        }
        return Err(format!("no \"{PEM_LABEL}\" PEM block (PKCS#8)"));
    };
    let body = &text[start + begin.len()..];
    let Some(stop) = body.find(&end) else { return Err("unterminated PEM block".into()) };
    let b64: String = body[..stop].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("bad base64 in the PEM block: {e}"))
}

/// The public key (uncompressed SEC1 point) of a PKCS#8 ECDSA P-256 key; `None` if it is not one.
fn public_key(der: &[u8]) -> Option<Vec<u8>> {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng).ok()?;
    Some(pair.public_key().as_ref().to_vec())
}

fn generate() -> Result<Vec<u8>, KeyError> {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| KeyError::Generate(e.to_string()))
}

/// The key in `path`, or a new one written there (mode 0600) when there is none. Two
/// processes starting at once on a shared file end up with the same key.
fn load_or_create(path: &Path) -> Result<(Vec<u8>, bool), KeyError> {
    let shown = path.display().to_string();
    let read = |p: &Path| -> Result<Vec<u8>, KeyError> {
        let text = std::fs::read_to_string(p).map_err(|source| KeyError::Io { path: shown.clone(), source })?;
        pem_decode(&text).map_err(|why| KeyError::Invalid { path: shown.clone(), why })
    };
    match read(path) {
        Ok(der) => return Ok((der, false)),
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let der = generate()?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok((read(path)?, false)),
        Err(source) => return Err(KeyError::Io { path: shown, source }),
    };
    f.write_all(pem_encode(&der).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| KeyError::Io { path: shown, source })?;
    Ok((der, true))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Tokens {
    /// The signer for `service` with the key from `key_file` (created when absent) or a new
    /// key in memory.
    pub fn new(key_file: Option<&Path>, service: &str, ttl: Duration) -> Result<Tokens, KeyError> {
        let der = match key_file {
            Some(p) => {
                let (der, created) = load_or_create(p)?;
                if created {
                    tracing::info!(path = %p.display(), "generated a token signing key");
                }
                der
            }
            None => generate()?,
        };
        let shown = key_file.map_or("generated key".to_string(), |p| p.display().to_string());
        let public = public_key(&der).ok_or_else(|| KeyError::Invalid {
            path: shown,
            why: "not an ECDSA P-256 private key in PKCS#8 (ES256 is the signing algorithm)".into(),
        })?;
        let kid = crate::oci::Digest::sha256(&public).hex()[..16].to_string();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&[service]);
        validation.set_issuer(&[service]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Ok(Tokens {
            encoding: EncodingKey::from_ec_der(&der),
            decoding: DecodingKey::from_ec_der(&public),
            kid,
            service: service.to_string(),
            ttl,
            validation,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A signed token for `sub` (empty: anonymous) granting `access`; and when it was issued.
    pub fn issue(&self, sub: &str, access: Vec<Access>) -> Result<(String, SystemTime), jsonwebtoken::errors::Error> {
        let now = SystemTime::now();
        let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims {
            iss: self.service.clone(),
            sub: sub.to_string(),
            aud: self.service.clone(),
            exp: iat + self.ttl.as_secs(),
            nbf: iat,
            iat,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok((jsonwebtoken::encode(&header, &claims, &self.encoding)?, now))
    }

    /// The token's grants if it is ours and valid now.
    pub fn verify(&self, token: &str) -> Result<Granted, jsonwebtoken::errors::Error> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        // jsonwebtoken checks `exp` against the leeway; a token from the future is refused too.
        if data.claims.iat > now_secs() + LEEWAY.as_secs() {
            return Err(jsonwebtoken::errors::ErrorKind::ImmatureSignature.into());
        }
        Ok(Granted { sub: data.claims.sub, access: data.claims.access })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(name: &str, actions: &[&str]) -> Vec<Access> {
        vec![Access {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }]
    }

    #[test]
    fn scopes_parse() {
        let s = Scope::parse("repository:team/app:pull,push").unwrap();
        assert_eq!((s.kind.as_str(), s.name.as_str()), ("repository", "team/app"));
        assert_eq!(s.actions, ["pull", "push"]);
        let s = Scope::parse("repository(plugin):127.0.0.1:5000/x:pull").unwrap();
        assert_eq!((s.kind.as_str(), s.name.as_str(), s.actions.len()), ("repository", "127.0.0.1:5000/x", 1));
        assert_eq!(Scope::parse("registry:catalog:*").unwrap().actions, ["*"]);
        for bad in ["", "repository", "repository:x", ":x:pull", "repository::pull"] {
            assert!(Scope::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn issues_and_verifies_and_refuses_the_rest() {
        let t = Tokens::new(None, "svc", Duration::from_secs(60)).unwrap();
        let (tok, _) = t.issue("alice", access("team/app", &["pull"])).unwrap();
        let g = t.verify(&tok).unwrap();
        assert_eq!(g.sub, "alice");
        assert!(g.covers("repository", "team/app", "pull"));
        assert!(!g.covers("repository", "team/app", "push"));
        assert!(!g.covers("repository", "team/other", "pull"));
        // Another key, a tampered payload, garbage.
        let other = Tokens::new(None, "svc", Duration::from_secs(60)).unwrap();
        assert!(other.verify(&tok).is_err());
        let mut parts: Vec<String> = tok.split('.').map(str::to_string).collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
        claims["access"][0]["name"] = "team/secret".into();
        parts[1] = b64.encode(claims.to_string());
        assert!(t.verify(&parts.join(".")).is_err(), "tampered");
        assert!(t.verify("not.a.token").is_err());
        // alg none / HS256 with the public key as secret are refused.
        let none = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert!(t.verify(&none).is_err());
    }

    #[test]
    fn expired_and_immature_tokens_are_refused() {
        let t = Tokens::new(None, "svc", Duration::from_secs(60)).unwrap();
        let now = now_secs();
        let sign = |exp: u64, nbf: u64, iat: u64, aud: &str| {
            let c = Claims {
                iss: "svc".into(),
                sub: "alice".into(),
                aud: aud.into(),
                exp,
                nbf,
                iat,
                jti: "j".into(),
                access: vec![],
            };
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &c, &t.encoding).unwrap()
        };
        assert!(t.verify(&sign(now + 60, now, now, "svc")).is_ok());
        assert!(t.verify(&sign(now - 60, now - 120, now - 120, "svc")).is_err(), "expired");
        assert!(t.verify(&sign(now + 600, now + 300, now, "svc")).is_err(), "not yet valid");
        assert!(t.verify(&sign(now + 600, now, now + 300, "svc")).is_err(), "issued in the future");
        assert!(t.verify(&sign(now + 60, now, now, "other")).is_err(), "another audience");
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token.key");
        let a = Tokens::new(Some(&f), "svc", Duration::from_secs(60)).unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        let b = Tokens::new(Some(&f), "svc", Duration::from_secs(60)).unwrap();
        let (tok, _) = a.issue("alice", vec![]).unwrap();
        assert!(b.verify(&tok).is_ok(), "a second process on the same key file verifies the first's tokens");
        assert!(!format!("{a:?}").contains("BEGIN"));
        std::fs::write(&f, "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n").unwrap();
        let e = Tokens::new(Some(&f), "svc", Duration::from_secs(60)).unwrap_err().to_string();
        assert!(e.contains("PKCS#8"), "{e}");
    }
}
