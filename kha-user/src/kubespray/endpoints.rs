//! kubespray's "Access API endpoints" table (docs/ha-mode.md, "HA endpoints for K8s"): which
//! URL each kind of host uses to reach the apiserver, for each of the four modes.
//!
//! | Endpoint type                | kube-master     | non-master          | external            |
//! |------------------------------|-----------------|---------------------|---------------------|
//! | Local LB (default)           | https://bip:sp  | https://lc:nsp      | https://m[0].aip:sp |
//! | Local LB + Unmanaged here LB | https://bip:sp  | https://lc:nsp      | https://ext         |
//! | External LB, no internal     | https://bip:sp  | https://lb:lp       | https://lb:lp       |
//! | No ext/int LB                | https://bip:sp  | https://m[0].aip:sp | https://m[0].aip:sp |
//!
//! m[0]: the first host of the control-plane group; lb: `apiserver_loadbalancer_domain_name`;
//! ext: the unmanaged LB (`--external-url`); lc: localhost; bip: `kube_apiserver_bind_address`,
//! localhost for the default (all interfaces); nsp: `loadbalancer_apiserver_port`, defers to
//! sp; sp: `kube_apiserver_port`; lp: `loadbalancer_apiserver.port`, defers to sp; ip: the
//! node IP, defers to the Ansible address; aip: `access_ip`, defers to ip.

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    address::{ExternalUrl, Host},
    error::KubesprayError,
    inventory::{AddressSource, Inventory},
    vars::{self, Vars},
};

/// The table's rows. kha replaces the local LB (`lc:nsp`) of the first two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `loadbalancer_apiserver_localhost` (true unless `loadbalancer_apiserver` is set).
    LocalLb,
    /// The local LB, and an LB kubespray does not know of for clients outside the cluster.
    LocalLbUnmanagedLb,
    /// `loadbalancer_apiserver`: kubespray points every non-master at it.
    ExternalLb,
    /// Neither: non-masters use the first master, without HA.
    NoLb,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::LocalLb, Mode::LocalLbUnmanagedLb, Mode::ExternalLb, Mode::NoLb];

    /// As the seed's table names the row.
    pub fn title(self) -> &'static str {
        match self {
            Mode::LocalLb => "Local LB (default)",
            Mode::LocalLbUnmanagedLb => "Local LB + unmanaged LB",
            Mode::ExternalLb => "External LB, no internal",
            Mode::NoLb => "No ext/int LB",
        }
    }

    /// Whether non-master nodes dial localhost, where kha serves.
    pub fn uses_local_lb(self) -> bool {
        matches!(self, Mode::LocalLb | Mode::LocalLbUnmanagedLb)
    }
}

/// The mode the variables select, and why, in the variables' words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeChoice {
    pub mode: Mode,
    pub reason: String,
}

/// The local LB is on unless `loadbalancer_apiserver` is set; setting both is refused, as
/// kubespray documents them as mutually exclusive. `ext` only goes with the local LB.
pub fn select_mode(vars: &Vars, ext: Option<&ExternalUrl>) -> Result<ModeChoice, KubesprayError> {
    let lb = vars.load_balancer()?;
    let localhost = vars.bool(vars::LOCALHOST_LB)?;
    let (on, reason) = match (&lb, localhost) {
        (Some(lb), Some((true, origin))) => {
            return Err(KubesprayError::MutuallyExclusive {
                lb: lb.origin.clone(),
                localhost: origin.clone(),
            });
        }
        (Some(lb), Some((false, origin))) => (
            false,
            format!(
                "{} is set ({}) and {} is false ({origin})",
                vars::EXTERNAL_LB,
                lb.origin,
                vars::LOCALHOST_LB
            ),
        ),
        (Some(lb), None) => (
            false,
            format!(
                "{} is set ({}), so {} defaults to false",
                vars::EXTERNAL_LB,
                lb.origin,
                vars::LOCALHOST_LB
            ),
        ),
        (None, Some((true, origin))) => (true, format!("{} is true ({origin})", vars::LOCALHOST_LB)),
        (None, Some((false, origin))) => (
            false,
            format!("{} is false ({origin}) and {} is not set", vars::LOCALHOST_LB, vars::EXTERNAL_LB),
        ),
        (None, None) => {
            (true, format!("{} is not set, so {} defaults to true", vars::EXTERNAL_LB, vars::LOCALHOST_LB))
        }
    };
    let mode = match (on, ext, lb.is_some()) {
        (true, None, _) => Mode::LocalLb,
        (true, Some(_), _) => Mode::LocalLbUnmanagedLb,
        (false, Some(_), _) => return Err(KubesprayError::ExternalUrlWithoutLocalLb { reason }),
        (false, None, true) => Mode::ExternalLb,
        (false, None, false) => Mode::NoLb,
    };
    let reason = match ext {
        Some(ext) => format!("{reason}; --external-url {ext} is an LB kubespray does not manage"),
        None => reason,
    };
    Ok(ModeChoice { mode, reason })
}

/// The values the table is written in, each with the variable behind it.
#[derive(Clone, Debug)]
pub struct Terms {
    pub bip: Host,
    pub sp: u16,
    pub nsp: u16,
    pub lb: Host,
    pub lp: u16,
    /// The first control-plane host and its access address.
    pub m0: String,
    pub m0_aip: Host,
    pub ext: Option<ExternalUrl>,
    /// For the reader: each abbreviation, its value, its variable and where it was set.
    pub explained: Vec<Term>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Term {
    /// As in the table: `bip`, `sp`, `m[0].aip`, ...
    pub abbr: &'static str,
    pub value: String,
    /// The variable (or rule) behind it.
    pub variable: String,
    /// `FILE:LINE:COLUMN`, `--var NAME`, `default`, `defers to sp`, ...
    pub from: String,
}

fn term(
    abbr: &'static str,
    value: impl ToString,
    variable: impl Into<String>,
    from: impl Into<String>,
) -> Term {
    Term { abbr, value: value.to_string(), variable: variable.into(), from: from.into() }
}

impl Terms {
    pub fn resolve(
        vars: &Vars,
        inventory: &Inventory,
        ext: Option<&ExternalUrl>,
    ) -> Result<Self, KubesprayError> {
        let mut explained = Vec::new();

        let (sp, from) = match vars.port(vars::APISERVER_PORT)? {
            Some((p, origin)) => (p, origin.to_string()),
            None => (vars::DEFAULT_APISERVER_PORT, "default".into()),
        };
        explained.push(term("sp", sp, vars::APISERVER_PORT, from));

        let (nsp, from) = match vars.port(vars::LOCAL_LB_PORT)? {
            Some((p, origin)) => (p, origin.to_string()),
            None => (sp, "defers to sp".into()),
        };
        explained.push(term("nsp", nsp, vars::LOCAL_LB_PORT, from));

        let bind = vars.host(vars::BIND_ADDRESS)?;
        let (bip, from) = match bind {
            None => (Host::localhost(), "default 0.0.0.0: localhost".to_owned()),
            Some((Host::Ip(ip), origin)) if ip.is_unspecified() => {
                (Host::localhost(), format!("{origin}: {ip} is every interface: localhost"))
            }
            Some((host @ Host::Ip(_), origin)) => (host, origin.to_string()),
            Some((Host::Name(name), origin)) => {
                return Err(KubesprayError::BadValue {
                    name: vars::BIND_ADDRESS.into(),
                    value: name,
                    expected: "an IP address",
                    origin: origin.clone(),
                });
            }
        };
        explained.push(term("bip", &bip, vars::BIND_ADDRESS, from));
        explained.push(term("lc", "localhost", "-", "fixed"));

        let (lb, from) = match vars.host(vars::LB_DOMAIN_NAME)? {
            Some((h, origin)) => (h, origin.to_string()),
            None => (Host::Name(vars::DEFAULT_LB_DOMAIN_NAME.into()), "default".into()),
        };
        explained.push(term("lb", &lb, vars::LB_DOMAIN_NAME, from));

        let balancer = vars.load_balancer()?;
        let (lp, from) = match &balancer {
            Some(b) => match b.port {
                Some(p) => (p, b.origin.to_string()),
                None => (sp, format!("{}: no port, defers to sp", b.origin)),
            },
            None => (sp, "not set, defers to sp".into()),
        };
        explained.push(term("lp", lp, format!("{}.port", vars::EXTERNAL_LB), from));
        if let Some(address) = balancer.as_ref().and_then(|b| b.address.clone()) {
            let from = balancer.as_ref().map(|b| b.origin.to_string()).unwrap_or_default();
            explained.push(term(
                "lb addr",
                address,
                format!("{}.address (in /etc/hosts as lb)", vars::EXTERNAL_LB),
                from,
            ));
        }

        let group = inventory.control_plane()?;
        let m0 = group.hosts.first().cloned().ok_or_else(|| KubesprayError::EmptyGroup {
            path: inventory.path.clone(),
            group: group.name.clone(),
        })?;
        explained.push(term(
            "m[0]",
            &m0,
            format!("first host of {}", group.name),
            inventory.path.display().to_string(),
        ));
        let aip = inventory.access_address(&m0)?;
        let (variable, from) = match &aip.source {
            AddressSource::Var { name: "access_ip", origin } => ("access_ip".to_owned(), origin.to_string()),
            AddressSource::Var { name: "ip", origin } => {
                ("ip (access_ip not set)".to_owned(), origin.to_string())
            }
            AddressSource::Var { name, origin } => {
                (format!("{name} (access_ip, ip not set)"), origin.to_string())
            }
            AddressSource::HostName => (
                "host name (access_ip, ip, ansible_host not set)".to_owned(),
                inventory.path.display().to_string(),
            ),
        };
        explained.push(term("m[0].aip", &aip.address, variable, from));

        match ext {
            Some(ext) => explained.push(term("ext", ext, "unmanaged LB", "--external-url")),
            None => explained.push(term("ext", "-", "unmanaged LB", "--external-url not given")),
        }

        Ok(Terms { bip, sp, nsp, lb, lp, m0, m0_aip: aip.address, ext: ext.cloned(), explained })
    }
}

/// One row of the table, written out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub mode: Mode,
    pub title: &'static str,
    pub kube_master: String,
    pub non_master: String,
    /// `None` for "Local LB + unmanaged LB" without `--external-url`.
    pub external: Option<String>,
}

impl Row {
    pub fn new(mode: Mode, t: &Terms) -> Self {
        let lc = Host::localhost();
        let m0 = t.m0_aip.url(t.sp);
        let lb = t.lb.url(t.lp);
        let (non_master, external) = match mode {
            Mode::LocalLb => (lc.url(t.nsp), Some(m0)),
            Mode::LocalLbUnmanagedLb => (lc.url(t.nsp), t.ext.as_ref().map(|e| e.to_string())),
            Mode::ExternalLb => (lb.clone(), Some(lb)),
            Mode::NoLb => (m0.clone(), Some(m0)),
        };
        Row { mode, title: mode.title(), kube_master: t.bip.url(t.sp), non_master, external }
    }
}

/// What `kha endpoints` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub mode: Mode,
    pub title: &'static str,
    pub reason: String,
    pub kube_master: String,
    pub non_master: String,
    pub external: Option<String>,
    pub terms: Vec<Term>,
    /// Every row, for `--all-modes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modes: Option<Vec<Row>>,
    /// The files the variables were read from, lowest precedence first.
    pub files: Vec<String>,
}

pub fn evaluate(
    vars: &Vars,
    inventory: &Inventory,
    ext: Option<&ExternalUrl>,
    all_modes: bool,
) -> Result<Evaluation, KubesprayError> {
    let choice = select_mode(vars, ext)?;
    let terms = Terms::resolve(vars, inventory, ext)?;
    let row = Row::new(choice.mode, &terms);
    Ok(Evaluation {
        mode: choice.mode,
        title: choice.mode.title(),
        reason: choice.reason,
        kube_master: row.kube_master,
        non_master: row.non_master,
        external: row.external,
        modes: all_modes.then(|| Mode::ALL.iter().map(|m| Row::new(*m, &terms)).collect()),
        terms: terms.explained,
        files: vars.files.iter().map(|f| f.display().to_string()).collect(),
    })
}

const NO_EXT: &str = "(needs --external-url)";

/// Aligned columns, two spaces apart, the last one unpadded.
fn columns(rows: &[Vec<String>], indent: &str) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = indent.to_owned();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn render_text(e: &Evaluation) -> String {
    let mut out = format!("mode: {}\n  {}\n\n", e.title, e.reason);
    let endpoints = vec![
        vec!["kube-master".into(), e.kube_master.clone()],
        vec!["non-master".into(), e.non_master.clone()],
        vec!["external".into(), e.external.clone().unwrap_or_else(|| NO_EXT.into())],
    ];
    out.push_str(&columns(&endpoints, "  "));
    if let Some(modes) = &e.modes {
        out.push('\n');
        let mut rows = vec![vec![
            "  endpoint type".into(),
            "kube-master".into(),
            "non-master".into(),
            "external".into(),
        ]];
        for r in modes {
            let mark = if r.mode == e.mode { '*' } else { ' ' };
            rows.push(vec![
                format!("{mark} {}", r.title),
                r.kube_master.clone(),
                r.non_master.clone(),
                r.external.clone().unwrap_or_else(|| NO_EXT.into()),
            ]);
        }
        out.push_str(&columns(&rows, ""));
    }
    out.push('\n');
    let terms: Vec<Vec<String>> = e
        .terms
        .iter()
        .map(|t| vec![t.abbr.into(), t.value.clone(), t.variable.clone(), t.from.clone()])
        .collect();
    out.push_str(&columns(&terms, "  "));
    let _ = writeln!(out, "\nread: {}", e.files.join(", "));
    out
}
