//! What the failover bench runs: the load's fixed shape (loop and long-lived clients, the
//! contenders' ports), the phase bounds of each profile ([`Plan`]), the failures applied to a
//! master ([`Failure`]) and the load balancers compared ([`Contender`]).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub(super) const LOOP_INTERVAL_MS: u64 = 20;
/// Deadline of one loop request, connect and handshake included.
pub(super) const LOOP_TIMEOUT_MS: u64 = 5000;
/// A loop request answered after this long is a stall.
pub(super) const STALL_MS: f64 = 1000.0;
pub(super) const KEEP_INTERVAL_MS: u64 = 100;
/// Longer than any phase: a long-lived request is only ended by the load balancer or TCP,
/// as a watch is.
pub(super) const KEEP_TIMEOUT_MS: u64 = 300_000;
pub(super) const KHA_PORT: u16 = 6443;
pub(super) const NGINX_PORT: u16 = 16443;
pub(super) const HAPROXY_PORT: u16 = 26443;

/// How long each phase may last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub profile: String,
    /// Each failure is applied this many times (to a different master each time).
    pub rounds: usize,
    /// N: the fault phase lasts this long at most; what has not happened by then is "> N s".
    pub window_s: f64,
    /// The loop must run clean this long before the failed master counts as left. The fault
    /// phase ends early once every contender has left it and replaced the long-lived
    /// connection.
    pub quiet_s: f64,
    /// Bound on the wait for the recovered master to get traffic again.
    pub recovery_s: f64,
    /// Loops run this long before the fault.
    pub warmup_s: f64,
    /// Bound on the wait for every master to be served before a fault (kha: all `up`).
    pub settle_s: f64,
    /// Wait (up to `settle_s`) until each contender holds a long-lived connection on every
    /// master, i.e. serves every master again; else (--quick) one on the master to fail is
    /// enough after a few tries.
    pub spread: bool,
    /// Against the real control plane (kube-apiserver and etcd) instead of simulated masters.
    #[serde(default)]
    pub real: bool,
}

/// The failures a load balancer may leave a connection on for long: the long profile's.
const LONG_FAILURES: [Failure; 2] = [Failure::Blackholed, Failure::Hung];

impl Plan {
    pub fn full() -> Plan {
        Plan {
            profile: "full".into(),
            rounds: 2,
            window_s: 30.0,
            quiet_s: 10.0,
            recovery_s: 40.0,
            warmup_s: 3.0,
            settle_s: 60.0,
            spread: true,
            real: false,
        }
    }

    /// `--long`: one round of the failures the proxies leave connections on, each with a
    /// 180 s window, to measure how long they really do (the full run's 30 s window only
    /// shows that they still do then). Not in CI: about 10 minutes.
    pub fn long() -> Plan {
        Plan { profile: "long".into(), rounds: 1, window_s: 180.0, ..Plan::full() }
    }

    pub fn is_long(&self) -> bool {
        self.profile == "long"
    }

    /// The failures this profile applies, in order.
    pub fn failures(&self) -> Vec<Failure> {
        if self.is_long() { LONG_FAILURES.to_vec() } else { FAILURES.to_vec() }
    }

    pub fn quick() -> Plan {
        Plan {
            profile: "quick".into(),
            rounds: 1,
            window_s: 10.0,
            quiet_s: 3.0,
            recovery_s: 5.0,
            warmup_s: 1.0,
            settle_s: 30.0,
            spread: false,
            real: false,
        }
    }

    pub(super) fn d(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// SIGKILL: connects are refused, open connections closed by the master's kernel.
    #[default]
    Killed,
    /// The node-side link down: packets to and from the master are lost.
    Blackholed,
    /// `/readyz` answers 500, everything else (`/version`, `/healthz`) still works.
    NotReady,
    /// SIGSTOP: the kernel still accepts connections, nothing answers.
    Hung,
}

pub const FAILURES: [Failure; 4] = [Failure::Killed, Failure::Blackholed, Failure::NotReady, Failure::Hung];

impl Failure {
    pub fn id(self) -> &'static str {
        match self {
            Failure::Killed => "killed",
            Failure::Blackholed => "blackholed",
            Failure::NotReady => "readyz-500",
            Failure::Hung => "hung",
        }
    }

    /// What was done, to a simulated master or (`real`) to a real one.
    pub fn label(self, real: bool) -> &'static str {
        match (self, real) {
            (Failure::Killed, false) => "process killed (refused)",
            (Failure::Killed, true) => "kube-apiserver killed (refused)",
            (Failure::Blackholed, _) => "blackholed (link down)",
            (Failure::NotReady, false) => "`/readyz` 500, still serving",
            (Failure::NotReady, true) => "etcd member killed: `/readyz` 500",
            (Failure::Hung, false) => "hung (SIGSTOP)",
            (Failure::Hung, true) => "kube-apiserver hung (SIGSTOP)",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contender {
    pub id: String,
    pub label: String,
    /// Where the clients connect (in the node namespace).
    pub connect: SocketAddr,
    /// The clients run in kha's cgroup.
    pub in_cgroup: bool,
}

pub fn contenders() -> Vec<Contender> {
    let c = |id: &str, port: u16, in_cgroup| Contender {
        id: id.into(),
        label: id.into(),
        connect: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        in_cgroup,
    };
    vec![c("kha", KHA_PORT, true), c("nginx", NGINX_PORT, false), c("haproxy", HAPROXY_PORT, false)]
}
