//! The rounds: every phase for every contender, interleaved (each phase runs all contenders
//! back to back, in an order rotated every round), so that drift in the machine's state
//! touches them alike. The load tool (`kha-lab load`) runs in the node namespace, in kha's
//! cgroup only for kha.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::load::LoadReport;

use super::{
    Profile,
    figures::{CONCURRENCY, Contender, DIRECT, Lb, Values, main_contenders, scale_contenders},
    lab::{BenchLab, KhaConfig, Service},
    procfs::{self, BpfStats},
};

pub static STOP: AtomicBool = AtomicBool::new(false);

/// A run is repeated (up to `MAX_ATTEMPTS` in all) when processes outside the bench used
/// more than this share of the machine's CPU meanwhile (and at least `DISTURBED_MIN_NS`).
const DISTURBED_SHARE: f64 = 0.03;
const DISTURBED_MIN_NS: f64 = 20e6;
const MAX_ATTEMPTS: usize = 3;

fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// How a load balancer's own cost is read.
struct Meter {
    lb: Lb,
}

/// CPU and memory of a load balancer at one moment.
impl Meter {
    /// CPU time so far (ns), and for kha how often its programs ran.
    fn cpu(&self, lab: &BenchLab) -> Result<Cpu> {
        Ok(match self.lb {
            Lb::None => Cpu::default(),
            Lb::Kha => {
                let agent = lab.bed.agent_pid().and_then(procfs::cpu_ns).unwrap_or(0);
                let mut c = Cpu { ns: agent, ..Cpu::default() };
                for id in lab.bed.prog_ids() {
                    let p = procfs::prog_info(id)?;
                    c.ns += p.run_time_ns;
                    c.bpf_ns += p.run_time_ns;
                    c.bpf_runs += p.run_cnt;
                    let e = c.programs.entry(p.name).or_default();
                    e.0 += p.run_time_ns;
                    e.1 += p.run_cnt;
                }
                c
            }
            lb => Cpu { ns: lab.proxy(lb).map_or(0, |p| p.cpu_ns()), ..Cpu::default() },
        })
    }

    /// Memory that does not move during a run: for kha, what its maps and programs pin in
    /// the kernel (read with bpftool, too slow to sample under load).
    fn pinned_memory(&self, lab: &BenchLab) -> Result<u64> {
        if self.lb != Lb::Kha {
            return Ok(0);
        }
        Ok(procfs::kha_pinned(&lab.bed)?.total())
    }

    /// Resident memory of the LB's processes (kha: the agent), cheap enough to sample.
    fn rss(&self, lab: &BenchLab) -> u64 {
        match self.lb {
            Lb::None => 0,
            Lb::Kha => lab.bed.agent_pid().and_then(procfs::rss_bytes).unwrap_or(0),
            lb => lab.proxy(lb).map_or(0, |p| p.rss_bytes()),
        }
    }

    /// kha: the agent's RSS plus its maps' and programs' memlock; a proxy: its RSS.
    fn memory(&self, lab: &BenchLab) -> Result<u64> {
        Ok(self.rss(lab) + self.pinned_memory(lab)?)
    }
}

struct Runner<'a> {
    lab: &'a mut BenchLab,
    profile: &'a Profile,
    stats: BpfStats,
    values: Values,
    ca: String,
    seed: u64,
}

#[derive(Debug, Clone, Default)]
struct Cpu {
    /// All of the LB's CPU time: processes, and for kha its programs' run time.
    ns: u64,
    bpf_ns: u64,
    bpf_runs: u64,
    /// kha: program name -> (run time ns, runs).
    programs: BTreeMap<String, (u64, u64)>,
}

impl Cpu {
    /// Nanoseconds per run of a kha program.
    fn per_run(&self) -> Option<f64> {
        (self.bpf_runs > 0).then(|| self.bpf_ns as f64 / self.bpf_runs as f64)
    }

    fn since(self, before: Cpu) -> Cpu {
        let programs = self
            .programs
            .iter()
            .map(|(k, &(ns, runs))| {
                let (b_ns, b_runs) = before.programs.get(k).copied().unwrap_or_default();
                (k.clone(), (ns.saturating_sub(b_ns), runs.saturating_sub(b_runs)))
            })
            .collect();
        Cpu {
            ns: self.ns.saturating_sub(before.ns),
            bpf_ns: self.bpf_ns.saturating_sub(before.bpf_ns),
            bpf_runs: self.bpf_runs.saturating_sub(before.bpf_runs),
            programs,
        }
    }
}

/// What one load run gave, with the LB's cost over it.
struct Run {
    report: LoadReport,
    cpu: Cpu,
    peak_memory: u64,
}

pub fn run(lab: &mut BenchLab, profile: &Profile) -> Result<Values> {
    let ca = lab.bed.pki.ca_cert.display().to_string();
    let mut r = Runner { lab, profile, stats: BpfStats::new()?, values: Values::default(), ca, seed: 1 };
    for round in 0..profile.rounds {
        let t0 = Instant::now();
        eprintln!("xtask: bench: round {}/{}", round + 1, profile.rounds);
        r.round(round)?;
        eprintln!("xtask: bench: round {} took {:.0} s", round + 1, t0.elapsed().as_secs_f64());
    }
    Ok(r.values)
}

fn rotated<T: Clone>(v: &[T], by: usize) -> Vec<T> {
    let mut v = v.to_vec();
    let n = v.len();
    v.rotate_left(by % n.max(1));
    v
}

impl Runner<'_> {
    fn round(&mut self, round: usize) -> Result<()> {
        self.lab.set_kha(KhaConfig::Main)?;
        let order = rotated(&main_contenders(), round);
        let p = self.profile;
        for c in order.iter().filter(|c| c.lb != Lb::None) {
            let mem = Meter { lb: c.lb }.memory(self.lab)?;
            self.values.push("rss_idle", &c.id, mib(mem));
        }
        for c in &order {
            let run = self.load(
                c,
                "connect",
                Service::Ident,
                &count_args(p.connect_count, p.connect_ms),
                false,
                false,
            )?;
            self.latency("connect", c, &run);
        }
        // kha's programs' own time per run, from sequential connects with the kernel's
        // counters on (kept off above: they add two clock reads to every run).
        // The same for connects to other addresses from kha's cgroup (on a node: every
        // connect), which only look the destination up: the time per run, and the connect
        // latency they see next to direct's.
        for c in order.iter().filter(|c| c.lb == Lb::Kha) {
            let connects = count_args(p.connect_count, p.connect_ms);
            let run = self.load(c, "connect", Service::Ident, &connects, true, false)?;
            self.record("kha_prog_ns", c, &run, |_| run.cpu.per_run());
            let run = self.load(c, "connect", Service::MastersIdent, &connects, true, false)?;
            self.record("kha_prog_ns_miss", c, &run, |_| run.cpu.per_run());
        }
        for c in order.iter().filter(|c| c.lb == Lb::Kha || c.id == DIRECT) {
            let run = self.load(
                c,
                "connect",
                Service::MastersIdent,
                &count_args(p.connect_count, p.connect_ms),
                false,
                false,
            )?;
            self.record("connect_other_p50", c, &run, |r| r.latency_us.as_ref().map(|l| l.p50));
        }
        // The rewrite's own cost: a frontend connect and a hook miss, both from kha's cgroup
        // and back to back, so neither the cgroup's programs being there nor the drift between
        // the rows above (direct moved 7-13 µs between rounds here) is in the difference. The
        // hook miss stands in the `direct` column of its figure.
        for c in order.iter().filter(|c| c.lb == Lb::Kha) {
            let connects = count_args(p.connect_count, p.connect_ms);
            let p50 = |r: &LoadReport| r.latency_us.as_ref().map(|l| l.p50);
            let miss = self.load(c, "connect", Service::MastersIdent, &connects, false, false)?;
            let as_direct = Contender { id: DIRECT.to_owned(), ..c.clone() };
            self.record("connect_in_cgroup_p50", &as_direct, &miss, p50);
            let rewritten = self.load(c, "connect", Service::Ident, &connects, false, false)?;
            self.record("connect_in_cgroup_p50", c, &rewritten, p50);
        }
        for c in &order {
            let run = self.load(
                c,
                "first-byte",
                Service::Ident,
                &count_args(p.connect_count, p.connect_ms),
                false,
                false,
            )?;
            self.latency("first_byte", c, &run);
        }
        for resume in [false, true] {
            for conc in CONCURRENCY {
                for c in &order {
                    self.https(c, conc, resume)?;
                }
            }
        }
        for c in &order {
            let mut args = count_args(p.max_count, p.keepalive_ms);
            args.extend(["--concurrency".into(), "1".into()]);
            let run = self.load(c, "keepalive", Service::Https, &args, false, false)?;
            self.latency("keepalive", c, &run);
        }
        for c in &order {
            self.bulk(c)?;
        }
        let scale = rotated(&scale_contenders(), round);
        for i in 0..self.lab.cases.len() {
            self.lab.set_kha(KhaConfig::Scale(i))?;
            let id = self.lab.cases[i].shape.id.clone();
            for c in &scale {
                for (mode, fig) in [("connect", "connect"), ("first-byte", "first_byte")] {
                    let run = self.load(
                        c,
                        mode,
                        Service::Scale(i),
                        &count_args(p.scale_count, p.connect_ms),
                        false,
                        false,
                    )?;
                    self.record(&format!("scale_{id}_{fig}"), c, &run, |r| {
                        r.latency_us.as_ref().map(|l| l.p50)
                    });
                }
            }
        }
        self.lab.set_kha(KhaConfig::Main)
    }

    fn latency(&mut self, prefix: &str, c: &Contender, run: &Run) {
        self.record(&format!("{prefix}_p50"), c, run, |r| r.latency_us.as_ref().map(|l| l.p50));
        self.record(&format!("{prefix}_p99"), c, run, |r| r.latency_us.as_ref().map(|l| l.p99));
    }

    /// Records one value, and any failed operations next to it.
    fn record(&mut self, figure: &str, c: &Contender, run: &Run, value: impl Fn(&LoadReport) -> Option<f64>) {
        if let Some(v) = value(&run.report).filter(|_| run.report.ok > 0) {
            self.values.push(figure, &c.id, v);
        }
        if run.report.failed > 0 {
            eprintln!(
                "xtask: bench: {figure} {}: {} failed: {:?}",
                c.id, run.report.failed, run.report.errors
            );
            let e = self.values.errors.entry(format!("{figure}/{}", c.id)).or_default();
            for (k, n) in &run.report.errors {
                *e.entry(k.clone()).or_default() += n;
            }
        }
    }

    fn https(&mut self, c: &Contender, conc: usize, resume: bool) -> Result<()> {
        let p = self.profile;
        let mut args = count_args(p.max_count, p.https_ms);
        args.extend(["--concurrency".into(), conc.to_string()]);
        if resume {
            args.push("--resume".into());
        }
        // The LB's cost per connection and its memory under load: from the busiest run.
        let costly = !resume && conc == *CONCURRENCY.last().unwrap_or(&1);
        let run = self.load(c, "https", Service::Https, &args, costly, costly)?;
        let kind = if resume { "resume" } else { "full" };
        self.record(&format!("https_{kind}_c{conc}"), c, &run, |r| Some(r.rate_per_s));
        if resume {
            self.record(&format!("resume_hit_c{conc}"), c, &run, |r| {
                (r.handshakes > 0).then(|| 100.0 * r.resumed as f64 / r.handshakes as f64)
            });
        }
        if !resume && conc == 16 {
            let spread = self.values.spread.entry(c.id.clone()).or_default();
            for (m, n) in &run.report.by_master {
                *spread.entry(m.clone()).or_default() += n;
            }
        }
        if costly && c.lb != Lb::None {
            let per_conn_us = run.cpu.ns as f64 / 1000.0 / run.report.ok.max(1) as f64;
            self.record("conn_lb_cpu", c, &run, |_| Some(per_conn_us));
            if c.lb == Lb::Kha {
                self.record("kha_prog_ns_load", c, &run, |_| run.cpu.per_run());
                let conns = run.report.ok.max(1) as f64;
                for (name, &(ns, runs)) in &run.cpu.programs {
                    let e = self.values.programs.entry(name.clone()).or_default();
                    e.push((runs as f64 / conns, if runs > 0 { ns as f64 / runs as f64 } else { 0.0 }));
                }
            }
            self.record("rss_load", c, &run, |_| Some(mib(run.peak_memory)));
        }
        Ok(())
    }

    fn bulk(&mut self, c: &Contender) -> Result<()> {
        let p = self.profile;
        let args = vec![
            "--bytes".into(),
            p.bulk_bytes.to_string(),
            "--timeout-ms".into(),
            p.bulk_timeout_ms.to_string(),
        ];
        let run = self.load(c, "bulk", Service::Https, &args, true, false)?;
        self.record("bulk", c, &run, |r| Some(r.throughput_mib_s));
        if c.lb != Lb::None {
            let gib = run.report.bytes as f64 / (1u64 << 30) as f64;
            let ms_per_gib = run.cpu.ns as f64 / 1e6 / gib.max(1e-9);
            self.record("bulk_lb_cpu", c, &run, |_| Some(ms_per_gib));
        }
        Ok(())
    }

    /// Runs `kha-lab load MODE` for `c` and waits for its report, reading the LB's CPU
    /// before and after (`cpu`) and sampling its memory meanwhile (`sample_memory`).
    fn load(
        &mut self,
        c: &Contender,
        mode: &str,
        service: Service,
        extra: &[String],
        cpu: bool,
        sample_memory: bool,
    ) -> Result<Run> {
        stopped()?;
        let targets: Vec<SocketAddr> = self.lab.targets(c, service);
        self.seed += 1;
        let mut args: Vec<String> = vec![
            "load".into(),
            mode.into(),
            "--ca".into(),
            self.ca.clone(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        for t in &targets {
            args.extend(["--target".into(), t.to_string()]);
        }
        args.extend(extra.iter().cloned());
        if matches!(mode, "connect" | "first-byte") {
            // One CPU for the whole run: a connect's time then does not depend on where the
            // scheduler happened to put the client. The last CPU; the masters float.
            let last = thread::available_parallelism().map_or(1, |n| n.get()) - 1;
            args.extend(["--cpu".into(), last.to_string()]);
        }
        let meter = Meter { lb: c.lb };
        let stats = cpu && c.lb == Lb::Kha;
        let me = std::process::id();
        let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        for attempt in 1..=MAX_ATTEMPTS {
            if stats {
                self.stats.set(true)?;
            }
            let foreign = procfs::Foreign::snapshot(me);
            let started = Instant::now();
            let before = if cpu { meter.cpu(self.lab)? } else { Cpu::default() };
            let result = self.wait_tool(c, &args, &meter, sample_memory);
            let after = if cpu { meter.cpu(self.lab)? } else { Cpu::default() };
            let elapsed = started.elapsed().as_nanos() as f64;
            let other = foreign.ns_until(&procfs::Foreign::snapshot(me)) as f64;
            if stats {
                self.stats.set(false)?;
            }
            let (report, peak_memory) = result.with_context(|| format!("{mode} load for {}", c.id))?;
            if c.lb == Lb::Nginx || c.lb == Lb::Haproxy {
                self.lab.check_proxies()?;
            }
            // Other processes took CPU the contenders need: repeat the run, bounded.
            let disturbed = other > (DISTURBED_SHARE * elapsed * cpus).max(DISTURBED_MIN_NS);
            if disturbed && attempt < MAX_ATTEMPTS {
                self.values.repeated += 1;
                eprintln!(
                    "xtask: bench: {mode} for {}: other processes used {:.0} ms of CPU meanwhile; repeating",
                    c.id,
                    other / 1e6
                );
                continue;
            }
            if disturbed {
                self.values.disturbed += 1;
            }
            return Ok(Run { report, cpu: after.since(before), peak_memory });
        }
        unreachable!("the last attempt returns")
    }

    fn wait_tool(
        &self,
        c: &Contender,
        args: &[String],
        meter: &Meter,
        sample_memory: bool,
    ) -> Result<(LoadReport, u64)> {
        let mut child = kha_lab::netns::KillOnDrop(self.lab.bed.spawn_lab_tool(c.in_cgroup, args)?);
        // The tool bounds itself; this bound only catches a hung tool.
        let deadline = Instant::now()
            + Duration::from_millis(
                self.profile.https_ms.max(self.profile.keepalive_ms) + self.profile.bulk_timeout_ms + 30_000,
            );
        let pinned = if sample_memory { meter.pinned_memory(self.lab)? } else { 0 };
        let mut peak = 0;
        let status = loop {
            if sample_memory {
                peak = peak.max(pinned + meter.rss(self.lab));
            }
            if let Some(st) = child.try_wait()? {
                break st;
            }
            stopped()?;
            if Instant::now() > deadline {
                bail!("kha-lab {} did not finish in time", args.join(" "));
            }
            thread::sleep(Duration::from_millis(if sample_memory { 50 } else { 5 }));
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut out)?;
        }
        if let Some(mut s) = child.stderr.take() {
            s.read_to_string(&mut err)?;
        }
        // Ctrl-C reaches the tool too: say so rather than call it a failure.
        stopped()?;
        // Exit 3: some operations failed; the report says which.
        if !status.success() && status.code() != Some(3) {
            bail!("kha-lab {} failed ({status}): {}", args.join(" "), err.trim());
        }
        let line = out.lines().rev().find(|l| l.starts_with('{')).context("no report from kha-lab load")?;
        let report: LoadReport = serde_json::from_str(line).context("parsing the load report")?;
        Ok((report, peak))
    }
}

fn count_args(count: u64, ms: u64) -> Vec<String> {
    vec!["--count".into(), count.to_string(), "--duration-ms".into(), ms.to_string()]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Answer shares per master, for the report: contender -> "m1 34%, ...".
pub fn spread_text(values: &Values) -> BTreeMap<String, String> {
    values
        .spread
        .iter()
        .map(|(c, m)| {
            let total: u64 = m.values().sum();
            let parts: Vec<String> = m
                .iter()
                .map(|(k, n)| format!("{k} {:.0}%", 100.0 * *n as f64 / total.max(1) as f64))
                .collect();
            (c.clone(), parts.join(", "))
        })
        .collect()
}
