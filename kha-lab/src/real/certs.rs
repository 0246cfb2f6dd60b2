//! The real control plane's key material, made at run time like the simulated lab's: the
//! cluster CA, each apiserver's serving certificate (the SANs kubespray puts in: `localhost`,
//! `127.0.0.1`, `::1`, the master's addresses, `kubernetes.default...`), a node identity as
//! kubelet has (`system:node:<name>` in `system:nodes`), an admin identity for the lab's own
//! kubectl calls (`system:masters`), the service-account signing key, and kubeconfigs.

use std::path::{Path, PathBuf};

use rcgen::KeyPair;

use crate::{
    MasterIdentity, Pki, PkiPaths,
    pki::{CertAuthority, IssuedCert, LAB_CA_NAME, PkiError, write_file},
};

/// The node the lab's clients and kha run on, as the apiserver's Node authorizer names it.
pub const NODE_NAME: &str = "kha-node";

/// A client identity and its files.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Files {
    pub pki: PkiPaths,
    pub node: ClientFiles,
    pub admin: ClientFiles,
    /// The signing key and its public half (`--service-account-key-file` reads public keys
    /// only).
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

/// Who a kubeconfig authenticates as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// kubelet-like: `system:node:kha-node`, group `system:nodes`.
    Node,
    /// `system:masters`: anything.
    Admin,
}

pub fn generate(masters: &[MasterIdentity], dir: &Path) -> Result<Files, PkiError> {
    let ca = CertAuthority::new(LAB_CA_NAME)?;
    let pki = Pki::generate_with_ca(&ca, masters)?.write_to(dir)?;
    let write_client = |c: IssuedCert, file: &str| -> Result<ClientFiles, PkiError> {
        let files =
            ClientFiles { cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}-key.pem")) };
        write_file(&files.cert, &c.cert_pem, 0o644)?;
        write_file(&files.key, &c.key_pem, 0o600)?;
        Ok(files)
    };
    let node =
        write_client(ca.issue_client(&format!("system:node:{NODE_NAME}"), &["system:nodes"])?, "node")?;
    let admin = write_client(ca.issue_client("kha-admin", &["system:masters"])?, "admin")?;
    let sa = KeyPair::generate()
        .map_err(|source| PkiError::Generate { what: "service-account key".into(), source })?;
    let service_account_key = dir.join("service-account-key.pem");
    write_file(&service_account_key, &sa.serialize_pem(), 0o600)?;
    let service_account_pub = dir.join("service-account.pub");
    write_file(&service_account_pub, &sa.public_key_pem(), 0o644)?;
    Ok(Files { pki, node, admin, service_account_key, service_account_pub })
}

impl Files {
    /// A kubeconfig for `user` against `server` (e.g. `https://localhost:6443`), trusting the
    /// cluster CA; `tls_server_name` overrides the name verified (a URL with `[::1]` still
    /// checks `localhost`, as the IPv4 one does).
    pub fn kubeconfig(&self, user: User, server: &str, tls_server_name: Option<&str>) -> String {
        let c = match user {
            User::Node => &self.node,
            User::Admin => &self.admin,
        };
        let sni = tls_server_name.map(|n| format!("\n    tls-server-name: {n}")).unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    certificate-authority: {ca}{sni}\nusers:\n- name: u\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: u}}\ncurrent-context: lab\n",
            ca = self.pki.ca_cert.display(),
            cert = c.cert.display(),
            key = c.key.display(),
        )
    }

    pub fn write_kubeconfig(
        &self,
        path: &Path,
        user: User,
        server: &str,
        tls_server_name: Option<&str>,
    ) -> Result<PathBuf, PkiError> {
        write_file(path, &self.kubeconfig(user, server, tls_server_name), 0o600)?;
        Ok(path.to_owned())
    }
}
