//! The probe tasks: one per configured (backend, path), all reporting on one shared channel,
//! and the TLS configs they use, reloaded when their files change (certificate rotation; the
//! rules are in `probe::reload`).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::Config,
    errors::chain,
    health::ProbeTarget,
    observe::Recorders,
    probe::{
        self, MakeSocket, ProbeEvent, ProbeSettings, Reload, TlsDefaults, TlsFiles, TlsPublisher, TlsStore,
    },
};

#[derive(Clone)]
pub struct ProbeTemplate {
    /// Which files each frontend's probes use, resolved again at every config reload.
    pub tls: TlsDefaults,
    pub cadence: probe::Cadence,
    pub timeout: Duration,
}

struct Running {
    /// Dropping it stops the probe.
    _stop: oneshot::Sender<()>,
    /// Where a reloaded config goes: the probe takes it at its next new connection.
    tls: TlsPublisher,
}

/// The running probes.
pub struct ProbeSet {
    /// `None`: health checks off.
    template: Option<ProbeTemplate>,
    make_socket: MakeSocket,
    events: mpsc::Sender<(ProbeTarget, ProbeEvent)>,
    running: BTreeMap<ProbeTarget, Running>,
    store: TlsStore,
    /// The last config reconciled: a probe whose files could not be used starts once they can.
    config: Option<Config>,
    recorders: Recorders,
}

impl ProbeSet {
    pub fn new(
        template: Option<ProbeTemplate>,
        make_socket: MakeSocket,
        events: mpsc::Sender<(ProbeTarget, ProbeEvent)>,
        recorders: Recorders,
    ) -> Self {
        Self {
            template,
            make_socket,
            events,
            running: BTreeMap::new(),
            store: TlsStore::default(),
            config: None,
            recorders,
        }
    }

    /// Starts a probe for every configured (backend, path) that has none, stops the rest, and
    /// hands a running probe whose TLS files the new config changed the config from its new
    /// files (without restarting it).
    pub fn reconcile(&mut self, config: &Config) {
        let Some(template) = &self.template else { return };
        self.config = Some(config.clone());
        // The first frontend naming a (backend, path) decides its probe's TLS.
        let mut targets: BTreeMap<ProbeTarget, TlsFiles> = BTreeMap::new();
        for f in &config.frontends {
            for b in &f.backends {
                targets
                    .entry(ProbeTarget::of(f, *b))
                    .or_insert_with(|| template.tls.files_for(config.ca_file.as_deref(), &f.probe_tls));
            }
        }
        self.running.retain(|t, _| targets.contains_key(t));
        let in_use: BTreeSet<&TlsFiles> = targets.values().collect();
        self.store.retain(|f| in_use.contains(f));
        let mut switched = BTreeSet::new();
        for (t, files) in &targets {
            let tls = match self.store.load(files) {
                Ok(tls) => tls,
                Err(error) => {
                    if let Some(e) = error {
                        let e = chain(&e);
                        self.recorders.tls_reload("rejected");
                        match self.running.contains_key(t) {
                            true => log::error!(
                                "probe TLS for {} {}: {e}; keeping the TLS config it has",
                                t.backend,
                                t.path
                            ),
                            false => log::error!(
                                "no probe for {} {}: {e}; it is served unchecked until the file is fixed",
                                t.backend,
                                t.path
                            ),
                        }
                    }
                    continue;
                }
            };
            if let Some(running) = self.running.get(t) {
                if running.tls.send_if_modified(|current| replace(current, &tls)) && switched.insert(files) {
                    log::info!(
                        "probe TLS now from {files}: new probe connections use it, established ones are kept"
                    );
                    self.recorders.tls_reload("reloaded");
                }
                continue;
            }
            self.spawn(t.clone(), tls);
        }
    }

    /// Re-reads the TLS files of every running probe (every [`probe::TLS_CHECK_INTERVAL`], and
    /// on SIGHUP). A file that blocks is not expected: these are small local files.
    pub fn check_tls(&mut self) {
        if self.template.is_none() {
            return;
        }
        let mut any = false;
        for (files, outcome) in self.store.check() {
            match outcome {
                Reload::Reloaded(_) => {
                    any = true;
                    self.recorders.tls_reload("reloaded");
                    log::info!(
                        "probe TLS reloaded ({files}): new probe connections use it, established ones are kept"
                    );
                }
                Reload::Rejected(e) => {
                    self.recorders.tls_reload("rejected");
                    log::error!(
                        "probe TLS files changed but cannot be used, keeping the config in use ({files}): {}",
                        chain(&e)
                    );
                }
            }
        }
        if any && let Some(config) = self.config.take() {
            // Hands the new configs out, and starts probes that were waiting for usable files.
            self.push_reloaded(&config);
            self.reconcile(&config);
        }
    }

    /// Gives each running probe its file set's current config, without counting it again.
    fn push_reloaded(&self, config: &Config) {
        let Some(template) = &self.template else { return };
        for f in &config.frontends {
            let files = template.tls.files_for(config.ca_file.as_deref(), &f.probe_tls);
            let Some(tls) = self.store.current(&files) else { continue };
            for b in &f.backends {
                if let Some(running) = self.running.get(&ProbeTarget::of(f, *b)) {
                    running.tls.send_if_modified(|current| replace(current, &tls));
                }
            }
        }
    }

    fn spawn(&mut self, t: ProbeTarget, tls: Arc<probe::ProbeTlsConfig>) {
        let Some(template) = &self.template else { return };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (publisher, handle) = probe::TlsHandle::channel(tls);
        let mut s = ProbeSettings::new(handle);
        s.path = t.path.clone();
        s.interval = template.cadence.interval;
        s.readiness_interval = template.cadence.readiness_interval;
        s.recheck = template.cadence.recheck;
        s.timeout = template.timeout;
        let stopped = async move {
            let _ = stop_rx.await;
        };
        tokio::spawn(probe::run(
            t.backend,
            s,
            self.make_socket.clone(),
            self.events.clone(),
            t.clone(),
            stopped,
        ));
        self.running.insert(t, Running { _stop: stop_tx, tls: publisher });
    }
}

/// Puts `new` in `current` unless it is already there.
fn replace(current: &mut Arc<probe::ProbeTlsConfig>, new: &Arc<probe::ProbeTlsConfig>) -> bool {
    if Arc::ptr_eq(current, new) {
        return false;
    }
    *current = new.clone();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FrontendDefaults;
    use crate::observe::ReloadLabels;
    use crate::probe::tests::server::{Ca, TempDir};

    fn config(ca_file: &std::path::Path) -> Config {
        let toml = format!(
            "ca_file = \"{}\"\n[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"127.0.0.1:1\"]\n",
            ca_file.display()
        );
        Config::from_toml(&toml, &FrontendDefaults::default()).unwrap()
    }

    fn count(recorders: &Recorders, result: &str) -> u64 {
        recorders.probe_tls_reloads.get_or_create(&ReloadLabels { result: result.into() }).get()
    }

    /// A SIGHUP that names another CA file, and later a rotation of that file, reach the running
    /// probe through its handle: the probe is not restarted, a broken file changes nothing.
    #[tokio::test]
    async fn a_new_ca_reaches_the_running_probe_without_a_restart() {
        let (dir, a, b) = (TempDir::new(), Ca::new("A"), Ca::new("B"));
        let (a_file, b_file) = (dir.write("a.crt", &a.pem()), dir.write("b.crt", &b.pem()));
        let template = ProbeTemplate {
            tls: TlsDefaults::default(),
            cadence: probe::Cadence {
                interval: Duration::from_secs(60),
                readiness_interval: Duration::from_secs(60),
                recheck: Duration::from_secs(60),
            },
            timeout: Duration::from_secs(1),
        };
        let (tx, _rx) = mpsc::channel(16);
        let recorders = Recorders::default();
        let mut set = ProbeSet::new(Some(template), probe::default_socket(), tx, recorders.clone());
        let target: ProbeTarget = ProbeTarget::new("127.0.0.1:1".parse().unwrap(), "/readyz");
        set.reconcile(&config(&a_file));
        let mut seen = set.running[&target].tls.subscribe();
        let first = seen.borrow_and_update().clone();

        set.reconcile(&config(&b_file));
        let files_b = TlsFiles { ca_file: Some(b_file.clone()), ..TlsFiles::default() };
        assert!(seen.has_changed().unwrap(), "the same probe's handle got the new config");
        let second = seen.borrow_and_update().clone();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&second, &set.store.current(&files_b).unwrap()));
        assert_eq!(count(&recorders, "reloaded"), 1);

        std::fs::write(&b_file, "half a certificate").unwrap();
        set.check_tls();
        assert_eq!(count(&recorders, "rejected"), 1);
        assert!(!seen.has_changed().unwrap(), "a broken file changes nothing");
        assert!(Arc::ptr_eq(&second, &set.running[&target].tls.borrow()));

        std::fs::write(&b_file, a.pem()).unwrap();
        set.check_tls();
        assert_eq!(count(&recorders, "reloaded"), 2);
        assert!(seen.has_changed().unwrap());
        assert_eq!(set.running.len(), 1);
    }
}
