//! Doing an event to the world, and the spans it leaves: which fault was on which master
//! from when to when. The invariants are judged against these spans afterwards, so this file
//! only acts and stamps; every wait in it is bounded.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kha_lab::FailureMode;
use serde::Serialize;

use super::{
    plan::Event,
    wait::pause,
    world::{World, backends},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    Kill,
    Hang,
    Blackhole,
    Pause,
    NotReady,
    Flap,
    /// Every master hung / not ready: `master` is `None`.
    AllHung,
    AllNotReady,
    Removed,
    /// No agent ran (SIGKILL or SIGTERM until the next one attached).
    AgentDown,
    Policy,
}

/// One fault, from the instant it was applied to the instant its undo was issued (`undo`)
/// and returned (`end`: restarted and ready, link reachable, SIGCONT sent, ...).
#[derive(Debug, Clone)]
pub struct Span {
    pub fault: Fault,
    pub master: Option<usize>,
    pub start: Instant,
    pub undo: Instant,
    pub end: Instant,
    pub event: usize,
}

/// Applies a fault to master `master` (`set(.., true)`), holds it `hold_ms`, undoes it
/// (`set(.., false)`); returns when it was applied and when the undo began.
fn held(
    w: &mut World,
    master: usize,
    hold_ms: u64,
    set: impl Fn(&mut World, &str, bool) -> Result<()>,
) -> Result<(Instant, Instant)> {
    let m = w.names[master].clone();
    let t = Instant::now();
    set(w, &m, true)?;
    pause(Duration::from_millis(hold_ms))?;
    let u = Instant::now();
    set(w, &m, false)?;
    Ok((t, u))
}

/// Does `ev` (the `idx`-th event) to `w`, pushing its spans; returns a note for the table.
pub fn apply(w: &mut World, ev: &Event, idx: usize, spans: &mut Vec<Span>) -> Result<String> {
    let name = |w: &World, m: usize| w.names[m].clone();
    let span =
        |fault, master, start, undo| Span { fault, master, start, undo, end: Instant::now(), event: idx };
    let ms = |ms: u64| Duration::from_millis(ms);
    match ev {
        Event::Kill { master, hold_ms } => held(w, *master, *hold_ms, |w, m, on| match on {
            true => w.masters().kill(m),
            false => w.masters().restart(m),
        })
        .map(|(t, u)| spans.push(span(Fault::Kill, Some(*master), t, u)))?,
        Event::Hang { master, hold_ms } | Event::ShortPause { master, pause_ms: hold_ms } => {
            let (t, u) = held(w, *master, *hold_ms, |w, m, on| w.masters().freeze(m, on))?;
            let f = if matches!(ev, Event::Hang { .. }) { Fault::Hang } else { Fault::Pause };
            spans.push(span(f, Some(*master), t, u));
        }
        Event::Blackhole { master, hold_ms } => {
            held(w, *master, *hold_ms, |w, m, on| w.masters().link(m, on))
                .map(|(t, u)| spans.push(span(Fault::Blackhole, Some(*master), t, u)))?
        }
        Event::NotReady { master, hold_ms } => held(w, *master, *hold_ms, |w, m, on| match on {
            true => w.masters().not_ready(m),
            false => w.masters().ready(m),
        })
        .map(|(t, u)| spans.push(span(Fault::NotReady, Some(*master), t, u)))?,
        Event::ReadyzFlap { master, flaps, bad_ms, good_ms } => {
            let m = name(w, *master);
            let t = Instant::now();
            for i in 0..*flaps {
                w.masters().not_ready(&m)?;
                pause(ms(*bad_ms))?;
                w.masters().ready(&m)?;
                if i + 1 < *flaps {
                    pause(ms(*good_ms))?;
                }
            }
            let u = Instant::now();
            spans.push(span(Fault::Flap, Some(*master), t, u));
        }
        Event::AllDown { hang, hold_ms } => {
            let names = w.names.clone();
            let t = Instant::now();
            for m in &names {
                if *hang {
                    w.masters().freeze(m, true)?;
                } else {
                    w.bed.lab.set_mode(m, FailureMode::Readyz500)?;
                }
            }
            pause(ms(*hold_ms))?;
            let u = Instant::now();
            for m in &names {
                if *hang {
                    w.masters().freeze(m, false)?;
                } else {
                    w.masters().ready(m)?;
                }
            }
            spans.push(span(if *hang { Fault::AllHung } else { Fault::AllNotReady }, None, t, u));
        }
        Event::AgentKill { down_ms } => {
            let before = w.bed.prog_ids();
            let t = Instant::now();
            w.stop_agent(libc::SIGKILL)?;
            pause(ms(*down_ms))?;
            let u = Instant::now();
            w.start_agent()?;
            spans.push(span(Fault::AgentDown, None, t, u));
            return Ok(format!("programs {before:?} -> {:?}", w.bed.prog_ids()));
        }
        Event::Upgrade => {
            let before = w.bed.prog_ids();
            let t = Instant::now();
            w.stop_agent(libc::SIGTERM)?;
            w.start_agent()?;
            let after = w.bed.prog_ids();
            spans.push(span(Fault::AgentDown, None, t, t));
            if after.iter().any(|id| before.contains(id)) {
                bail!("the restarted agent did not replace the programs: {before:?} -> {after:?}");
            }
            return Ok(format!("programs {before:?} -> {after:?} under the same links"));
        }
        Event::SighupRemove { master, hold_ms } => {
            let addr = w.addrs[*master].clone();
            w.removed = Some(*master);
            w.write_config()?;
            let t = Instant::now();
            w.sighup()?;
            let removal = applied(w, |s| !backends(s).0.get(&addr).is_some_and(|b| b.serving))?;
            pause(ms(*hold_ms))?;
            w.removed = None;
            w.write_config()?;
            let u = Instant::now();
            w.sighup()?;
            let back = applied(w, |s| backends(s).0.get(&addr).is_some_and(|b| b.serving))?;
            spans.push(span(Fault::Removed, Some(*master), t, u));
            return Ok(format!("removal applied in {removal:.2} s, re-add in {back:.2} s"));
        }
        Event::SighupPolicy { policy } => {
            w.policy = policy.clone();
            w.write_config()?;
            let t = Instant::now();
            w.sighup()?;
            let want = policy.clone();
            let took = applied(w, move |s| {
                s["frontends"]
                    .as_array()
                    .is_some_and(|f| f.iter().all(|f| f["policy"].as_str() == Some(&want)))
            })?;
            spans.push(span(Fault::Policy, None, t, t));
            return Ok(format!("applied in {took:.2} s"));
        }
    }
    Ok(String::new())
}

/// Waits (at most 5 s) until `kha status` satisfies `done`; returns how long it took.
fn applied(w: &World, done: impl Fn(&serde_json::Value) -> bool) -> Result<f64> {
    let t = Instant::now();
    let bound = Duration::from_secs(5);
    loop {
        if w.status().is_some_and(|s| done(&s)) {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > bound {
            return Err(anyhow::anyhow!("not applied within {bound:?}")).context(format!(
                "a SIGHUP config change; agent log:\n{}",
                tail(&w.bed.agent_log_text(), 3000)
            ));
        }
        pause(Duration::from_millis(50))?;
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
