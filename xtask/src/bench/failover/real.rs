//! `bench failover --real`: the same faults against the real control plane (an etcd member and
//! a kube-apiserver in each master namespace, kha-lab/src/real), and what only real clients
//! show: three client-go informers (`kha-watch`) per contender, and how late a write reaches
//! them while a master fails. A writer updates one ConfigMap every [`TICK_MS`] through a master
//! that is not failed (directly, outside every load balancer); a watcher's delay for a write is
//! from kubectl's return to the first event at that resourceVersion or later.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::{
    bed::Bed,
    netns,
    real::{RealControlPlane, User, watch::Watcher},
};

use super::{
    outcome::Watch,
    plan::{Contender, contenders},
};

/// Informers per contender, as a node has several (kubelet, kube-proxy, ...).
const WATCHERS: usize = 3;
const TICK_MS: u64 = 500;
const TICK_OBJECT: &str = "kha-bench-tick";
/// How kha-watch names it.
const TICK_OBJECT_KEY: &str = "default/kha-bench-tick";
/// Watchers live for the whole bench, bounded.
const WATCH_LIFE: Duration = Duration::from_secs(3600);

/// The real control plane and the watchers. Dropped in field order: watchers first.
pub(super) struct Real {
    watchers: Vec<(String, Vec<Watcher>)>,
    pub(super) cp: RealControlPlane,
}

impl Real {
    /// Around a control plane with kubespray's defaults (anonymous auth on: haproxy's
    /// `/healthz` check needs it).
    pub(super) fn new(cp: RealControlPlane) -> Real {
        Real { watchers: Vec::new(), cp }
    }

    pub(super) fn probe_identity(&self) -> Vec<String> {
        let n = &self.cp.files.node;
        [
            "--client-cert".into(),
            n.cert.display().to_string(),
            "--client-key".into(),
            n.key.display().to_string(),
        ]
        .to_vec()
    }

    /// The object the writer updates, and [`WATCHERS`] synced informers through each contender.
    pub(super) fn start_watchers(&mut self, bed: &Bed) -> Result<()> {
        let direct = self.direct_kubeconfig(bed, &self.cp.names()[0])?;
        let o = self.cp.kubectl(&direct, &["create", "configmap", TICK_OBJECT, "-n", "default"])?;
        if !o.status.success() {
            bail!("creating the ConfigMap the bench writes: {}", String::from_utf8_lossy(&o.stderr));
        }
        for c in contenders() {
            let kubeconfig = self.cp.kubeconfig(
                &format!("watch-{}.kubeconfig", c.id),
                User::Admin,
                &format!("https://{}", c.connect),
                Some("localhost"),
            )?;
            let cgroup = c.in_cgroup.then_some(bed.cgroup.path.as_path());
            let ws = (0..WATCHERS)
                .map(|_| {
                    Watcher::spawn(
                        &self.cp.bin("kha-watch"),
                        bed.lab.node_netns(),
                        cgroup,
                        &kubeconfig,
                        WATCH_LIFE,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.watchers.push((c.id, ws));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.watchers.iter().all(|(_, ws)| ws.iter().all(Watcher::synced)) {
            if Instant::now() > deadline {
                let state: Vec<String> = self
                    .watchers
                    .iter()
                    .map(|(c, ws)| {
                        format!("{c}: {} of {WATCHERS} synced", ws.iter().filter(|w| w.synced()).count())
                    })
                    .collect();
                bail!("the watchers did not sync within 60 s ({})", state.join(", "));
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// An admin kubeconfig straight to `master`'s apiserver, past every load balancer.
    fn direct_kubeconfig(&self, bed: &Bed, master: &str) -> Result<PathBuf> {
        let addr = bed.lab.master(master).with_context(|| format!("no master {master}"))?.https_v4();
        Ok(self.cp.kubeconfig(
            &format!("direct-{master}.kubeconfig"),
            User::Admin,
            &format!("https://{addr}"),
            None,
        )?)
    }

    /// Starts writing through the first of `masters` that answers (masters that are not
    /// failed), until the returned writer drops.
    pub(super) fn writer(&self, bed: &Bed, masters: &[String]) -> Result<Writer> {
        let kubeconfigs = masters.iter().map(|m| self.direct_kubeconfig(bed, m)).collect::<Result<_>>()?;
        Writer::start(self.cp.bin("kubectl"), bed.lab.node_netns().to_owned(), kubeconfigs)
    }

    /// The longest time one of contender `c`'s watchers had no watch open, after `after`.
    pub(super) fn longest_gap(&self, c: &Contender, after: Instant) -> Duration {
        self.watchers
            .iter()
            .filter(|(id, _)| *id == c.id)
            .flat_map(|(_, ws)| ws.iter().map(|w| w.longest_gap_after(after)))
            .max()
            .unwrap_or_default()
    }

    /// The figures of contender `c` for writes made in `[t0, t_end]`, seen until now.
    pub(super) fn figures(
        &self,
        c: &Contender,
        writes: &[(Instant, u64)],
        t0: Instant,
        t_end: Instant,
    ) -> Watch {
        let Some((_, ws)) = self.watchers.iter().find(|(id, _)| *id == c.id) else { return Watch::default() };
        let during: Vec<&(Instant, u64)> = writes.iter().filter(|(t, _)| *t >= t0 && *t <= t_end).collect();
        let mut delay = Some(0.0f64);
        for (t, rv) in &during {
            for w in ws {
                delay = match (delay, w.saw(TICK_OBJECT_KEY, *rv)) {
                    (Some(d), Some(seen)) => Some(d.max(seen.saturating_duration_since(*t).as_secs_f64())),
                    _ => None,
                };
            }
        }
        Watch {
            delay_s: delay,
            relists: ws.iter().map(|w| w.relists_after(t0) as u64).sum(),
            writes: during.len() as u64,
        }
    }
}

/// The writer thread: `kubectl patch` every [`TICK_MS`], each write's return time and
/// resourceVersion recorded. Stopped and joined on drop.
pub(super) struct Writer {
    stop: Arc<AtomicBool>,
    pub(super) writes: Arc<Mutex<Vec<(Instant, u64)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(kubectl: PathBuf, netns: String, kubeconfigs: Vec<PathBuf>) -> Result<Writer> {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), writes.clone());
        let thread = thread::Builder::new().name("tick-writer".into()).spawn(move || {
            // Bounded: an hour of writes at most, whatever the caller does.
            let deadline = Instant::now() + WATCH_LIFE;
            let mut seq = 0u64;
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                seq += 1;
                if let Some(rv) = kubeconfigs.iter().find_map(|k| patch(&kubectl, &netns, k, seq)) {
                    out.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), rv));
                }
                thread::sleep(Duration::from_millis(TICK_MS));
            }
        })?;
        Ok(Writer { stop, writes, thread: Some(thread) })
    }

    pub(super) fn writes(&self) -> Vec<(Instant, u64)> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One write through the master `kubeconfig` names; its resourceVersion, or `None` if it failed
/// (the writer's masters are not failed, so a failure is the bench's problem, not a
/// contender's: such writes are simply not counted).
fn patch(kubectl: &Path, netns: &str, kubeconfig: &Path, seq: u64) -> Option<u64> {
    let mut c = Command::new(kubectl);
    c.arg("--kubeconfig").arg(kubeconfig).args([
        "patch",
        "configmap",
        TICK_OBJECT,
        "-n",
        "default",
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"data":{{"seq":"{seq}"}}}}"#),
        "-o",
        "jsonpath={.metadata.resourceVersion}",
        "--request-timeout=5s",
    ]);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let out = netns::spawn_in(netns, None, c).ok()?.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
