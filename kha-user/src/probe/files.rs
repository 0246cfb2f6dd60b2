//! Which files a probe's TLS comes from, and their bytes as read at one moment: the unit that
//! is watched for change and rebuilt (see [`super::reload`]).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::tls::{ProbeConfigError, ProbeTlsConfig, build};
use crate::config::ProbeTls;

/// Bound on one PEM file. A CA bundle is a few KiB (a system bundle about 200 KiB); a file
/// larger than this is not a certificate (a wrong path, /dev/zero) and must not grow the agent.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// The files one probe's TLS is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// The contents of [`TlsFiles`] at one moment. Compared whole to tell a change: the files are
/// small, and content (unlike mtime or inode) also catches an in-place rewrite, a copy that
/// kept the mtime, and the symlink swap kubelet does on rotation (`kubelet-client-current.pem`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPem {
    pub(super) ca: Option<Vec<u8>>,
    pub(super) client_cert: Option<Vec<u8>>,
    pub(super) client_key: Option<Vec<u8>>,
}

impl TlsFiles {
    /// Reads every file named (the CA not with `insecure_skip_verify`, which ignores it).
    pub fn read(&self) -> Result<TlsPem, ProbeConfigError> {
        let ca = match (&self.ca_file, self.insecure_skip_verify) {
            (Some(path), false) => Some(read(path, "CA file")?),
            _ => None,
        };
        let client_cert = self.client_cert.as_deref().map(|p| read(p, "client certificate")).transpose()?;
        let client_key = match (&self.client_key, &client_cert) {
            // One file with both (kubelet's): read once, so a rotation between two reads cannot
            // pair the old certificate with the new key.
            (Some(key), Some(cert)) if Some(key) == self.client_cert.as_ref() => Some(cert.clone()),
            (key, _) => key.as_deref().map(|p| read(p, "client key")).transpose()?,
        };
        Ok(TlsPem { ca, client_cert, client_key })
    }

    /// Reads and builds.
    pub fn load(&self) -> Result<Arc<ProbeTlsConfig>, ProbeConfigError> {
        build(self, &self.read()?)
    }
}

impl fmt::Display for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.ca_file, self.insecure_skip_verify) {
            (_, true) => write!(f, "no verification")?,
            (Some(ca), false) => write!(f, "CA {}", ca.display())?,
            (None, false) => write!(f, "no CA")?,
        }
        if let Some(cert) = &self.client_cert {
            write!(f, ", client certificate {}", cert.display())?;
        }
        match (&self.client_key, &self.client_cert) {
            (Some(key), Some(cert)) if key == cert => Ok(()),
            (Some(key), _) => write!(f, ", client key {}", key.display()),
            (None, _) => Ok(()),
        }
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, ProbeConfigError> {
    let fail = |source| ProbeConfigError::Read { what, path: path.to_owned(), source };
    let mut bytes = Vec::new();
    File::open(path).and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes)).map_err(fail)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(fail(io::Error::new(io::ErrorKind::FileTooLarge, "larger than 1 MiB")));
    }
    Ok(bytes)
}

/// The probe TLS settings of the command line, and how a frontend's own files override them.
/// Resolved again at every config (re)load, so a SIGHUP that changes the config file's
/// `ca_file` takes effect.
#[derive(Clone, Debug, Default)]
pub struct TlsDefaults {
    /// `--ca-file`: wins over the config file's `ca_file`.
    pub ca_file: Option<PathBuf>,
    /// Where kubespray or kubeadm keep the cluster CA, if one exists: used when neither the
    /// flag nor the config file names one.
    pub default_ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

impl TlsDefaults {
    /// The files of a frontend's probes: its own where it has them (etcd's CA and client
    /// certificate), else the flags, else the config file's `ca_file` (`config_ca`), else the
    /// default CA. A frontend with its own CA is verified even under `insecure_skip_verify`.
    pub fn files_for(&self, config_ca: Option<&Path>, own: &ProbeTls) -> TlsFiles {
        let ca =
            own.ca_file.as_deref().or(self.ca_file.as_deref()).or(config_ca).or(self.default_ca.as_deref());
        let (cert, key) = match (&own.client_cert, &own.client_key) {
            (Some(c), Some(k)) => (Some(c), Some(k)),
            _ => (self.client_cert.as_ref(), self.client_key.as_ref()),
        };
        TlsFiles {
            ca_file: ca.map(Path::to_owned),
            client_cert: cert.cloned(),
            client_key: key.cloned(),
            insecure_skip_verify: self.insecure_skip_verify && own.ca_file.is_none(),
        }
    }
}
