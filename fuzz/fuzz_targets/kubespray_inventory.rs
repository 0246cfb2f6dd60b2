//! A kubespray inventory (`kha endpoints` / `kha config --from-kubespray FILE`): YAML text ->
//! groups, hosts and the `vars:` of `all` and `k8s_cluster`, then every question the commands
//! ask of it. Errors are fine; a panic, a hang or a runaway allocation is not.
#![no_main]

#[path = "common/kubespray.rs"]
mod common;

use std::path::Path;

use kha::kubespray::{Inventory, Vars};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // No group_vars/ beside this path: only the inventory's own vars count.
    let inventory = match Inventory::parse(text, Path::new("/nonexistent/kha-fuzz/hosts.yaml")) {
        Ok(i) => i,
        Err(e) => return drop(e.to_string()),
    };
    for name in inventory.group_names() {
        let group = inventory.group(&name).expect("a listed group exists");
        for host in &group.hosts {
            drop(inventory.access_address(host).map(|a| a.address.url(6443)));
        }
        drop(inventory.ip_addresses(&group).map_err(|e| e.to_string()));
    }
    drop(inventory.control_plane().map_err(|e| e.to_string()));
    drop(inventory.etcd().map_err(|e| e.to_string()));
    match Vars::load(&inventory, None, &[]) {
        Ok(vars) => common::commands(&vars, &inventory),
        Err(e) => drop(e.to_string()),
    }
});
