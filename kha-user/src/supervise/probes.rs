//! The probe tasks: one per configured (backend, path), all reporting on one shared channel.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::{Config, ProbeTls},
    health::ProbeTarget,
    probe::{self, MakeSocket, ProbeConfigError, ProbeEvent, ProbeSettings},
};

/// The TLS client config for a frontend's probe settings (its own files, or the global ones).
pub type TlsFor = Arc<dyn Fn(&ProbeTls) -> Result<Arc<rustls::ClientConfig>, ProbeConfigError> + Send + Sync>;

#[derive(Clone)]
pub struct ProbeTemplate {
    pub tls_for: TlsFor,
    pub interval: Duration,
    pub timeout: Duration,
}

/// The running probes.
pub struct ProbeSet {
    /// `None`: health checks off.
    template: Option<ProbeTemplate>,
    make_socket: MakeSocket,
    events: mpsc::Sender<(ProbeTarget, ProbeEvent)>,
    /// Dropping a sender stops that probe.
    running: BTreeMap<ProbeTarget, oneshot::Sender<()>>,
}

impl ProbeSet {
    pub fn new(
        template: Option<ProbeTemplate>,
        make_socket: MakeSocket,
        events: mpsc::Sender<(ProbeTarget, ProbeEvent)>,
    ) -> Self {
        Self { template, make_socket, events, running: BTreeMap::new() }
    }

    /// Starts a probe for every configured (backend, path) that has none, stops the rest.
    pub fn reconcile(&mut self, config: &Config) {
        let Some(template) = &self.template else { return };
        // The first frontend naming a (backend, path) decides its probe's TLS.
        let mut targets: BTreeMap<ProbeTarget, &ProbeTls> = BTreeMap::new();
        for f in &config.frontends {
            for b in &f.backends {
                targets.entry((*b, f.health_path.clone())).or_insert(&f.probe_tls);
            }
        }
        self.running.retain(|t, _| targets.contains_key(t));
        for (t, tls) in targets {
            if self.running.contains_key(&t) {
                continue;
            }
            let tls = match (template.tls_for)(tls) {
                Ok(tls) => tls,
                Err(e) => {
                    let e = super::causes(&e);
                    log::error!("no probe for {} {}: {e}; it is served unchecked", t.0, t.1);
                    continue;
                }
            };
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let mut s = ProbeSettings::new(tls);
            s.path = t.1.clone();
            s.interval = template.interval;
            s.timeout = template.timeout;
            let stopped = async move {
                let _ = stop_rx.await;
            };
            tokio::spawn(probe::run(
                t.0,
                s,
                self.make_socket.clone(),
                self.events.clone(),
                t.clone(),
                stopped,
            ));
            self.running.insert(t, stop_tx);
        }
    }
}
