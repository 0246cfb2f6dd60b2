//! `cargo xtask demo`: the built-in lab (3 simulated masters in network namespaces, a node
//! namespace and cgroup where kha runs) and a client calling `https://localhost:6443/version`
//! through kha, showing which master answered each call. Everything is removed on exit,
//! Ctrl-C or failure. With `--config FILE` it runs kha on this node instead.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::bed::Bed;
use serde_json::Value;

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct DemoArgs {
    // Fields are public so `cargo xtask test` can run a short demo as a smoke test.
    /// Run kha on this node with this config file instead of the lab (as `cargo xtask run`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Calls per frontend the demo client makes.
    #[arg(long, default_value_t = 24)]
    pub requests: u32,
    /// Pause between calls.
    #[arg(long, default_value_t = 150)]
    pub interval_ms: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn demo(args: DemoArgs) -> Result<()> {
    if let Some(config) = args.config {
        return crate::run(vec!["--config".into(), config.display().to_string()]);
    }
    setup::setup()?;
    cmd::require_root("the demo lab creates network namespaces and attaches eBPF programs")?;
    cmd::build_debug()?;
    // Ctrl-C reaches the whole process group: the client and agent stop by themselves, and
    // this process must live on to remove the lab.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!("== building the lab: a node namespace and 3 masters (TLS, /readyz /livez /healthz /version)");
    let mut bed = Bed::create(3).context("building the demo lab")?;
    for m in bed.lab.masters() {
        println!("   {}  {:<16} {}", m.name, m.https_v4(), m.https_v6());
    }
    let mut agent_args: Vec<String> =
        ["--frontend", "127.0.0.1:6443", "--frontend", "[::1]:6443"].map(String::from).to_vec();
    for m in bed.lab.masters() {
        agent_args.extend(["--backend".into(), m.https_v4().to_string()]);
    }
    // The probes verify the masters against the lab's CA, as a node's agent does with the
    // cluster CA.
    agent_args.extend(["--ca-file".into(), bed.pki.ca_cert.display().to_string()]);
    println!("\n== starting kha: kha run {}", agent_args.join(" "));
    bed.start_agent(&agent_args).context("starting kha")?;
    println!("{}", String::from_utf8_lossy(&bed.kha(&["status"]).stdout));

    let mut spread: BTreeMap<String, u32> = BTreeMap::new();
    let mut failed = 0;
    for dial in ["127.0.0.1:6443", "[::1]:6443"] {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        println!("== a client on the node calls https://localhost:6443/version, dialing {dial}");
        failed += calls(&bed, dial, &args, &mut spread)?;
    }
    println!("\n== how the calls spread over the masters");
    let total: u32 = spread.values().sum();
    for (master, n) in &spread {
        let pct = 100 * n / total.max(1);
        println!("   {master:<10} {n:>4}  {:<40} {pct}%", "#".repeat((pct as usize * 40 / 100).max(1)));
    }
    println!("\n{}", String::from_utf8_lossy(&bed.kha(&["status"]).stdout));
    println!("== removing the lab (kha detach, namespaces, cgroup)");
    drop(bed);
    println!("   done");
    if failed > 0 {
        bail!("{failed} calls failed");
    }
    Ok(())
}

/// Runs the lab client, prints one line per call as it happens, and returns how many failed.
fn calls(bed: &Bed, dial: &str, args: &DemoArgs, spread: &mut BTreeMap<String, u32>) -> Result<u32> {
    let ca = bed.pki.ca_cert.display().to_string();
    let tool_args: Vec<String> = [
        "client",
        "--url",
        "https://localhost:6443/version",
        "--connect-addr",
        dial,
        "--ca",
        &ca,
        "--count",
        &args.requests.to_string(),
        "--interval-ms",
        &args.interval_ms.to_string(),
        "--new-connection-each",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    let mut child = bed.spawn_lab_tool(true, &tool_args)?;
    let mut failed = 0;
    let stdout = child.stdout.take().context("client stdout")?;
    for line in BufReader::new(stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        if v.get("summary").is_some() {
            continue;
        }
        let master = v["master"].as_str().unwrap_or("-").to_string();
        let outcome = match v["error"].as_str() {
            None => format!("{} answered by {master}", v["status"]),
            Some(e) => format!("FAILED {e}"),
        };
        println!(
            "   call {:>3}  peer (getpeername) {:<16} {outcome:<24} {:>6.2} ms",
            v["seq"].as_u64().unwrap_or(0) + 1,
            v["peer"].as_str().unwrap_or("-"),
            v["latency_ms"].as_f64().unwrap_or(0.0)
        );
        if v["error"].is_null() {
            *spread.entry(master).or_default() += 1;
        } else {
            failed += 1;
        }
        if STOP.load(Ordering::SeqCst) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(failed)
}
