//! The TLS modes on tokio: `https` (a new connection per request, resumed or not),
//! `keepalive` (one connection per worker) and `bulk` (one large body).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::report::Tally;
use super::worker::{Budget, Rng};
use super::{LoadError, LoadOptions, Mode};
use crate::errno::io_error_key;
use crate::http::{self, BodyLength, Limits, ReadError};
use crate::master::MASTER_HEADER;

pub(super) fn run_tls(opts: &LoadOptions) -> Result<(Tally, Option<Duration>), LoadError> {
    let Some(base) = &opts.tls else { return Err(LoadError::NoTls(opts.mode.name())) };
    let mut config = (**base).clone();
    if opts.mode == Mode::Https && !opts.resume {
        // As separate kubectl processes: nothing to resume, every handshake full.
        config.resumption = Resumption::disabled();
    }
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(opts.server_name.clone())
        .map_err(|_| LoadError::ServerName(opts.server_name.clone()))?;
    let workers = if opts.mode == Mode::Bulk { 1 } else { opts.concurrency };
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    }
    .map_err(LoadError::Runtime)?;
    let budget = Arc::new(Budget {
        issued: AtomicU64::new(0),
        count: opts.count,
        deadline: Instant::now() + opts.duration,
    });
    let result = runtime.block_on(async {
        if opts.mode == Mode::Bulk {
            let (t, took) = bulk(opts, &connector, name).await;
            return (t, took);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (opts, budget, connector, name) =
                (opts.clone(), budget.clone(), connector.clone(), name.clone());
            tasks.spawn(async move {
                let rng = Rng::new(opts.seed.wrapping_add(w as u64));
                match opts.mode {
                    Mode::Keepalive => keepalive_worker(&opts, &budget, &connector, name, rng).await,
                    _ => https_worker(&opts, &budget, &connector, name, rng).await,
                }
            });
        }
        let mut all = Tally::default();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(t) => all.merge(t),
                Err(_) => all.fail("worker:panic".into()),
            }
        }
        (all, None)
    });
    Ok(result)
}

/// tokio-rustls reports TLS failures as io::Error wrapping a rustls::Error.
fn io_key(phase: &str, err: &io::Error) -> String {
    let reason = match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(tls) => crate::tls::error_key(tls).to_owned(),
        None => io_error_key(err),
    };
    format!("{phase}:{reason}")
}

fn read_key(err: ReadError) -> String {
    match err {
        ReadError::Io(e) => io_key("response", &e),
        ReadError::UnexpectedEof => "response:EOF".into(),
        ReadError::Head(_) => "response:malformed".into(),
    }
}

async fn dial(
    target: SocketAddr,
    connector: &TlsConnector,
    name: ServerName<'static>,
) -> Result<(TlsStream<TcpStream>, bool), String> {
    let tcp = TcpStream::connect(target).await.map_err(|e| io_key("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let tls = connector.connect(name, tcp).await.map_err(|e| io_key("tls", &e))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((tls, resumed))
}

fn request(path: &str, server_name: &str, close: bool) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {server_name}\r\nUser-Agent: kha-lab-load\r\nAccept: */*\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Sends a request and reads the answer; the master that answered, on a 2xx.
async fn exchange(
    stream: &mut TlsStream<TcpStream>,
    buf: &mut Vec<u8>,
    req: &str,
) -> Result<Option<String>, String> {
    stream.write_all(req.as_bytes()).await.map_err(|e| io_key("request", &e))?;
    stream.flush().await.map_err(|e| io_key("request", &e))?;
    let resp = http::read_response(stream, buf, &Limits::default()).await.map_err(read_key)?;
    if !(200..300).contains(&resp.status) {
        return Err(format!("status:{}", resp.status));
    }
    Ok(resp.header(MASTER_HEADER).map(str::to_owned))
}

async fn https_worker(
    opts: &LoadOptions,
    budget: &Budget,
    connector: &TlsConnector,
    name: ServerName<'static>,
    mut rng: Rng,
) -> Tally {
    let req = request(&opts.path, &opts.server_name, true);
    let mut t = Tally::default();
    while budget.take() {
        let target = opts.targets[rng.below(opts.targets.len())];
        let t0 = Instant::now();
        let one = async {
            let (mut stream, resumed) = dial(target, connector, name.clone()).await?;
            let master = exchange(&mut stream, &mut Vec::new(), &req).await;
            // Best-effort close_notify; the answer is complete.
            let _ = stream.shutdown().await;
            master.map(|m| (m, resumed))
        };
        match timeout(opts.timeout, one).await {
            Ok(Ok((master, resumed))) => {
                t.ok += 1;
                t.handshakes += 1;
                t.resumed += u64::from(resumed);
                t.samples.push(t0.elapsed().as_nanos() as u64);
                t.answered_by(master);
            }
            Ok(Err(key)) => t.fail(key),
            Err(_) => t.fail("request:ETIMEDOUT".into()),
        }
    }
    t
}

async fn keepalive_worker(
    opts: &LoadOptions,
    budget: &Budget,
    connector: &TlsConnector,
    name: ServerName<'static>,
    mut rng: Rng,
) -> Tally {
    let req = request(&opts.path, &opts.server_name, false);
    let mut t = Tally::default();
    let mut conn: Option<(TlsStream<TcpStream>, Vec<u8>)> = None;
    while budget.take() {
        if conn.is_none() {
            // The connection is made outside the timed part: only requests are measured.
            let target = opts.targets[rng.below(opts.targets.len())];
            match timeout(opts.timeout, dial(target, connector, name.clone())).await {
                Ok(Ok((stream, resumed))) => {
                    t.handshakes += 1;
                    t.resumed += u64::from(resumed);
                    conn = Some((stream, Vec::new()));
                }
                Ok(Err(key)) => {
                    t.fail(key);
                    continue;
                }
                Err(_) => {
                    t.fail("connect:ETIMEDOUT".into());
                    continue;
                }
            }
        }
        let Some((stream, buf)) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        match timeout(opts.timeout, exchange(stream, buf, &req)).await {
            Ok(Ok(master)) => {
                t.ok += 1;
                t.samples.push(t0.elapsed().as_nanos() as u64);
                t.answered_by(master);
            }
            Ok(Err(key)) => {
                t.fail(key);
                conn = None;
            }
            Err(_) => {
                t.fail("request:ETIMEDOUT".into());
                conn = None;
            }
        }
    }
    if let Some((mut stream, _)) = conn {
        let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
    t
}

/// One `GET /bulk?bytes=N` on one connection; the time from request to last byte.
async fn bulk(
    opts: &LoadOptions,
    connector: &TlsConnector,
    name: ServerName<'static>,
) -> (Tally, Option<Duration>) {
    let mut t = Tally::default();
    let target = opts.targets[Rng::new(opts.seed).below(opts.targets.len())];
    let req = request(&format!("/bulk?bytes={}", opts.bytes), &opts.server_name, true);
    let one = async {
        let (mut stream, resumed) = dial(target, connector, name).await?;
        let t0 = Instant::now();
        stream.write_all(req.as_bytes()).await.map_err(|e| io_key("request", &e))?;
        stream.flush().await.map_err(|e| io_key("request", &e))?;
        let limits = Limits { max_head: http::DEFAULT_MAX_HEAD, max_body: usize::MAX };
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 256 * 1024];
        let (resp, head_len, body) = loop {
            if let Some(parsed) =
                http::parse_response_head(&buf, &limits).map_err(|_| "response:malformed".to_owned())?
            {
                break parsed;
            }
            let n = stream.read(&mut chunk).await.map_err(|e| io_key("response", &e))?;
            if n == 0 {
                return Err("response:EOF".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if resp.status != 200 {
            return Err(format!("status:{}", resp.status));
        }
        let BodyLength::Exactly(want) = body else { return Err("response:malformed".to_owned()) };
        let mut got = (buf.len() - head_len) as u64;
        while got < want as u64 {
            let n = stream.read(&mut chunk).await.map_err(|e| io_key("response", &e))?;
            if n == 0 {
                return Err("response:EOF".to_owned());
            }
            got += n as u64;
        }
        let took = t0.elapsed();
        let _ = stream.shutdown().await;
        Ok((got, took, resumed, resp.header(MASTER_HEADER).map(str::to_owned)))
    };
    match timeout(opts.timeout, one).await {
        Ok(Ok((got, took, resumed, master))) => {
            t.ok = 1;
            t.handshakes = 1;
            t.resumed = u64::from(resumed);
            t.bytes = got;
            t.samples.push(took.as_nanos() as u64);
            t.answered_by(master);
            (t, Some(took))
        }
        Ok(Err(key)) => {
            t.fail(key);
            (t, None)
        }
        Err(_) => {
            t.fail("response:ETIMEDOUT".into());
            (t, None)
        }
    }
}
