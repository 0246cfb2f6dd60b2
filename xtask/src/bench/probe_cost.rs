//! What probing costs a real kube-apiserver, and the fleet model built on it
//! (`cargo xtask bench probe-cost`). One etcd member and one kube-apiserver (kubespray's
//! flags, the real control plane of `kha_lab::real`); the apiserver's CPU time (its threads'
//! schedstat) is read around three phases of equal length: idle, `/readyz` on kept-alive
//! connections (kha's probes), and `/readyz` on a new TCP + TLS connection each (haproxy's
//! `option httpchk`, kubespray's). CPU per probe is the phase's CPU minus the idle phase's,
//! over the probes answered. The model multiplies it out for a fleet: every node probes every
//! apiserver.

use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{BenchArgs, machine, procfs};

/// Probes per measured phase, over this many clients at once.
const PROBES: u64 = 4000;
const QUICK_PROBES: u64 = 400;
const CLIENTS: u64 = 4;
/// Fleet sizes the model is given for.
const FLEETS: [u64; 3] = [1000, 5000, 10000];
/// Bound on one phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub probes: u64,
    pub failed: u64,
    pub wall_s: f64,
    pub apiserver_cpu_s: f64,
}

/// A way of probing, as a fleet would run it.
#[derive(Debug, Clone, Serialize)]
pub struct Prober {
    pub label: &'static str,
    /// `/readyz` probes per node and apiserver per second.
    pub per_node_per_s: f64,
    /// `OPTIONS *` liveness requests per node and apiserver per second, kept alive.
    pub liveness_per_node_per_s: f64,
    /// Each probe on a new TCP + TLS connection.
    pub handshake_each: bool,
    /// Seconds from a master's hang to no new connection to it, and to its sockets moved, at
    /// most, as the prober's settings give them.
    pub detect_hung_s: f64,
    pub move_hung_s: f64,
}

/// The figures per apiserver for one prober and fleet size.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Load {
    pub nodes: u64,
    pub requests_per_s: f64,
    pub handshakes_per_s: f64,
    /// CPU cores the probes keep busy on each apiserver.
    pub cores: f64,
}

/// Per apiserver: the `/readyz` probes' cost at `cpu_kept_alive_s` or `cpu_handshake_s` each,
/// plus the liveness requests' at `cpu_options_s`.
pub fn load(p: &Prober, nodes: u64, cpu_kept_alive_s: f64, cpu_handshake_s: f64, cpu_options_s: f64) -> Load {
    let readiness_per_s = nodes as f64 * p.per_node_per_s;
    let liveness_per_s = nodes as f64 * p.liveness_per_node_per_s;
    let handshakes_per_s = if p.handshake_each { readiness_per_s } else { 0.0 };
    let per = if p.handshake_each { cpu_handshake_s } else { cpu_kept_alive_s };
    Load {
        nodes,
        requests_per_s: readiness_per_s + liveness_per_s,
        handshakes_per_s,
        cores: readiness_per_s * per + liveness_per_s * cpu_options_s,
    }
}

/// kha's defaults (`OPTIONS *` and `/readyz` every 1 s, jittered ±10 %), kha with
/// `--fleet-size` above 1,000 (`OPTIONS *` every 2 s, `/readyz` every 15 s), and kubespray's
/// haproxy (`inter 15s fall 2`, `timeout check 30s`). The hung-master figures are what the
/// settings allow at most: kha, the longest tick plus 0.4 s unanswered (out of the live set)
/// or 2 s (confirmed silent, sockets moved); haproxy, an interval then `fall` checks that time
/// out, its sockets never moved.
pub fn probers() -> Vec<Prober> {
    vec![
        Prober {
            label: "kha, defaults (1 s, kept alive)",
            per_node_per_s: 1.0,
            liveness_per_node_per_s: 1.0,
            handshake_each: false,
            detect_hung_s: 1.1 + 0.4,
            move_hung_s: 1.1 + 2.0,
        },
        Prober {
            label: "kha, --fleet-size above 1,000 (2 s / 15 s, kept alive)",
            per_node_per_s: 1.0 / 15.0,
            liveness_per_node_per_s: 0.5,
            handshake_each: false,
            detect_hung_s: 2.2 + 0.4,
            move_hung_s: 2.2 + 2.0,
        },
        Prober {
            label: "haproxy, kubespray (15 s, new TLS each)",
            per_node_per_s: 1.0 / 15.0,
            liveness_per_node_per_s: 0.0,
            handshake_each: true,
            detect_hung_s: 15.0 + 2.0 * 30.0,
            move_hung_s: f64::INFINITY,
        },
    ]
}

#[derive(Debug, Serialize)]
struct Report {
    machine: machine::Machine,
    phases: Vec<Phase>,
    cpu_per_kept_alive_probe_us: f64,
    cpu_per_handshake_probe_us: f64,
    cpu_per_kept_alive_livez_us: f64,
    cpu_per_kept_alive_options_star_us: f64,
    probers: Vec<Prober>,
    model: Vec<(String, Vec<Load>)>,
}

pub fn run(args: &BenchArgs) -> Result<PathBuf> {
    let (_, kind, out) = super::prepare(
        args,
        "the probe-cost bench creates network namespaces and runs the real control plane",
    )?;
    let bins = crate::setup::controlplane::ensure()?;
    // SAFETY: no other thread runs yet; the control plane reads it to find its binaries.
    unsafe { std::env::set_var("KHA_CONTROLPLANE_BIN", bins) };
    let probes = if args.quick { QUICK_PROBES } else { PROBES };
    eprintln!(
        "xtask: bench probe-cost: {kind} lab client, {probes} probes per phase; starting one etcd and one kube-apiserver"
    );
    let (bed, cp) = crate::masters::create(1, true)?;
    let cp = cp.context("the real control plane")?;
    let master = cp.names()[0].clone();
    let pid = cp.apiserver_pid(&master).context("the apiserver's pid")?;
    let addr = bed.lab.master(&master)?.https_v4();
    let ca = cp.files.pki.ca_cert.display().to_string();
    // Let the apiserver's start-up work (controllers' first lists, RBAC bootstrap) settle.
    std::thread::sleep(Duration::from_secs(if args.quick { 2 } else { 15 }));

    let cpu = || procfs::cpu_ns(pid).context("the apiserver's CPU time");
    // `None`: idle for `idle`; `Some((path, kept alive))`: probing (path `*`: `OPTIONS *`).
    let measure = |name: &'static str, how: Option<(&str, bool)>, idle: Duration| -> Result<Phase> {
        let (c0, t0) = (cpu()?, Instant::now());
        let (n, failed) = match how {
            None => {
                std::thread::sleep(idle);
                (0, 0)
            }
            Some((path, k)) => probe(&bed, addr, &ca, path, probes, k)?,
        };
        let p = Phase {
            name,
            probes: n,
            failed,
            wall_s: t0.elapsed().as_secs_f64(),
            apiserver_cpu_s: (cpu()? - c0) as f64 / 1e9,
        };
        eprintln!(
            "  {name}: {n} probes ({failed} failed) in {:.1} s, apiserver CPU {:.3} s",
            p.wall_s, p.apiserver_cpu_s
        );
        Ok(p)
    };
    let kept = measure("kept-alive /readyz", Some(("/readyz", true)), Duration::ZERO)?;
    // As long as the kept-alive phase: the idle rate is subtracted from the probe phases.
    let idle = measure("idle", None, Duration::from_secs_f64(kept.wall_s.max(5.0)))?;
    let fresh = measure("new TLS connection per /readyz", Some(("/readyz", false)), Duration::ZERO)?;
    // For comparison: the liveness endpoint, which leaves out the readiness-only checks.
    let livez = measure("kept-alive /livez", Some(("/livez", true)), Duration::ZERO)?;
    // And `OPTIONS *`, which Go's HTTP server answers before any of the apiserver's handlers:
    // proof that the process serves, at the price of a TLS record.
    let star = measure("kept-alive OPTIONS *", Some(("*", true)), Duration::ZERO)?;
    let phases = vec![kept.clone(), idle.clone(), fresh.clone(), livez.clone(), star.clone()];
    drop(cp);
    drop(bed);

    let per_probe = |p: &Phase| {
        let idle_rate = idle.apiserver_cpu_s / idle.wall_s.max(1e-9);
        ((p.apiserver_cpu_s - idle_rate * p.wall_s) / p.probes.max(1) as f64).max(0.0)
    };
    let (k, h, l, o) = (per_probe(&kept), per_probe(&fresh), per_probe(&livez), per_probe(&star));
    let probers = probers();
    let model = probers
        .iter()
        .map(|p| (p.label.to_string(), FLEETS.iter().map(|n| load(p, *n, k, h, o)).collect()))
        .collect();
    let report = Report {
        machine: machine::describe(),
        phases,
        cpu_per_kept_alive_probe_us: k * 1e6,
        cpu_per_handshake_probe_us: h * 1e6,
        cpu_per_kept_alive_livez_us: l * 1e6,
        cpu_per_kept_alive_options_star_us: o * 1e6,
        probers,
        model,
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(out.join("probe-cost.json"), serde_json::to_string_pretty(&report)?)?;
    fs::write(out.join("probe-cost.md"), markdown(&report))?;
    Ok(out)
}

/// `count` probes of `path` on `addr`, over [`CLIENTS`] lab clients at once, each as fast as
/// it gets answers; kept alive or a new connection each. Returns (answered 200, failed).
fn probe(
    bed: &kha_lab::bed::Bed,
    addr: std::net::SocketAddr,
    ca: &str,
    path: &str,
    count: u64,
    keep_alive: bool,
) -> Result<(u64, u64)> {
    let per = (count / CLIENTS).max(1);
    let started = Instant::now();
    let children: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut a: Vec<String> = [
                "client",
                "--url",
                &format!("https://localhost:6443{}", if path == "*" { "/" } else { path }),
                "--connect-addr",
                &addr.to_string(),
                "--ca",
                ca,
                "--count",
                &per.to_string(),
                "--interval-ms",
                "0",
                "--timeout-ms",
                "5000",
                "--json",
            ]
            .map(String::from)
            .to_vec();
            if keep_alive {
                a.push("--keep-alive".into());
            }
            if path == "*" {
                a.push("--options-star".into());
            }
            bed.spawn_lab_tool(false, &a)
        })
        .collect::<Result<_, _>>()?;
    let (mut ok, mut failed) = (0, 0);
    for child in children {
        let out = child.wait_with_output()?;
        if started.elapsed() > PHASE_TIMEOUT {
            bail!("a probe phase took longer than {PHASE_TIMEOUT:?}");
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v.get("summary").cloned())
            .with_context(|| {
                format!("no summary from the lab client: {}", String::from_utf8_lossy(&out.stderr))
            })?;
        ok += summary["by_status"]["200"].as_u64().unwrap_or(0);
        failed += summary["failed"].as_u64().unwrap_or(0);
    }
    Ok((ok, failed))
}

fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# What probing costs a kube-apiserver, {}\n", r.machine.date);
    let _ = writeln!(m, "Machine: {}.\n", r.machine.one_line());
    let _ = writeln!(m, "| phase | probes | failed | wall (s) | apiserver CPU (s) |\n|---|---|---|---|---|");
    for p in &r.phases {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {:.1} | {:.3} |",
            p.name, p.probes, p.failed, p.wall_s, p.apiserver_cpu_s
        );
    }
    let _ = writeln!(
        m,
        "\nApiserver CPU per probe, the idle phase's rate subtracted: **{:.0} µs** on a kept-alive connection, \
         **{:.0} µs** with a new TCP + TLS connection each (for comparison, kept alive: `/livez` {:.0} µs, `OPTIONS *` {:.0} µs).\n",
        r.cpu_per_kept_alive_probe_us,
        r.cpu_per_handshake_probe_us,
        r.cpu_per_kept_alive_livez_us,
        r.cpu_per_kept_alive_options_star_us
    );
    let _ = writeln!(
        m,
        "Per apiserver, every node probing every apiserver (steady state, no restart):\n\n| prober | hung master out after | its sockets moved after | nodes | requests/s | TLS handshakes/s | CPU (cores) |\n|---|---|---|---|---|---|---|"
    );
    for (p, (label, loads)) in r.probers.iter().zip(&r.model) {
        let moved =
            if p.move_hung_s.is_finite() { format!("{:.1} s", p.move_hung_s) } else { "never".into() };
        for l in loads {
            let _ = writeln!(
                m,
                "| {label} | {:.1} s | {moved} | {} | {:.0} | {:.0} | {:.3} |",
                p.detect_hung_s, l.nodes, l.requests_per_s, l.handshakes_per_s, l.cores
            );
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_multiplies_rates_by_the_measured_costs() {
        let [kha, fleet, haproxy] = probers().try_into().unwrap();
        let l = load(&kha, 5000, 50e-6, 2e-3, 10e-6);
        assert_eq!((l.requests_per_s, l.handshakes_per_s), (10000.0, 0.0));
        assert!((l.cores - 0.3).abs() < 1e-9, "{l:?}");
        let l = load(&haproxy, 5000, 50e-6, 2e-3, 10e-6);
        assert!((l.requests_per_s - 333.333).abs() < 0.01 && l.handshakes_per_s == l.requests_per_s);
        assert!((l.cores - 0.6667).abs() < 1e-3, "{l:?}");
        // With the costs measured on the real apiserver the fleet setting stays under haproxy.
        let (k, h, o) = (402e-6, 1046e-6, 83e-6);
        assert!(load(&fleet, 5000, k, h, o).cores <= load(&haproxy, 5000, k, h, o).cores);
        assert!(fleet.move_hung_s * 10.0 <= haproxy.detect_hung_s);
    }
}
