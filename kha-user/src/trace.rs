//! `kha trace`, the pure parts: the agent's `/trace` request (duration, frontends), the rate
//! bound, and the records it streams, one JSON object a line, decoded from the kernel's
//! `TraceEvent`s and rendered as text by the CLI. The kernel half is `loader::Tracing`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use kha_common::{
    POLICY_NAMES, PROBE_STATE_NAMES, TRACE_ALL_SUSPECT, TRACE_CHOSEN_SUSPECT, TRACE_INCONSISTENT,
    TRACE_NO_BACKEND, TRACE_OUTCOMES, TRACE_REWRITTEN, TRACE_SKIPPED_SUSPECT, TraceEvent, socket_addr,
};
use serde::{Deserialize, Serialize};

use crate::observe::PairState;

pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
pub const MAX_DURATION: Duration = Duration::from_secs(300);
/// Lines a second a trace sends at most; the rest are counted as dropped.
pub const MAX_LINES_PER_SEC: u32 = 1000;

/// What `GET /trace?duration=10s&frontend=127.0.0.1:6443` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub duration: Duration,
    /// Only connects to these destinations; empty: every connect.
    pub frontends: Vec<SocketAddr>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("duration `{0}`: not a number with s, ms or m (e.g. 10s)")]
    Duration(String),
    #[error("duration {0:?} is over the maximum of {MAX_DURATION:?}")]
    TooLong(Duration),
    #[error("frontend `{0}`: not IP:PORT")]
    Frontend(String),
    #[error("unknown parameter `{0}`: duration and frontend only")]
    Unknown(String),
}

/// `10s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, RequestError> {
    let bad = || RequestError::Duration(s.to_owned());
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if d > MAX_DURATION {
        return Err(RequestError::TooLong(d));
    }
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

impl Request {
    /// From the query string (after `?`); `%5B`/`%5D`/`%3A` as clients escape IPv6 brackets.
    pub fn parse(query: &str) -> Result<Self, RequestError> {
        let mut r = Request { duration: DEFAULT_DURATION, frontends: vec![] };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.replace("%5B", "[").replace("%5D", "]").replace("%3A", ":");
            match k {
                "duration" => r.duration = parse_duration(&v)?,
                "frontend" => r.frontends.push(v.parse().map_err(|_| RequestError::Frontend(v))?),
                _ => return Err(RequestError::Unknown(k.to_owned())),
            }
        }
        Ok(r)
    }

    /// The query string that `parse` reads back.
    pub fn query(&self) -> String {
        let mut q = format!("duration={}ms", self.duration.as_millis());
        for f in &self.frontends {
            q.push_str(&format!("&frontend={f}"));
        }
        q
    }

    pub fn wants(&self, e: &TraceEvent) -> bool {
        self.frontends.is_empty() || self.frontends.contains(&socket_addr(&e.dst_addr_be, e.dst_port_be))
    }
}

/// At most `per_sec` lines in each second since the trace began; the rest are dropped.
#[derive(Debug)]
pub struct RateBound {
    per_sec: u32,
    window: Instant,
    sent: u32,
    pub dropped: u64,
}

impl RateBound {
    pub fn new(per_sec: u32, now: Instant) -> Self {
        Self { per_sec, window: now, sent: 0, dropped: 0 }
    }

    pub fn admit(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.sent = 0;
        }
        if self.sent < self.per_sec {
            self.sent += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// One decision as the agent streams it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: String,
    /// connect4 or connect6.
    pub hook: String,
    /// Where the connect was going.
    pub frontend: SocketAddr,
    /// `TRACE_OUTCOMES`: rewritten; left alone (not-a-frontend, foreign-netns); refused.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Backends the frontend had.
    pub backends: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_id: Option<u32>,
    /// The chosen backend's open connections when chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<u64>,
    /// The chosen backend was marked suspect / a suspect one was passed over / all were.
    #[serde(default)]
    pub suspect: Vec<String>,
    /// The frontend's backends as the agent saw them when it sent the line (not when the
    /// kernel decided: up to a read interval and a map sync earlier), for decisions made by
    /// a frontend (rewritten or refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
}

/// One backend of the traced frontend and the agent's view of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub backend: SocketAddr,
    /// `PROBE_STATE_NAMES`: up, down, draining, suspect, ...
    pub state: String,
    /// In the set new connections are sent to (healthy, or by the all-down fallback).
    pub serving: bool,
}

impl Decision {
    pub fn from_event(e: &TraceEvent) -> Self {
        let chosen = e.outcome == TRACE_REWRITTEN;
        // Refusals and rewrites come from a frontend, which has a policy; the others do not.
        let found = matches!(e.outcome, TRACE_REWRITTEN | TRACE_NO_BACKEND | TRACE_INCONSISTENT);
        let flags = [
            (TRACE_CHOSEN_SUSPECT, "chosen"),
            (TRACE_SKIPPED_SUSPECT, "skipped"),
            (TRACE_ALL_SUSPECT, "all"),
        ];
        Self {
            cgroup_id: e.cgroup_id,
            pid: (e.pid_tgid >> 32) as u32,
            comm: String::from_utf8_lossy(e.comm()).into_owned(),
            hook: format!("connect{}", e.family),
            frontend: socket_addr(&e.dst_addr_be, e.dst_port_be),
            outcome: TRACE_OUTCOMES.get(e.outcome as usize).map_or("unknown", |o| o).to_owned(),
            policy: found.then(|| POLICY_NAMES.get(e.policy as usize).map_or("unknown", |p| p).to_owned()),
            backends: e.count,
            backend: chosen.then(|| socket_addr(&e.backend_addr_be, e.backend_port_be)),
            backend_id: chosen.then_some(e.backend_id),
            active: chosen.then_some(e.active),
            suspect: flags.iter().filter(|(f, _)| e.flags & f != 0).map(|(_, n)| (*n).to_owned()).collect(),
            candidates: Vec::new(),
        }
    }

    /// Adds the frontend's backends from the agent's `pairs`; nothing for a connect no
    /// frontend decided (not a frontend, another network namespace).
    pub fn with_candidates(mut self, pairs: &[PairState]) -> Self {
        if self.policy.is_some() {
            self.candidates = pairs
                .iter()
                .filter(|p| p.frontend == self.frontend)
                .map(|p| Candidate {
                    backend: p.backend,
                    state: PROBE_STATE_NAMES[p.state.code() as usize].to_owned(),
                    serving: p.serving,
                })
                .collect();
        }
        self
    }

    /// One line for people: `curl[4242] cg 1234 connect4 127.0.0.1:6443 -> 192.0.2.1:6443 ...`.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{}[{}] cgroup {} {} {} {}",
            self.comm, self.pid, self.cgroup_id, self.hook, self.frontend, self.outcome
        );
        if let Some(b) = self.backend {
            s.push_str(&format!(" -> {b} (id {})", self.backend_id.unwrap_or(0)));
        }
        if let Some(p) = &self.policy {
            s.push_str(&format!(" policy {p}, {} backends", self.backends));
        }
        if let Some(a) = self.active {
            s.push_str(&format!(", {a} open"));
        }
        if !self.suspect.is_empty() {
            s.push_str(&format!(", suspect: {}", self.suspect.join("+")));
        }
        if !self.candidates.is_empty() {
            let c: Vec<String> = self
                .candidates
                .iter()
                .map(|c| format!("{} {}{}", c.backend, c.state, if c.serving { "" } else { " (not served)" }))
                .collect();
            s.push_str(&format!("; candidates: {}", c.join(", ")));
        }
        s
    }
}

/// Why a trace ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    Duration,
    ClientGone,
    AgentStopping,
}

/// A line of the `/trace` stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Record {
    /// First: the program ids swapped (per connect hook: untraced, traced).
    Start { duration_ms: u64, programs: Vec<(String, u32, u32)> },
    /// Boxed: a decision with its candidates is many times the other records.
    Decision(Box<Decision>),
    /// Last: the untraced programs are back. `dropped` by the rate bound, `lost` by the
    /// kernel (its ring buffer full), `filtered` by the agent: records of other destinations,
    /// which the kernel's own filter leaves out for up to `TRACE_FILTER_MAX` frontends.
    End {
        reason: EndReason,
        lines: u64,
        dropped: u64,
        #[serde(default)]
        lost: u64,
        #[serde(default)]
        filtered: u64,
    },
}

impl Record {
    pub fn text(&self) -> String {
        match self {
            Record::Start { duration_ms, programs } => {
                let p: Vec<String> =
                    programs.iter().map(|(h, u, t)| format!("{h}: prog {u} -> traced {t}")).collect();
                format!("tracing for {} ms ({})", duration_ms, p.join(", "))
            }
            Record::Decision(d) => d.text(),
            Record::End { reason, lines, dropped, lost, .. } => format!(
                "trace ended ({reason:?}): {lines} lines, {dropped} dropped by the rate bound of {MAX_LINES_PER_SEC}/s, {lost} lost in the kernel (ring full); untraced programs back"
            ),
        }
    }
}

#[cfg(test)]
#[path = "trace_tests.rs"]
mod tests;
