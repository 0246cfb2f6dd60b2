//! What one probe exchange costs the agent: the hand-written HTTP/1.1 client
//! (`kha::probe::http`, as `probe/conn.rs` drives it) against hyper's `client::conn::http1`
//! (bounded like ours), on one persistent TLS connection each, against the same in-process
//! rustls server on 127.0.0.1 (`cargo xtask bench probe-client`; docs/benchmarks.md).
//!
//! The client runs alone on its own thread in a current-thread runtime (hyper's connection
//! task included), the server on another thread, so the client thread's own counters are the
//! client's cost: CPU time (`getrusage(RUSAGE_THREAD)`, user and system) and heap (a counting
//! allocator that counts per thread). Then a few scripted failures show what each client can
//! tell apart.
//!
//! Arguments: `[exchanges per run] [rounds]` (default 20000 and 5), or
//! `one <hand|hyper> <options|ready|failing> <exchanges>`: one run and nothing else, for
//! callgrind, with the server in a child process that callgrind does not follow, so that every
//! instruction it counts is the client's, whatever else loads the machine. `cargo xtask bench
//! probe-client` runs two lengths and takes the difference, which leaves out start-up,
//! handshake and warm-up.

mod alloc;
mod behaviour;
mod clients;
mod counters;
mod server;

use std::time::{Duration, Instant};

use clients::{Client, Kind};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Exchanges before the measured ones, so buffers have grown to their steady size.
const WARMUP: u64 = 500;
/// Bound on one run (connect, warm-up and the measured exchanges).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// One client on one connection doing `exchanges` of one kind.
#[derive(Clone, Copy, Debug)]
struct Run {
    user_us: f64,
    sys_us: f64,
    allocs: f64,
    alloc_bytes: f64,
    /// Live heap of the client thread, steady state, above what it held before connecting.
    conn_bytes: i64,
    /// ... of which the TLS connection alone (right after the handshake).
    tls_bytes: i64,
    /// Highest live heap during the measured exchanges, above the steady state.
    peak_bytes: i64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "serve") {
        return server::Server::serve_stdio();
    }
    if let [one_run, c, kind, n] = &args[..]
        && one_run == "one"
    {
        let c = Client::ALL.into_iter().find(|x| x.arg() == c).expect("client: hand or hyper");
        let kind = Kind::ALL.into_iter().find(|x| x.arg() == kind).expect("kind: options, ready or failing");
        return one(c, kind, n.parse().expect("exchanges: a number"));
    }
    let number = |i: usize, default| args.get(i).map_or(default, |a: &String| a.parse().expect("a number"));
    let exchanges: u64 = number(0, 20_000);
    let rounds = number(1, 5) as usize;
    assert!((1..=1_000_000).contains(&exchanges) && (1..=50).contains(&rounds));

    let server = server::Server::start();
    let tls = server.client_config();
    let addr = server.addr;
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut results: Vec<(Kind, Client, Vec<Run>)> = Vec::new();
            for kind in Kind::ALL {
                for c in Client::ALL {
                    results.push((kind, c, Vec::new()));
                }
            }
            let started = Instant::now();
            for round in 0..rounds {
                for kind in Kind::ALL {
                    // Alternate which client goes first, so neither always runs on a warmer machine.
                    let order = if round % 2 == 0 { Client::ALL } else { [Client::ALL[1], Client::ALL[0]] };
                    for c in order {
                        let run = tokio::time::timeout(RUN_TIMEOUT, measure(c, kind, addr, &tls, exchanges))
                            .await
                            .unwrap_or_else(|_| panic!("{c:?} {kind:?}: over {RUN_TIMEOUT:?}"));
                        results.iter_mut().find(|r| r.0 == kind && r.1 == c).unwrap().2.push(run);
                    }
                }
                eprintln!("round {}/{rounds} done after {:.1} s", round + 1, started.elapsed().as_secs_f64());
            }
            let behaviour = behaviour::run(addr, &tls).await;
            (results, behaviour)
        })
    });
    let (results, behaviour) = client.join().expect("client thread");
    print_report(exchanges, rounds, &results, &behaviour);
    server.stop();
}

/// One run, the server in a child process: under callgrind (which does not follow children)
/// every instruction counted is the client's.
fn one(c: Client, kind: Kind, n: u64) {
    let (addr, tls, mut child) = server::Server::child();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { tokio::time::timeout(RUN_TIMEOUT, measure(c, kind, addr, &tls, n)).await })
        .expect("run bound");
    drop(child.stdin.take());
    child.wait().unwrap();
}

async fn measure(c: Client, kind: Kind, addr: std::net::SocketAddr, tls: &clients::Tls, n: u64) -> Run {
    let before_connect = alloc::thread_stats();
    let stream = clients::connect(addr, tls).await;
    let tls_bytes = alloc::thread_stats().live - before_connect.live;
    let mut client = clients::Probe::new(c, stream, addr).await;
    for _ in 0..WARMUP {
        client.exchange(kind).await;
    }
    let steady = alloc::thread_stats();
    alloc::reset_peak();
    let cpu = counters::thread_cpu();
    for _ in 0..n {
        client.exchange(kind).await;
    }
    let cpu = counters::thread_cpu().since(&cpu);
    let after = alloc::thread_stats();
    client.close().await;
    let per = |x: f64| x / n as f64;
    Run {
        user_us: per(cpu.user.as_secs_f64() * 1e6),
        sys_us: per(cpu.sys.as_secs_f64() * 1e6),
        allocs: per((after.allocs - steady.allocs) as f64),
        alloc_bytes: per((after.bytes - steady.bytes) as f64),
        conn_bytes: steady.live - before_connect.live,
        tls_bytes,
        peak_bytes: after.peak - steady.live,
    }
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn print_report(
    n: u64,
    rounds: usize,
    results: &[(Kind, Client, Vec<Run>)],
    behaviour: &[behaviour::Outcome],
) {
    println!("## Probe client: hand-written vs hyper\n");
    println!(
        "{n} exchanges per run after {WARMUP} of warm-up, one TLS 1.3 connection per run, {rounds} rounds; \
         median (min–max) per exchange, client thread only.\n"
    );
    println!(
        "| request | client | CPU user µs | CPU sys µs | allocations | bytes allocated | connection heap (TLS alone) | peak above steady |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let fmt =
        |(m, lo, hi): (f64, f64, f64), digits: usize| format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})");
    for (kind, c, runs) in results {
        let col = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let conn = col(|r| r.conn_bytes as f64).0;
        let tls = col(|r| r.tls_bytes as f64).0;
        let peak = col(|r| r.peak_bytes as f64);
        println!(
            "| {} | {} | {} | {} | {} | {} | {conn:.0} B ({tls:.0} B) | {:.0} B (max {:.0}) |",
            kind.label(),
            c.label(),
            fmt(col(|r| r.user_us), 2),
            fmt(col(|r| r.sys_us), 2),
            fmt(col(|r| r.allocs), 1),
            fmt(col(|r| r.alloc_bytes), 0),
            peak.0,
            peak.2,
        );
    }
    println!("\n### What each client can tell\n");
    println!("| scripted server | hand-written | hyper |");
    println!("|---|---|---|");
    for o in behaviour {
        println!("| {} | {} | {} |", o.case, o.hand, o.hyper);
    }
}
