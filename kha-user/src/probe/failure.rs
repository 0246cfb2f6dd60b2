//! Why a probe failed, kept structured so `kha status` and the logs can say what an operator
//! needs ("TLS: invalid peer certificate: UnknownIssuer", "HTTP 500: [-]etcd failed: reason
//! withheld") and the health logic can tell a refused connect from a timeout without parsing
//! text.

use std::fmt;
use std::io;

/// The step a probe was in when it failed or timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// TCP connect (SYN sent, no answer yet).
    Connect,
    /// TLS handshake on a connected socket.
    Handshake,
    /// Writing the HTTP request.
    Request,
    /// Waiting for or reading the HTTP response.
    Response,
    /// Between probes, on the idle persistent connection (TCP keepalive or
    /// `TCP_USER_TIMEOUT` gave up: the master stopped answering at the TCP level).
    Idle,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "TCP connect",
            Phase::Handshake => "TLS handshake",
            Phase::Request => "sending the request",
            Phase::Response => "waiting for the response",
            Phase::Idle => "idle: no answer to TCP keepalive",
        })
    }
}

/// A Linux errno value, shown by its symbolic name (`EHOSTUNREACH`) rather than a
/// locale-dependent message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The symbolic name, for the values networking code can plausibly return.
    pub fn name(self) -> Option<&'static str> {
        kha_common::errno::name(self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "errno {}", self.0),
        }
    }
}

/// What was wrong with a response that was not HTTP/1.x as kha understands it. Quoted
/// snippets are at most [`SNIPPET_BYTES`] bytes of what the server sent, escaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The first line is not `HTTP/1.x NNN ...`.
    StatusLine(String),
    /// A header line is not `name: value` (or is an obsolete folded line).
    HeaderLine(String),
    /// `Content-Length` is not a number, or two of them disagree.
    ContentLength(String),
    /// A `Transfer-Encoding` other than chunked (kha does not decode compressed bodies).
    TransferEncoding(String),
    /// A chunk-size line of a chunked body is not hexadecimal, or too long.
    ChunkSize(String),
    /// A chunk's data is not followed by CRLF.
    ChunkEnd,
    /// `101 Switching Protocols` to a plain GET.
    SwitchingProtocols,
    /// Bytes from the server on the idle connection, when no request was outstanding.
    UnexpectedData(String),
}

/// How many bytes of a bad line a [`Malformed`] quotes.
pub const SNIPPET_BYTES: usize = 64;

/// The first [`SNIPPET_BYTES`] bytes of `bytes`, ASCII-escaped (so a control byte or an
/// ANSI sequence from a hostile server cannot mess up a terminal or a log line).
pub(crate) fn snippet(bytes: &[u8]) -> String {
    let cut = bytes.len().min(SNIPPET_BYTES);
    let mut s = bytes[..cut].escape_ascii().to_string();
    if cut < bytes.len() {
        s.push_str("...");
    }
    s
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::StatusLine(s) => write!(f, "status line is not HTTP/1.x: \"{s}\""),
            Malformed::HeaderLine(s) => write!(f, "bad header line: \"{s}\""),
            Malformed::ContentLength(s) => write!(f, "bad Content-Length: \"{s}\""),
            Malformed::TransferEncoding(s) => write!(f, "unsupported Transfer-Encoding: \"{s}\""),
            Malformed::ChunkSize(s) => write!(f, "bad chunk size line: \"{s}\""),
            Malformed::ChunkEnd => f.write_str("chunk data not followed by CRLF"),
            Malformed::SwitchingProtocols => f.write_str("101 Switching Protocols to a GET"),
            Malformed::UnexpectedData(s) => write!(f, "data on the idle connection: \"{s}\""),
        }
    }
}

/// Why a probe did not find the backend ready. `Display` is a one-line reason for logs and
/// `kha status`.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeFailure {
    /// Nothing listens on the port (`ECONNREFUSED`): typically the apiserver process is dead.
    Refused,
    /// No route, or the host is known down (`EHOSTUNREACH`, `ENETUNREACH`, ...).
    Unreachable(Errno),
    /// No answer within the probe timeout.
    Timeout { phase: Phase },
    /// The kernel gave up on the connection (`ETIMEDOUT` from keepalive or
    /// `TCP_USER_TIMEOUT`): nothing acknowledged our packets for 1.5 s, the peer is gone or
    /// blackholed. Unlike [`ProbeFailure::Timeout`] this says the connection is dead, not slow.
    Abandoned { phase: Phase },
    /// The server reset the connection (`ECONNRESET`, `EPIPE`).
    Reset,
    /// The TLS handshake or a TLS record failed; for a certificate problem this carries the
    /// verification error (`InvalidCertificate(UnknownIssuer)`).
    Tls(rustls::Error),
    /// A complete response with a status other than 200. `line` is the line of the body that
    /// explains it: the first failed check (`[-]etcd failed: reason withheld`) of a
    /// kube-apiserver health endpoint, else the first non-empty line; printable ASCII, at most
    /// [`STATUS_LINE_CHARS`] characters.
    Status { code: u16, line: String },
    /// Not an HTTP/1.x response kha can read.
    Malformed(Malformed),
    /// Status line, headers and body together exceed `max_response_bytes`.
    Oversized { limit: usize },
    /// The server closed the connection (FIN, or TLS close_notify) before a complete response
    /// or, for [`ProbeEvent::ConnectionLost`](super::ProbeEvent), on the idle connection.
    Closed,
    /// Any other I/O error (for example `EMFILE` when creating the socket).
    Io { kind: io::ErrorKind, errno: Option<Errno> },
    /// Nothing came back for `waited` ([`SILENT_AFTER`](super::SILENT_AFTER)): no answer to a
    /// liveness request, and no connect or handshake on the reconnects after it. The master
    /// is hung, stopped or cut off; unlike a [`ProbeFailure::Timeout`] of a readiness request
    /// (a `/readyz` waiting on a slow etcd) this confirms it gone.
    Silent { waited: std::time::Duration },
    /// A liveness request sent `waited` ago is still unacknowledged after `retransmits`
    /// retransmissions: the master's kernel (which acknowledges whatever its process does)
    /// receives nothing, so its link, its network or its machine is gone. Confirmed at once,
    /// like [`ProbeFailure::Silent`], but sooner: a paused process cannot look like this.
    Unacknowledged { waited: std::time::Duration, retransmits: u8 },
}

/// Errors that come from this node running short of something (descriptors, memory, buffers,
/// ephemeral ports), whichever master the probe was for.
const LOCAL_ERRNOS: [i32; 6] =
    [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::EADDRNOTAVAIL, libc::EADDRINUSE];

impl ProbeFailure {
    /// The probe failed on this node's side (out of file descriptors, memory, socket buffers or
    /// ephemeral ports): it says nothing about the master, and must not count against it.
    pub fn is_local(&self) -> bool {
        match self {
            ProbeFailure::Io { errno: Some(Errno(e)), .. } => LOCAL_ERRNOS.contains(e),
            ProbeFailure::Io { kind, errno: None } => *kind == io::ErrorKind::OutOfMemory,
            _ => false,
        }
    }

    /// 401: the apiserver answered, so it is alive and serving, but will not tell an
    /// unauthenticated probe whether it is ready (`--anonymous-auth=false` and no client
    /// certificate). 403 is not this: a starting kube-apiserver answers anonymous `/readyz`
    /// with 403 until its RBAC roles are bootstrapped (then 500, then 200), so a 403 counts as
    /// not ready, like a 500; a cluster whose RBAC denies the probe `/readyz` for good is then
    /// served by the all-down fallback, which terminates nothing.
    pub fn not_authorized(&self) -> Option<u16> {
        match self {
            ProbeFailure::Status { code: 401, .. } => Some(401),
            _ => None,
        }
    }

    /// Nothing came back for long enough to call the master gone (silent, or its kernel
    /// acknowledging nothing): down at once, its sockets terminated.
    pub fn confirms_gone(&self) -> bool {
        matches!(self, ProbeFailure::Silent { .. } | ProbeFailure::Unacknowledged { .. })
    }

    /// The connection died under the probe rather than the master being slow: the kernel
    /// gave up on it (nothing acknowledged for `TCP_USER_TIMEOUT`) or the master reset it. Like
    /// a lost idle connection it makes the backend suspect, and the prober reconnects at once.
    pub fn connection_died(&self) -> bool {
        matches!(self, ProbeFailure::Abandoned { .. } | ProbeFailure::Reset)
    }
}

/// Bound on [`ProbeFailure::Status`]'s `line`.
pub const STATUS_LINE_CHARS: usize = 200;

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Refused => f.write_str("connection refused"),
            ProbeFailure::Unreachable(errno) => write!(f, "unreachable ({errno})"),
            ProbeFailure::Abandoned { phase: Phase::Idle } => {
                f.write_str("connection timed out while idle: no answer to TCP keepalive")
            }
            ProbeFailure::Abandoned { phase } => {
                write!(f, "connection timed out ({phase}): the master acknowledged nothing for 1.5 s")
            }
            ProbeFailure::Timeout { phase } => write!(f, "timed out during {phase}"),
            ProbeFailure::Reset => f.write_str("connection reset by the server"),
            ProbeFailure::Tls(e) => write!(f, "TLS: {e}"),
            ProbeFailure::Status { code, line } if line.is_empty() => write!(f, "HTTP {code}"),
            ProbeFailure::Status { code, line } => write!(f, "HTTP {code}: {line}"),
            ProbeFailure::Malformed(m) => write!(f, "malformed response: {m}"),
            ProbeFailure::Oversized { limit } => write!(f, "response larger than {limit} bytes"),
            ProbeFailure::Closed => f.write_str("connection closed by the server"),
            ProbeFailure::Io { errno: Some(errno), .. } => write!(f, "I/O error: {errno}"),
            ProbeFailure::Io { kind, errno: None } => write!(f, "I/O error: {kind}"),
            ProbeFailure::Silent { waited } => {
                write!(f, "no answer for {:.1} s: hung, stopped or cut off", waited.as_secs_f64())
            }
            ProbeFailure::Unacknowledged { waited, retransmits } => write!(
                f,
                "request unacknowledged for {:.1} s after {retransmits} retransmissions: link, network or machine gone",
                waited.as_secs_f64()
            ),
        }
    }
}

/// Maps an I/O error from a socket or from tokio-rustls (which wraps `rustls::Error` in an
/// `io::Error`) to a failure. `phase` is where it happened; it matters for `ETIMEDOUT`.
pub(crate) fn classify(err: &io::Error, phase: Phase) -> ProbeFailure {
    if let Some(tls) = err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        return ProbeFailure::Tls(tls.clone());
    }
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => ProbeFailure::Refused,
        Some(e @ (libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN)) => {
            ProbeFailure::Unreachable(Errno(e))
        }
        Some(libc::ETIMEDOUT) => ProbeFailure::Abandoned { phase },
        Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => ProbeFailure::Reset,
        Some(e) => ProbeFailure::Io { kind: err.kind(), errno: Some(Errno(e)) },
        None => match err.kind() {
            // rustls: the TCP stream ended without a TLS close_notify.
            io::ErrorKind::UnexpectedEof => ProbeFailure::Closed,
            io::ErrorKind::TimedOut => ProbeFailure::Timeout { phase },
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ProbeFailure::Reset,
            io::ErrorKind::ConnectionRefused => ProbeFailure::Refused,
            kind => ProbeFailure::Io { kind, errno: None },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_errno() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(classify(&e, Phase::Connect), ProbeFailure::Refused);
        let e = io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        let f = classify(&e, Phase::Connect);
        assert_eq!(f, ProbeFailure::Unreachable(Errno(libc::EHOSTUNREACH)));
        assert_eq!(f.to_string(), "unreachable (EHOSTUNREACH)");
        let e = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        assert_eq!(classify(&e, Phase::Idle), ProbeFailure::Abandoned { phase: Phase::Idle });
        assert_eq!(classify(&e, Phase::Response), ProbeFailure::Abandoned { phase: Phase::Response });
        let e = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(classify(&e, Phase::Response), ProbeFailure::Reset);
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(classify(&e, Phase::Connect).to_string(), "I/O error: EMFILE");
        let e = io::Error::from_raw_os_error(4000);
        assert_eq!(classify(&e, Phase::Connect).to_string(), "I/O error: errno 4000");
    }

    #[test]
    fn classify_wrapped_rustls_error() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let e = io::Error::new(io::ErrorKind::InvalidData, inner.clone());
        let f = classify(&e, Phase::Handshake);
        assert_eq!(f, ProbeFailure::Tls(inner));
        assert_eq!(f.to_string(), "TLS: invalid peer certificate: UnknownIssuer");
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, "no close_notify");
        assert_eq!(classify(&e, Phase::Idle), ProbeFailure::Closed);
    }

    #[test]
    fn local_errors_are_told_apart() {
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::EADDRNOTAVAIL] {
            assert!(classify(&io::Error::from_raw_os_error(e), Phase::Connect).is_local(), "{e}");
        }
        for e in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ETIMEDOUT, libc::ECONNRESET, libc::EPROTO] {
            assert!(!classify(&io::Error::from_raw_os_error(e), Phase::Connect).is_local(), "{e}");
        }
    }

    #[test]
    fn snippet_escapes_and_bounds() {
        assert_eq!(snippet(b"ok\r\n\x1b[31m"), "ok\\r\\n\\x1b[31m");
        let long = [b'a'; 100];
        assert_eq!(snippet(&long).len(), SNIPPET_BYTES + 3);
    }

    #[test]
    fn display_is_one_line() {
        let failures = [
            ProbeFailure::Timeout { phase: Phase::Handshake },
            ProbeFailure::Abandoned { phase: Phase::Idle },
            ProbeFailure::Abandoned { phase: Phase::Response },
            ProbeFailure::Status { code: 500, line: "[-]etcd failed: reason withheld".into() },
            ProbeFailure::Status { code: 503, line: String::new() },
            ProbeFailure::Malformed(Malformed::StatusLine(snippet(b"\x00\x01garbage\n"))),
            ProbeFailure::Oversized { limit: 65536 },
        ];
        let text: Vec<String> = failures.iter().map(|f| f.to_string()).collect();
        assert_eq!(
            text,
            [
                "timed out during TLS handshake",
                "connection timed out while idle: no answer to TCP keepalive",
                "connection timed out (waiting for the response): the master acknowledged nothing for 1.5 s",
                "HTTP 500: [-]etcd failed: reason withheld",
                "HTTP 503",
                "malformed response: status line is not HTTP/1.x: \"\\x00\\x01garbage\\n\"",
                "response larger than 65536 bytes",
            ]
        );
    }
}
