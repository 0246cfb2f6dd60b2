//! Clients from two samples of `KHA_CLIENTS` taken `interval_s` apart: per cgroup, the
//! connects in between as a rate, the open connections now, the backends used. Pure.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Sample;

/// One (frontend, backend) of a client.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    pub frontend: String,
    pub backend: String,
    pub connects: u64,
    pub open: u64,
}

/// One client cgroup.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Client {
    pub cgroup_id: u64,
    /// The process name of the busiest route's last connect.
    pub process: String,
    /// Connects since the kernel first counted this client (or since its entry was evicted).
    pub connects: u64,
    pub connects_per_s: f64,
    pub open: u64,
    pub routes: Vec<Route>,
}

/// Connects between the samples: a counter lower than before is an entry made again (evicted,
/// or a map migration), so all of it is new.
fn delta(before: Option<&Sample>, now: &Sample) -> u64 {
    match before {
        Some(b) if b.connects <= now.connects => now.connects - b.connects,
        _ => now.connects,
    }
}

/// The clients of `after`, busiest first (connects/s, then open, then total, then id).
/// `before`: `None` for a single sample, whose rates are 0. A client only in `before` is gone
/// (evicted) and left out.
pub fn clients(before: Option<&[Sample]>, after: &[Sample], interval_s: f64) -> Vec<Client> {
    let then: BTreeMap<_, &Sample> = before.unwrap_or(&[]).iter().map(|s| (s.key(), s)).collect();
    let mut by_cgroup: BTreeMap<u64, (Client, (u64, u64))> = BTreeMap::new();
    for s in after {
        let d = if before.is_some() { delta(then.get(&s.key()).copied(), s) } else { 0 };
        let (c, busiest) = by_cgroup.entry(s.cgroup_id).or_insert_with(|| {
            let c = Client {
                cgroup_id: s.cgroup_id,
                process: String::new(),
                connects: 0,
                connects_per_s: 0.0,
                open: 0,
                routes: vec![],
            };
            (c, (0, 0))
        });
        c.connects += s.connects;
        c.open += s.open;
        c.connects_per_s += d as f64;
        if c.process.is_empty() || (d, s.connects) > *busiest {
            *busiest = (d, s.connects);
            c.process = s.process.clone();
        }
        c.routes.push(Route {
            frontend: s.frontend.clone(),
            backend: s.backend.clone(),
            connects: s.connects,
            open: s.open,
        });
    }
    let mut out: Vec<Client> = by_cgroup
        .into_values()
        .map(|(mut c, _)| {
            c.connects_per_s = if interval_s > 0.0 { c.connects_per_s / interval_s } else { 0.0 };
            c.routes.sort_by(|a, b| (&a.frontend, &a.backend).cmp(&(&b.frontend, &b.backend)));
            c
        })
        .collect();
    out.sort_by(|a, b| {
        b.connects_per_s
            .total_cmp(&a.connects_per_s)
            .then(b.open.cmp(&a.open))
            .then(b.connects.cmp(&a.connects))
            .then(a.cgroup_id.cmp(&b.cgroup_id))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(cgroup_id: u64, backend_id: u32, connects: u64, open: u64, process: &str) -> Sample {
        Sample {
            cgroup_id,
            frontend: "127.0.0.1:6443".into(),
            backend: format!("192.0.2.{backend_id}:6443"),
            backend_id,
            connects,
            open,
            process: process.into(),
        }
    }

    #[test]
    fn rates_are_the_growth_over_the_interval_summed_per_cgroup() {
        let before = [s(1, 1, 10, 0, "a"), s(1, 2, 5, 0, "a"), s(2, 1, 100, 1, "b")];
        let after = [s(1, 1, 30, 2, "a"), s(1, 2, 15, 1, "a2"), s(2, 1, 110, 1, "b")];
        let got = clients(Some(&before), &after, 2.0);
        assert_eq!(got.iter().map(|c| c.cgroup_id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((got[0].connects, got[0].open, got[0].connects_per_s), (45, 3, 15.0));
        // The busiest route in the interval names the process.
        assert_eq!(got[0].process, "a");
        assert_eq!(got[0].routes.len(), 2);
        assert_eq!((got[1].connects_per_s, got[1].process.as_str()), (5.0, "b"));
    }

    #[test]
    fn a_counter_that_went_down_counts_from_zero_and_new_clients_count_whole() {
        let before = [s(1, 1, 50, 0, "a")];
        let after = [s(1, 1, 4, 0, "a"), s(3, 1, 6, 0, "c")];
        let got = clients(Some(&before), &after, 1.0);
        let rate = |id| got.iter().find(|c| c.cgroup_id == id).unwrap().connects_per_s;
        assert_eq!((rate(1), rate(3)), (4.0, 6.0));
    }

    #[test]
    fn one_sample_has_no_rates_and_ties_sort_by_open_then_total() {
        let after = [s(1, 1, 5, 0, "a"), s(2, 1, 1, 3, "b"), s(3, 1, 9, 0, "c")];
        let got = clients(None, &after, 1.0);
        assert!(got.iter().all(|c| c.connects_per_s == 0.0));
        assert_eq!(got.iter().map(|c| c.cgroup_id).collect::<Vec<_>>(), [2, 3, 1]);
        assert!(clients(Some(&[]), &[], 0.0).is_empty());
    }

    #[test]
    fn clients_gone_from_the_map_are_left_out() {
        let got = clients(Some(&[s(7, 1, 5, 1, "x")]), &[s(8, 1, 1, 0, "y")], 1.0);
        assert_eq!(got.iter().map(|c| c.cgroup_id).collect::<Vec<_>>(), [8]);
    }
}
