//! The bench's world: the lab (three masters, simulated or real), kha with health checks on
//! and the two proxies in the node namespace, the faults applied to a master, kha's view of a
//! backend, and the placement of the long-lived connections, one on each master.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::bed::Bed;

use super::{
    client::{self, Client},
    plan::{Contender, Failure, HAPROXY_PORT, KHA_PORT, NGINX_PORT},
    real::Real,
    wait::pause,
};
use crate::{
    bench::proxy::{Proxy, Upstream},
    masters::{self, Masters},
};

const MASTERS: usize = 3;
/// Long-lived clients started per contender to get one on every master, beyond which one
/// on the master to fail is enough.
const PLACE_TRIES: usize = 15;
/// Long-lived clients kept open beyond one per master while placing, at most.
const MAX_SPARES: usize = 12;

/// The lab, the agent (health checks on) and the two proxies. Dropped in field order:
/// proxies, the real control plane and its watchers, then the bed (agent, pins, masters,
/// namespaces).
pub(super) struct World {
    nginx: Proxy,
    haproxy: Proxy,
    pub(super) real: Option<Real>,
    pub(super) bed: Bed,
    pub(super) ca: String,
    pub(super) masters: Vec<String>,
}

fn masters_https(bed: &Bed) -> Vec<SocketAddr> {
    bed.lab.masters().iter().map(|m| m.https_v4()).collect()
}

impl World {
    /// Simulated masters, or (`real`) a real control plane in empty master namespaces.
    pub(super) fn create(real: bool) -> Result<World> {
        let (mut bed, cp) = masters::create(MASTERS, real)?;
        let real = cp.map(Real::new);
        let work = bed.lab.workdir().join("failover");
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let servers = masters_https(&bed);
        let up = |port| {
            vec![Upstream {
                name: "kube_apiserver".into(),
                listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                servers: servers.clone(),
                check_port: None,
            }]
        };
        let node = bed.lab.node_netns().to_owned();
        let nginx = Proxy::start_nginx(&node, &work, &up(NGINX_PORT))?;
        let haproxy = Proxy::start_haproxy(&node, &work, &up(HAPROXY_PORT))?;
        // kha's defaults but for the CA (the lab's) and listening on nothing but the datapath.
        let frontend = SocketAddr::from((Ipv4Addr::LOCALHOST, KHA_PORT));
        let config = work.join("kha.toml");
        fs::write(&config, crate::bench::lab::kha_toml(&[(frontend, servers)], None))
            .context("writing kha's config")?;
        let ca = real.as_ref().map_or(&bed.pki.ca_cert, |r| &r.cp.files.pki.ca_cert).display().to_string();
        let mut args: Vec<String> = [
            "--config",
            &config.display().to_string(),
            "--ca-file",
            &ca,
            "--metrics-addr",
            "none",
            "--health-addr",
            "none",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(r) = &real {
            // The probes authenticate as the node, as kubelet's identity would.
            args.extend(r.probe_identity());
        }
        bed.start_agent(&args).context("starting kha with health checks")?;
        let masters = bed.lab.masters().iter().map(|m| m.name.clone()).collect();
        let mut w = World { nginx, haproxy, real, bed, ca, masters };
        if let Some(r) = &mut w.real {
            r.start_watchers(&w.bed)?;
        }
        Ok(w)
    }

    pub(super) fn real_mut(&mut self) -> Result<&mut Real> {
        self.real.as_mut().context("this needs the real control plane (--real)")
    }

    fn masters(&mut self) -> Masters<'_> {
        Masters { bed: &mut self.bed, real: self.real.as_mut().map(|r| &mut r.cp) }
    }

    /// Fails master `m`.
    pub(super) fn apply(&mut self, f: Failure, m: &str) -> Result<()> {
        let mut ms = self.masters();
        match f {
            Failure::Killed => ms.kill(m),
            Failure::Blackholed => ms.link(m, true),
            Failure::NotReady => ms.not_ready(m),
            Failure::Hung => ms.freeze(m, true),
        }
        .with_context(|| format!("failing {m} ({})", f.id()))
    }

    /// Undoes the fault; returns once the master can serve again (restarted and ready,
    /// reachable, `/readyz` 200 again, continued).
    pub(super) fn undo(&mut self, f: Failure, m: &str) -> Result<()> {
        let mut ms = self.masters();
        match f {
            Failure::Killed => ms.restart(m),
            Failure::Blackholed => ms.link(m, false),
            Failure::NotReady => ms.ready(m),
            Failure::Hung => ms.freeze(m, false),
        }
        .with_context(|| format!("undoing {} on {m}", f.id()))
    }

    pub(super) fn addr_of(&self, master: &str) -> String {
        self.bed.lab.master(master).map(|m| m.https_v4().to_string()).unwrap_or_default()
    }

    /// The state of kha's backend `addr` (`up`, `down`, `draining`, ...).
    pub(super) fn kha_state(&self, addr: &str) -> Option<String> {
        let s = self.bed.status()?;
        s["frontends"]
            .as_array()?
            .iter()
            .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
            .find_map(|b| {
                (b["address"].as_str() == Some(addr)).then(|| b["state"].as_str().unwrap_or("?").to_owned())
            })
    }

    /// Waits until kha has every master `up` and both proxies still run.
    pub(super) fn settle(&mut self, bound: Duration) -> Result<()> {
        for p in [&mut self.nginx, &mut self.haproxy] {
            if !p.running() {
                bail!("{} exited during the bench; its log: {}", p.name, p.log.display());
            }
        }
        let deadline = Instant::now() + bound;
        loop {
            let states: Vec<(String, Option<String>)> =
                self.masters.iter().map(|m| (m.clone(), self.kha_state(&self.addr_of(m)))).collect();
            if states.iter().all(|(_, s)| s.as_deref() == Some("up")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kha did not have every master up within {bound:?}: {states:?}; agent log:\n{}",
                    self.bed.agent_log_text()
                );
            }
            pause(Duration::from_millis(100))?;
        }
    }

    /// Long-lived clients for `c`, one per master where possible; returns the one on
    /// `target`, the others, and the masters they are on.
    pub(super) fn place(
        &self,
        c: &Contender,
        target: &str,
        count: u64,
        spread: bool,
        deadline: Instant,
    ) -> Result<(Client, Vec<Client>)> {
        let mut held: BTreeMap<String, Client> = BTreeMap::new();
        let mut spares = Vec::new();
        let mut tries = 0;
        let mut seen = Vec::new();
        while held.len() < self.masters.len() {
            if held.contains_key(target) && ((tries >= PLACE_TRIES && !spread) || Instant::now() > deadline) {
                eprintln!(
                    "xtask: bench failover: {}: long-lived connections only on {:?} after {tries} tries",
                    c.id,
                    held.keys().collect::<Vec<_>>()
                );
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no long-lived connection landed on {target} after {tries} tries (first answers: {seen:?})",
                    c.id
                );
            }
            if tries >= PLACE_TRIES {
                // The load balancer may not serve the target yet (haproxy's checks are slow).
                pause(Duration::from_millis(250))?;
            }
            tries += 1;
            let mut k = client::spawn(&self.bed, &self.ca, c, true, count)?;
            let first = k
                .first(Duration::from_secs(5), super::wait::stopped)?
                .map(|r| (r.r.ok, r.r.master.clone(), r.r.error.clone()));
            seen.push(
                first.clone().map_or("nothing".into(), |(_, m, e)| m.or(e).unwrap_or_else(|| "?".into())),
            );
            match first {
                Some((true, Some(m), _)) if !held.contains_key(&m) => {
                    held.insert(m, k);
                }
                // On a master that holds one already: kept open, so that a least-connections
                // balancer moves on to a master holding fewer (the real control plane's
                // watchers hold connections of their own).
                Some((true, Some(_), _)) if spares.len() < MAX_SPARES => spares.push(k),
                // Else `k` drops here: killed, its connection closed.
                _ => {}
            }
        }
        let on_target = held.remove(target).context("placed")?;
        Ok((on_target, held.into_values().chain(spares).collect()))
    }
}
