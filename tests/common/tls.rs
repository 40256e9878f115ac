//! TLS for test servers: a private CA and a server certificate for `127.0.0.1` (IP SAN), made
//! with rcgen (ring) and written as PEM files; a synchronous HTTPS probe trusting that CA only.
//! No OpenSSL, no system trust store.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA and a certificate it issued for 127.0.0.1, as PEM files in a directory.
pub struct TestPki {
    /// The CA certificate (what a client must trust).
    pub ca_file: PathBuf,
    pub ca_pem: String,
    /// The server certificate, then the key for it.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA itself, to issue more certificates ([`TestPki::server_pem`],
    /// [`TestPki::client_pem`]).
    pub ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    /// A fresh CA ("Stevedore test CA") and a server certificate for `127.0.0.1`, written to
    /// `dir/ca.pem`, `dir/server.pem` and `dir/server.key`.
    pub fn new(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).unwrap();
        let ca = test_ca();
        let (cert_pem, key_pem) = server_cert(&ca, "127.0.0.1");
        let pki = TestPki {
            ca_file: dir.join("ca.pem"),
            ca_pem: ca.pem(),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
            ca,
        };
        std::fs::write(&pki.ca_file, &pki.ca_pem).unwrap();
        std::fs::write(&pki.cert_file, cert_pem).unwrap();
        std::fs::write(&pki.key_file, key_pem).unwrap();
        pki
    }
}

impl TestPki {
    /// Another server certificate for `127.0.0.1` from this CA: (cert, key) PEM.
    pub fn server_pem(&self) -> (String, String) {
        server_cert(&self.ca, "127.0.0.1")
    }

    /// A client certificate (TLS client auth) with common name `cn` from this CA: the
    /// certificate and its key in one PEM text, as `reqwest::Identity::from_pem` takes it, and
    /// the two apart: (identity, cert, key).
    pub fn client_pem(&self, cn: &str) -> (String, String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("client key");
        let cert = params.signed_by(&key, &self.ca).expect("client certificate");
        let (cert, key) = (cert.pem(), key.serialize_pem());
        (format!("{cert}{key}"), cert, key)
    }

    /// Writes `ca.crt` (this CA) into `dir`, the cert-dir layout skopeo, podman and docker read.
    pub fn cert_dir(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca.crt"), &self.ca_pem).unwrap();
        dir.to_path_buf()
    }
}

/// The DER bytes of the first certificate in `pem`.
pub fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM").to_vec()
}

/// The certificate a new TLS connection to 127.0.0.1:`port` is served (DER), trusting
/// `ca_pem` only; the handshake error otherwise.
pub fn served_cert(port: u16, ca_pem: &str) -> Result<Vec<u8>, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(client_config(ca_pem), name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    let certs = conn.peer_certificates().ok_or("no certificate served")?;
    Ok(certs[0].to_vec())
}

/// A TLS connection (HTTP/1.1: no ALPN) to 127.0.0.1:`port` trusting `ca_pem` only, its
/// handshake done; reads and writes time out after 10 s.
pub fn tls_stream(port: u16, ca_pem: &str) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(client_config(ca_pem), name).expect("TLS client");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("TLS handshake");
    }
    rustls::StreamOwned::new(conn, tcp)
}

/// A self-signed CA that may sign server certificates.
pub fn test_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "Stevedore test CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA certificate")
}

/// A server certificate for `san` (an IP address or a DNS name) issued by `ca`: (cert, key) PEM.
pub fn server_cert(ca: &CertifiedIssuer<'static, KeyPair>, san: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec![san.to_string()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, san);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, ca).expect("server certificate");
    (cert.pem(), key.serialize_pem())
}

/// A rustls client config trusting `ca_pem` only (ring).
fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(der.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// [`super::proc::http_get_status`] over TLS, trusting `ca_pem` only: the status code of a
/// plain `GET path` to https://127.0.0.1:`port`, or `None` when nothing (valid) answered
/// within 5 s, including when the handshake failed.
pub fn https_get_status(port: u16, path: &str, ca_pem: &str) -> Option<u16> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
    let conn = rustls::ClientConnection::new(client_config(ca_pem), name).ok()?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
    head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}
