//! The cluster variables that decide the endpoints, gathered in Ansible's precedence (lowest
//! first; a later source replaces a variable as a whole, Ansible's `hash_behaviour=replace`):
//!
//! 1. the inventory file's `vars:` of `all`, then of `k8s_cluster` (or `k8s-cluster`);
//! 2. `group_vars/all` (the directory, else `all.yml`/`all.yaml`/`all.json`);
//! 3. `group_vars/k8s-cluster`, then `group_vars/k8s_cluster`, looked up the same way;
//! 4. `--var NAME=VALUE`, in the order given (Ansible's extra vars, which always win).
//!
//! Ansible finds `group_vars/` next to the inventory by itself; so does kha when
//! `--group-vars` is not given. Values are checked only when a command needs them, so a
//! template in a variable one command does not use is no obstacle to it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{
    address::Host,
    error::KubesprayError,
    inventory::Inventory,
    yaml::{self, Origin, Raw},
};

pub const LOCALHOST_LB: &str = "loadbalancer_apiserver_localhost";
pub const EXTERNAL_LB: &str = "loadbalancer_apiserver";
pub const LB_DOMAIN_NAME: &str = "apiserver_loadbalancer_domain_name";
pub const LOCAL_LB_PORT: &str = "loadbalancer_apiserver_port";
pub const APISERVER_PORT: &str = "kube_apiserver_port";
pub const BIND_ADDRESS: &str = "kube_apiserver_bind_address";

/// The variables kha reads; every other variable in a file is ignored.
pub const VARIABLES: [&str; 6] =
    [LOCALHOST_LB, EXTERNAL_LB, LB_DOMAIN_NAME, LOCAL_LB_PORT, APISERVER_PORT, BIND_ADDRESS];

/// kubespray's defaults (roles/kubespray-defaults).
pub const DEFAULT_APISERVER_PORT: u16 = 6443;
pub const DEFAULT_LB_DOMAIN_NAME: &str = "lb-apiserver.kubernetes.local";

/// The variables of one vars file (or an inventory group's `vars:`). A null value counts as
/// not set.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct VarsFile {
    loadbalancer_apiserver_localhost: Option<Spanned<Raw>>,
    loadbalancer_apiserver: Option<Spanned<Raw>>,
    apiserver_loadbalancer_domain_name: Option<Spanned<Raw>>,
    loadbalancer_apiserver_port: Option<Spanned<Raw>>,
    kube_apiserver_port: Option<Spanned<Raw>>,
    kube_apiserver_bind_address: Option<Spanned<Raw>>,
}

impl VarsFile {
    /// The variables set in it, each with where (`path` names the file it was read from).
    pub(crate) fn settings(self, path: &Path) -> Vec<(&'static str, Setting)> {
        [
            (LOCALHOST_LB, self.loadbalancer_apiserver_localhost),
            (EXTERNAL_LB, self.loadbalancer_apiserver),
            (LB_DOMAIN_NAME, self.apiserver_loadbalancer_domain_name),
            (LOCAL_LB_PORT, self.loadbalancer_apiserver_port),
            (APISERVER_PORT, self.kube_apiserver_port),
            (BIND_ADDRESS, self.kube_apiserver_bind_address),
        ]
        .into_iter()
        .filter_map(|(name, v)| {
            let v = v?;
            (v.value != Raw::Null)
                .then(|| (name, Setting { value: v.value, origin: Origin::at(path, &v.referenced) }))
        })
        .collect()
    }
}

/// One variable's value and where it was set.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    pub value: Raw,
    pub origin: Origin,
}

/// `loadbalancer_apiserver`: kubespray's "cluster-aware" external LB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancer {
    /// The VIP kubespray writes to /etc/hosts for `apiserver_loadbalancer_domain_name`.
    pub address: Option<Host>,
    /// `lp`; `None` defers to `kube_apiserver_port`.
    pub port: Option<u16>,
    pub origin: Origin,
}

/// The variables in force, after precedence.
#[derive(Clone, Debug, Default)]
pub struct Vars {
    settings: BTreeMap<&'static str, Setting>,
    /// The files read, in precedence order (the inventory first).
    pub files: Vec<PathBuf>,
}

impl Vars {
    /// The inventory's own vars, then the group_vars files (`group_vars`, or the
    /// `group_vars/` beside the inventory), then `--var` flags.
    pub fn load(
        inventory: &Inventory,
        group_vars: Option<&Path>,
        flags: &[String],
    ) -> Result<Self, KubesprayError> {
        let mut vars = Vars::default();
        vars.files.push(inventory.path.clone());
        for (name, setting) in inventory.vars() {
            vars.settings.insert(name, setting.clone());
        }
        let dir = match group_vars {
            Some(dir) if !dir.is_dir() => return Err(KubesprayError::GroupVarsDir { path: dir.to_owned() }),
            Some(dir) => Some(dir.to_owned()),
            None => inventory.path.parent().map(|p| p.join("group_vars")).filter(|d| d.is_dir()),
        };
        if let Some(dir) = dir {
            // Ansible applies groups by depth, then name: `all`, then its children.
            for group in ["all", "k8s-cluster", "k8s_cluster"] {
                for file in group_vars_files(&dir, group)? {
                    let (parsed, _): (Option<VarsFile>, _) = yaml::read(&file)?;
                    vars.apply(parsed.unwrap_or_default().settings(&file));
                    vars.files.push(file);
                }
            }
        }
        for flag in flags {
            vars.set_flag(flag)?;
        }
        Ok(vars)
    }

    fn apply(&mut self, settings: Vec<(&'static str, Setting)>) {
        for (name, setting) in settings {
            self.settings.insert(name, setting);
        }
    }

    /// `--var NAME=VALUE`, VALUE read as YAML (as `ansible-playbook -e` does), so
    /// `--var 'loadbalancer_apiserver={address: 192.0.2.10, port: 8383}'` works. An empty or
    /// `null` VALUE unsets NAME, e.g. to see the endpoints without the external LB.
    pub fn set_flag(&mut self, arg: &str) -> Result<(), KubesprayError> {
        let (name, value) =
            arg.split_once('=').ok_or_else(|| KubesprayError::VarSyntax { arg: arg.to_owned() })?;
        let name = name.trim();
        if name.is_empty() {
            return Err(KubesprayError::VarSyntax { arg: arg.to_owned() });
        }
        let name = *VARIABLES
            .iter()
            .find(|v| **v == name)
            .ok_or_else(|| KubesprayError::UnknownVar { name: name.to_owned() })?;
        // Jinja is not YAML (`{{ ip }}` would be a broken mapping): keep it as the string it
        // is, for the template error when the value is used.
        let raw = if value.contains("{{") || value.contains("{%") {
            Raw::Str(value.to_owned())
        } else {
            yaml::parse_flag_value(name, value)?
        };
        match raw {
            Raw::Null => {
                self.settings.remove(name);
            }
            value => {
                self.settings.insert(name, Setting { value, origin: Origin::Flag(format!("--var {name}")) });
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Setting> {
        self.settings.get(name)
    }

    /// A boolean as Ansible's `bool` filter reads it (true/false, yes/no, on/off, 1/0).
    pub fn bool(&self, name: &str) -> Result<Option<(bool, &Origin)>, KubesprayError> {
        let Some(s) = self.checked(name)? else { return Ok(None) };
        let b = match &s.value {
            Raw::Bool(b) => Some(*b),
            Raw::Int(0) => Some(false),
            Raw::Int(1) => Some(true),
            Raw::Str(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Some(true),
                "false" | "no" | "off" | "0" => Some(false),
                _ => None,
            },
            _ => None,
        };
        b.map(|b| Some((b, &s.origin))).ok_or_else(|| bad(name, s, "a boolean (true or false)"))
    }

    pub fn port(&self, name: &str) -> Result<Option<(u16, &Origin)>, KubesprayError> {
        let Some(s) = self.checked(name)? else { return Ok(None) };
        port_of(&s.value).map(|p| Some((p, &s.origin))).ok_or_else(|| bad(name, s, "a port (1 to 65535)"))
    }

    /// A host name or address.
    pub fn host(&self, name: &str) -> Result<Option<(Host, &Origin)>, KubesprayError> {
        let Some(s) = self.checked(name)? else { return Ok(None) };
        host_of(&s.value)
            .map(|h| Some((h, &s.origin)))
            .ok_or_else(|| bad(name, s, "a host name or IP address"))
    }

    /// `sp`: `kube_apiserver_port`, 6443 by default.
    pub fn apiserver_port(&self) -> Result<u16, KubesprayError> {
        Ok(self.port(APISERVER_PORT)?.map_or(DEFAULT_APISERVER_PORT, |(p, _)| p))
    }

    /// `nsp`: `loadbalancer_apiserver_port`, defers to `sp`.
    pub fn local_lb_port(&self) -> Result<u16, KubesprayError> {
        match self.port(LOCAL_LB_PORT)? {
            Some((p, _)) => Ok(p),
            None => self.apiserver_port(),
        }
    }

    /// `loadbalancer_apiserver`, if set: a mapping with `address` and `port` (both optional).
    pub fn load_balancer(&self) -> Result<Option<LoadBalancer>, KubesprayError> {
        let Some(s) = self.checked(EXTERNAL_LB)? else { return Ok(None) };
        let Raw::Map(entries) = &s.value else {
            return Err(bad(EXTERNAL_LB, s, "a mapping with address and port"));
        };
        let field =
            |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v).filter(|v| **v != Raw::Null);
        let name = |key: &str| format!("{EXTERNAL_LB}.{key}");
        let check = |key: &str, v: &Raw| -> Result<(), KubesprayError> {
            if v.is_template() {
                return Err(KubesprayError::Template {
                    name: name(key),
                    value: v.shown(),
                    origin: s.origin.clone(),
                });
            }
            Ok(())
        };
        let mut lb = LoadBalancer { address: None, port: None, origin: s.origin.clone() };
        if let Some(v) = field("address") {
            check("address", v)?;
            let host = host_of(v).ok_or_else(|| KubesprayError::BadValue {
                name: name("address"),
                value: v.shown(),
                expected: "an IP address",
                origin: s.origin.clone(),
            })?;
            lb.address = Some(host);
        }
        if let Some(v) = field("port") {
            check("port", v)?;
            lb.port = Some(port_of(v).ok_or_else(|| KubesprayError::BadValue {
                name: name("port"),
                value: v.shown(),
                expected: "a port (1 to 65535)",
                origin: s.origin.clone(),
            })?);
        }
        Ok(Some(lb))
    }

    /// The setting, refused if it is a template.
    fn checked(&self, name: &str) -> Result<Option<&Setting>, KubesprayError> {
        match self.get(name) {
            Some(s) if s.value.is_template() => Err(KubesprayError::Template {
                name: name.to_owned(),
                value: s.value.shown(),
                origin: s.origin.clone(),
            }),
            other => Ok(other),
        }
    }
}

fn bad(name: &str, s: &Setting, expected: &'static str) -> KubesprayError {
    KubesprayError::BadValue {
        name: name.to_owned(),
        value: s.value.shown(),
        expected,
        origin: s.origin.clone(),
    }
}

fn port_of(v: &Raw) -> Option<u16> {
    match v {
        Raw::Int(n) => u16::try_from(*n).ok(),
        Raw::Str(s) if !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit()) => {
            s.trim().parse().ok()
        }
        _ => None,
    }
    .filter(|p| *p != 0)
}

pub(crate) fn host_of(v: &Raw) -> Option<Host> {
    match v {
        Raw::Str(s) if !s.trim().is_empty() && !s.trim().contains(char::is_whitespace) => {
            Some(Host::parse(s))
        }
        _ => None,
    }
}

/// How deep a vars directory may nest. Ansible has no limit of its own; real `group_vars`
/// trees are two or three levels deep, so this only stops a tree that never ends.
pub const MAX_VARS_DEPTH: usize = 16;

/// The files Ansible reads for `group_vars/GROUP`: the first of `GROUP` (a file, or a
/// directory read recursively in name order), `GROUP.yml`, `GROUP.yaml`, `GROUP.json`.
fn group_vars_files(dir: &Path, group: &str) -> Result<Vec<PathBuf>, KubesprayError> {
    for ext in ["", ".yml", ".yaml", ".json"] {
        let path = dir.join(format!("{group}{ext}"));
        if path.is_dir() {
            let mut files = Vec::new();
            dir_files(&path, &mut Vec::new(), &mut files)?;
            return Ok(files);
        }
        if path.is_file() {
            return Ok(vec![path]);
        }
    }
    Ok(Vec::new())
}

/// Ansible's rule for a vars directory: every file without an extension or ending in .yml,
/// .yaml or .json, hidden files and backups (`~`) skipped, subdirectories in place.
/// Symlinks are followed, as Ansible follows them; `ancestors` (the canonical paths of the
/// directories being read) catches a link back to one of them, which would otherwise read
/// the same files again and again until the kernel's ELOOP, or forever with two such links.
fn dir_files(dir: &Path, ancestors: &mut Vec<PathBuf>, out: &mut Vec<PathBuf>) -> Result<(), KubesprayError> {
    let read_err = |source| KubesprayError::Read { path: dir.to_owned(), source };
    let canonical = std::fs::canonicalize(dir).map_err(read_err)?;
    if let Some(ancestor) = ancestors.iter().find(|a| **a == canonical) {
        return Err(KubesprayError::VarsDirLoop { path: dir.to_owned(), target: ancestor.clone() });
    }
    if ancestors.len() >= MAX_VARS_DEPTH {
        return Err(KubesprayError::VarsDirTooDeep { path: dir.to_owned(), limit: MAX_VARS_DEPTH });
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    entries.sort();
    ancestors.push(canonical);
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        if path.is_dir() {
            dir_files(&path, ancestors, out)?;
            continue;
        }
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, None | Some("yml" | "yaml" | "json")) {
            out.push(path);
        }
    }
    ancestors.pop();
    Ok(())
}
