//! TLS, with rustls on the `ring` provider: the api's server side and what the clients
//! (the CLI, the bench, webhooks) trust beyond the system's roots.
//!
//! Server side: [`ServerTls::load`] reads the PEM certificate chain and key of
//! `http.tls_cert` / `http.tls_key` (and the client CA bundle of `http.tls_client_ca`,
//! when client certificates are required) into a rustls `ServerConfig` whose
//! certificate comes from a [`CertResolver`]: one `ArcSwap`'d `CertifiedKey` that every
//! new handshake reads. [`ServerTls::watch`] spawns the task that looks at the two files
//! every `http.tls_reload_secs` and swaps in the new pair when their bytes changed and
//! both parse and fit together: a Kubernetes Secret update (or a certificate renewed by
//! hand) takes effect without a restart, for new connections; a bad new pair is logged
//! and the old one kept (`Watch::poll` decides, the task only sleeps and logs).
//! Connections already open keep the certificate they were made with.
//!
//! Client side: [`read_ca_file`] reads a PEM bundle of CA certificates (`--cacert`, a
//! webhook's `ca_file`), each checked the way a root store takes it, and [`trust`] adds
//! them to a reqwest client, beside the system's roots.
//!
//! Every error names the file it is about: the configuration and the server turn it into
//! a message that also names the key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// The api's TLS settings, validated: both files existed and parsed when the
/// configuration was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The PEM certificate chain, the server's own certificate first (`http.tls_cert`).
    pub cert: PathBuf,
    /// The PEM private key of that certificate (`http.tls_key`).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these PEM CA
    /// certificates (`http.tls_client_ca`).
    pub client_ca: Option<PathBuf>,
    /// How often the certificate and key files are read again (`http.tls_reload_secs`).
    pub reload_every: Duration,
}

/// Why a certificate, key or CA file cannot be used. [`TlsError::path`] names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{}`: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("`{}` is not PEM: {error}", path.display())]
    Pem { path: PathBuf, error: String },
    #[error("`{}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "`{}` holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC PRIVATE KEY)",
        path.display()
    )]
    NoKey { path: PathBuf },
    /// The key cannot sign, or is not the key of the certificate.
    #[error(
        "the key in `{}` cannot serve the certificate in `{}`: {error}",
        key.display(),
        cert.display()
    )]
    Key {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
    #[error("`{}`: certificate {index} is not a usable CA certificate: {error}", path.display())]
    Ca {
        path: PathBuf,
        /// Its place in the file, from 1.
        index: usize,
        error: String,
    },
    /// The client certificate verifier could not be built from the CA bundle.
    #[error("`{}`: {error}", path.display())]
    Verifier { path: PathBuf, error: String },
}

impl TlsError {
    /// The file the error is about (the key file when a key does not fit its
    /// certificate).
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Read { path, .. }
            | TlsError::Pem { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::NoKey { path }
            | TlsError::Ca { path, .. }
            | TlsError::Verifier { path, .. } => path,
            TlsError::Key { key, .. } => key,
        }
    }
}

/// The crypto provider of every TLS config opmesh builds, named rather than taken from
/// the process default, so that no other crate's choice of provider changes it.
///
/// `ring`, which builds with cargo alone (aws-lc-rs needs cmake and a C toolchain).
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange; it is what
/// reqwest 0.12 uses too. Moving to aws-lc-rs is a change of this function and the
/// features in Cargo.toml.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

/// The certificates of a PEM file, in order; an error when it holds none.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A certificate chain and its key, from the bytes of their PEM files (named for the
/// errors): both parse and the key is the certificate's.
pub fn certified_key(cert: (&Path, &[u8]), key: (&Path, &[u8])) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(cert.0, cert.1)?;
    let der = PrivateKeyDer::from_pem_slice(key.1).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.0.to_owned(),
        },
        e => TlsError::Pem {
            path: key.0.to_owned(),
            error: e.to_string(),
        },
    })?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|error| TlsError::Key {
        cert: cert.0.to_owned(),
        key: key.0.to_owned(),
        error,
    })
}

/// Reads and checks the certificate and key files.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let (c, k) = (read(cert)?, read(key)?);
    certified_key((cert, &c), (key, &k))
}

/// The CA certificates of a PEM bundle, each checked as a trust anchor: a file with
/// none, or with one a root store would refuse, is an error.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = certificates(path, &read(path)?)?;
    ca_store(path, &certs)?;
    Ok(certs)
}

fn ca_store(path: &Path, certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store.add(c.clone()).map_err(|e| TlsError::Ca {
            path: path.to_owned(),
            index: i + 1,
            error: e.to_string(),
        })?;
    }
    Ok(store)
}

/// Adds `certs` to the roots a reqwest client trusts (the system's stay trusted).
pub fn trust(
    mut builder: reqwest::ClientBuilder,
    certs: &[CertificateDer<'static>],
) -> reqwest::Result<reqwest::ClientBuilder> {
    for c in certs {
        builder = builder.add_root_certificate(reqwest::Certificate::from_der(c)?);
    }
    Ok(builder)
}

/// Whether `e` (or one of its causes) is a peer certificate that did not verify:
/// untrusted, expired, for another name. The CLI then says how to trust it.
pub fn is_bad_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    if matches!(
        e.downcast_ref::<rustls::Error>(),
        Some(rustls::Error::InvalidCertificate(_))
    ) {
        return true;
    }
    // rustls' errors reach reqwest inside io::Errors (nested), whose `source` skips
    // the error they wrap.
    let wrapped = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| is_bad_certificate(inner));
    wrapped || e.source().is_some_and(is_bad_certificate)
}

/// The certificate the api presents: whatever was loaded last. Every handshake reads it,
/// so a swap takes effect for the next connection.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    fn new(key: CertifiedKey) -> Self {
        CertResolver {
            current: ArcSwap::from_pointee(key),
        }
    }

    /// The certificate and key new connections get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The api's TLS: a rustls server config whose certificate can be swapped.
pub struct ServerTls {
    files: TlsConfig,
    resolver: Arc<CertResolver>,
    config: ServerConfig,
    /// The bytes of the pair that was loaded, so the watcher knows when they change.
    loaded: (Vec<u8>, Vec<u8>),
}

impl ServerTls {
    /// Reads the certificate, its key and the client CA bundle, if any.
    pub fn load(files: &TlsConfig) -> Result<ServerTls, TlsError> {
        let (cert, key) = (read(&files.cert)?, read(&files.key)?);
        let pair = certified_key((&files.cert, &cert), (&files.key, &key))?;
        let resolver = Arc::new(CertResolver::new(pair));
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = ca_store(path, &read_ca_file(path)?)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| TlsError::Verifier {
                            path: path.clone(),
                            error: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_cert_resolver(resolver.clone());
        Ok(ServerTls {
            files: files.clone(),
            resolver,
            config,
            loaded: (cert, key),
        })
    }

    /// The config to serve with (actix-web adds its ALPN protocols to a copy).
    pub fn server_config(&self) -> ServerConfig {
        self.config.clone()
    }

    /// What new connections are served with.
    pub fn resolver(&self) -> &Arc<CertResolver> {
        &self.resolver
    }

    /// Starts watching the certificate and key files; stops when the returned
    /// [`Reloader`] is dropped. Needs a tokio runtime.
    pub fn watch(&self) -> Reloader {
        let mut watch = Watch {
            cert: self.files.cert.clone(),
            key: self.files.key.clone(),
            seen: self.loaded.clone(),
            resolver: self.resolver.clone(),
        };
        let every = self.files.reload_every;
        let task = tokio::spawn(async move {
            // The last unreadable-file message, so a file missing for a while is logged
            // once, not at every look.
            let mut unreadable: Option<String> = None;
            loop {
                tokio::time::sleep(every).await;
                match watch.poll() {
                    Polled::Unchanged => unreadable = None,
                    Polled::Reloaded => {
                        unreadable = None;
                        tracing::info!(
                            cert = %watch.cert.display(),
                            key = %watch.key.display(),
                            "TLS certificate reloaded"
                        );
                    }
                    Polled::Rejected(e) => {
                        unreadable = None;
                        tracing::warn!(
                            "TLS certificate not reloaded, keeping the previous one: {e}"
                        );
                    }
                    Polled::Unreadable(e) => {
                        let msg = e.to_string();
                        if unreadable.as_ref() != Some(&msg) {
                            tracing::warn!(
                                "TLS certificate not reloaded, keeping the previous one: {msg}"
                            );
                            unreadable = Some(msg);
                        }
                    }
                }
            }
        });
        Reloader { task }
    }
}

/// The task that reloads the api's certificate; dropping it stops the task.
pub struct Reloader {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The files the reload task watches and what it last saw in them.
struct Watch {
    cert: PathBuf,
    key: PathBuf,
    /// The bytes last read: of the pair in use, or of a newer pair that was rejected (so
    /// that it is not tried, and logged, again until the files change once more).
    seen: (Vec<u8>, Vec<u8>),
    resolver: Arc<CertResolver>,
}

/// What one look at the files found.
#[derive(Debug)]
enum Polled {
    /// The same bytes as last time.
    Unchanged,
    /// A new pair that parses and fits: new connections get it.
    Reloaded,
    /// New bytes that do not make a usable pair: the previous certificate stays.
    Rejected(TlsError),
    /// A file could not be read (say, for a moment while a Secret is updated).
    Unreadable(TlsError),
}

impl Watch {
    fn poll(&mut self) -> Polled {
        let pair = match (read(&self.cert), read(&self.key)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => return Polled::Unreadable(e),
        };
        if pair == self.seen {
            return Polled::Unchanged;
        }
        let parsed = certified_key((&self.cert, &pair.0), (&self.key, &pair.1));
        self.seen = pair;
        match parsed {
            Ok(key) => {
                self.resolver.set(key);
                Polled::Reloaded
            }
            Err(e) => Polled::Rejected(e),
        }
    }
}

/// A bound socket for the api and, for https, the TLS config to serve it with.
pub struct Listener {
    pub tcp: std::net::TcpListener,
    pub tls: Option<ServerConfig>,
}

impl From<std::net::TcpListener> for Listener {
    /// Plain HTTP.
    fn from(tcp: std::net::TcpListener) -> Self {
        Listener { tcp, tls: None }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Certificates made at run time for the TLS tests.

    use std::path::{Path, PathBuf};

    /// A self-signed CA.
    pub(crate) struct Ca {
        pub cert: rcgen::Certificate,
        pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Ca {
        pub(crate) fn new(name: &str) -> Ca {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca {
                cert,
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// A leaf for `localhost` and 127.0.0.1: (certificate PEM, key PEM).
        pub(crate) fn leaf(&self, cn: &str) -> (String, String) {
            let mut params =
                rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                    .unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    /// Writes `text` to `dir/name`; returns the path.
    pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{write, Ca};
    use super::*;

    fn files(dir: &Path, ca: &Ca, cn: &str) -> TlsConfig {
        let (cert, key) = ca.leaf(cn);
        TlsConfig {
            cert: write(dir, "tls.crt", &cert),
            key: write(dir, "tls.key", &key),
            client_ca: None,
            reload_every: Duration::from_secs(1),
        }
    }

    fn leaf_der(r: &CertResolver) -> Vec<u8> {
        r.current().cert[0].to_vec()
    }

    #[test]
    fn a_pair_loads_and_each_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let f = files(dir.path(), &ca, "a");
        load_pair(&f.cert, &f.key).expect("a good pair loads");

        let missing = dir.path().join("absent.crt");
        let e = load_pair(&missing, &f.key).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
        assert_eq!(e.path(), missing);
        assert!(e.to_string().contains("absent.crt"), "{e}");

        // The key where the certificate should be, and the other way round.
        let e = load_pair(&f.key, &f.key).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        assert_eq!(e.path(), f.key);
        let e = load_pair(&f.cert, &f.cert).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        assert!(e.to_string().contains("tls.crt"), "{e}");

        // A key of another certificate.
        let (_, other_key) = ca.leaf("b");
        let other = write(dir.path(), "other.key", &other_key);
        let e = load_pair(&f.cert, &other).unwrap_err();
        assert!(matches!(e, TlsError::Key { .. }), "{e}");
        assert_eq!(e.path(), other);
        assert!(e.to_string().contains("other.key"), "{e}");
    }

    #[test]
    fn a_ca_file_needs_at_least_one_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let path = write(dir.path(), "ca.pem", &ca.cert.pem());
        assert_eq!(read_ca_file(&path).unwrap().len(), 1);
        let empty = write(dir.path(), "empty.pem", "nothing here\n");
        let e = read_ca_file(&empty).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        assert!(e.to_string().contains("empty.pem"), "{e}");
    }

    #[test]
    fn the_watch_swaps_a_new_good_pair_and_keeps_the_old_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let f = files(dir.path(), &ca, "first");
        let tls = ServerTls::load(&f).unwrap();
        let first = leaf_der(tls.resolver());
        let mut watch = Watch {
            cert: f.cert.clone(),
            key: f.key.clone(),
            seen: tls.loaded.clone(),
            resolver: tls.resolver().clone(),
        };
        assert!(matches!(watch.poll(), Polled::Unchanged));

        files(dir.path(), &ca, "second");
        assert!(matches!(watch.poll(), Polled::Reloaded));
        let second = leaf_der(tls.resolver());
        assert_ne!(first, second);
        assert!(matches!(watch.poll(), Polled::Unchanged));

        // A certificate whose key is not there yet: rejected once, the second one kept.
        let (cert, _) = ca.leaf("third");
        write(dir.path(), "tls.crt", &cert);
        assert!(matches!(
            watch.poll(),
            Polled::Rejected(TlsError::Key { .. })
        ));
        assert!(matches!(watch.poll(), Polled::Unchanged));
        assert_eq!(leaf_der(tls.resolver()), second);

        std::fs::remove_file(&f.key).unwrap();
        assert!(matches!(
            watch.poll(),
            Polled::Unreadable(TlsError::Read { .. })
        ));
        assert_eq!(leaf_der(tls.resolver()), second);
    }

    #[test]
    fn bad_certificate_errors_are_found_inside_io_errors() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        let io = std::io::Error::other(io);
        assert!(is_bad_certificate(&io));
        let other = std::io::Error::new(std::io::ErrorKind::InvalidData, "reset");
        assert!(!is_bad_certificate(&other));
    }
}
