//! `cargo xtask chaos`: a bounded chaos soak of kha in front of three simulated masters.
//!
//! Random sequences (from `--seed`) of master kill, hang, blackhole, short pause, `/readyz`
//! flaps and sustained not-ready, all masters down, agent SIGKILL and restart, SIGHUP config
//! changes (a backend removed and re-added, the policy changed) and program upgrades, under a
//! connect loop and long-lived clients; the invariants of [`invariants`] and [`quiet`] are
//! judged over the whole run and reported in `target/chaos/chaos-<seed>.{md,json}`.
//!
//! [`plan`] decides the events, [`settings`] kha's settings and the detection windows,
//! [`world`] the lab and what is read of it, [`events`] acts, [`sampler`] samples every
//! 200 ms, [`run`] runs it all, [`report`] writes the table. docs/testing.md, "Chaos soak".

mod events;
mod invariants;
mod plan;
mod quiet;
mod report;
mod run;
mod sampler;
mod settings;
mod wait;
mod world;

use std::time::Duration;

use anyhow::{Result, bail};

use crate::cmd;

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Seed of the event sequence (printed at the start; default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long events are started for, e.g. `10m`, `90s` (default 10m).
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub duration: Duration,
    /// Every event kind once, in about 90 s (for CI); ignores --duration.
    #[arg(long)]
    pub quick: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: a number and s, m or h, e.g. 10m"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if secs == 0 || secs > 24 * 3600 {
        return Err(format!("{s:?}: between 1 s and 24 h"));
    }
    Ok(Duration::from_secs(secs))
}

impl ChaosArgs {
    pub fn quick() -> ChaosArgs {
        ChaosArgs { seed: None, duration: Duration::from_secs(90), quick: true }
    }
}

/// Builds, runs the soak, writes the report; an error names every violated invariant.
pub fn chaos(args: ChaosArgs) -> Result<()> {
    crate::setup::setup()?;
    cmd::require_root("the chaos soak creates network namespaces and attaches eBPF programs")?;
    cmd::build_debug()?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64)
    });
    eprintln!(
        "xtask: chaos: seed {seed} ({}); replay with --seed {seed}",
        if args.quick { "quick: every event kind once".to_string() } else { format!("{:?}", args.duration) }
    );
    wait::catch_signals();
    let report = run::soak(&run::Options { seed, quick: args.quick, duration: args.duration })?;
    let md = report.write(&cmd::target_dir().join("chaos"))?;
    println!("{}", report.markdown());
    println!("written: {} and .json", md.display());
    let bad: Vec<String> =
        report.counts().into_iter().filter(|(_, n)| *n > 0).map(|(k, n)| format!("{k} ({n})")).collect();
    if !bad.is_empty() {
        bail!("chaos seed {seed}: invariants violated: {}; see {}", bad.join(", "), md.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("m").is_err());
    }
}
