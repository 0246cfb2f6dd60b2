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
    UNACKED_RETRANSMITS,
};

impl Prober {
    /// `OPTIONS *` on the kept-alive connection, timed against the silence: [`SLOW_AFTER`]
    /// unanswered is reported slow, [`SILENT_AFTER`] since the silence began is reported
    /// silent, and a request the master's kernel has not acknowledged after
    /// [`UNACKED_RETRANSMITS`] retransmissions is reported unacknowledged, at once.
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
                        if let Some(retransmits) = retransmits.filter(|&r| r >= UNACKED_RETRANSMITS) {
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
