//! Dynamic discovery of the masters (`kha run --discover`): the agent watches the EndpointSlices
//! of the `kubernetes` service in `default` through the node's kubeconfig, so masters added to
//! or removed from the cluster are served without a change of kha's config.
//!
//! # Which frontends it feeds
//!
//! Frontends opt in. In a config file a frontend says `discover = true`; with `--frontend` and
//! `--backend` flags every frontend is fed (flags describe one service, the apiserver, whose
//! backends serve every frontend). Matching frontends by port instead was rejected: kubespray's
//! local LB port (`loadbalancer_apiserver_port`) may differ from the masters' port
//! (`kube_apiserver_port`), and a port match could feed apiserver addresses to an etcd frontend.
//! An explicit key says what the operator meant and keeps the etcd LB out of it.
//!
//! # The merge rule ([`Feed`])
//!
//! The static list of a fed frontend (its `backends`, or `--backend`) is the bootstrap and the
//! fallback; what it serves is:
//! - before this run's first successful discovery: the static list, then the set persisted by
//!   the last run (the newest knowledge; a master the static list does not know is still
//!   reachable after a restart, and probes weed out whichever is gone);
//! - after it: the discovered set, replacing the static list, so a removed master leaves;
//! - a discovery that fails, or finds no ready endpoint that the frontend can use, changes
//!   nothing: the last good set stays (or the static list, if there never was one). Discovery
//!   never empties a backend set.
//!
//! Each ready endpoint (`conditions.ready` not false, not terminating) gives one backend: its
//! first address (the API says an endpoint's addresses are fungible) on the slice's port named
//! `https` (the only port when it has one port). An IPv4 frontend takes only IPv4 endpoints; an
//! IPv6 frontend takes both (IPv4 ones v4-mapped), as with static backends.
//!
//! # What discovery is trusted with
//!
//! A backend only discovery names (not in a static list, not in the persisted set) is served
//! only after a probe passed ([`crate::health::State::Unproven`], [`Feed::discovered_only`]);
//! static masters go first when the per-frontend cap cuts; and the API is asked through a
//! master the agent knows, not through kha's own frontend ([`watch`]). `--discover` needs
//! health checks: without them nothing could be proven.
//!
//! # The state file
//!
//! The last good discovered set is kept in `STATE_DIR/discovered.json` (`--state-dir`, default
//! `/var/lib/kha`), replaced atomically (temporary file, fsync, rename) on every change. A
//! missing file is normal; an unreadable or corrupt one is ignored with a warning.
//!
//! Modules: [`slices`] (EndpointSlices -> endpoints, pure), [`feed`] (the merge rule, pure),
//! [`state`] (the state file), [`watch`] (the kube-rs watcher task). The fake API server of
//! the tests lives in the lab (`kha_lab::fake_apiserver`).

pub mod feed;
pub mod slices;
pub mod state;
pub mod watch;
#[cfg(test)]
mod watch_tests;

pub use feed::Feed;

/// The kubelet's kubeconfig, where kubespray and kubeadm put it.
pub const DEFAULT_KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kha";
/// Where the `kubernetes` service lives, and the label its EndpointSlices carry.
pub const NAMESPACE: &str = "default";
pub const LABEL_SELECTOR: &str = "kubernetes.io/service-name=kubernetes";

/// What the watcher tells the agent.
#[derive(Debug)]
pub enum Update {
    /// The current ready endpoints of every slice; may be empty (then nothing changes).
    Discovered(std::collections::BTreeSet<std::net::SocketAddr>),
    /// Discovery is not working; the backend sets stay as they are.
    Failed(watch::DiscoveryError),
}

pub use crate::errors::chain;
