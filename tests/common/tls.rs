//! Certificates made at run time for the TLS tests: a CA, the certificates it signs for
//! localhost and 127.0.0.1 (servers) or for a name (clients), their PEM files, and
//! reqwest clients that trust the CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A self-signed CA.
pub struct Ca {
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, named `cn`.
    pub fn server(&self, cn: &str) -> Leaf {
        self.sign(cn, vec!["localhost".into(), "127.0.0.1".into()], None)
    }

    /// A client certificate named `cn`.
    pub fn client_cert(&self, cn: &str) -> Leaf {
        self.sign(
            cn,
            Vec::new(),
            Some(rcgen::ExtendedKeyUsagePurpose::ClientAuth),
        )
    }

    fn sign(
        &self,
        cn: &str,
        names: Vec<String>,
        usage: Option<rcgen::ExtendedKeyUsagePurpose>,
    ) -> Leaf {
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages.extend(usage);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.cert_pem)
    }

    /// A client builder that trusts this CA (and nothing else), with a timeout.
    pub fn trusting_client(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).unwrap())
    }
}

impl Leaf {
    /// Writes `dir/<stem>.crt` and `dir/<stem>.key`; returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        (
            write(dir, &format!("{stem}.crt"), &self.cert_pem),
            write(dir, &format!("{stem}.key"), &self.key_pem),
        )
    }

    /// The certificate, DER encoded (what a TLS peer sees).
    pub fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// This certificate and key as a client's identity.
    pub fn identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.cert_pem, self.key_pem).as_bytes())
            .unwrap()
    }

    /// A rustls server config serving this certificate (for test endpoints).
    pub fn server_config(&self) -> rustls::ServerConfig {
        let certs = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap()
    }
}

#[allow(deprecated)] // ring, as the server uses (see src/tls.rs).
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Writes `text` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
