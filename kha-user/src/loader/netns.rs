//! Running a piece of work inside the network namespace kha serves (`--netns`), the one
//! place the agent calls `setns(2)`.
//!
//! `setns` moves only the calling thread, and nothing moves it back safely while the runtime
//! shares it, so the work runs on a short-lived scoped thread that enters the namespace and
//! ends with it. Sockets made there stay in that namespace after the thread is gone (the
//! probes' sockets, sock_diag's netlink socket, the TCP iterator's file). kha-lab's
//! `netns.rs` enters namespaces between fork and exec instead, where only async-signal-safe
//! calls are allowed; it is a different problem and keeps its own code.

use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

/// Runs `f` in the network namespace `ns` on a thread of its own, or right here when `ns` is
/// `None` (the agent's own namespace). The outer error is `setns` failing (`ns` is not a
/// network namespace, or the agent may not enter it), kept apart from whatever `f` returns so
/// that callers can say which of the two failed. A panic in `f` is passed on, as it would be
/// had `f` run here.
pub(crate) fn in_netns<T: Send>(ns: Option<BorrowedFd<'_>>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let Some(ns) = ns else { return Ok(f()) };
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) with a descriptor the caller keeps open for the whole call, and
            // CLONE_NEWNET, which moves only this thread, a scoped one that ends when `f` does:
            // no other code ever runs in the namespace it enters.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// [`in_netns`] for the namespace at `path` (e.g. `/run/netns/NAME`), or the agent's own,
/// with opening `path`, entering it and `f` failing all told as one `io::Error`.
pub(crate) fn in_netns_at<T: Send>(
    path: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let ns = path.map(File::open).transpose()?;
    in_netns(ns.as_ref().map(|ns| ns.as_fd()), f)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_namespace_the_work_runs_on_the_calling_thread() {
        let caller = std::thread::current().id();
        assert_eq!(in_netns(None, || std::thread::current().id()).unwrap(), caller);
    }

    #[test]
    fn a_descriptor_that_is_not_a_network_namespace_fails_before_the_work_runs() {
        let not_ns = File::open("/proc/self/stat").unwrap();
        let mut ran = false;
        let err = in_netns(Some(not_ns.as_fd()), || ran = true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert!(!ran);
    }

    #[test]
    fn a_missing_path_fails_with_the_open_error() {
        let err = in_netns_at(Some(Path::new("/nonexistent/kha-netns")), || Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
