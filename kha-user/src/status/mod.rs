//! `kha status`: what the pinned maps and links say, as a table or JSON. Pure: built from what
//! the caller read, so it works while no agent runs (it then shows the last state written);
//! [`read`] does the reading, through `maps` and `loader`.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use kha_common::{
    BackendStats, DatapathConfig, FRONTEND_FALLBACK, MapLayout, POLICY_NAMES, PROBE_STATE_NAMES, ProbeKey,
    ProbeStatus, socket_addr,
};
use serde::Serialize;

use crate::{
    loader::{DestroySupport, LinkStatus},
    table::Snapshot,
};

mod read;

pub use read::{StatusError, read};

/// Everything `build` needs, as read from the maps and links.
pub struct Inputs<'a> {
    pub pin_dir: &'a str,
    pub snapshot: &'a Snapshot,
    pub config: &'a DatapathConfig,
    pub links: Vec<LinkStatus>,
    pub counters: Vec<(&'static str, u64)>,
    pub probes: &'a BTreeMap<ProbeKey, ProbeStatus>,
    /// Kernel counters and suspicion per backend id.
    pub backends: &'a BTreeMap<u32, (BackendStats, bool)>,
    /// What the kernel answered to a SOCK_DESTROY of a socket of the caller's own.
    pub sock_destroy: DestroySupport,
    /// `KHA_LAYOUT`: each map's layout version and capacity (empty if a kha from before the
    /// record pinned the maps).
    pub layout: Vec<MapLayout>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    /// Every hook has a pinned link.
    pub attached: bool,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub links: Vec<LinkStatus>,
    pub frontends: Vec<FrontendStatus>,
    pub counters: Vec<Counter>,
    pub sock_destroy: SockDestroyStatus,
    pub layout: Vec<LayoutStatus>,
}

/// One map as `KHA_LAYOUT` records it.
#[derive(Clone, Debug, Serialize)]
pub struct LayoutStatus {
    pub map: String,
    pub version: u32,
    pub max_entries: u32,
}

/// Whether kha can terminate the connections of a failed master (`CONFIG_INET_DIAG_DESTROY`).
#[derive(Clone, Debug, Serialize)]
pub struct SockDestroyStatus {
    pub supported: bool,
    /// supported, missing, not permitted, no sock_diag, unknown.
    pub state: &'static str,
    /// The cause and the fix, when not supported.
    pub problem: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FrontendStatus {
    pub address: String,
    pub policy: &'static str,
    /// Every backend failed its probes, so all are served (`--all-down fallback`).
    pub fallback: bool,
    /// False if a live slot dangles: connects then fail with EHOSTUNREACH until the agent
    /// resyncs.
    pub consistent: bool,
    /// Live backends first, in slot order, then configured ones that are not served.
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub address: String,
    /// 0 if the backend is not in the backend table.
    pub id: u32,
    /// In the live set: new connects may go to it.
    pub serving: bool,
    /// Probe state: up, down, draining, suspect, unknown, unchecked, unproven; "serving" without probe
    /// records.
    pub state: &'static str,
    pub reason: Option<String>,
    pub probe_latency_us: Option<u32>,
    pub since_unix_s: Option<u64>,
    /// A failed connect marked it; the kernel avoids it until a probe clears the mark.
    pub suspect: bool,
    pub kernel: Option<KernelCounters>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelCounters {
    pub chosen: u64,
    pub established: u64,
    pub active: u64,
    pub failed: u64,
    pub rto: u64,
    pub srtt_us: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Counter {
    pub name: &'static str,
    pub value: u64,
}

pub fn build(inp: Inputs<'_>) -> Status {
    let s = inp.snapshot;
    let id_of: BTreeMap<SocketAddr, u32> =
        s.backends.iter().map(|(id, b)| (socket_addr(&b.addr_be, b.port_be), *id)).collect();
    let backend = |addr: SocketAddr, serving: bool, probe: Option<&ProbeStatus>| {
        let id = id_of.get(&addr).copied().unwrap_or(0);
        let kernel = inp.backends.get(&id);
        BackendStatus {
            address: addr.to_string(),
            id,
            serving,
            state: probe
                .map_or("serving", |p| PROBE_STATE_NAMES.get(p.state as usize).copied().unwrap_or("?")),
            reason: probe.and_then(|p| {
                let end = p.reason.iter().position(|b| *b == 0).unwrap_or(p.reason.len());
                (end > 0).then(|| String::from_utf8_lossy(&p.reason[..end]).into_owned())
            }),
            probe_latency_us: probe.and_then(|p| (p.latency_us > 0).then_some(p.latency_us)),
            since_unix_s: probe.and_then(|p| (p.since_unix_s > 0).then_some(p.since_unix_s)),
            suspect: kernel.is_some_and(|k| k.1),
            kernel: kernel.map(|(k, _)| KernelCounters {
                chosen: k.chosen,
                established: k.established,
                active: k.active_count(),
                failed: k.failed,
                rto: k.rto,
                srtt_us: k.srtt_us,
            }),
        }
    };
    let mut frontends: Vec<(SocketAddr, FrontendStatus)> = s
        .frontends()
        .map(|(k, v)| {
            let address = socket_addr(&k.addr_be, k.port_be);
            let probes: BTreeMap<SocketAddr, &ProbeStatus> = inp
                .probes
                .iter()
                .filter(|(pk, _)| pk.frontend_addr_be == k.addr_be && pk.frontend_port_be == k.port_be)
                .map(|(pk, ps)| (socket_addr(&pk.backend_addr_be, pk.backend_port_be), ps))
                .collect();
            let live: Vec<SocketAddr> = (1..=v.count)
                .filter_map(|i| s.services.get(&k.with_slot(v.base.wrapping_add(i))))
                .filter_map(|slot| s.backends.get(&slot.backend_id))
                .map(|b| socket_addr(&b.addr_be, b.port_be))
                .collect();
            let consistent = live.len() == v.count as usize;
            let mut backends: Vec<BackendStatus> =
                live.iter().map(|a| backend(*a, true, probes.get(a).copied())).collect();
            backends.extend(
                probes.iter().filter(|(a, _)| !live.contains(a)).map(|(a, p)| backend(*a, false, Some(p))),
            );
            let policy = POLICY_NAMES.get(v.policy as usize).copied().unwrap_or("unknown");
            let fallback = v.flags & FRONTEND_FALLBACK != 0;
            (address, FrontendStatus { address: address.to_string(), policy, fallback, consistent, backends })
        })
        .collect();
    // IPv4 first, as operators list them.
    frontends.sort_by_key(|(a, _)| *a);
    Status {
        pin_dir: inp.pin_dir.to_owned(),
        attached: inp.links.len() == crate::loader::HOOKS.len(),
        cgroup_id: inp.config.cgroup_id,
        netns_cookie: inp.config.netns_cookie,
        links: inp.links,
        frontends: frontends.into_iter().map(|(_, f)| f).collect(),
        counters: inp.counters.into_iter().map(|(name, value)| Counter { name, value }).collect(),
        sock_destroy: SockDestroyStatus {
            supported: inp.sock_destroy.supported(),
            state: inp.sock_destroy.name(),
            problem: inp.sock_destroy.problem(),
        },
        layout: inp
            .layout
            .iter()
            .map(|l| LayoutStatus {
                map: l.name().to_owned(),
                version: l.version,
                max_entries: l.max_entries,
            })
            .collect(),
    }
}

/// Plain text for pipes and files, ANSI colour on a terminal (`color`).
pub fn render_text(s: &Status, color: bool) -> String {
    // Pad first, then colour, so the escape codes do not break the columns.
    let paint = |text: String, code: &str| if color { format!("\x1b[{code}m{text}\x1b[0m") } else { text };
    let state_color = |state: &str| match state {
        "up" | "serving" | "unchecked" => "32",
        "draining" | "suspect" | "unknown" | "unproven" => "33",
        _ => "31",
    };
    let mut out = String::new();
    let state = if s.attached {
        "attached"
    } else if s.links.is_empty() {
        "NOT ATTACHED"
    } else {
        "PARTLY ATTACHED"
    };
    let state = paint(state.to_string(), if s.attached { "32" } else { "31;1" });
    let _ = writeln!(
        out,
        "datapath: {state} (pins {}, cgroup id {}, netns cookie {})",
        s.pin_dir, s.cgroup_id, s.netns_cookie
    );
    for l in &s.links {
        let _ = writeln!(out, "  link {:<13} id {:<6} prog {}", l.hook, l.link_id, l.prog_id);
    }
    if s.layout.is_empty() {
        let _ = writeln!(out, "maps: no layout record (pinned by a kha from before KHA_LAYOUT)");
    } else {
        let maps: Vec<String> =
            s.layout.iter().map(|l| format!("{} v{} ({})", l.map, l.version, l.max_entries)).collect();
        let _ = writeln!(out, "maps: {}", maps.join(", "));
    }
    match &s.sock_destroy.problem {
        None => {
            let _ = writeln!(out, "sock_destroy: {}", paint(s.sock_destroy.state.into(), "32"));
        }
        Some(problem) => {
            let state = paint(s.sock_destroy.state.to_uppercase(), "31;1");
            let _ = writeln!(out, "sock_destroy: {state}: {problem}");
        }
    }
    if s.frontends.is_empty() {
        let _ = writeln!(out, "no frontends");
    }
    for f in &s.frontends {
        let serving = f.backends.iter().filter(|b| b.serving).count();
        let note = if !f.consistent {
            "  (INCONSISTENT: a slot dangles)"
        } else if f.fallback {
            "  (FALLBACK: every backend failed its probes, all are served)"
        } else if serving == 0 {
            "  (empty set: connects fail with EHOSTUNREACH)"
        } else {
            ""
        };
        let note = paint(note.to_string(), "31;1");
        let _ = writeln!(
            out,
            "frontend {}  policy {}  backends {serving}/{}{note}",
            f.address,
            f.policy,
            f.backends.len()
        );
        for b in &f.backends {
            let latency =
                b.probe_latency_us.map_or("-".to_string(), |l| format!("{:.1}ms", l as f64 / 1000.0));
            let k = b.kernel.as_ref();
            let _ = write!(
                out,
                "  {:<42} {} {:<7} probe {:<8} conns active {} chosen {} failed {} rto {} srtt {}us",
                b.address,
                paint(format!("{:<9}", b.state), state_color(b.state)),
                if b.serving { "serving" } else { "out" },
                latency,
                k.map_or(0, |k| k.active),
                k.map_or(0, |k| k.chosen),
                k.map_or(0, |k| k.failed),
                k.map_or(0, |k| k.rto),
                k.map_or(0, |k| k.srtt_us),
            );
            if b.suspect {
                let _ = write!(out, "  {}", paint("SUSPECT".into(), "33"));
            }
            if let Some(r) = &b.reason {
                let _ = write!(out, "  last failure: {r}");
            }
            let _ = writeln!(out);
        }
    }
    let counters: Vec<String> = s.counters.iter().map(|c| format!("{} {}", c.name, c.value)).collect();
    let _ = writeln!(out, "counters: {}", counters.join(", "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        table::{Desired, plan},
    };

    fn snapshot_of(cfg: &Config) -> Snapshot {
        let mut snap = Snapshot::default();
        for op in plan(&snap.clone(), &Desired::from_config(cfg)).unwrap() {
            snap.apply(&op);
        }
        snap
    }

    fn status(
        snap: &Snapshot,
        probes: &BTreeMap<ProbeKey, ProbeStatus>,
        kernel: &BTreeMap<u32, (BackendStats, bool)>,
    ) -> Status {
        build(Inputs {
            pin_dir: "/sys/fs/bpf/kha",
            snapshot: snap,
            config: &DatapathConfig { netns_cookie: 1, cgroup_id: 2 },
            links: vec![],
            counters: vec![("rewritten", 5)],
            probes,
            backends: kernel,
            sock_destroy: DestroySupport::Supported,
            layout: vec![MapLayout::new(&kha_common::LAYOUTS[7], 4096)],
        })
    }

    #[test]
    fn shows_every_frontend_with_its_backends() {
        let cfg = Config::from_toml(
            "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"192.0.2.11:6443\", \"192.0.2.12:6443\"]\npolicy = \"p2c\"\n[[frontend]]\naddress = \"[::1]:7443\"\n",
            &Default::default(),
        )
        .unwrap();
        let snap = snapshot_of(&cfg);
        let mut kernel = BTreeMap::new();
        kernel.insert(2, (BackendStats { chosen: 7, active: 3, ..Default::default() }, true));
        let s = status(&snap, &BTreeMap::new(), &kernel);
        assert!(!s.attached);
        let text = render_text(&s, false);
        assert!(text.contains("NOT ATTACHED"), "{text}");
        assert!(text.contains("frontend 127.0.0.1:6443  policy p2c  backends 2/2"), "{text}");
        assert!(
            text.contains("192.0.2.12:6443")
                && text.contains("active 3 chosen 7")
                && text.contains("SUSPECT"),
            "{text}"
        );
        assert!(text.contains("frontend [::1]:7443") && text.contains("EHOSTUNREACH"), "{text}");
        assert!(text.contains("rewritten 5"), "{text}");
        assert!(text.contains("sock_destroy: supported"), "{text}");
        assert!(text.contains("maps: KHA_CONNS v2 (4096)"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["layout"][0]["max_entries"], 4096);
        assert_eq!(json["frontends"][0]["backends"][1]["address"], "192.0.2.12:6443");
        assert_eq!(json["frontends"][0]["backends"][1]["kernel"]["chosen"], 7);
        assert_eq!(json["frontends"][1]["backends"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn down_backends_show_with_their_reason_and_fallback_is_flagged() {
        let cfg =
            Config::from_flags(&["127.0.0.1:6443".into()], &["192.0.2.11:6443".into()], &Default::default())
                .unwrap();
        let mut desired = Desired::from_config(&cfg);
        let f = desired.frontends.values_mut().next().unwrap();
        f.flags = FRONTEND_FALLBACK;
        let down = f.backends.pop().unwrap();
        desired.keep.insert(down);
        let mut snap = Snapshot::default();
        for op in plan(&snap.clone(), &desired).unwrap() {
            snap.apply(&op);
        }
        let fk = *desired.frontends.keys().next().unwrap();
        let mut reason = [0u8; kha_common::PROBE_REASON_LEN];
        reason[..15].copy_from_slice(b"HTTP 500: [-]et");
        let mut probes = BTreeMap::new();
        probes.insert(
            ProbeKey {
                frontend_addr_be: fk.addr_be,
                backend_addr_be: down.addr_be,
                frontend_port_be: fk.port_be,
                backend_port_be: down.port_be,
            },
            ProbeStatus {
                state: kha_common::PROBE_DOWN,
                serving: 0,
                _pad: [0; 2],
                latency_us: 1500,
                since_unix_s: 9,
                reason,
            },
        );
        let s = status(&snap, &probes, &BTreeMap::new());
        let text = render_text(&s, false);
        assert!(text.contains("FALLBACK"), "{text}");
        assert!(text.contains("192.0.2.11:6443") && text.contains("down") && text.contains("out"), "{text}");
        assert!(text.contains("last failure: HTTP 500: [-]et") && text.contains("1.5ms"), "{text}");
    }

    #[test]
    fn a_kernel_without_sock_destroy_is_flagged_with_the_fix() {
        let snap = Snapshot::default();
        let mut s = status(&snap, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(serde_json::to_value(&s).unwrap()["sock_destroy"]["supported"], true);
        let (config, probes, backends) =
            (DatapathConfig { netns_cookie: 1, cgroup_id: 2 }, BTreeMap::new(), BTreeMap::new());
        s = build(Inputs {
            pin_dir: "/sys/fs/bpf/kha",
            snapshot: &snap,
            config: &config,
            links: vec![],
            counters: vec![],
            probes: &probes,
            backends: &backends,
            sock_destroy: DestroySupport::Missing,
            layout: vec![],
        });
        let text = render_text(&s, false);
        assert!(text.contains("sock_destroy: MISSING: cannot terminate sockets"), "{text}");
        assert!(text.contains("CONFIG_INET_DIAG_DESTROY=y"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["sock_destroy"]["supported"], false);
        assert_eq!(json["sock_destroy"]["state"], "missing");
    }

    #[test]
    fn a_dangling_slot_is_reported() {
        let cfg =
            Config::from_flags(&["127.0.0.1:6443".into()], &["192.0.2.11:6443".into()], &Default::default())
                .unwrap();
        let mut snap = snapshot_of(&cfg);
        snap.backends.clear();
        let s = status(&snap, &BTreeMap::new(), &BTreeMap::new());
        assert!(!s.frontends[0].consistent);
        assert!(render_text(&s, false).contains("INCONSISTENT"));
        let colored = render_text(&s, true);
        assert!(colored.contains("\x1b[31;1m") && colored.contains("INCONSISTENT"), "{colored}");
    }
}
