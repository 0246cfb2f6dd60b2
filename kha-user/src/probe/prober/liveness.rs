//! The kept-alive connection between readiness requests: the liveness request timed against
//! the master's silence (slow, silent, unacknowledged, held), and the idle watch for a lost
//! connection.

use std::os::fd::AsFd;

use tokio::io::AsyncReadExt;
use tokio::time::{Duration, Instant, sleep_until};

use super::super::conn::{self, Conn};
use super::super::failure::{Malformed, Phase, ProbeFailure, classify, snippet};
use super::super::socket;
use super::super::{ProbeEvent, SILENT_AFTER};
use super::{
    CLOSE_AFTER_RESPONSE_GRACE, Gone, HOLD_FOR, HOLD_SPREAD, Liveness, Out, Prober, Retry, UNACKED_CHECK,
    UNACKED_CONFIRM_SPREAD, UNACKED_RETRANSMITS,
};

impl Prober {
    /// `OPTIONS *` on the kept-alive connection, timed against the silence: [`SLOW_AFTER`]
    /// unanswered is reported slow, [`SILENT_AFTER`] since the silence began is reported
    /// silent, and a request the master's kernel has not acknowledged after
    /// [`UNACKED_RETRANSMITS`] retransmissions is reported unacknowledged, after this node's
    /// share of [`UNACKED_CONFIRM_SPREAD`] (see [`UnackedConfirm`]).
    ///
    /// A silent master whose kernel still acknowledges (a hung or stopped process) keeps this
    /// connection and its one pending request for about [`HOLD_FOR`]: no reconnects while it
    /// hangs, so when it thaws each node's probe costs it one `OPTIONS *` answer instead of a
    /// TLS handshake per reconnect queued in its accept backlog meanwhile.
    pub(super) async fn liveness<T: Clone>(
        &mut self,
        mut conn: Conn,
        out: &Out<T>,
    ) -> Result<Liveness, Gone> {
        let sent = Instant::now();
        let since = *self.silent_since.get_or_insert(sent);
        let slow_at = sent + self.slow_after();
        let silent_at = since + SILENT_AFTER;
        let max = self.settings.max_response_bytes;
        let mut slowed = false;
        let mut silenced = false;
        let mut check = tokio::time::interval_at(slow_at, UNACKED_CHECK);
        let hold = self.rng.between(HOLD_FOR.mul_f64(1.0 - HOLD_SPREAD), HOLD_FOR.mul_f64(1.0 + HOLD_SPREAD));
        let mut unacked = UnackedConfirm::new(self.rng.between(Duration::ZERO, UNACKED_CONFIRM_SPREAD));
        let result = {
            let tcp = conn.tls.get_ref().0.as_fd().try_clone_to_owned();
            let exchange =
                conn::send_and_read(&mut conn, &self.liveness_request, &mut self.buf, max, sent + hold);
            tokio::pin!(exchange);
            loop {
                tokio::select! {
                    r = &mut exchange => break r.map_err(|e| e.failure),
                    () = sleep_until(slow_at), if !slowed => {
                        slowed = true;
                        out.send(ProbeEvent::Slow { waited: sent.elapsed() }).await?;
                    }
                    () = sleep_until(silent_at), if !silenced => {
                        silenced = true;
                        self.failing_since.get_or_insert_with(Instant::now);
                        let failure = ProbeFailure::Silent { waited: since.elapsed() };
                        out.send(ProbeEvent::Failed { failure, latency: SILENT_AFTER }).await?;
                    }
                    _ = check.tick(), if !silenced => {
                        let retransmits = tcp.as_ref().ok().and_then(|fd| socket::unacknowledged(fd).ok().flatten());
                        if let Some(retransmits) = unacked.confirmed(retransmits, Instant::now()) {
                            break Err(ProbeFailure::Unacknowledged { waited: sent.elapsed(), retransmits });
                        }
                    }
                }
            }
        };
        match result {
            Ok((response, leftover)) => {
                self.silent_since = None;
                if slowed && !silenced {
                    out.send(ProbeEvent::Alive { latency: sent.elapsed() }).await?;
                }
                if response.close {
                    self.pings = false;
                    log::warn!(
                        "probe {}: the server closes the connection after OPTIONS *; liveness is asked with readiness only from now on",
                        self.addr
                    );
                } else {
                    conn.last_response = Instant::now();
                    conn.leftover = leftover;
                    self.conn = Some(conn);
                }
                Ok(if silenced { Liveness::Revived } else { Liveness::Answered })
            }
            // Reported already: what follows is a reconnect, a regular one after a hold that ran
            // out (a master hung that long is asked once per interval from then on).
            Err(failure) if silenced => {
                self.silent_since = None;
                let retry = match failure {
                    ProbeFailure::Timeout { .. } => Retry::Regular,
                    failure => Retry::after(&ProbeEvent::Failed { failure, latency: Duration::ZERO }),
                };
                Ok(Liveness::Reported(retry))
            }
            Err(failure @ ProbeFailure::Unacknowledged { .. }) => {
                self.silent_since = None;
                Ok(Liveness::Silent(failure))
            }
            Err(failure) => Ok(Liveness::Died(failure)),
        }
    }

    /// Waits until `until` with a read pending on the idle connection, if there is one.
    /// `Some` if the connection was lost meanwhile (it is then dropped).
    pub(super) async fn idle_until(&mut self, until: Instant) -> Option<ProbeFailure> {
        let Some(conn) = self.conn.as_mut() else {
            sleep_until(until).await;
            return None;
        };
        if let Some(leftover) = conn.leftover.take() {
            self.conn = None;
            return Some(ProbeFailure::Malformed(Malformed::UnexpectedData(leftover)));
        }
        // Cancel-safe: a read that has not completed consumed nothing.
        let read = tokio::select! {
            read = conn.tls.read(&mut self.buf) => read,
            () = sleep_until(until) => return None,
        };
        let since_response = conn.last_response.elapsed();
        self.conn = None;
        let failure = match read {
            Ok(0) => ProbeFailure::Closed,
            Ok(n) => ProbeFailure::Malformed(Malformed::UnexpectedData(snippet(&self.buf[..n]))),
            Err(e) => classify(&e, Phase::Idle),
        };
        if failure == ProbeFailure::Closed && since_response <= CLOSE_AFTER_RESPONSE_GRACE {
            log::debug!("probe {}: server closed after its response; reconnecting next probe", self.addr);
            sleep_until(until).await;
            return None;
        }
        Some(failure)
    }
}

/// The confirmation of a request the master's kernel leaves unacknowledged: after
/// [`UNACKED_RETRANSMITS`] retransmissions, a further wait of this node's own (drawn per
/// request from `0..UNACKED_CONFIRM_SPREAD`), cancelled by an acknowledgement meanwhile.
///
/// Why the wait: each node that confirms terminates its long-lived sockets on that master,
/// and every watch and kubelet connection on them reconnects (TLS handshake, then a watch
/// resume or a re-list) onto the other masters. The nodes' tick phases already spread their
/// confirmations over one interval (0.9 s) when the phases are independent; they are not
/// after a common event, e.g. an apiserver restart that reset every node's probe connection
/// within one recheck (0.3 s), after which the ticks stay bunched for minutes. This wait
/// spreads such a bunch over at least 0.3 s more (half the peak for a 0.3 s bunch), and a
/// blackholed master's sockets still move within the 2 s goal (at most 0.3 s later).
pub(super) struct UnackedConfirm {
    delay: Duration,
    at: Option<Instant>,
}

impl UnackedConfirm {
    pub(super) fn new(delay: Duration) -> Self {
        UnackedConfirm { delay, at: None }
    }

    /// The retransmissions to report once the request has stayed unacknowledged through the
    /// wait; `None` until then. `retransmits` is [`socket::unacknowledged`] read now.
    pub(super) fn confirmed(&mut self, retransmits: Option<u8>, now: Instant) -> Option<u8> {
        let Some(retransmits) = retransmits.filter(|&r| r >= UNACKED_RETRANSMITS) else {
            // Acknowledged (or recovered to fewer retransmissions): the path works again.
            self.at = None;
            return None;
        };
        (now >= *self.at.get_or_insert(now + self.delay)).then_some(retransmits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn unacknowledged_is_confirmed_only_after_the_nodes_own_wait() {
        let t0 = Instant::now();
        let mut c = UnackedConfirm::new(200 * MS);
        assert_eq!(c.confirmed(Some(1), t0), None, "one retransmission is not enough");
        assert_eq!(c.confirmed(Some(2), t0 + 50 * MS), None, "the wait starts here");
        assert_eq!(c.confirmed(Some(2), t0 + 200 * MS), None);
        assert_eq!(c.confirmed(Some(3), t0 + 250 * MS), Some(3));
    }

    #[test]
    fn an_acknowledgement_during_the_wait_cancels_it() {
        let t0 = Instant::now();
        let mut c = UnackedConfirm::new(200 * MS);
        assert_eq!(c.confirmed(Some(2), t0), None);
        assert_eq!(c.confirmed(None, t0 + 100 * MS), None, "acknowledged: the link is back");
        assert_eq!(c.confirmed(Some(2), t0 + 250 * MS), None, "a new loss waits afresh");
        assert_eq!(c.confirmed(Some(2), t0 + 450 * MS), Some(2));
    }

    #[test]
    fn no_wait_confirms_at_the_second_retransmission() {
        let mut c = UnackedConfirm::new(Duration::ZERO);
        assert_eq!(c.confirmed(Some(2), Instant::now()), Some(2));
    }
}
