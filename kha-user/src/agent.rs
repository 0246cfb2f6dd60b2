//! The agent's loop after attach, as wiring: signals, SIGHUP reloads, discovery updates, probe
//! events and deadlines go into the supervisor (`kha::supervise`, where every decision is made
//! and tested), and what it decided goes out to the HTTP endpoints. The only task that writes
//! the maps.

use std::{fs::File, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use kha::{
    config::Config,
    health::{AllDown, Hysteresis},
    loader::{self, PinDir},
    maps::KhaMaps,
    probe::{self, MakeSocket},
    supervise::{self, ProbeSet, SockDestroy, Supervisor},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

pub use kha::supervise::ProbeTemplate;

pub struct Settings {
    /// Where the loop publishes its state for `/metrics`, `/healthz`, `/readyz`.
    pub shared: Arc<std::sync::Mutex<crate::serve::Shared>>,
    pub recorders: kha::observe::Recorders,
    /// `None`: health checks off, every configured backend is served.
    pub probes: Option<ProbeTemplate>,
    pub hysteresis: Hysteresis,
    pub all_down: AllDown,
    pub drain: Duration,
    pub fallback_grace: Duration,
    pub rebalance: Option<Duration>,
    pub resync: Duration,
    pub netns: Option<PathBuf>,
    /// The pinned maps: the terminator opens its own handle on them.
    pub pins: PinDir,
    /// `--discover`: what the watcher reports, merged with the static config.
    pub discovery: Option<Discovery>,
}

pub struct Discovery {
    pub feed: kha::discovery::Feed,
    pub updates: mpsc::Receiver<kha::discovery::Update>,
    /// Where the watcher may reach the API directly, published after every change.
    pub route: tokio::sync::watch::Sender<kha::discovery::watch::Route>,
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
    let (mut feed, mut updates, route) = match settings.discovery.take() {
        Some(d) => (Some(d.feed), Some(d.updates), Some(d.route)),
        None => (None, None, None),
    };
    let mut resync = tokio::time::interval(settings.resync);
    let terminator =
        SockDestroy::new(KhaMaps::open_pinned(&settings.pins.maps())?, settings.netns.as_deref());
    let mut probes = ProbeSet::new(settings.probes.clone(), make_socket, tx, settings.recorders.clone());
    probes.reconcile(&config);
    // Certificate rotation: the probes' TLS files are re-read on their own, not only on SIGHUP.
    let mut tls_check = tokio::time::interval(probe::TLS_CHECK_INTERVAL);
    tls_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let core = supervise::Settings {
        checked: settings.probes.is_some(),
        hysteresis: settings.hysteresis,
        all_down: settings.all_down,
        drain: settings.drain,
        fallback_grace: settings.fallback_grace,
        rebalance: settings.rebalance,
        recorders: settings.recorders.clone(),
    };
    let mut sup = Supervisor::new(core, config, maps, terminator);
    // A backend only discovery names is served once a probe passed (`health::State::Unproven`).
    let replace = |sup: &mut Supervisor<_, _>, probes: &mut ProbeSet, c: Config, feed: &Option<_>| {
        probes.reconcile(&c);
        let only = feed.as_ref().map(kha::discovery::Feed::discovered_only).unwrap_or_default();
        sup.replace_config_from(c, &only);
    };
    loop {
        let deadline = sup.next_deadline();
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                match reload() {
                    Ok(c) => {
                        log::info!("SIGHUP: config reloaded");
                        let c = match &mut feed {
                            Some(f) => f.set_base(c),
                            None => c,
                        };
                        replace(&mut sup, &mut probes, c, &feed);
                    }
                    Err(e) => log::error!("SIGHUP: keeping the running config: {e:#}"),
                }
                probes.check_tls();
            }
            _ = tls_check.tick() => probes.check_tls(),
            Some((target, event)) = rx.recv() => sup.observe(target, event),
            Some(update) = next_update(&mut updates) => match feed.as_mut().and_then(|f| f.update(update)) {
                Some(c) => replace(&mut sup, &mut probes, c, &feed),
                None => continue,
            },
            _ = resync.tick() => sup.resync(),
            () = supervise::sleep_until(deadline) => sup.on_deadline(),
        }
        let mut shared = settings.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.agent = sup.snapshot();
        shared.last_loop = Some(std::time::Instant::now());
        if let Some(tx) = &route {
            let next = kha::discovery::watch::Route {
                frontends: sup.config().frontends.iter().map(|f| f.address).collect(),
                masters: sup.api_candidates(),
            };
            tx.send_if_modified(|r| {
                let changed = *r != next;
                *r = next;
                changed
            });
        }
    }
}
