//! The config file (`kha run --config FILE`): TOML text -> a validated [`Config`], or an error
//! that names the field. Whatever is accepted must keep the promises the kernel side relies on.
#![no_main]

use std::collections::BTreeSet;

use kha::config::{Config, FrontendDefaults};
use kha_common::{MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND, MAX_FRONTENDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::from_toml(text, &FrontendDefaults::default()) {
        Err(e) => drop(e.to_string()),
        Ok(config) => check(&config),
    }
});

/// What `validate` promises of an accepted config.
fn check(config: &Config) {
    let frontends: BTreeSet<_> = config.frontends.iter().map(|f| f.address).collect();
    assert!(!config.frontends.is_empty() && config.frontends.len() <= MAX_FRONTENDS);
    assert_eq!(frontends.len(), config.frontends.len(), "duplicate frontend");
    let mut distinct = BTreeSet::new();
    for f in &config.frontends {
        assert!(f.backends.len() <= MAX_BACKENDS_PER_FRONTEND);
        assert_ne!(f.address.port(), 0);
        let own: BTreeSet<_> = f.backends.iter().collect();
        assert_eq!(own.len(), f.backends.len(), "duplicate backend");
        for b in &f.backends {
            assert_ne!(b.port(), 0);
            assert!(!frontends.contains(b), "backend {b} is a frontend");
            assert!(!(f.address.is_ipv4() && b.is_ipv6()), "IPv6 backend {b} on IPv4 frontend");
            distinct.insert(*b);
        }
        assert!(f.health_path.starts_with('/') && f.health_path.len() <= 256);
        assert_eq!(f.probe_tls.client_cert.is_some(), f.probe_tls.client_key.is_some());
    }
    assert!(distinct.len() <= MAX_BACKENDS);
}
