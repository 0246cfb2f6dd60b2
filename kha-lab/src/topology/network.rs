//! The lab's network: the namespaces, bridge, veths and addresses [`Lab::create`] builds,
//! the reachability wait, a master's link down and up, and processes in the node namespace.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::addresses::{NODE_V4, NODE_V6};
use super::{Lab, LabError, POLL};
use crate::netns::{self, NetnsError};

const BRIDGE: &str = "br0";
/// Port probed for reachability: nothing listens there, so a RST
/// (ECONNREFUSED) proves the path works both ways.
const PROBE_PORT: u16 = 9;

impl Lab {
    fn add_netns(&mut self, name: &str) -> Result<(), LabError> {
        netns::add(name)?;
        self.created.push(name.to_owned());
        netns::ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub(super) fn build(&mut self) -> Result<(), LabError> {
        let node = self.node_netns.clone();
        self.add_netns(&node)?;
        let n = |args: &[&str]| -> Result<(), NetnsError> {
            let mut full = vec!["-n", node.as_str()];
            full.extend_from_slice(args);
            netns::ip(&full).map(drop)
        };
        // STP stays off (the default), so bridge ports forward as soon as they are up.
        n(&["link", "add", BRIDGE, "type", "bridge"])?;
        n(&["link", "set", BRIDGE, "up"])?;
        n(&["addr", "add", &format!("{NODE_V4}/24"), "dev", BRIDGE])?;
        n(&["addr", "add", &format!("{NODE_V6}/64"), "dev", BRIDGE, "nodad"])?;
        for i in 0..self.masters.len() {
            let (ns, ifname, v4, v6) = {
                let m = &self.masters[i];
                (m.netns.clone(), m.node_ifname.clone(), m.ipv4, m.ipv6)
            };
            self.add_netns(&ns)?;
            n(&["link", "add", &ifname, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            n(&["link", "set", &ifname, "master", BRIDGE, "up"])?;
            let m = |args: &[&str]| -> Result<(), NetnsError> {
                let mut full = vec!["-n", ns.as_str()];
                full.extend_from_slice(args);
                netns::ip(&full).map(drop)
            };
            m(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            m(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            m(&["link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Waits until the node reaches each named master over IPv4 and IPv6: a
    /// connect to a closed port is refused (not unreachable, not timed out).
    pub fn wait_reachable(&self, names: &[String]) -> Result<(), LabError> {
        let mut targets = Vec::new();
        for name in names {
            let m = self.master(name)?;
            targets.push(SocketAddr::new(m.ipv4.into(), PROBE_PORT));
            targets.push(SocketAddr::new(m.ipv6.into(), PROBE_PORT));
        }
        let timeout = self.spec.timeout;
        let pending = netns::run_in(&self.node_netns, move || {
            let deadline = Instant::now() + timeout;
            let mut pending = targets;
            while !pending.is_empty() && Instant::now() < deadline {
                pending.retain(|addr| {
                    match std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)) {
                        Ok(_) => false,
                        Err(e) => e.kind() != io::ErrorKind::ConnectionRefused,
                    }
                });
                if !pending.is_empty() {
                    std::thread::sleep(POLL);
                }
            }
            pending
        })?;
        if pending.is_empty() {
            Ok(())
        } else {
            let list: Vec<String> = pending.iter().map(|a| a.ip().to_string()).collect();
            Err(LabError::Timeout { what: format!("the node to reach {}", list.join(", ")), timeout })
        }
    }

    /// Takes the node-side link to a master down: packets to it are lost.
    pub fn link_down(&self, name: &str) -> Result<(), LabError> {
        let m = self.master(name)?;
        netns::ip(&["-n", &self.node_netns, "link", "set", &m.node_ifname, "down"])?;
        Ok(())
    }

    /// Brings the link back and waits until the master is reachable again.
    pub fn link_up(&self, name: &str) -> Result<(), LabError> {
        let m = self.master(name)?;
        netns::ip(&["-n", &self.node_netns, "link", "set", &m.node_ifname, "up"])?;
        self.wait_reachable(&[name.to_owned()])
    }

    /// Spawns `cmd` in the node namespace (and cgroup), see [`netns::spawn_in`].
    /// The caller owns the child; wrap it in [`netns::KillOnDrop`] to have it
    /// killed with the test.
    pub fn spawn_in_node(&self, cgroup: Option<&Path>, cmd: Command) -> Result<Child, LabError> {
        Ok(netns::spawn_in(&self.node_netns, cgroup, cmd)?)
    }
}
