//! What each client can tell when a server misbehaves on a kept-alive connection: the cases
//! the prober tells apart (probe/prober.rs, probe/tests). Each case: one `/readyz` answered,
//! then the scripted request of [`super::server`], on the same connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::time::{Instant, timeout};

use super::clients::{self, Answer, Client, Failed, Kind, Probe, Tls};

/// Bound on any one wait here.
const WAIT: Duration = Duration::from_secs(2);

pub struct Outcome {
    pub case: &'static str,
    pub hand: String,
    pub hyper: String,
}

const CASES: [(&str, &str); 6] = [
    ("closed before answering (idle timeout racing the request)", "/close-before-answer"),
    ("half a status line, then closed", "/half-then-close"),
    ("200 with `Connection: close`, then closed", "/answer-then-close"),
    ("200, then FIN on the idle connection 100 ms later", "/fin-when-idle"),
    ("200, then RST on the idle connection 100 ms later", "/rst-when-idle"),
    ("200, then stray bytes on the idle connection", "/stray-when-idle"),
];

pub async fn run(addr: SocketAddr, tls: &Tls) -> Vec<Outcome> {
    let mut out = Vec::new();
    for (case, path) in CASES {
        let mut seen = [String::new(), String::new()];
        for (i, c) in Client::ALL.into_iter().enumerate() {
            seen[i] =
                timeout(WAIT * 3, one(c, addr, tls, path)).await.unwrap_or_else(|_| "(bound reached)".into());
        }
        let [hand, hyper] = seen;
        out.push(Outcome { case, hand, hyper });
    }
    out
}

async fn one(c: Client, addr: SocketAddr, tls: &Tls, path: &str) -> String {
    let mut probe = Probe::new(c, clients::connect(addr, tls).await, addr).await;
    probe.exchange(Kind::Ready).await;
    let answer = probe.ask(Kind::Ready, path).await;
    let answered = Instant::now();
    let mut said = match &answer {
        Ok(Answer { status, close }) => format!("{status}, close={close}"),
        Err(Failed::NothingReceived(e)) => format!("nothing received (retry): {e}"),
        Err(Failed::Other(e)) => format!("failed: {e}"),
    };
    if answer.is_err() {
        return said;
    }
    // Then: what the idle connection shows, and when.
    let idle = match &mut probe {
        Probe::Hand { tls, buf, .. } => match timeout(WAIT, tls.read(buf)).await {
            Err(_) => "nothing".to_string(),
            Ok(Ok(0)) => "read: end of stream".to_string(),
            Ok(Ok(n)) => format!("read: {:?}", String::from_utf8_lossy(&buf[..n])),
            Ok(Err(e)) => format!("read: {:?} {e}", e.kind()),
        },
        Probe::Hyper { conn, sender, .. } => match timeout(WAIT, &mut *conn).await {
            Err(_) => format!("nothing (sender closed: {})", sender.is_closed()),
            Ok(Ok(Ok(()))) => "connection task: Ok(())".to_string(),
            Ok(Ok(Err(e))) => format!("connection task: Err({})", clients::describe(&e)),
            Ok(Err(e)) => format!("connection task panicked: {e}"),
        },
    };
    said.push_str(&format!("; idle: {idle} after {} ms", answered.elapsed().as_millis()));
    said
}
