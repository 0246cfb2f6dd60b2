//! The `kha top` command: samples `KHA_CLIENTS` every `--interval`, prints the table (a live
//! view, redrawn like `top`) or, with `-o json`, one JSON document from two samples.

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{cgroups::Resolver, rank, rate, render};
use crate::{
    loader::{DEFAULT_PIN_DIR, PinDir},
    maps::{MapsError, clients::samples},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// `kha top`: the clients of the apiserver on this node, busiest first.
#[derive(Clone, Debug, clap::Args)]
pub struct TopArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// `json`: one document (rates over one interval), for scripts.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Seconds between samples (the rates' window), 0.05 to 3600.
    #[arg(long, default_value = "2", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print one refresh and exit (always so with `-o json`).
    #[arg(long)]
    pub once: bool,
    /// Show the busiest N clients; the rest are summed as "other" [default: 20 in the table,
    /// all in JSON].
    #[arg(long)]
    pub top: Option<usize>,
    /// The cgroup v2 mount the cgroup ids are looked up in [default: the first cgroup2 mount].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("not a number of seconds: {s:?}"))?;
    if !(0.05..=3600.0).contains(&secs) {
        return Err(format!("{secs} s is outside 0.05..=3600"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("nothing under {0}: kha is not attached with this --pin-dir")]
    NotAttached(PathBuf),
    #[error(
        "no {0}: the attached kha predates per-client counters. Fix: restart the agent with this build (it migrates the maps)"
    )]
    NoClientMap(PathBuf),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("no cgroup v2 hierarchy is mounted to look cgroup ids up in; pass --cgroup-root")]
    NoCgroup2,
    #[error("cannot read /proc/mounts")]
    Mounts(#[source] std::io::Error),
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// Runs the command until it is done (`--once`, `-o json`) or killed.
pub fn run(args: &TopArgs) -> Result<(), TopError> {
    let pins = PinDir::new(&args.pin_dir);
    if !pins.root.exists() {
        return Err(TopError::NotAttached(pins.root));
    }
    let clients_map = pins.maps().join(kha_common::MAP_CLIENTS);
    if !clients_map.exists() {
        return Err(TopError::NoClientMap(clients_map));
    }
    let mount = match &args.cgroup_root {
        Some(p) => p.clone(),
        None => kha_common::cgroup::cgroup2_mount().map_err(TopError::Mounts)?.ok_or(TopError::NoCgroup2)?,
    };
    let mut resolver = Resolver::new(mount);
    let json = args.output == Format::Json;
    let n = args.top.unwrap_or(if json { usize::MAX } else { 20 });
    let live = !json && !args.once && std::io::stdout().is_terminal();
    let mut before = None;
    let mut last = Instant::now();
    if json || args.once {
        before = Some(samples(&pins.maps())?);
        std::thread::sleep(args.interval);
    }
    loop {
        let after = samples(&pins.maps())?;
        let interval_s = if before.is_some() { last.elapsed().as_secs_f64() } else { 0.0 };
        last = Instant::now();
        let clients = rate::clients(before.as_deref(), &after, interval_s);
        let paths = resolver.resolve(clients.iter().map(|c| c.cgroup_id));
        let (top, other) = rank::top(clients, n);
        let view = render::view(top, other, &paths, interval_s);
        let text = if json {
            let mut s = serde_json::to_string_pretty(&view).unwrap_or_default();
            s.push('\n');
            s
        } else {
            let clear = if live { "\x1b[H\x1b[2J" } else { "" };
            format!("{clear}{}", render::table(&view, width()))
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(TopError::Output)?;
        if json || args.once {
            return Ok(());
        }
        before = Some(after);
        std::thread::sleep(args.interval);
    }
}

/// The terminal's width, or wide enough for any line when not a terminal.
fn width() -> usize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct passed.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 { ws.ws_col as usize } else { 1000 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_bounded() {
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("1e9").is_err());
        assert!(parse_interval("NaN").is_err());
        assert!(parse_interval("soon").unwrap_err().contains("soon"));
    }
}
