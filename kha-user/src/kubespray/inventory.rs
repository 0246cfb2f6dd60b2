//! A kubespray inventory in Ansible's YAML format:
//!
//! ```yaml
//! all:
//!   hosts:
//!     node1: { ansible_host: 192.0.2.11, ip: 10.0.0.11, access_ip: 10.0.0.11 }
//!     node4: { ansible_host: 192.0.2.14, ip: 10.0.0.14 }
//!   children:
//!     kube_control_plane: { hosts: { node1: } }   # older kubespray: kube-master
//!     kube_node: { hosts: { node4: } }
//!     etcd: { hosts: { node1: } }
//!     k8s_cluster: { children: { kube_control_plane:, kube_node: } }
//! ```
//!
//! A group may be written in several places (its hosts add up) and a host's vars may sit in
//! any of its entries (later ones win, per variable). A group's hosts are its own, then its
//! children's, in document order, as Ansible's `groups['kube_control_plane']` lists them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{
    address::Host,
    error::KubesprayError,
    vars::{Setting, VarsFile, host_of},
    yaml::{self, Ordered, Origin, Raw},
};

pub const CONTROL_PLANE: &str = "kube_control_plane";
/// The control-plane group's name before kubespray 2.16.
pub const CONTROL_PLANE_OLD: &str = "kube-master";
pub const ETCD: &str = "etcd";

#[derive(Debug, Default, Deserialize)]
struct GroupDef {
    hosts: Option<Ordered<Option<HostDef>>>,
    children: Option<Ordered<Option<GroupDef>>>,
    vars: Option<VarsFile>,
}

#[derive(Debug, Default, Deserialize)]
struct HostDef {
    access_ip: Option<Spanned<Raw>>,
    ip: Option<Spanned<Raw>>,
    ansible_host: Option<Spanned<Raw>>,
}

/// The address variables of a host, in the order kubespray defers them: `aip` (access_ip)
/// defers to `ip`, which defers to the Ansible address (`ansible_host`).
#[derive(Clone, Debug, Default)]
struct HostVars {
    access_ip: Option<Setting>,
    ip: Option<Setting>,
    ansible_host: Option<Setting>,
}

#[derive(Clone, Debug, Default)]
struct GroupInfo {
    hosts: Vec<String>,
    children: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Inventory {
    pub path: PathBuf,
    /// In the order first seen.
    groups: Vec<(String, GroupInfo)>,
    hosts: Vec<(String, HostVars)>,
    /// `vars:` of `all` and `k8s_cluster`/`k8s-cluster`, lowest precedence first.
    vars: Vec<(&'static str, Setting)>,
}

/// A group and its hosts, in Ansible's order (`hosts[0]` is the table's `m[0]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub hosts: Vec<String>,
}

/// Where a host's address came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressSource {
    /// `access_ip`, `ip` or `ansible_host`.
    Var { name: &'static str, origin: Origin },
    /// No variable set, and the inventory host name is an IP address (Ansible connects to it).
    HostName,
}

/// A host's access address (`aip`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub address: Host,
    pub source: AddressSource,
}

impl Inventory {
    pub fn from_file(path: &Path) -> Result<Self, KubesprayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KubesprayError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// `path` names the file in errors and in the origin of each value.
    pub fn parse(text: &str, path: &Path) -> Result<Self, KubesprayError> {
        if text.trim_start().starts_with("$ANSIBLE_VAULT") {
            return Err(KubesprayError::Vault { path: path.to_owned() });
        }
        if looks_like_ini(text) {
            return Err(KubesprayError::IniInventory { path: path.to_owned() });
        }
        let top: Option<Ordered<Option<GroupDef>>> = yaml::parse(text, path)?;
        let mut inv =
            Inventory { path: path.to_owned(), groups: Vec::new(), hosts: Vec::new(), vars: Vec::new() };
        let mut group_vars: Vec<(String, Vec<(&'static str, Setting)>)> = Vec::new();
        for (name, def) in top.unwrap_or_default().0 {
            inv.walk(&name, def.unwrap_or_default(), &mut group_vars);
        }
        // Ansible: a parent's vars first, a child's override them.
        for group in ["all", "k8s-cluster", "k8s_cluster"] {
            for (_, settings) in group_vars.iter().filter(|(g, _)| g == group) {
                inv.vars.extend(settings.iter().cloned());
            }
        }
        Ok(inv)
    }

    fn walk(
        &mut self,
        name: &str,
        def: GroupDef,
        group_vars: &mut Vec<(String, Vec<(&'static str, Setting)>)>,
    ) {
        self.group_mut(name);
        if let Some(vars) = def.vars {
            group_vars.push((name.to_owned(), vars.settings(&self.path)));
        }
        for (host, hdef) in def.hosts.unwrap_or_default().0 {
            let hdef = hdef.unwrap_or_default();
            let path = self.path.clone();
            let set = |v: Option<Spanned<Raw>>| {
                v.filter(|v| v.value != Raw::Null)
                    .map(|v| Setting { value: v.value, origin: Origin::at(&path, &v.referenced) })
            };
            let (access_ip, ip, ansible_host) = (set(hdef.access_ip), set(hdef.ip), set(hdef.ansible_host));
            let i = match self.hosts.iter().position(|(h, _)| *h == host) {
                Some(i) => i,
                None => {
                    self.hosts.push((host.clone(), HostVars::default()));
                    self.hosts.len() - 1
                }
            };
            let vars = &mut self.hosts[i].1;
            vars.access_ip = access_ip.or(vars.access_ip.take());
            vars.ip = ip.or(vars.ip.take());
            vars.ansible_host = ansible_host.or(vars.ansible_host.take());
            let group = self.group_mut(name);
            if !group.hosts.contains(&host) {
                group.hosts.push(host);
            }
        }
        for (child, cdef) in def.children.unwrap_or_default().0 {
            let group = self.group_mut(name);
            if !group.children.contains(&child) {
                group.children.push(child.clone());
            }
            self.walk(&child, cdef.unwrap_or_default(), group_vars);
        }
    }

    fn group_mut(&mut self, name: &str) -> &mut GroupInfo {
        let i = match self.groups.iter().position(|(g, _)| g == name) {
            Some(i) => i,
            None => {
                self.groups.push((name.to_owned(), GroupInfo::default()));
                self.groups.len() - 1
            }
        };
        &mut self.groups[i].1
    }

    /// Every group named in the file, in the order first seen.
    pub fn group_names(&self) -> Vec<String> {
        self.groups.iter().map(|(g, _)| g.clone()).collect()
    }

    /// The group's hosts, its own first, then its children's; `None` if there is no such group.
    pub fn group(&self, name: &str) -> Option<Group> {
        self.groups.iter().any(|(g, _)| g == name).then(|| {
            let mut hosts = Vec::new();
            let mut seen = Vec::new();
            self.collect(name, &mut hosts, &mut seen);
            Group { name: name.to_owned(), hosts }
        })
    }

    fn collect(&self, name: &str, hosts: &mut Vec<String>, seen: &mut Vec<String>) {
        if seen.iter().any(|s| s == name) {
            return;
        }
        seen.push(name.to_owned());
        let Some((_, info)) = self.groups.iter().find(|(g, _)| g == name) else { return };
        for h in &info.hosts {
            if !hosts.contains(h) {
                hosts.push(h.clone());
            }
        }
        for c in &info.children {
            self.collect(c, hosts, seen);
        }
    }

    /// `kube_control_plane`, or the older `kube-master` when that is the one with hosts.
    pub fn control_plane(&self) -> Result<Group, KubesprayError> {
        let current = self.group(CONTROL_PLANE);
        let old = self.group(CONTROL_PLANE_OLD);
        let group = match (current, old) {
            (Some(c), Some(o)) if c.hosts.is_empty() && !o.hosts.is_empty() => o,
            (Some(c), _) => c,
            (None, Some(o)) => o,
            (None, None) => {
                return Err(KubesprayError::MissingGroup {
                    path: self.path.clone(),
                    wanted: CONTROL_PLANE,
                    alias: Some(CONTROL_PLANE_OLD),
                    found: self.group_names(),
                });
            }
        };
        self.non_empty(group)
    }

    pub fn etcd(&self) -> Result<Group, KubesprayError> {
        let group = self.group(ETCD).ok_or_else(|| KubesprayError::MissingGroup {
            path: self.path.clone(),
            wanted: ETCD,
            alias: None,
            found: self.group_names(),
        })?;
        self.non_empty(group)
    }

    fn non_empty(&self, group: Group) -> Result<Group, KubesprayError> {
        if group.hosts.is_empty() {
            return Err(KubesprayError::EmptyGroup { path: self.path.clone(), group: group.name });
        }
        Ok(group)
    }

    /// `aip`: access_ip, defers to ip, defers to ansible_host (kubespray's last resort is the
    /// address Ansible reached the host at; kha has no facts, so it takes ansible_host, or the
    /// host name itself when that is an IP address).
    pub fn access_address(&self, host: &str) -> Result<Address, KubesprayError> {
        let vars = self.hosts.iter().find(|(h, _)| h == host).map(|(_, v)| v.clone()).unwrap_or_default();
        let chain = [("access_ip", vars.access_ip), ("ip", vars.ip), ("ansible_host", vars.ansible_host)];
        for (name, setting) in chain {
            let Some(s) = setting else { continue };
            if s.value.is_template() {
                return Err(KubesprayError::HostTemplate {
                    host: host.to_owned(),
                    variable: name,
                    value: s.value.shown(),
                    origin: s.origin,
                });
            }
            let address = host_of(&s.value).ok_or_else(|| KubesprayError::HostBadValue {
                host: host.to_owned(),
                variable: name,
                kind: s.value.kind(),
                value: s.value.shown(),
                origin: s.origin.clone(),
            })?;
            return Ok(Address {
                host: host.to_owned(),
                address,
                source: AddressSource::Var { name, origin: s.origin },
            });
        }
        match Host::parse(host) {
            ip @ Host::Ip(_) => {
                Ok(Address { host: host.to_owned(), address: ip, source: AddressSource::HostName })
            }
            Host::Name(_) => {
                Err(KubesprayError::NoAddress { path: self.path.clone(), host: host.to_owned() })
            }
        }
    }

    /// The group's hosts' access addresses, which must be IP addresses (kha resolves no
    /// names) and distinct.
    pub fn ip_addresses(&self, group: &Group) -> Result<Vec<(String, std::net::IpAddr)>, KubesprayError> {
        let mut out: Vec<(String, std::net::IpAddr)> = Vec::new();
        for host in &group.hosts {
            let a = self.access_address(host)?;
            let ip = match (a.address.ip(), a.source) {
                (Some(ip), _) => ip,
                (None, AddressSource::Var { name, origin }) => {
                    return Err(KubesprayError::AddressIsName {
                        host: host.clone(),
                        variable: name,
                        value: a.address.to_string(),
                        origin,
                    });
                }
                (None, AddressSource::HostName) => {
                    return Err(KubesprayError::NoAddress { path: self.path.clone(), host: host.clone() });
                }
            };
            if let Some((first, _)) = out.iter().find(|(_, other)| *other == ip) {
                return Err(KubesprayError::DuplicateAddress {
                    group: group.name.clone(),
                    first: first.clone(),
                    second: host.clone(),
                    address: ip.to_string(),
                });
            }
            out.push((host.clone(), ip));
        }
        Ok(out)
    }

    /// The cluster variables set in the inventory file itself, lowest precedence first.
    pub(crate) fn vars(&self) -> impl Iterator<Item = (&'static str, &Setting)> {
        self.vars.iter().map(|(n, s)| (*n, s))
    }
}

/// An INI inventory starts with a `[group]` line (which YAML would read as a list).
fn looks_like_ini(text: &str) -> bool {
    let first =
        text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'));
    first.is_some_and(|l| {
        l.starts_with('[')
            && l.ends_with(']')
            && !l.contains(',')
            && l[1..l.len() - 1].chars().all(|c| !c.is_whitespace())
    })
}
