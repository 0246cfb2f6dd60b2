//! The live timeline of a failover act: what the clients and kha show while a master fails
//! and comes back, printed as it is seen, and what went wrong kept for the verdict.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use kha_lab::bed::Bed;

use super::{
    DRAIN_S,
    client::{Client, Rec},
    failover::Fault,
    kha_view::{Change, View},
    timeline::{Timeline, bad, good},
};

/// How often kha's status is read.
const POLL: Duration = Duration::from_millis(50);

pub struct Watch {
    pub victim: String,
    fault: Fault,
    /// Master name by HTTPS address, to name kha's backends.
    names: BTreeMap<String, String>,
    pub tl: Timeline,
    pub lp: Client,
    /// The long-lived client on the victim.
    pub followed: Client,
    /// The long-lived clients on the other masters, with their master.
    pub others: Vec<(String, Client)>,
    view: View,
    next_poll: Instant,
    loop_seen: usize,
    followed_seen: usize,
    others_seen: Vec<usize>,
    /// kha took the victim out (down or draining).
    pub taken_out: Option<Instant>,
    /// The followed long-lived connection failed a request (it was ended).
    ended: Option<Instant>,
    /// The followed client was answered by another master on a new connection.
    pub moved: Option<Instant>,
    /// The fault was undone.
    pub undone: Option<Instant>,
    /// kha had the victim up again after the undo.
    pub kha_up: Option<Instant>,
    /// A loop call answered by the victim after the undo.
    pub back: Option<Instant>,
    pub problems: Vec<String>,
}

impl Watch {
    /// Starts watching, with kha's view as it is now; the fault comes next.
    pub fn new(
        bed: &Bed,
        victim: String,
        fault: Fault,
        lp: Client,
        followed: Client,
        others: Vec<(String, Client)>,
    ) -> Watch {
        let names = bed.lab.masters().iter().map(|m| (m.https_v4().to_string(), m.name.clone())).collect();
        Watch {
            victim,
            fault,
            names,
            tl: Timeline::new(Instant::now()),
            loop_seen: lp.recs.len(),
            followed_seen: followed.recs.len(),
            others_seen: others.iter().map(|(_, c)| c.recs.len()).collect(),
            lp,
            followed,
            others,
            view: View::read(bed).unwrap_or_default(),
            next_poll: Instant::now(),
            taken_out: None,
            ended: None,
            moved: None,
            undone: None,
            kha_up: None,
            back: None,
            problems: Vec::new(),
        }
    }

    fn name(&self, addr: &str) -> String {
        self.names.get(addr).cloned().unwrap_or_else(|| addr.to_owned())
    }

    /// Shows what happened since the last step.
    pub fn step(&mut self, bed: &Bed) {
        let now = Instant::now();
        if now >= self.next_poll {
            self.next_poll = now + POLL;
            if let Some(view) = View::read(bed) {
                for c in view.changes(&self.view) {
                    self.kha_changed(Instant::now(), c);
                }
                self.view = view;
            }
        }
        self.lp.pull();
        let from = std::mem::replace(&mut self.loop_seen, self.lp.recs.len());
        for i in from..self.lp.recs.len() {
            let r = &self.lp.recs[i];
            if !r.r.ok {
                let (what, counts) = self.loop_failure(r);
                self.tl.at(r.end, if counts { bad(&what) } else { what.clone() });
                if counts {
                    self.problems.push(format!("at {}: {what}", self.tl.secs(r.end)));
                }
            } else if self.back.is_none()
                && self.undone.is_some_and(|u| r.start() >= u)
                && r.master() == Some(self.victim.as_str())
            {
                self.back = Some(r.end);
                self.tl.at(r.end, good(format!("a loop call answered by {} again", self.victim)));
            }
        }
        self.followed.pull();
        let from = std::mem::replace(&mut self.followed_seen, self.followed.recs.len());
        for i in from..self.followed.recs.len() {
            let r = &self.followed.recs[i];
            let (end, error, reused) = (r.end, r.r.error.clone(), r.r.reused);
            let on = r.master().map(str::to_owned);
            if !r.r.ok && self.ended.is_none() {
                self.ended = Some(end);
                let e = error.as_deref().unwrap_or("no answer");
                self.tl.at(
                    end,
                    format!(
                        "long-lived connection on {}: its request got {e}: the connection was ended (a watch \
                         re-opens its stream)",
                        self.victim
                    ),
                );
            } else if !r.r.ok {
                let what = format!("the long-lived client failed again: {}", error.as_deref().unwrap_or("?"));
                self.tl.at(end, bad(&what));
                self.problems.push(what);
            } else if self.moved.is_none() && !reused && on.as_deref() != Some(self.victim.as_str()) {
                self.moved = Some(end);
                let m = on.as_deref().unwrap_or("?");
                let text =
                    format!("long-lived client reconnected: now answered by {m} (it was on {})", self.victim);
                self.tl.at(end, good(text));
            }
        }
        for k in 0..self.others.len() {
            let (m, c) = &mut self.others[k];
            c.pull();
            let from = std::mem::replace(&mut self.others_seen[k], c.recs.len());
            for r in c.recs[from..].iter().filter(|r| !r.r.ok) {
                let e = r.r.error.as_deref().unwrap_or("failed");
                let what = format!("the long-lived connection on {m}, a healthy master, broke: {e}");
                self.tl.at(r.end, bad(&what));
                self.problems.push(what);
            }
        }
        self.tl.print_settled();
    }

    fn kha_changed(&mut self, t: Instant, c: Change) {
        let text = match &c {
            Change::State { backend, state, reason } => {
                let m = self.name(backend);
                let why = reason.as_deref().map_or(String::new(), |r| format!(" ({r})"));
                match state.as_str() {
                    "down" => format!("kha: {m} down{why}: out of the set, its connections terminated now"),
                    "draining" => format!(
                        "kha: {m} not ready{why}: no new connections; open ones get {DRAIN_S} s to finish"
                    ),
                    "up" => format!("kha: {m} up (ready probes in a row)"),
                    s => format!("kha: {m} {s}{why}"),
                }
            }
            Change::Terminated(n) => {
                let (s, whose) =
                    if *n == 1 { ("", "its client reconnects") } else { ("s", "their clients reconnect") };
                format!("kha: terminated {n} connection{s} (sock_diag), so {whose} elsewhere")
            }
        };
        if let Change::State { backend, state, .. } = &c {
            if self.name(backend) != self.victim {
                self.tl.at(t, bad(&text));
                self.problems.push(format!("kha changed a master that was not failed: {text}"));
                return;
            }
            match state.as_str() {
                "down" | "draining" if self.taken_out.is_none() => self.taken_out = Some(t),
                "up" if self.undone.is_some() => self.kha_up = Some(t),
                _ => {}
            }
        }
        self.tl.at(t, text);
    }

    /// What to say about a failed loop call, and whether it counts against kha.
    fn loop_failure(&self, r: &Rec) -> (String, bool) {
        let e = r.r.error.as_deref().unwrap_or("failed");
        let started = self.tl.secs(r.start());
        let v = &self.victim;
        // A kill ends the calls the master is serving at that instant: no load balancer can
        // finish them, their clients retry.
        if self.fault == Fault::Kill && r.start() < self.tl.t0 && r.end >= self.tl.t0 {
            let text = format!(
                "a loop call failed: {e} (begun at {started}, in flight when {v} was killed: the master died \
                 under it; no balancer can save such a call, its client retries)"
            );
            return (text, false);
        }
        // Before kha knows, the first connect to a dead master fails (a proxy would retry it
        // elsewhere); the kernel then marks the master suspect and steers the next connects
        // away. kha knows at once when its probe connection breaks, except within 50 ms of a
        // probe's answer, where a close looks like the server's normal close (docs/health.md).
        let why = match (self.fault, self.taken_out) {
            (Fault::Kill, None) => format!("; kha had not seen {v} die yet"),
            _ => String::new(),
        };
        (format!("a loop call FAILED: {e} (begun at {started}, {:.0} ms){why}", r.r.latency_ms), true)
    }
}
