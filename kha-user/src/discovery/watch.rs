//! The watcher task: kube-rs's `watcher` over the `kubernetes` service's EndpointSlices, turned
//! into [`Update`]s for the agent, and the state file kept current.
//!
//! Requests (what a fake server must answer, see [`super::fake`]): a list
//! `GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes&limit=500`,
//! then `...&watch=true&timeoutSeconds=60&allowWatchBookmarks=true&resourceVersion=RV` from the
//! list's resource version, again after each timeout; a new list after an error (kube-rs backs
//! off from 0.8 s to 30 s).

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
use tokio::{sync::mpsc, time::Instant};

use super::{LABEL_SELECTOR, NAMESPACE, Update, chain, slices::{apiserver_slices, ready_endpoints}, state};

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
}

impl WatchSettings {
    pub fn new(kubeconfig: PathBuf, state_dir: Option<PathBuf>) -> Self {
        WatchSettings {
            kubeconfig,
            state_dir,
            watch_timeout: Duration::from_secs(60),
            rebuild_after_errors: Duration::from_secs(60),
            max_client_age: Duration::from_secs(3600),
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
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|source| DiscoveryError::Kubeconfig { path: path.to_owned(), source })?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| DiscoveryError::Kubeconfig { path: path.to_owned(), source })?;
    config.connect_timeout = Some(Duration::from_secs(5));
    Client::try_from(config).map_err(|source| DiscoveryError::Client { path: path.to_owned(), source })
}

struct Reporter {
    tx: mpsc::Sender<Update>,
    settings: WatchSettings,
    sent: Option<BTreeSet<SocketAddr>>,
    saved: Option<BTreeSet<SocketAddr>>,
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

    /// Reports the current set if it changed, and persists it when it is not empty.
    async fn current(&mut self, slices: &BTreeMap<String, EndpointSlice>) -> bool {
        if self.failing_since.take().is_some() {
            log::info!("discovery: watching the kubernetes service's EndpointSlices again");
        }
        let set = ready_endpoints(apiserver_slices(slices.values()));
        if let Some(dir) = &self.settings.state_dir
            && !set.is_empty()
            && self.saved.as_ref() != Some(&set)
        {
            match state::save_off_thread(dir.clone(), set.clone()).await {
                Ok(()) => self.saved = Some(set.clone()),
                Err(e) => log::warn!("discovery: {}", chain(&e)),
            }
        }
        if self.sent.as_ref() == Some(&set) {
            return true;
        }
        self.sent = Some(set.clone());
        self.tx.send(Update::Discovered(set)).await.is_ok()
    }
}

pub async fn run(settings: WatchSettings, tx: mpsc::Sender<Update>) {
    let saved = settings.state_dir.as_deref().and_then(|d| state::load(d).ok().flatten());
    let mut r = Reporter { tx, settings: settings.clone(), sent: None, saved, failing_since: None };
    let mut retry = Duration::from_secs(1);
    loop {
        let client = match client(&settings.kubeconfig).await {
            Ok(c) => c,
            Err(e) => {
                if !r.failed(e).await {
                    return;
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        retry = Duration::from_secs(1);
        if !watch(client, &settings, &mut r).await {
            return;
        }
    }
}

/// One client's watch, until it should be rebuilt (`true`) or the agent is gone (`false`).
async fn watch(client: Client, settings: &WatchSettings, r: &mut Reporter) -> bool {
    let api = Api::<EndpointSlice>::namespaced(client, NAMESPACE);
    let timeout = u32::try_from(settings.watch_timeout.as_secs()).unwrap_or(290).clamp(1, 290);
    let config = watcher::Config::default().labels(LABEL_SELECTOR).timeout(timeout);
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let started = Instant::now();
    let retire = tokio::time::sleep(settings.max_client_age);
    tokio::pin!(retire);
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, EndpointSlice>> = None;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = &mut retire => return true,
        };
        let Some(event) = event else { return true };
        let key = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        let ok = match event {
            Err(e) => {
                if !r.failed(DiscoveryError::Watch(e)).await {
                    return false;
                }
                // At most once per `rebuild_after_errors`: a new client starts without backoff.
                let long = |t: Instant| t.elapsed() >= settings.rebuild_after_errors;
                if r.failing_since.is_some_and(long) && long(started) {
                    log::info!("discovery: building the client anew from {}", settings.kubeconfig.display());
                    return true;
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
            return false;
        }
    }
}
