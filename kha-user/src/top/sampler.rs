//! Rates for the metrics endpoint, where scrapes come when they come: each scrape's sample is
//! compared with the last one kept, which is replaced once it is `MIN_WINDOW` old, so scrapes
//! close together (two Prometheus servers) do not shrink the window to nothing. Pure: the
//! caller passes the time.

use std::time::{Duration, Instant};

use super::{
    Sample,
    rate::{self, Client},
};

/// The shortest window a rate is computed over, unless no older sample exists.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Sampler {
    kept: Option<(Instant, Vec<Sample>)>,
}

impl Sampler {
    /// The clients in `now` (taken at `at`), with rates since the sample kept; the first call
    /// has none (rates 0).
    pub fn clients(&mut self, now: Vec<Sample>, at: Instant) -> Vec<Client> {
        let out = match &self.kept {
            Some((then, before)) => {
                let window = at.saturating_duration_since(*then).as_secs_f64();
                rate::clients(Some(before), &now, window)
            }
            None => rate::clients(None, &now, 0.0),
        };
        if self.kept.as_ref().is_none_or(|(then, _)| at.saturating_duration_since(*then) >= MIN_WINDOW) {
            self.kept = Some((at, now));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(connects: u64) -> Vec<Sample> {
        vec![Sample {
            cgroup_id: 1,
            frontend: "127.0.0.1:6443".into(),
            backend: "192.0.2.1:6443".into(),
            backend_id: 1,
            connects,
            open: 0,
            process: "p".into(),
        }]
    }

    #[test]
    fn close_scrapes_share_the_kept_sample_and_later_ones_replace_it() {
        let t0 = Instant::now();
        let mut s = Sampler::default();
        assert_eq!(s.clients(sample(10), t0)[0].connects_per_s, 0.0);
        // 0.5 s later: the rate over 0.5 s, and the first sample stays.
        assert_eq!(s.clients(sample(15), t0 + Duration::from_millis(500))[0].connects_per_s, 10.0);
        // 2 s after the first: still against it; now it is replaced.
        assert_eq!(s.clients(sample(30), t0 + Duration::from_secs(2))[0].connects_per_s, 10.0);
        assert_eq!(s.clients(sample(34), t0 + Duration::from_secs(4))[0].connects_per_s, 2.0);
    }
}
