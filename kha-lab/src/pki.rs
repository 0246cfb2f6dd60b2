//! Certificates generated at run time: one lab CA and a server certificate
//! per master, so no key material is ever checked in.
//!
//! Server certificates carry the master's own addresses and also `localhost`,
//! `127.0.0.1` and `::1`, as real kube-apiserver certificates do: nodes reach
//! the apiservers through a localhost load balancer (kha), and the client
//! verifies the name it dialled, not the backend it ended up on.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Common name of the CA that `Pki::generate` creates.
pub const LAB_CA_NAME: &str = "kha-lab CA";
/// Every serving certificate's subject is `CN=kube-apiserver <master>`: the lab's client reads
/// the master that answered from it where no header says.
pub const SERVING_CN_PREFIX: &str = "kube-apiserver ";

/// DNS names every master certificate carries besides its addresses.
pub const COMMON_SANS: &[&str] = &[
    "localhost",
    "127.0.0.1",
    "::1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The name and addresses a master's certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterIdentity {
    pub name: String,
    pub ips: Vec<IpAddr>,
}

impl MasterIdentity {
    pub fn new(name: impl Into<String>, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        MasterIdentity { name: name.into(), ips: ips.into_iter().collect() }
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct IssuedCert {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    // Keep private keys out of test failure output and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A certificate authority that can issue master server certificates.
/// Create a second one with another name to get certificates a lab client
/// must reject (the wrong-CA case).
pub struct CertAuthority {
    cert: Certificate,
    key: KeyPair,
}

impl CertAuthority {
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let gen_err = |source| PkiError::Generate { what: format!("CA {common_name:?}"), source };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(CertAuthority { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a server certificate for `identity`, valid for its addresses and
    /// for every name in [`COMMON_SANS`].
    pub fn issue_server(&self, identity: &MasterIdentity) -> Result<IssuedCert, PkiError> {
        let gen_err =
            |source| PkiError::Generate { what: format!("certificate for {}", identity.name), source };
        let mut sans: Vec<String> = identity.ips.iter().map(IpAddr::to_string).collect();
        sans.extend(COMMON_SANS.iter().map(|s| s.to_string()));
        sans.dedup();
        // CertificateParams::new turns strings that parse as IPs into IP SANs.
        let mut params = CertificateParams::new(sans).map_err(gen_err)?;
        params.distinguished_name.push(DnType::CommonName, format!("{SERVING_CN_PREFIX}{}", identity.name));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(gen_err)?;
        Ok(IssuedCert { name: identity.name.clone(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

impl CertAuthority {
    /// A client certificate with common name `cn` and organizations `orgs`, as Kubernetes
    /// reads them: the user name and its groups (`system:nodes`, `system:masters`).
    pub fn issue_client(&self, cn: &str, orgs: &[&str]) -> Result<IssuedCert, PkiError> {
        let gen_err = |source| PkiError::Generate { what: format!("client certificate {cn:?}"), source };
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(gen_err)?;
        Ok(IssuedCert { name: cn.to_owned(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// The lab CA and one server certificate per master.
pub struct Pki {
    pub ca_cert_pem: String,
    pub masters: Vec<IssuedCert>,
}

/// Where [`Pki::write_to`] put the PEM files.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub ca_cert: PathBuf,
    pub masters: Vec<MasterPaths>,
}

#[derive(Debug, Clone)]
pub struct MasterPaths {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PkiPaths {
    pub fn master(&self, name: &str) -> Option<&MasterPaths> {
        self.masters.iter().find(|m| m.name == name)
    }
}

impl Pki {
    /// A fresh CA named [`LAB_CA_NAME`] and a certificate for each master.
    pub fn generate(masters: &[MasterIdentity]) -> Result<Pki, PkiError> {
        Self::generate_with_ca(&CertAuthority::new(LAB_CA_NAME)?, masters)
    }

    pub fn generate_with_ca(ca: &CertAuthority, masters: &[MasterIdentity]) -> Result<Pki, PkiError> {
        let masters = masters.iter().map(|m| ca.issue_server(m)).collect::<Result<_, _>>()?;
        Ok(Pki { ca_cert_pem: ca.cert_pem(), masters })
    }

    pub fn master(&self, name: &str) -> Option<&IssuedCert> {
        self.masters.iter().find(|m| m.name == name)
    }

    /// Writes `ca.pem`, `<name>.pem` and `<name>-key.pem` into `dir`
    /// (created if missing); keys are written mode 0600.
    pub fn write_to(&self, dir: &Path) -> Result<PkiPaths, PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })?;
        let ca_cert = dir.join("ca.pem");
        write_file(&ca_cert, &self.ca_cert_pem, 0o644)?;
        let mut masters = Vec::with_capacity(self.masters.len());
        for m in &self.masters {
            let cert = dir.join(format!("{}.pem", m.name));
            let key = dir.join(format!("{}-key.pem", m.name));
            write_file(&cert, &m.cert_pem, 0o644)?;
            write_file(&key, &m.key_pem, 0o600)?;
            masters.push(MasterPaths { name: m.name.clone(), cert, key });
        }
        Ok(PkiPaths { ca_cert, masters })
    }
}

pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)?;
        f.write_all(contents.as_bytes())
    };
    write().map_err(|source| PkiError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    fn identity() -> MasterIdentity {
        MasterIdentity::new("m1", ["192.0.2.11".parse().unwrap(), "2001:db8::11".parse().unwrap()])
    }

    fn verify(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let verifier = tls::server_verifier(ca_pem.as_bytes()).expect("verifier");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("parse cert");
        let name = ServerName::try_from(name.to_owned()).expect("server name");
        verifier.verify_server_cert(&certs[0], &[], &name, &[], UnixTime::now()).map(|_| ())
    }

    #[test]
    fn server_cert_verifies_for_every_name_a_client_dials() {
        let pki = Pki::generate(&[identity()]).expect("generate");
        let m1 = pki.master("m1").expect("m1");
        for name in ["127.0.0.1", "::1", "localhost", "192.0.2.11", "2001:db8::11", "kubernetes.default.svc"]
        {
            verify(&pki.ca_cert_pem, &m1.cert_pem, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let err = verify(&pki.ca_cert_pem, &m1.cert_pem, "192.0.2.12").expect_err("other ip");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                    | rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForNameContext { .. }
                    )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn cert_from_another_ca_is_rejected() {
        let pki = Pki::generate(&[identity()]).expect("generate");
        let other = CertAuthority::new("kha-lab other CA").expect("other ca");
        let foreign = other.issue_server(&identity()).expect("issue");
        let err = verify(&pki.ca_cert_pem, &foreign.cert_pem, "127.0.0.1").expect_err("wrong CA");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)),
            "{err:?}"
        );
    }

    #[test]
    fn write_to_produces_loadable_files() {
        let dir = std::env::temp_dir().join(format!("kha-lab-pki-{}", std::process::id()));
        let pki = Pki::generate(&[identity()]).expect("generate");
        let paths = pki.write_to(&dir).expect("write");
        let m1 = paths.master("m1").expect("m1 paths");
        tls::server_config_from_files(&m1.cert, &m1.key).expect("server config");
        tls::client_config_from_ca_file(&paths.ca_cert).expect("client config");
        let _ = fs::remove_dir_all(&dir);
    }
}
