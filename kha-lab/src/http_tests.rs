use super::*;

fn limits() -> Limits {
    Limits::default()
}

#[test]
fn parses_a_response_and_reports_lengths() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Kha-Lab-Master:  m1 \r\ncontent-length: 2\r\n\r\nokNEXT";
    let (resp, head_len, body) = parse_response_head(raw, &limits()).unwrap().expect("complete");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-kha-lab-master"), Some("m1"));
    assert_eq!(resp.header("CONTENT-TYPE"), Some("text/plain"));
    assert_eq!(body, BodyLength::Exactly(2));
    assert_eq!(&raw[head_len..], b"okNEXT");
}

#[test]
fn incomplete_head_asks_for_more() {
    assert_eq!(parse_response_head(b"HTTP/1.1 200 OK\r\nHost: x\r\n", &limits()), Ok(None));
    assert_eq!(parse_response_head(b"", &limits()), Ok(None));
}

#[test]
fn oversized_head_is_rejected_without_a_terminator() {
    let small = Limits { max_head: 64, max_body: 0 };
    let mut raw = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    raw.resize(64, b'a');
    assert_eq!(parse_response_head(&raw, &small), Err(HeadError::TooLarge { limit: 64 }));
    // A terminator that ends past the limit does not count either.
    let mut raw = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    raw.resize(62, b'a');
    raw.extend_from_slice(b"\r\n\r\n");
    assert_eq!(parse_response_head(&raw, &small), Err(HeadError::TooLarge { limit: 64 }));
}

#[test]
fn malformed_responses_are_errors_not_panics() {
    let cases: &[&[u8]] = &[
        b"\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/9 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 \xffOK\r\nX: \xff\r\n\r\n",
    ];
    for raw in cases {
        let err = parse_response_head(raw, &limits()).expect_err(&String::from_utf8_lossy(raw));
        assert!(matches!(err, HeadError::Malformed { .. }), "{:?}: {err:?}", String::from_utf8_lossy(raw));
    }
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let refused = parse_response_head(chunked, &limits()).unwrap_err();
    assert_eq!(refused, HeadError::Unsupported { what: "transfer-encoding" });
    let big = b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n";
    let refused = parse_response_head(big, &limits()).unwrap_err();
    assert_eq!(refused, HeadError::BodyTooLarge { length: 99_999_999, limit: DEFAULT_MAX_BODY });
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADER_FIELDS {
        many.extend_from_slice(format!("X{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(parse_response_head(&many, &limits()), Err(HeadError::TooManyFields));
    let (r, _, body) = parse_response_head(b"HTTP/1.1 204\r\n\r\n", &limits()).unwrap().unwrap();
    assert_eq!((r.status, body), (204, BodyLength::Exactly(0)));
}

#[tokio::test]
async fn reader_handles_kept_alive_responses_and_eof() {
    let wire =
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
    let mut src = &wire[..];
    let mut buf = Vec::new();
    let first = read_response(&mut src, &mut buf, &limits()).await.unwrap();
    assert_eq!((first.status, first.body.as_slice()), (200, &b"abc"[..]));
    let second = read_response(&mut src, &mut buf, &limits()).await.unwrap();
    assert_eq!((second.status, second.body.len()), (404, 0));
    let err = read_response(&mut src, &mut buf, &limits()).await.unwrap_err();
    assert!(matches!(err, ReadError::UnexpectedEof), "{err:?}");

    let mut truncated = &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"[..];
    let err = read_response(&mut truncated, &mut Vec::new(), &limits()).await.unwrap_err();
    assert!(matches!(err, ReadError::UnexpectedEof), "{err:?}");
}

#[tokio::test]
async fn reader_reads_response_until_close_when_unframed() {
    let mut src = &b"HTTP/1.0 200 OK\r\n\r\nhello"[..];
    let resp = read_response(&mut src, &mut Vec::new(), &limits()).await.unwrap();
    assert_eq!(resp.body, b"hello");
}
