//! `cargo xtask`: everything a checkout needs, from a fresh machine to a running lab.

mod bench;
mod chaos;
mod cmd;
mod demo;
mod fuzz;
mod lab_client;
mod masters;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, build, run, demo and test kha")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs and is missing (Debian packages, bpf-linker; `./x` installs
    /// the pinned toolchain before this runs).
    Setup {
        /// Also build the lab's real control plane (kube-apiserver, kubectl, kha-watch, etcd).
        #[arg(long)]
        controlplane: bool,
    },
    /// Set up, then build the agent and the lab tools.
    Build,
    /// Set up, build (release) and run `kha run ARGS` as root: kha on this node.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build and run the demo lab: kha in front of 3 masters, one failing and coming back.
    Demo(demo::DemoArgs),
    /// Benchmark kha against direct connects, nginx and haproxy (docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Chaos soak: random master, agent and config faults under load, invariants checked
    /// throughout; `target/chaos/chaos-<seed>.{md,json}`. docs/testing.md, "Chaos soak".
    Chaos(chaos::ChaosArgs),
    /// Run the fuzz targets of fuzz/ (config file, probe responses, kubespray inventories and
    /// vars, EndpointSlices) for a bounded time each; installs the pinned nightly and cargo-fuzz
    /// first. docs/testing.md, "Fuzzing".
    Fuzz(fuzz::FuzzArgs),
    /// Set up, build and run every test: unit tests, then the root end-to-end tests (simulated
    /// masters, then the real control plane), the demo and the bench harnesses.
    Test {
        /// Only end-to-end tests whose name contains this.
        filter: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup { controlplane } => setup::setup()
            .and_then(|()| if controlplane { setup::controlplane::ensure().map(drop) } else { Ok(()) }),
        Command::Build => setup::setup().and_then(|()| cmd::build_debug()),
        Command::Run { args } => run(args),
        Command::Demo(args) => demo::demo(args),
        Command::Bench(args) => bench::bench(args),
        Command::Chaos(args) => chaos::chaos(args),
        Command::Fuzz(args) => fuzz::fuzz(args),
        Command::Test { filter } => test(filter),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Vec<String>) -> Result<()> {
    setup::setup()?;
    cmd::require_root("kha attaches eBPF programs")?;
    let kha = cmd::build_dist()?;
    let mut full = vec!["run".to_string()];
    full.extend(args);
    cmd::exec(&kha, &full)
}

fn test(filter: Option<String>) -> Result<()> {
    setup::setup()?;
    let controlplane = setup::controlplane::ensure()?;
    cmd::build_debug()?;
    // Unit tests: the default members, no root needed.
    cmd::cargo(&["test", "--quiet"])?;
    // End-to-end tests on the real kernel: one at a time, each in its own netns and cgroup
    // (tests/e2e), then the scenarios against the real control plane (tests/real).
    let mut args = vec!["test", "-p", "kha-e2e", "--"];
    if let Some(f) = filter.as_deref() {
        args.push(f);
    }
    args.push("--test-threads=1");
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    let bins = controlplane.display().to_string();
    cmd::cargo_env(
        &args,
        &[("KHA_REQUIRE_BPF", if ci { "1" } else { "" }), ("KHA_CONTROLPLANE_BIN", &bins)],
    )?;
    if filter.is_none() {
        // The README's first command, shortened: it must keep working, failover acts included.
        if cmd::is_root() {
            demo::demo(demo::DemoArgs::quick())?;
            // The benchmark harnesses must keep producing every figure (never judged on speed).
            bench::quick_check()?;
            bench::failover_quick_check(false)?;
            // The same against the real control plane, watchers included.
            bench::failover_quick_check(true)?;
            // The agent's static build with discovery on, against the real control plane.
            bench::memory_quick_check()?;
            // Every chaos event kind once, invariants judged (about 90 s).
            chaos::chaos(chaos::ChaosArgs::quick())?;
        } else if ci {
            anyhow::bail!("the demo and bench smoke tests need root");
        }
        // Every fuzz target for a bounded time (docs/testing.md, "Fuzzing"): no root needed.
        fuzz::fuzz(fuzz::FuzzArgs::quick())?;
    }
    Ok(())
}
