//! Extra CA certificates for an upstream (`ca_file`): a PEM bundle trusted in addition to the
//! system roots, for private registries with a CA of their own. Read and checked once, at
//! start-up (`Config::validate` and `Upstream::new`): a bundle that would not work fails there,
//! not on the first pull.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("no PEM certificate (-----BEGIN CERTIFICATE-----) in it")]
    NoCertificates,
    #[error("not a valid PEM bundle: {0}")]
    Pem(String),
    #[error("certificate {index} is not a usable CA certificate: {why}")]
    Certificate { index: usize, why: String },
}

/// Reads the PEM bundle at `path`: every `CERTIFICATE` section in it (other sections, such as
/// keys, are skipped), at least one, each parsable as a trust anchor.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    let pem = std::fs::read(path)?;
    let ders = parse_ca_bundle(&pem)?;
    ders.iter()
        .enumerate()
        .map(|(i, der)| {
            reqwest::Certificate::from_der(der)
                .map_err(|e| CaFileError::Certificate { index: i + 1, why: e.to_string() })
        })
        .collect()
}

/// The DER certificates of a PEM bundle, each checked the way the TLS verifier will take it.
fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let ders = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaFileError::Pem(e.to_string()))?;
    if ders.is_empty() {
        return Err(CaFileError::NoCertificates);
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, der) in ders.iter().enumerate() {
        roots.add(der.clone()).map_err(|e| CaFileError::Certificate { index: i + 1, why: e.to_string() })?;
    }
    Ok(ders)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn empty_and_keys_only_bundles_have_no_certificates() {
        assert!(matches!(parse_ca_bundle(b""), Err(CaFileError::NoCertificates)));
        assert!(matches!(parse_ca_bundle(b"just text\n"), Err(CaFileError::NoCertificates)));
        let key = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        assert!(matches!(parse_ca_bundle(key), Err(CaFileError::NoCertificates)));
    }

    #[test]
    fn broken_pem_and_garbage_der_are_refused() {
        let unterminated = b"-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(parse_ca_bundle(unterminated), Err(CaFileError::Pem(_))));
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";
        assert!(matches!(parse_ca_bundle(garbage), Err(CaFileError::Certificate { index: 1, .. })));
    }

    /// A self-signed CA certificate in PEM (rcgen, ring).
    pub(crate) fn ca_pem(name: &str) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
    }

    #[test]
    fn a_bundle_yields_every_certificate_and_skips_other_sections() {
        let key = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let bundle = format!("# private CAs\n{}{key}{}", ca_pem("one"), ca_pem("two"));
        assert_eq!(parse_ca_bundle(bundle.as_bytes()).unwrap().len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, &bundle).unwrap();
        assert_eq!(load_ca_file(&f).unwrap().len(), 2);
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = load_ca_file(Path::new("/nonexistent/stevedore-ca.pem")).unwrap_err();
        assert!(matches!(e, CaFileError::Read(_)), "{e}");
    }
}
