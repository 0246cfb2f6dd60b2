//! The kha config file (docs/operations.md) for a non-master node of a kubespray cluster:
//! what nginx-proxy serves there, `localhost:loadbalancer_apiserver_port` in front of every
//! control-plane host on `kube_apiserver_port`, and optionally the seed's "ETCD with a LB".

use std::{fmt::Write as _, net::IpAddr};

use super::{
    endpoints::select_mode,
    error::KubesprayError,
    inventory::{Group, Inventory},
    vars::{self, Vars},
};
use crate::config::{Config, FrontendDefaults};

/// Where kubespray puts the cluster CA on every node.
pub const KUBESPRAY_CA_FILE: &str = "/etc/kubernetes/ssl/ca.crt";
/// etcd's client port (kubespray: `etcd_client_url`).
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const APISERVER_HEALTH_PATH: &str = crate::probe::DEFAULT_PATH;
pub const ETCD_HEALTH_PATH: &str = "/health";
/// kubespray's etcd CA and client certificates (per node: `node-<inventory_hostname>`).
pub const KUBESPRAY_ETCD_CA_FILE: &str = "/etc/ssl/etcd/ssl/ca.pem";

/// A `[[frontend]]` table to write.
struct Table {
    comment: Vec<String>,
    address: String,
    /// `(host, "IP:PORT")`.
    backends: Vec<(String, String)>,
    health_path: &'static str,
}

/// One line of a comment: no line breaks from file names can end it early.
fn safe(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn ip_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// The frontends `127.0.0.1:port` and `[::1]:port` for `members` on `backend_port`. kha refuses an IPv6
/// backend for an IPv4 frontend (an IPv4 socket cannot reach it), so IPv6 members serve only
/// `[::1]`; a frontend left without backends is not written (`ipv6_always`: write `[::1]` even
/// when every member is IPv4, as for the apiserver, which clients reach as `localhost`).
fn frontends(
    members: &[(String, IpAddr)],
    port: u16,
    backend_port: u16,
    health_path: &'static str,
    comment: Vec<String>,
    ipv6_always: bool,
) -> Vec<Table> {
    let backends = |v4_only: bool| -> Vec<(String, String)> {
        members
            .iter()
            .filter(|(_, ip)| !v4_only || ip.is_ipv4())
            .map(|(h, ip)| (h.clone(), ip_port(*ip, backend_port)))
            .collect()
    };
    let v6_members: Vec<&str> =
        members.iter().filter(|(_, ip)| ip.is_ipv6()).map(|(h, _)| h.as_str()).collect();
    let v4 = backends(true);
    let mut notes = Vec::new();
    if !v6_members.is_empty() {
        notes.push(format!(
            "{} {} IPv6: an IPv4 frontend cannot have IPv6 backends (an IPv4 socket cannot reach them), so only [::1]:{port} has {}.",
            v6_members.join(", "),
            if v6_members.len() == 1 { "is" } else { "are" },
            if v6_members.len() == 1 { "it" } else { "them" },
        ));
    }
    if v4.is_empty() {
        notes.push(format!(
            "No IPv4 member: no 127.0.0.1:{port} frontend (connects there are left untouched)."
        ));
    }
    let mut comment = Some(comment);
    let mut tables = Vec::new();
    if !v4.is_empty() {
        let comment = comment.take().unwrap_or_default();
        tables.push(Table { comment, address: format!("127.0.0.1:{port}"), backends: v4, health_path });
    }
    if ipv6_always || !v6_members.is_empty() {
        let comment = comment.take().unwrap_or_default();
        tables.push(Table {
            comment,
            address: format!("[::1]:{port}"),
            backends: backends(false),
            health_path,
        });
    }
    // The notes about IPv6 go with the last table, [::1] when there is one.
    if let Some(last) = tables.last_mut() {
        last.comment.extend(notes);
    }
    tables
}

/// The cluster's node count for `fleet_size`: the hosts of `k8s_cluster` (or the older
/// `k8s-cluster`), every node kubespray sets up, masters included (an upper bound on the nodes
/// that probe).
fn fleet_size(inventory: &Inventory) -> Option<(String, usize)> {
    ["k8s_cluster", "k8s-cluster"]
        .iter()
        .filter_map(|name| inventory.group(name))
        .find(|g| !g.hosts.is_empty())
        .map(|g| (g.name, g.hosts.len()))
}

/// The config text; checked with [`Config::from_toml`] before it is returned.
pub fn generate(vars: &Vars, inventory: &Inventory, etcd: bool) -> Result<String, KubesprayError> {
    let choice = select_mode(vars, None)?;
    let sp = vars.apiserver_port()?;
    let nsp = vars.local_lb_port()?;
    let control_plane = inventory.control_plane()?;
    let masters = inventory.ip_addresses(&control_plane)?;

    let mut out = String::new();
    let _ = writeln!(out, "# kha config for a non-master node, written by `kha config` from kubespray's");
    for file in &vars.files {
        let _ = writeln!(out, "#   {}", safe(&file.display().to_string()));
    }
    let _ = writeln!(out, "# kubespray mode: {}: {}.", choice.mode.title(), safe(&choice.reason));
    if choice.mode.uses_local_lb() {
        let _ = writeln!(
            out,
            "# kubelet and kube-proxy on non-master nodes dial https://localhost:{nsp}; kha serves it in place of nginx-proxy."
        );
    } else {
        let _ = writeln!(
            out,
            "# NOTE: in this mode non-master nodes do not dial localhost, so nothing uses these frontends\n\
             # until the local LB is on (unset loadbalancer_apiserver; loadbalancer_apiserver_localhost: true)."
        );
    }
    let _ = writeln!(
        out,
        "\n# The cluster CA kubespray installs on every node; the probes verify the backends with it."
    );
    let _ = writeln!(out, "ca_file = {}", quoted(KUBESPRAY_CA_FILE));
    match fleet_size(inventory) {
        Some((group, nodes)) => {
            let _ = writeln!(
                out,
                "\n# The hosts of {group}: every node probes every apiserver, so the count sets the probe\n\
                 # cadence (above 1000, slower probes that cost the apiservers less; docs/health.md)."
            );
            let _ = writeln!(out, "fleet_size = {nodes}");
        }
        None => {
            let _ = writeln!(
                out,
                "\n# No k8s_cluster group: set fleet_size = <node count> for a cluster of over 1000 nodes."
            );
        }
    }

    let mut tables = frontends(
        &masters,
        nsp,
        sp,
        APISERVER_HEALTH_PATH,
        vec![format!(
            "kube-apiserver: localhost:{nsp} ({}) -> every host of {} on {} ({sp}).",
            vars::LOCAL_LB_PORT,
            control_plane.name,
            vars::APISERVER_PORT
        )],
        true,
    );
    if etcd {
        let group: Group = inventory.etcd()?;
        let members = inventory.ip_addresses(&group)?;
        tables.extend(frontends(
            &members,
            ETCD_CLIENT_PORT,
            ETCD_CLIENT_PORT,
            ETCD_HEALTH_PATH,
            vec![
                "etcd (\"ETCD with a LB\"): for etcd clients on this node (e.g. a CNI with an etcd datastore) given"
                    .to_owned(),
                format!(
                    "https://127.0.0.1:{ETCD_CLIENT_PORT} (kubespray: etcd_access_addresses, etcd_client_url; add 127.0.0.1 to etcd_cert_alt_ips)."
                ),
                "Not for an etcd member, where etcd itself listens on 127.0.0.1:2379.".to_owned(),
                "The probes verify etcd with kubespray's etcd CA. etcd asks for a client certificate: set".to_owned(),
                "client_cert/client_key to this node's (kubespray: /etc/ssl/etcd/ssl/node-<hostname>.pem and".to_owned(),
                "node-<hostname>-key.pem), or the members probe down and are served only by the all-down fallback.".to_owned(),
            ],
            false,
        ));
    }
    for t in &tables {
        out.push('\n');
        for line in &t.comment {
            let _ = writeln!(out, "# {}", safe(line));
        }
        let _ = writeln!(out, "[[frontend]]");
        let _ = writeln!(out, "address = {}", quoted(&t.address));
        let _ = writeln!(out, "backends = [");
        for (host, backend) in &t.backends {
            let _ = writeln!(out, "  {},  # {}", quoted(backend), safe(host));
        }
        let _ = writeln!(out, "]");
        let _ = writeln!(out, "health_path = {}", quoted(t.health_path));
        if t.health_path == ETCD_HEALTH_PATH {
            let _ = writeln!(out, "ca_file = {}", quoted(KUBESPRAY_ETCD_CA_FILE));
            let _ = writeln!(out, "# client_cert = \"/etc/ssl/etcd/ssl/node-HOSTNAME.pem\"");
            let _ = writeln!(out, "# client_key = \"/etc/ssl/etcd/ssl/node-HOSTNAME-key.pem\"");
        }
    }

    Config::from_toml(&out, &FrontendDefaults::default())
        .map_err(|source| KubesprayError::Generated { source })?;
    Ok(out)
}
