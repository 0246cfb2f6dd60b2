//! The failover report: `failover.json` (plan, machine, settings, every outcome) and
//! `failover.md` (one row per failure × contender, kha's view, errors, spread), and
//! [`verify`], which checks that every cell was produced.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    outcome::{Outcome, Watch},
    plan::{
        Contender, FAILURES, Failure, KEEP_INTERVAL_MS, LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, Plan, STALL_MS,
        contenders,
    },
    rolling::{DELAYS_S, Rolling},
};
use crate::bench::{machine, report::num};

/// `failover.{json,md}`, for the real control plane `failover-real.{json,md}`, for the long
/// profile `failover-long.{json,md}`.
pub fn files(plan: &Plan) -> (&'static str, &'static str) {
    match (plan.real, plan.is_long()) {
        (_, true) => ("failover-long.json", "failover-long.md"),
        (true, false) => ("failover-real.json", "failover-real.md"),
        (false, false) => ("failover.json", "failover.md"),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverReport {
    pub plan: Plan,
    pub duration_s: f64,
    pub machine: machine::Machine,
    pub settings: BTreeMap<String, String>,
    pub contenders: Vec<Contender>,
    pub failures: Vec<Failure>,
    pub outcomes: Vec<Outcome>,
    /// Real control plane only: the rolling restarts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolling: Vec<Rolling>,
}

/// Seconds with a bound: `None` is "> bound s".
pub(super) fn secs(v: Option<f64>, bound: f64) -> String {
    match v {
        Some(s) => format!("{} s", num(s.max(0.0))),
        None => format!("> {} s", num(bound)),
    }
}

/// Median [min–max] over rounds, `None` counted as above every value.
fn cell(values: &[Option<f64>], bound: f64) -> String {
    if values.is_empty() {
        return "**missing**".into();
    }
    let mut v: Vec<f64> = values.iter().map(|x| x.unwrap_or(f64::INFINITY)).collect();
    v.sort_by(f64::total_cmp);
    let show = |x: f64| secs(x.is_finite().then_some(x), bound);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    if show(v[0]) == show(v[n - 1]) {
        show(median)
    } else {
        format!("{} [{}–{}]", show(median), show(v[0]), show(v[n - 1]))
    }
}

fn count_cell(values: &[u64]) -> String {
    if values.is_empty() {
        return "**missing**".into();
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] as f64 } else { (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0 };
    if v[0] == v[n - 1] {
        format!("{}", v[0])
    } else if median.fract() == 0.0 {
        format!("{median} [{}–{}]", v[0], v[n - 1])
    } else {
        format!("{median:.1} [{}–{}]", v[0], v[n - 1])
    }
}

impl FailoverReport {
    /// The real control plane's watchers: how late writes reached them, and their relists.
    fn watch_table(&self, m: &mut String) {
        let p = &self.plan;
        let bound = p.window_s + p.recovery_s;
        let _ = writeln!(
            m,
            "\nWatches: three client-go informers (`kha-watch`: kubelet's client settings, HTTP/2, WatchList) per \
             contender. A writer updates one ConfigMap every 500 ms straight through a master that is not failed; a \
             write's delay is from kubectl's return to the first event at that resourceVersion or later, in the \
             slowest of the contender's watchers. *longest delay*: the worst write of the fault phase (\"> N s\": one \
             had not arrived by the end of the recovery); *relists*: lists and WatchList relists of the three from the \
             fault on.\n\n| failure | contender | longest delay of a write | relists |\n|---|---|---|---|"
        );
        for f in &self.failures {
            for c in &self.contenders {
                let os = self.cells(*f, &c.id);
                let ws: Vec<&Watch> = os.iter().filter_map(|o| o.watch.as_ref()).collect();
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} |",
                    f.label(true),
                    c.label,
                    if ws.is_empty() {
                        "**missing**".into()
                    } else {
                        cell(&ws.iter().map(|w| w.delay_s).collect::<Vec<_>>(), bound)
                    },
                    if ws.is_empty() {
                        "**missing**".into()
                    } else {
                        count_cell(&ws.iter().map(|w| w.relists).collect::<Vec<_>>())
                    },
                );
            }
        }
    }

    /// The rolling restarts of the real control plane.
    fn rolling_table(&self, m: &mut String) {
        let _ = writeln!(
            m,
            "\nRolling restart of every kube-apiserver: SIGTERM to each in turn (graceful termination: `/readyz` \
             fails, the shutdown delay, the listener closed, requests drained, GOAWAY to HTTP/2 clients), started \
             again and ready before the next; the loop and the watchers as above. *failed*, *stalled*: loop requests \
             that ended during the restart; *longest watch gap*: the longest a watcher had no watch open.\n\n\
             | shutdown delay | contender | restart took | requests | failed | stalled (> 1 s) | longest delay of a write | relists | longest watch gap |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for r in &self.rolling {
            let errors: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            let failed = if errors.is_empty() {
                r.failed.to_string()
            } else {
                format!("{} ({})", r.failed, errors.join(", "))
            };
            let _ = writeln!(
                m,
                "| {} s | {} | {} | {} | {failed} | {} | {} | {} | {} s |",
                r.shutdown_delay_s,
                r.contender,
                if r.not_exited.is_empty() {
                    format!("{} s", num(r.phase_s))
                } else {
                    format!(
                        "{} s (not exited 60 s after SIGTERM, killed: {})",
                        num(r.phase_s),
                        r.not_exited.join(", ")
                    )
                },
                r.requests,
                r.stalled,
                secs(r.watch.delay_s, r.phase_s),
                r.watch.relists,
                num(r.longest_gap_s),
            );
        }
    }

    fn cells(&self, f: Failure, c: &str) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.failure == f && o.contender == c).collect()
    }

    pub fn markdown(&self) -> String {
        let p = &self.plan;
        let mut m = String::new();
        let against = if p.real { ", real control plane" } else { "" };
        let _ = writeln!(m, "# kha failover benchmark: {} run{against}, {}\n", p.profile, self.machine.date);
        let _ = writeln!(m, "Machine: {}.\n", self.machine.one_line());
        let _ = writeln!(
            m,
            "{} round(s) of {} failures, {:.0} s. Each failure is applied to one master for all contenders at the same \
             instant (a different master each time); cells are per round, or the median [min–max] over rounds. The \
             loop: one request every {LOOP_INTERVAL_MS} ms on a new TCP + TLS connection, {LOOP_TIMEOUT_MS} ms deadline; \
             a stall is an answer after more than {} s. The long-lived connection: one request every \
             {KEEP_INTERVAL_MS} ms on one kept-alive connection (no deadline within the run), one such client on each \
             master; the one on the failed master is followed. Fault phase: at most {} s (N), ended early once every \
             contender has left the failed master for {} s and replaced the long-lived connection; recovery: at most {} s.\n",
            p.rounds,
            self.failures.len(),
            self.duration_s,
            num(STALL_MS / 1000.0),
            num(p.window_s),
            num(p.quiet_s),
            num(p.recovery_s),
        );
        let _ = writeln!(
            m,
            "Settings: {}. nginx: `least_conn`, `proxy_connect_timeout 1s`, `proxy_timeout 10m`, passive checks only \
             (`max_fails 1`, `fail_timeout 10s`, nginx's defaults, per worker). haproxy: `balance leastconn`, \
             `option httpchk GET /healthz`, `inter 15s downinter 15s rise 2 fall 2 slowstart 60s`, `retries 5`, \
             `option redispatch`; no `on-marked-down shutdown-sessions` (as kubespray).\n",
            self.settings.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            m,
            "| failure | contender | failed requests | stalled (> 1 s) | when (s after the fault) | no request to the failed master after | long-lived connection replaced after | back in use after the undo |\n|---|---|---|---|---|---|---|---|"
        );
        for f in &self.failures {
            for c in &self.contenders {
                let os = self.cells(*f, &c.id);
                let when: Vec<String> = os
                    .iter()
                    .map(|o| match (o.bad_first_s, o.bad_last_s) {
                        (Some(a), Some(b)) if (b - a).abs() < 0.005 => num(a),
                        (Some(a), Some(b)) => format!("{}–{}", num(a), num(b)),
                        _ => "–".into(),
                    })
                    .collect();
                let when = if when.iter().all(|w| w == "–") { "–".to_owned() } else { when.join("; ") };
                // Not replaced: the phase ran its whole window (it ends early only once every
                // contender has replaced it).
                let mut replaced = cell(&os.iter().map(|o| o.replaced_s).collect::<Vec<_>>(), p.window_s);
                let errors: std::collections::BTreeSet<&str> =
                    os.iter().filter_map(|o| o.long_lived_error.as_deref()).collect();
                if !errors.is_empty() {
                    let _ = write!(replaced, " ({})", errors.into_iter().collect::<Vec<_>>().join(", "));
                }
                let mut back = cell(&os.iter().map(|o| o.back_s).collect::<Vec<_>>(), p.recovery_s);
                let failed_after: u64 = os.iter().map(|o| o.failed_after_undo).sum();
                if failed_after > 0 {
                    let _ = write!(back, " ({failed_after} failed)");
                }
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    f.label(p.real),
                    c.label,
                    count_cell(&os.iter().map(|o| o.failed).collect::<Vec<_>>()),
                    count_cell(&os.iter().map(|o| o.stalled).collect::<Vec<_>>()),
                    when,
                    cell(&os.iter().map(|o| o.left_s).collect::<Vec<_>>(), p.window_s - p.quiet_s),
                    replaced,
                    back,
                );
            }
        }
        let _ = writeln!(
            m,
            "\n- *failed*, *stalled*: loop requests that ended after the fault and started before the end of the fault \
             phase; *when*: when they ended, per round.\n\
             - *no request to the failed master after*: the start of the last loop request that the failed master \
             answered or that failed or stalled, provided the loop then ran clean for {} s after it ended; 0: not one \
             request after the fault reached it; \"> {} s\": still within the last {} s of the window.\n\
             - *long-lived connection replaced after*: the first answer from another master on a new connection, on \
             the client whose kept-alive connection was on the failed master (in brackets: the error it got first); \
             \"> N s\": its request was still hanging or it was still served by the failed master at the end.\n\
             - *back in use after the undo*: from the undo's return (a killed master restarted and ready, the link up \
             (real: and `/readyz` 200, once its etcd member caught up), `/readyz` fixed, SIGCONT) to the start of the \
             first loop request the master answered.",
            num(p.quiet_s),
            num(p.window_s - p.quiet_s),
            num(p.quiet_s),
        );
        if p.real {
            self.watch_table(&mut m);
            self.rolling_table(&mut m);
        }
        m.push_str(&super::goals::table(self));
        if p.is_long() {
            m.push_str(&super::ratio::table(self));
        }
        let _ = writeln!(
            m,
            "\nkha's own view (`kha status`, polled every 250 ms): the failed backend's state, seconds after the fault.\n"
        );
        let _ = writeln!(m, "| failure | round | master | states |\n|---|---|---|---|");
        for o in self.outcomes.iter().filter(|o| o.contender == "kha") {
            let states: Vec<String> =
                o.kha_states.iter().map(|(t, s)| format!("{s} {}", num(t.max(0.0)))).collect();
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} (undo at {}) |",
                o.failure.label(p.real),
                o.round + 1,
                o.master,
                states.join(" → "),
                num(o.phase_s + o.undo_s)
            );
        }
        let errors: BTreeMap<String, BTreeMap<String, u64>> =
            self.outcomes.iter().filter(|o| !o.errors.is_empty()).fold(BTreeMap::new(), |mut acc, o| {
                let e: &mut BTreeMap<String, u64> =
                    acc.entry(format!("{} / {}", o.failure.id(), o.contender)).or_default();
                for (k, n) in &o.errors {
                    *e.entry(k.clone()).or_default() += n;
                }
                acc
            });
        if !errors.is_empty() {
            let _ = writeln!(
                m,
                "\nFailed loop requests by error:\n\n| failure / contender | errors |\n|---|---|"
            );
            for (k, e) in &errors {
                let _ = writeln!(
                    m,
                    "| {k} | {} |",
                    e.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
                );
            }
        }
        let _ = writeln!(m, "\nLoop answers per master before each fault (the failed master in bold):\n");
        let _ = writeln!(
            m,
            "| failure | round | contender | answers | long-lived connections on |\n|---|---|---|---|---|"
        );
        for o in &self.outcomes {
            let answers: Vec<String> = o
                .before
                .iter()
                .map(|(k, n)| if *k == o.master { format!("**{k} {n}**") } else { format!("{k} {n}") })
                .collect();
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} |",
                o.failure.id(),
                o.round + 1,
                o.contender,
                answers.join(", "),
                o.long_lived_on.join(", ")
            );
        }
        m
    }
}

/// Checks that every failure × contender cell was produced in every round: the loop ran
/// before and after the fault, a long-lived connection was on the failed master, and the
/// table was written. Never how fast anything was.
pub fn verify(dir: &Path, real: bool) -> Result<()> {
    let (json, markdown) = files(&Plan { real, ..Plan::quick() });
    let text = fs::read_to_string(dir.join(json))
        .with_context(|| format!("reading {}", dir.join(json).display()))?;
    let r: FailoverReport = serde_json::from_str(&text).with_context(|| format!("parsing {json}"))?;
    let mut missing = Vec::new();
    for f in FAILURES {
        for c in contenders() {
            let os = r.cells(f, &c.id);
            if os.len() != r.plan.rounds {
                missing.push(format!("{} / {}: {} of {} rounds", f.id(), c.id, os.len(), r.plan.rounds));
            }
            for o in os {
                if o.before.values().sum::<u64>() == 0 {
                    missing.push(format!(
                        "{} / {} round {}: no answer before the fault",
                        f.id(),
                        c.id,
                        o.round + 1
                    ));
                }
                if o.requests == 0 {
                    missing.push(format!(
                        "{} / {} round {}: no request after the fault",
                        f.id(),
                        c.id,
                        o.round + 1
                    ));
                }
                if !o.long_lived_on.contains(&o.master) {
                    missing.push(format!(
                        "{} / {} round {}: no long-lived connection on {}",
                        f.id(),
                        c.id,
                        o.round + 1,
                        o.master
                    ));
                }
                if real && o.watch.as_ref().is_none_or(|w| w.writes == 0) {
                    missing.push(format!(
                        "{} / {} round {}: no write seen by the watchers",
                        f.id(),
                        c.id,
                        o.round + 1
                    ));
                }
                if c.id == "kha" && o.kha_states.is_empty() {
                    missing.push(format!("{} / kha round {}: kha's states not read", f.id(), o.round + 1));
                }
            }
        }
    }
    for delay in DELAYS_S.iter().filter(|_| real) {
        for c in contenders() {
            let n = r
                .rolling
                .iter()
                .filter(|x| x.shutdown_delay_s == *delay && x.contender == c.id && x.requests > 0)
                .count();
            if n != 1 {
                missing
                    .push(format!("rolling restart, {delay} s delay / {}: {n} results with requests", c.id));
            }
        }
    }
    let md = fs::read_to_string(dir.join(markdown)).unwrap_or_default();
    if !md.contains("| failure | contender |") || md.contains("**missing**") {
        missing.push(format!("{markdown} not written or incomplete"));
    }
    if !missing.is_empty() {
        bail!("the failover bench did not produce every cell:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_bounds_for_what_did_not_happen() {
        assert_eq!(cell(&[Some(1.25)], 30.0), "1.25 s");
        assert_eq!(cell(&[None], 30.0), "> 30.0 s");
        assert_eq!(cell(&[Some(1.0), None, Some(3.0)], 30.0), "3.00 s [1.00 s–> 30.0 s]");
        assert_eq!(count_cell(&[0, 2]), "1 [0–2]");
        assert_eq!(count_cell(&[1, 2]), "1.5 [1–2]");
        assert_eq!(count_cell(&[1, 1]), "1");
        assert_eq!(cell(&[None, None], 30.0), "> 30.0 s");
    }

    fn complete_report(rounds: usize) -> FailoverReport {
        let mut outcomes = Vec::new();
        for round in 0..rounds {
            for f in FAILURES {
                for c in contenders() {
                    outcomes.push(Outcome {
                        contender: c.id.clone(),
                        failure: f,
                        round,
                        master: "m1".into(),
                        before: [("m1".to_owned(), 10)].into(),
                        long_lived_on: vec!["m1".into(), "m2".into()],
                        requests: 100,
                        kha_states: vec![(0.0, "up".into())],
                        ..Outcome::default()
                    });
                }
            }
        }
        FailoverReport {
            plan: Plan { rounds, ..Plan::quick() },
            duration_s: 1.0,
            machine: machine::Machine::default(),
            settings: BTreeMap::new(),
            contenders: contenders(),
            failures: FAILURES.to_vec(),
            outcomes,
            rolling: Vec::new(),
        }
    }

    #[test]
    fn verify_accepts_every_cell_and_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("kha-bench-failover-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (json, md) = files(&Plan::quick());
        let write = |r: &FailoverReport| {
            fs::write(dir.join(json), serde_json::to_string(r).unwrap()).unwrap();
            fs::write(dir.join(md), r.markdown()).unwrap();
        };
        let mut r = complete_report(2);
        write(&r);
        verify(&dir, false).unwrap();
        assert!(
            r.markdown()
                .contains("| hung (SIGSTOP) | haproxy | 0 | 0 | – | > 7.00 s | > 10.0 s | > 5.00 s |")
        );
        r.outcomes.retain(|o| !(o.failure == Failure::Hung && o.contender == "nginx" && o.round == 1));
        r.outcomes[0].long_lived_on = vec!["m2".into()];
        write(&r);
        let err = verify(&dir, false).unwrap_err().to_string();
        assert!(err.contains("hung / nginx: 1 of 2 rounds"), "{err}");
        assert!(err.contains("killed / kha round 1: no long-lived connection on m1"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
