//! The probe's HTTP/1.1 response parser: what a master (or whatever answers on its address)
//! sends back to `GET /readyz`. Bytes come in reads of any size; the parser must never panic,
//! never hold more than its limit plus one read, and reach the same verdict however the bytes
//! are split (the same response, or the same kind of failure: a failure's snippet of the bytes
//! shows what had arrived, which depends on the split).
//!
//! Input: byte 0 picks the limit and whether the server closes after the bytes, byte 1 the
//! read size; the rest is the server's bytes.
#![no_main]

use std::mem::{Discriminant, discriminant};

use kha::probe::{
    Malformed, ProbeFailure,
    http::{Response, ResponseParser, reason_line},
};
use libfuzzer_sys::fuzz_target;

const LIMITS: [usize; 4] = [64, 512, 4096, 64 * 1024];

fuzz_target!(|data: &[u8]| {
    let [mode, step, bytes @ ..] = data else { return };
    let limit = LIMITS[usize::from(mode & 3)];
    let eof = mode & 4 != 0;
    let whole = parse(bytes, bytes.len(), limit, eof);
    let pieces = parse(bytes, usize::from(*step) % 17 + 1, limit, eof);
    let (a, b) = (whole.as_ref().map(verdict), pieces.as_ref().map(verdict));
    // Over the limit, what is found wrong first depends on how much had arrived: a head
    // already complete in one read is checked, in small reads the size runs out first.
    let too_big = discriminant(&ProbeFailure::Oversized { limit: 0 });
    let oversized = |v: &Option<Verdict>| matches!(v, Some(Verdict::Failed(d, _)) if *d == too_big);
    let failed = |v: &Option<Verdict>| matches!(v, Some(Verdict::Failed(..)));
    let either_size = bytes.len() > limit && failed(&a) && failed(&b) && (oversized(&a) || oversized(&b));
    assert!(
        a == b || either_size,
        "verdict depends on how the bytes were split (read size {}): {whole:?} vs {pieces:?}",
        step % 17 + 1
    );
    if let Some(Ok(response)) = &whole {
        assert!(response.body.len() <= limit, "body of {} bytes over the limit {limit}", response.body.len());
        assert!((100..=999).contains(&response.status));
        drop(reason_line(&response.body));
    }
});

/// A response, or the kind of failure.
#[derive(Debug, PartialEq)]
enum Verdict<'a> {
    Response(&'a Response),
    Failed(Discriminant<ProbeFailure>, Option<Discriminant<Malformed>>),
}

fn verdict(r: &Result<Response, ProbeFailure>) -> Verdict<'_> {
    match r {
        Ok(response) => Verdict::Response(response),
        Err(e @ ProbeFailure::Malformed(m)) => Verdict::Failed(discriminant(e), Some(discriminant(m))),
        Err(e) => Verdict::Failed(discriminant(e), None),
    }
}

/// What the parser made of `bytes`; `None` while the response is incomplete and the connection still open.
fn parse(bytes: &[u8], step: usize, limit: usize, eof: bool) -> Option<Result<Response, ProbeFailure>> {
    let mut p = ResponseParser::new(limit);
    for piece in bytes.chunks(step.max(1)) {
        match p.feed(piece) {
            Ok(false) => {}
            Ok(true) => {
                // What follows differs with the split (it is cut at the read); never a panic.
                drop(p.leftover());
                return Some(Ok(p.response()));
            }
            Err(e) => return Some(Err(e)),
        }
    }
    if !eof {
        return None;
    }
    Some(p.eof().map(|()| p.response()))
}
