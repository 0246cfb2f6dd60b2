//! kha's own view of the masters during an act, from `kha status -o json`: each backend's
//! state and last failure, and the `terminated` counter. The JSON is kha's structured output
//! (its log lines are for people and change). A poll costs a few milliseconds, so the demo
//! polls every 50 ms; what changed between two polls is an event, stamped when it was seen.

use std::collections::BTreeMap;

use kha_lab::bed::Bed;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `up`, `down`, `draining`, `unknown`, ...
    pub state: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// By backend address (`192.0.2.11:6443`). Every frontend has the same backends, probed
    /// once each: the first frontend's record stands for all.
    pub backends: BTreeMap<String, Backend>,
    /// Connections kha destroyed because their master went down or drained.
    pub terminated: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    State { backend: String, state: String, reason: Option<String> },
    Terminated(u64),
}

impl View {
    /// `None` while nothing is pinned or the output does not parse.
    pub fn read(bed: &Bed) -> Option<View> {
        View::from_json(&bed.status()?)
    }

    pub fn from_json(s: &Value) -> Option<View> {
        let mut backends = BTreeMap::new();
        for f in s["frontends"].as_array()? {
            for b in f["backends"].as_array()? {
                let (Some(addr), Some(state)) = (b["address"].as_str(), b["state"].as_str()) else {
                    continue;
                };
                backends.entry(addr.to_owned()).or_insert_with(|| Backend {
                    state: state.to_owned(),
                    reason: b["reason"].as_str().map(str::to_owned),
                });
            }
        }
        let terminated = s["counters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "terminated")
            .and_then(|c| c["value"].as_u64())
            .unwrap_or(0);
        Some(View { backends, terminated })
    }

    /// What changed from `before` to `self`: states first, then terminations.
    pub fn changes(&self, before: &View) -> Vec<Change> {
        let mut v: Vec<Change> = self
            .backends
            .iter()
            .filter(|(a, b)| before.backends.get(*a).is_none_or(|was| was.state != b.state))
            .map(|(a, b)| Change::State {
                backend: a.clone(),
                state: b.state.clone(),
                reason: b.reason.clone(),
            })
            .collect();
        if self.terminated > before.terminated {
            v.push(Change::Terminated(self.terminated - before.terminated));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(m2: &str, reason: Option<&str>, terminated: u64) -> Value {
        let b = |addr: &str, state: &str, reason: Option<&str>| serde_json::json!({"address": addr, "state": state, "reason": reason, "serving": state == "up"});
        let backends = vec![b("192.0.2.11:6443", "up", None), b("192.0.2.12:6443", m2, reason)];
        serde_json::json!({
            "frontends": [
                {"address": "127.0.0.1:6443", "backends": backends},
                {"address": "[::1]:6443", "backends": backends},
            ],
            "counters": [{"name": "rewritten", "value": 9}, {"name": "terminated", "value": terminated}],
        })
    }

    #[test]
    fn changes_between_polls_are_states_then_terminations() {
        let before = View::from_json(&status("up", None, 0)).unwrap();
        assert_eq!(before.backends.len(), 2);
        assert_eq!(before.changes(&before), vec![]);
        let after = View::from_json(&status("down", Some("connection closed by the server"), 1)).unwrap();
        assert_eq!(
            after.changes(&before),
            vec![
                Change::State {
                    backend: "192.0.2.12:6443".into(),
                    state: "down".into(),
                    reason: Some("connection closed by the server".into())
                },
                Change::Terminated(1)
            ]
        );
        // A new reason without a new state is no change.
        let again = View::from_json(&status("down", Some("connection refused"), 1)).unwrap();
        assert_eq!(again.changes(&after), vec![]);
        assert_eq!(View::from_json(&serde_json::json!({})), None);
    }
}
