//! How the demo prints: lines stamped with the seconds since a fault (the moment an operator
//! cares about), and colour for what went well or wrong when stdout is a terminal.

use std::{
    fmt::Display,
    io::IsTerminal as _,
    time::{Duration, Instant},
};

/// Seconds from `t0` to `t`, negative before it.
pub fn rel(t0: Instant, t: Instant) -> f64 {
    if t >= t0 { (t - t0).as_secs_f64() } else { -(t0 - t).as_secs_f64() }
}

/// The events of one act, timed from its fault. Lines wait a moment before they are printed,
/// so that what was seen late (kha's status is polled) still comes out in time order.
pub struct Timeline {
    pub t0: Instant,
    pending: Vec<(Instant, String)>,
}

/// How long a line waits for earlier ones seen later.
const REORDER: Duration = Duration::from_millis(150);

impl Timeline {
    pub fn new(t0: Instant) -> Self {
        Timeline { t0, pending: Vec::new() }
    }

    /// Queues `text`, stamped with when it happened.
    pub fn at(&mut self, t: Instant, text: impl Display) {
        self.pending.push((t, text.to_string()));
    }

    /// Prints, in time order, the lines old enough that nothing earlier can still come.
    pub fn print_settled(&mut self) {
        self.print_before(Instant::now().checked_sub(REORDER).unwrap_or(self.t0));
    }

    /// Prints every line queued.
    pub fn flush(&mut self) {
        self.print_before(Instant::now() + REORDER);
    }

    fn print_before(&mut self, until: Instant) {
        for line in self.take_before(until) {
            println!("{line}");
        }
    }

    /// The lines queued for before `until`, in time order.
    fn take_before(&mut self, until: Instant) -> Vec<String> {
        // Stable: what was seen together keeps the order it was queued in.
        self.pending.sort_by_key(|(t, _)| *t);
        let n = self.pending.partition_point(|(t, _)| *t < until);
        self.pending.drain(..n).map(|(t, text)| format!("   {:>+6.2} s  {text}", rel(self.t0, t))).collect()
    }

    /// Seconds since the fault, for text such as "last answer at +0.31 s".
    pub fn secs(&self, t: Instant) -> String {
        format!("{:+.2} s", rel(self.t0, t))
    }
}

fn paint(text: impl Display, code: &str) -> String {
    if std::io::stdout().is_terminal() { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_string() }
}

pub fn bad(text: impl Display) -> String {
    paint(text, "31;1")
}

pub fn good(text: impl Display) -> String {
    paint(text, "32")
}

/// `m1 5, m3 4`: answers per master.
pub fn tally<'a>(masters: impl IntoIterator<Item = &'a str>) -> String {
    let mut n: std::collections::BTreeMap<&str, u32> = Default::default();
    for m in masters {
        *n.entry(m).or_default() += 1;
    }
    if n.is_empty() {
        return "none".into();
    }
    n.iter().map(|(m, k)| format!("{m} {k}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_signed_and_tallies_sorted() {
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_millis(1500);
        assert!((rel(t0, later) - 1.5).abs() < 1e-9);
        assert!((rel(later, t0) + 1.5).abs() < 1e-9);
        assert_eq!(Timeline::new(later).secs(t0), "-1.50 s");
        let mut tl = Timeline::new(t0);
        tl.at(later, "seen first, happened later");
        tl.at(t0, "the fault");
        tl.at(later, "seen second");
        assert_eq!(tl.take_before(t0), Vec::<String>::new());
        assert_eq!(
            tl.take_before(later + std::time::Duration::from_millis(1)),
            ["    +0.00 s  the fault", "    +1.50 s  seen first, happened later", "    +1.50 s  seen second"]
        );
        assert_eq!(tally(["m3", "m1", "m3"]), "m1 1, m3 2");
        assert_eq!(tally([]), "none");
    }
}
