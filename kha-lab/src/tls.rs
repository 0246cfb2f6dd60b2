//! rustls configurations for lab masters and clients, built from PEM.
//!
//! The ring provider is named explicitly rather than taken from the process
//! default, so these configs work whatever other crates in the same binary
//! install as default provider.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing PEM {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: pem::Error,
    },
    #[error("no {what} found in PEM input")]
    Missing { what: &'static str },
    #[error("building TLS {what}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("building certificate verifier")]
    Verifier {
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
}

/// The crypto provider every lab config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    fs::read(path).map_err(|source| TlsConfigError::Read { path: path.to_owned(), source })
}

pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsConfigError::Pem { what: "certificate", source })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Missing { what: "certificate" });
    }
    Ok(certs)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsConfigError::Missing { what: "private key" },
        source => TlsConfigError::Pem { what: "private key", source },
    })
}

fn roots(ca_pem: &[u8]) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert).map_err(|source| TlsConfigError::Rustls { what: "root store", source })?;
    }
    Ok(Arc::new(roots))
}

/// A server config offering TLS 1.2 and 1.3 and HTTP/1.1 via ALPN.
pub fn server_config_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|source| TlsConfigError::Rustls { what: "server protocol versions", source })?
        .with_no_client_auth()
        .with_single_cert(parse_certs(cert_pem)?, parse_key(key_pem)?)
        .map_err(|source| TlsConfigError::Rustls { what: "server certificate", source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsConfigError> {
    server_config_from_pem(&read(cert)?, &read(key)?)
}

/// A client config trusting only the CA(s) in `ca_pem`.
pub fn client_config_from_ca_pem(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|source| TlsConfigError::Rustls { what: "client protocol versions", source })?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub fn client_config_from_ca_file(ca: &Path) -> Result<Arc<ClientConfig>, TlsConfigError> {
    client_config_from_ca_pem(&read(ca)?)
}

/// The verifier a client built from `ca_pem` uses; lets tests check a
/// certificate against a CA without a handshake.
pub fn server_verifier(ca_pem: &[u8]) -> Result<Arc<WebPkiServerVerifier>, TlsConfigError> {
    WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|source| TlsConfigError::Verifier { source })
}

/// A short, stable name for a TLS failure, for error tallies.
pub fn error_key(err: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => "unknown_issuer",
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "not_valid_for_name"
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
        rustls::Error::InvalidCertificate(_) => "invalid_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::PeerIncompatible(_) => "peer_incompatible",
        rustls::Error::PeerMisbehaved(_) => "peer_misbehaved",
        rustls::Error::InvalidMessage(_) => "invalid_message",
        _ => "handshake",
    }
}
