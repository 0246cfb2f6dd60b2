//! The command line: every subcommand's flags and their defaults (the library's, where it
//! has one), parsed with clap.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use kha::{
    config::{Config, Policy},
    health::{AllDown, DEFAULT_HYSTERESIS},
    loader::DEFAULT_PIN_DIR,
};

use crate::agent;

#[derive(Parser)]
#[command(name = "kha", version, about = "Node-local Kubernetes apiserver load balancer in the kernel")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum Output {
    Text,
    Json,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Config file with frontends and their backends (see docs/operations.md).
    #[arg(long, conflicts_with_all = ["frontend", "backend"])]
    pub(crate) config: Option<PathBuf>,
    /// Frontend IP:PORT, repeatable [default: 127.0.0.1:6443 and [::1]:6443].
    #[arg(long)]
    pub(crate) frontend: Vec<String>,
    /// Backend IP:PORT (a kube-apiserver), repeatable; serves every --frontend.
    #[arg(long)]
    pub(crate) backend: Vec<String>,
    /// Balancing policy (config files may set one per frontend).
    #[arg(long, value_enum, default_value_t = Policy::default())]
    pub(crate) policy: Policy,
    /// cgroup v2 directory to attach to [default: the cgroup v2 mount point].
    #[arg(long)]
    pub(crate) cgroup: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub(crate) pin_dir: PathBuf,
    /// Network namespace whose sockets are rewritten (e.g. /run/netns/NAME) [default: the agent's own].
    #[arg(long)]
    pub(crate) netns: Option<PathBuf>,
    /// How often the maps are checked against the desired state and repaired.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub(crate) resync_interval: u64,
    /// Prometheus metrics at /metrics, or `none`.
    #[arg(long, default_value = "127.0.0.1:9745")]
    pub(crate) metrics_addr: String,
    /// /healthz and /readyz of the agent (kubespray's loadbalancer_apiserver_healthcheck_port), or `none`.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub(crate) health_addr: String,
    /// Refuse to start when the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY); by
    /// default kha warns, exports kha_sock_destroy_supported 0 and balances without moving
    /// the connections of failed masters.
    #[arg(long)]
    pub(crate) require_sock_destroy: bool,
    /// Redirected sockets tracked at once (the conn map's capacity; the oldest entry goes when
    /// it is full). A change migrates the pinned map at start, open connections carried over.
    #[arg(long, default_value_t = kha_common::CONNS_CAPACITY as u32,
          value_parser = clap::value_parser!(u32)
              .range(kha_common::MIN_CONNS as i64..=kha_common::MAX_CONNS as i64))]
    pub(crate) max_conns: u32,
    #[command(flatten)]
    pub(crate) health: HealthArgs,
    #[command(flatten)]
    pub(crate) discovery: DiscoveryArgs,
}

#[derive(Args)]
pub(crate) struct DiscoveryArgs {
    /// Serve the masters listed in the `kubernetes` service's EndpointSlices (namespace
    /// `default`), followed as they change; the static backends stay the bootstrap and fallback.
    /// Feeds every --frontend, or the config file's frontends with `discover = true`.
    #[arg(long)]
    pub(crate) discover: bool,
    /// Kubeconfig --discover reaches the API with (the kubelet's, as kubespray and kubeadm
    /// install it).
    #[arg(long, default_value = kha::discovery::DEFAULT_KUBECONFIG, requires = "discover")]
    pub(crate) kubeconfig: PathBuf,
    /// Where --discover keeps the last discovered set for the next start (discovered.json).
    #[arg(long, default_value = kha::discovery::DEFAULT_STATE_DIR, requires = "discover")]
    pub(crate) state_dir: PathBuf,
}

#[derive(Args)]
pub(crate) struct HealthArgs {
    /// Cluster CA that signs the apiservers' certificates [default: kubespray's
    /// /etc/kubernetes/ssl/ca.crt or kubeadm's /etc/kubernetes/pki/ca.crt, whichever exists].
    #[arg(long)]
    pub(crate) ca_file: Option<PathBuf>,
    /// Client certificate for the probes, for clusters without anonymous auth (e.g. the kubelet's).
    #[arg(long, requires = "client_key")]
    pub(crate) client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    pub(crate) client_key: Option<PathBuf>,
    /// Probe without verifying the server certificate (not recommended).
    #[arg(long)]
    pub(crate) insecure_skip_tls_verify: bool,
    /// Serve every configured backend without probing it.
    #[arg(long, conflicts_with_all = ["ca_file", "insecure_skip_tls_verify"])]
    pub(crate) no_health_checks: bool,
    /// Path probed on each backend (config files may set one per frontend, e.g. /health for etcd).
    #[arg(long, default_value = kha::config::DEFAULT_HEALTH_PATH)]
    pub(crate) health_path: String,
    /// Time between liveness requests (`OPTIONS *` on the kept-alive probe connection): bounds
    /// how late a hung or cut-off master is noticed.
    #[arg(long, default_value_t = kha::probe::DEFAULT_INTERVAL.as_millis() as u64, value_name = "MS")]
    pub(crate) probe_interval_ms: u64,
    /// Time between readiness requests (`/readyz`): bounds how late a master that stops being
    /// ready (graceful shutdown, etcd lost) is noticed. Unset: the probe interval, so every
    /// liveness request is followed by one.
    #[arg(long, value_name = "MS")]
    pub(crate) readiness_interval_ms: Option<u64>,
    /// The cluster's node count (every node probes every apiserver): above 1000 the probes slow
    /// to a liveness request every 2 s and /readyz every 15 s, which costs each apiserver less
    /// CPU than kubespray's haproxy checks, and above 750 a failing master is rechecked less
    /// often, so that it gets about 3,300 rechecks a second from the fleet (docs/health.md).
    /// A config file's `fleet_size` does the same unless an interval flag is given.
    #[arg(long, value_name = "NODES", conflicts_with_all = ["probe_interval_ms", "readiness_interval_ms"], value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) fleet_size: Option<u32>,
    /// Set after parsing: --probe-interval-ms or --readiness-interval-ms was on the command line.
    #[arg(skip)]
    pub(crate) intervals_given: bool,
    #[arg(long, default_value_t = kha::probe::DEFAULT_TIMEOUT.as_millis() as u64, value_name = "MS")]
    pub(crate) probe_timeout_ms: u64,
    /// Successful probes in a row that bring a backend back.
    #[arg(long, default_value_t = DEFAULT_HYSTERESIS.rise, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) rise: u32,
    /// Failed probes in a row that take a backend out.
    #[arg(long, default_value_t = DEFAULT_HYSTERESIS.fall, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) fall: u32,
    /// When every backend of a frontend is unhealthy: serve all of them, or fail connects.
    #[arg(long, value_enum, default_value_t = AllDown::Fallback)]
    pub(crate) all_down: AllDown,
    /// How long a backend that fails readiness but still answers (or was removed from the
    /// config) keeps its existing connections before they are terminated.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub(crate) drain_time: u64,
    /// After every backend of a frontend had failed: how long it stays on the all-down
    /// fallback once one serves again, unless most of them do (0: leave at once). Keeps every
    /// node's reconnecting clients from landing on the first master to recover.
    #[arg(long, default_value = "6000", value_name = "MS")]
    pub(crate) fallback_grace_ms: u64,
    /// Every this often (jittered), end one long-lived connection per frontend whose most
    /// loaded master holds two or more than its least loaded one, so its client reconnects
    /// there. 0: off. Abrupt for a request in flight on it: see docs/health.md.
    #[arg(long, default_value = "0", value_name = "MS")]
    pub(crate) rebalance_interval_ms: u64,
}

/// Where kubespray and kubeadm keep the cluster CA.
pub(crate) const CA_CANDIDATES: [&str; 2] = ["/etc/kubernetes/ssl/ca.crt", "/etc/kubernetes/pki/ca.crt"];

impl HealthArgs {
    /// The probe cadence: `--fleet-size`, else the interval flags if given, else the config
    /// file's `fleet_size`, else the interval defaults.
    pub(crate) fn cadence(&self, file_fleet_size: Option<u32>) -> kha::probe::Cadence {
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
    pub(crate) fn probes(&self, config: &Config) -> Result<Option<agent::ProbeTemplate>> {
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

/// The command line, with [`HealthArgs::intervals_given`] filled in: a config file's
/// `fleet_size` gives way to probe intervals given as flags, not to their defaults.
pub(crate) fn parse_cli<I: Into<std::ffi::OsString> + Clone>(
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

pub(crate) fn parse_trace_duration(s: &str) -> Result<Duration, kha::trace::RequestError> {
    kha::trace::parse_duration(s)
}
