//! EndpointSlice handling (`kha run --discover`): what the API server returns for the
//! `kubernetes` service's slices (JSON, as the watcher receives it) -> the masters they
//! announce -> the backends each fed frontend serves. Anyone allowed to write an EndpointSlice
//! in `default` controls this input: the result must stay a config kha would accept.
//!
//! Input: one EndpointSlice or a JSON array of them.
#![no_main]

use std::{collections::BTreeSet, net::SocketAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kha::{
    config::{Config, FrontendDefaults},
    discovery::{
        Feed, Update,
        slices::{apiserver_slices, ready_endpoints},
    },
};
use kha_common::MAX_BACKENDS_PER_FRONTEND;
use libfuzzer_sys::fuzz_target;

/// Both localhost frontends fed by discovery, with static masters of both families.
const CONFIG: &str = r#"
[[frontend]]
address = "127.0.0.1:6443"
backends = ["192.0.2.11:6443", "192.0.2.12:6443"]
discover = true

[[frontend]]
address = "[::1]:6443"
backends = ["192.0.2.11:6443", "[2001:db8::13]:6443"]
discover = true

[[frontend]]
address = "127.0.0.1:2379"
backends = ["192.0.2.11:2379"]
"#;

fuzz_target!(|data: &[u8]| {
    let slices: Vec<EndpointSlice> = match serde_json::from_slice::<Vec<EndpointSlice>>(data) {
        Ok(v) => v,
        Err(_) => match serde_json::from_slice::<EndpointSlice>(data) {
            Ok(s) => vec![s],
            Err(_) => return,
        },
    };
    let set = ready_endpoints(apiserver_slices(&slices));
    for b in &set {
        assert_ne!(b.port(), 0);
        assert!(!b.ip().is_unspecified() && !b.ip().is_multicast(), "{b} is not unicast");
    }
    let base = Config::from_toml(CONFIG, &FrontendDefaults::default()).expect("the fixed config is valid");
    let mut feed = Feed::new(base.clone(), BTreeSet::new());
    drop(feed.update(Update::Discovered(set.clone())));
    check(feed.effective());
    // As a restarted agent would start from the persisted set.
    let feed = Feed::new(base, set);
    check(feed.effective());
});

/// What the config validation refuses must not come in through discovery.
fn check(config: &Config) {
    let frontends: BTreeSet<SocketAddr> = config.frontends.iter().map(|f| f.address).collect();
    for f in &config.frontends {
        assert!(!f.backends.is_empty(), "frontend {} left without backends", f.address);
        assert!(f.backends.len() <= MAX_BACKENDS_PER_FRONTEND);
        let unique: BTreeSet<_> = f.backends.iter().collect();
        assert_eq!(unique.len(), f.backends.len(), "duplicate backend on {}", f.address);
        for b in &f.backends {
            assert!(!frontends.contains(b), "backend {b} is a frontend");
            assert!(!(f.address.is_ipv4() && b.is_ipv6()), "IPv6 backend {b} on IPv4 frontend {}", f.address);
        }
    }
}
