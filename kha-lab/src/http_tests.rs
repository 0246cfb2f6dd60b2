use super::*;

fn limits() -> Limits {
    Limits::default()
}

#[test]
fn parses_a_get_and_reports_lengths() {
    let raw = b"GET /readyz?verbose HTTP/1.1\r\nHost: localhost:6443\r\nAccept:  */* \r\n\r\nNEXT";
    let (req, head_len, body_len) = parse_request_head(raw, &limits()).unwrap().expect("complete");
    assert_eq!(req.method, "GET");
    assert_eq!(req.path(), "/readyz");
    assert_eq!(req.header("host"), Some("localhost:6443"));
    assert_eq!(req.header("ACCEPT"), Some("*/*"));
    assert_eq!(&raw[head_len..], b"NEXT");
    assert_eq!(body_len, 0);
    assert!(req.keep_alive());
}

#[test]
fn incomplete_head_asks_for_more() {
    assert_eq!(parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n", &limits()), Ok(None));
    assert_eq!(parse_request_head(b"", &limits()), Ok(None));
}

#[test]
fn oversized_head_is_rejected_without_a_terminator() {
    let small = Limits { max_head: 64, max_body: 0 };
    let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
    raw.resize(64, b'a');
    assert_eq!(parse_request_head(&raw, &small), Err(HeadError::TooLarge { limit: 64 }));
    // A terminator that ends past the limit does not count either.
    let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
    raw.resize(62, b'a');
    raw.extend_from_slice(b"\r\n\r\n");
    assert_eq!(parse_request_head(&raw, &small), Err(HeadError::TooLarge { limit: 64 }));
}

#[test]
fn malformed_requests_are_errors_not_panics() {
    let cases: &[&[u8]] = &[
        b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET noslash HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"G\xffT / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ];
    for raw in cases {
        let err = parse_request_head(raw, &limits()).expect_err(&String::from_utf8_lossy(raw));
        assert_eq!(err.status(), 400, "{:?}: {err:?}", String::from_utf8_lossy(raw));
    }
    let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(parse_request_head(chunked, &limits()).unwrap_err().status(), 501);
    let big = b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n";
    assert_eq!(parse_request_head(big, &limits()).unwrap_err().status(), 413);
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..=MAX_HEADER_FIELDS {
        many.extend_from_slice(format!("X{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(parse_request_head(&many, &limits()), Err(HeadError::TooManyFields));
}

#[test]
fn keep_alive_follows_version_and_connection_header() {
    let parse = |raw: &[u8]| parse_request_head(raw, &limits()).unwrap().unwrap().0;
    assert!(!parse(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive());
    assert!(!parse(b"GET / HTTP/1.0\r\n\r\n").keep_alive());
    assert!(parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
}

#[test]
fn response_round_trips_through_encode_and_parse() {
    let resp = Response::new(200, "text/plain", "ok").with_header("X-Kha-Lab-Master", "m1");
    let wire = resp.encode(true, true);
    let text = String::from_utf8(wire.clone()).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("Content-Length: 2\r\n") && text.ends_with("\r\n\r\nok"), "{text}");
    let (parsed, head_len, body) = parse_response_head(&wire, &limits()).unwrap().unwrap();
    assert_eq!(parsed.status, 200);
    assert_eq!(parsed.header("x-kha-lab-master"), Some("m1"));
    assert_eq!(body, BodyLength::Exactly(2));
    assert_eq!(&wire[head_len..], b"ok");
    // HEAD: same headers, no body bytes.
    assert!(String::from_utf8(resp.encode(false, false)).unwrap().ends_with("Connection: close\r\n\r\n"));
}

#[test]
fn encode_drops_header_values_that_would_split_the_response() {
    let resp = Response::new(200, "text/plain", "").with_header("X-Evil", "a\r\nInjected: 1");
    let text = String::from_utf8(resp.encode(true, true)).unwrap();
    assert!(!text.contains("Injected"), "{text}");
}

#[test]
fn malformed_responses_are_errors() {
    for raw in [&b"HTTP/1.1 2000 OK\r\n\r\n"[..], b"HTTP/9 200 OK\r\n\r\n", b"garbage\r\n\r\n"] {
        assert!(parse_response_head(raw, &limits()).is_err(), "{:?}", String::from_utf8_lossy(raw));
    }
    let (r, _, body) = parse_response_head(b"HTTP/1.1 204\r\n\r\n", &limits()).unwrap().unwrap();
    assert_eq!((r.status, body), (204, BodyLength::Exactly(0)));
}

#[tokio::test]
async fn reader_handles_pipelined_requests_bodies_and_eof() {
    let wire = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n".to_vec();
    let mut src = &wire[..];
    let mut buf = Vec::new();
    let first = read_request(&mut src, &mut buf, &limits()).await.unwrap().unwrap();
    assert_eq!((first.path(), first.body.as_slice()), ("/a", &b"abc"[..]));
    let second = read_request(&mut src, &mut buf, &limits()).await.unwrap().unwrap();
    assert_eq!(second.path(), "/b");
    assert!(read_request(&mut src, &mut buf, &limits()).await.unwrap().is_none());

    let mut truncated = &b"GET / HTTP/1.1\r\nHost"[..];
    let err = read_request(&mut truncated, &mut Vec::new(), &limits()).await.unwrap_err();
    assert!(matches!(err, ReadError::UnexpectedEof), "{err:?}");
}

#[tokio::test]
async fn reader_reads_response_until_close_when_unframed() {
    let mut src = &b"HTTP/1.0 200 OK\r\n\r\nhello"[..];
    let resp = read_response(&mut src, &mut Vec::new(), &limits()).await.unwrap();
    assert_eq!(resp.body, b"hello");
}
