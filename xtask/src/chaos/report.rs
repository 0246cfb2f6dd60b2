//! `target/chaos/chaos-<seed>.{md,json}`: the table of events and outcomes, the invariants
//! with their violations, and the agent's fds and RSS.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    invariants::{ALL, FD_SLACK, Incarnation, RSS_SLACK_KB, Violation, WARMUP},
    settings::{Settings, Windows},
};

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub idx: usize,
    pub t_s: f64,
    pub took_s: f64,
    pub kind: &'static str,
    pub target: String,
    pub params: String,
    pub outcome: String,
    pub violations: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub loop_requests: usize,
    pub loop_failed: usize,
    pub long_lived_requests: usize,
    pub long_lived_errors: usize,
    pub conn_map_max: usize,
    pub samples: usize,
    pub quiet_checks: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub profile: &'static str,
    pub duration_s: f64,
    pub settings: Settings,
    pub windows: Windows,
    pub events: Vec<Row>,
    pub violations: Vec<Violation>,
    /// Observations that are no violation (kha's design), listed to be seen.
    pub notes: Vec<Violation>,
    pub agents: Vec<Incarnation>,
    /// The longest-lived agent's fds by kind at its first and its latest quiet point.
    pub agent_fds: Vec<(u32, BTreeMap<String, usize>)>,
    pub totals: Totals,
}

impl Report {
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m: BTreeMap<&'static str, usize> = ALL.iter().map(|i| (*i, 0)).collect();
        for v in &self.violations {
            *m.entry(v.invariant).or_default() += 1;
        }
        m
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Chaos soak, seed {} ({}, {:.0} s)\n\nReplay: `cargo xtask chaos --seed {}{}`.\n",
            self.seed,
            self.profile,
            self.duration_s,
            self.seed,
            if self.profile == "quick" { " --quick" } else { "" }
        );
        let st = &self.settings;
        let w = &self.windows;
        let _ = writeln!(
            s,
            "kha: probe interval {} ms, timeout {} ms, rise {}, fall {}, drain {} s. Detection windows \
             (margin {:.1} s included): killed {:.1} s, hung {:.1} s, blackholed {:.1} s, not ready {:.1} s, \
             removed {:.1} s.\n",
            st.probe_interval_ms,
            st.probe_timeout_ms,
            st.rise,
            st.fall,
            st.drain_s,
            w.margin_ms as f64 / 1e3,
            w.kill_ms as f64 / 1e3,
            w.hang_ms as f64 / 1e3,
            w.blackhole_ms as f64 / 1e3,
            w.not_ready_ms as f64 / 1e3,
            w.removed_ms as f64 / 1e3
        );
        let _ = writeln!(s, "| # | t (s) | event | target | parameters | outcome | violations |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for r in &self.events {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {} | {} | {} | {} | {} |",
                r.idx,
                r.t_s,
                r.kind,
                r.target,
                r.params,
                r.outcome.replace('|', "/"),
                r.violations
            );
        }
        let _ = writeln!(s, "\n## Invariants\n\n| invariant | violations |\n|---|---|");
        for (k, n) in self.counts() {
            let _ = writeln!(s, "| {k} | {} |", if n == 0 { "0".to_string() } else { format!("**{n}**") });
        }
        if !self.violations.is_empty() {
            let _ =
                writeln!(s, "\n## Violations\n\n| t (s) | event | invariant | detail |\n|---|---|---|---|");
            for v in &self.violations {
                let ev = v.event.map_or("-".into(), |e| e.to_string());
                let _ =
                    writeln!(s, "| {:.1} | {ev} | {} | {} |", v.t_s, v.invariant, v.detail.replace('|', "/"));
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(
                s,
                "\n## Notes (not violations)\n\n| t (s) | event | note | detail |\n|---|---|---|---|"
            );
            for v in &self.notes {
                let ev = v.event.map_or("-".into(), |e| e.to_string());
                let _ =
                    writeln!(s, "| {:.1} | {ev} | {} | {} |", v.t_s, v.invariant, v.detail.replace('|', "/"));
            }
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "\n## Load and samples\n\nconnect loop: {} requests, {} failed (each explained or listed above); \
             long-lived: {} requests, {} errors; KHA_CONNS at most {} entries; {} samples, {} quiet-point checks.",
            t.loop_requests,
            t.loop_failed,
            t.long_lived_requests,
            t.long_lived_errors,
            t.conn_map_max,
            t.samples,
            t.quiet_checks
        );
        let _ = writeln!(
            s,
            "\n## Agent fds and RSS\n\nPer agent process, from {} s after its first sample on; flat means \
             it ends (the smallest of its last 2 s of samples) at most {FD_SLACK} fds and {} MiB above \
             the first value; peaks that come back down are notes.\n\n| pid | seconds | fds first/last/max/end | RSS MiB first/last/max/end |\n|---|---|---|---|",
            WARMUP.as_secs(),
            RSS_SLACK_KB / 1024
        );
        let mib = |k: u64| k as f64 / 1024.0;
        for a in &self.agents {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {}/{}/{}/{} | {:.1}/{:.1}/{:.1}/{:.1} |",
                a.pid,
                a.secs,
                a.first.0,
                a.last.0,
                a.max.0,
                a.level.0,
                mib(a.first.1),
                mib(a.last.1),
                mib(a.max.1),
                mib(a.level.1)
            );
        }
        for (i, (pid, kinds)) in self.agent_fds.iter().enumerate() {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let when = if i == 0 { "first quiet point" } else { "last quiet point" };
            let _ = writeln!(s, "\nfds of agent {pid} at its {when}: {}", list.join(", "));
        }
        s
    }

    /// Writes both files; returns the markdown's path.
    pub fn write(&self, dir: &Path) -> Result<std::path::PathBuf> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("chaos-{}.json", self.seed));
        let md = dir.join(format!("chaos-{}.md", self.seed));
        fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        fs::write(&md, self.markdown()).with_context(|| format!("writing {}", md.display()))?;
        Ok(md)
    }
}
