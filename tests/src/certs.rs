//! Test certificate authorities and server certificates (rcgen), written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA that can issue server certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// PEM file of the CA certificate (give to clients as a trust root).
    pub cert_path: PathBuf,
}

/// A server certificate and key on disk.
pub struct ServerCert {
    /// PEM certificate (leaf only).
    pub cert_path: PathBuf,
    /// PEM PKCS#8 key.
    pub key_path: PathBuf,
}

impl TestCa {
    /// A new CA named `cn`, its certificate written to `dir/<file_stem>-ca.pem`.
    pub fn new(dir: &Path, file_stem: &str, cn: &str) -> Result<Self> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "tollgate e2e");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        let cert_path = dir.join(format!("{file_stem}-ca.pem"));
        std::fs::write(&cert_path, cert.pem())?;
        Ok(TestCa { cert, key, cert_path })
    }

    /// Issue a server certificate for `names` (DNS names or IP addresses), written to
    /// `dir/<file_stem>.pem` and `dir/<file_stem>.key`.
    pub fn issue(&self, dir: &Path, file_stem: &str, names: &[&str]) -> Result<ServerCert> {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::NoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        let cert_path = dir.join(format!("{file_stem}.pem"));
        let key_path = dir.join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(ServerCert { cert_path, key_path })
    }
}
