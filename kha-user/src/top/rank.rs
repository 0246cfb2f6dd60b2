//! The top N clients and the rest summed as one "other", so a table or the metrics have at
//! most N + 1 rows whatever the node runs. Pure.

use serde::Serialize;

use super::rate::Client;

/// The clients past the first N, summed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Other {
    pub clients: usize,
    pub connects: u64,
    pub connects_per_s: f64,
    pub open: u64,
}

/// The first `n` of `clients` (already sorted, busiest first) and the rest summed; `None` when
/// nothing is left over.
pub fn top(mut clients: Vec<Client>, n: usize) -> (Vec<Client>, Option<Other>) {
    if clients.len() <= n {
        return (clients, None);
    }
    let rest = clients.split_off(n);
    let other = rest.iter().fold(Other { clients: rest.len(), ..Other::default() }, |mut o, c| {
        o.connects += c.connects;
        o.connects_per_s += c.connects_per_s;
        o.open += c.open;
        o
    });
    (clients, Some(other))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(cgroup_id: u64, rate: f64, open: u64) -> Client {
        Client {
            cgroup_id,
            process: "p".into(),
            connects: 10 * cgroup_id,
            connects_per_s: rate,
            open,
            routes: vec![],
        }
    }

    #[test]
    fn the_rest_is_summed_into_other() {
        let (top3, other) =
            top(vec![c(1, 9.0, 1), c(2, 5.0, 0), c(3, 2.0, 4), c(4, 1.5, 2), c(5, 0.5, 1)], 3);
        assert_eq!(top3.iter().map(|c| c.cgroup_id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(other, Some(Other { clients: 2, connects: 90, connects_per_s: 2.0, open: 3 }));
    }

    #[test]
    fn nothing_left_over_means_no_other() {
        assert_eq!(top(vec![c(1, 1.0, 0)], 1).1, None);
        assert_eq!(top(vec![], 0), (vec![], None));
        let (none, other) = top(vec![c(1, 1.0, 2)], 0);
        assert!(none.is_empty());
        assert_eq!(other.map(|o| (o.clients, o.open)), Some((1, 2)));
    }
}
