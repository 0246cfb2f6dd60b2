//! What `kha endpoints` and `kha config` ask of a parsed inventory and its variables, shared by
//! the kubespray targets. Errors are fine (and are formatted, as the commands print them).

use kha::kubespray::{ExternalUrl, Inventory, Vars, endpoints, node_config};

pub fn commands(vars: &Vars, inventory: &Inventory) {
    let ext = ExternalUrl::parse("https://lb.example.com:8443").expect("a valid URL");
    for ext in [None, Some(&ext)] {
        match endpoints::evaluate(vars, inventory, ext, true) {
            Ok(e) => drop(endpoints::render_text(&e)),
            Err(e) => drop(e.to_string()),
        }
    }
    for etcd in [false, true] {
        if let Err(e) = node_config::generate(vars, inventory, etcd) {
            drop(e.to_string());
        }
    }
}
