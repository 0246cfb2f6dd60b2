//! Everything that can be wrong with an inventory, its variables or the flags, in the
//! operator's terms: which file, line, host and variable, and what to do about it.

use std::path::PathBuf;

use super::origin::Origin;
use crate::config::ConfigError;

fn list(names: &[String]) -> String {
    if names.is_empty() { "none".into() } else { names.join(", ") }
}

#[derive(Debug, thiserror::Error)]
pub enum KubesprayError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: cannot read this YAML{}", path.display(), key.as_ref().map(|k| format!(" (at key `{k}`)")).unwrap_or_default())]
    Yaml {
        path: PathBuf,
        line: u64,
        column: u64,
        /// The mapping keys leading to the error, e.g. `all.children.kube_control_plane.hosts`.
        key: Option<String>,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error(
        "{}: encrypted with ansible-vault; kha cannot decrypt it. Decrypt it, or give the variables kha needs with --var NAME=VALUE",
        path.display()
    )]
    Vault { path: PathBuf },
    #[error(
        "{}: this looks like an INI inventory; kha reads YAML inventories. Convert it with `ansible-inventory -i {} --list --yaml`",
        path.display(), path.display()
    )]
    IniInventory { path: PathBuf },
    #[error("--group-vars {}: not a directory", path.display())]
    GroupVarsDir { path: PathBuf },
    #[error(
        "{}: a symlink loop: it leads back to {}, a directory being read already; remove the link or point it outside the vars tree",
        path.display(), target.display()
    )]
    VarsDirLoop { path: PathBuf, target: PathBuf },
    #[error(
        "{}: vars directories nested more than {limit} deep; flatten the tree (or look for a link that makes it endless)",
        path.display()
    )]
    VarsDirTooDeep { path: PathBuf, limit: usize },
    #[error("{}: no `{wanted}` group{}; groups found: {}", path.display(), alias.map(|a| format!(" (nor its old name `{a}`)")).unwrap_or_default(), list(found))]
    MissingGroup { path: PathBuf, wanted: &'static str, alias: Option<&'static str>, found: Vec<String> },
    #[error("{}: group `{group}` has no hosts", path.display())]
    EmptyGroup { path: PathBuf, group: String },
    #[error(
        "{}: host `{host}` has no address: set access_ip, ip or ansible_host (tried in that order; the host name is not an IP address either)",
        path.display()
    )]
    NoAddress { path: PathBuf, host: String },
    #[error(
        "{origin}: host `{host}`: {variable} `{value}` is a name, not an IP address; kha does not resolve names: set access_ip or ip of `{host}` to its IP address"
    )]
    AddressIsName { host: String, variable: &'static str, value: String, origin: Origin },
    #[error(
        "{origin}: host `{host}`: {variable} is a Jinja template (`{value}`); kha does not evaluate templates: set it to the address itself"
    )]
    HostTemplate { host: String, variable: &'static str, value: String, origin: Origin },
    #[error("{origin}: host `{host}`: {variable} is {kind} (`{value}`), not an address")]
    HostBadValue { host: String, variable: &'static str, kind: &'static str, value: String, origin: Origin },
    #[error(
        "hosts `{first}` and `{second}` of group `{group}` have the same address {address}; each backend must be listed once"
    )]
    DuplicateAddress { group: String, first: String, second: String, address: String },
    #[error(
        "{origin}: {name} is a Jinja template (`{value}`); kha does not evaluate templates: pass --var {name}=VALUE"
    )]
    Template { name: String, value: String, origin: Origin },
    #[error("{origin}: {name} is `{value}`, which is not {expected}")]
    BadValue { name: String, value: String, expected: &'static str, origin: Origin },
    #[error("--var `{arg}`: expected NAME=VALUE, e.g. --var kube_apiserver_port=6443")]
    VarSyntax { arg: String },
    #[error("--var {name}: not a variable kha reads; it reads {}", super::vars::VARIABLES.join(", "))]
    UnknownVar { name: String },
    #[error("--var {name}={value}: the value is not valid YAML")]
    VarYaml {
        name: String,
        value: String,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("--external-url `{value}`: {problem}")]
    ExternalUrl { value: String, problem: UrlProblem },
    #[error(
        "loadbalancer_apiserver ({lb}) and loadbalancer_apiserver_localhost: true ({localhost}) are mutually exclusive: kubespray's non-master nodes use either the external LB or the local one. Remove one of them (an unmanaged LB in front of the masters goes in --external-url)"
    )]
    MutuallyExclusive { lb: Origin, localhost: Origin },
    #[error(
        "--external-url names an unmanaged LB used together with the local LB (the seed's mode \"Local LB + unmanaged LB\"), but the local LB is off here: {reason}"
    )]
    ExternalUrlWithoutLocalLb { reason: String },
    #[error("the generated kha config is not valid")]
    Generated {
        #[source]
        source: ConfigError,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the result as JSON")]
    Json {
        #[source]
        source: serde_json::Error,
    },
}

/// What is wrong with an `--external-url`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("expected https://HOST[:PORT] (the apiserver speaks TLS only)")]
    Scheme,
    #[error("no host")]
    NoHost,
    #[error("an IPv6 address goes in brackets: https://[2001:db8::10]:6443")]
    UnbracketedV6,
    #[error("the bracketed host is not an IPv6 address")]
    BadV6,
    #[error("the host is neither an IP address nor a DNS name")]
    BadHost,
    #[error("the port is not a number from 1 to 65535")]
    BadPort,
    #[error("only a host and port are used: no user, path, query or fragment")]
    Extra,
}
