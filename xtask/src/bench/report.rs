//! The results: JSON (everything, per round), a markdown table, the goals, and the check
//! that every figure was produced for every contender.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    figures::{
        Better, Contender, DIRECT, Figure, KHA, Kind, Stat, Values, catalog, main_contenders,
        scale_contenders,
    },
    machine::Machine,
};

pub const JSON: &str = "results.json";
pub const MARKDOWN: &str = "results.md";
pub const PLOT: &str = "results.svg";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FigureResult {
    #[serde(flatten)]
    pub figure: Figure,
    /// contender -> median/min/max over rounds; `null` when it was not produced.
    pub results: BTreeMap<String, Option<Stat>>,
    /// contender -> median / direct's median.
    pub ratio_to_direct: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub goal: String,
    pub figure: String,
    pub kha: Option<f64>,
    pub direct: Option<f64>,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub profile: String,
    pub rounds: usize,
    pub duration_s: f64,
    pub machine: Machine,
    pub settings: BTreeMap<String, String>,
    pub contenders: Vec<Contender>,
    pub scale_contenders: Vec<Contender>,
    pub figures: Vec<FigureResult>,
    pub goals: Vec<Goal>,
    /// "figure/contender" -> error -> count of failed operations.
    pub errors: BTreeMap<String, BTreeMap<String, u64>>,
    /// contender -> answers per master in `https_full_c16`.
    pub spread: BTreeMap<String, String>,
    /// Load runs repeated because other processes used the CPU, and runs still disturbed.
    pub repeated_runs: u64,
    pub disturbed_runs: u64,
    /// kha's programs during HTTPS c=128: name -> (runs per connection, ns per run), medians.
    pub kha_programs: BTreeMap<String, (f64, f64)>,
}

impl Report {
    pub fn build(
        profile: &str,
        rounds: usize,
        duration_s: f64,
        machine: Machine,
        settings: BTreeMap<String, String>,
        values: &Values,
        spread: BTreeMap<String, String>,
    ) -> Report {
        let figures: Vec<FigureResult> = catalog()
            .into_iter()
            .map(|f| {
                let results: BTreeMap<String, Option<Stat>> =
                    f.contenders.iter().map(|c| (c.clone(), values.get(&f.id, c))).collect();
                let direct = values.get(&f.id, DIRECT);
                let ratio_to_direct = f
                    .contenders
                    .iter()
                    .map(|c| {
                        let r = results
                            .get(c)
                            .cloned()
                            .flatten()
                            .zip(direct.clone())
                            .and_then(|(s, d)| paired(&s, &d, |a, b| a / b));
                        (c.clone(), r)
                    })
                    .collect();
                FigureResult { figure: f, results, ratio_to_direct }
            })
            .collect();
        let goals = goals(&figures);
        Report {
            profile: profile.into(),
            rounds,
            duration_s,
            machine,
            settings,
            contenders: main_contenders(),
            scale_contenders: scale_contenders(),
            figures,
            goals,
            errors: values.errors.clone(),
            spread,
            repeated_runs: values.repeated,
            disturbed_runs: values.disturbed,
            kha_programs: values
                .programs
                .iter()
                .map(|(k, v)| {
                    let med = |f: fn(&(f64, f64)) -> f64| {
                        Stat::of(&v.iter().map(f).collect::<Vec<_>>()).map_or(0.0, |s| s.median)
                    };
                    (k.clone(), (med(|p| p.0), med(|p| p.1)))
                })
                .collect(),
        }
    }

    pub fn figure(&self, id: &str) -> Option<&FigureResult> {
        self.figures.iter().find(|f| f.figure.id == id)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join(JSON), serde_json::to_string_pretty(self)?).context("writing results.json")?;
        fs::write(dir.join(MARKDOWN), self.markdown()).context("writing results.md")?;
        super::plot::draw(&dir.join(PLOT), self).context("drawing the plot")?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "# kha benchmark: {} run, {}\n", self.profile, self.machine.date);
        let _ = writeln!(m, "Machine: {}.\n", self.machine.one_line());
        let _ = writeln!(
            m,
            "{} interleaved rounds, {:.0} s. Each cell: median over the rounds [min–max], then ×: the median over the rounds of \
             the ratio to `direct` in the same round. {} load runs were repeated because other processes used the CPU \
             meanwhile; {} stayed disturbed after 3 attempts. Settings: {}.\n",
            self.rounds,
            self.duration_s,
            self.repeated_runs,
            self.disturbed_runs,
            self.settings.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
        let table = |m: &mut String, contenders: &[Contender], sections: &[&str]| {
            let _ = write!(m, "| figure | unit |");
            for c in contenders {
                let _ = write!(m, " {} |", c.label);
            }
            let _ = write!(m, "\n|---|---|");
            for _ in contenders {
                let _ = write!(m, "---|");
            }
            m.push('\n');
            for f in self.figures.iter().filter(|f| sections.contains(&f.figure.section.as_str())) {
                let better = match f.figure.better {
                    Better::Lower => "↓",
                    Better::Higher => "↑",
                };
                let _ = write!(m, "| {} | {} {better} |", f.figure.label.trim(), f.figure.unit);
                for c in contenders {
                    let cell = if !f.figure.contenders.contains(&c.id) {
                        "–".to_owned()
                    } else {
                        match f.results.get(&c.id).cloned().flatten() {
                            None => "**missing**".to_owned(),
                            Some(s) => {
                                let ratio = f
                                    .ratio_to_direct
                                    .get(&c.id)
                                    .copied()
                                    .flatten()
                                    .filter(|_| c.id != DIRECT);
                                let mut cell = format!("{} [{}–{}]", num(s.median), num(s.min), num(s.max));
                                if let Some(r) = ratio {
                                    let _ = write!(cell, " ×{r:.2}");
                                }
                                cell
                            }
                        }
                    };
                    let _ = write!(m, " {cell} |");
                }
                m.push('\n');
            }
            m.push('\n');
        };
        let _ = writeln!(m, "## Latency, rates, throughput\n");
        table(&mut m, &self.contenders, &["latency", "https", "bulk"]);
        let _ = writeln!(m, "## What the load balancer itself costs\n");
        let _ = writeln!(
            m,
            "kha: the agent's CPU plus the kernel's run time of kha's programs (`kernel.bpf_stats_enabled`); memory: the \
             agent's RSS plus the memlock of kha's maps and programs. nginx: master and workers. haproxy: its process.\n"
        );
        let lbs: Vec<Contender> =
            self.contenders.iter().filter(|c| c.lb != super::figures::Lb::None).cloned().collect();
        table(&mut m, &lbs, &["cost"]);
        if !self.kha_programs.is_empty() {
            let _ = writeln!(
                m,
                "kha's programs during HTTPS c=128 (medians over rounds):\n\n| program | runs per connection | ns per run |\n|---|---|---|"
            );
            for (name, (runs, ns)) in &self.kha_programs {
                let _ = writeln!(m, "| {name} | {} | {} |", num(*runs), num(*ns));
            }
            m.push('\n');
        }
        let _ = writeln!(m, "## How cost grows with backends and frontends\n");
        table(&mut m, &self.scale_contenders, &["scaling"]);
        let _ = writeln!(
            m,
            "## Goals\n\n| goal | figure | kha | direct | measured | met |\n|---|---|---|---|---|---|"
        );
        for g in &self.goals {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} |",
                g.goal,
                g.figure,
                g.kha.map_or("–".into(), num),
                g.direct.map_or("–".into(), num),
                g.measured,
                if g.met { "yes" } else { "**no**" }
            );
        }
        let _ = writeln!(
            m,
            "\n## Spread over the masters (HTTPS, new connections, c=16)\n\n| contender | answers |\n|---|---|"
        );
        for c in &self.contenders {
            let _ = writeln!(m, "| {} | {} |", c.label, self.spread.get(&c.id).map_or("–", String::as_str));
        }
        if !self.errors.is_empty() {
            let _ = writeln!(m, "\n## Failed operations\n\n| figure/contender | errors |\n|---|---|");
            for (k, e) in &self.errors {
                let _ = writeln!(
                    m,
                    "| {k} | {} |",
                    e.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
                );
            }
        }
        m
    }
}

/// The median over rounds of `op(contender, direct)` taken round by round: runs of one round
/// are close in time, so this cancels what drifts between rounds. Falls back to the
/// medians when a round is missing on one side.
fn paired(s: &Stat, direct: &Stat, op: impl Fn(f64, f64) -> f64) -> Option<f64> {
    let ok = |v: f64| v.is_finite().then_some(v);
    if s.rounds.len() == direct.rounds.len() && !s.rounds.is_empty() {
        let per_round: Vec<f64> = s.rounds.iter().zip(&direct.rounds).map(|(&a, &b)| op(a, b)).collect();
        Stat::of(&per_round).and_then(|p| ok(p.median))
    } else {
        ok(op(s.median, direct.median))
    }
}

/// A number with as many digits as its size deserves.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{v:.3}")
    }
}

/// The memory figures and their goal: the agent's RSS plus its maps' and programs' memlock.
const MEMORY_FIGURES: [&str; 2] = ["rss_idle", "rss_load"];
const MEMORY_GOAL_MIB: f64 = 10.0;

/// kha against the goals: within 3 % of direct on every rate and throughput, within 1 µs
/// of direct on connect latency, at most 10 MiB of memory.
fn goals(figures: &[FigureResult]) -> Vec<Goal> {
    let mut v = Vec::new();
    for f in figures {
        let kha_id = f.figure.contenders.iter().find(|c| c.starts_with(KHA)).cloned();
        let Some(kha_id) = kha_id else { continue };
        let kha_stat = f.results.get(&kha_id).cloned().flatten();
        let direct_stat = f.results.get(DIRECT).cloned().flatten();
        let kha = kha_stat.as_ref().map(|s| s.median);
        let direct = direct_stat.as_ref().map(|s| s.median);
        let both = kha_stat.zip(direct_stat);
        let (goal, measured, met) = match f.figure.kind {
            Kind::Rate => {
                let ratio = both.and_then(|(k, d)| paired(&k, &d, |a, b| a / b));
                let measured =
                    ratio.map_or("not measured".into(), |r| format!("{:+.1} %", (r - 1.0) * 100.0));
                ("kha within 3 % of direct", measured, ratio.is_some_and(|r| r >= 0.97))
            }
            Kind::ConnectLatency => {
                let diff = both.and_then(|(k, d)| paired(&k, &d, |a, b| a - b));
                let measured = diff.map_or("not measured".into(), |d| format!("{d:+.2} µs"));
                ("kha within 1 µs of direct", measured, diff.is_some_and(|d| d <= 1.0))
            }
            Kind::Cost if MEMORY_FIGURES.contains(&f.figure.id.as_str()) => {
                let measured = kha.map_or("not measured".into(), |k| format!("{k:.1} MiB"));
                ("kha at most 10 MiB", measured, kha.is_some_and(|k| k <= MEMORY_GOAL_MIB))
            }
            _ => continue,
        };
        v.push(Goal {
            goal: goal.into(),
            figure: f.figure.label.trim().to_owned(),
            kha,
            direct,
            measured,
            met,
        });
    }
    v
}

/// Checks that a run produced every figure for every contender it applies to, in every
/// round, and wrote its table and plot. Never how fast anything was.
pub fn verify(dir: &Path) -> Result<()> {
    let text = fs::read_to_string(dir.join(JSON))
        .with_context(|| format!("reading {}", dir.join(JSON).display()))?;
    let report: Report = serde_json::from_str(&text).context("parsing results.json")?;
    let mut missing = Vec::new();
    for f in catalog() {
        let Some(r) = report.figure(&f.id) else {
            missing.push(format!("{}: not in the results", f.id));
            continue;
        };
        for c in &f.contenders {
            match r.results.get(c).cloned().flatten() {
                None => missing.push(format!("{} for {c}: no value", f.id)),
                Some(s) if s.rounds.len() != report.rounds => {
                    missing.push(format!("{} for {c}: {} of {} rounds", f.id, s.rounds.len(), report.rounds))
                }
                Some(s) if !s.median.is_finite() => missing.push(format!("{} for {c}: not a number", f.id)),
                Some(_) => {}
            }
        }
    }
    for file in [MARKDOWN, PLOT] {
        if fs::metadata(dir.join(file)).map_or(true, |m| m.len() == 0) {
            missing.push(format!("{file} not written"));
        }
    }
    if report.goals.is_empty() {
        missing.push("no goals evaluated".into());
    }
    if !missing.is_empty() {
        bail!("the bench did not produce every figure:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_values(rounds: usize) -> Values {
        let mut v = Values::default();
        for f in catalog() {
            for c in &f.contenders {
                for r in 0..rounds {
                    v.push(&f.id, c, 10.0 + r as f64);
                }
            }
        }
        v
    }

    #[test]
    fn verify_accepts_a_complete_run_and_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("kha-bench-report-{}", std::process::id()));
        let report = Report::build(
            "quick",
            2,
            1.0,
            Machine::default(),
            BTreeMap::new(),
            &full_values(2),
            BTreeMap::new(),
        );
        report.write(&dir).unwrap();
        verify(&dir).unwrap();
        assert!(report.markdown().contains("| TCP connect() p50 | µs ↓ |"));

        let mut values = full_values(2);
        values.values.get_mut("bulk").unwrap().get_mut("nginx").unwrap().pop();
        values.values.get_mut("https_full_c16").unwrap().remove("kha");
        Report::build("quick", 2, 1.0, Machine::default(), BTreeMap::new(), &values, BTreeMap::new())
            .write(&dir)
            .unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("bulk for nginx: 1 of 2 rounds"), "{err}");
        assert!(err.contains("https_full_c16 for kha: no value"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn goals_compare_kha_with_direct() {
        let mut values = full_values(1);
        values.values.get_mut("connect_p50").unwrap().insert("kha".into(), vec![11.5]);
        let r = Report::build("quick", 1, 1.0, Machine::default(), BTreeMap::new(), &values, BTreeMap::new());
        let g = r.goals.iter().find(|g| g.figure == "TCP connect() p50").unwrap();
        assert!(!g.met, "{g:?}");
        assert_eq!(g.measured, "+1.50 µs");
        assert!(r.goals.iter().find(|g| g.figure.contains("bulk")).unwrap().met);
        // Above 10 MiB is not met; 10 and less is.
        let memory = |r: &Report, label| r.goals.iter().find(|g| g.figure == label).cloned().unwrap();
        assert!(memory(&r, "LB memory, idle").met, "{:?}", memory(&r, "LB memory, idle"));
        values.values.get_mut("rss_idle").unwrap().insert("kha".into(), vec![10.5]);
        values.values.get_mut("rss_load").unwrap().insert("kha".into(), vec![9.5]);
        let r = Report::build("quick", 1, 1.0, Machine::default(), BTreeMap::new(), &values, BTreeMap::new());
        assert!(!memory(&r, "LB memory, idle").met, "{:?}", memory(&r, "LB memory, idle"));
        let r = Report::build("quick", 1, 1.0, Machine::default(), BTreeMap::new(), &values, BTreeMap::new());
        let g = memory(&r, "LB memory, under load (c=128)");
        assert!(g.met && g.measured == "9.5 MiB", "{g:?}");
    }
}
