use std::time::{Duration, Instant};

use kha_common::{
    POLICY_P2C, TRACE_FOREIGN_NETNS, TRACE_NO_BACKEND, TRACE_NOT_A_FRONTEND, TRACE_REWRITTEN,
    TRACE_SKIPPED_SUSPECT, TraceEvent, v4_mapped,
};

use super::*;

fn v4(a: [u8; 4]) -> [u8; 16] {
    v4_mapped(u32::from_ne_bytes(a))
}

fn event(outcome: u8) -> TraceEvent {
    let mut e = TraceEvent::ZERO;
    e.cgroup_id = 4321;
    e.pid_tgid = (777u64 << 32) | 778;
    e.comm[..7].copy_from_slice(b"kubelet");
    e.family = 4;
    e.dst_addr_be = v4([127, 0, 0, 1]);
    e.dst_port_be = 6443u16.to_be();
    e.outcome = outcome;
    e
}

#[test]
fn a_rewrite_decodes_with_its_backend_policy_and_suspicion() {
    let mut e = event(TRACE_REWRITTEN);
    e.policy = POLICY_P2C;
    e.count = 3;
    e.backend_addr_be = v4([192, 0, 2, 7]);
    e.backend_port_be = 6444u16.to_be();
    e.backend_id = 9;
    e.active = 5;
    e.flags = TRACE_SKIPPED_SUSPECT;
    let d = Decision::from_event(&e);
    assert_eq!(d.pid, 777, "the tgid, not the thread");
    assert_eq!(d.comm, "kubelet");
    assert_eq!(d.hook, "connect4");
    assert_eq!(d.frontend, "127.0.0.1:6443".parse().unwrap());
    assert_eq!(d.backend, Some("192.0.2.7:6444".parse().unwrap()));
    assert_eq!((d.backend_id, d.active, d.policy.as_deref()), (Some(9), Some(5), Some("p2c")));
    assert_eq!(d.suspect, vec!["skipped"]);
    assert_eq!(
        d.text(),
        "kubelet[777] cgroup 4321 connect4 127.0.0.1:6443 rewritten -> 192.0.2.7:6444 (id 9) policy p2c, 3 backends, 5 open, suspect: skipped"
    );
}

#[test]
fn left_alone_has_no_policy_or_backend_and_a_refusal_has_a_policy() {
    for outcome in [TRACE_NOT_A_FRONTEND, TRACE_FOREIGN_NETNS] {
        let d = Decision::from_event(&event(outcome));
        assert_eq!((d.policy, d.backend, d.backend_id, d.active), (None, None, None, None));
    }
    let d = Decision::from_event(&event(TRACE_NO_BACKEND));
    assert_eq!((d.outcome.as_str(), d.policy.as_deref(), d.backend), ("no-backend", Some("random"), None));
    let mut bad = event(TRACE_REWRITTEN);
    bad.outcome = 200;
    assert_eq!(Decision::from_event(&bad).outcome, "unknown");
}

#[test]
fn candidates_are_the_traced_frontends_backends_as_the_agent_sees_them() {
    use crate::{health::State, observe::PairState};
    let pair = |frontend: &str, backend: &str, state, serving| PairState {
        frontend: frontend.parse().unwrap(),
        backend: backend.parse().unwrap(),
        state,
        serving,
    };
    let pairs = [
        pair("127.0.0.1:6443", "192.0.2.11:6443", State::Up, true),
        pair("127.0.0.1:6443", "192.0.2.12:6443", State::Suspect, false),
        pair("127.0.0.1:7000", "192.0.2.13:6443", State::Up, true),
        pair("127.0.0.1:6443", "192.0.2.14:6443", State::Down, true),
    ];
    let mut e = event(TRACE_REWRITTEN);
    e.count = 3;
    e.backend_addr_be = v4([192, 0, 2, 11]);
    e.backend_port_be = 6443u16.to_be();
    let d = Decision::from_event(&e).with_candidates(&pairs);
    let seen: Vec<_> =
        d.candidates.iter().map(|c| (c.backend.to_string(), c.state.as_str(), c.serving)).collect();
    assert_eq!(
        seen,
        [
            ("192.0.2.11:6443".to_owned(), "up", true),
            ("192.0.2.12:6443".to_owned(), "suspect", false),
            ("192.0.2.14:6443".to_owned(), "down", true),
        ],
        "the other frontend's backend is not a candidate"
    );
    assert!(
        d.text().ends_with(
            "; candidates: 192.0.2.11:6443 up, 192.0.2.12:6443 suspect (not served), 192.0.2.14:6443 down"
        ),
        "{}",
        d.text()
    );
    // A refusal has its candidates too (why there was nothing to choose); a connect no
    // frontend decided has none.
    assert_eq!(Decision::from_event(&event(TRACE_NO_BACKEND)).with_candidates(&pairs).candidates.len(), 3);
    for outcome in [TRACE_NOT_A_FRONTEND, TRACE_FOREIGN_NETNS] {
        assert!(Decision::from_event(&event(outcome)).with_candidates(&pairs).candidates.is_empty());
    }
    let line = serde_json::to_string(&Record::Decision(Box::new(d.clone()))).unwrap();
    assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), Record::Decision(Box::new(d)));
}

#[test]
fn records_round_trip_through_their_json_lines() {
    let records = [
        Record::Start { duration_ms: 10_000, programs: vec![("connect4".into(), 10, 20)] },
        Record::Decision(Box::new(Decision::from_event(&event(TRACE_REWRITTEN)))),
        Record::End { reason: EndReason::ClientGone, lines: 3, dropped: 1, lost: 2, filtered: 4 },
    ];
    for r in records {
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r, "{line}");
    }
    let end = Record::End { reason: EndReason::AgentStopping, lines: 0, dropped: 0, lost: 0, filtered: 0 };
    let json = r#"{"type":"end","reason":"agent-stopping","lines":0,"dropped":0,"lost":0,"filtered":0}"#;
    assert_eq!(serde_json::to_string(&end).unwrap(), json);
    let without_lost = r#"{"type":"end","reason":"agent-stopping","lines":0,"dropped":0}"#;
    assert_eq!(serde_json::from_str::<Record>(without_lost).unwrap(), end);
}

#[test]
fn requests_parse_defaults_units_frontends_and_refuse_the_rest() {
    assert_eq!(Request::parse("").unwrap(), Request { duration: DEFAULT_DURATION, frontends: vec![] });
    let r = Request::parse("duration=2m&frontend=127.0.0.1:6443&frontend=%5B::1%5D%3A6443").unwrap();
    assert_eq!(r.duration, Duration::from_secs(120));
    assert_eq!(r.frontends, vec!["127.0.0.1:6443".parse().unwrap(), "[::1]:6443".parse().unwrap()]);
    assert_eq!(Request::parse(&r.query()).unwrap(), r);
    assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
    assert_eq!(parse_duration("5m").unwrap(), MAX_DURATION);
    assert_eq!(parse_duration("301s"), Err(RequestError::TooLong(Duration::from_secs(301))));
    for bad in ["", "0s", "10h", "s", "-1s"] {
        assert!(matches!(parse_duration(bad), Err(RequestError::Duration(_))), "{bad}");
    }
    assert_eq!(Request::parse("frontend=localhost"), Err(RequestError::Frontend("localhost".into())));
    assert_eq!(Request::parse("level=info"), Err(RequestError::Unknown("level".into())));
}

#[test]
fn the_frontend_filter_matches_the_destination_only() {
    let e = event(TRACE_NOT_A_FRONTEND);
    let only = |f: &str| Request { duration: DEFAULT_DURATION, frontends: vec![f.parse().unwrap()] };
    assert!(only("127.0.0.1:6443").wants(&e));
    assert!(!only("127.0.0.1:6444").wants(&e));
    assert!(!only("[::1]:6443").wants(&e));
    assert!(Request::parse("").unwrap().wants(&e));
}

#[test]
fn the_rate_bound_admits_per_second_and_counts_the_rest() {
    let t0 = Instant::now();
    let mut r = RateBound::new(3, t0);
    let admitted = (0..5).filter(|_| r.admit(t0 + Duration::from_millis(10))).count();
    assert_eq!((admitted, r.dropped), (3, 2));
    assert!(!r.admit(t0 + Duration::from_millis(999)));
    assert!(r.admit(t0 + Duration::from_secs(1)), "a new second, a new budget");
    assert_eq!(r.dropped, 3);
}
