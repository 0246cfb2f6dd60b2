//! Applies a plan through a `BackendTable`, the seam between the pure plan and the kernel maps.

use super::{Desired, Op, PlanError, Snapshot, plan};

/// Where the backend table lives: the pinned BPF maps in production, a `Snapshot` in tests.
pub trait BackendTable {
    type Error: std::error::Error + Send + Sync + 'static;
    fn snapshot(&self) -> Result<Snapshot, Self::Error>;
    fn apply(&mut self, op: &Op) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot read the backend table")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The ops before `index` were applied; every prefix of a plan is a consistent table, so
    /// the datapath serves the old or the new set and the next sync finishes the job.
    #[error(
        "map write {index} of {total} ({op:?}) failed; the table is consistent and the next sync retries"
    )]
    Write {
        index: usize,
        total: usize,
        op: Op,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub writes: usize,
}

/// Reads the table, plans, and applies the plan in order, stopping at the first failed write.
pub fn sync<T: BackendTable>(table: &mut T, desired: &Desired) -> Result<SyncReport, SyncError> {
    let current = table.snapshot().map_err(|e| SyncError::Read(Box::new(e)))?;
    let ops = plan(&current, desired)?;
    for (index, op) in ops.iter().enumerate() {
        table.apply(op).map_err(|e| SyncError::Write {
            index,
            total: ops.len(),
            op: op.clone(),
            source: Box::new(e),
        })?;
    }
    Ok(SyncReport { writes: ops.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A table in memory that can be told to fail its n-th write.
    struct FakeTable {
        state: Snapshot,
        fail_at: Option<usize>,
        writes: usize,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("injected failure")]
    struct Injected;

    impl BackendTable for FakeTable {
        type Error = Injected;
        fn snapshot(&self) -> Result<Snapshot, Injected> {
            Ok(self.state.clone())
        }
        fn apply(&mut self, op: &Op) -> Result<(), Injected> {
            if self.fail_at == Some(self.writes) {
                return Err(Injected);
            }
            self.writes += 1;
            self.state.apply(op);
            Ok(())
        }
    }

    fn desired(backends: &[&str]) -> Desired {
        let b: Vec<String> = backends.iter().map(|s| s.to_string()).collect();
        Desired::from_config(&Config::from_flags(&[], &b, &Default::default()).unwrap())
    }

    #[test]
    fn sync_reaches_the_desired_state_and_then_writes_nothing() {
        let mut t = FakeTable { state: Snapshot::default(), fail_at: None, writes: 0 };
        let want = desired(&["192.0.2.11:6443", "192.0.2.12:6443"]);
        let first = sync(&mut t, &want).unwrap();
        assert_eq!(first.writes, 2 + 2 * 3, "2 backends, 2 frontends x (2 slots + slot 0)");
        for (k, f) in &want.frontends {
            assert_eq!(t.state.resolve(k).as_ref(), Some(&f.backends));
        }
        assert_eq!(sync(&mut t, &want).unwrap().writes, 0);
    }

    #[test]
    fn a_failed_write_leaves_the_old_set_and_the_next_sync_finishes() {
        let mut t = FakeTable { state: Snapshot::default(), fail_at: None, writes: 0 };
        let old = desired(&["192.0.2.11:6443", "192.0.2.12:6443"]);
        sync(&mut t, &old).unwrap();
        let new = desired(&["192.0.2.13:6443"]);
        t.fail_at = Some(t.writes + 2);
        let err = sync(&mut t, &new).unwrap_err();
        assert!(matches!(err, SyncError::Write { index: 2, .. }), "{err}");
        for (k, f) in &old.frontends {
            let now = t.state.resolve(k).unwrap();
            assert!(now == f.backends || now == new.frontends[k].backends, "{now:?}");
        }
        t.fail_at = None;
        sync(&mut t, &new).unwrap();
        for (k, f) in &new.frontends {
            assert_eq!(t.state.resolve(k).as_ref(), Some(&f.backends));
        }
        // The old set stays readable for connects that read slot 0 before the flip...
        assert_eq!(t.state.backends.len(), 3);
        // ...until the next change writes over its region.
        sync(&mut t, &desired(&["192.0.2.14:6443"])).unwrap();
        let left: Vec<_> =
            t.state.backends.values().map(|b| kha_common::socket_addr(&b.addr_be, b.port_be)).collect();
        assert_eq!(left, ["192.0.2.13:6443".parse().unwrap(), "192.0.2.14:6443".parse().unwrap()]);
    }
}
