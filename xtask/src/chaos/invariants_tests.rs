use std::collections::BTreeMap;

use kha_lab::client::RequestRecord;

use super::*;
use crate::chaos::{settings::Settings, world::BackendView};

const ADDR: &str = "192.0.2.11:6443";

fn ms(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

fn sample(at: Instant, chosen: u64, fallback: bool) -> Sample {
    let b = BackendView { state: "down".into(), serving: false, chosen, active: 0 };
    Sample {
        at,
        backends: BTreeMap::from([(ADDR.to_string(), b)]),
        fallback,
        agent: Some((7, 20, 1000)),
        conns: None,
    }
}

fn rec(end: Instant, latency_ms: f64, master: Option<&str>, error: Option<&str>) -> Rec {
    Rec {
        end,
        r: RequestRecord {
            seq: 0,
            ok: error.is_none(),
            status: error.is_none().then_some(200),
            master: master.map(str::to_owned),
            peer: None,
            local: None,
            reused: false,
            latency_ms,
            error: error.map(str::to_owned),
            detail: None,
        },
    }
}

fn span(t0: Instant, fault: Fault, master: Option<usize>, start: u64, undo: u64) -> Span {
    Span { fault, master, start: ms(t0, start), undo: ms(t0, undo), end: ms(t0, undo + 100), event: 0 }
}

fn check(
    t0: Instant,
    samples: &[Sample],
    spans: &[Span],
    lp: &[Rec],
    long: &[Vec<Rec>],
) -> Vec<&'static str> {
    let names = ["m1".to_string(), "m2".to_string()];
    let addrs = [ADDR.to_string(), "192.0.2.12:6443".to_string()];
    let run = Run {
        t0,
        samples,
        spans,
        event_starts: &[t0],
        loop_recs: lp,
        long,
        names: &names,
        addrs: &addrs,
        w: Settings::soak().windows(),
    };
    run.check().0.into_iter().map(|v| v.invariant).collect()
}

#[test]
fn a_connection_chosen_after_the_window_is_a_violation_and_one_before_is_not() {
    let t0 = Instant::now();
    let hang = [span(t0, Fault::Hang, Some(0), 0, 9000)];
    // hang window 5.9 s: growth at 3 s is allowed, at 7 s not.
    let early =
        [sample(ms(t0, 2800), 5, false), sample(ms(t0, 3000), 6, false), sample(ms(t0, 8000), 6, false)];
    assert!(check(t0, &early, &hang, &[], &[]).is_empty());
    let late = [sample(ms(t0, 6000), 6, false), sample(ms(t0, 7000), 7, false)];
    assert_eq!(check(t0, &late, &hang, &[], &[]), [NEW_CONNECTION]);
    let fallback = [sample(ms(t0, 6000), 6, true), sample(ms(t0, 7000), 7, true)];
    assert!(check(t0, &fallback, &hang, &[], &[]).is_empty());
    // An answer from the hung master on a new connection after the window.
    let answered = [rec(ms(t0, 7010), 10.0, Some("m1"), None)];
    assert_eq!(check(t0, &[], &hang, &answered, &[]), [NEW_CONNECTION]);
}

#[test]
fn refused_connects_are_explained_only_inside_a_kill_window() {
    let t0 = Instant::now();
    let kill = [span(t0, Fault::Kill, Some(0), 1000, 5000)];
    let refused = |at| rec(ms(t0, at), 1.0, None, Some("connect:ECONNREFUSED"));
    assert!(check(t0, &[], &kill, &[refused(1200)], &[]).is_empty());
    assert_eq!(check(t0, &[], &kill, &[refused(4000)], &[]), [FAILED_CONNECT]);
    assert_eq!(check(t0, &[], &[], &[refused(1200)], &[]), [FAILED_CONNECT]);
    let policy = [span(t0, Fault::Policy, None, 1000, 1000)];
    let tls = rec(ms(t0, 1200), 1.0, None, Some("tls:ECONNRESET"));
    assert_eq!(check(t0, &[], &policy, &[tls], &[]), [UNEXPLAINED]);
}

#[test]
fn long_lived_resets_are_judged_by_what_their_master_went_through() {
    let t0 = Instant::now();
    let on_m1 = |err_at| {
        vec![
            rec(ms(t0, 500), 1.0, Some("m1"), None),
            rec(ms(t0, err_at), 1.0, None, Some("response:ECONNRESET")),
        ]
    };
    let all = [span(t0, Fault::AllHung, None, 1000, 6000)];
    assert_eq!(check(t0, &[], &all, &[], &[on_m1(3000)]), [DESTROYED]);
    // After the masters are back: kha's deferred termination, a note.
    assert!(check(t0, &[], &all, &[], &[on_m1(7000)]).is_empty());
    let pause = [span(t0, Fault::Pause, Some(0), 1000, 2500)];
    assert_eq!(check(t0, &[], &pause, &[], &[on_m1(2600)]), [PAUSE]);
    let pause_m2 = [span(t0, Fault::Pause, Some(1), 1000, 2500)];
    assert_eq!(check(t0, &[], &pause_m2, &[], &[on_m1(2600)]), [UNEXPLAINED]);
    let kill = [span(t0, Fault::Kill, Some(0), 1000, 4000)];
    assert!(check(t0, &[], &kill, &[], &[on_m1(1100)]).is_empty());
    // Killed 0.9 s after a pause ended (chaos seed 1796692785547427): the kill ends the
    // socket, not the pause; before the kill began the pause still would be to blame.
    let pause_then_kill =
        [span(t0, Fault::Pause, Some(0), 1000, 2100), span(t0, Fault::Kill, Some(0), 3000, 5800)];
    assert!(check(t0, &[], &pause_then_kill, &[], &[on_m1(3200)]).is_empty());
    assert_eq!(check(t0, &[], &pause_then_kill, &[], &[on_m1(2300)]), [PAUSE]);
}

#[test]
fn agent_growth_that_stays_is_a_violation_and_a_peak_is_a_note() {
    let t0 = Instant::now();
    let s = |at, pid, fds, rss| Sample { agent: Some((pid, fds, rss)), ..sample(ms(t0, at), 0, false) };
    let flat = [s(0, 1, 10, 1000), s(6000, 1, 20, 2000), s(9000, 1, 30, 2000), s(20_000, 1, 36, 2000)];
    assert!(check(t0, &flat, &[], &[], &[]).is_empty());
    // Growth that stays: every one of the last samples 30 fds above warm-up.
    let mut growing = vec![s(0, 1, 10, 1000), s(6000, 1, 20, 2000)];
    growing.extend((0..12).map(|i| s(7000 + i * 200, 1, 50, 2000)));
    growing.push(s(0, 2, 90, 1));
    assert_eq!(check(t0, &growing, &[], &[], &[]), [AGENT_FLAT]);
    // A peak that comes back down within the last samples is a note, not a violation.
    let mut peak = vec![s(0, 1, 10, 1000), s(6000, 1, 20, 2000), s(7000, 1, 20, 40_000)];
    peak.extend((0..10).map(|i| s(8000 + i * 200, 1, 21, 3000)));
    assert!(check(t0, &peak, &[], &[], &[]).is_empty());
    let names = ["m1".to_string()];
    let run = Run {
        t0,
        samples: &peak,
        spans: &[],
        event_starts: &[t0],
        loop_recs: &[],
        long: &[],
        names: &names,
        addrs: &names,
        w: Settings::soak().windows(),
    };
    assert_eq!(run.check().1.iter().map(|v| v.invariant).collect::<Vec<_>>(), [PEAK]);
}
