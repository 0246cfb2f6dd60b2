//! A deliberately small HTTP/1.1 codec: enough for kube-apiserver's
//! health/version endpoints and for a client that reads them.
//!
//! Everything is bounded: the request/response head (default 16 KiB), the
//! number of header fields, and bodies (default 64 KiB). Bodies are framed by
//! `Content-Length` only; `Transfer-Encoding` is refused, since no lab peer
//! needs it and half-supporting it invites request smuggling bugs. Parsing is
//! pure (`parse_request_head`, `parse_response_head`) so it is tested without
//! sockets; the async `read_*` functions only add buffering on top.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;
pub const MAX_HEADER_FIELDS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of start line plus header fields plus the blank line.
    pub max_head: usize,
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_head: DEFAULT_MAX_HEAD, max_body: DEFAULT_MAX_BODY }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("message head larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("more than {MAX_HEADER_FIELDS} header fields")]
    TooManyFields,
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("body of {length} bytes exceeds {limit}")]
    BodyTooLarge { length: usize, limit: usize },
    #[error("unsupported {what}")]
    Unsupported { what: &'static str },
}

impl HeadError {
    /// The status a server answers this error with before closing.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge { .. } | HeadError::TooManyFields => 431,
            HeadError::Malformed { .. } => 400,
            HeadError::BodyTooLarge { .. } => 413,
            HeadError::Unsupported { .. } => 501,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("invalid HTTP message")]
    Head(#[from] HeadError),
    #[error("reading HTTP message")]
    Io(#[from] io::Error),
    #[error("connection closed in the middle of a message")]
    UnexpectedEof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub version: Version,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The target without its query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// Whether the connection may serve another request after this one.
    pub fn keep_alive(&self) -> bool {
        let has = |token| connection_has(&self.headers, token);
        match self.version {
            Version::Http11 => !has("close"),
            Version::Http10 => has("keep-alive") && !has("close"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![("Content-Type".to_owned(), content_type.to_owned())],
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Serializes status line, headers, `Content-Length`, `Connection` and,
    /// unless `include_body` is false (HEAD), the body.
    pub fn encode(&self, keep_alive: bool, include_body: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        out.extend_from_slice(
            format!("HTTP/1.1 {} {}\r\n", self.status, reason_phrase(self.status)).as_bytes(),
        );
        for (name, value) in &self.headers {
            // Header values are ours, but a CR/LF in one would split the
            // response; drop such a header rather than emit it.
            if is_token(name) && !value.bytes().any(|b| b == b'\r' || b == b'\n') {
                out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
        }
        out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        out.extend_from_slice(if keep_alive {
            b"Connection: keep-alive\r\n"
        } else {
            b"Connection: close\r\n"
        });
        out.extend_from_slice(b"\r\n");
        if include_body {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn connection_has(headers: &[(String, String)], token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A head split into its start line and fields; `len` includes the blank line.
struct RawHead<'a> {
    start: &'a str,
    headers: Vec<(String, String)>,
    len: usize,
}

fn split_head(buf: &[u8], limit: usize) -> Result<Option<RawHead<'_>>, HeadError> {
    let window = &buf[..buf.len().min(limit)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= limit { Err(HeadError::TooLarge { limit }) } else { Ok(None) };
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HeadError::Malformed { what: "encoding" })?;
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or_default();
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADER_FIELDS {
            return Err(HeadError::TooManyFields);
        }
        if line.starts_with([' ', '\t']) {
            return Err(HeadError::Malformed { what: "folded header field" });
        }
        let (name, value) = line.split_once(':').ok_or(HeadError::Malformed { what: "header field" })?;
        if !is_token(name) {
            return Err(HeadError::Malformed { what: "header name" });
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(HeadError::Malformed { what: "header value" });
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(Some(RawHead { start, headers, len: end + 4 }))
}

/// The body length announced by a head: `Content-Length`, 0 if absent.
fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, HeadError> {
    if find_header(headers, "transfer-encoding").is_some() {
        return Err(HeadError::Unsupported { what: "transfer-encoding" });
    }
    let mut length = None;
    for (_, v) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
        let n = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) { v.parse().ok() } else { None };
        let n: usize = n.ok_or(HeadError::Malformed { what: "content-length" })?;
        if length.is_some_and(|l| l != n) {
            return Err(HeadError::Malformed { what: "conflicting content-length" });
        }
        length = Some(n);
    }
    Ok(length)
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read
/// more. On success returns the request (without body), the head length and
/// the body length still to read.
pub fn parse_request_head(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize, usize)>, HeadError> {
    let Some(raw) = split_head(buf, limits.max_head)? else {
        return Ok(None);
    };
    let mut parts = raw.start.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed { what: "request line" });
    };
    if !is_token(method) {
        return Err(HeadError::Malformed { what: "method" });
    }
    if !(target.starts_with('/') || target == "*")
        || target.bytes().any(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(HeadError::Malformed { what: "request target" });
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        _ => {
            return Err(HeadError::Malformed { what: "HTTP version" });
        }
    };
    let body_len = content_length(&raw.headers)?.unwrap_or(0);
    if body_len > limits.max_body {
        return Err(HeadError::BodyTooLarge { length: body_len, limit: limits.max_body });
    }
    let request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        version,
        headers: raw.headers,
        body: Vec::new(),
    };
    Ok(Some((request, raw.len, body_len)))
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Exactly(usize),
    /// No Content-Length: the body runs until the server closes.
    UntilClose,
}

/// Parses a response head at the start of `buf` (see `parse_request_head`).
pub fn parse_response_head(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(Response, usize, BodyLength)>, HeadError> {
    let Some(raw) = split_head(buf, limits.max_head)? else {
        return Ok(None);
    };
    let mut parts = raw.start.splitn(3, ' ');
    let (Some(version), Some(status)) = (parts.next(), parts.next()) else {
        return Err(HeadError::Malformed { what: "status line" });
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::Malformed { what: "HTTP version" });
    }
    let status: u16 = match status.parse() {
        Ok(s) if status.len() == 3 && (100..=999).contains(&s) => s,
        _ => {
            return Err(HeadError::Malformed { what: "status code" });
        }
    };
    let body = if status < 200 || status == 204 || status == 304 {
        BodyLength::Exactly(0)
    } else {
        match content_length(&raw.headers)? {
            Some(n) if n > limits.max_body => {
                return Err(HeadError::BodyTooLarge { length: n, limit: limits.max_body });
            }
            Some(n) => BodyLength::Exactly(n),
            None => BodyLength::UntilClose,
        }
    };
    Ok(Some((Response { status, headers: raw.headers, body: Vec::new() }, raw.len, body)))
}

/// Appends what one read returns to `buf`; 0 means end of stream.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let n = r.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Reads one request (head and body) from `r`. Bytes after it stay in `buf`
/// for the next call, which is what makes pipelining and keep-alive work.
/// `Ok(None)` is a clean close between requests.
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<Request>, ReadError> {
    loop {
        if let Some((mut request, head_len, body_len)) = parse_request_head(buf, limits)? {
            while buf.len() < head_len + body_len {
                if fill(r, buf).await? == 0 {
                    return Err(ReadError::UnexpectedEof);
                }
            }
            request.body = buf[head_len..head_len + body_len].to_vec();
            buf.drain(..head_len + body_len);
            return Ok(Some(request));
        }
        if fill(r, buf).await? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(ReadError::UnexpectedEof) };
        }
    }
}

/// Reads one response (head and body) from `r`, leaving later bytes in `buf`.
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Response, ReadError> {
    loop {
        if let Some((mut response, head_len, body)) = parse_response_head(buf, limits)? {
            match body {
                BodyLength::Exactly(n) => {
                    while buf.len() < head_len + n {
                        if fill(r, buf).await? == 0 {
                            return Err(ReadError::UnexpectedEof);
                        }
                    }
                    response.body = buf[head_len..head_len + n].to_vec();
                    buf.drain(..head_len + n);
                }
                BodyLength::UntilClose => {
                    while fill(r, buf).await? != 0 {
                        if buf.len() - head_len > limits.max_body {
                            let length = buf.len() - head_len;
                            return Err(HeadError::BodyTooLarge { length, limit: limits.max_body }.into());
                        }
                    }
                    response.body = buf[head_len..].to_vec();
                    buf.clear();
                }
            }
            return Ok(response);
        }
        if fill(r, buf).await? == 0 {
            return Err(ReadError::UnexpectedEof);
        }
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
