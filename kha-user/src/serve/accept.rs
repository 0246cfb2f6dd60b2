//! Accepting connections to the agent's endpoints without letting them hurt the agent: at
//! most [`MAX_CONNECTIONS`] at once (each is a descriptor the probes then cannot have), a
//! flood of idle connections cannot keep `/healthz` from answering, and a failing `accept`
//! (EMFILE) backs off instead of spinning the runtime's thread.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Connections to both endpoints together. Prometheus and a kubelet health check need one or
/// two; 64 leaves room for curious operators while staying far below `LimitNOFILE`.
pub const MAX_CONNECTIONS: usize = 64;
/// The first pause after a failed accept, doubled up to [`BACKOFF_MAX`] while it keeps failing.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long an accept waits for an evicted connection to let go of its slot.
const EVICT_WAIT: Duration = Duration::from_secs(1);

/// Something connections come from: the endpoints' `TcpListener`, or a fake in tests.
pub trait Accept: Send + 'static {
    type Conn: Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<Self::Conn> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// The connection slots, shared by both listeners (one descriptor budget).
#[derive(Clone)]
pub struct Slots {
    free: Arc<Semaphore>,
    /// Connections still waiting for their request, oldest first, each with the signal that
    /// closes it. One that is answering is not here: it is never cut off mid-answer.
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    next: u64,
    evict: BTreeMap<u64, oneshot::Sender<()>>,
}

/// A connection's slot, given back on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    id: u64,
    /// Fires when a newer connection needs the slot while this one has not sent its request.
    pub evicted: oneshot::Receiver<()>,
    waiting: Arc<Mutex<Waiting>>,
}

impl Slot {
    /// The request is in: from now on the connection is answered, not evicted.
    pub fn answering(&self) {
        self.answer_handle().answering();
    }

    /// What marks the connection answering from inside the HTTP service, which cannot hold the
    /// slot itself: the connection's task waits on [`Slot::until_evicted`] meanwhile.
    pub fn answer_handle(&self) -> Answering {
        Answering { id: self.id, waiting: self.waiting.clone() }
    }

    /// Resolves when a newer connection needs the slot; never once the connection is
    /// answering (its eviction signal is then dropped, not sent).
    pub async fn until_evicted(&mut self) {
        if (&mut self.evicted).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Marks one connection answering: see [`Slot::answer_handle`].
#[derive(Clone)]
pub struct Answering {
    id: u64,
    waiting: Arc<Mutex<Waiting>>,
}

impl Answering {
    pub fn answering(&self) {
        lock(&self.waiting).evict.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.answering();
    }
}

fn lock(w: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl Slots {
    pub fn new(cap: usize) -> Self {
        Self { free: Arc::new(Semaphore::new(cap)), waiting: Arc::default() }
    }

    /// A slot for a new connection. When all are taken, the connection that has waited
    /// longest for its request is closed to make room, so idle connections cannot starve new
    /// ones (a real request arrives with the connection and is answered at once); `None` when
    /// every slot is answering a request, and the new connection is closed at once.
    pub async fn admit(&self) -> Option<Slot> {
        if let Ok(permit) = self.free.clone().try_acquire_owned() {
            return Some(self.register(permit));
        }
        let victim = {
            let mut w = lock(&self.waiting);
            let oldest = w.evict.keys().next().copied();
            oldest.and_then(|id| w.evict.remove(&id))
        }?;
        let _ = victim.send(());
        // The evicted connection's task lets go of its slot as soon as it runs.
        match tokio::time::timeout(EVICT_WAIT, self.free.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Some(self.register(permit)),
            _ => None,
        }
    }

    fn register(&self, permit: OwnedSemaphorePermit) -> Slot {
        let (tx, rx) = oneshot::channel();
        let mut w = lock(&self.waiting);
        let id = w.next;
        w.next += 1;
        w.evict.insert(id, tx);
        Slot { _permit: permit, id, evicted: rx, waiting: self.waiting.clone() }
    }
}

/// Errors that consume the failed connection (it was reset before we took it): the next
/// accept has something new to look at, so retrying at once cannot spin.
fn consumes_the_connection(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR))
}

/// Accepts forever, handing each admitted connection to `serve`. Any other accept error
/// (out of descriptors, buffers or memory) is this node's trouble and does not go away by
/// asking again at once: back off, doubling up to a second, and say so once.
pub async fn accept_loop<L: Accept>(
    mut listener: L,
    slots: Slots,
    what: &'static str,
    serve: impl Fn(L::Conn, Slot) + Send + 'static,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok(conn) => {
                if failing {
                    log::info!("{what}: accepting connections again");
                }
                (backoff, failing) = (BACKOFF_MIN, false);
                match slots.admit().await {
                    Some(slot) => serve(conn, slot),
                    None => drop(conn),
                }
            }
            Err(e) if consumes_the_connection(&e) => {}
            Err(e) => {
                if !failing {
                    log::warn!(
                        "{what}: cannot accept connections ({e}); retrying with backoff. If it is EMFILE, raise LimitNOFILE or find what holds the agent's descriptors (ls /proc/$(pidof kha)/fd)"
                    );
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Fails with `errno` `failures` times, then hands out connections; panics if asked so
    /// often that the loop must be spinning.
    struct Fake {
        calls: Arc<AtomicUsize>,
        failures: usize,
        errno: i32,
    }

    impl Accept for Fake {
        type Conn = ();
        async fn accept(&mut self) -> io::Result<()> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            assert!(n < 10_000, "accept called {n} times: the loop spins");
            tokio::task::yield_now().await;
            if n < self.failures {
                return Err(io::Error::from_raw_os_error(self.errno));
            }
            // Every connection is handed over; then nothing more comes.
            if n >= self.failures.saturating_add(3) {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn emfile_backs_off_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let fake = Fake { calls: calls.clone(), failures: usize::MAX, errno: libc::EMFILE };
        let s = served.clone();
        let serve = move |(), _slot: Slot| {
            s.fetch_add(1, Ordering::Relaxed);
        };
        let run = accept_loop(fake, Slots::new(4), "test", serve);
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        // 10 ms doubling to 1 s: 7 tries in the first 1.3 s, then one a second.
        let n = calls.load(Ordering::Relaxed);
        assert!((10..=25).contains(&n), "{n} accepts in 10 s of EMFILE");
        assert_eq!(served.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn accepting_resumes_when_the_errors_stop() {
        let calls = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let fake = Fake { calls: calls.clone(), failures: 20, errno: libc::ENFILE };
        let s = served.clone();
        let serve = move |(), _slot: Slot| {
            s.fetch_add(1, Ordering::Relaxed);
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(60), accept_loop(fake, Slots::new(4), "test", serve))
                .await;
        assert_eq!(served.load(Ordering::Relaxed), 3, "the connections after the errors are served");
    }

    #[tokio::test(start_paused = true)]
    async fn reset_connections_are_skipped_without_backoff() {
        let calls = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let fake = Fake { calls: calls.clone(), failures: 100, errno: libc::ECONNABORTED };
        let s = served.clone();
        let serve = move |(), _slot: Slot| {
            s.fetch_add(1, Ordering::Relaxed);
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), accept_loop(fake, Slots::new(4), "test", serve))
            .await;
        assert_eq!(served.load(Ordering::Relaxed), 3);
        assert_eq!(calls.load(Ordering::Relaxed), 104);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_house_evicts_the_oldest_idle_connection_but_never_one_being_answered() {
        let slots = Slots::new(2);
        let mut a = slots.admit().await.expect("free slot");
        let mut b = slots.admit().await.expect("free slot");
        // Full: the oldest waiting one (a) is told to go; c gets its slot once a lets go.
        let admit_c = tokio::spawn({
            let slots = slots.clone();
            async move { slots.admit().await }
        });
        (&mut a.evicted).await.expect("a is evicted");
        assert!(b.evicted.try_recv().is_err(), "b is younger and stays");
        drop(a);
        let c = admit_c.await.unwrap().expect("c takes a's slot");
        // Both answering: nothing to evict, the newcomer is refused at once.
        b.answering();
        c.answering();
        assert!(slots.admit().await.is_none());
        drop(b);
        assert!(slots.admit().await.is_some(), "a slot given back is free again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_answering_is_never_told_it_was_evicted() {
        let slots = Slots::new(1);
        let mut a = slots.admit().await.expect("free slot");
        a.answer_handle().answering();
        // Nothing waits for its request: a newcomer is refused, and `a` hears nothing.
        assert!(slots.admit().await.is_none());
        let heard = tokio::time::timeout(Duration::from_secs(60), a.until_evicted()).await;
        assert!(heard.is_err(), "an answering connection's eviction future stays pending");
        drop(a);
        let mut b = slots.admit().await.expect("a's slot is free");
        let admit_c = tokio::spawn({
            let slots = slots.clone();
            async move { slots.admit().await.is_some() }
        });
        tokio::time::timeout(Duration::from_secs(1), b.until_evicted()).await.expect("b is evicted");
        drop(b);
        assert!(admit_c.await.unwrap(), "c takes b's slot");
    }
}
