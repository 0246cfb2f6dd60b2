//! The `kha_client_*` Prometheus series: the `CLIENT_SERIES` busiest clients by connects/s
//! between two scrapes, the rest summed under `client="other"`, so a node has at most
//! `CLIENT_SERIES + 1` label sets per metric whatever it runs. Pure.

use std::collections::BTreeMap;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{rank, rate::Client};

/// Clients with series of their own; the rest are `client="other"`.
pub const CLIENT_SERIES: usize = 10;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    /// The cgroup path (relative to the cgroup2 mount), `cgroup:<id>` for one that is gone,
    /// or `other`.
    pub client: String,
    /// The process name of the client's last connect; empty for `other`.
    pub process: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Registers the client series for `clients` (busiest first, as `rate::clients` sorts them).
pub fn register(r: &mut Registry, clients: Vec<Client>, paths: &BTreeMap<u64, Option<String>>) {
    let tracked = Gauge::<i64>::default();
    tracked.set(clients.len() as i64);
    let (top, other) = rank::top(clients, CLIENT_SERIES);
    let rate = Family::<ClientLabels, FloatGauge>::default();
    let open = Family::<ClientLabels, Gauge>::default();
    for c in &top {
        let client = match paths.get(&c.cgroup_id) {
            Some(Some(p)) => p.clone(),
            _ => format!("cgroup:{}", c.cgroup_id),
        };
        let l = ClientLabels { client, process: c.process.clone() };
        rate.get_or_create(&l).set(c.connects_per_s);
        open.get_or_create(&l).set(c.open as i64);
    }
    if let Some(o) = other {
        let l = ClientLabels { client: "other".into(), process: String::new() };
        rate.get_or_create(&l).set(o.connects_per_s);
        open.get_or_create(&l).set(o.open as i64);
    }
    r.register("clients_tracked", "Client cgroups in the kernel's per-client map (KHA_CLIENTS)", tracked);
    r.register(
        "client_connects_per_second",
        "Connects through kha per client cgroup since the previous scrape; the top 10, the rest as client=\"other\"",
        rate,
    );
    r.register(
        "client_connections_open",
        "Connections through kha per client cgroup from SYN until close; the top 10, the rest as client=\"other\"",
        open,
    );
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    fn c(cgroup_id: u64, rate: f64) -> Client {
        Client {
            cgroup_id,
            process: format!("p{cgroup_id}"),
            connects: 100,
            connects_per_s: rate,
            open: 1,
            routes: vec![],
        }
    }

    #[test]
    fn at_most_the_top_ten_and_other_have_series() {
        let clients: Vec<Client> = (1..=25).rev().map(|i| c(i, i as f64)).collect();
        let paths = BTreeMap::from([(25, Some("/system.slice/kubelet.service".to_string())), (24, None)]);
        let mut r = Registry::with_prefix("kha");
        register(&mut r, clients, &paths);
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        let rates: Vec<&str> =
            text.lines().filter(|l| l.starts_with("kha_client_connects_per_second{")).collect();
        assert_eq!(rates.len(), CLIENT_SERIES + 1, "{text}");
        assert!(text.contains("kha_client_connects_per_second{client=\"/system.slice/kubelet.service\",process=\"p25\"} 25.0"), "{text}");
        assert!(
            text.contains("kha_client_connections_open{client=\"cgroup:24\",process=\"p24\"} 1"),
            "{text}"
        );
        // 15 clients of rates 1..=15 summed.
        assert!(
            text.contains("kha_client_connects_per_second{client=\"other\",process=\"\"} 120.0"),
            "{text}"
        );
        assert!(text.contains("kha_client_connections_open{client=\"other\",process=\"\"} 15"), "{text}");
        assert!(text.contains("kha_clients_tracked 25"), "{text}");
    }
}
