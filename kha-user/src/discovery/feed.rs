//! The merge rule: a static config plus what discovery found -> the config the agent serves.
//! Pure (it logs); see the module doc of [`crate::discovery`] for the rule in words.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use kha_common::MAX_BACKENDS_PER_FRONTEND;

use super::Update;
use crate::config::{Config, Frontend};

pub struct Feed {
    /// The config from flags or the file: static lists, and which frontends are fed.
    base: Config,
    /// The set the last run discovered, from the state file.
    persisted: BTreeSet<SocketAddr>,
    /// The last non-empty set this run discovered.
    discovered: Option<BTreeSet<SocketAddr>>,
    /// Per fed frontend, the backends it took from the last discovery that gave it any.
    last: BTreeMap<SocketAddr, Vec<SocketAddr>>,
    current: Config,
}

impl Feed {
    pub fn new(base: Config, persisted: BTreeSet<SocketAddr>) -> Self {
        let mut feed =
            Feed { current: base.clone(), base, persisted, discovered: None, last: BTreeMap::new() };
        feed.current = feed.compute();
        feed
    }

    /// The config to serve now.
    pub fn effective(&self) -> &Config {
        &self.current
    }

    /// The backends of the config to serve that only discovery names: not in any static list
    /// and not in the set the last run persisted. They are served only once a probe passed.
    pub fn discovered_only(&self) -> BTreeSet<SocketAddr> {
        let named: BTreeSet<SocketAddr> =
            self.base.frontends.iter().flat_map(|f| f.backends.iter().copied()).collect();
        self.current
            .frontends
            .iter()
            .flat_map(|f| f.backends.iter().copied())
            .filter(|b| !named.contains(b) && !self.persisted.contains(b))
            .collect()
    }

    /// A reloaded static config (SIGHUP): what discovery found still applies to it.
    pub fn set_base(&mut self, base: Config) -> Config {
        let fed: BTreeSet<SocketAddr> =
            base.frontends.iter().filter(|f| f.discover).map(|f| f.address).collect();
        self.base = base;
        self.last.retain(|f, _| fed.contains(f));
        self.refresh();
        self.current = self.compute();
        self.current.clone()
    }

    /// Applies what the watcher reported; `Some` with the new config when it changed.
    pub fn update(&mut self, update: Update) -> Option<Config> {
        match update {
            Update::Failed(_) => None,
            Update::Discovered(set) if set.is_empty() => {
                log::warn!(
                    "discovery: no ready endpoint in the kubernetes service's EndpointSlices; keeping the current backends"
                );
                None
            }
            Update::Discovered(set) => {
                self.discovered = Some(set);
                self.refresh();
                let next = self.compute();
                if next == self.current {
                    return None;
                }
                for (old, new) in self.current.frontends.iter().zip(&next.frontends) {
                    if old.backends != new.backends {
                        let b: Vec<String> = new.backends.iter().map(|b| b.to_string()).collect();
                        log::info!("discovery: frontend {} -> [{}]", new.address, b.join(", "));
                    }
                }
                self.current = next.clone();
                Some(next)
            }
        }
    }

    /// Remembers, per fed frontend, what the discovered set gives it, unless that is nothing.
    fn refresh(&mut self) {
        let Some(discovered) = &self.discovered else { return };
        let frontends = frontend_addresses(&self.base);
        for f in self.base.frontends.iter().filter(|f| f.discover) {
            let mut usable = usable(f, discovered, &frontends);
            // Static masters the discovered set names go first, so no number of other
            // endpoints can push them past the per-frontend limit.
            usable.sort_by_key(|b| !f.backends.contains(b));
            if usable.is_empty() {
                log::warn!(
                    "discovery: nothing frontend {} can use ({} endpoints, {}); keeping its backends",
                    f.address,
                    discovered.len(),
                    if f.address.is_ipv4() { "it takes IPv4 only" } else { "none usable" }
                );
            } else {
                self.last.insert(f.address, cap(f, usable));
            }
        }
    }

    fn compute(&self) -> Config {
        let frontends = frontend_addresses(&self.base);
        let mut c = self.base.clone();
        for f in c.frontends.iter_mut().filter(|f| f.discover) {
            f.backends = match self.last.get(&f.address) {
                Some(found) => found.clone(),
                None => {
                    // Bootstrap: the static list first, then what the last run knew.
                    let mut v = f.backends.clone();
                    for b in usable(f, &self.persisted, &frontends) {
                        if !v.contains(&b) {
                            v.push(b);
                        }
                    }
                    cap(f, v)
                }
            };
        }
        c
    }
}

fn frontend_addresses(c: &Config) -> BTreeSet<SocketAddr> {
    c.frontends.iter().map(|f| f.address).collect()
}

/// The endpoints of `set` frontend `f` can serve: its family (an IPv6 frontend takes both),
/// never a frontend address itself (the connect would be rewritten again).
fn usable(f: &Frontend, set: &BTreeSet<SocketAddr>, frontends: &BTreeSet<SocketAddr>) -> Vec<SocketAddr> {
    set.iter().filter(|b| (f.address.is_ipv6() || b.is_ipv4()) && !frontends.contains(b)).copied().collect()
}

fn cap(f: &Frontend, mut v: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if v.len() > MAX_BACKENDS_PER_FRONTEND {
        log::warn!(
            "discovery: frontend {} would have {} backends; serving the first {MAX_BACKENDS_PER_FRONTEND}",
            f.address,
            v.len()
        );
        v.truncate(MAX_BACKENDS_PER_FRONTEND);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::FrontendDefaults, discovery::watch::DiscoveryError};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn set(v: &[&str]) -> BTreeSet<SocketAddr> {
        v.iter().map(|s| sa(s)).collect()
    }

    fn list(v: &[&str]) -> Vec<SocketAddr> {
        v.iter().map(|s| sa(s)).collect()
    }

    /// A fed v4 and v6 frontend with master 1 static, and an etcd frontend that is not fed.
    fn base() -> Config {
        Config::from_toml(
            r#"
            [[frontend]]
            address = "127.0.0.1:6443"
            backends = ["192.0.2.11:6443"]
            discover = true
            [[frontend]]
            address = "[::1]:6443"
            backends = ["192.0.2.11:6443"]
            discover = true
            [[frontend]]
            address = "127.0.0.1:2379"
            backends = ["192.0.2.11:2379"]
            "#,
            &FrontendDefaults::default(),
        )
        .unwrap()
    }

    fn backends(c: &Config) -> Vec<Vec<SocketAddr>> {
        c.frontends.iter().map(|f| f.backends.clone()).collect()
    }

    fn failed() -> Update {
        Update::Failed(DiscoveryError::Kubeconfig {
            path: "/nonexistent".into(),
            source: kube::config::KubeconfigError::CurrentContextNotSet,
        })
    }

    #[test]
    fn without_discovery_the_static_list_serves() {
        let feed = Feed::new(base(), BTreeSet::new());
        assert_eq!(feed.effective(), &base());
    }

    #[test]
    fn discovered_set_replaces_the_static_list_of_fed_frontends_only() {
        let mut feed = Feed::new(base(), BTreeSet::new());
        let c = feed.update(Update::Discovered(set(&["192.0.2.12:6443", "192.0.2.13:6443"]))).unwrap();
        assert_eq!(
            backends(&c),
            vec![
                list(&["192.0.2.12:6443", "192.0.2.13:6443"]),
                list(&["192.0.2.12:6443", "192.0.2.13:6443"]),
                list(&["192.0.2.11:2379"]),
            ]
        );
        // The same set again changes nothing.
        assert!(feed.update(Update::Discovered(set(&["192.0.2.13:6443", "192.0.2.12:6443"]))).is_none());
        // A master removed leaves.
        let c = feed.update(Update::Discovered(set(&["192.0.2.13:6443"]))).unwrap();
        assert_eq!(backends(&c)[0], list(&["192.0.2.13:6443"]));
    }

    #[test]
    fn empty_or_failed_discovery_never_empties() {
        let mut feed = Feed::new(base(), BTreeSet::new());
        // Before any success: the static list stays.
        assert!(feed.update(Update::Discovered(BTreeSet::new())).is_none());
        assert!(feed.update(failed()).is_none());
        assert_eq!(feed.effective(), &base());
        // After one: the last good set stays.
        feed.update(Update::Discovered(set(&["192.0.2.12:6443"]))).unwrap();
        assert!(feed.update(Update::Discovered(BTreeSet::new())).is_none());
        assert!(feed.update(failed()).is_none());
        assert_eq!(backends(feed.effective())[0], list(&["192.0.2.12:6443"]));
    }

    #[test]
    fn families_and_frontend_addresses() {
        let mut feed = Feed::new(base(), BTreeSet::new());
        // IPv6 only: the IPv4 frontend cannot use it and keeps its static list.
        let c = feed.update(Update::Discovered(set(&["[2001:db8::12]:6443"]))).unwrap();
        assert_eq!(backends(&c)[0], list(&["192.0.2.11:6443"]));
        assert_eq!(backends(&c)[1], list(&["[2001:db8::12]:6443"]));
        // Both families: the IPv6 frontend takes both; a frontend address is never a backend.
        let c = feed
            .update(Update::Discovered(set(&["192.0.2.12:6443", "[2001:db8::12]:6443", "127.0.0.1:6443"])))
            .unwrap();
        assert_eq!(backends(&c)[0], list(&["192.0.2.12:6443"]));
        assert_eq!(backends(&c)[1], list(&["192.0.2.12:6443", "[2001:db8::12]:6443"]));
        // IPv6 only again: the IPv4 frontend keeps its last discovered set, not the static one.
        let c = feed.update(Update::Discovered(set(&["[2001:db8::13]:6443"]))).unwrap();
        assert_eq!(backends(&c)[0], list(&["192.0.2.12:6443"]));
        assert_eq!(backends(&c)[1], list(&["[2001:db8::13]:6443"]));
    }

    #[test]
    fn persisted_set_joins_the_static_list_until_discovery_answers() {
        let persisted = set(&["192.0.2.11:6443", "192.0.2.12:6443", "[2001:db8::13]:6443"]);
        let mut feed = Feed::new(base(), persisted);
        let c = feed.effective().clone();
        assert_eq!(backends(&c)[0], list(&["192.0.2.11:6443", "192.0.2.12:6443"]));
        assert_eq!(backends(&c)[1], list(&["192.0.2.11:6443", "192.0.2.12:6443", "[2001:db8::13]:6443"]));
        assert_eq!(backends(&c)[2], list(&["192.0.2.11:2379"]), "not fed");
        assert!(feed.update(failed()).is_none());
        let c = feed.update(Update::Discovered(set(&["192.0.2.14:6443"]))).unwrap();
        assert_eq!(backends(&c)[0], list(&["192.0.2.14:6443"]));
    }

    #[test]
    fn reload_keeps_what_discovery_found() {
        let mut feed = Feed::new(base(), BTreeSet::new());
        feed.update(Update::Discovered(set(&["192.0.2.12:6443"]))).unwrap();
        let mut reloaded = base();
        reloaded.frontends[1].discover = false;
        reloaded.frontends[2].backends = list(&["192.0.2.12:2379"]);
        let c = feed.set_base(reloaded);
        assert_eq!(
            backends(&c),
            vec![list(&["192.0.2.12:6443"]), list(&["192.0.2.11:6443"]), list(&["192.0.2.12:2379"])]
        );
        // A frontend that becomes fed takes the last discovered set at once.
        let c = feed.set_base(base());
        assert_eq!(backends(&c)[1], list(&["192.0.2.12:6443"]));
    }

    #[test]
    fn static_masters_survive_a_flood_of_endpoints_that_sort_before_them() {
        let mut many: BTreeSet<SocketAddr> = (0..300u32)
            .map(|i| SocketAddr::from(([192, 0, 2, (i % 250) as u8 + 1], 1000 + i as u16)))
            .collect();
        many.extend(set(&["192.0.2.250:6443"]));
        let mut b = base();
        b.frontends[0].backends = list(&["192.0.2.250:6443"]);
        let mut feed = Feed::new(b, BTreeSet::new());
        let c = feed.update(Update::Discovered(many)).unwrap();
        assert_eq!(c.frontends[0].backends.len(), MAX_BACKENDS_PER_FRONTEND);
        assert_eq!(c.frontends[0].backends[0], sa("192.0.2.250:6443"), "the static master is kept first");
    }

    #[test]
    fn only_what_discovery_alone_names_is_discovered_only() {
        let mut feed = Feed::new(base(), set(&["192.0.2.12:6443"]));
        assert!(feed.discovered_only().is_empty(), "the static list and the last run's set are vouched for");
        feed.update(Update::Discovered(set(&["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"])))
            .unwrap();
        assert_eq!(feed.discovered_only(), set(&["192.0.2.13:6443"]));
        // An operator who lists it (SIGHUP) vouches for it.
        let mut named = base();
        named.frontends[0].backends.push(sa("192.0.2.13:6443"));
        feed.set_base(named);
        assert!(feed.discovered_only().is_empty());
    }

    #[test]
    fn at_most_the_per_frontend_limit() {
        let many: BTreeSet<SocketAddr> = (0..300u32)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 6443)))
            .collect();
        let mut feed = Feed::new(base(), BTreeSet::new());
        let c = feed.update(Update::Discovered(many)).unwrap();
        assert_eq!(c.frontends[0].backends.len(), MAX_BACKENDS_PER_FRONTEND);
    }
}
