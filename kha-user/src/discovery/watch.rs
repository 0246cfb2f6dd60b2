//! The watcher task: kube-rs's `watcher` over the `kubernetes` service's EndpointSlices, turned
//! into [`Update`]s for the agent, and the state file kept current.
//!
//! Requests (what a fake server must answer, see [`super::fake`]): a list
//! `GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes&limit=500`,
//! then `...&watch=true&timeoutSeconds=60&allowWatchBookmarks=true&resourceVersion=RV` from the
//! list's resource version, again after each timeout; a new list after an error (kube-rs backs
//! off from 0.8 s to 30 s).
//!
//! # Which apiserver it asks
//!
//! On a node the kubeconfig's server is usually `https://localhost:6443`: kha's own frontend.
//! Discovery must not depend on the set it is meant to repair (a bad set would keep the node
//! from ever seeing the fix), so when the server is one of kha's frontends (`localhost`, or an
//! IP literal, on a frontend's address and port) the client connects to a master the agent
//! knows instead: the agent publishes them best first ([`KnownMasters`], from
//! [`crate::health::api_candidates`]: proven up ones first, never one only discovery named
//! and no probe vouched for). The certificate is still verified against the kubeconfig's CA
//! for the kubeconfig's server name (`localhost`, `127.0.0.1`, ...; kubespray's and kubeadm's
//! serving certificates carry it, as the kubelet's own connections need), or its
//! `tls-server-name` if it has one. When that master fails (an error from the watch, or it
//! leaves the agent's list), the next one is taken; when all have failed, the first again
//! after a backoff. With no master known at all, the kubeconfig's server is used. A server
//! that is not a frontend (a VIP, an external load balancer, a master) is used as it is: kha
//! is not on that path.
//!
//! The agent's own sockets are in the cgroup kha serves when it attaches to the root cgroup
//! (the default; the systemd unit and the DaemonSet do): its connects to a frontend are
//! rewritten like any other. A connect straight to a master's address is not (only frontend
//! addresses are rewritten), which is what both the probes and this client rely on.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::{
    LABEL_SELECTOR, NAMESPACE, Update, chain,
    slices::{apiserver_slices, ready_endpoints},
    state,
};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("a client from kubeconfig {path}")]
    Client {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
    #[error("watching the EndpointSlices of service {NAMESPACE}/kubernetes")]
    Watch(#[source] watcher::Error),
}

#[derive(Clone, Debug)]
pub struct WatchSettings {
    pub kubeconfig: PathBuf,
    /// Where the discovered set is persisted; `None`: not persisted.
    pub state_dir: Option<PathBuf>,
    /// The apiserver ends each watch after this long and the watcher starts the next one; it
    /// also bounds how long a silently dead connection goes unnoticed (plus 5 s).
    pub watch_timeout: Duration,
    /// After failing this long, the client is built anew from the kubeconfig (the kubelet
    /// rotates the client certificate it names; kube-rs reads it once).
    pub rebuild_after_errors: Duration,
    /// And at least this often, so a rotated certificate is picked up before the old expires.
    pub max_client_age: Duration,
    /// The masters the agent knows and its frontends; `None`: always the kubeconfig's server.
    pub known: Option<KnownMasters>,
}

/// What the agent publishes for the watcher: its frontends (is the kubeconfig's server one of
/// them?) and the masters to reach the API on instead, best first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    pub frontends: BTreeSet<SocketAddr>,
    pub masters: Vec<SocketAddr>,
}

pub type KnownMasters = watch::Receiver<Route>;

impl WatchSettings {
    pub fn new(kubeconfig: PathBuf, state_dir: Option<PathBuf>) -> Self {
        WatchSettings {
            kubeconfig,
            state_dir,
            watch_timeout: Duration::from_secs(60),
            rebuild_after_errors: Duration::from_secs(60),
            max_client_age: Duration::from_secs(3600),
            known: None,
        }
    }
}

/// Starts the watcher task on the current runtime; it ends when the receiver is dropped.
pub fn spawn(settings: WatchSettings) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(run(settings, tx));
    rx
}

pub async fn client(path: &std::path::Path) -> Result<Client, DiscoveryError> {
    client_via(path, kube_config(path).await?)
}

async fn kube_config(path: &std::path::Path) -> Result<kube::Config, DiscoveryError> {
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|source| DiscoveryError::Kubeconfig { path: path.to_owned(), source })?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| DiscoveryError::Kubeconfig { path: path.to_owned(), source })?;
    config.connect_timeout = Some(Duration::from_secs(5));
    Ok(config)
}

fn client_via(path: &std::path::Path, config: kube::Config) -> Result<Client, DiscoveryError> {
    Client::try_from(config).map_err(|source| DiscoveryError::Client { path: path.to_owned(), source })
}

/// The kubeconfig server's host, without the brackets of an IPv6 literal.
fn server_host(config: &kube::Config) -> Option<String> {
    let host = config.cluster_url.host()?;
    Some(host.trim_start_matches('[').trim_end_matches(']').to_string())
}

/// Whether the kubeconfig's server is one of kha's frontends: `localhost` or an IP literal on
/// a frontend's address and port. Another name is not resolved (it is not kha's).
pub fn via_frontend(config: &kube::Config, frontends: &BTreeSet<SocketAddr>) -> bool {
    let Some(host) = server_host(config) else { return false };
    let port = config.cluster_url.port_u16().unwrap_or(443);
    let ips: Vec<std::net::IpAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![ip.to_canonical()],
        Err(_) if host.eq_ignore_ascii_case("localhost") => {
            vec![std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()]
        }
        Err(_) => return false,
    };
    ips.into_iter().any(|ip| frontends.iter().any(|f| f.ip().to_canonical() == ip && f.port() == port))
}

/// Points `config` at `master`, verifying the certificate for the name the kubeconfig's server
/// had (or its `tls-server-name`). `false` (and `config` unchanged) if that cannot be done.
pub fn redirect(config: &mut kube::Config, master: SocketAddr) -> bool {
    let Some(name) = config.tls_server_name.clone().or_else(|| server_host(config)) else { return false };
    let Ok(url) = format!("https://{master}").parse() else { return false };
    config.cluster_url = url;
    config.tls_server_name = Some(name);
    true
}

struct Reporter {
    tx: mpsc::Sender<Update>,
    settings: WatchSettings,
    sent: Option<BTreeSet<SocketAddr>>,
    saved: Option<BTreeSet<SocketAddr>>,
    /// The agent's masters, to persist only the discovered ones it vouches for (its own
    /// receiver: `watch`'s tells it when the master it asks leaves the list).
    route: Option<KnownMasters>,
    /// Since when discovery has been failing.
    failing_since: Option<Instant>,
}

impl Reporter {
    /// Reports a failure (logged when it starts); `false` when the agent is gone.
    async fn failed(&mut self, e: DiscoveryError) -> bool {
        if self.failing_since.is_some() {
            log::debug!("discovery: still failing: {}", chain(&e));
            return true;
        }
        log::warn!("discovery failed, the backends stay as they are: {}", chain(&e));
        self.failing_since = Some(Instant::now());
        self.tx.send(Update::Failed(e)).await.is_ok()
    }

    /// Reports the current set if it changed, and persists what of it the agent vouches for.
    async fn current(&mut self, slices: &BTreeMap<String, EndpointSlice>) -> bool {
        if self.failing_since.take().is_some() {
            log::info!("discovery: watching the kubernetes service's EndpointSlices again");
        }
        let set = ready_endpoints(apiserver_slices(slices.values()));
        self.persist(&set).await;
        if self.sent.as_ref() == Some(&set) {
            return true;
        }
        self.sent = Some(set.clone());
        self.tx.send(Update::Discovered(set)).await.is_ok()
    }

    /// Persists the discovered masters the agent vouches for (configured, persisted by the
    /// last run, or passed a verified probe: the agent's route lists exactly those), when that
    /// is not empty. Whoever can write an EndpointSlice must not get an address into the next
    /// start's trusted set; a newcomer is written once its first probe passed (the route
    /// changes then). Without a route (no agent), the set as discovered.
    async fn persist(&mut self, set: &BTreeSet<SocketAddr>) {
        let Some(dir) = &self.settings.state_dir else { return };
        let keep: BTreeSet<SocketAddr> = match &self.route {
            Some(route) => {
                let vouched = &route.borrow().masters;
                set.iter().filter(|b| vouched.contains(b)).copied().collect()
            }
            None => set.clone(),
        };
        if keep.is_empty() || self.saved.as_ref() == Some(&keep) {
            return;
        }
        match state::save_off_thread(dir.clone(), keep.clone()).await {
            Ok(()) => self.saved = Some(keep),
            Err(e) => log::warn!("discovery: {}", chain(&e)),
        }
    }
}

/// How one client's watch ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Time for a new client (its age, errors for long, or its master left the agent's list).
    Rebuild,
    /// The master it talked to directly failed: take the next one. `listed`: it had answered.
    MasterFailed { listed: bool },
    /// The agent is gone.
    Gone,
}

/// The next master to ask: the best one that has not failed since the last that answered.
/// When every one has, they get another round (after a backoff, by the caller).
fn next_master(known: &[SocketAddr], failed: &mut BTreeSet<SocketAddr>) -> (Option<SocketAddr>, bool) {
    if let Some(m) = known.iter().find(|m| !failed.contains(m)) {
        return (Some(*m), false);
    }
    failed.clear();
    (known.first().copied(), !known.is_empty())
}

/// How far apart a fleet's watches that went through a failed master move to the next one.
const MOVE_SPREAD: Duration = Duration::from_secs(1);

pub async fn run(settings: WatchSettings, tx: mpsc::Sender<Update>) {
    let saved = settings.state_dir.as_deref().and_then(|d| state::load(d).ok().flatten());
    let route = settings.known.clone();
    let mut r = Reporter { tx, settings: settings.clone(), sent: None, saved, route, failing_since: None };
    let mut retry = Duration::from_secs(1);
    // Every node sees a master or the API fail in the same second: each waits a random part
    // of its backoff ("equal jitter": half fixed, half random), so the retries of a fleet
    // spread over the window instead of arriving together.
    let mut rng = crate::probe::jitter::Rng::seeded("discovery");
    let mut failed: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut said: Option<Option<SocketAddr>> = None;
    loop {
        let built = match kube_config(&settings.kubeconfig).await {
            Ok(mut config) => {
                let route = settings.known.as_ref().map(|k| k.borrow().clone()).unwrap_or_default();
                let mut master = None;
                if via_frontend(&config, &route.frontends) {
                    let (m, round) = next_master(&route.masters, &mut failed);
                    if round {
                        tokio::time::sleep(rng.between(retry / 2, retry)).await;
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                    master = m.filter(|m| redirect(&mut config, *m));
                    if said != Some(master) {
                        match master {
                            Some(m) => log::info!(
                                "discovery: asking master {m} directly (TLS name {}), not kha's frontend {}",
                                config.tls_server_name.as_deref().unwrap_or("?"),
                                settings.kubeconfig.display()
                            ),
                            None => log::warn!(
                                "discovery: no master known to ask directly; asking the kubeconfig's server {} through kha",
                                config.cluster_url
                            ),
                        }
                        said = Some(master);
                    }
                }
                client_via(&settings.kubeconfig, config).map(|c| (c, master))
            }
            Err(e) => Err(e),
        };
        let (client, master) = match built {
            Ok(c) => c,
            Err(e) => {
                if !r.failed(e).await {
                    return;
                }
                tokio::time::sleep(rng.between(retry / 2, retry)).await;
                retry = (retry * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        match watch(client, master, &settings, &mut r).await {
            End::Gone => return,
            End::Rebuild => retry = Duration::from_secs(1),
            End::MasterFailed { listed } => {
                if listed {
                    failed.clear();
                    retry = Duration::from_secs(1);
                }
                failed.extend(master);
                // The nodes that watched through it move to their next master (each its own:
                // `health::api_candidates` rotates per node) within a second, not at once.
                tokio::time::sleep(rng.between(Duration::ZERO, MOVE_SPREAD)).await;
            }
        }
    }
}

/// One client's watch, until it should be rebuilt or the agent is gone. `master`: the master
/// it talks to directly, left at its first error.
async fn watch(
    client: Client,
    master: Option<SocketAddr>,
    settings: &WatchSettings,
    r: &mut Reporter,
) -> End {
    let api = Api::<EndpointSlice>::namespaced(client, NAMESPACE);
    let timeout = u32::try_from(settings.watch_timeout.as_secs()).unwrap_or(290).clamp(1, 290);
    let config = watcher::Config::default().labels(LABEL_SELECTOR).timeout(timeout);
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let started = Instant::now();
    let retire = tokio::time::sleep(settings.max_client_age);
    tokio::pin!(retire);
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, EndpointSlice>> = None;
    let mut listed = false;
    let mut known = settings.known.clone();
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = &mut retire => return End::Rebuild,
            Some(()) = left(&mut known, master) => {
                log::info!("discovery: master {} is no longer one to ask; taking another", master.map_or_else(String::new, |m| m.to_string()));
                return End::Rebuild;
            }
            Some(()) = changed(&mut r.route) => {
                // A newcomer passed its first probe (or a master was dropped): persist anew.
                if listed {
                    r.persist(&ready_endpoints(apiserver_slices(slices.values()))).await;
                }
                continue;
            }
        };
        let Some(event) = event else { return End::Rebuild };
        let key = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        let ok = match event {
            Err(e) => {
                if !r.failed(DiscoveryError::Watch(e)).await {
                    return End::Gone;
                }
                if let Some(m) = master {
                    log::info!("discovery: master {m} failed; asking the next one");
                    return End::MasterFailed { listed };
                }
                // At most once per `rebuild_after_errors`: a new client starts without backoff.
                let long = |t: Instant| t.elapsed() >= settings.rebuild_after_errors;
                if r.failing_since.is_some_and(long) && long(started) {
                    log::info!("discovery: building the client anew from {}", settings.kubeconfig.display());
                    return End::Rebuild;
                }
                continue;
            }
            Ok(watcher::Event::Init) => {
                listing = Some(BTreeMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(s)) => {
                listing.get_or_insert_default().insert(key(&s), s);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                slices = listing.take().unwrap_or_default();
                listed = true;
                r.current(&slices).await
            }
            Ok(watcher::Event::Apply(s)) => {
                slices.insert(key(&s), s);
                r.current(&slices).await
            }
            Ok(watcher::Event::Delete(s)) => {
                slices.remove(&key(&s));
                r.current(&slices).await
            }
        };
        if !ok {
            return End::Gone;
        }
    }
}

/// Resolves when the agent's list changes; never without one, or when the agent stopped
/// publishing.
async fn changed(route: &mut Option<KnownMasters>) -> Option<()> {
    let Some(rx) = route.as_mut() else { return std::future::pending().await };
    match rx.changed().await {
        Ok(()) => Some(()),
        Err(_) => std::future::pending().await,
    }
}

/// Resolves when `master` (asked directly) leaves the agent's list; never without one, or when
/// the agent stopped publishing.
async fn left(known: &mut Option<KnownMasters>, master: Option<SocketAddr>) -> Option<()> {
    let (Some(rx), Some(m)) = (known.as_mut(), master) else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if !rx.borrow_and_update().masters.contains(&m) {
            return Some(());
        }
    }
}
