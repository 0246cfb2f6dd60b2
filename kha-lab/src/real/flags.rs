//! The command lines of the real control plane's processes, as kubespray configures a
//! stacked-etcd master: pure, so the flags are unit-tested without starting anything.
//!
//! Kept from kubespray's kube-apiserver defaults (roles/kubernetes/control-plane): secure port
//! 6443 on every address, `--advertise-address` the master's own, `--authorization-mode=Node,RBAC`,
//! `--endpoint-reconciler-type=lease` (so the `kubernetes` EndpointSlice lists exactly the live
//! apiservers), service-account keys, client certificates verified against the cluster CA.
//! Changed for the lab: etcd over plain HTTP inside the lab's own namespaces (its TLS is not
//! what kha balances), a service range in a documentation prefix (no traffic is ever sent
//! there), and no admission plugins beyond the defaults.

use std::{net::Ipv4Addr, path::Path, time::Duration};

pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
pub const APISERVER_PORT: u16 = 6443;
/// The `kubernetes` service takes the first address of this range; nothing routes there.
pub const SERVICE_RANGE: &str = "198.51.100.0/24";

/// One etcd member of the lab's cluster.
pub struct EtcdMember<'a> {
    pub name: &'a str,
    pub ip: Ipv4Addr,
    pub data_dir: &'a Path,
}

/// `etcd` flags for `me` in a cluster of `all`. Its own apiserver uses loopback, as with
/// kubeadm's stacked etcd (stopping one member fails exactly one apiserver's `/readyz`); the
/// member's address serves the apiserver of a master that has no member of its own.
pub fn etcd(me: &EtcdMember, all: &[EtcdMember]) -> Vec<String> {
    let peer = |m: &EtcdMember| format!("http://{}:{ETCD_PEER_PORT}", m.ip);
    let cluster: Vec<String> = all.iter().map(|m| format!("{}={}", m.name, peer(m))).collect();
    vec![
        format!("--name={}", me.name),
        format!("--data-dir={}", me.data_dir.display()),
        format!(
            "--listen-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT},http://{}:{ETCD_CLIENT_PORT}",
            me.ip
        ),
        format!("--advertise-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
        format!("--listen-peer-urls={}", peer(me)),
        format!("--initial-advertise-peer-urls={}", peer(me)),
        format!("--initial-cluster={}", cluster.join(",")),
        "--initial-cluster-state=new".into(),
        "--initial-cluster-token=kha-lab".into(),
        "--log-level=warn".into(),
    ]
}

/// What differs between the apiservers of one lab, and between runs.
pub struct Apiserver<'a> {
    pub advertise: Ipv4Addr,
    /// Its own member's (loopback), or another master's for one without a member.
    pub etcd: Ipv4Addr,
    pub dir: &'a Path,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub service_account_key: &'a Path,
    pub service_account_pub: &'a Path,
    pub anonymous_auth: bool,
    /// `--shutdown-delay-duration`: how long `/readyz` fails while the apiserver still serves,
    /// after SIGTERM and before it closes its listener (kubeadm's default: none).
    pub shutdown_delay: Duration,
}

pub fn apiserver(a: &Apiserver) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        // `::` takes IPv4 and IPv6: kha's IPv6 frontend may pick either family.
        "--bind-address=::".into(),
        format!("--secure-port={APISERVER_PORT}"),
        format!("--advertise-address={}", a.advertise),
        format!("--etcd-servers=http://{}:{ETCD_CLIENT_PORT}", a.etcd),
        format!("--tls-cert-file={}", path(a.cert)),
        format!("--tls-private-key-file={}", path(a.key)),
        format!("--client-ca-file={}", path(a.ca)),
        format!("--service-account-key-file={}", path(a.service_account_pub)),
        format!("--service-account-signing-key-file={}", path(a.service_account_key)),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        "--authorization-mode=Node,RBAC".into(),
        "--endpoint-reconciler-type=lease".into(),
        format!("--service-cluster-ip-range={SERVICE_RANGE}"),
        format!("--anonymous-auth={}", a.anonymous_auth),
        format!("--shutdown-delay-duration={}s", a.shutdown_delay.as_secs()),
        format!("--cert-dir={}", path(&a.dir.join("apiserver-certs"))),
        // Quiet enough to keep the log readable, loud enough to see the shutdown sequence.
        "--v=1".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_members_name_every_peer_and_serve_clients_on_loopback() {
        let d = Path::new("/tmp/x");
        let all = [
            EtcdMember { name: "m1", ip: Ipv4Addr::new(192, 0, 2, 11), data_dir: d },
            EtcdMember { name: "m2", ip: Ipv4Addr::new(192, 0, 2, 12), data_dir: d },
        ];
        let f = etcd(&all[1], &all);
        assert!(f.contains(&"--initial-cluster=m1=http://192.0.2.11:2380,m2=http://192.0.2.12:2380".into()));
        assert!(f.contains(&"--listen-peer-urls=http://192.0.2.12:2380".into()));
        assert!(f.contains(&"--listen-client-urls=http://127.0.0.1:2379,http://192.0.2.12:2379".into()));
    }

    #[test]
    fn apiserver_flags_follow_kubespray_and_the_options() {
        let p = Path::new("/p");
        let a = Apiserver {
            advertise: Ipv4Addr::new(192, 0, 2, 11),
            etcd: Ipv4Addr::LOCALHOST,
            dir: p,
            ca: p,
            cert: p,
            key: p,
            service_account_key: p,
            service_account_pub: p,
            anonymous_auth: false,
            shutdown_delay: Duration::from_secs(15),
        };
        let f = apiserver(&a);
        for want in [
            "--secure-port=6443",
            "--advertise-address=192.0.2.11",
            "--endpoint-reconciler-type=lease",
            "--authorization-mode=Node,RBAC",
            "--anonymous-auth=false",
            "--shutdown-delay-duration=15s",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
    }
}
