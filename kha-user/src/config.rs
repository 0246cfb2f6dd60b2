//! Frontends and backends from flags or a config file, validated before anything touches the
//! kernel. Pure: no I/O besides reading the file the operator named.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use kha_common::{
    MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND, MAX_FRONTENDS, POLICY_LEAST_CONN, POLICY_NAMES, POLICY_P2C,
    POLICY_RANDOM, POLICY_ROUND_ROBIN,
};
use serde::Deserialize;

/// The frontends a node serves when `--frontend` is not given: what kubelet and kube-proxy
/// reach as `https://localhost:6443`. `localhost` resolves to both.
pub const DEFAULT_FRONTENDS: [&str; 2] = ["127.0.0.1:6443", "[::1]:6443"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub frontends: Vec<Frontend>,
    /// The cluster CA the probes verify the backends with; `--ca-file` overrides it.
    pub ca_file: Option<PathBuf>,
    /// The cluster's node count, which sets the probe cadence (see
    /// [`crate::probe::cadence_for_fleet`]) unless `--fleet-size` or an interval flag is given.
    /// `kha config` writes the inventory's host count here.
    pub fleet_size: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub address: SocketAddr,
    /// In configured order; slot `i + 1` holds `backends[i]`.
    pub backends: Vec<SocketAddr>,
    pub policy: Policy,
    /// HTTP path the probes GET on each backend (`/readyz`; etcd: `/health`).
    pub health_path: String,
    /// TLS for this frontend's probes where it differs from the global settings (etcd has
    /// its own CA and wants a client certificate).
    pub probe_tls: ProbeTls,
    /// Fed by `kha run --discover`: the masters found in the `kubernetes` service's
    /// EndpointSlices replace `backends`, which stay the bootstrap and fallback (see
    /// [`crate::discovery`]). Config files opt in per frontend; with flags, all are fed.
    pub discover: bool,
}

/// Probe TLS files of one frontend; `None` fields fall back to the global ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeTls {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Per-frontend settings that flags give to every frontend, and a config file to frontends
/// that do not set their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendDefaults {
    pub policy: Policy,
    pub health_path: String,
}

/// How a frontend picks a backend for each connect. The names are those of configs, `--policy`
/// and `kha status`; the kernel sees [`Policy::code`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// A backend at random.
    Random,
    /// Each backend in turn.
    RoundRobin,
    /// The backend with the fewest open connections, ties at random (kubespray's nginx
    /// `least_conn` and haproxy `leastconn`).
    // The default: a node holds a few long-lived connections (kubelet, kube-proxy watches),
    // and counting them spreads them over the masters instead of leaving it to chance; the
    // random tie-break keeps nodes starting together from all picking the same master.
    #[default]
    LeastConnections,
    /// The less loaded of two backends drawn at random.
    P2c,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::Random, Policy::RoundRobin, Policy::LeastConnections, Policy::P2c];

    /// The kernel's `POLICY_*` value.
    pub fn code(self) -> u8 {
        match self {
            Policy::Random => POLICY_RANDOM,
            Policy::RoundRobin => POLICY_ROUND_ROBIN,
            Policy::LeastConnections => POLICY_LEAST_CONN,
            Policy::P2c => POLICY_P2C,
        }
    }

    pub fn name(self) -> &'static str {
        POLICY_NAMES[self.code() as usize]
    }

    /// The policy a config file's `field` names.
    pub fn parse(field: &str, value: &str) -> Result<Policy, ConfigError> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == value)
            .ok_or_else(|| ConfigError::Policy { field: field.to_owned(), value: value.to_owned() })
    }
}

pub const DEFAULT_HEALTH_PATH: &str = crate::probe::DEFAULT_PATH;

impl Default for FrontendDefaults {
    fn default() -> Self {
        Self { policy: Policy::default(), health_path: DEFAULT_HEALTH_PATH.into() }
    }
}

fn check_path(field: &str, value: &str) -> Result<String, ConfigError> {
    let ok = value.starts_with('/') && value.len() <= 256 && value.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(ConfigError::HealthPath { field: field.to_owned(), value: value.to_owned() });
    }
    Ok(value.to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "{field}: `{value}` is not an IP:PORT address (IPv6 goes in brackets: [2001:db8::1]:6443; names are not resolved)"
    )]
    Address {
        field: String,
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error(
        "{field}: `{value}` has port 0; give the port the apiserver listens on (kubespray: kube_apiserver_port, 6443)"
    )]
    PortZero { field: String, value: String },
    #[error("{field}: `{value}` is not a unicast address a connection can go to")]
    NotUnicast { field: String, value: String },
    #[error(
        "{field}: backend `{value}` is also a frontend; a connect to it would be rewritten again. Use the master's own address"
    )]
    BackendIsFrontend { field: String, value: String },
    #[error("{field}: `{value}` is listed twice")]
    Duplicate { field: String, value: String },
    #[error(
        "{field}: backend `{backend}` is IPv6 but frontend `{frontend}` is IPv4; an IPv4 socket cannot reach it. Give this frontend IPv4 backends, or serve IPv6 backends on an IPv6 frontend such as [::1]:6443"
    )]
    V6BackendForV4Frontend { field: String, frontend: String, backend: String },
    #[error("{field}: {count} backends, at most {max} are supported per frontend")]
    TooManyBackends { field: String, count: usize, max: usize },
    #[error("{count} distinct backends in all, at most {max} are supported")]
    TooManyDistinctBackends { count: usize, max: usize },
    #[error("{count} frontends, at most {max} are supported")]
    TooManyFrontends { count: usize, max: usize },
    #[error("no frontend configured; add a [[frontend]] table to the config file")]
    NoFrontends,
    #[error("no backend given: pass --backend IP:PORT once per master, or --config FILE")]
    NoBackends,
    #[error("{field}: unknown policy `{value}`; use one of random, round-robin, least-connections, p2c")]
    Policy { field: String, value: String },
    #[error(
        "{field}: `{value}` is not an HTTP path such as /readyz (it must start with / and have no spaces)"
    )]
    HealthPath { field: String, value: String },
    #[error("{field}: client_cert and client_key go together; give both or neither")]
    ClientCertPair { field: String },
    #[error("fleet_size = 0: give the cluster's node count (every node runs kha), or leave fleet_size out")]
    FleetSizeZero,
}

/// The config file: an optional CA and a list of frontends, each with its own backends.
///
/// ```toml
/// ca_file = "/etc/kubernetes/ssl/ca.crt"
/// fleet_size = 5000   # optional: the cluster's node count, sets the probe cadence
///
/// [[frontend]]
/// address = "127.0.0.1:6443"
/// backends = ["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"]
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    ca_file: Option<PathBuf>,
    fleet_size: Option<u32>,
    #[serde(default)]
    frontend: Vec<FileFrontend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFrontend {
    address: String,
    #[serde(default)]
    backends: Vec<String>,
    policy: Option<String>,
    health_path: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    discover: bool,
}

impl Config {
    /// From `--frontend` (default: [`DEFAULT_FRONTENDS`]) and `--backend` flags: every backend
    /// serves every frontend.
    pub fn from_flags(
        frontends: &[String],
        backends: &[String],
        defaults: &FrontendDefaults,
    ) -> Result<Self, ConfigError> {
        if backends.is_empty() {
            return Err(ConfigError::NoBackends);
        }
        let frontends: Vec<String> = if frontends.is_empty() {
            DEFAULT_FRONTENDS.iter().map(|s| s.to_string()).collect()
        } else {
            frontends.to_vec()
        };
        let backends = parse_all("--backend", backends)?;
        let frontends = frontends
            .iter()
            .map(|f| {
                Ok(Frontend {
                    address: parse("--frontend", f)?,
                    backends: backends.clone(),
                    policy: defaults.policy,
                    health_path: defaults.health_path.clone(),
                    probe_tls: ProbeTls::default(),
                    discover: false,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let config = Config { frontends, ca_file: None, fleet_size: None };
        config.validate(
            |i, _| format!("--frontend {}", config.frontends[i].address),
            |_, j| format!("--backend[{j}]"),
        )?;
        Ok(config)
    }

    pub fn from_file(path: &Path, defaults: &FrontendDefaults) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, defaults).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    pub fn from_toml(text: &str, defaults: &FrontendDefaults) -> Result<Self, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: PathBuf::new(), source })?;
        let frontends = file
            .frontend
            .iter()
            .enumerate()
            .map(|(i, f)| {
                Ok(Frontend {
                    address: parse(&format!("frontend[{i}].address"), &f.address)?,
                    backends: f
                        .backends
                        .iter()
                        .enumerate()
                        .map(|(j, b)| parse(&format!("frontend[{i}].backends[{j}]"), b))
                        .collect::<Result<_, _>>()?,
                    policy: match &f.policy {
                        Some(p) => Policy::parse(&format!("frontend[{i}].policy"), p)?,
                        None => defaults.policy,
                    },
                    health_path: match &f.health_path {
                        Some(p) => check_path(&format!("frontend[{i}].health_path"), p)?,
                        None => defaults.health_path.clone(),
                    },
                    probe_tls: match (&f.client_cert, &f.client_key) {
                        (Some(_), None) | (None, Some(_)) => {
                            return Err(ConfigError::ClientCertPair { field: format!("frontend[{i}]") });
                        }
                        _ => ProbeTls {
                            ca_file: f.ca_file.clone(),
                            client_cert: f.client_cert.clone(),
                            client_key: f.client_key.clone(),
                        },
                    },
                    discover: f.discover,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        if file.fleet_size == Some(0) {
            return Err(ConfigError::FleetSizeZero);
        }
        let config = Config { frontends, ca_file: file.ca_file, fleet_size: file.fleet_size };
        config.validate(|i, _| format!("frontend[{i}]"), |i, j| format!("frontend[{i}].backends[{j}]"))?;
        Ok(config)
    }

    /// `fe(i, _)` and `be(i, j)` name the field an error is about, in the operator's terms.
    fn validate(
        &self,
        fe: impl Fn(usize, usize) -> String,
        be: impl Fn(usize, usize) -> String,
    ) -> Result<(), ConfigError> {
        if self.frontends.is_empty() {
            return Err(ConfigError::NoFrontends);
        }
        if self.frontends.len() > MAX_FRONTENDS {
            return Err(ConfigError::TooManyFrontends { count: self.frontends.len(), max: MAX_FRONTENDS });
        }
        let mut seen_frontends = BTreeSet::new();
        let mut distinct_backends = BTreeSet::new();
        for (i, f) in self.frontends.iter().enumerate() {
            check_unicast(&fe(i, 0), &f.address)?;
            if !seen_frontends.insert(f.address) {
                return Err(ConfigError::Duplicate { field: fe(i, 0), value: f.address.to_string() });
            }
            if f.backends.len() > MAX_BACKENDS_PER_FRONTEND {
                return Err(ConfigError::TooManyBackends {
                    field: fe(i, 0),
                    count: f.backends.len(),
                    max: MAX_BACKENDS_PER_FRONTEND,
                });
            }
            let mut seen = BTreeSet::new();
            for (j, b) in f.backends.iter().enumerate() {
                check_unicast(&be(i, j), b)?;
                if !seen.insert(*b) {
                    return Err(ConfigError::Duplicate { field: be(i, j), value: b.to_string() });
                }
                if f.address.is_ipv4() && b.is_ipv6() {
                    return Err(ConfigError::V6BackendForV4Frontend {
                        field: be(i, j),
                        frontend: f.address.to_string(),
                        backend: b.to_string(),
                    });
                }
                distinct_backends.insert(*b);
            }
        }
        for (i, f) in self.frontends.iter().enumerate() {
            for (j, b) in f.backends.iter().enumerate() {
                if seen_frontends.contains(b) {
                    return Err(ConfigError::BackendIsFrontend { field: be(i, j), value: b.to_string() });
                }
            }
        }
        if distinct_backends.len() > MAX_BACKENDS {
            return Err(ConfigError::TooManyDistinctBackends {
                count: distinct_backends.len(),
                max: MAX_BACKENDS,
            });
        }
        Ok(())
    }
}

fn parse_all(field: &str, values: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    values.iter().map(|v| parse(field, v)).collect()
}

/// Parses IP:PORT; a v4-mapped IPv6 address becomes the IPv4 address it stands for, because
/// the kernel sees both as one endpoint.
fn parse(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = value.trim().parse().map_err(|source| ConfigError::Address {
        field: field.to_owned(),
        value: value.to_owned(),
        source,
    })?;
    if addr.port() == 0 {
        return Err(ConfigError::PortZero { field: field.to_owned(), value: value.to_owned() });
    }
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

fn check_unicast(field: &str, addr: &SocketAddr) -> Result<(), ConfigError> {
    let ip = addr.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(ConfigError::NotUnicast { field: field.to_owned(), value: addr.to_string() });
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
