//! Probe events as the health and supervisor tests feed them: one constructor per kind of
//! outcome, so both test the same events.

use std::time::Duration;

use super::{Phase, ProbeEvent, ProbeFailure};

pub fn ready() -> ProbeEvent {
    ProbeEvent::Ready { latency: Duration::from_millis(2) }
}

pub fn refused() -> ProbeEvent {
    ProbeEvent::Failed { failure: ProbeFailure::Refused, latency: Duration::from_millis(1) }
}

pub fn timeout() -> ProbeEvent {
    ProbeEvent::Failed {
        failure: ProbeFailure::Timeout { phase: Phase::Response },
        latency: Duration::from_secs(3),
    }
}

/// `/readyz` 500, as kube-apiserver answers when etcd is lost.
pub fn not_ready() -> ProbeEvent {
    ProbeEvent::Failed {
        failure: ProbeFailure::Status { code: 500, line: "[-]etcd failed: reason withheld".into() },
        latency: Duration::from_millis(3),
    }
}

/// No answer for the whole silence: a stopped or cut-off master.
pub fn silent() -> ProbeEvent {
    ProbeEvent::Failed {
        failure: ProbeFailure::Silent { waited: super::SILENT_AFTER },
        latency: super::SILENT_AFTER,
    }
}

pub fn slow() -> ProbeEvent {
    ProbeEvent::Slow { waited: super::SLOW_AFTER }
}

pub fn alive() -> ProbeEvent {
    ProbeEvent::Alive { latency: Duration::from_millis(1500) }
}
