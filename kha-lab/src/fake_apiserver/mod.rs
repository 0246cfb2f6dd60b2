//! The fake kube-apiserver of kha's discovery tests (kha-user's unit tests and the end-to-end
//! tests): HTTPS on 127.0.0.1 serving the `kubernetes` service's EndpointSlices (list and
//! watch), stopped or failing on demand ([`server`]), and its set-up with the lab's PKI.

use std::path::{Path, PathBuf};

mod server;

pub use server::{FakeApiserver, FakeError, FakeTls, SLICES_PATH};

use crate::pki::PkiPaths;

#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] FakeError),
    #[error("no master certificate in the lab PKI")]
    NoCertificate,
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// A fake apiserver with the lab's first master certificate (it names 127.0.0.1, as every lab
/// server certificate does), and a kubeconfig in `dir` that trusts the lab CA.
pub fn start_for_lab(pki: &PkiPaths, dir: &Path) -> Result<(FakeApiserver, PathBuf), FakeApiError> {
    start_for_lab_in(None, pki, dir)
}

/// As [`start_for_lab`], listening on 127.0.0.1 of network namespace `netns` when given (the
/// lab's node namespace: where kha's probes, and an agent started there, reach it).
pub fn start_for_lab_in(
    netns: Option<&str>,
    pki: &PkiPaths,
    dir: &Path,
) -> Result<(FakeApiserver, PathBuf), FakeApiError> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| FakeApiError::Read { path: path.into(), source });
    let master = pki.masters.first().ok_or(FakeApiError::NoCertificate)?;
    let (cert, key) = (read(&master.cert)?, read(&master.key)?);
    let start = move || FakeApiserver::start(FakeTls { cert_pem: &cert, key_pem: &key, client_ca_pem: None });
    let api = match netns {
        None => start()?,
        Some(ns) => crate::netns::run_in(ns, start)??,
    };
    let path = dir.join("kubeconfig-fake");
    let kubeconfig = api
        .write_kubeconfig(&path, &pki.ca_cert, None)
        .map_err(|source| FakeApiError::Read { path: path.clone(), source })?;
    Ok((api, kubeconfig))
}
