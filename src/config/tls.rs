//! `[server.tls]`: served certificate, key and client certificates (paths only).

#[allow(unused_imports)]
use super::*;

/// `[server.tls]`: the certificate chain and key served on `server.listen`, re-read when the
/// files change (and on SIGHUP), and optional client certificates. Only paths here: no key
/// material is ever held in the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain: the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) for the first certificate of `cert`.
    pub key: PathBuf,
    /// PEM bundle of the CAs whose client certificates are accepted (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// `optional` (default with `client_ca`): a client may present a certificate;
    /// `required`: a client without a valid certificate fails the handshake.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// How often the files are checked for changes (mtime, size, inode); `0s`: only on SIGHUP.
    #[serde(default = "TlsConfig::default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl TlsConfig {
    fn default_reload_interval() -> Duration {
        Duration::from_secs(5)
    }

    /// Whether client certificates are asked for, and whether one is required.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.client_ca.as_ref().map(|_| self.client_auth.unwrap_or(ClientAuth::Optional))
    }
}

/// `server.tls.client_auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}
