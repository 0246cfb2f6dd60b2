//! The agent's decisions: probe events shape health, health shapes the backend table, and the
//! sockets of failed or removed backends are terminated. No I/O of its own: the table goes
//! through [`Datapath`] (the pinned maps, or a fake), sockets through [`Terminator`], and time
//! is tokio's, so every rule is tested with a fake of each and paused time (`tests.rs`).
//!
//! The binary feeds it from one select loop: probe events, config changes, the resync tick,
//! and a sleep until [`Supervisor::next_deadline`].

mod fallback;
mod local;
mod pending;
mod probes;
mod rebalance;
mod terminate;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use kha_common::{Backend, FRONTEND_FALLBACK, ProbeKey, ProbeStatus, ServiceKey, socket_addr};
use tokio::time::Instant;

use crate::{
    config::{Config, Frontend},
    health::{AllDown, BackendHealth, Change, Hysteresis, ProbeTarget, State},
    observe::{AgentState, PairState, Recorders},
    probe::{ProbeEvent, ProbeFailure},
    table::{BackendTable, Desired, desired_state, sync},
};
use fallback::FallbackGrace;
use local::LocalWarnings;
use pending::{Pending, Verdict, Why};
use rebalance::Rebalance;

pub use probes::{ProbeSet, ProbeTemplate};
pub use terminate::{SockDestroy, TerminateError, Terminator};

/// A (frontend, backend) pair. Sockets are terminated per pair: the connect hook recorded both
/// for every socket, and whether moving them helps depends on the frontend's other backends.
pub type Pair = (SocketAddr, SocketAddr);

/// The backend table plus what the supervisor writes besides it.
pub trait Datapath: BackendTable {
    /// Lifts the kernel's suspicion (a failed connect) of backend `id`; `true` if there was one.
    fn lift_suspicion(&mut self, id: u32) -> Result<bool, Self::Error>;
    /// Replaces the probe statuses `kha status` shows.
    fn set_probe_statuses(&mut self, statuses: &BTreeMap<ProbeKey, ProbeStatus>) -> Result<(), Self::Error>;
}

pub struct Settings {
    /// Health checks on (else every backend is `Unchecked` and served).
    pub checked: bool,
    pub hysteresis: Hysteresis,
    pub all_down: AllDown,
    /// How long a draining or removed backend keeps its sockets.
    pub drain: Duration,
    /// How long a frontend stays on the all-down fallback after a backend serves again, unless
    /// most do ([`fallback`]).
    pub fallback_grace: Duration,
    /// How often one long-lived connection per frontend is moved off its most loaded master
    /// ([`rebalance`]); `None`: never.
    pub rebalance: Option<Duration>,
    pub recorders: Recorders,
}

pub struct Supervisor<T, X> {
    settings: Settings,
    config: Config,
    table: T,
    terminator: X,
    health: BTreeMap<ProbeTarget, BackendHealth>,
    pending: Pending,
    /// What the last apply wanted, for [`Supervisor::snapshot`].
    desired: Desired,
    /// Backends no longer configured that open sockets still point at. They stay in the
    /// backend table, so their ids are not given to new backends: sock_ops counts a socket's
    /// close against the id the connect hook recorded, and a new backend with that id would
    /// take the old sockets' decrements (and, for a failed connect, the kernel's suspicion).
    retired: BTreeSet<SocketAddr>,
    local_warnings: LocalWarnings,
    grace: FallbackGrace,
    rebalance: Rebalance,
    /// This node's place in the order discovery asks masters in ([`crate::health::node_spread`]).
    spread: u64,
}

impl<T: Datapath, X: Terminator> Supervisor<T, X> {
    /// Takes over a table that already serves `config` (the binary syncs it before attaching).
    pub fn new(settings: Settings, config: Config, table: T, terminator: X) -> Self {
        let grace = FallbackGrace::new(settings.fallback_grace);
        let rebalance = Rebalance::new(settings.rebalance, Instant::now());
        let mut s = Self {
            settings,
            config: Config { frontends: Vec::new(), ca_file: None, fleet_size: None },
            table,
            terminator,
            health: BTreeMap::new(),
            pending: Pending::default(),
            desired: Desired::default(),
            retired: BTreeSet::new(),
            local_warnings: LocalWarnings::default(),
            grace,
            rebalance,
            spread: crate::health::node_spread(),
        };
        s.set_config(config, &BTreeSet::new());
        s.adopt_orphans();
        s
    }

    /// Sockets a previous run redirected to masters this config no longer names (removed while
    /// no agent ran, or by a config change the agent was restarted for): treated as if they had
    /// just been removed, so they keep their backend ids and are terminated after the drain
    /// time, under the same rules. Without this they would stay on that master until their
    /// clients closed them, and a new backend could take their id.
    fn adopt_orphans(&mut self) {
        let open = match self.terminator.open_per_pair() {
            Ok(open) => open,
            Err(e) => return log::warn!("cannot list the sockets the last run redirected: {}", chain(&e)),
        };
        let configured = pairs_of(&self.config);
        let deadline = Instant::now() + self.settings.drain;
        for (pair, n) in open.into_iter().filter(|(p, n)| *n > 0 && !configured.contains(p)) {
            log::info!(
                "{n} connections {}->{} from the last run go to a backend this config does not name: they end in {:?}",
                pair.0,
                pair.1,
                self.settings.drain
            );
            self.retired.insert(pair.1);
            self.pending.at(pair, Why::Removed, deadline);
        }
        self.retired.retain(|b| !configured.iter().any(|(_, c)| c == b));
        self.apply();
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn health(&self, target: &ProbeTarget) -> Option<&BackendHealth> {
        self.health.get(target)
    }

    pub fn table(&self) -> &T {
        &self.table
    }

    pub fn terminator(&self) -> &X {
        &self.terminator
    }

    /// When [`Supervisor::on_deadline`] is due next.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.pending.next_deadline(), self.grace.next_deadline(), self.rebalance.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// A deadline from [`Supervisor::next_deadline`] passed.
    pub fn on_deadline(&mut self) {
        self.apply();
        if self.rebalance.due(Instant::now()) {
            self.rebalance_round();
        }
    }

    /// One connection moved per unbalanced frontend ([`rebalance`]).
    fn rebalance_round(&mut self) {
        let open = match self.terminator.open_per_pair() {
            Ok(open) => open,
            Err(e) => return log::warn!("rebalance: cannot count the open connections: {}", chain(&e)),
        };
        let on_fallback = self.on_fallback();
        for m in rebalance::moves(&self.config, &self.health, &self.desired, &on_fallback, &open) {
            let (f, b) = m.pair;
            match self.terminator.terminate_oldest(&m.pair, 1) {
                Ok(n) => {
                    self.settings.recorders.rebalanced.inc_by(n as u64);
                    log::info!(
                        "rebalance: moved {n} connection of {f} off {b} ({} open), towards {} ({} open)",
                        m.from,
                        m.toward,
                        m.to
                    );
                }
                Err(e) => log::warn!("rebalance: cannot end a connection {f}->{b}: {}", chain(&e)),
            }
        }
    }

    /// The frontends the last apply put on the all-down fallback.
    fn on_fallback(&self) -> BTreeSet<SocketAddr> {
        let on = |f: &&Frontend| {
            self.desired
                .frontends
                .get(&ServiceKey::at(f.address, 0))
                .is_some_and(|l| l.flags & FRONTEND_FALLBACK != 0)
        };
        self.config.frontends.iter().filter(on).map(|f| f.address).collect()
    }

    /// The periodic resync: repairs the table if something else changed it, and lets go of
    /// removed backends no socket points at any more.
    pub fn resync(&mut self) {
        if !self.retired.is_empty() {
            match self.terminator.backends_in_use() {
                Ok(in_use) => self.retired.retain(|b| in_use.contains(b)),
                Err(e) => log::warn!("cannot tell which removed backends sockets still use: {}", chain(&e)),
            }
        }
        self.apply();
    }

    /// A new config (SIGHUP) whose every backend the operator named. Pairs it no longer names
    /// keep their sockets for the drain time.
    pub fn replace_config(&mut self, config: Config) {
        self.replace_config_from(config, &BTreeSet::new());
    }

    /// A new config of which `discovered_only` are named by discovery alone (not configured,
    /// not in the last run's set): those that are new start [`State::Unproven`] and are served
    /// only once a probe passed.
    pub fn replace_config_from(&mut self, config: Config, discovered_only: &BTreeSet<SocketAddr>) {
        let now = Instant::now();
        let before = pairs_of(&self.config);
        self.set_config(config, discovered_only);
        let after = pairs_of(&self.config);
        let backends = |pairs: &BTreeSet<Pair>| pairs.iter().map(|(_, b)| *b).collect::<BTreeSet<_>>();
        let still = backends(&after);
        self.retired.extend(backends(&before).difference(&still));
        self.retired.retain(|b| !still.contains(b));
        // A master taken out of the config may be going away: let its connections finish
        // their work for the drain time, then move them.
        for gone in before.difference(&after) {
            log::info!(
                "backend {} removed from frontend {}: its connections end in {:?}",
                gone.1,
                gone.0,
                self.settings.drain
            );
            self.pending.at(*gone, Why::Removed, now + self.settings.drain);
        }
        for kept in &after {
            self.pending.cancel_if(kept, Why::Removed);
        }
        self.apply();
    }

    fn set_config(&mut self, config: Config, discovered_only: &BTreeSet<SocketAddr>) {
        let targets: BTreeSet<ProbeTarget> =
            config.frontends.iter().flat_map(|f| f.backends.iter().map(|b| ProbeTarget::of(f, *b))).collect();
        self.health.retain(|t, _| targets.contains(t));
        let checked = self.settings.checked;
        for t in targets {
            // Without health checks nothing can be proven (the binary refuses --discover
            // then); a new backend is unchecked, whoever named it.
            let only_discovered = checked && discovered_only.contains(&t.backend);
            let h = self.health.entry(t).or_insert_with(|| match only_discovered {
                true => BackendHealth::discovered(SystemTime::now()),
                false => BackendHealth::new(checked, SystemTime::now()),
            });
            if !only_discovered {
                h.vouch();
            }
        }
        self.config = config;
    }

    /// Where discovery may reach the API directly, best first (see
    /// [`crate::health::api_candidates`]).
    pub fn api_candidates(&self) -> Vec<SocketAddr> {
        crate::health::api_candidates(&self.config, &self.health, self.spread)
    }

    /// One probe result.
    pub fn observe(&mut self, target: ProbeTarget, event: ProbeEvent) {
        self.note(&target, &event);
        self.apply();
    }

    fn note(&mut self, target: &ProbeTarget, event: &ProbeEvent) {
        let now = Instant::now();
        let Some(h) = self.health.get_mut(target) else { return };
        let was_unauthorized = h.unauthorized;
        let change = h.observe(event, self.settings.hysteresis, SystemTime::now());
        if let Some(f) = event.failure().filter(|f| f.is_local()) {
            let error = match f {
                ProbeFailure::Io { errno: Some(e), .. } => e.to_string(),
                f => f.to_string(),
            };
            self.settings.recorders.local_error(target.backend, error);
            self.local_warnings.warn(target.backend, f, now);
            return;
        }
        if let ProbeEvent::Ready { latency } | ProbeEvent::Failed { latency, .. } = event {
            self.settings.recorders.probe(target.backend, *latency);
        }
        let backend = target.backend;
        let reason = h.last_failure.clone().unwrap_or_else(|| "?".into());
        let serves = h.state.serves();
        match (was_unauthorized, h.unauthorized) {
            (before, Some(code)) if before != Some(code) => log::warn!(
                "probe of {backend} not authorized ({code}): {} cannot be checked; configure the node's client certificate (client_cert and client_key in the config file, or --client-cert and --client-key) to check readiness. It answers, so it is served as up meanwhile",
                target.path
            ),
            (Some(_), None) => log::info!("probe of {backend} is authorized again"),
            _ => {}
        }
        let answered = matches!(event, ProbeEvent::Ready { .. }) || h.unauthorized.is_some();
        let pairs = self.pairs_probed_by(target);
        match change {
            Change::WentDown => {
                log::warn!("backend {backend} is down: {reason}");
                pairs.iter().for_each(|p| self.pending.now(*p, Why::Down));
            }
            Change::WentDraining => {
                log::warn!(
                    "backend {backend} is not ready ({reason}): no new connections, existing ones end in {:?}",
                    self.settings.drain
                );
                pairs.iter().for_each(|p| self.pending.at(*p, Why::Draining, now + self.settings.drain));
            }
            Change::WentSuspect => log::warn!(
                "backend {backend} is suspect ({reason}): no new connections, existing ones kept until the probes say whether it is down"
            ),
            Change::WentUp => {
                log::info!("backend {backend} is up");
                pairs.iter().for_each(|p| self.pending.cancel(p));
            }
            Change::None => {}
        }
        if answered && serves {
            self.clear_suspect(backend);
        }
    }

    /// The pairs whose frontend probes `target`'s backend on `target`'s path.
    fn pairs_probed_by(&self, ProbeTarget { backend, path }: &ProbeTarget) -> Vec<Pair> {
        let probed = |f: &&Frontend| f.health_path == *path && f.backends.contains(backend);
        self.config.frontends.iter().filter(probed).map(|f| (f.address, *backend)).collect()
    }

    /// A ready probe disproves the kernel's suspicion from a failed connect.
    fn clear_suspect(&mut self, backend: SocketAddr) {
        let Ok(snapshot) = self.table.snapshot() else { return };
        let want = Backend::from(backend);
        for (id, _) in snapshot.backends.iter().filter(|(_, b)| **b == want) {
            if self.table.lift_suspicion(*id).unwrap_or(false) {
                log::info!("backend {backend}: probe ready, cleared the kernel's suspicion");
            }
        }
    }

    /// Writes the backend table and status records, then terminates what is due.
    fn apply(&mut self) {
        let was = self.on_fallback();
        let held = self.grace.held(Instant::now(), &self.config, &self.health, |f| was.contains(&f));
        let (mut desired, statuses) =
            desired_state(&self.config, &self.health, self.settings.all_down, &held);
        desired.keep.extend(self.retired.iter().map(|b| Backend::from(*b)));
        for (k, f) in &desired.frontends {
            if f.flags & FRONTEND_FALLBACK != 0 {
                let fe = socket_addr(&k.addr_be, k.port_be);
                log::error!(
                    "frontend {fe}: every backend failed its probes; serving all of them (--all-down fallback)"
                );
            }
        }
        match sync(&mut self.table, &desired) {
            Ok(r) if r.writes > 0 => log::debug!("sync: {} map writes", r.writes),
            Ok(_) => {}
            Err(e) => {
                self.settings.recorders.map_update_errors.inc();
                log::error!("sync failed, will retry: {}", chain(&e));
            }
        }
        self.desired = desired;
        if let Err(e) = self.table.set_probe_statuses(&statuses) {
            log::warn!("cannot write probe status for `kha status`: {}", chain(&e));
        }
        let on_fallback = self.on_fallback();
        let (config, health) = (&self.config, &self.health);
        let settled = self
            .pending
            .settle(Instant::now(), self.settings.drain, |p| verdict(config, health, &on_fallback, p));
        for ((f, b), why) in &settled.held {
            log::warn!(
                "not terminating the connections {f}->{b} ({why:?}): no other backend of {f} is up to take them, they would only come back"
            );
        }
        for ((f, b), _) in &settled.forgotten {
            log::info!("frontend {f} is no longer served: its connections to {b} are left alone");
        }
        for ((f, b), why) in &settled.restarted {
            log::info!(
                "another backend of {f} is up: the connections {f}->{b} ({why:?}) end in {:?}",
                self.settings.drain
            );
        }
        if !settled.terminate.is_empty() {
            self.terminate(&settled.terminate);
        }
    }

    fn terminate(&mut self, pairs: &BTreeSet<Pair>) {
        let names = || pairs.iter().map(|(f, b)| format!("{f}->{b}")).collect::<Vec<_>>().join(", ");
        match self.terminator.terminate(pairs) {
            Ok(0) => {}
            Ok(n) => {
                log::warn!("terminated {n} connections ({}) so their clients reconnect elsewhere", names())
            }
            Err(e) => log::error!("terminating the connections {} failed: {}", names(), chain(&e)),
        }
    }

    /// What `/metrics`, `/healthz` and `/readyz` report.
    pub fn snapshot(&self) -> AgentState {
        let mut pairs = Vec::new();
        let on_fallback = self.on_fallback();
        let fallback =
            self.config.frontends.iter().map(|f| (f.address, on_fallback.contains(&f.address))).collect();
        for f in &self.config.frontends {
            let live = self.desired.frontends.get(&ServiceKey::at(f.address, 0));
            for b in &f.backends {
                let state = self.health.get(&ProbeTarget::of(f, *b)).map_or(State::Unknown, |h| h.state);
                let serving = live.is_some_and(|l| l.backends.contains(&Backend::from(*b)));
                pairs.push(PairState { frontend: f.address, backend: *b, state, serving });
            }
        }
        AgentState { pairs, fallback, alive: true }
    }
}

/// Sleeps until `at` (a [`Supervisor::next_deadline`]); forever if there is none.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether terminating `pair`'s sockets helps: only if the frontend is not on the all-down
/// fallback, the pair's backend is not on its way back, and another of its backends is proven up (not just unprobed, not failing) to take
/// the reconnects. Otherwise every node of the cluster would, in the same second, send every
/// client straight back to the masters it had (or, on the fallback, to any of them, the dead
/// ones included), for nothing but a relist storm.
fn verdict(
    config: &Config,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
    on_fallback: &BTreeSet<SocketAddr>,
    (frontend, backend): &Pair,
) -> Verdict {
    let Some(f) = config.frontends.iter().find(|f| f.address == *frontend) else {
        return Verdict::Forget;
    };
    if on_fallback.contains(frontend) {
        return Verdict::Hold;
    }
    // Its own last probe passed: it is coming back (masters recovering from one event pass
    // their probes within a moment of each other), and moving its sockets now would reset
    // them onto whichever master answered first, on every node. A failed probe ends the wait.
    if health.get(&ProbeTarget::of(f, *backend)).is_some_and(BackendHealth::recovering) {
        return Verdict::Hold;
    }
    let up = |b: &SocketAddr| health.get(&ProbeTarget::of(f, *b)).is_some_and(BackendHealth::proven);
    if f.backends.iter().any(|b| b != backend && up(b)) { Verdict::Move } else { Verdict::Hold }
}

/// Every (frontend, backend) pair `config` names.
fn pairs_of(config: &Config) -> BTreeSet<Pair> {
    config.frontends.iter().flat_map(|f| f.backends.iter().map(|b| (f.address, *b))).collect()
}

use crate::errors::chain;
