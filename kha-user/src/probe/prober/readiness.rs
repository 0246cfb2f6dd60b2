//! The readiness request (on the kept-alive connection, or a new one) and the connect and
//! handshake, timed against a silence when one is running.

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::UnixTime;
use tokio::time::Instant;

use super::super::conn::{self, Conn, ExchangeError};
use super::super::failure::ProbeFailure;
use super::super::http::{self, Response};
use super::super::{ProbeEvent, SILENT_AFTER};
use super::{Gone, Out, Prober};

impl Prober {
    /// After a TLS reload, the established connection is kept (see [`super::reload`]), but if
    /// the new CA does not trust this master's certificate the next reconnect will fail: say
    /// so now, while the probes still pass, rather than when the master suddenly goes down.
    pub(super) fn recheck_trust(&mut self) {
        let Some(new) = self.settings.tls.take_changed() else { return };
        let (Some(conn), Some(verifier)) = (&self.conn, &new.verifier) else { return };
        let Some((end_entity, intermediates)) =
            conn.tls.get_ref().1.peer_certificates().and_then(|c| c.split_first())
        else {
            return;
        };
        match verifier.verify_server_cert(end_entity, intermediates, &self.server_name, &[], UnixTime::now())
        {
            Ok(_) => log::debug!("probe {}: the reloaded TLS config trusts this master too", self.addr),
            Err(e) => log::warn!(
                "probe {}: the reloaded CA does not trust this master's certificate ({e}); the established probe connection is kept, but the next reconnect will fail",
                self.addr
            ),
        }
    }

    /// The readiness request: on the kept-alive connection if there is one, else on a new one,
    /// reported slow after [`SLOW_AFTER`]. The latency covers connect and handshake when it
    /// had to make a connection.
    pub(super) async fn readiness<T: Clone>(&mut self, out: &Out<T>) -> Result<ProbeEvent, Gone> {
        let start = Instant::now();
        let slow_after = self.slow_after();
        let event = {
            let probe = self.ask_ready(start);
            tokio::pin!(probe);
            tokio::select! {
                e = &mut probe => e,
                () = tokio::time::sleep(slow_after) => {
                    out.send(ProbeEvent::Slow { waited: slow_after }).await?;
                    probe.await
                }
            }
        };
        Ok(event)
    }

    async fn ask_ready(&mut self, start: Instant) -> ProbeEvent {
        let reused = self.conn.is_some();
        let mut result = self.exchange().await;
        if reused && matches!(result, Err(ExchangeError { retry: true, .. })) {
            log::debug!("probe {}: kept-alive connection closed before the answer; retrying", self.addr);
            result = self.exchange().await;
        }
        let latency = start.elapsed();
        match result {
            Ok(Response { status: 200, .. }) => ProbeEvent::Ready { latency },
            Ok(Response { status, body, .. }) => ProbeEvent::Failed {
                failure: ProbeFailure::Status { code: status, line: http::reason_line(&body) },
                latency,
            },
            Err(e) => ProbeEvent::Failed { failure: e.failure, latency },
        }
    }

    /// Readiness request and response, connecting first if needed. The connection is kept
    /// only after a complete response that does not close it.
    async fn exchange(&mut self) -> Result<Response, ExchangeError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn { tls: self.connect().await?, last_response: Instant::now(), leftover: None },
        };
        let deadline = Instant::now() + self.settings.timeout;
        let max = self.settings.max_response_bytes;
        let (response, leftover) =
            conn::send_and_read(&mut conn, &self.readiness_request, &mut self.buf, max, deadline).await?;
        if !response.close {
            conn.last_response = Instant::now();
            conn.leftover = leftover;
            self.conn = Some(conn);
        }
        Ok(response)
    }

    /// Connect and handshake. Inside a silence (a liveness request unanswered, or the
    /// reconnect after a loss) the deadline is the silence's end, and running into it is
    /// [`ProbeFailure::Silent`]; otherwise the probe timeout applies. A handshake that
    /// completes ends the silence: the process serves.
    async fn connect(
        &mut self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ProbeFailure> {
        if std::mem::take(&mut self.reconnecting) {
            self.silent_since.get_or_insert_with(Instant::now);
        }
        let deadline = match self.silent_since {
            Some(since) => since + SILENT_AFTER,
            None => Instant::now() + self.settings.timeout,
        };
        let result =
            conn::connect(self.addr, &self.make_socket, &mut self.settings.tls, &self.server_name, deadline)
                .await;
        let Some(since) = self.silent_since else { return result };
        match result {
            // Silence to the end: nothing acknowledged, no route, no handshake.
            Err(
                ProbeFailure::Timeout { .. } | ProbeFailure::Unreachable(_) | ProbeFailure::Abandoned { .. },
            ) => {
                self.silent_since = None;
                Err(ProbeFailure::Silent { waited: since.elapsed() })
            }
            // Refused, reset, a TLS error: an answer of sorts, the silence is over.
            result => {
                self.silent_since = None;
                result
            }
        }
    }
}
