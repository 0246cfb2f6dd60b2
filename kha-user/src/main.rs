//! `kha`: run the agent, show the datapath's state, or remove it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kha::{
    config::Config,
    endpoints::Desired,
    loader::{self, DEFAULT_PIN_DIR, PinDir},
    maps::KhaMaps,
    status,
    sync::{BackendTable as _, sync},
};
use kha_common::DatapathConfig;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "kha", version, about = "Node-local Kubernetes apiserver load balancer in the kernel")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath and keep its maps current until SIGTERM/SIGINT (the datapath stays).
    Run(RunArgs),
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
    /// cgroup v2 directory to attach to [default: the cgroup v2 mount point].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Network namespace whose sockets are rewritten (e.g. /run/netns/NAME) [default: the agent's own].
    #[arg(long)]
    netns: Option<PathBuf>,
    /// How often the maps are checked against the config and repaired.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    resync_interval: u64,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Status { pin_dir, output } => show_status(&pin_dir, output),
        Command::Detach { pin_dir } => detach(&pin_dir),
    };
    if let Err(e) = result {
        eprintln!("kha: error: {e:#}");
        std::process::exit(1);
    }
}

fn load_config(args: &RunArgs) -> Result<Config> {
    Ok(match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::from_flags(&args.frontend, &args.backend)?,
    })
}

fn run(args: RunArgs) -> Result<()> {
    // Everything that can be wrong with the input is refused before the kernel is touched.
    let config = load_config(&args)?;
    for f in config.frontends.iter().filter(|f| f.backends.is_empty()) {
        log::warn!("frontend {} has no backends: connects to it fail with EHOSTUNREACH", f.address);
    }
    loader::kernel_supported()?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => loader::default_cgroup()?,
    };
    let cgroup_id = loader::cgroup_id(&cgroup)?;
    let netns_cookie = loader::netns_cookie(args.netns.as_deref())?;
    let pins = PinDir::new(&args.pin_dir);
    loader::ensure_bpffs(&pins.root)?;
    pins.create()?;
    let _lock = loader::lock_pin_dir(&pins.root)?;

    let mut loaded = loader::load(&pins)?;
    loaded.preflight(&pins, &cgroup, cgroup_id)?;
    let mut maps = KhaMaps::open_pinned(&pins.maps())?;
    maps.set_datapath_config(&DatapathConfig { netns_cookie, cgroup_id })?;
    let report = sync(&mut maps, &Desired::from_config(&config))?;
    let attached = loaded.attach(&pins, &cgroup, cgroup_id)?;
    // The links hold the programs now; the loader's handles can go.
    drop(loaded);
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

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(agent_loop(args, config, maps))?;
    log::info!("stopping; the datapath stays attached and keeps balancing (`kha detach` removes it)");
    Ok(())
}

/// The map writer: the only task that writes the maps. It re-applies the config on SIGHUP
/// (re-reading --config) and on a timer, which repairs maps someone else changed.
async fn agent_loop(args: RunArgs, mut config: Config, mut maps: KhaMaps) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(args.resync_interval.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => match load_config(&args) {
                Ok(c) => {
                    log::info!("SIGHUP: config reloaded");
                    config = c;
                }
                Err(e) => log::error!("SIGHUP: keeping the running config: {e:#}"),
            },
            _ = tick.tick() => {}
        }
        match sync(&mut maps, &Desired::from_config(&config)) {
            Ok(r) if r.writes > 0 => {
                log::warn!("resync: {} map writes (maps differed from the config)", r.writes)
            }
            Ok(_) => {}
            Err(e) => log::error!("resync failed, will retry: {e:#}"),
        }
    }
}

fn show_status(pin_dir: &Path, output: Output) -> Result<()> {
    let pins = PinDir::new(pin_dir);
    if !pins.root.exists() {
        bail!("nothing under {}: kha is not attached with this --pin-dir", pins.root.display());
    }
    let maps = KhaMaps::open_pinned(&pins.maps())?;
    let snapshot = maps.snapshot()?;
    let s = status::build(
        &pins.root.display().to_string(),
        &snapshot,
        &maps.datapath_config()?,
        loader::link_status(&pins),
        maps.stats()?,
    );
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Text => print!("{}", status::render_text(&s)),
    }
    Ok(())
}

fn detach(pin_dir: &Path) -> Result<()> {
    let pins = PinDir::new(pin_dir);
    let _lock = if pins.root.exists() { Some(loader::lock_pin_dir(&pins.root)?) } else { None };
    let d = loader::detach(&pins).with_context(|| format!("detaching {}", pins.root.display()))?;
    println!("detached: {} links and {} maps removed from {}", d.links, d.maps, pins.root.display());
    Ok(())
}
