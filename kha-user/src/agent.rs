//! The agent's loop after attach: probes feed health, health shapes the backend table, failed
//! backends lose their sockets. The only task that writes the maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use kha::{
    config::Config,
    endpoints::backend_of,
    health::{AllDown, BackendHealth, Change, Hysteresis, ProbeTarget, desired_state},
    loader,
    maps::KhaMaps,
    probe::{self, MakeSocket, ProbeEvent, ProbeSettings},
    sync::{BackendTable as _, sync},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

pub struct Settings {
    /// Where the loop publishes its state for `/metrics`, `/healthz`, `/readyz`.
    pub shared: Arc<std::sync::Mutex<crate::serve::Shared>>,
    pub recorders: kha::observe::Recorders,
    /// `None`: health checks off, every configured backend is served.
    pub probes: Option<ProbeTemplate>,
    pub hysteresis: Hysteresis,
    pub all_down: AllDown,
    pub drain: Duration,
    pub resync: Duration,
    pub netns: Option<PathBuf>,
    /// `--discover`: what the watcher reports, merged with the static config.
    pub discovery: Option<Discovery>,
}

pub struct Discovery {
    pub feed: kha::discovery::Feed,
    pub updates: mpsc::Receiver<kha::discovery::Update>,
}

/// The next discovery update; never, without discovery.
async fn next_update(
    rx: &mut Option<mpsc::Receiver<kha::discovery::Update>>,
) -> Option<kha::discovery::Update> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The TLS client config for a frontend's probe settings (its own files, or the global ones).
pub type TlsFor = Arc<dyn Fn(&kha::config::ProbeTls) -> Result<Arc<rustls::ClientConfig>> + Send + Sync>;

#[derive(Clone)]
pub struct ProbeTemplate {
    pub tls_for: TlsFor,
    pub interval: Duration,
    pub timeout: Duration,
}

struct Agent {
    settings: Settings,
    config: Config,
    maps: KhaMaps,
    health: BTreeMap<ProbeTarget, BackendHealth>,
    /// Dropping a sender stops that probe.
    probes: BTreeMap<ProbeTarget, oneshot::Sender<()>>,
    events: mpsc::Sender<(ProbeTarget, ProbeEvent)>,
    make_socket: MakeSocket,
    /// Backends whose sockets are terminated at the deadline unless they recover first.
    drains: BTreeMap<std::net::SocketAddr, Instant>,
    /// Backends whose sockets are terminated right after the next sync.
    terminate_now: BTreeSet<std::net::SocketAddr>,
}

pub async fn run(
    mut settings: Settings,
    config: Config,
    maps: KhaMaps,
    reload: impl Fn() -> Result<Config>,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, mut rx) = mpsc::channel(1024);
    let make_socket = match &settings.netns {
        None => probe::default_socket(),
        Some(path) => {
            let ns = Arc::new(File::open(path)?);
            Arc::new(move |addr| loader::socket_in_netns(&ns, addr)) as MakeSocket
        }
    };
    let (mut feed, mut updates) = match settings.discovery.take() {
        Some(d) => (Some(d.feed), Some(d.updates)),
        None => (None, None),
    };
    let mut resync = tokio::time::interval(settings.resync);
    let mut drain_tick = tokio::time::interval(Duration::from_millis(200));
    let mut agent = Agent {
        settings,
        config,
        maps,
        health: BTreeMap::new(),
        probes: BTreeMap::new(),
        events: tx,
        make_socket,
        drains: BTreeMap::new(),
        terminate_now: BTreeSet::new(),
    };
    agent.reconcile_probes();
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => match reload() {
                Ok(c) => {
                    log::info!("SIGHUP: config reloaded");
                    let c = match &mut feed {
                        Some(f) => f.set_base(c),
                        None => c,
                    };
                    agent.replace_config(c);
                }
                Err(e) => log::error!("SIGHUP: keeping the running config: {e:#}"),
            },
            Some((target, event)) = rx.recv() => agent.observe(target, event),
            Some(update) = next_update(&mut updates) => match feed.as_mut().and_then(|f| f.update(update)) {
                Some(c) => agent.replace_config(c),
                None => continue,
            },
            _ = resync.tick() => {}
            _ = drain_tick.tick() => {
                let now = Instant::now();
                let due: Vec<_> = agent.drains.iter().filter(|(_, t)| **t <= now).map(|(b, _)| *b).collect();
                for b in due {
                    agent.drains.remove(&b);
                    agent.terminate_now.insert(b);
                }
                if agent.terminate_now.is_empty() {
                    continue;
                }
            }
        }
        agent.apply();
    }
}

impl Agent {
    /// Starts a probe for every configured (backend, path) that has none, stops the rest.
    fn reconcile_probes(&mut self) {
        // The first frontend naming a (backend, path) decides its probe's TLS.
        let mut targets: BTreeMap<ProbeTarget, &kha::config::ProbeTls> = BTreeMap::new();
        for f in &self.config.frontends {
            for b in &f.backends {
                targets.entry((*b, f.health_path.clone())).or_insert(&f.probe_tls);
            }
        }
        self.probes.retain(|t, _| targets.contains_key(t));
        self.health.retain(|t, _| targets.contains_key(t));
        for (t, tls) in targets {
            let checked = self.settings.probes.is_some();
            self.health.entry(t.clone()).or_insert_with(|| BackendHealth::new(checked, SystemTime::now()));
            let Some(template) = &self.settings.probes else { continue };
            if self.probes.contains_key(&t) {
                continue;
            }
            let tls = match (template.tls_for)(tls) {
                Ok(tls) => tls,
                Err(e) => {
                    log::error!("no probe for {} {}: {e:#}; it is served unchecked", t.0, t.1);
                    continue;
                }
            };
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let (ev_tx, mut ev_rx) = mpsc::channel(16);
            let mut s = ProbeSettings::new(tls);
            s.path = t.1.clone();
            s.interval = template.interval;
            s.timeout = template.timeout;
            tokio::spawn(probe::run(t.0, s, self.make_socket.clone(), ev_tx, async move {
                let _ = stop_rx.await;
            }));
            let all = self.events.clone();
            let tag = t.clone();
            tokio::spawn(async move {
                while let Some(e) = ev_rx.recv().await {
                    if all.send((tag.clone(), e)).await.is_err() {
                        return;
                    }
                }
            });
            self.probes.insert(t, stop_tx);
        }
    }

    fn replace_config(&mut self, config: Config) {
        let before: BTreeSet<_> = self.config.frontends.iter().flat_map(|f| f.backends.clone()).collect();
        let after: BTreeSet<_> = config.frontends.iter().flat_map(|f| f.backends.clone()).collect();
        self.config = config;
        self.reconcile_probes();
        // A master taken out of the config may be going away: let its connections finish
        // their work for the drain time, then move them.
        for gone in before.difference(&after) {
            self.drains.insert(*gone, Instant::now() + self.settings.drain);
        }
    }

    fn observe(&mut self, target: ProbeTarget, event: ProbeEvent) {
        let Some(h) = self.health.get_mut(&target) else { return };
        let change = h.observe(&event, self.settings.hysteresis, SystemTime::now());
        if let ProbeEvent::Ready { latency } | ProbeEvent::Failed { latency, .. } = &event {
            self.settings.recorders.probe(target.0, *latency);
        }
        let backend = target.0;
        match change {
            Change::WentDown => {
                log::warn!("backend {backend} is down: {}", h.last_failure.as_deref().unwrap_or("?"));
                self.drains.remove(&backend);
                self.terminate_now.insert(backend);
            }
            Change::WentDraining => {
                log::warn!(
                    "backend {backend} is not ready ({}): no new connections, existing ones end in {:?}",
                    h.last_failure.as_deref().unwrap_or("?"),
                    self.settings.drain
                );
                self.drains.insert(backend, Instant::now() + self.settings.drain);
            }
            Change::WentUp => {
                log::info!("backend {backend} is up");
                self.drains.remove(&backend);
            }
            Change::None => {}
        }
        if matches!(event, ProbeEvent::Ready { .. }) && h.state.serves() {
            self.clear_suspect(backend);
        }
    }

    /// A ready probe disproves the kernel's suspicion from a failed connect.
    fn clear_suspect(&mut self, backend: std::net::SocketAddr) {
        let Ok(snapshot) = self.maps.snapshot() else { return };
        let want = backend_of(backend);
        for (id, _) in snapshot.backends.iter().filter(|(_, b)| **b == want) {
            if self.maps.suspect(*id).unwrap_or(false) {
                log::info!("backend {backend}: probe ready, clearing the kernel's suspicion");
                let _ = self.maps.clear_suspect(*id);
            }
        }
    }

    /// Writes the backend table and status records, then terminates what must go.
    fn apply(&mut self) {
        let (desired, statuses) = desired_state(&self.config, &self.health, self.settings.all_down);
        for (k, f) in &desired.frontends {
            if f.flags & kha_common::FRONTEND_FALLBACK != 0 {
                let fe = kha::endpoints::socket_addr(&k.addr_be, k.port_be);
                log::error!(
                    "frontend {fe}: every backend failed its probes; serving all of them (--all-down fallback)"
                );
            }
        }
        match sync(&mut self.maps, &desired) {
            Ok(r) if r.writes > 0 => log::debug!("sync: {} map writes", r.writes),
            Ok(_) => {}
            Err(e) => {
                self.settings.recorders.map_update_errors.inc();
                log::error!("sync failed, will retry: {e:#}");
            }
        }
        self.publish(&desired);
        if let Err(e) = self.maps.set_probe_statuses(&statuses) {
            log::warn!("cannot write probe status for `kha status`: {e:#}");
        }
        let victims = std::mem::take(&mut self.terminate_now);
        if !victims.is_empty() {
            self.terminate(&victims);
        }
    }

    /// Hands the endpoints what they report.
    fn publish(&self, desired: &kha::endpoints::Desired) {
        let mut pairs = Vec::new();
        let mut fallback = BTreeMap::new();
        for f in &self.config.frontends {
            let live = desired.frontends.get(&kha::endpoints::key_of(f.address, 0));
            fallback.insert(f.address, live.is_some_and(|l| l.flags & kha_common::FRONTEND_FALLBACK != 0));
            for b in &f.backends {
                let state = self
                    .health
                    .get(&(*b, f.health_path.clone()))
                    .map_or(kha::health::State::Unknown, |h| h.state);
                let serving = live.is_some_and(|l| l.backends.contains(&backend_of(*b)));
                pairs.push(kha::observe::PairState { frontend: f.address, backend: *b, state, serving });
            }
        }
        let mut shared = self.settings.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.agent = kha::observe::Snapshot { pairs, fallback, alive: true };
        shared.last_loop = Some(Instant::now());
    }

    fn terminate(&mut self, backends: &BTreeSet<std::net::SocketAddr>) {
        let Ok(snapshot) = self.maps.snapshot() else { return };
        let wanted: BTreeSet<_> = backends.iter().map(|b| backend_of(*b)).collect();
        let ids: BTreeSet<u32> =
            snapshot.backends.iter().filter(|(_, b)| wanted.contains(b)).map(|(id, _)| *id).collect();
        let cookies = match self.maps.sockets_of(&ids) {
            Ok(c) => c,
            Err(e) => return log::error!("cannot list the sockets of {backends:?}: {e:#}"),
        };
        match loader::destroy_sockets(self.settings.netns.as_deref(), &cookies) {
            Ok(n) => {
                if n > 0 {
                    log::warn!(
                        "terminated {n} connections to {backends:?} so their clients reconnect elsewhere"
                    );
                }
                let _ = self.maps.count_terminated(n as u64);
            }
            Err(e) => log::error!("terminating the connections to {backends:?} failed: {e}"),
        }
    }
}
