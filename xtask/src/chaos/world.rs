//! The soak's world: three simulated masters, kha serving the node namespace from a config
//! file (so that SIGHUP can change it), the connect loop and the long-lived clients, and what
//! is read of it: `kha status -o json`, the `KHA_CONNS` map (bpftool), the node namespace's
//! sockets (ss, with their cookies), the agent's fds and RSS.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::bed::Bed;
use serde_json::Value;

use super::settings::Settings;
use crate::{lab_client::Client, masters::Masters};

pub const MASTERS: usize = 3;
/// Long-lived clients: a request every [`KEEP_INTERVAL_MS`] on one connection.
pub const LONG_LIVED: usize = 6;
pub const KEEP_INTERVAL_MS: u64 = 200;
/// Longer than any all-down hold: only kha or TCP may end a long-lived request.
pub const KEEP_TIMEOUT_MS: u64 = 30_000;
/// The connect loop: one new TCP + TLS connection per request, at most this often.
pub const LOOP_INTERVAL_MS: u64 = 50;
pub const LOOP_TIMEOUT_MS: u64 = 3000;
/// kha-common's `MAP_CONNS` (xtask does not depend on kha-common's kernel types).
const MAP_CONNS: &str = "KHA_CONNS";
const FRONTEND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 6443);

pub struct World {
    pub bed: Bed,
    pub ca: String,
    pub names: Vec<String>,
    /// `ip:6443` of each master, as kha status and ss show them.
    pub addrs: Vec<String>,
    config: PathBuf,
    args: Vec<String>,
    pub policy: String,
    pub removed: Option<usize>,
}

/// One backend as `kha status` shows it.
#[derive(Debug, Clone, Default)]
pub struct BackendView {
    pub state: String,
    pub serving: bool,
    pub chosen: u64,
    pub active: u64,
}

/// A socket of one of our clients in the node namespace.
#[derive(Debug, Clone)]
pub struct Sock {
    pub cookie: u64,
    pub peer: String,
    pub pid: u32,
}

impl World {
    pub fn create(settings: &Settings) -> Result<World> {
        let bed = Bed::create(MASTERS).context("building the lab")?;
        let names: Vec<String> = bed.lab.masters().iter().map(|m| m.name.clone()).collect();
        let addrs: Vec<String> = bed.lab.masters().iter().map(|m| m.https_v4().to_string()).collect();
        let dir = bed.lab.workdir().join("chaos");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("kha.toml");
        let ca = bed.pki.ca_cert.display().to_string();
        let mut args: Vec<String> = ["--config", &config.display().to_string(), "--ca-file", &ca]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(["--metrics-addr", "none", "--health-addr", "none"].map(String::from));
        args.extend(settings.args());
        let mut w =
            World { bed, ca, names, addrs, config, args, policy: "least-connections".into(), removed: None };
        w.write_config()?;
        w.start_agent()?;
        Ok(w)
    }

    /// The config for the current policy and backend set.
    pub fn write_config(&self) -> Result<()> {
        let list: Vec<String> = (0..MASTERS)
            .filter(|i| Some(*i) != self.removed)
            .map(|i| format!("\"{}\"", self.addrs[i]))
            .collect();
        let toml = format!(
            "[[frontend]]\naddress = \"{FRONTEND}\"\nbackends = [{}]\npolicy = \"{}\"\n",
            list.join(", "),
            self.policy
        );
        fs::write(&self.config, toml).with_context(|| format!("writing {}", self.config.display()))
    }

    pub fn start_agent(&mut self) -> Result<()> {
        self.bed.start_agent(&self.args).context("starting kha")
    }

    /// Stops the agent with `signal` (SIGKILL: the datapath stays as it was; SIGTERM: a clean
    /// exit, the pins stay).
    pub fn stop_agent(&mut self, signal: i32) -> Result<()> {
        self.bed.stop_agent(signal).context("stopping kha")?;
        Ok(())
    }

    pub fn sighup(&self) -> Result<()> {
        let pid = self.bed.agent_pid().context("no agent to send SIGHUP to")?;
        // SAFETY: our own child's pid.
        if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
            bail!("SIGHUP to {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn masters(&mut self) -> Masters<'_> {
        Masters { bed: &mut self.bed, real: None }
    }

    pub fn client(&self, keep_alive: bool, count: u64) -> Result<Client> {
        let (interval, timeout, reuse) = if keep_alive {
            (KEEP_INTERVAL_MS, KEEP_TIMEOUT_MS, "--keep-alive")
        } else {
            (LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, "--new-connection-each")
        };
        let args: Vec<String> = [
            "client",
            "--url",
            "https://localhost:6443/version",
            "--ca",
            &self.ca,
            "--json",
            "--connect-addr",
            &FRONTEND.to_string(),
            "--count",
            &count.clamp(1, 10_000_000).to_string(),
            "--interval-ms",
            &interval.to_string(),
            "--timeout-ms",
            &timeout.to_string(),
            reuse,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        Client::spawn(&self.bed, true, &args)
    }

    pub fn status(&self) -> Option<Value> {
        status(&self.bed.kha_bin, &self.bed.pin_dir)
    }
}

/// `kha status -o json` against `pins`, or `None` while nothing is pinned.
pub fn status(kha: &Path, pins: &Path) -> Option<Value> {
    let out = Command::new(kha)
        .args(["status", "-o", "json", "--pin-dir"])
        .arg(pins)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

/// Per backend address, what `status` says; and whether the frontend is in fallback.
pub fn backends(status: &Value) -> (BTreeMap<String, BackendView>, bool) {
    let mut m = BTreeMap::new();
    let mut fallback = false;
    for f in status["frontends"].as_array().into_iter().flatten() {
        fallback |= f["fallback"].as_bool().unwrap_or(false);
        for b in f["backends"].as_array().into_iter().flatten() {
            let k = &b["kernel"];
            m.insert(
                b["address"].as_str().unwrap_or("?").to_owned(),
                BackendView {
                    state: b["state"].as_str().unwrap_or("?").to_owned(),
                    serving: b["serving"].as_bool().unwrap_or(false),
                    chosen: k["chosen"].as_u64().unwrap_or(0),
                    active: k["active"].as_u64().unwrap_or(0),
                },
            );
        }
    }
    (m, fallback)
}

/// `KHA_CONNS`: socket cookie -> backend `ip:port` (bpftool, which prints the map's BTF).
pub fn conn_map(pins: &Path) -> Result<BTreeMap<u64, String>> {
    let path = pins.join("maps").join(MAP_CONNS);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    if !out.status.success() {
        bail!("bpftool map dump {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut m = BTreeMap::new();
    for e in v.as_array().into_iter().flatten() {
        let f = &e["formatted"];
        let Some(cookie) = f["key"].as_u64() else {
            bail!("KHA_CONNS entry without a BTF-formatted key (bpftool too old?): {e}");
        };
        let val = &f["value"];
        m.insert(cookie, backend_of(val).unwrap_or_else(|| "?".into()));
    }
    Ok(m)
}

/// The backend `ip:port` of a formatted `Conn` value: 16 address bytes, IPv4 v4-mapped
/// (kha-common `addr.rs`); the port network order in a native u16.
fn backend_of(v: &Value) -> Option<String> {
    let bytes: Vec<u8> =
        v["backend_addr_be"].as_array()?.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect();
    let bytes: [u8; 16] = bytes.try_into().ok()?;
    let ip6 = std::net::Ipv6Addr::from(bytes);
    let port = u16::from_be(v["backend_port_be"].as_u64()? as u16);
    Some(match ip6.to_ipv4_mapped() {
        Some(ip4) => SocketAddr::from((ip4, port)).to_string(),
        None => SocketAddr::from((ip6, port)).to_string(),
    })
}

/// The TCP sockets of `pids` in namespace `netns` that are not in TIME-WAIT (those have no
/// process), from `ss -tanepH`: `sk:` is the socket cookie.
pub fn sockets(netns: &str, pids: &BTreeSet<u32>) -> Result<Vec<Sock>> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-tanepH"])
        .stdin(Stdio::null())
        .output()
        .context("running ss")?;
    if !out.status.success() {
        bail!("ss in {netns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 || cols[0] == "LISTEN" {
            continue;
        }
        let peer = cols[4].to_owned();
        let pid = line
            .split("pid=")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok());
        let cookie = line
            .split_whitespace()
            .find_map(|c| c.strip_prefix("sk:"))
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        if let (Some(pid), Some(cookie)) = (pid, cookie)
            && pids.contains(&pid)
        {
            v.push(Sock { cookie, peer, pid });
        }
    }
    Ok(v)
}

/// Open fds and RSS (KiB) of `pid`.
pub fn fds_rss(pid: u32) -> Option<(usize, u64)> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some((fds, rss))
}

/// `pid`'s fds by what they are: `socket`, `bpf-map`, `bpf-prog`, `eventpoll`, `file`, ...
pub fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let Ok(t) = fs::read_link(e.path()) else { continue };
        let t = t.to_string_lossy();
        let kind = if let Some(a) = t.strip_prefix("anon_inode:") {
            a.trim_matches(|c| c == '[' || c == ']').to_owned()
        } else if let Some((k, _)) = t.split_once(":[") {
            k.to_owned()
        } else {
            "file".to_owned()
        };
        *m.entry(kind).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_formatted_conn_names_its_backend() {
        let v: Value = serde_json::from_str(
            r#"{"frontend_addr_be":[0,0,0,0,0,0,0,0,0,0,255,255,127,0,0,1],"backend_addr_be":[0,0,0,0,0,0,0,0,0,0,255,255,192,0,2,11],"frontend_port_be":47873,"backend_port_be":11033,"backend_id":1,"established":2}"#,
        )
        .unwrap();
        assert_eq!(backend_of(&v).as_deref(), Some("192.0.2.11:6443"));
    }
}
