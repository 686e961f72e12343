//! Certificates for the test control plane: a cluster CA, the API server's serving
//! certificate, an admin client identity in `system:masters`, the service-account key pair, and
//! client identities issued on demand (each kubelet's `system:node:NAME`, the API server's
//! identity towards the kubelets).

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// PEM files written by [`Pki::create`], and the CA to issue more.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_cert: PathBuf,
    pub ca_pem: String,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

impl Pki {
    /// Creates everything in `dir`. `ips` are the addresses the API server is reached on.
    pub fn create(dir: &Path, ips: &[std::net::IpAddr]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut ca_params = CertificateParams::new(vec![])?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ployz-e2e-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut serving = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca)?;

        let (admin_cert_pem, admin_key_pem) =
            issue_client(&ca, "ployz-e2e-admin", "system:masters")?;

        let sa = KeyPair::generate()?;

        let write = |name: &str, pem: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, pem)?;
            Ok(p)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            ca_cert: write("ca.crt", &ca.pem())?,
            ca_pem: ca.pem(),
            serving_cert: write("apiserver.crt", &serving_cert.pem())?,
            serving_key: write("apiserver.key", &serving_key.serialize_pem())?,
            admin_cert_pem,
            admin_key_pem,
            sa_key: write("sa.key", &sa.serialize_pem())?,
            sa_pub: write("sa.pub", &sa.public_key_pem())?,
            ca,
        })
    }

    /// A client identity `CN=cn, O=org` signed by the cluster CA: PEM certificate and key.
    pub fn client(&self, cn: &str, org: &str) -> Result<(String, String)> {
        issue_client(&self.ca, cn, org)
    }

    /// Writes `pem` as file `name` of the PKI directory and returns its path.
    pub fn write(&self, name: &str, pem: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        std::fs::write(&p, pem)?;
        Ok(p)
    }
}

fn issue_client(
    ca: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    org: &str,
) -> Result<(String, String)> {
    let mut p = CertificateParams::new(vec![])?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, org);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}
