//! The long profile's verdict: how many times longer the best proxy leaves a long-lived
//! connection on a failed master than kha does. A proxy that still held it when the window
//! closed counts as the window, and the ratio is then a lower bound ("≥"), never a made-up
//! figure.

use std::fmt::Write as _;

use super::{
    plan::Failure,
    report::{FailoverReport, secs},
};

/// A contender's worst round for `failure`: `None` if in some round it never replaced the
/// connection within the window.
fn worst(r: &FailoverReport, failure: Failure, contender: &str) -> Option<f64> {
    let times: Vec<Option<f64>> = r
        .outcomes
        .iter()
        .filter(|o| o.failure == failure && o.contender == contender)
        .map(|o| o.replaced_s)
        .collect();
    if times.is_empty() || times.iter().any(Option::is_none) {
        return None;
    }
    times.into_iter().flatten().reduce(f64::max)
}

/// "×N" or "≥ ×N": the best proxy's time over kha's.
fn ratio(kha: Option<f64>, proxies: &[Option<f64>], window: f64) -> String {
    let Some(k) = kha.filter(|k| *k > 0.0) else {
        return "– (kha did not move it within the window)".into();
    };
    match proxies.iter().flatten().copied().reduce(f64::min) {
        Some(best) => format!("×{:.0}", best / k),
        None => format!("≥ ×{:.0}", window / k),
    }
}

pub fn table(r: &FailoverReport) -> String {
    let w = r.plan.window_s;
    let mut m = String::new();
    let _ = writeln!(
        m,
        "\nHow much sooner kha moves the long-lived connection off the failed master than the best proxy, worst \
         round of each (a proxy still holding it when the {w} s window closed counts as {w} s, and the ratio is a \
         lower bound, \"≥\"):\n"
    );
    let _ = writeln!(m, "| failure | kha | proxies | ratio (best proxy / kha) |\n|---|---|---|---|");
    for f in &r.failures {
        let proxies: Vec<(&str, Option<f64>)> = r
            .contenders
            .iter()
            .filter(|c| c.id != "kha")
            .map(|c| (c.id.as_str(), worst(r, *f, &c.id)))
            .collect();
        let kha = worst(r, *f, "kha");
        let cells: Vec<String> = proxies.iter().map(|(id, t)| format!("{id} {}", secs(*t, w))).collect();
        let times: Vec<Option<f64>> = proxies.iter().map(|(_, t)| *t).collect();
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} |",
            f.label(r.plan.real),
            secs(kha, w),
            cells.join(", "),
            ratio(kha, &times, w)
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::ratio;

    #[test]
    fn a_proxy_that_never_moved_gives_a_lower_bound_and_the_best_proxy_counts() {
        assert_eq!(ratio(Some(4.0), &[None, None], 180.0), "≥ ×45");
        assert_eq!(ratio(Some(4.0), &[None, Some(40.0)], 180.0), "×10");
        assert_eq!(ratio(Some(4.0), &[Some(60.0), Some(40.0)], 180.0), "×10");
        assert!(ratio(None, &[Some(40.0)], 180.0).starts_with('–'));
    }
}
