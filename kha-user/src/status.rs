//! `kha status`: what the pinned maps and links say, as a table or JSON. Pure: built from a
//! snapshot the caller read.

use std::fmt::Write as _;

use kha_common::{DatapathConfig, POLICY_RANDOM};
use serde::Serialize;

use crate::{
    endpoints::{Snapshot, socket_addr},
    loader::LinkStatus,
};

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    /// All four hooks have a pinned link.
    pub attached: bool,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub links: Vec<LinkStatus>,
    pub frontends: Vec<FrontendStatus>,
    pub counters: Vec<Counter>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FrontendStatus {
    pub address: String,
    pub policy: &'static str,
    /// False if a live slot dangles: connects then fail with EHOSTUNREACH until the agent
    /// resyncs.
    pub consistent: bool,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub id: u32,
    pub state: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Counter {
    pub name: &'static str,
    pub value: u64,
}

fn policy_name(p: u8) -> &'static str {
    match p {
        POLICY_RANDOM => "random",
        _ => "unknown",
    }
}

pub fn build(
    pin_dir: &str,
    snapshot: &Snapshot,
    cfg: &DatapathConfig,
    links: Vec<LinkStatus>,
    counters: Vec<(&'static str, u64)>,
) -> Status {
    let mut frontends: Vec<(std::net::SocketAddr, FrontendStatus)> = snapshot
        .frontends()
        .map(|(k, v)| {
            let ids: Vec<Option<u32>> = (1..=v.count)
                .map(|i| snapshot.services.get(&k.with_slot(v.base.wrapping_add(i))).map(|s| s.backend_id))
                .collect();
            let backends: Vec<BackendStatus> = ids
                .iter()
                .flatten()
                .filter_map(|id| {
                    let b = snapshot.backends.get(id)?;
                    Some(BackendStatus {
                        address: socket_addr(&b.addr_be, b.port_be).to_string(),
                        id: *id,
                        state: "active",
                    })
                })
                .collect();
            let address = socket_addr(&k.addr_be, k.port_be);
            let consistent = backends.len() == v.count as usize;
            (
                address,
                FrontendStatus {
                    address: address.to_string(),
                    policy: policy_name(v.policy),
                    consistent,
                    backends,
                },
            )
        })
        .collect();
    // IPv4 first, as operators list them.
    frontends.sort_by_key(|(a, _)| *a);
    let frontends = frontends.into_iter().map(|(_, f)| f).collect();
    Status {
        pin_dir: pin_dir.to_owned(),
        attached: links.len() == crate::loader::HOOKS.len(),
        cgroup_id: cfg.cgroup_id,
        netns_cookie: cfg.netns_cookie,
        links,
        frontends,
        counters: counters.into_iter().map(|(name, value)| Counter { name, value }).collect(),
    }
}

pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let state = if s.attached {
        "attached"
    } else if s.links.is_empty() {
        "NOT ATTACHED"
    } else {
        "PARTLY ATTACHED"
    };
    let _ = writeln!(
        out,
        "datapath: {state} (pins {}, cgroup id {}, netns cookie {})",
        s.pin_dir, s.cgroup_id, s.netns_cookie
    );
    for l in &s.links {
        let _ = writeln!(out, "  link {:<13} id {:<6} prog {}", l.hook, l.link_id, l.prog_id);
    }
    if s.frontends.is_empty() {
        let _ = writeln!(out, "no frontends");
    }
    for f in &s.frontends {
        let note = if !f.consistent {
            "  (INCONSISTENT: a slot dangles)"
        } else if f.backends.is_empty() {
            "  (empty set: connects fail with EHOSTUNREACH)"
        } else {
            ""
        };
        let _ =
            writeln!(out, "frontend {}  policy {}  backends {}{note}", f.address, f.policy, f.backends.len());
        for b in &f.backends {
            let _ = writeln!(out, "  {:<42} {:<8} id {}", b.address, b.state, b.id);
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
        endpoints::{Desired, plan},
    };

    #[test]
    fn shows_every_frontend_with_its_backends() {
        let cfg = Config::from_toml(
            "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"192.0.2.11:6443\", \"192.0.2.12:6443\"]\n[[frontend]]\naddress = \"[::1]:7443\"\n",
        )
        .unwrap();
        let mut snap = Snapshot::default();
        for op in plan(&snap.clone(), &Desired::from_config(&cfg)).unwrap() {
            snap.apply(&op);
        }
        let s = build(
            "/sys/fs/bpf/kha",
            &snap,
            &DatapathConfig { netns_cookie: 1, cgroup_id: 2 },
            vec![],
            vec![("rewritten", 5)],
        );
        assert!(!s.attached);
        let text = render_text(&s);
        assert!(text.contains("NOT ATTACHED"), "{text}");
        assert!(text.contains("frontend 127.0.0.1:6443  policy random  backends 2"), "{text}");
        assert!(text.contains("192.0.2.12:6443"), "{text}");
        assert!(text.contains("frontend [::1]:7443") && text.contains("EHOSTUNREACH"), "{text}");
        assert!(text.contains("rewritten 5"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["frontends"][0]["backends"][1]["address"], "192.0.2.12:6443");
        assert_eq!(json["frontends"][1]["backends"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn a_dangling_slot_is_reported() {
        let cfg = Config::from_flags(&["127.0.0.1:6443".into()], &["192.0.2.11:6443".into()]).unwrap();
        let mut snap = Snapshot::default();
        for op in plan(&snap.clone(), &Desired::from_config(&cfg)).unwrap() {
            snap.apply(&op);
        }
        snap.backends.clear();
        let s = build("p", &snap, &DatapathConfig::default(), vec![], vec![]);
        assert!(!s.frontends[0].consistent);
        assert!(render_text(&s).contains("INCONSISTENT"));
    }
}
