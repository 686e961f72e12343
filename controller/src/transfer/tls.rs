//! Mutual TLS between agents. Every agent has a certificate from the cluster CA whose DNS
//! subject alternative name is its machine name; the receiver reads the sender's machine from
//! its certificate, so a sender cannot claim to be another machine.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the peer presented no usable certificate: {0}")]
    PeerIdentity(String),
}

/// PEM-encoded identity of an agent plus the cluster CA.
#[derive(Debug, Clone)]
pub struct Identity {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl Identity {
    /// Loads `ca.crt`, `tls.crt` and `tls.key` style files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read_certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate(p.display().to_string()));
            }
            Ok(certs)
        };
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
            path: key.display().to_string(),
            source,
        })?;
        Ok(Self {
            ca: read_certs(ca)?,
            chain: read_certs(cert)?,
            key: Arc::new(key),
        })
    }

    /// From PEM text (tests, and certificates held in memory).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        let parse = |what: &str, pem: &str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| TlsError::Read {
                    path: what.into(),
                    source,
                })?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate(what.into()));
            }
            Ok(certs)
        };
        let key =
            PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|source| TlsError::Read {
                path: "key".into(),
                source,
            })?;
        Ok(Self {
            ca: parse("ca", ca)?,
            chain: parse("certificate", cert)?,
            key: Arc::new(key),
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// Server side: only clients with a certificate from the cluster CA get in.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, provider()).build()?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// Client side: the server must prove it is the machine we mean to reach.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// Both ends are ployz agents, so TLS 1.3 only, with AES-128-GCM first: as strong as the
/// protocol asks for, and the cheapest suite per byte on CPUs with AES instructions.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

/// The TLS server name for a machine.
pub fn server_name(machine: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(machine.to_string()).map_err(|e| TlsError::PeerIdentity(e.to_string()))
}

/// The machine a (verified) peer certificate names: its first DNS subject alternative name.
pub fn peer_machine(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::PeerIdentity(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::PeerIdentity(e.to_string()))?
        .ok_or_else(|| TlsError::PeerIdentity("no subject alternative name".into()))?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .ok_or_else(|| TlsError::PeerIdentity("no DNS name".into()))
}
