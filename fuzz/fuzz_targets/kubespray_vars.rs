//! kubespray's variables: a `group_vars/all.yml` file and `--var NAME=VALUE` flags, read the
//! way `kha endpoints` and `kha config` read them (from a real directory, as `Vars::load` finds
//! group_vars/ beside the inventory), then every question the commands ask of them.
//!
//! Input: the file's text; lines after a line `# --var` are flags, one per line.
#![no_main]

#[path = "common/kubespray.rs"]
mod common;

use std::{path::PathBuf, sync::OnceLock};

use kha::kubespray::{Inventory, Vars};
use libfuzzer_sys::fuzz_target;

/// Three masters, an etcd group and a node, as kubespray's sample inventory.
const INVENTORY: &str = "\
all:
  hosts:
    node1: { ansible_host: 192.0.2.11, ip: 10.0.0.11, access_ip: 10.0.0.11 }
    node2: { ansible_host: 192.0.2.12, ip: 10.0.0.12 }
    node3: { ansible_host: '2001:db8::13' }
    node4: { ansible_host: 192.0.2.14 }
  children:
    kube_control_plane: { hosts: { node1:, node2:, node3: } }
    kube_node: { hosts: { node4: } }
    etcd: { hosts: { node1:, node2:, node3: } }
    k8s_cluster: { children: { kube_control_plane:, kube_node: } }
";

/// This process's inventory directory (libFuzzer's -fork and -jobs run several processes).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kha-fuzz-vars-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("group_vars")).expect("create the inventory directory");
        std::fs::write(dir.join("hosts.yaml"), INVENTORY).expect("write the inventory");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (file, flags) = text.split_once("\n# --var\n").unwrap_or((text, ""));
    let flags: Vec<String> = flags.lines().map(str::to_owned).collect();
    let dir = dir();
    std::fs::write(dir.join("group_vars/all.yml"), file).expect("write group_vars/all.yml");
    let inventory = Inventory::from_file(&dir.join("hosts.yaml")).expect("the fixed inventory parses");
    match Vars::load(&inventory, None, &flags) {
        Ok(vars) => common::commands(&vars, &inventory),
        Err(e) => drop(e.to_string()),
    }
});
