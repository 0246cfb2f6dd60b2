//! `kha`: run the agent, show the datapath's state, or remove it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
mod agent;
mod serve;
mod trace_cli;

use kha::{
    config::{Config, FrontendDefaults},
    health::{AllDown, DEFAULT_HYSTERESIS, Hysteresis},
    loader::{self, DEFAULT_PIN_DIR, PinDir},
    maps::KhaMaps,
    status,
    table::{BackendTable as _, Desired, sync},
};
use kha_common::DatapathConfig;

#[derive(Parser)]
#[command(name = "kha", version, about = "Node-local Kubernetes apiserver load balancer in the kernel")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath and keep its maps current until SIGTERM/SIGINT (the datapath stays).
    Run(Box<RunArgs>),
    /// Show frontends, backends, links and counters from the pinned maps (no agent needed).
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove every program, link and pin kha made under the pin dir.
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Show each connect decision of the datapath live, from the running agent (bounded in
    /// time and rate; the trace turns itself off).
    Trace {
        /// Only connects to this destination IP:PORT, repeatable [default: every connect].
        #[arg(long)]
        frontend: Vec<SocketAddr>,
        /// How long: 10s, 500ms, 2m (at most 5m).
        #[arg(long, default_value = "10s", value_parser = parse_trace_duration)]
        duration: Duration,
        /// The agent's --metrics-addr.
        #[arg(long, default_value = "127.0.0.1:9745")]
        agent: SocketAddr,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show the apiserver endpoints kubespray's variables give masters, non-masters and external clients.
    Endpoints(kha::kubespray::EndpointsArgs),
    /// Write the kha config for a non-master node from a kubespray inventory.
    Config(kha::kubespray::ConfigArgs),
    /// Show the clients of the apiserver on this node (cgroup, pod, process), busiest first.
    Top(kha::top::live::TopArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// Config file with frontends and their backends (see docs/operations.md).
    #[arg(long, conflicts_with_all = ["frontend", "backend"])]
    config: Option<PathBuf>,
    /// Frontend IP:PORT, repeatable [default: 127.0.0.1:6443 and [::1]:6443].
    #[arg(long)]
    frontend: Vec<String>,
    /// Backend IP:PORT (a kube-apiserver), repeatable; serves every --frontend.
    #[arg(long)]
    backend: Vec<String>,
    /// Balancing policy: random, round-robin, least-connections or p2c (config files may set
    /// one per frontend).
    #[arg(long, default_value = "least-connections")]
    policy: String,
    /// cgroup v2 directory to attach to [default: the cgroup v2 mount point].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Network namespace whose sockets are rewritten (e.g. /run/netns/NAME) [default: the agent's own].
    #[arg(long)]
    netns: Option<PathBuf>,
    /// How often the maps are checked against the desired state and repaired.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    resync_interval: u64,
    /// Prometheus metrics at /metrics, or `none`.
    #[arg(long, default_value = "127.0.0.1:9745")]
    metrics_addr: String,
    /// /healthz and /readyz of the agent (kubespray's loadbalancer_apiserver_healthcheck_port), or `none`.
    #[arg(long, default_value = "127.0.0.1:8081")]
    health_addr: String,
    /// Refuse to start when the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY); by
    /// default kha warns, exports kha_sock_destroy_supported 0 and balances without moving
    /// the connections of failed masters.
    #[arg(long)]
    require_sock_destroy: bool,
    /// Redirected sockets tracked at once (the conn map's capacity; the oldest entry goes when
    /// it is full). A change migrates the pinned map at start, open connections carried over.
    #[arg(long, default_value_t = kha_common::CONNS_CAPACITY as u32,
          value_parser = clap::value_parser!(u32)
              .range(kha_common::MIN_CONNS as i64..=kha_common::MAX_CONNS as i64))]
    max_conns: u32,
    #[command(flatten)]
    health: HealthArgs,
    #[command(flatten)]
    discovery: DiscoveryArgs,
}

#[derive(Args)]
struct DiscoveryArgs {
    /// Serve the masters listed in the `kubernetes` service's EndpointSlices (namespace
    /// `default`), followed as they change; the static backends stay the bootstrap and fallback.
    /// Feeds every --frontend, or the config file's frontends with `discover = true`.
    #[arg(long)]
    discover: bool,
    /// Kubeconfig --discover reaches the API with (the kubelet's, as kubespray and kubeadm
    /// install it).
    #[arg(long, default_value = kha::discovery::DEFAULT_KUBECONFIG, requires = "discover")]
    kubeconfig: PathBuf,
    /// Where --discover keeps the last discovered set for the next start (discovered.json).
    #[arg(long, default_value = kha::discovery::DEFAULT_STATE_DIR, requires = "discover")]
    state_dir: PathBuf,
}

#[derive(Args)]
struct HealthArgs {
    /// Cluster CA that signs the apiservers' certificates [default: kubespray's
    /// /etc/kubernetes/ssl/ca.crt or kubeadm's /etc/kubernetes/pki/ca.crt, whichever exists].
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate for the probes, for clusters without anonymous auth (e.g. the kubelet's).
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Probe without verifying the server certificate (not recommended).
    #[arg(long)]
    insecure_skip_tls_verify: bool,
    /// Serve every configured backend without probing it.
    #[arg(long, conflicts_with_all = ["ca_file", "insecure_skip_tls_verify"])]
    no_health_checks: bool,
    /// Path probed on each backend (config files may set one per frontend, e.g. /health for etcd).
    #[arg(long, default_value = kha::config::DEFAULT_HEALTH_PATH)]
    health_path: String,
    /// Time between liveness requests (`OPTIONS *` on the kept-alive probe connection): bounds
    /// how late a hung or cut-off master is noticed.
    #[arg(long, default_value_t = kha::probe::DEFAULT_INTERVAL.as_millis() as u64, value_name = "MS")]
    probe_interval_ms: u64,
    /// Time between readiness requests (`/readyz`): bounds how late a master that stops being
    /// ready (graceful shutdown, etcd lost) is noticed. Unset: the probe interval, so every
    /// liveness request is followed by one.
    #[arg(long, value_name = "MS")]
    readiness_interval_ms: Option<u64>,
    /// The cluster's node count (every node probes every apiserver): above 1000 the probes slow
    /// to a liveness request every 2 s and /readyz every 15 s, which costs each apiserver less
    /// CPU than kubespray's haproxy checks, and above 750 a failing master is rechecked less
    /// often, so that it gets about 3,300 rechecks a second from the fleet (docs/health.md).
    /// A config file's `fleet_size` does the same unless an interval flag is given.
    #[arg(long, value_name = "NODES", conflicts_with_all = ["probe_interval_ms", "readiness_interval_ms"], value_parser = clap::value_parser!(u32).range(1..))]
    fleet_size: Option<u32>,
    /// Set after parsing: --probe-interval-ms or --readiness-interval-ms was on the command line.
    #[arg(skip)]
    intervals_given: bool,
    #[arg(long, default_value = "3000", value_name = "MS")]
    probe_timeout_ms: u64,
    /// Successful probes in a row that bring a backend back.
    #[arg(long, default_value_t = DEFAULT_HYSTERESIS.rise, value_parser = clap::value_parser!(u32).range(1..=100))]
    rise: u32,
    /// Failed probes in a row that take a backend out.
    #[arg(long, default_value_t = DEFAULT_HYSTERESIS.fall, value_parser = clap::value_parser!(u32).range(1..=100))]
    fall: u32,
    /// When every backend of a frontend is unhealthy: serve all of them, or fail connects.
    #[arg(long, value_enum, default_value_t = AllDown::Fallback)]
    all_down: AllDown,
    /// How long a backend that fails readiness but still answers (or was removed from the
    /// config) keeps its existing connections before they are terminated.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    drain_time: u64,
    /// After every backend of a frontend had failed: how long it stays on the all-down
    /// fallback once one serves again, unless most of them do (0: leave at once). Keeps every
    /// node's reconnecting clients from landing on the first master to recover.
    #[arg(long, default_value = "6000", value_name = "MS")]
    fallback_grace_ms: u64,
    /// Every this often (jittered), end one long-lived connection per frontend whose most
    /// loaded master holds two or more than its least loaded one, so its client reconnects
    /// there. 0: off. Abrupt for a request in flight on it: see docs/health.md.
    #[arg(long, default_value = "0", value_name = "MS")]
    rebalance_interval_ms: u64,
}

/// Where kubespray and kubeadm keep the cluster CA.
const CA_CANDIDATES: [&str; 2] = ["/etc/kubernetes/ssl/ca.crt", "/etc/kubernetes/pki/ca.crt"];

impl HealthArgs {
    /// The probe cadence: `--fleet-size`, else the interval flags if given, else the config
    /// file's `fleet_size`, else the interval defaults.
    fn cadence(&self, file_fleet_size: Option<u32>) -> kha::probe::Cadence {
        let fleet_size = match (self.fleet_size, file_fleet_size) {
            (Some(nodes), _) => Some(nodes),
            (None, Some(nodes)) if self.intervals_given => {
                log::warn!(
                    "the config file's fleet_size = {nodes} is ignored: the probe intervals were given as flags"
                );
                None
            }
            (None, nodes) => nodes,
        };
        match fleet_size {
            Some(nodes) => {
                log::info!("probes: the cadence for a fleet of {nodes} nodes");
                kha::probe::cadence_for_fleet(nodes)
            }
            None => kha::probe::Cadence {
                interval: Duration::from_millis(self.probe_interval_ms.max(100)),
                readiness_interval: Duration::from_millis(
                    self.readiness_interval_ms.unwrap_or(self.probe_interval_ms).max(100),
                ),
                ..kha::probe::Cadence::DEFAULT
            },
        }
    }

    /// The probe settings, or `None` with --no-health-checks. The CA comes from --ca-file, else
    /// the config file, else kubespray's or kubeadm's path; kha never probes without one unless
    /// told to skip verification.
    fn probes(&self, config: &Config) -> Result<Option<agent::ProbeTemplate>> {
        if self.no_health_checks {
            return Ok(None);
        }
        // Which CA is used is decided again at every SIGHUP (the config file's `ca_file` may
        // change); the default CA is looked up once, here.
        let tls = kha::probe::TlsDefaults {
            ca_file: self.ca_file.clone(),
            default_ca: CA_CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists()),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            insecure_skip_verify: self.insecure_skip_tls_verify,
        };
        let no_ca = tls.ca_file.is_none() && config.ca_file.is_none() && tls.default_ca.is_none();
        if no_ca && !self.insecure_skip_tls_verify {
            bail!(
                "no cluster CA at {} or {}: pass --ca-file FILE (the CA that signs the apiservers' certificates), or --insecure-skip-tls-verify, or --no-health-checks",
                CA_CANDIDATES[0],
                CA_CANDIDATES[1]
            );
        }
        if self.insecure_skip_tls_verify {
            log::warn!(
                "--insecure-skip-tls-verify: probes accept any certificate; a wrong host answering would look healthy"
            );
        }
        // Every file is read now, so a bad one stops the start before anything is attached.
        for f in &config.frontends {
            tls.files_for(config.ca_file.as_deref(), &f.probe_tls)
                .load()
                .with_context(|| format!("probe TLS of frontend {}", f.address))?;
        }
        let cadence = self.cadence(config.fleet_size);
        log::info!(
            "probes: a liveness request every {:.1} s, readiness every {:.1} s, a failing master rechecked after {:.2}-{:.2} s",
            cadence.interval.as_secs_f64(),
            cadence.readiness_interval.as_secs_f64(),
            cadence.recheck.as_secs_f64() / 2.0,
            cadence.recheck.as_secs_f64()
        );
        Ok(Some(agent::ProbeTemplate {
            tls,
            cadence,
            timeout: Duration::from_millis(self.probe_timeout_ms.max(100)),
        }))
    }
}

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

/// The command line, with [`HealthArgs::intervals_given`] filled in: a config file's
/// `fleet_size` gives way to probe intervals given as flags, not to their defaults.
fn parse_cli<I: Into<std::ffi::OsString> + Clone>(
    args: impl IntoIterator<Item = I>,
) -> Result<Cli, clap::Error> {
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Run(args), Some(("run", m))) = (&mut cli.command, matches.subcommand()) {
        args.health.intervals_given = ["probe_interval_ms", "readiness_interval_ms"]
            .iter()
            .any(|id| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine));
    }
    Ok(cli)
}

fn parse_trace_duration(s: &str) -> Result<Duration, kha::trace::RequestError> {
    kha::trace::parse_duration(s)
}

fn load_config(args: &RunArgs) -> Result<Config> {
    if args.discovery.discover && args.health.no_health_checks {
        // A discovered master is served only after a verified probe passed; without probes
        // anyone who can write the EndpointSlice would choose where this node's API traffic goes.
        bail!(
            "--discover needs health checks: a discovered master is served only once its TLS probe passed, and --no-health-checks probes nothing; drop --no-health-checks (the probes need the cluster CA: --ca-file), or drop --discover and list the masters with --backend"
        );
    }
    let defaults = FrontendDefaults {
        policy: kha::config::parse_policy("--policy", &args.policy)?,
        health_path: args.health.health_path.clone(),
    };
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
    let pins = PinDir::new(pin_dir);
    if !pins.root.exists() {
        bail!("nothing under {}: kha is not attached with this --pin-dir", pins.root.display());
    }
    let maps = KhaMaps::open_pinned(&pins.maps())?;
    let snapshot = maps.snapshot()?;
    let mut backends = std::collections::BTreeMap::new();
    for id in snapshot.backends.keys() {
        backends.insert(*id, (maps.backend_stats(*id)?, maps.suspect(*id)?));
    }
    let pin_dir = pins.root.display().to_string();
    let s = status::build(status::Inputs {
        pin_dir: &pin_dir,
        snapshot: &snapshot,
        config: &maps.datapath_config()?,
        links: loader::link_status(&pins),
        counters: maps.stats()?,
        probes: &maps.probe_statuses()?,
        backends: &backends,
        layout: maps.layout()?,
        // A kernel property: asked here, in the namespace `kha status` runs in.
        sock_destroy: loader::sock_destroy_support(None),
    });
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
        let cli = super::Cli::try_parse_from([
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

    fn health(args: &[&str]) -> super::HealthArgs {
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
