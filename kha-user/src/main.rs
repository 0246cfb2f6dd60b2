//! `kha`: run the agent, show the datapath's state, or remove it.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
mod agent;
mod cli;
mod serve;
mod trace_cli;

use cli::{Command, Output, RunArgs, parse_cli};
use kha::{
    config::{Config, FrontendDefaults},
    health::Hysteresis,
    loader::{self, PinDir},
    maps::KhaMaps,
    status,
    table::{Desired, sync},
};
use kha_common::DatapathConfig;

fn main() {
    // kube-rs logs every retry of a failing watch at error level; discovery reports a failure
    // once, with its cause (RUST_LOG=kube_client=debug shows kube-rs's own lines).
    let filter = "info,kube_client=off,kube_runtime=off";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter)).init();
    let cli = parse_cli(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Status { pin_dir, output } => show_status(&pin_dir, output),
        Command::Detach { pin_dir } => detach(&pin_dir),
        Command::Trace { frontend, duration, agent, output } => trace_cli::run(trace_cli::Args {
            agent,
            request: kha::trace::Request { duration, frontends: frontend },
            json: matches!(output, Output::Json),
        }),
        Command::Endpoints(args) => {
            kha::kubespray::endpoints_command(&args).map(|t| print!("{t}")).map_err(Into::into)
        }
        Command::Top(args) => kha::top::live::run(&args).map_err(Into::into),
        Command::Config(args) => {
            kha::kubespray::config_command(&args).map(|t| print!("{t}")).map_err(Into::into)
        }
    };
    if let Err(e) = result {
        eprintln!("kha: error: {e:#}");
        std::process::exit(1);
    }
}

fn load_config(args: &RunArgs) -> Result<Config> {
    if args.discovery.discover && args.health.no_health_checks {
        // A discovered master is served only after a verified probe passed; without probes
        // anyone who can write the EndpointSlice would choose where this node's API traffic goes.
        bail!(
            "--discover needs health checks: a discovered master is served only once its TLS probe passed, and --no-health-checks probes nothing; drop --no-health-checks (the probes need the cluster CA: --ca-file), or drop --discover and list the masters with --backend"
        );
    }
    let defaults = FrontendDefaults { policy: args.policy, health_path: args.health.health_path.clone() };
    let mut config = match &args.config {
        Some(path) => Config::from_file(path, &defaults)?,
        None => Config::from_flags(&args.frontend, &args.backend, &defaults)?,
    };
    match &args.config {
        // Flags describe one service, the apiserver: discovery feeds all its frontends.
        None => config.frontends.iter_mut().for_each(|f| f.discover = args.discovery.discover),
        Some(path) if args.discovery.discover && !config.frontends.iter().any(|f| f.discover) => bail!(
            "--discover: no frontend in {} has `discover = true`, so discovery would feed nothing",
            path.display()
        ),
        Some(_) if !args.discovery.discover => {
            for f in config.frontends.iter().filter(|f| f.discover) {
                log::warn!("frontend {} has `discover = true` but kha runs without --discover", f.address);
            }
        }
        Some(_) => {}
    }
    Ok(config)
}

fn run(args: RunArgs) -> Result<()> {
    // Everything that can be wrong with the input is refused before the kernel is touched.
    let config = load_config(&args)?;
    // With --discover the static lists are the bootstrap: joined by the set the last run found.
    let feed = args.discovery.discover.then(|| {
        kha::discovery::Feed::new(
            config.clone(),
            kha::discovery::state::load_or_warn(&args.discovery.state_dir),
        )
    });
    let config = feed.as_ref().map_or(config, |f| f.effective().clone());
    for f in config.frontends.iter().filter(|f| f.backends.is_empty()) {
        log::warn!("frontend {} has no backends: connects to it fail with EHOSTUNREACH", f.address);
    }
    let probes = args.health.probes(&config)?;
    let listen = |value: &str, flag: &str, what| -> Result<Option<std::net::TcpListener>> {
        if value == "none" {
            return Ok(None);
        }
        let addr = value.parse().with_context(|| format!("{flag} `{value}`: not IP:PORT or `none`"))?;
        Ok(Some(serve::bind(addr, what)?))
    };
    let metrics_listener = listen(&args.metrics_addr, "--metrics-addr", "metrics")?;
    let health_listener = listen(&args.health_addr, "--health-addr", "health endpoints")?;
    loader::kernel_supported()?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => loader::default_cgroup()?,
    };
    let cgroup_id = loader::cgroup_id(&cgroup)?;
    let netns_cookie = loader::netns_cookie(args.netns.as_deref())?;
    // Asked where the terminations will run: the served namespace.
    let sock_destroy = loader::sock_destroy_support(args.netns.as_deref());
    loader::check_sock_destroy(sock_destroy, args.require_sock_destroy)?;
    let pins = PinDir::new(&args.pin_dir);
    loader::ensure_bpffs(&pins.root)?;
    pins.create()?;
    let _lock = loader::lock_pin_dir(&pins.root)?;

    let traced = loader::traced_left_attached(&pins);
    if !traced.is_empty() {
        log::warn!(
            "{}: a trace's programs are still attached (an agent was killed during `kha trace`); kha's own programs replace them now",
            traced.join(", ")
        );
    }
    let mut loaded = loader::load(&pins, args.max_conns, args.netns.as_deref())?;
    loaded.preflight(&pins, &cgroup, cgroup_id)?;
    // In a migration these are the new maps, not yet used by any program: the backend table
    // is complete in them before the programs that read them are swapped in.
    let mut staged = KhaMaps::open_pinned(loaded.maps_dir())?;
    staged.set_datapath_config(&DatapathConfig { netns_cookie, cgroup_id })?;
    // Backends the last run's sockets still point at keep their entries (and ids) until the
    // supervisor has dealt with those sockets (`Supervisor::adopt_orphans`). Read from the
    // live conn map: a migration's new one is filled only at the program swap.
    let mut desired = Desired::from_config(&config);
    match KhaMaps::open_pinned(&pins.maps()).and_then(|live| live.conns()) {
        Ok(conns) => desired.keep.extend(conns.iter().map(|(_, _, b)| kha_common::Backend::from(*b))),
        Err(e) => log::warn!("cannot list the sockets the last run redirected: {e}"),
    }
    let report = sync(&mut staged, &desired)?;
    let attached = loaded.attach(&pins, &cgroup, cgroup_id)?;
    for line in loaded.report.lines() {
        log::info!("maps: {line}");
    }
    for (map, n) in loaded.commit(&pins, args.netns.as_deref())? {
        log::info!("maps: {map}: {n} entries carried over after the program swap; old maps removed");
    }
    // The links hold the programs now; the loader's handles can go.
    drop(loaded);
    drop(staged);
    let maps = KhaMaps::open_pinned(&pins.maps())?;
    log::info!(
        "attached to {} ({}), {} map writes, {} frontends; pins under {}",
        cgroup.display(),
        attached.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", "),
        report.writes,
        config.frontends.len(),
        pins.root.display()
    );
    for f in &config.frontends {
        let b: Vec<String> = f.backends.iter().map(|b| b.to_string()).collect();
        log::info!("frontend {} -> [{}]", f.address, b.join(", "));
    }

    let shared = std::sync::Arc::new(std::sync::Mutex::new(serve::Shared::default()));
    let recorders = kha::observe::Recorders::default();
    let endpoints = serve::Endpoints {
        shared: shared.clone(),
        recorders: recorders.clone(),
        pins: pins.clone(),
        stall_after: Duration::from_secs(3 * args.resync_interval.max(1) + 5),
        sock_destroy: sock_destroy.supported(),
        slots: serve::Slots::new(serve::MAX_CONNECTIONS),
        trace: serve::TraceSlot::default(),
        clients: Default::default(),
    };
    let trace = endpoints.trace.clone();
    let rt = runtime()?;
    let discovery = feed.map(|feed| {
        let _runtime = rt.enter();
        log::info!(
            "discovery: watching the kubernetes service's EndpointSlices through {}",
            args.discovery.kubeconfig.display()
        );
        // Until the agent's first publication: the masters in config order, none probed yet.
        let (route, known) = tokio::sync::watch::channel(kha::discovery::watch::Route {
            frontends: config.frontends.iter().map(|f| f.address).collect(),
            masters: kha::health::api_candidates(&config, &Default::default(), kha::health::node_spread()),
        });
        let mut watch = kha::discovery::watch::WatchSettings::new(
            args.discovery.kubeconfig.clone(),
            Some(args.discovery.state_dir.clone()),
        );
        watch.known = Some(known);
        agent::Discovery { feed, updates: kha::discovery::watch::spawn(watch), route }
    });
    let settings = agent::Settings {
        shared,
        recorders,
        probes,
        hysteresis: Hysteresis { rise: args.health.rise, fall: args.health.fall },
        all_down: args.health.all_down,
        drain: Duration::from_secs(args.health.drain_time),
        fallback_grace: Duration::from_millis(args.health.fallback_grace_ms),
        rebalance: (args.health.rebalance_interval_ms > 0)
            .then(|| Duration::from_millis(args.health.rebalance_interval_ms.max(100))),
        resync: Duration::from_secs(args.resync_interval.max(1)),
        netns: args.netns.clone(),
        pins: pins.clone(),
        discovery,
    };
    let result = rt.block_on(async {
        if let Some(l) = metrics_listener {
            serve::start(l, "metrics", endpoints.clone())?;
        }
        if let Some(l) = health_listener {
            serve::start(l, "health endpoints", endpoints)?;
        }
        let fleet_size = config.fleet_size;
        let reload = || {
            let new = load_config(&args)?;
            if new.fleet_size != fleet_size {
                log::warn!(
                    "SIGHUP: fleet_size changed ({fleet_size:?} -> {:?}); the probe cadence it sets takes effect at the next start",
                    new.fleet_size
                );
            }
            Ok(new)
        };
        agent::run(settings, config, maps, reload).await
    });
    // Before anything else on the way out, also after an error: never leave the traced
    // programs attached.
    trace.shutdown();
    result?;
    log::info!("stopping; the datapath stays attached and keeps balancing (`kha detach` removes it)");
    Ok(())
}

/// The agent loop (the only writer of the maps) runs in `block_on` on the main thread, and
/// everything it spawns (probes, endpoints, discovery) on a worker thread of its own. The
/// loop's calls block at times (a SOCK_DESTROY run dumps the sockets and scans the conn
/// map); with a current-thread runtime that would stall every probe and timer with it.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kha-worker")
        .enable_all()
        .build()
}

fn show_status(pin_dir: &Path, output: Output) -> Result<()> {
    let s = status::read(&PinDir::new(pin_dir))?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Text => {
            use std::io::IsTerminal as _;
            print!("{}", status::render_text(&s, std::io::stdout().is_terminal()))
        }
    }
    Ok(())
}

fn detach(pin_dir: &Path) -> Result<()> {
    let pins = PinDir::new(pin_dir);
    let _lock = if pins.root.exists() { Some(loader::lock_pin_dir(&pins.root)?) } else { None };
    let d = loader::detach(&pins).with_context(|| format!("detaching {}", pins.root.display()))?;
    println!("detached: {} links and {} maps removed from {}", d.links, d.maps, pins.root.display());
    if let Some(mount) = d.kept_mount {
        println!(
            "kept {}: it is a mount point (a bpffs of its own), left mounted and empty of kha's pins; unmount it yourself if nothing else uses it: umount {}",
            mount.display(),
            mount.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser as _;

    #[test]
    fn discovery_without_health_checks_is_refused() {
        let cli = super::cli::Cli::try_parse_from([
            "kha",
            "run",
            "--discover",
            "--no-health-checks",
            "--backend",
            "192.0.2.11:6443",
        ])
        .unwrap();
        let super::Command::Run(args) = cli.command else { panic!("not run") };
        let e = super::load_config(&args).unwrap_err().to_string();
        assert!(e.contains("--discover needs health checks") && e.contains("--ca-file"), "{e}");
    }

    fn health(args: &[&str]) -> super::cli::HealthArgs {
        let cli =
            super::parse_cli(["kha", "run", "--backend", "192.0.2.11:6443"].iter().chain(args)).unwrap();
        let super::Command::Run(run) = cli.command else { panic!("not run") };
        run.health
    }

    #[test]
    fn the_config_files_fleet_size_sets_the_cadence_unless_intervals_are_flags() {
        use kha::probe::Cadence;
        let ms = Duration::from_millis;
        let intervals = |c: Cadence| (c.interval, c.readiness_interval);
        let large = kha::probe::cadence_for_fleet(5000);
        assert_ne!(large, Cadence::DEFAULT);
        // The flag's default is the library's, readiness following it.
        assert_eq!(health(&[]).cadence(None), Cadence::DEFAULT);
        assert_eq!(health(&[]).cadence(Some(5000)), large);
        assert_eq!(health(&["--fleet-size", "5000"]).cadence(None), large);
        assert_eq!(health(&["--fleet-size", "5000"]).cadence(Some(10)), large);
        assert_eq!(
            intervals(health(&["--probe-interval-ms", "500"]).cadence(Some(5000))),
            (ms(500), ms(500))
        );
        // Given explicitly, even at its default value.
        let explicit = health(&["--probe-interval-ms", "900"]).cadence(Some(5000));
        assert_eq!(explicit, Cadence { readiness_interval: ms(900), ..Cadence::DEFAULT });
        let readiness = health(&["--readiness-interval-ms", "3000"]).cadence(Some(5000));
        assert_eq!(intervals(readiness), (ms(900), ms(3000)));
        assert!(super::parse_cli(["kha", "run", "--fleet-size", "0"]).is_err());
    }

    /// While the agent loop blocks (here in a std channel wait, standing for a SOCK_DESTROY
    /// run), a task it spawned still runs: with a current-thread runtime it never would.
    #[test]
    fn spawned_tasks_run_while_the_agent_loop_blocks() {
        let rt = super::runtime().unwrap();
        let got = rt.block_on(async {
            let (tx, rx) = std::sync::mpsc::channel();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let _ = tx.send(());
            });
            rx.recv_timeout(Duration::from_secs(10))
        });
        assert!(got.is_ok(), "the spawned task did not run while block_on was blocked");
    }
}
