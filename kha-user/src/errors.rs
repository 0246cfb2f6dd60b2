//! Errors as the log shows them.

/// An error with its sources, `a: b: c`; a source whose text an outer message already quotes
/// (kube-rs's do) is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use crate::discovery::state::StateError;

    #[test]
    fn chain_names_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = StateError::Read { path: "/var/lib/kha/discovered.json".into(), source: io };
        assert_eq!(super::chain(&e), "cannot read /var/lib/kha/discovered.json: denied");
        let quoted = StateError::Write {
            path: "denied".into(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(super::chain(&quoted), "cannot write denied", "a cause already quoted is not repeated");
    }
}
