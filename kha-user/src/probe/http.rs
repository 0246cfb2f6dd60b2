//! The HTTP/1.1 side of a probe, without I/O: the request bytes, and an incremental response
//! parser that never holds more than the response limit (plus one read) and never panics on
//! any input. Content-Length, chunked and close-delimited bodies are understood; 1xx interim
//! responses are skipped.
//!
//! By hand although hyper is linked (through kube-rs), because the figures say so: against
//! hyper 1.12's `client::conn::http1` bounded the same way, on one kept-alive TLS connection
//! (`cargo xtask bench probe-client`, docs/benchmarks.md, 2026-12-04), this costs half the
//! instructions per exchange, TLS included (`OPTIONS *` 15.3 k against 29.9 k, `/readyz` 200
//! 22.6 k against 41.7 k, a 500 with a 2 KiB body 30.7 k against 49.2 k), 3–4 allocations
//! against 7–14 (0.3–8 KB against 9–14 KB), 17 KB of heap per connection against 42 KB, and
//! hyper in the prober would add 52 KiB to the binary (another monomorphisation of its client).
//! hyper would also lose what the prober tells apart: a connection closed before any byte of
//! the answer (retried once) from one that died mid-answer (both "connection closed before
//! message completed"), and the bytes of stray data on an idle connection. It sees
//! `Connection: close` and a FIN or RST on the idle connection as quickly as we do.

use std::net::SocketAddr;

use super::failure::{Malformed, ProbeFailure, STATUS_LINE_CHARS, snippet};

/// Longest chunk-size or trailer line accepted (chunk extensions included).
const MAX_CHUNK_LINE: usize = 1024;

/// `GET <path> HTTP/1.1` for `addr`, with `Host: <ip>[:port]` (the port only if not 443, as
/// RFC 9110 says). Bytes of `path` that may not appear in a request target (space, controls,
/// non-ASCII) are percent-encoded, so no configured path can break the request line; a path
/// not starting with `/` gets one.
pub(crate) fn request(path: &str, addr: SocketAddr) -> Vec<u8> {
    let mut target = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        target.push('/');
    }
    for &b in path.as_bytes() {
        if b.is_ascii_graphic() && b != b'#' {
            target.push(char::from(b));
        } else {
            target.push_str(&format!("%{b:02X}"));
        }
    }
    head("GET", &target, addr)
}

/// `OPTIONS * HTTP/1.1`, the liveness request: Go's HTTP server answers it itself (200, no
/// body) before any handler, so it costs an apiserver a request parse and no more.
pub(crate) fn options_request(addr: SocketAddr) -> Vec<u8> {
    head("OPTIONS", "*", addr)
}

fn head(method: &str, target: &str, addr: SocketAddr) -> Vec<u8> {
    let host = match (addr, addr.port()) {
        (SocketAddr::V4(a), 443) => a.ip().to_string(),
        (SocketAddr::V6(a), 443) => format!("[{}]", a.ip()),
        (addr, _) => addr.to_string(),
    };
    format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kha/{}\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// A complete response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The decoded body (chunk framing removed); at most the response limit.
    pub body: Vec<u8>,
    /// The connection cannot carry another request: the server said `Connection: close`
    /// (or spoke HTTP/1.0 without keep-alive), or the body was delimited by the close.
    pub close: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Done,
}

/// Feeds on the bytes read from the connection; see [`ResponseParser::feed`].
pub struct ResponseParser {
    limit: usize,
    /// Received bytes not yet consumed by the state machine.
    buf: Vec<u8>,
    /// Bytes of this response consumed so far (head and body framing included).
    consumed: usize,
    /// Where to resume looking for the end of the head in `buf`.
    head_scan: usize,
    state: State,
    status: u16,
    close: bool,
    body: Vec<u8>,
    received_any: bool,
}

impl ResponseParser {
    /// `limit` bounds the status line, headers, body and framing together.
    pub fn new(limit: usize) -> Self {
        ResponseParser {
            limit,
            buf: Vec::new(),
            consumed: 0,
            head_scan: 0,
            state: State::Head,
            status: 0,
            close: false,
            body: Vec::new(),
            received_any: false,
        }
    }

    /// Whether any byte has been fed: a reused connection that the server closed before
    /// answering is worth one retry on a fresh connection, one that answered half is not.
    pub fn received_any(&self) -> bool {
        self.received_any
    }

    /// Takes the next bytes read. `Ok(true)` once the response is complete; bytes after its
    /// end are kept (see [`ResponseParser::leftover`]).
    pub fn feed(&mut self, data: &[u8]) -> Result<bool, ProbeFailure> {
        if self.state == State::Done {
            self.buf.extend_from_slice(&data[..data.len().min(super::failure::SNIPPET_BYTES)]);
            return Ok(true);
        }
        if !data.is_empty() {
            self.received_any = true;
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        let result = self.run(&mut pos);
        self.consumed = self.consumed.saturating_add(pos);
        self.buf.drain(..pos.min(self.buf.len()));
        self.head_scan = self.head_scan.saturating_sub(pos);
        result?;
        let done = self.state == State::Done;
        // Until the response is complete, what is buffered belongs to it too.
        let pending = if done { 0 } else { self.buf.len() };
        if self.consumed.saturating_add(pending) > self.limit {
            return Err(ProbeFailure::Oversized { limit: self.limit });
        }
        Ok(done)
    }

    /// The server closed the connection (or ended TLS). Completes a close-delimited body;
    /// anything else incomplete is [`ProbeFailure::Closed`].
    pub fn eof(&mut self) -> Result<(), ProbeFailure> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(ProbeFailure::Closed),
        }
    }

    /// The complete response. Call after `feed` returned `Ok(true)` or `eof` returned `Ok(())`.
    pub fn response(&mut self) -> Response {
        Response { status: self.status, body: std::mem::take(&mut self.body), close: self.close }
    }

    /// Bytes received after the end of a complete response (a server must not send any: there
    /// was one request), as a snippet for [`Malformed::UnexpectedData`].
    pub fn leftover(&self) -> Option<String> {
        (self.state == State::Done && !self.buf.is_empty()).then(|| snippet(&self.buf))
    }

    fn run(&mut self, pos: &mut usize) -> Result<(), ProbeFailure> {
        loop {
            let avail = &self.buf[*pos..];
            match self.state {
                State::Done => return Ok(()),
                State::Head => {
                    // Fail fast on garbage rather than waiting for the size limit.
                    let prefix = &b"HTTP/1."[..avail.len().min(7)];
                    if !avail.starts_with(prefix) {
                        return Err(malformed(Malformed::StatusLine(snippet(first_line(avail)))));
                    }
                    let Some(end) = find_head_end(&self.buf, (*pos).max(self.head_scan)) else {
                        // Resume at the last two bytes: they may start the blank line.
                        self.head_scan = self.buf.len().saturating_sub(2).max(*pos);
                        return Ok(());
                    };
                    let head = &self.buf[*pos..end];
                    let parsed = parse_head(head)?;
                    *pos = end;
                    self.head_scan = end;
                    self.start_body(parsed)?;
                }
                State::Length(remaining) | State::ChunkData(remaining) => {
                    let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(avail.len());
                    if take == 0 {
                        return Ok(());
                    }
                    self.body.extend_from_slice(&avail[..take]);
                    *pos += take;
                    let left = remaining - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), n) => State::Length(n),
                        (_, 0) => State::ChunkDataEnd,
                        (_, n) => State::ChunkData(n),
                    };
                }
                State::UntilClose => {
                    self.body.extend_from_slice(avail);
                    *pos += avail.len();
                    return Ok(());
                }
                State::ChunkSize => {
                    let Some((line, next)) = take_line(avail) else {
                        return check_line_len(avail, Malformed::ChunkSize);
                    };
                    let size = parse_chunk_size(line)
                        .ok_or_else(|| malformed(Malformed::ChunkSize(snippet(line))))?;
                    *pos += next;
                    self.state = if size == 0 {
                        State::Trailers
                    } else if size > self.limit as u64 {
                        return Err(ProbeFailure::Oversized { limit: self.limit });
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkDataEnd => match avail {
                    [b'\n', ..] => {
                        *pos += 1;
                        self.state = State::ChunkSize;
                    }
                    [b'\r', b'\n', ..] => {
                        *pos += 2;
                        self.state = State::ChunkSize;
                    }
                    [] | [b'\r'] => return Ok(()),
                    _ => return Err(malformed(Malformed::ChunkEnd)),
                },
                State::Trailers => {
                    let Some((line, next)) = take_line(avail) else {
                        return check_line_len(avail, Malformed::HeaderLine);
                    };
                    *pos += next;
                    if line.is_empty() {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    fn start_body(&mut self, head: Head) -> Result<(), ProbeFailure> {
        match head.status {
            101 => return Err(malformed(Malformed::SwitchingProtocols)),
            // 100 Continue, 103 Early Hints: a final response follows.
            100..=199 => return Ok(()),
            _ => {}
        }
        self.status = head.status;
        self.close = head.close;
        self.state = if head.status == 204 || head.status == 304 {
            State::Done
        } else if let Some(last) = head.transfer_encoding.last() {
            if last != "chunked" {
                return Err(malformed(Malformed::TransferEncoding(snippet(last.as_bytes()))));
            }
            // With both, Transfer-Encoding wins and the connection must not be reused
            // (RFC 9112 6.3).
            if head.content_length.is_some() {
                self.close = true;
            }
            State::ChunkSize
        } else if let Some(len) = head.content_length {
            if len > self.limit as u64 {
                return Err(ProbeFailure::Oversized { limit: self.limit });
            }
            if len == 0 { State::Done } else { State::Length(len) }
        } else {
            self.close = true;
            State::UntilClose
        };
        Ok(())
    }
}

fn malformed(m: Malformed) -> ProbeFailure {
    ProbeFailure::Malformed(m)
}

/// No complete line yet: fine unless what is there is already too long for one.
fn check_line_len(avail: &[u8], what: fn(String) -> Malformed) -> Result<(), ProbeFailure> {
    if avail.len() > MAX_CHUNK_LINE { Err(malformed(what(snippet(avail)))) } else { Ok(()) }
}

/// The first line (without its end) of `bytes`, or all of it.
fn first_line(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => &bytes[..=i],
        None => bytes,
    }
}

/// A line ending in LF (CR LF accepted) at the start of `bytes`: the line without its end,
/// and the index after the end.
fn take_line(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let lf = bytes.iter().position(|&b| b == b'\n')?;
    let line = &bytes[..lf];
    Some((line.strip_suffix(b"\r").unwrap_or(line), lf + 1))
}

/// The index after the blank line that ends a head, searching from `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let lf = i + buf.get(i..)?.iter().position(|&b| b == b'\n')?;
        match buf.get(lf + 1..) {
            Some([b'\n', ..]) => return Some(lf + 2),
            Some([b'\r', b'\n', ..]) => return Some(lf + 3),
            _ => i = lf + 1,
        }
    }
    None
}

struct Head {
    status: u16,
    close: bool,
    content_length: Option<u64>,
    transfer_encoding: Vec<String>,
}

fn parse_head(head: &[u8]) -> Result<Head, ProbeFailure> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let bad_status = || malformed(Malformed::StatusLine(snippet(status_line)));
    let (version, rest) = match status_line {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', v @ (b'0' | b'1'), b' ', rest @ ..] => (*v, rest),
        _ => return Err(bad_status()),
    };
    let status = match rest {
        [a, b, c] | [a, b, c, b' ', ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(bad_status()),
    };
    if status < 100 {
        return Err(bad_status());
    }
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = Vec::new();
    let (mut conn_close, mut conn_keep_alive) = (false, false);
    for line in lines {
        if line.is_empty() {
            break;
        }
        let bad_header = || malformed(Malformed::HeaderLine(snippet(line)));
        let colon = line.iter().position(|&b| b == b':').ok_or_else(bad_header)?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            // Also catches an obsolete folded line, which starts with a space.
            return Err(bad_header());
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            for item in value.split(|&b| b == b',').map(trim) {
                let bad = || malformed(Malformed::ContentLength(snippet(value)));
                let n = parse_decimal(item).ok_or_else(bad)?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(bad());
                }
                content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for item in value.split(|&b| b == b',').map(trim).filter(|i| !i.is_empty()) {
                transfer_encoding.push(String::from_utf8_lossy(item).to_ascii_lowercase());
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for item in value.split(|&b| b == b',').map(trim) {
                conn_close |= item.eq_ignore_ascii_case(b"close");
                conn_keep_alive |= item.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let close = conn_close || (version == b'0' && !conn_keep_alive);
    Ok(Head { status, close, content_length, transfer_encoding })
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// `1a3;ext=1` -> 0x1a3. At most 15 hex digits, so the value fits easily.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|&b| b == b';').next().map(trim).unwrap_or_default();
    if size.is_empty() || size.len() > 15 {
        return None;
    }
    let text = std::str::from_utf8(size).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// The line of a failing health response that says why: the first failed check (`[-]...`)
/// of a kube-apiserver `/readyz`, `/livez` or `/healthz` (which list every check, passed ones
/// first), else the first non-empty line. Trimmed, non-printable characters replaced, at most
/// [`STATUS_LINE_CHARS`] characters.
pub fn reason_line(body: &[u8]) -> String {
    let lines = || body.split(|&b| b == b'\n').map(trim_line).filter(|l| !l.is_empty());
    let line = lines().find(|l| l.starts_with(b"[-]")).or_else(|| lines().next()).unwrap_or_default();
    let mut out = String::new();
    for c in String::from_utf8_lossy(line).chars().take(STATUS_LINE_CHARS) {
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

fn trim_line(line: &[u8]) -> &[u8] {
    line.trim_ascii()
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
