//! kha in front of a real control plane: three masters, each with an etcd member and a
//! kube-apiserver (built from pinned Go modules by `cargo xtask setup`), kubectl and a client-go
//! watcher (`kha-watch`) on the node dialing `https://localhost:6443` through kha.
//!
//! Apiservers take tens of seconds to start on 2 cores, so this binary starts one control
//! plane and runs every scenario against it, in order (its own harness: libtest would start
//! one per test). A scenario that fails is reported and the rest still run; the last line is
//! `real: N passed, N failed`. Root only; with `KHA_REQUIRE_BPF=1` (CI) a skip is a failure.
//!
//! The cluster runs with `--anonymous-auth=false`, the stricter setting: kha's probes carry the
//! node's client certificate, and one scenario shows what a probe without one meets.

mod scenarios;
mod world;

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    time::Instant,
};

type Scenario = (&'static str, fn(&mut world::World));

const SCENARIOS: &[Scenario] = &[
    ("kubectl_and_client_go_through_both_frontends", scenarios::clients_through_both_frontends),
    ("probes_carry_the_node_certificate", scenarios::probes_with_the_node_certificate),
    ("a_401_apiserver_is_alive", scenarios::unauthorized_probes_keep_masters_up),
    ("a_killed_apiserver_moves_its_watches", scenarios::killed_apiserver_moves_watches),
    ("a_lost_etcd_member_moves_its_watches", scenarios::lost_etcd_member_moves_watches),
    ("a_blackholed_master_moves_its_watches", scenarios::blackholed_master_moves_watches),
    ("rolling_restart_without_shutdown_delay", scenarios::rolling_restart_no_delay),
    ("rolling_restart_with_shutdown_delay", scenarios::rolling_restart_with_shutdown_delay),
];

/// Scenarios that build a world of their own (other flags, more masters), run after the shared
/// world is gone so that two control planes never share the two cores.
const OWN_WORLD: &[(&str, fn())] =
    &[("discovery_follows_the_real_endpointslice", scenarios::discovery_follows_the_real_endpointslice)];

fn main() {
    // `cargo test` passes libtest's flags (--test-threads=1, --quiet); a bare word filters.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let why = "the real control plane tests need root (network namespaces, cgroup BPF programs)";
        if std::env::var("KHA_REQUIRE_BPF").is_ok_and(|v| v == "1") {
            eprintln!("real: {why}, and KHA_REQUIRE_BPF=1 forbids skipping");
            println!("real: 0 passed, 1 failed");
            std::process::exit(1);
        }
        eprintln!("real: skipping: {why}");
        return;
    }
    let matches = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let chosen: Vec<&Scenario> = SCENARIOS.iter().filter(|(name, _)| matches(name)).collect();
    let own: Vec<&(&str, fn())> = OWN_WORLD.iter().filter(|(name, _)| matches(name)).collect();
    if chosen.is_empty() && own.is_empty() {
        println!("real: 0 passed, 0 failed (no scenario matches {filter:?})");
        return;
    }
    let (mut passed, mut failed) = (0, 0);
    if !chosen.is_empty() {
        let started = Instant::now();
        match catch_unwind(world::World::start) {
            Ok(mut world) => {
                eprintln!("real: control plane ready in {:.1} s", started.elapsed().as_secs_f64());
                let total = chosen.len();
                for (name, scenario) in chosen {
                    if run(name, || scenario(&mut world)) {
                        passed += 1;
                        continue;
                    }
                    failed += 1;
                    // Leave the next scenario a whole control plane and a running agent.
                    if catch_unwind(AssertUnwindSafe(|| world.restore())).is_err() {
                        eprintln!(
                            "real: cannot restore the control plane; the remaining scenarios fail unrun"
                        );
                        failed = total - passed;
                        break;
                    }
                }
            }
            Err(_) => {
                eprintln!("real: the control plane did not start");
                failed += chosen.len();
            }
        }
    }
    for (name, scenario) in own {
        if run(name, scenario) {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("real: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

/// Runs one scenario, saying how it went and how long it took; true if it passed.
fn run(name: &str, scenario: impl FnOnce()) -> bool {
    let t0 = Instant::now();
    eprintln!("real: --- {name}");
    let ok = catch_unwind(AssertUnwindSafe(scenario)).is_ok();
    eprintln!("real: {} {name} ({:.1} s)", if ok { "ok" } else { "FAILED" }, t0.elapsed().as_secs_f64());
    ok
}
