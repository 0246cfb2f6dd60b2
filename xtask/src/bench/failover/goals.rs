//! The detection issue's goals for kha, judged on every run: per failure, the worst round's
//! figure against its bound, "met" or "not met". Figures, never assertions: `verify` checks
//! only that the cells exist.

use std::fmt::Write as _;

use super::{outcome::Outcome, plan::Failure, report::FailoverReport};
use crate::bench::report::num;

/// One goal: which figure of which failure, and its bound in seconds.
struct Goal {
    failure: Failure,
    what: &'static str,
    bound_s: f64,
    figure: fn(&Outcome) -> Option<f64>,
}

fn left(o: &Outcome) -> Option<f64> {
    o.left_s
}

fn replaced(o: &Outcome) -> Option<f64> {
    o.replaced_s
}

fn back(o: &Outcome) -> Option<f64> {
    o.back_s
}

const GOALS: [Goal; 9] = [
    Goal { failure: Failure::Hung, what: "no new connection to it after", bound_s: 1.5, figure: left },
    Goal {
        failure: Failure::Hung,
        what: "long-lived connection moved after",
        bound_s: 3.0,
        figure: replaced,
    },
    Goal { failure: Failure::Blackholed, what: "no new connection to it after", bound_s: 1.5, figure: left },
    Goal {
        failure: Failure::Blackholed,
        what: "long-lived connection moved after",
        bound_s: 2.0,
        figure: replaced,
    },
    Goal { failure: Failure::NotReady, what: "no new connection to it after", bound_s: 1.5, figure: left },
    Goal { failure: Failure::Killed, what: "back in use after the undo", bound_s: 0.5, figure: back },
    Goal { failure: Failure::Hung, what: "back in use after the undo", bound_s: 0.5, figure: back },
    Goal { failure: Failure::Blackholed, what: "back in use after the undo", bound_s: 0.5, figure: back },
    Goal { failure: Failure::NotReady, what: "back in use after the undo", bound_s: 0.5, figure: back },
];

/// The goals table for kha's outcomes (failures the run did not have are left out).
pub fn table(r: &FailoverReport) -> String {
    let mut m = String::from(
        "\nGoals (kha, default settings; the worst round counts; \"> N s\": not within the window):\n\n\
         | failure | goal | bound | kha | met |\n|---|---|---|---|---|\n",
    );
    for g in GOALS.iter().filter(|g| r.failures.contains(&g.failure)) {
        let figures: Vec<Option<f64>> = r
            .outcomes
            .iter()
            .filter(|o| o.contender == "kha" && o.failure == g.failure)
            .map(g.figure)
            .collect();
        if figures.is_empty() {
            continue;
        }
        // Missing (never happened within the window) counts as worse than any figure.
        let worst = figures.iter().map(|f| f.unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
        let shown = if worst.is_finite() { format!("{} s", num(worst)) } else { "> window".into() };
        let met = if worst <= g.bound_s { "met" } else { "not met" };
        let _ = writeln!(
            m,
            "| {} | {} | ≤ {} s | {shown} | {met} |",
            g.failure.label(r.plan.real),
            g.what,
            num(g.bound_s)
        );
    }
    m
}
