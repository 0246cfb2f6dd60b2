//! Ctrl-C (or SIGTERM) during the bench: the loops and waits check [`stopped`] or wait with
//! [`pause`], so that an interrupt ends the run soon and drops its processes and namespaces.

use std::{
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::bench::run::STOP;

/// An error once the bench was interrupted.
pub(super) fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Waits `d`, returning early with an error on Ctrl-C.
pub(super) fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        stopped()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}
