//! `kha trace`: asks the running agent for a datapath trace (`GET /trace` on its metrics
//! address) and prints each decision as the agent streams it, as text or (`-o json`) the
//! agent's JSON lines unchanged.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use kha::trace::{Record, Request};

pub struct Args {
    pub agent: SocketAddr,
    pub request: Request,
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let agent = args.agent;
    let mut conn = TcpStream::connect_timeout(&agent, Duration::from_secs(3)).with_context(|| {
        format!(
            "no kha agent answers on {agent}: is `kha run` running with --metrics-addr {agent}? Otherwise pass its address with --agent"
        )
    })?;
    // The agent sends a line at least when the trace ends; allow for its own slack.
    conn.set_read_timeout(Some(args.request.duration + Duration::from_secs(15)))?;
    write!(
        conn,
        "GET /trace?{} HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n",
        args.request.query()
    )?;
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    reader.read_line(&mut status).with_context(|| format!("reading the answer of {agent}"))?;
    let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    if code != 200 {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        if code == 404 {
            bail!("the agent on {agent} has no /trace: it is an older kha; upgrade it");
        }
        bail!("the agent on {agent} refused the trace ({}): {}", status.trim(), body.trim());
    }
    let mut ended = false;
    let stdout = std::io::stdout();
    for line in reader.lines() {
        let line = line.with_context(|| format!("reading the trace from {agent}"))?;
        let record: Record = serde_json::from_str(&line).with_context(|| format!("a trace line: {line}"))?;
        ended |= matches!(record, Record::End { .. });
        let mut out = stdout.lock();
        if args.json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", record.text())?;
        }
        out.flush()?;
    }
    if !ended {
        bail!("the trace from {agent} stopped without its last line (the agent went away?)");
    }
    Ok(())
}
