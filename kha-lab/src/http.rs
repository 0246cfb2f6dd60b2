//! The lab clients' HTTP/1.1 response reader, and the response type the simulated master
//! routes to (hyper serves it: `master`). Kept by hand, not hyper's client: the load clients
//! time each phase of an exchange (write, first byte, last byte) on a stream they own,
//! `tls_modes` reads a response head before its body arrives, and a bench client must cost
//! the same against every contender it measures.
//!
//! Everything is bounded: the response head (default 16 KiB), the number of header fields,
//! and bodies (default 64 KiB). Bodies are framed by `Content-Length` only;
//! `Transfer-Encoding` is refused, since no lab peer needs it and half-supporting it invites
//! smuggling bugs. Parsing is pure (`parse_response_head`) so it is tested without sockets;
//! `read_response` only adds buffering on top.

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

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("invalid HTTP message")]
    Head(#[from] HeadError),
    #[error("reading HTTP message")]
    Io(#[from] io::Error),
    #[error("connection closed in the middle of a message")]
    UnexpectedEof,
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
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
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

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Exactly(usize),
    /// No Content-Length: the body runs until the server closes.
    UntilClose,
}

/// Parses a response head at the start of `buf`. `Ok(None)`: incomplete, read more. On
/// success returns the response (without body), the head length and how the body is framed.
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
