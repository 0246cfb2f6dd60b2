//! The probes' rustls client configuration: the cluster CA as the only trust anchor, an
//! optional client certificate, or (only when asked) no verification at all.
//!
//! The ring provider is named explicitly rather than taken from the process default, so the
//! config does not depend on what other crates in the binary install.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::files::{TlsFiles, TlsPem};

/// Why the probes' TLS settings cannot be used. Each names the file and the problem; the
/// underlying error, where there is one, is the `source` (print with `{:#}` for the chain).
#[derive(Debug, thiserror::Error)]
pub enum ProbeConfigError {
    #[error(
        "no CA file to verify the apiservers with: pass --ca-file (kubeadm: /etc/kubernetes/pki/ca.crt, kubespray: /etc/kubernetes/ssl/ca.crt), or --insecure-skip-tls-verify to probe without verifying"
    )]
    NoCaFile,
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is not valid PEM", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{what} {} contains no PEM certificate", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("CA file {}: a certificate in it cannot be used as a trust anchor", path.display())]
    BadCaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA file {}: no usable trust anchor in it", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    #[error("client key {} contains no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error(
        "client certificate {} and key {} cannot be used together (does the key belong to the certificate?)",
        cert.display(), key.display()
    )]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client certificate {} given without a client key (--client-key)", path.display())]
    CertWithoutKey { path: PathBuf },
    #[error("client key {} given without a client certificate (--client-cert)", path.display())]
    KeyWithoutCert { path: PathBuf },
    #[error("the TLS library refused its default protocol versions")]
    Protocol {
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider of every probe config.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A probe TLS config as the probes use it: the rustls client config, and the verifier in it
/// (none with `insecure_skip_verify`), kept so that a probe can check an established
/// connection's certificate against a reloaded CA without a new handshake.
#[derive(Debug)]
pub struct ProbeTlsConfig {
    pub client: Arc<ClientConfig>,
    pub(super) verifier: Option<Arc<WebPkiServerVerifier>>,
}

/// Builds the probes' client config.
///
/// - `ca_file`: PEM bundle of the CA(s) that sign the apiservers' serving certificates (the
///   cluster CA). Required unless `insecure_skip_verify`; ignored if it is set.
/// - `client_cert` + `client_key`: PEM certificate chain and private key presented to the
///   apiservers, for clusters without anonymous auth. Both or neither; they may be one file
///   (kubelet's `kubelet-client-current.pem`).
/// - `insecure_skip_verify`: accept any server certificate (the handshake still runs and its
///   signature is still checked against the certificate's key, so a probe still means "a TLS
///   server answered"). The caller logs the warning.
///
/// ALPN offers only `http/1.1`, the protocol the prober speaks.
pub fn tls_config(
    ca_file: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
    insecure_skip_verify: bool,
) -> Result<Arc<ClientConfig>, ProbeConfigError> {
    let files = TlsFiles {
        ca_file: ca_file.map(Path::to_owned),
        client_cert: client_cert.map(Path::to_owned),
        client_key: client_key.map(Path::to_owned),
        insecure_skip_verify,
    };
    Ok(files.load()?.client.clone())
}

/// The config from `files` as read into `pem`. Built from the bytes read once, not from the
/// files again, so what is checked for change is exactly what the config was made from.
pub(super) fn build(files: &TlsFiles, pem: &TlsPem) -> Result<Arc<ProbeTlsConfig>, ProbeConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| ProbeConfigError::Protocol { source })?;
    let (builder, verifier) = if files.insecure_skip_verify {
        let verifier = AcceptAnyCertificate { algorithms: provider.signature_verification_algorithms };
        (builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)), None)
    } else {
        let (path, ca) = match (&files.ca_file, &pem.ca) {
            (Some(path), Some(ca)) => (path, ca),
            _ => return Err(ProbeConfigError::NoCaFile),
        };
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(path, ca)?), provider)
            .build()
            .map_err(|source| ProbeConfigError::Verifier { path: path.clone(), source })?;
        (builder.with_webpki_verifier(verifier.clone()), Some(verifier))
    };
    let mut config = match (&files.client_cert, &files.client_key, &pem.client_cert, &pem.client_key) {
        (None, None, _, _) => builder.with_no_client_auth(),
        (Some(path), None, _, _) => return Err(ProbeConfigError::CertWithoutKey { path: path.clone() }),
        (None, Some(path), _, _) => return Err(ProbeConfigError::KeyWithoutCert { path: path.clone() }),
        (Some(cert), Some(key), Some(cert_pem), Some(key_pem)) => {
            let chain = certificates(cert, "client certificate", cert_pem)?;
            // rustls checks that the key is the certificate's: a certificate and key written
            // one after the other are refused until both are the new ones.
            builder.with_client_auth_cert(chain, private_key(key, key_pem)?).map_err(|source| {
                ProbeConfigError::ClientAuth { cert: cert.clone(), key: key.clone(), source }
            })?
        }
        // `TlsFiles::read` reads every file named; nothing to build from otherwise.
        (Some(path), Some(_), _, _) => {
            return Err(ProbeConfigError::NoCertificate { what: "client certificate", path: path.clone() });
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(ProbeTlsConfig { client: Arc::new(config), verifier }))
}

fn certificates(
    path: &Path,
    what: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ProbeConfigError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|source| ProbeConfigError::Pem { what, path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(ProbeConfigError::NoCertificate { what, path: path.to_owned() });
    }
    Ok(certs)
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, ProbeConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, "CA file", pem)? {
        roots
            .add(cert)
            .map_err(|source| ProbeConfigError::BadCaCertificate { path: path.to_owned(), source })?;
    }
    Ok(roots)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, ProbeConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        pem::Error::NoItemsFound => ProbeConfigError::NoPrivateKey { path: path.to_owned() },
        source => ProbeConfigError::Pem { what: "client key", path: path.to_owned(), source },
    })
}

/// `--insecure-skip-tls-verify`: any certificate, any name. Handshake signatures are still
/// verified (with the provider's algorithms), so the peer must hold the key of the
/// certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
