//! The lab's masters as the demo and the failover bench fail them and bring them back:
//! simulated (`kha-lab master` processes) or, with `--real`, the real control plane (an etcd
//! member and a kube-apiserver per master namespace). One fault means the same to both:
//! killed (connects refused), hung (SIGSTOP, the kernel still accepts), not ready (`/readyz`
//! 500 while it still serves: a simulated mode, or a real apiserver that lost its etcd member).

use std::time::Duration;

use anyhow::{Context as _, Result};
use kha_lab::{
    FailureMode,
    bed::Bed,
    real::{RealControlPlane, RealOptions},
};

/// A lab's masters: the bed's own, or the real control plane's in the bed's empty namespaces.
pub struct Masters<'a> {
    pub bed: &'a mut Bed,
    pub real: Option<&'a mut RealControlPlane>,
}

/// A bed of `n` masters; with `real`, empty namespaces and the real control plane in them
/// (kubespray's defaults: anonymous auth on, no shutdown delay).
pub fn create(n: usize, real: bool) -> Result<(Bed, Option<RealControlPlane>)> {
    if !real {
        return Ok((Bed::create(n).context("building the lab")?, None));
    }
    let bed = Bed::create_empty(n).context("building the lab")?;
    let cp = RealControlPlane::start(&bed.lab, RealOptions::default())
        .context("starting the real control plane")?;
    Ok((bed, Some(cp)))
}

impl Masters<'_> {
    pub fn kill(&mut self, m: &str) -> Result<()> {
        match &mut self.real {
            Some(cp) => cp.kill_apiserver(m)?,
            None => self.bed.lab.kill_master(m)?,
        }
        Ok(())
    }

    /// Starts a killed master again; returns once it is ready.
    pub fn restart(&mut self, m: &str) -> Result<()> {
        match &mut self.real {
            Some(cp) => cp.start_apiserver(m, Duration::ZERO)?,
            None => self.bed.lab.restart_master(m)?,
        }
        Ok(())
    }

    /// `/readyz` 500 while everything else still answers. Real: its etcd member is killed; each
    /// apiserver uses its own member only (kubeadm's stacked etcd).
    pub fn not_ready(&mut self, m: &str) -> Result<()> {
        match &mut self.real {
            Some(cp) => cp.kill_etcd(m)?,
            None => self.bed.lab.set_mode(m, FailureMode::Readyz500)?,
        }
        Ok(())
    }

    /// Undoes [`Masters::not_ready`]; returns once `/readyz` is 200 again.
    pub fn ready(&mut self, m: &str) -> Result<()> {
        match &mut self.real {
            Some(cp) => {
                cp.start_etcd(m)?;
                cp.wait_ready(m)?;
            }
            None => self.bed.lab.set_mode(m, FailureMode::Normal)?,
        }
        Ok(())
    }

    /// SIGSTOP (`hang`) or SIGCONT of the master's server process.
    pub fn freeze(&mut self, m: &str, hang: bool) -> Result<()> {
        match (&mut self.real, hang) {
            (Some(cp), _) => cp.freeze_apiserver(m, hang)?,
            (None, true) => self.bed.lab.stop_master(m)?,
            (None, false) => self.bed.lab.cont_master(m)?,
        }
        Ok(())
    }

    /// The master's link down (`down`) or up again. Up returns once the master can serve: at
    /// once for a simulated one; a real one waits for `/readyz` 200, which takes seconds while
    /// its etcd member, cut off with it, catches up with the others.
    pub fn link(&mut self, m: &str, down: bool) -> Result<()> {
        if down {
            self.bed.lab.link_down(m)?
        } else {
            self.bed.lab.link_up(m)?;
            if let Some(cp) = &mut self.real {
                cp.wait_ready(m)?;
            }
        }
        Ok(())
    }
}
