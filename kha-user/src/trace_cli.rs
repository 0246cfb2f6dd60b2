//! `kha trace`: asks the running agent for a datapath trace (`GET /trace` on its metrics
//! address) and prints each decision as the agent streams it, as text or (`-o json`) the
//! agent's JSON lines unchanged.

use std::{io::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::{StatusCode, body::Bytes, header::HOST};
use hyper_util::rt::TokioIo;
use kha::trace::{Record, Request};

pub struct Args {
    pub agent: SocketAddr,
    pub request: Request,
    pub json: bool,
}

/// A refusal's text is a line or two, a trace line a few hundred bytes; more is not the agent.
const MAX_REFUSAL: usize = 4096;
const MAX_LINE: usize = 64 * 1024;

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(trace(args))
}

async fn trace(args: Args) -> Result<()> {
    let agent = args.agent;
    let connect = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(agent));
    let conn = connect.await.map_err(anyhow::Error::from).and_then(|c| Ok(c?)).with_context(|| {
        format!(
            "no kha agent answers on {agent}: is `kha run` running with --metrics-addr {agent}? Otherwise pass its address with --agent"
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    tokio::spawn(connection);
    let uri = format!("/trace?{}", args.request.query());
    let req = hyper::Request::get(uri).header(HOST, agent.to_string()).body(Empty::<Bytes>::new())?;
    // The agent sends a line at least when the trace ends; allow for its own slack.
    let patience = args.request.duration + Duration::from_secs(15);
    let answer = tokio::time::timeout(patience, async {
        let response =
            sender.send_request(req).await.with_context(|| format!("reading the answer of {agent}"))?;
        let (head, mut body) = response.into_parts();
        if head.status != StatusCode::OK {
            let text = http_body_util::Limited::new(body, MAX_REFUSAL).collect().await;
            let text =
                text.map(|t| String::from_utf8_lossy(&t.to_bytes()).trim().to_owned()).unwrap_or_default();
            if head.status == StatusCode::NOT_FOUND {
                bail!("the agent on {agent} has no /trace: it is an older kha; upgrade it");
            }
            bail!("the agent on {agent} refused the trace ({}): {text}", head.status);
        }
        let (mut pending, mut ended) = (Vec::new(), false);
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("reading the trace from {agent}"))?;
            let Ok(data) = frame.into_data() else { continue };
            pending.extend_from_slice(&data);
            if pending.len() > MAX_LINE {
                bail!("the agent on {agent} sent a trace line over {MAX_LINE} bytes: not a kha agent?");
            }
            while let Some(at) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                ended |= print(&line[..at], args.json)?;
            }
        }
        if !ended {
            bail!("the trace from {agent} stopped without its last line (the agent went away?)");
        }
        Ok(())
    });
    answer.await.with_context(|| format!("the trace from {agent} did not end within {patience:?}"))?
}

/// Prints one line of the agent's; whether it was the last.
fn print(line: &[u8], json: bool) -> Result<bool> {
    let line = std::str::from_utf8(line).context("a trace line that is not UTF-8")?;
    let record: Record = serde_json::from_str(line).with_context(|| format!("a trace line: {line}"))?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "{}", record.text())?;
    }
    out.flush()?;
    Ok(matches!(record, Record::End { .. }))
}
