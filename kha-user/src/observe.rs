//! What the agent exposes to monitoring: Prometheus metrics (`/metrics`) and honest health
//! endpoints (`/healthz`, `/readyz`). Pure: rendered from a snapshot of the agent's state and
//! the kernel's counters, so the names and values are unit-tested.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use kha_common::BackendStats;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::health::State;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairLabels {
    pub frontend: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub frontend: String,
    pub backend: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontendLabels {
    pub frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalErrorLabels {
    pub backend: String,
    /// The errno's name, e.g. `EMFILE`.
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `reloaded` or `rejected`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// Metrics that accumulate across scrapes; the agent records into them as things happen.
#[derive(Clone)]
pub struct Recorders {
    pub probe_duration: Family<BackendLabels, Histogram>,
    pub map_update_errors: Counter,
    /// Connections ended to rebalance the masters (`--rebalance-interval-ms`).
    pub rebalanced: Counter,
    /// Probes that failed on this node's side (out of descriptors, memory, ports) and were
    /// therefore not counted against the master.
    pub probe_local_errors: Family<LocalErrorLabels, Counter>,
    /// Changed probe TLS files (certificate rotation) put in use or refused.
    pub probe_tls_reloads: Family<ReloadLabels, Counter>,
    /// The label sets recorded so far: a `Family` cannot list its own, and the series of a
    /// backend that left the config must go (else every master ever discovered stays in
    /// `/metrics` until the agent restarts).
    recorded: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    probes: BTreeSet<SocketAddr>,
    local_errors: BTreeSet<(SocketAddr, String)>,
}

impl Default for Recorders {
    fn default() -> Self {
        Self {
            // 0.5 ms to about 4 s: a LAN probe takes a few ms, a timeout is seconds.
            probe_duration: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14))
            }),
            map_update_errors: Counter::default(),
            rebalanced: Counter::default(),
            probe_local_errors: Family::default(),
            probe_tls_reloads: Family::default(),
            recorded: Arc::default(),
        }
    }
}

impl Recorders {
    pub fn local_error(&self, backend: SocketAddr, error: String) {
        self.recorded().local_errors.insert((backend, error.clone()));
        self.probe_local_errors
            .get_or_create(&LocalErrorLabels { backend: backend.to_string(), error })
            .inc();
    }

    pub fn tls_reload(&self, result: &str) {
        self.probe_tls_reloads.get_or_create(&ReloadLabels { result: result.into() }).inc();
    }

    pub fn probe(&self, backend: SocketAddr, latency: Duration) {
        self.recorded().probes.insert(backend);
        self.probe_duration
            .get_or_create(&BackendLabels { backend: backend.to_string() })
            .observe(latency.as_secs_f64());
    }

    /// Drops the series of every backend not in `configured`.
    pub fn retain_backends(&self, configured: &BTreeSet<SocketAddr>) {
        let mut rec = self.recorded();
        rec.probes.retain(|b| {
            configured.contains(b) || {
                self.probe_duration.remove(&BackendLabels { backend: b.to_string() });
                false
            }
        });
        rec.local_errors.retain(|(b, error)| {
            configured.contains(b) || {
                let labels = LocalErrorLabels { backend: b.to_string(), error: error.clone() };
                self.probe_local_errors.remove(&labels);
                false
            }
        });
    }

    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One configured (frontend, backend) pair as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairState {
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
    pub state: State,
    pub serving: bool,
}

/// The agent's state at one moment.
#[derive(Clone, Debug, Default)]
pub struct AgentState {
    pub pairs: Vec<PairState>,
    pub fallback: BTreeMap<SocketAddr, bool>,
    /// The agent loop ran recently.
    pub alive: bool,
}

/// The kernel's side at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Kernel {
    pub attached: bool,
    pub backends: BTreeMap<SocketAddr, BackendStats>,
    pub terminated: u64,
    /// Of `terminated`, those ended by a forged TCP RST (clients read ECONNRESET).
    pub terminated_reset: u64,
    /// Of `terminated`, those ended by SOCK_DESTROY (clients read ECONNABORTED; client-go
    /// relists).
    pub terminated_destroy: u64,
    /// The start-up check found SOCK_DESTROY working: kha can move connections off a failed
    /// master.
    pub sock_destroy: bool,
    /// The client cgroups, busiest first, and their paths (`crate::top`).
    pub clients: Vec<crate::top::rate::Client>,
    pub client_paths: BTreeMap<u64, Option<String>>,
}

const STATES: [State; 7] = [
    State::Unknown,
    State::Up,
    State::Down,
    State::Draining,
    State::Suspect,
    State::Unchecked,
    State::Unproven,
];

fn state_name(s: State) -> &'static str {
    kha_common::PROBE_STATE_NAMES[s.code() as usize]
}

/// The `/metrics` body (OpenMetrics text, which Prometheus reads). The probe series of
/// backends the agent no longer has in its config are dropped first: this is the one place
/// they are shown, and the snapshot is the config the recorders' owner (the agent loop) had.
pub fn render_metrics(agent: &AgentState, kernel: &Kernel, rec: &Recorders) -> String {
    rec.retain_backends(&agent.pairs.iter().map(|p| p.backend).collect());
    let mut r = Registry::with_prefix("kha");
    let build = Family::<BuildLabels, Gauge>::default();
    build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
    r.register("build_info", "kha build, value 1", build);
    let attached = Gauge::<i64>::default();
    attached.set(kernel.attached as i64);
    r.register("datapath_attached", "1 if every program is attached through its pinned link", attached);
    let sock_destroy = Gauge::<i64>::default();
    sock_destroy.set(kernel.sock_destroy as i64);
    r.register(
        "sock_destroy_supported",
        "1 if the kernel can destroy sockets (CONFIG_INET_DIAG_DESTROY), so connections to a failed master are moved",
        sock_destroy,
    );

    let up = Family::<PairLabels, Gauge>::default();
    let state = Family::<StateLabels, Gauge>::default();
    for p in &agent.pairs {
        let pair = PairLabels { frontend: p.frontend.to_string(), backend: p.backend.to_string() };
        up.get_or_create(&pair).set(p.serving as i64);
        for s in STATES {
            let labels = StateLabels {
                frontend: pair.frontend.clone(),
                backend: pair.backend.clone(),
                state: state_name(s).into(),
            };
            state.get_or_create(&labels).set((p.state == s) as i64);
        }
    }
    r.register("backend_up", "1 if new connections to the frontend may go to this backend", up);
    r.register(
        "backend_state",
        "Probe state of the backend, one series per state, 1 for the current one",
        state,
    );

    let fallback = Family::<FrontendLabels, Gauge>::default();
    for (f, on) in &agent.fallback {
        fallback.get_or_create(&FrontendLabels { frontend: f.to_string() }).set(*on as i64);
    }
    r.register("frontend_fallback", "1 while every backend is unhealthy and all are served anyway", fallback);

    let family = || Family::<BackendLabels, Counter>::default();
    let (chosen, established, failed, rto) = (family(), family(), family(), family());
    let active = Family::<BackendLabels, Gauge>::default();
    let srtt = Family::<BackendLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (b, k) in &kernel.backends {
        let l = BackendLabels { backend: b.to_string() };
        chosen.get_or_create(&l).inc_by(k.chosen);
        established.get_or_create(&l).inc_by(k.established);
        failed.get_or_create(&l).inc_by(k.failed);
        rto.get_or_create(&l).inc_by(k.rto);
        active.get_or_create(&l).set(k.active_count() as i64);
        srtt.get_or_create(&l).set(k.srtt_us as f64 / 1e6);
    }
    r.register("connections_chosen", "Connects the kernel sent to the backend", chosen);
    r.register("connections_established", "Connections to the backend that reached ESTABLISHED", established);
    r.register("connections_failed", "Connects to the backend that closed before ESTABLISHED", failed);
    r.register("connections_rto", "Retransmission timeouts on connections to the backend", rto);
    r.register("connections_active", "Connections to the backend from SYN until close", active);
    r.register("backend_srtt_seconds", "Smoothed RTT to the backend measured by the kernel", srtt);

    let terminated = Counter::<u64>::default();
    terminated.inc_by(kernel.terminated);
    r.register(
        "sockets_terminated",
        "Sockets terminated because their backend failed or was removed",
        terminated,
    );
    let reset = Counter::<u64>::default();
    reset.inc_by(kernel.terminated_reset);
    r.register(
        "sockets_reset",
        "Of the terminated sockets, those ended by a TCP RST (clients read connection reset by peer)",
        reset,
    );
    let destroyed = Counter::<u64>::default();
    destroyed.inc_by(kernel.terminated_destroy);
    r.register(
        "sockets_destroyed",
        "Of the terminated sockets, those ended by SOCK_DESTROY (clients read ECONNABORTED; client-go relists)",
        destroyed,
    );
    r.register("map_update_errors", "Failed writes to the BPF maps", rec.map_update_errors.clone());
    r.register(
        "rebalanced_connections",
        "Long-lived connections ended so that their clients reconnect to a less loaded master",
        rec.rebalanced.clone(),
    );
    r.register("probe_duration_seconds", "Duration of each health probe", rec.probe_duration.clone());
    r.register(
        "probe_local_errors",
        "Probes that failed on this node's side (descriptors, memory, ports), not counted against the backend",
        rec.probe_local_errors.clone(),
    );
    r.register(
        "probe_tls_reloads",
        "Changed probe TLS files (CA, client certificate or key) put in use or refused",
        rec.probe_tls_reloads.clone(),
    );

    crate::top::metrics::register(&mut r, kernel.clients.clone(), &kernel.client_paths);

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// `/healthz`: the datapath is attached and the agent loop runs.
pub fn healthz(agent: &AgentState, kernel: &Kernel) -> (bool, String) {
    match (kernel.attached, agent.alive) {
        (true, true) => (true, "ok: datapath attached, agent loop running\n".into()),
        (false, _) => (false, "datapath not attached: run `kha status`\n".into()),
        (true, false) => (false, "agent loop stalled\n".into()),
    }
}

/// `/readyz`: at least one backend is served because it is healthy (not by fallback).
pub fn readyz(agent: &AgentState) -> (bool, String) {
    let ready =
        agent.pairs.iter().filter(|p| p.serving && matches!(p.state, State::Up | State::Unchecked)).count();
    if ready > 0 {
        (true, format!("ok: {ready} healthy backend(s) serving\n"))
    } else {
        (false, "no healthy backend: every backend is down, draining, suspect or not yet probed\n".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentState {
        let f: SocketAddr = "127.0.0.1:6443".parse().unwrap();
        let pairs = vec![
            PairState {
                frontend: f,
                backend: "192.0.2.11:6443".parse().unwrap(),
                state: State::Up,
                serving: true,
            },
            PairState {
                frontend: f,
                backend: "192.0.2.12:6443".parse().unwrap(),
                state: State::Down,
                serving: false,
            },
        ];
        AgentState { pairs, fallback: [(f, false)].into(), alive: true }
    }

    #[test]
    fn metric_names_follow_prometheus_conventions() {
        let mut kernel = Kernel {
            attached: true,
            terminated: 4,
            terminated_reset: 3,
            terminated_destroy: 1,
            sock_destroy: true,
            ..Default::default()
        };
        kernel.backends.insert(
            "192.0.2.11:6443".parse().unwrap(),
            BackendStats { chosen: 10, established: 9, active: 2, failed: 1, rto: 0, srtt_us: 1500, _pad: 0 },
        );
        let rec = Recorders::default();
        rec.probe("192.0.2.11:6443".parse().unwrap(), Duration::from_millis(3));
        rec.local_error("192.0.2.12:6443".parse().unwrap(), "EMFILE".into());
        let text = render_metrics(&agent(), &kernel, &rec);
        for line in [
            "kha_build_info{version=\"",
            "kha_datapath_attached 1",
            "kha_sock_destroy_supported 1",
            "kha_backend_up{frontend=\"127.0.0.1:6443\",backend=\"192.0.2.11:6443\"} 1",
            "kha_backend_up{frontend=\"127.0.0.1:6443\",backend=\"192.0.2.12:6443\"} 0",
            "kha_backend_state{frontend=\"127.0.0.1:6443\",backend=\"192.0.2.12:6443\",state=\"down\"} 1",
            "kha_backend_state{frontend=\"127.0.0.1:6443\",backend=\"192.0.2.12:6443\",state=\"suspect\"} 0",
            "kha_frontend_fallback{frontend=\"127.0.0.1:6443\"} 0",
            "kha_connections_chosen_total{backend=\"192.0.2.11:6443\"} 10",
            "kha_connections_failed_total{backend=\"192.0.2.11:6443\"} 1",
            "kha_connections_active{backend=\"192.0.2.11:6443\"} 2",
            "kha_backend_srtt_seconds{backend=\"192.0.2.11:6443\"} 0.0015",
            "kha_sockets_terminated_total 4",
            "kha_sockets_reset_total 3",
            "kha_sockets_destroyed_total 1",
            "kha_map_update_errors_total 0",
            "kha_rebalanced_connections_total 0",
            "kha_probe_duration_seconds_count{backend=\"192.0.2.11:6443\"} 1",
            "kha_probe_local_errors_total{backend=\"192.0.2.12:6443\",error=\"EMFILE\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // Prometheus conventions: every family prefixed, counters end in _total, units in names.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.starts_with("kha_"), "{l}");
        }
    }

    #[test]
    fn a_kernel_without_sock_destroy_shows_in_the_metrics() {
        let kernel = Kernel { attached: true, sock_destroy: false, ..Default::default() };
        let text = render_metrics(&agent(), &kernel, &Recorders::default());
        assert!(text.contains("kha_sock_destroy_supported 0"), "{text}");
    }

    #[test]
    fn probe_series_of_removed_backends_are_pruned() {
        let kernel = Kernel { attached: true, ..Default::default() };
        let rec = Recorders::default();
        let (kept, gone): (SocketAddr, SocketAddr) =
            ("192.0.2.11:6443".parse().unwrap(), "192.0.2.99:6443".parse().unwrap());
        rec.probe(kept, Duration::from_millis(3));
        rec.probe(gone, Duration::from_millis(3));
        rec.local_error(gone, "EMFILE".into());
        let before = agent();
        let mut with_gone = before.clone();
        with_gone.pairs.push(PairState { backend: gone, ..before.pairs[0].clone() });
        let text = render_metrics(&with_gone, &kernel, &rec);
        assert!(text.contains("kha_probe_duration_seconds_count{backend=\"192.0.2.99:6443\"} 1"), "{text}");
        // 192.0.2.99 left the config: its series go, the others stay.
        let text = render_metrics(&before, &kernel, &rec);
        assert!(!text.contains("192.0.2.99"), "series of a removed backend:\n{text}");
        assert!(text.contains("kha_probe_duration_seconds_count{backend=\"192.0.2.11:6443\"} 1"), "{text}");
        // Back in the config: it starts afresh.
        rec.probe(gone, Duration::from_millis(3));
        let text = render_metrics(&with_gone, &kernel, &rec);
        assert!(text.contains("kha_probe_duration_seconds_count{backend=\"192.0.2.99:6443\"} 1"), "{text}");
    }

    #[test]
    fn the_sample_dashboard_uses_only_metrics_the_agent_exports() {
        let mut kernel = Kernel { attached: true, ..Default::default() };
        kernel.backends.insert("192.0.2.11:6443".parse().unwrap(), BackendStats::default());
        let rec = Recorders::default();
        rec.probe("192.0.2.11:6443".parse().unwrap(), Duration::from_millis(3));
        let text = render_metrics(&agent(), &kernel, &rec);
        let exported: std::collections::BTreeSet<&str> =
            text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana-dashboard.json")).expect("valid JSON");
        let mut used = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("kha_") {
                        assert!(exported.contains(word), "dashboard uses {word}, not exported: {exported:?}");
                        used += 1;
                    }
                }
            }
        }
        assert!(used >= 10);
    }

    #[test]
    fn health_endpoints_tell_the_truth() {
        let kernel = Kernel { attached: true, ..Default::default() };
        assert!(healthz(&agent(), &kernel).0);
        assert!(!healthz(&agent(), &Kernel::default()).0);
        assert!(!healthz(&AgentState { alive: false, ..agent() }, &kernel).0);
        assert!(readyz(&agent()).0);
        let mut all_down = agent();
        all_down.pairs.iter_mut().for_each(|p| p.state = State::Down);
        // Served by fallback is not ready.
        all_down.pairs[0].serving = true;
        assert!(!readyz(&all_down).0);
    }
}
