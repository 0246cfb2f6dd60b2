//! `kha-lab`: run a simulated master, or a client against masters.
//!
//! Exit status of `client` and `connect`: 0 when every request/attempt
//! succeeded, 3 when some failed (the output says which), 1 when the run
//! could not start (bad CA file, ...), 2 for usage errors.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

use kha_lab::client::{self, ClientOptions, HttpsUrl, Reuse};
use kha_lab::connect::{self, ConnectOptions};
use kha_lab::master::{self, MasterConfig};
use kha_lab::{http, tls};
use kha_lab::{load, mode};

/// Upper bound on --count, so a typo cannot start an endless run.
const MAX_COUNT: u64 = 1_000_000;
const SOME_FAILED: u8 = 3;

#[derive(Parser)]
#[command(name = "kha-lab", about = "Simulated kube-apiserver masters and clients for testing kha")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve /readyz, /livez, /healthz and /version over TLS like kube-apiserver.
    Master(MasterArgs),
    /// Make N HTTPS GET requests and report which master answered each.
    Client(ClientArgs),
    /// Make N raw TCP connects and report errno, getpeername and getsockname.
    Connect(ConnectArgs),
    /// Benchmark load, bounded in count and time; prints one JSON report (kha_lab::load).
    Load(LoadArgs),
}

#[derive(Args)]
struct MasterArgs {
    /// Name sent in the X-Kha-Lab-Master header and on identity ports.
    #[arg(long)]
    name: String,
    /// TLS listen address, e.g. 192.0.2.11:6443 or [2001:db8::11]:6443 (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Plain-TCP identity listener that writes "<name>\n" and closes (repeatable).
    #[arg(long)]
    ident_listen: Vec<SocketAddr>,
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// File holding the failure mode (normal, readyz-500, hang): re-read on
    /// SIGHUP and every 100 ms; the applied mode is written to <FILE>.applied.
    #[arg(long)]
    control_file: Option<PathBuf>,
    /// Also write the ready announcement to this file (atomically).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Close connections that send no complete request for this long.
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
}

#[derive(Args)]
struct ClientArgs {
    /// https:// URL; its host is the TLS server name (SNI and verification).
    #[arg(long, default_value = "https://localhost:6443/version")]
    url: String,
    /// CA certificate (PEM) to trust.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    count: u64,
    /// Pause between requests.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Deadline for each request, connect and TLS handshake included.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// A new TCP+TLS connection per request (the default).
    #[arg(long, conflicts_with = "keep_alive")]
    new_connection_each: bool,
    /// Reuse one connection while it stays healthy.
    #[arg(long)]
    keep_alive: bool,
    /// TCP destination overriding the URL host, e.g. [::1]:6443.
    #[arg(long)]
    connect_addr: Option<SocketAddr>,
    /// Send `OPTIONS *` instead of GET of the URL's path.
    #[arg(long)]
    options_star: bool,
    /// One JSON object per line (schema: kha_lab::client module docs).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConnectArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    count: u64,
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Deadline for each attempt (connect plus identity read).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Read the "<name>\n" line a master's identity port sends.
    #[arg(long)]
    read_ident: bool,
    /// One JSON object per line (schema: kha_lab::connect module docs).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LoadArgs {
    #[arg(value_enum)]
    mode: load::Mode,
    /// Address to dial (repeatable: each operation picks one at random).
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    /// Workers, each with one operation in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Stop after this many operations...
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// ...or after this long.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Deadline for one operation (bulk: the whole transfer).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// CA certificate (PEM) to trust; needed by https, keepalive and bulk.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name for every target.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long, default_value = "/version")]
    path: String,
    /// https: share a session cache and resume sessions.
    #[arg(long)]
    resume: bool,
    /// bulk: bytes to fetch.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run on this CPU only.
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() -> anyhow::Result<ExitCode> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // The load generator makes its own threads and runtimes, outside this one.
    let command = match cli.command {
        Cmd::Load(args) => return run_load(args),
        other => other,
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        match command {
            Cmd::Master(args) => run_master(args).await.map(|()| ExitCode::SUCCESS),
            Cmd::Client(args) => run_client(args).await,
            Cmd::Connect(args) => run_connect(args).await,
            Cmd::Load(_) => unreachable!("handled before the runtime starts"),
        }
    })
}

async fn run_master(args: MasterArgs) -> anyhow::Result<()> {
    let tls = tls::server_config_from_files(&args.cert, &args.key).context("loading certificate and key")?;
    // Handlers go in before binding: once we announce readiness a controller
    // may send SIGHUP, whose default action would kill us.
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let mut config = MasterConfig::new(args.name.clone(), tls);
    config.listen = args.listen;
    config.ident_listen = args.ident_listen;
    config.timeouts.idle = Duration::from_millis(args.idle_timeout_ms);
    if let Some(control) = &args.control_file {
        config.initial_mode = mode::read_control(control).context("reading control file")?;
    }
    let initial = config.initial_mode;
    let master = master::start(config).await.context("starting master")?;
    if let Some(control) = &args.control_file {
        mode::write_applied(control, initial).context("acknowledging initial mode")?;
    }

    let mut announcement = String::from("ready\n");
    for addr in master.https_addrs() {
        announcement.push_str(&format!("https {addr}\n"));
    }
    for addr in master.ident_addrs() {
        announcement.push_str(&format!("ident {addr}\n"));
    }
    if let Some(path) = &args.ready_file {
        mode::replace_file(path, &announcement).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(announcement.as_bytes())
        .and_then(|()| stdout.flush())
        .context("announcing readiness")?;
    drop(stdout);
    info!("{} ready, mode {initial}", args.name);

    let mut poll = tokio::time::interval(mode::POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&master, args.control_file.as_deref()),
            _ = poll.tick() => reload(&master, args.control_file.as_deref()),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("{} shutting down", args.name);
    master.shutdown().await;
    Ok(())
}

fn reload(master: &master::RunningMaster, control: Option<&Path>) {
    let Some(control) = control else { return };
    match mode::read_control(control) {
        Ok(new) if new != master.mode() => {
            master.set_mode(new);
            info!("{}: mode {new}", master.name());
            if let Err(e) = mode::write_applied(control, new) {
                warn!("{}: {:#}", master.name(), anyhow::Error::new(e));
            }
        }
        Ok(_) => {}
        Err(e) => warn!("{}: keeping mode {}: {:#}", master.name(), master.mode(), anyhow::Error::new(e)),
    }
}

fn print_line(json: bool, value: impl serde::Serialize + std::fmt::Display) {
    if json {
        // Serializing plain records cannot fail; fall back to text if it does.
        match serde_json::to_string(&value) {
            Ok(line) => println!("{line}"),
            Err(_) => println!("{value}"),
        }
    } else {
        println!("{value}");
    }
}

async fn run_client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let url = HttpsUrl::parse(&args.url)?;
    let tls = tls::client_config_from_ca_file(&args.ca).context("loading CA")?;
    let opts = ClientOptions {
        url,
        connect_addr: args.connect_addr,
        count: args.count,
        interval: Duration::from_millis(args.interval_ms),
        timeout: Duration::from_millis(args.timeout_ms),
        reuse: if args.keep_alive { Reuse::KeepAlive } else { Reuse::NewConnectionEach },
        tls,
        limits: http::Limits::default(),
        options_star: args.options_star,
    };
    let summary = client::run(&opts, |r| print_line(args.json, r)).await;
    let failed = summary.failed;
    print_line(args.json, Wrapped { summary });
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(SOME_FAILED) })
}

async fn run_connect(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions {
        addr: args.addr,
        count: args.count,
        interval: Duration::from_millis(args.interval_ms),
        timeout: Duration::from_millis(args.timeout_ms),
        read_ident: args.read_ident,
    };
    let summary = connect::run(&opts, |r| print_line(args.json, r)).await;
    let failed = summary.failed;
    print_line(args.json, Wrapped { summary });
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(SOME_FAILED) })
}

fn run_load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let tls = match &args.ca {
        Some(ca) => Some(tls::client_config_from_ca_file(ca).context("loading CA")?),
        None => None,
    };
    let opts = load::LoadOptions {
        mode: args.mode,
        targets: args.targets,
        concurrency: args.concurrency,
        count: args.count,
        duration: Duration::from_millis(args.duration_ms),
        timeout: Duration::from_millis(args.timeout_ms),
        server_name: args.server_name,
        path: args.path,
        resume: args.resume,
        bytes: args.bytes,
        tls,
        seed: args.seed,
        cpu: args.cpu,
    };
    let report = load::run(&opts)?;
    println!("{}", serde_json::to_string(&report).context("encoding the report")?);
    Ok(if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(SOME_FAILED) })
}

/// Serializes as `{"summary": ...}`, displays as the summary's text.
#[derive(serde::Serialize)]
struct Wrapped<T> {
    summary: T,
}

impl<T: std::fmt::Display> std::fmt::Display for Wrapped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.summary.fmt(f)
    }
}
