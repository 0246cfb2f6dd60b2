//! kha-lab: a simulated Kubernetes control plane for kha's demo, end-to-end
//! tests and benchmarks.
//!
//! - [`pki`], [`tls`]: a run-time CA and per-master server certificates; rustls configs.
//! - [`master`]: a fake kube-apiserver (TLS HTTP/1.1 health and version
//!   endpoints, failure modes from [`mode`]) usable in-process or as
//!   `kha-lab master`.
//! - [`client`], [`connect`]: the node-side HTTPS client and raw TCP
//!   connector behind `kha-lab client` / `kha-lab connect`, with JSON output
//!   documented in their module docs.
//! - [`load`]: bounded load generators behind `kha-lab load`, used by `cargo xtask bench`.
//! - [`netns`], [`topology`]: namespaces, processes inside them, and [`Lab`],
//!   the node + N masters topology (root only).
//! - [`real`]: a real control plane (etcd + kube-apiserver per master) in a lab's namespaces.
//!
//! Everything but `netns`/`topology` works unprivileged, which is how the
//! unit tests run.

pub mod bed;
pub mod client;
pub mod connect;
pub mod errno;
pub mod fake_apiserver;
pub mod http;
pub mod load;
pub mod master;
pub mod mode;
pub mod netns;
pub mod pki;
pub mod real;
pub mod tls;
pub mod topology;

pub use mode::FailureMode;
pub use pki::{MasterIdentity, Pki, PkiPaths};
pub use topology::{Lab, LabSpec};
