//! TLS on the serving side (`[server.tls]`): the certificate chain and private key served on
//! `server.listen` (rustls with the ring provider, ALPN `h2` then `http/1.1`), optional client
//! certificates (mTLS), and reloading without a restart.
//!
//! - [`TlsFiles::load`] reads and checks what the files hold: a PEM chain whose first
//!   certificate parses, a PEM private key that matches it, the client CA bundle. It runs in
//!   `Config::validate` (so `check-config` and `serve` fail at start-up with the key and the
//!   file that is wrong) and on every reload.
//! - [`Tls`] holds the `rustls::ServerConfig` new connections get. [`Tls::spawn_reloader`]
//!   re-reads the files when their mtime, size or inode change (polled every
//!   `reload_interval`) and on SIGHUP; a pair that does not load is logged and the previous
//!   one kept. A connection takes the configuration current when it is accepted, so existing
//!   connections are never cut by a reload.
//!
//! Key and certificate material never reaches logs or `Debug`: only paths, subjects, names
//! and expiry dates are shown.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::{ClientAuth, TlsConfig};

/// What is wrong with the TLS files. The text names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {why}", path.display())]
    Cert { path: PathBuf, why: String },
    #[error("{}: {why}", path.display())]
    Key { path: PathBuf, why: String },
    #[error("the private key {} does not match the certificate {} (its first certificate must be the one the key is for)", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: {why}", path.display())]
    ClientCa { path: PathBuf, why: String },
    #[error("{0}")]
    Config(String),
}

impl TlsError {
    /// The config key the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Cert { .. } => "server.tls.cert",
            TlsError::Key { .. } | TlsError::Mismatch { .. } => "server.tls.key",
            TlsError::ClientCa { .. } => "server.tls.client_ca",
            TlsError::Config(_) => "server.tls",
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The contents of the TLS files, checked.
pub struct TlsFiles {
    key: Arc<CertifiedKey>,
    leaf: CertInfo,
    client_roots: Option<Arc<rustls::RootCertStore>>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("leaf", &self.leaf)
            .field("chain_len", &self.key.cert.len())
            .field("client_roots", &self.client_roots.as_ref().map(|r| r.len()))
            .finish()
    }
}

impl TlsFiles {
    /// Reads `cert`, `key` and `client_ca` of `cfg` and checks they can be served.
    pub fn load(cfg: &TlsConfig) -> Result<TlsFiles, TlsError> {
        let cert_err = |why: String| TlsError::Cert { path: cfg.cert.clone(), why };
        let key_err = |why: String| TlsError::Key { path: cfg.key.clone(), why };
        if cfg.cert.as_os_str().is_empty() {
            return Err(cert_err("must not be empty".into()));
        }
        if cfg.key.as_os_str().is_empty() {
            return Err(key_err("must not be empty".into()));
        }
        let chain = read_certs(&cfg.cert).map_err(cert_err)?;
        let leaf = CertInfo::of(&chain[0]).map_err(|why| cert_err(format!("the first certificate: {why}")))?;
        let pem = std::fs::read(&cfg.key).map_err(|e| key_err(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            key_err(match e {
                rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key (-----BEGIN PRIVATE KEY-----, \
                     RSA PRIVATE KEY or EC PRIVATE KEY) in it"
                    .into(),
                e => format!("not a valid PEM private key: {e}"),
            })
        })?;
        drop(pem);
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch { cert: cfg.cert.clone(), key: cfg.key.clone() },
            e => key_err(format!("not a usable private key: {e}")),
        })?;
        let client_roots = match &cfg.client_ca {
            None => None,
            Some(path) => {
                let ca_err = |why: String| TlsError::ClientCa { path: path.clone(), why };
                if path.as_os_str().is_empty() {
                    return Err(ca_err("must not be empty".into()));
                }
                let mut roots = rustls::RootCertStore::empty();
                for (i, der) in read_certs(path).map_err(ca_err)?.into_iter().enumerate() {
                    roots
                        .add(der)
                        .map_err(|e| ca_err(format!("certificate {} is not a usable CA certificate: {e}", i + 1)))?;
                }
                Some(Arc::new(roots))
            }
        };
        Ok(TlsFiles { key: Arc::new(key), leaf, client_roots })
    }

    /// The served certificate's subject, names and expiry.
    pub fn leaf(&self) -> &CertInfo {
        &self.leaf
    }

    /// The rustls configuration for these files: TLS 1.2 and 1.3, ALPN `h2` then
    /// `http/1.1`, client certificates verified against `client_ca` when configured.
    fn server_config(&self, auth: Option<ClientAuth>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match (&self.client_roots, auth) {
            (Some(roots), Some(auth)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider);
                let verifier = match auth {
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                    ClientAuth::Required => verifier,
                };
                let verifier = verifier.build().map_err(|e| TlsError::Config(format!("server.tls.client_ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_cert_resolver(Arc::new(Fixed { key: self.key.clone(), subject: self.leaf.subject.clone() }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Every `CERTIFICATE` section of the PEM file at `path` (other sections skipped), at least
/// one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a valid PEM file: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(certs)
}

/// The one certificate and key of a configuration (a new configuration is built per reload).
struct Fixed {
    key: Arc<CertifiedKey>,
    subject: String,
}

impl std::fmt::Debug for Fixed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey").field("subject", &self.subject).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.clone())
    }
}

/// What is shown of a certificate: its subject name, DNS names and expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's common name, else its first DNS or URI name; empty if it has none.
    pub subject: String,
    /// DNS names of the subject alternative names.
    pub dns_names: Vec<String>,
    /// `notAfter`, in seconds since the Unix epoch, when it parsed.
    pub not_after: Option<i64>,
}

impl CertInfo {
    pub fn of(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
        let cert = webpki::EndEntityCert::try_from(der).map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        let dns_names: Vec<String> = cert.valid_dns_names().map(str::to_string).collect();
        let subject = der::common_name(cert.subject())
            .or_else(|| dns_names.first().cloned())
            .or_else(|| cert.valid_uri_names().next().map(str::to_string))
            .unwrap_or_default();
        Ok(CertInfo { subject, dns_names, not_after: der::not_after(der.as_ref()) })
    }

    /// `notAfter` as `YYYY-MM-DD HH:MM:SS UTC`.
    pub fn expiry(&self) -> String {
        self.not_after.map(der::format_time).unwrap_or_else(|| "unknown".into())
    }

    pub fn expired(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.not_after.is_some_and(|t| t < now)
    }
}

impl std::fmt::Display for CertInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.subject)?;
        if !self.dns_names.is_empty() {
            write!(f, " (DNS names {})", self.dns_names.join(", "))?;
        }
        write!(f, ", valid until {}", self.expiry())
    }
}

/// The subject of a verified client certificate, as the server puts it on the request.
pub fn peer_subject(conn: &rustls::ServerConnection) -> Option<String> {
    let der = conn.peer_certificates()?.first()?;
    CertInfo::of(der).ok().map(|i| i.subject).filter(|s| !s.is_empty())
}

/// What identifies the files' current versions: (mtime, size, device, inode) of each, `None`
/// for one that cannot be stat'ed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Fingerprint(Vec<Option<(SystemTime, u64, u64, u64)>>);

impl Fingerprint {
    fn of(cfg: &TlsConfig) -> Fingerprint {
        use std::os::unix::fs::MetadataExt;
        let files = [Some(&cfg.cert), Some(&cfg.key), cfg.client_ca.as_ref()];
        Fingerprint(
            files
                .into_iter()
                .flatten()
                .map(|p| {
                    std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len(), m.dev(), m.ino()))
                })
                .collect(),
        )
    }
}

/// The TLS configuration new connections get, reloaded from the files.
pub struct Tls {
    cfg: TlsConfig,
    current: RwLock<Current>,
    /// The files as they were at the last load attempt, good or bad: a bad pair is reported
    /// once, not at every poll.
    tried: Mutex<Fingerprint>,
}

struct Current {
    config: Arc<rustls::ServerConfig>,
    leaf: CertInfo,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cfg", &self.cfg).field("leaf", &self.current.read().unwrap().leaf).finish()
    }
}

/// Why a reload was attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files changed on disk.
    Changed,
    /// SIGHUP (the files are read whether or not they changed).
    Signal,
}

impl Tls {
    /// Loads the files; fails as [`TlsFiles::load`] does.
    pub fn new(cfg: &TlsConfig) -> Result<Arc<Tls>, TlsError> {
        let tried = Fingerprint::of(cfg);
        let files = TlsFiles::load(cfg)?;
        let config = files.server_config(cfg.client_auth())?;
        let current = Current { config, leaf: files.leaf.clone() };
        crate::metrics::tls_certificate(files.leaf.not_after);
        Ok(Arc::new(Tls { cfg: cfg.clone(), current: RwLock::new(current), tried: Mutex::new(tried) }))
    }

    /// The configuration for a connection accepted now.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap().config.clone()
    }

    /// The certificate served now.
    pub fn leaf(&self) -> CertInfo {
        self.current.read().unwrap().leaf.clone()
    }

    /// One line for the start-up summary.
    pub fn summary(&self) -> String {
        let leaf = self.leaf();
        let clients = match self.cfg.client_auth() {
            None => "not asked for".to_string(),
            Some(ClientAuth::Optional) => "optional (verified against server.tls.client_ca)".to_string(),
            Some(ClientAuth::Required) => "required (verified against server.tls.client_ca)".to_string(),
        };
        let reload = if self.cfg.reload_interval.is_zero() {
            "on SIGHUP".to_string()
        } else {
            format!("when the files change (checked every {:?}) and on SIGHUP", self.cfg.reload_interval)
        };
        format!(
            "TLS: serving {} from {}; client certificates {clients}; reloaded {reload}",
            leaf,
            self.cfg.cert.display()
        )
    }

    /// Re-reads the files (for [`Reload::Changed`], only if they changed since the last
    /// attempt). A pair that loads replaces the configuration for new connections; one that
    /// does not is logged and the current one kept. Returns whether it was replaced.
    pub fn reload(&self, why: Reload) -> bool {
        let seen = Fingerprint::of(&self.cfg);
        {
            let mut tried = self.tried.lock().unwrap();
            if why == Reload::Changed && *tried == seen {
                return false;
            }
            *tried = seen;
        }
        let loaded = TlsFiles::load(&self.cfg).and_then(|f| Ok((f.server_config(self.cfg.client_auth())?, f.leaf)));
        match loaded {
            Ok((config, leaf)) => {
                if leaf.expired() {
                    tracing::warn!(certificate = %leaf, "the reloaded TLS certificate has expired");
                }
                tracing::info!(
                    certificate = %leaf,
                    trigger = ?why,
                    "TLS certificate reloaded; new connections get it, open ones keep theirs"
                );
                crate::metrics::tls_certificate(leaf.not_after);
                *self.current.write().unwrap() = Current { config, leaf };
                true
            }
            Err(e) => {
                tracing::warn!(
                    key = e.key(),
                    error = %e,
                    trigger = ?why,
                    serving = %self.leaf(),
                    "TLS files did not load; still serving the previous certificate"
                );
                false
            }
        }
    }

    /// Reloads when the files change (every `reload_interval`, unless 0) and on SIGHUP, until
    /// the runtime stops. The SIGHUP handler is in place when this returns.
    pub fn spawn_reloader(self: &Arc<Tls>) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let tls = self.clone();
        let every = self.cfg.reload_interval;
        tokio::spawn(async move {
            let mut tick = (!every.is_zero()).then(|| {
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                let why = tokio::select! {
                    Some(()) = hup.recv() => Reload::Signal,
                    _ = async {
                        match &mut tick {
                            Some(t) => { t.tick().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => Reload::Changed,
                };
                let tls = tls.clone();
                // File reads (and a stat on a hung network mount) stay off the async threads.
                let _ = tokio::task::spawn_blocking(move || tls.reload(why)).await;
            }
        });
        Ok(())
    }
}

/// Just enough DER to show a certificate: the subject's common name and `notAfter`.
mod der {
    /// One element: (tag, contents, what follows).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            (rest[..n].iter().fold(0usize, |l, b| l << 8 | usize::from(*b)), &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const CN: &[u8] = &[0x55, 0x04, 0x03];

    /// The last common name of a Name's contents (the RDN sequence), as UTF-8, PrintableString,
    /// IA5String, T61String (taken as Latin-1) or BMPString.
    pub fn common_name(name: &[u8]) -> Option<String> {
        let mut found = None;
        let mut rdns = name;
        while !rdns.is_empty() {
            let (tag, set, rest) = tlv(rdns)?;
            rdns = rest;
            if tag != SET {
                return None;
            }
            let mut atvs = set;
            while !atvs.is_empty() {
                let (tag, atv, rest) = tlv(atvs)?;
                atvs = rest;
                let (oid_tag, oid, value) = tlv(atv)?;
                if tag != SEQUENCE || oid_tag != OID {
                    return None;
                }
                if oid == CN {
                    let (vtag, v, _) = tlv(value)?;
                    found = match vtag {
                        0x0c | 0x13 | 0x16 => std::str::from_utf8(v).ok().map(str::to_string),
                        0x14 => Some(v.iter().map(|&b| char::from(b)).collect()),
                        0x1e if v.len() % 2 == 0 => {
                            char::decode_utf16(v.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
                                .collect::<Result<String, _>>()
                                .ok()
                        }
                        _ => None,
                    }
                    .or(found);
                }
            }
        }
        found
    }

    /// `notAfter` of a certificate, in seconds since the Unix epoch.
    pub fn not_after(cert: &[u8]) -> Option<i64> {
        let (SEQUENCE, cert, _) = tlv(cert)? else { return None };
        let (SEQUENCE, tbs, _) = tlv(cert)? else { return None };
        // [0] version (optional), serial, signature algorithm, issuer, validity.
        let (tag, _, mut rest) = tlv(tbs)?;
        if tag == 0xa0 {
            rest = tlv(rest)?.2;
        }
        rest = tlv(rest)?.2;
        rest = tlv(rest)?.2;
        let (SEQUENCE, validity, _) = tlv(rest)? else { return None };
        let (_, _, rest) = tlv(validity)?;
        let (tag, time, _) = tlv(rest)?;
        parse_time(tag, std::str::from_utf8(time).ok()?)
    }

    /// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), in seconds since the
    /// epoch.
    fn parse_time(tag: u8, s: &str) -> Option<i64> {
        let s = s.strip_suffix('Z')?;
        let (year, rest) = match tag {
            0x17 if s.len() == 12 => {
                let yy: i64 = s[..2].parse().ok()?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
            }
            0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
            _ => return None,
        };
        if !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n = |i: usize| rest[i..i + 2].parse::<i64>().ok();
        let (month, day, h, m, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
            return None;
        }
        Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
    pub fn format_time(t: i64) -> String {
        let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
        // The inverse of days_from_civil.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn times() {
            assert_eq!(parse_time(0x17, "700101000000Z"), Some(0));
            assert_eq!(parse_time(0x17, "491231235959Z"), Some(2_524_607_999));
            assert_eq!(parse_time(0x18, "20240229120000Z"), Some(1_709_208_000));
            assert_eq!(format_time(1_709_208_000), "2024-02-29 12:00:00 UTC");
            assert_eq!(format_time(253_402_300_799), "9999-12-31 23:59:59 UTC");
            for bad in ["", "700101000000", "7001010000Z", "701301000000Z", "70010100000xZ"] {
                assert_eq!(parse_time(0x17, bad), None, "{bad:?}");
            }
            assert_eq!(parse_time(0x04, "700101000000Z"), None);
        }

        #[test]
        fn truncated_der_is_refused() {
            assert_eq!(tlv(&[]), None);
            assert_eq!(tlv(&[0x30]), None);
            assert_eq!(tlv(&[0x30, 0x05, 1, 2]), None);
            assert_eq!(tlv(&[0x30, 0x81]), None);
            assert_eq!(tlv(&[0x30, 0x80]), None);
            assert_eq!(tlv(&[0x30, 0x02, 1, 2, 3]), Some((0x30, &[1u8, 2][..], &[3u8][..])));
            assert_eq!(common_name(&[0x31, 0x03, 0x30]), None);
            assert_eq!(not_after(&[0x30, 0x00]), None);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use std::time::Duration;

    pub(crate) fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    /// (cert PEM, key PEM) issued by `ca` for `names`, with common name `cn` if given.
    pub(crate) fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, cn: Option<&str>, names: &[&str]) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "Stevedore tests");
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.not_after = rcgen::date_time_ymd(2031, 7, 4);
        let key = KeyPair::generate().unwrap();
        (p.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn cfg(cert: &Path, key: &Path) -> TlsConfig {
        TlsConfig {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
            client_auth: None,
            reload_interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn certificate_info() {
        let ca = ca("info CA");
        let (pem, _) = leaf(&ca, Some("registry.internal"), &["registry.internal", "mirror.internal"]);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let info = CertInfo::of(&der).unwrap();
        assert_eq!(info.subject, "registry.internal");
        assert_eq!(info.dns_names, ["registry.internal", "mirror.internal"]);
        assert_eq!(info.expiry(), "2031-07-04 00:00:00 UTC");
        assert!(!info.expired());
        // No common name: the first DNS name stands for the subject.
        let (pem, _) = leaf(&ca, None, &["ci-runner-7.internal"]);
        let info = CertInfo::of(&CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).unwrap();
        assert_eq!(info.subject, "ci-runner-7.internal");
        let ca_der = CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap();
        assert_eq!(CertInfo::of(&ca_der).unwrap().subject, "info CA");
    }

    #[test]
    fn bad_files_name_the_key_and_file_and_never_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test CA");
        let (cert, key) = leaf(&ca, Some("127.0.0.1"), &["127.0.0.1"]);
        let (_, other_key) = leaf(&ca, Some("127.0.0.1"), &["127.0.0.1"]);
        let c = write(dir.path(), "server.pem", &cert);
        let k = write(dir.path(), "server.key", &key);
        let files = TlsFiles::load(&cfg(&c, &k)).unwrap();
        assert_eq!(files.leaf().subject, "127.0.0.1");
        let debug = format!("{files:?}");
        for material in [&key, &cert] {
            assert!(!debug.contains(material.lines().nth(1).unwrap()), "{debug}");
        }
        let garbage = write(dir.path(), "garbage.pem", "hello\n");
        let other = write(dir.path(), "other.key", &other_key);
        let missing = dir.path().join("missing.pem");
        let cases: [(TlsConfig, &str, &str); 6] = [
            (cfg(&missing, &k), "server.tls.cert", "No such file"),
            (cfg(&garbage, &k), "server.tls.cert", "no PEM certificate"),
            (cfg(&c, &garbage), "server.tls.key", "no PEM private key"),
            (cfg(&c, &c), "server.tls.key", "no PEM private key"),
            (cfg(&k, &k), "server.tls.cert", "no PEM certificate"),
            (cfg(&c, &other), "server.tls.key", "does not match"),
        ];
        for (cfg, config_key, why) in cases {
            let e = TlsFiles::load(&cfg).unwrap_err();
            let text = e.to_string();
            assert_eq!(e.key(), config_key, "{text}");
            assert!(text.contains(why), "{text}");
            for material in [&key, &other_key, &cert] {
                let body = material.lines().nth(1).unwrap();
                assert!(!text.contains(body) && !format!("{e:?}").contains(body), "{text}");
            }
        }
        let mut with_ca = cfg(&c, &k);
        with_ca.client_ca = Some(garbage.clone());
        assert_eq!(TlsFiles::load(&with_ca).unwrap_err().key(), "server.tls.client_ca");
        with_ca.client_ca = Some(write(dir.path(), "ca.pem", &ca.pem()));
        assert_eq!(TlsFiles::load(&with_ca).unwrap().client_roots.as_ref().map(|r| r.len()), Some(1));
    }

    #[test]
    fn reload_takes_a_good_pair_and_keeps_the_old_one_for_a_bad_pair() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test CA");
        let (cert, key) = leaf(&ca, Some("first"), &["127.0.0.1"]);
        let c = write(dir.path(), "server.pem", &cert);
        let k = write(dir.path(), "server.key", &key);
        let tls = Tls::new(&cfg(&c, &k)).unwrap();
        assert!(tls.summary().contains("\"first\""), "{}", tls.summary());
        assert!(!tls.reload(Reload::Changed), "nothing changed");
        let before = tls.server_config();
        // A new certificate without its key: refused, the old pair stays.
        let (cert2, key2) = leaf(&ca, Some("second"), &["127.0.0.1"]);
        write(dir.path(), "server.pem", &cert2);
        assert!(!tls.reload(Reload::Changed));
        assert_eq!(tls.leaf().subject, "first");
        assert!(Arc::ptr_eq(&before, &tls.server_config()));
        assert!(!tls.reload(Reload::Changed), "the same bad pair is not tried again");
        write(dir.path(), "server.key", &key2);
        assert!(tls.reload(Reload::Changed));
        assert_eq!(tls.leaf().subject, "second");
        assert!(!Arc::ptr_eq(&before, &tls.server_config()));
        assert_eq!(tls.server_config().alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        // A signal re-reads unchanged files.
        assert!(tls.reload(Reload::Signal));
    }
}
