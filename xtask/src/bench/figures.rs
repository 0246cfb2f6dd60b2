//! What the bench measures: the contenders, every figure with its unit and direction, and
//! the per-round values with their median, min and max.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const DIRECT: &str = "direct";
pub const DIRECT_1: &str = "direct-1";
pub const KHA: &str = "kha";
pub const NGINX: &str = "nginx";
pub const HAPROXY: &str = "haproxy";

/// kha's balancing policies to measure in the scaling figures. Only kha's default exists
/// so far; a new policy is one more name here (and `policy = "NAME"` in kha's config).
pub const POLICIES: &[&str] = &["random"];

/// Concurrency levels of the new-connection HTTPS figures.
pub const CONCURRENCY: [usize; 3] = [1, 16, 128];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lb {
    None,
    Kha,
    Nginx,
    Haproxy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contender {
    pub id: String,
    pub label: String,
    pub lb: Lb,
    /// The client runs in kha's cgroup (its connects go through kha's hook).
    pub in_cgroup: bool,
    /// direct-1: only the first master.
    pub single_master: bool,
    /// kha's policy, for kha contenders.
    pub policy: Option<String>,
}

fn contender(id: &str, label: &str, lb: Lb) -> Contender {
    Contender {
        id: id.into(),
        label: label.into(),
        lb,
        in_cgroup: lb == Lb::Kha,
        single_master: false,
        policy: None,
    }
}

/// The contenders of the main figures, in table order.
pub fn main_contenders() -> Vec<Contender> {
    let mut one = contender(DIRECT_1, "direct, 1 master", Lb::None);
    one.single_master = true;
    let mut kha = contender(KHA, "kha", Lb::Kha);
    kha.policy = Some(POLICIES[0].into());
    vec![
        contender(DIRECT, "direct", Lb::None),
        one,
        kha,
        contender(NGINX, "nginx", Lb::Nginx),
        contender(HAPROXY, "haproxy", Lb::Haproxy),
    ]
}

/// The contenders of the scaling figures: kha once per policy.
pub fn scale_contenders() -> Vec<Contender> {
    let mut v = vec![contender(DIRECT, "direct", Lb::None)];
    for p in POLICIES {
        let mut k = contender(&format!("kha-{p}"), &format!("kha ({p})"), Lb::Kha);
        k.policy = Some((*p).into());
        v.push(k);
    }
    v.push(contender(NGINX, "nginx", Lb::Nginx));
    v.push(contender(HAPROXY, "haproxy", Lb::Haproxy));
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A connect latency: the goal is kha within 1 µs of direct.
    ConnectLatency,
    Latency,
    /// A rate or throughput: the goal is kha within 3 % of direct.
    Rate,
    Percent,
    /// What the load balancer itself costs: there is none for direct.
    Cost,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub id: String,
    pub section: String,
    pub label: String,
    pub unit: String,
    pub better: Better,
    pub kind: Kind,
    /// Contender ids this figure is measured for.
    pub contenders: Vec<String>,
}

/// Scaling cases: how many frontends, and backends per frontend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleShape {
    pub id: String,
    pub frontends: usize,
    pub backends: usize,
}

pub fn scale_shapes() -> Vec<ScaleShape> {
    [(1, 3), (1, 16), (1, 64), (32, 3)]
        .into_iter()
        .map(|(f, b)| ScaleShape { id: format!("f{f}b{b}"), frontends: f, backends: b })
        .collect()
}

/// Every figure the bench produces, in table order.
pub fn catalog() -> Vec<Figure> {
    let main: Vec<String> = main_contenders().into_iter().map(|c| c.id).collect();
    let lbs: Vec<String> = main_contenders().into_iter().filter(|c| c.lb != Lb::None).map(|c| c.id).collect();
    let scale: Vec<String> = scale_contenders().into_iter().map(|c| c.id).collect();
    let mut v = Vec::new();
    let mut fig =
        |id: String, section: &str, label: String, unit: &str, better, kind, contenders: &Vec<String>| {
            v.push(Figure {
                id,
                section: section.into(),
                label,
                unit: unit.into(),
                better,
                kind,
                contenders: contenders.clone(),
            })
        };
    use Better::*;
    for p in ["p50", "p99"] {
        fig(
            format!("connect_{p}"),
            "latency",
            format!("TCP connect() {p}"),
            "µs",
            Lower,
            Kind::ConnectLatency,
            &main,
        );
    }
    fig(
        "connect_other_p50".into(),
        "latency",
        "connect() p50 to a master's own address (kha: from its cgroup, hook miss)".into(),
        "µs",
        Lower,
        Kind::ConnectLatency,
        &vec![DIRECT.to_owned(), KHA.to_owned()],
    );
    fig(
        "connect_in_cgroup_p50".into(),
        "latency",
        "TCP connect() p50, both from kha's cgroup, back to back (direct: a hook miss to a master's own address; kha: a frontend, rewritten)".into(),
        "µs",
        Lower,
        Kind::ConnectLatency,
        &vec![DIRECT.to_owned(), KHA.to_owned()],
    );
    for p in ["p50", "p99"] {
        fig(
            format!("first_byte_{p}"),
            "latency",
            format!("connect + first byte from the master {p}"),
            "µs",
            Lower,
            Kind::Latency,
            &main,
        );
    }
    for p in ["p50", "p99"] {
        fig(
            format!("keepalive_{p}"),
            "latency",
            format!("request on a kept-alive connection {p}"),
            "µs",
            Lower,
            Kind::Latency,
            &main,
        );
    }
    for c in CONCURRENCY {
        fig(
            format!("https_full_c{c}"),
            "https",
            format!("HTTPS new conn/request, full handshake, c={c}"),
            "req/s",
            Higher,
            Kind::Rate,
            &main,
        );
    }
    for c in CONCURRENCY {
        fig(
            format!("https_resume_c{c}"),
            "https",
            format!("HTTPS new conn/request, resumption on, c={c}"),
            "req/s",
            Higher,
            Kind::Rate,
            &main,
        );
        fig(
            format!("resume_hit_c{c}"),
            "https",
            format!("  resumption hit rate, c={c}"),
            "%",
            Higher,
            Kind::Percent,
            &main,
        );
    }
    fig(
        "bulk".into(),
        "bulk",
        "bulk throughput, one TLS connection".into(),
        "MiB/s",
        Higher,
        Kind::Rate,
        &main,
    );
    fig(
        "bulk_lb_cpu".into(),
        "cost",
        "LB CPU during bulk, per GiB".into(),
        "ms/GiB",
        Lower,
        Kind::Cost,
        &lbs,
    );
    fig(
        "conn_lb_cpu".into(),
        "cost",
        "LB CPU per new HTTPS connection (c=128)".into(),
        "µs",
        Lower,
        Kind::Cost,
        &lbs,
    );
    let kha = vec![KHA.to_owned()];
    fig(
        "kha_prog_ns".into(),
        "cost",
        "kernel time per run of a kha program, sequential connects".into(),
        "ns",
        Lower,
        Kind::Cost,
        &kha,
    );
    fig(
        "kha_prog_ns_miss".into(),
        "cost",
        "kernel time per run of a kha program, connects to other addresses".into(),
        "ns",
        Lower,
        Kind::Cost,
        &kha,
    );
    fig(
        "kha_prog_ns_load".into(),
        "cost",
        "kernel time per run of a kha program, HTTPS c=128".into(),
        "ns",
        Lower,
        Kind::Cost,
        &kha,
    );
    fig("rss_idle".into(), "cost", "LB memory, idle".into(), "MiB", Lower, Kind::Cost, &lbs);
    fig("rss_load".into(), "cost", "LB memory, under load (c=128)".into(), "MiB", Lower, Kind::Cost, &lbs);
    for s in scale_shapes() {
        let shape = format!(
            "{} frontend{}, {} backends each",
            s.frontends,
            if s.frontends == 1 { "" } else { "s" },
            s.backends
        );
        fig(
            format!("scale_{}_connect", s.id),
            "scaling",
            format!("connect() p50, {shape}"),
            "µs",
            Lower,
            Kind::ConnectLatency,
            &scale,
        );
        fig(
            format!("scale_{}_first_byte", s.id),
            "scaling",
            format!("connect + first byte p50, {shape}"),
            "µs",
            Lower,
            Kind::Latency,
            &scale,
        );
    }
    v
}

/// One figure's values for one contender over the rounds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: Vec<f64>,
}

impl Stat {
    pub fn of(rounds: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = rounds.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Stat { median, min: v[0], max: v[n - 1], rounds: rounds.to_vec() })
    }
}

/// Raw values as they are measured: figure id -> contender id -> one value per round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Values {
    pub values: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// Failed operations: "figure/contender" -> error -> count.
    pub errors: BTreeMap<String, BTreeMap<String, u64>>,
    /// Answers per master, all rounds of `https_full_c16`: contender -> master -> count.
    pub spread: BTreeMap<String, BTreeMap<String, u64>>,
    /// Load runs repeated because other processes used the CPU meanwhile, and runs kept
    /// although still disturbed after the last attempt.
    pub repeated: u64,
    pub disturbed: u64,
    /// kha's programs in the HTTPS c=128 runs: name -> per round (runs per connection, ns per run).
    pub programs: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Values {
    pub fn push(&mut self, figure: &str, contender: &str, v: f64) {
        self.values.entry(figure.into()).or_default().entry(contender.into()).or_default().push(v);
    }

    pub fn get(&self, figure: &str, contender: &str) -> Option<Stat> {
        Stat::of(self.values.get(figure)?.get(contender)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn catalog_ids_are_unique_and_cost_figures_skip_direct() {
        let c = catalog();
        let mut ids: Vec<&str> = c.iter().map(|f| f.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), c.len());
        for f in c.iter().filter(|f| f.kind == Kind::Cost) {
            assert!(!f.contenders.iter().any(|x| x == DIRECT || x == DIRECT_1), "{}", f.id);
        }
    }
}
