//! The response parser against well-formed, split, malformed and oversized responses.

use super::*;

const LIMIT: usize = 64 * 1024;

/// Feeds `input` in pieces of `step` bytes, then EOF if `eof`.
fn parse_in_steps(input: &[u8], step: usize, eof: bool) -> Result<Response, ProbeFailure> {
    let mut p = ResponseParser::new(LIMIT);
    for piece in input.chunks(step.max(1)) {
        if p.feed(piece)? {
            return Ok(p.response());
        }
    }
    if eof {
        p.eof()?;
        return Ok(p.response());
    }
    panic!("response incomplete without EOF");
}

/// The same result whether the bytes come at once, one by one, or in odd pieces.
fn parse(input: &[u8], eof: bool) -> Result<Response, ProbeFailure> {
    let whole = parse_in_steps(input, input.len(), eof);
    for step in [1, 2, 3, 7, 100] {
        assert_eq!(parse_in_steps(input, step, eof), whole, "step {step}");
    }
    whole
}

#[test]
fn request_line_and_headers() {
    let req = request("/readyz", "192.0.2.11:6443".parse().unwrap());
    let text = String::from_utf8(req).unwrap();
    assert!(text.starts_with("GET /readyz HTTP/1.1\r\nHost: 192.0.2.11:6443\r\n"), "{text}");
    assert!(text.contains("\r\nUser-Agent: kha/"));
    assert!(text.contains("\r\nConnection: keep-alive\r\n"));
    assert!(text.ends_with("\r\n\r\n"));
    let req = request("/health", "[2001:db8::1]:443".parse().unwrap());
    assert!(String::from_utf8(req).unwrap().contains("\r\nHost: [2001:db8::1]\r\n"));
}

#[test]
fn request_path_cannot_break_the_request() {
    let req =
        String::from_utf8(request("readyz?verbose\r\nX: y é", "10.0.0.1:6443".parse().unwrap())).unwrap();
    let first = req.lines().next().unwrap();
    assert_eq!(first, "GET /readyz?verbose%0D%0AX:%20y%20%C3%A9 HTTP/1.1");
}

#[test]
fn content_length_body() {
    let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok", false);
    assert_eq!(r, Ok(Response { status: 200, body: b"ok".to_vec(), close: false }));
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    let input = b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;foo=bar\r\n[-]et\r\n1A\r\ncd failed: reason withheld\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let r = parse(input, false).unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.body, b"[-]etcd failed: reason withheld");
    assert!(!r.close);
}

#[test]
fn bare_lf_is_accepted() {
    let r = parse(b"HTTP/1.1 200 OK\nContent-Length: 3\n\nyes", false).unwrap();
    assert_eq!(r.body, b"yes");
}

#[test]
fn close_delimited_body_needs_eof() {
    let r = parse(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).unwrap();
    assert_eq!(r, Response { status: 200, body: b"all of it".to_vec(), close: true });
}

#[test]
fn connection_close_and_http10() {
    let r = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false);
    assert!(r.unwrap().close);
    let r = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
    assert!(r.unwrap().close);
    let r = parse(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", false);
    assert!(!r.unwrap().close);
}

#[test]
fn interim_responses_are_skipped() {
    let r = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
}

#[test]
fn garbage_fails_at_once() {
    let mut p = ResponseParser::new(LIMIT);
    let err = p.feed(b"\x16\x03\x01 garbage").unwrap_err();
    assert!(matches!(err, ProbeFailure::Malformed(Malformed::StatusLine(_))), "{err:?}");
    for bad in [&b"HTTP/2 200\r\n\r\n"[..], b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"\r\n\r\n"] {
        // How much of the line is quoted depends on how it arrived, so not `parse`.
        for step in [1, 3, bad.len()] {
            let err = parse_in_steps(bad, step, true).unwrap_err();
            assert!(matches!(err, ProbeFailure::Malformed(Malformed::StatusLine(_))), "{err:?}");
        }
    }
}

#[test]
fn bad_headers_and_framing() {
    type IsExpected = fn(&Malformed) -> bool;
    let cases: [(&[u8], IsExpected); 6] = [
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", |m| matches!(m, Malformed::HeaderLine(_))),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n", |m| matches!(m, Malformed::HeaderLine(_))),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", |m| matches!(m, Malformed::ContentLength(_))),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", |m| {
            matches!(m, Malformed::ContentLength(_))
        }),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", |m| {
            matches!(m, Malformed::TransferEncoding(_))
        }),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", |m| {
            matches!(m, Malformed::ChunkSize(_))
        }),
    ];
    for (input, expected) in cases {
        match parse(input, true) {
            Err(ProbeFailure::Malformed(m)) if expected(&m) => {}
            other => panic!("{}: {other:?}", input.escape_ascii()),
        }
    }
    let err = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX", true).unwrap_err();
    assert_eq!(err, ProbeFailure::Malformed(Malformed::ChunkEnd));
    let err = parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", true).unwrap_err();
    assert_eq!(err, ProbeFailure::Malformed(Malformed::SwitchingProtocols));
}

#[test]
fn same_content_length_twice_is_fine() {
    let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", false).unwrap();
    assert_eq!(r.body, b"ok");
}

#[test]
fn truncated_response_is_closed() {
    for input in [&b""[..], b"HTTP/1.1 200", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok"] {
        assert_eq!(parse(input, true), Err(ProbeFailure::Closed), "{}", input.escape_ascii());
    }
}

#[test]
fn oversized_in_every_shape() {
    let limit = 100;
    let oversized = |input: &[u8], step: usize| {
        let mut p = ResponseParser::new(limit);
        for piece in input.chunks(step) {
            match p.feed(piece) {
                Err(ProbeFailure::Oversized { limit: 100 }) => {
                    // Never buffered much more than the limit plus one read.
                    assert!(p.buf.len() + p.body.len() <= limit + step + 2);
                    return;
                }
                Ok(false) => {}
                other => panic!("{other:?}"),
            }
        }
        panic!("not oversized");
    };
    let big_head = [&b"HTTP/1.1 200 OK\r\nX: "[..], &[b'a'; 500]].concat();
    let big_length = b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n".to_vec();
    let big_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n".to_vec();
    let many_chunks =
        [&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..], &b"1\r\na\r\n".repeat(100)].concat();
    let until_close = [&b"HTTP/1.1 200 OK\r\n\r\n"[..], &[b'a'; 500]].concat();
    for input in [big_head, big_length, big_chunk, many_chunks, until_close] {
        for step in [1, 7, 64, 1000] {
            oversized(&input, step);
        }
    }
}

#[test]
fn exactly_at_the_limit_is_fine() {
    let input = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let mut p = ResponseParser::new(input.len());
    assert_eq!(p.feed(input), Ok(true));
}

#[test]
fn leftover_after_response() {
    let mut p = ResponseParser::new(LIMIT);
    assert_eq!(p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP"), Ok(true));
    assert_eq!(p.leftover().as_deref(), Some("HTTP"));
    let mut p = ResponseParser::new(LIMIT);
    assert_eq!(p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), Ok(true));
    assert_eq!(p.leftover(), None);
}

#[test]
fn reason_line_prefers_the_failed_check() {
    let body =
        b"[+]ping ok\n[+]log ok\n[-]etcd failed: reason withheld\n[+]informer-sync ok\nreadyz check failed\n";
    assert_eq!(reason_line(body), "[-]etcd failed: reason withheld");
    assert_eq!(reason_line(b"\n  service unavailable \r\nmore"), "service unavailable");
    assert_eq!(reason_line(b""), "");
    assert_eq!(reason_line(b"a\x1b[31mb"), "a?[31mb");
    assert_eq!(reason_line(&[b'x'; 1000]).len(), STATUS_LINE_CHARS);
    assert_eq!(reason_line(&[0xff, b'a']), "\u{fffd}a");
}
