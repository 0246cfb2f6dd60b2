//! `kha top`'s output: the JSON document and the terminal table. Pure.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    pod::{self, PodRef},
    rank::Other,
    rate::Client,
};

/// One refresh.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct View {
    /// Seconds between the two samples the rates come from (0: one sample, no rates).
    pub interval_s: f64,
    pub clients: Vec<ClientView>,
    /// The clients past `--top`, summed.
    pub other: Option<Other>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientView {
    /// Relative to the cgroup2 mount; `null` for a cgroup that is gone.
    pub cgroup: Option<String>,
    /// What the path says of the pod (UID, QoS class, container ID); `null` outside kubepods.
    pub pod: Option<PodRef>,
    #[serde(flatten)]
    pub client: Client,
}

pub fn view(
    clients: Vec<Client>,
    other: Option<Other>,
    paths: &BTreeMap<u64, Option<String>>,
    interval_s: f64,
) -> View {
    let clients = clients
        .into_iter()
        .map(|client| {
            let cgroup = paths.get(&client.cgroup_id).cloned().flatten();
            let pod = cgroup.as_deref().and_then(pod::parse);
            ClientView { cgroup, pod, client }
        })
        .collect();
    View { interval_s, clients, other }
}

/// What the table shows of a client: its pod and container when the path names them, else
/// the path.
fn who(c: &ClientView) -> String {
    match (&c.pod, &c.cgroup) {
        (Some(p), _) => {
            let ctr = p.container_id.as_deref().map(|id| format!(" ctr {}", &id[..id.len().min(12)]));
            format!("pod {} ({}){}", p.uid, p.qos, ctr.unwrap_or_default())
        }
        (None, Some(path)) => path.clone(),
        (None, None) => format!("(gone: cgroup id {})", c.client.cgroup_id),
    }
}

/// The distinct backends of a client's routes.
fn masters(c: &Client) -> String {
    let mut b: Vec<&str> = c.routes.iter().map(|r| r.backend.as_str()).collect();
    b.sort();
    b.dedup();
    b.join(",")
}

/// The table, each line cut to `width` characters.
pub fn table(v: &View, width: usize) -> String {
    let mut lines = vec![format!(
        "{:>9} {:>6} {:>9}  {:<15}  {:<60}  MASTERS",
        "CONN/S", "OPEN", "CONNECTS", "PROCESS", "CLIENT"
    )];
    for c in &v.clients {
        let k = &c.client;
        lines.push(format!(
            "{:>9.1} {:>6} {:>9}  {:<15}  {:<60}  {}",
            k.connects_per_s,
            k.open,
            k.connects,
            k.process,
            who(c),
            masters(k)
        ));
    }
    if let Some(o) = &v.other {
        let who = format!("({} other clients)", o.clients);
        lines.push(format!(
            "{:>9.1} {:>6} {:>9}  {:<15}  {:<60}",
            o.connects_per_s, o.open, o.connects, "", who
        ));
    }
    if v.clients.is_empty() && v.other.is_none() {
        lines.push("(no connects through kha counted yet)".into());
    }
    lines.iter().map(|l| format!("{}\n", l.chars().take(width).collect::<String>().trim_end())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::rate::Route;

    fn client(cgroup_id: u64) -> Client {
        Client {
            cgroup_id,
            process: "kubelet".into(),
            connects: 42,
            connects_per_s: 2.5,
            open: 3,
            routes: vec![
                Route { frontend: "f".into(), backend: "192.0.2.2:6443".into(), connects: 2, open: 1 },
                Route { frontend: "g".into(), backend: "192.0.2.1:6443".into(), connects: 40, open: 2 },
                Route { frontend: "f".into(), backend: "192.0.2.1:6443".into(), connects: 0, open: 0 },
            ],
        }
    }

    #[test]
    fn the_table_names_pods_paths_and_gone_cgroups() {
        let paths = BTreeMap::from([
            (1, Some("/system.slice/kubelet.service".to_string())),
            (2, Some("/kubepods/besteffort/pod0b6a8f2c-1d3e-4f5a-9b7c-2e4d6f8a0b1c/0123456789abcdef".into())),
            (3, None),
        ]);
        let other = Other { clients: 4, connects: 7, connects_per_s: 0.5, open: 1 };
        let v = view(vec![client(1), client(2), client(3)], Some(other), &paths, 2.0);
        let t = table(&v, 200);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].starts_with("   CONN/S   OPEN  CONNECTS  PROCESS"), "{t}");
        assert!(
            lines[1].contains("2.5      3        42  kubelet          /system.slice/kubelet.service"),
            "{t}"
        );
        assert!(lines[1].ends_with("192.0.2.1:6443,192.0.2.2:6443"), "{t}");
        assert!(
            lines[2].contains("pod 0b6a8f2c-1d3e-4f5a-9b7c-2e4d6f8a0b1c (besteffort) ctr 0123456789ab "),
            "{t}"
        );
        assert!(lines[3].contains("(gone: cgroup id 3)"), "{t}");
        assert!(lines[4].contains("(4 other clients)"), "{t}");
        assert!(table(&v, 20).lines().all(|l| l.chars().count() <= 20));
    }

    #[test]
    fn json_has_the_path_the_pod_and_the_counts() {
        let paths =
            BTreeMap::from([(9, Some("/kubepods/pod0b6a8f2c-1d3e-4f5a-9b7c-2e4d6f8a0b1c".to_string()))]);
        let v = view(vec![client(9)], None, &paths, 1.0);
        let j = serde_json::to_value(&v).unwrap();
        let c = &j["clients"][0];
        assert_eq!(c["cgroup_id"], 9);
        assert_eq!(c["pod"]["qos"], "guaranteed");
        assert_eq!((c["open"].as_u64(), c["connects"].as_u64()), (Some(3), Some(42)));
        assert_eq!(c["routes"].as_array().unwrap().len(), 3);
        assert!(j["other"].is_null());
        let empty = table(&view(vec![], None, &BTreeMap::new(), 0.0), 80);
        assert!(empty.contains("no connects"), "{empty}");
    }
}
