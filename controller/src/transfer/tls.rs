//! Mutual TLS between agents, with pinned keys and no certificate authority.
//!
//! Every agent generates its key pair at start, in memory, and publishes the SHA-256 of its
//! public key (the certificate's SubjectPublicKeyInfo) in its Machine's status. A peer accepts
//! a machine's key only when it is the one that machine publishes, as WireGuard peers pin
//! public keys: no node holds a key that could vouch for another node, nothing is issued by
//! hand, and a restart rotates the key. Which client may write a Machine is the admission
//! policy's business (only the agent of that node); see docs/security.md.
//!
//! A certificate's DNS name says which machine it claims to be; the pin decides whether the
//! claim is true. Validity dates and issuers play no part.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};

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
    #[error("generating the agent's key: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the peer presented no usable certificate: {0}")]
    PeerIdentity(String),
}

/// SHA-256 of a public key (DER SubjectPublicKeyInfo), written `sha256:` and 64 hex digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pin(String);

/// What a [`Pin`] looks like, for the CRD's schema.
pub const PIN_PATTERN: &str = "^sha256:[0-9a-f]{64}$";
const PIN_PREFIX: &str = "sha256:";

impl Pin {
    /// The pin of `cert`'s public key.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| TlsError::PeerIdentity(e.to_string()))?;
        let digest = Sha256::digest(parsed.tbs_certificate.subject_pki.raw);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self(format!("{PIN_PREFIX}{hex}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({})", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a key pin: expected sha256: and 64 lowercase hex digits")]
pub struct BadPin(String);

impl FromStr for Pin {
    type Err = BadPin;
    fn from_str(s: &str) -> Result<Self, BadPin> {
        let hex = s.strip_prefix(PIN_PREFIX).ok_or_else(|| BadPin(s.into()))?;
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.into()))
        } else {
            Err(BadPin(s.into()))
        }
    }
}

/// An agent's key pair and the self-signed certificate that carries it.
#[derive(Clone)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pin: Pin,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("pin", &self.pin).finish()
    }
}

impl Identity {
    /// A new key pair (ECDSA P-256) for `machine`, which never leaves this process.
    pub fn generate(machine: &str) -> Result<Self, TlsError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![machine.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, machine);
        let cert = params.self_signed(&key)?;
        let der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| TlsError::PeerIdentity(e.to_string()))?;
        Self::new(vec![cert.der().clone()], der)
    }

    /// A key and certificate from files (`tls.crt`/`tls.key`, as cert-manager writes them),
    /// for operators who manage agent keys themselves. Still pinned, never chained.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Read {
                path: cert.display().to_string(),
                source,
            })?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
            path: key.display().to_string(),
            source,
        })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert.display().to_string()));
        }
        Self::new(chain, key)
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate("the chain".into()))?;
        let pin = Pin::of(leaf)?;
        let identity = Self {
            chain,
            key: Arc::new(key),
            pin,
        };
        // Fails now, not at the first handshake, when the key is not the certificate's.
        identity.server_config()?;
        Ok(identity)
    }

    /// What this agent publishes in its Machine's status.
    pub fn pin(&self) -> &Pin {
        &self.pin
    }

    /// Server side: any client that proves it holds the key of the certificate it presents
    /// gets through the handshake; the receiver then compares that key with the pin its
    /// claimed machine publishes, before it reads anything else.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(AnyClientKey(algorithms())))
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// Client side: the server must hold the key `peer` pins, and name the machine we dial.
    pub fn client_config(&self, peer: &Pin) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer {
                pin: peer.clone(),
                algorithms: algorithms(),
            }))
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

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

fn rejected(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        TlsError::PeerIdentity(message),
    ))))
}

/// Accepts a client's certificate when it names a machine; the handshake's signature proves
/// the client holds its key, and [`Pin`] comparison happens after the handshake, where the
/// receiver can ask the API which key that machine publishes.
#[derive(Debug)]
struct AnyClientKey(WebPkiSupportedAlgorithms);

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        peer_machine(end_entity).map_err(|e| rejected(e.to_string()))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Accepts the server only with the pinned key and the name of the machine dialled.
#[derive(Debug)]
struct PinnedServer {
    pin: Pin,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Pin::of(end_entity).map_err(|e| rejected(e.to_string()))?;
        if presented != self.pin {
            return Err(rejected(format!(
                "the server's key is {presented}, but its Machine publishes {}; \
                 if its agent restarted, the next attempt reads the new key",
                self.pin
            )));
        }
        let named = peer_machine(end_entity).map_err(|e| rejected(e.to_string()))?;
        if ServerName::try_from(named.as_str()).ok().as_ref() != Some(server_name) {
            return Err(rejected(format!(
                "the server's certificate names {named}, not {}",
                server_name.to_str()
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The TLS server name for a machine.
pub fn server_name(machine: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(machine.to_string()).map_err(|e| TlsError::PeerIdentity(e.to_string()))
}

/// The machine a peer certificate claims to be: its first DNS subject alternative name.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_sha256_of_the_public_key_and_parses_back() -> Result<(), Box<dyn std::error::Error>>
    {
        let a = Identity::generate("machine-a")?;
        let b = Identity::generate("machine-a")?;
        assert_ne!(a.pin(), b.pin(), "each start makes a new key");
        assert_eq!(a.pin().as_str().parse::<Pin>()?, *a.pin());
        assert_eq!(a.pin().as_str().len(), "sha256:".len() + 64);
        Ok(())
    }

    /// A handshake over an in-memory pipe: what the client's verifier says, and the key the
    /// server saw.
    async fn handshake(
        client: &Identity,
        server: &Identity,
        pin: &Pin,
        name: &str,
    ) -> Result<Pin, Box<dyn std::error::Error>> {
        let (c, s) = tokio::io::duplex(1 << 16);
        let connector = tokio_rustls::TlsConnector::from(client.client_config(pin)?);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config()?);
        let (connected, accepted) =
            tokio::join!(connector.connect(server_name(name)?, c), acceptor.accept(s));
        connected?;
        let accepted = accepted?;
        let cert = accepted
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        assert_eq!(peer_machine(cert)?, "machine-a");
        Ok(Pin::of(cert)?)
    }

    #[tokio::test]
    async fn the_client_reaches_only_the_server_holding_the_pinned_key()
    -> Result<(), Box<dyn std::error::Error>> {
        let (a, b) = (
            Identity::generate("machine-a")?,
            Identity::generate("machine-b")?,
        );
        let seen = handshake(&a, &b, b.pin(), "machine-b").await?;
        assert_eq!(&seen, a.pin(), "the server sees the client's own key");
        let impostor = Identity::generate("machine-b")?;
        let err = handshake(&a, &impostor, b.pin(), "machine-b").await;
        assert!(
            err.as_ref()
                .is_err_and(|e| e.to_string().contains("its Machine publishes")),
            "{err:?}"
        );
        let misnamed = handshake(&a, &b, b.pin(), "machine-c").await;
        assert!(
            misnamed.is_err(),
            "the key of machine-b does not answer for machine-c"
        );
        Ok(())
    }

    #[test]
    fn malformed_pins_are_refused() {
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "0".repeat(63)),
        ] {
            assert!(bad.parse::<Pin>().is_err(), "{bad:?}");
        }
    }
}
