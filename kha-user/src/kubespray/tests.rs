//! The seed's table row by row and abbreviation by abbreviation, the inventory and variable
//! rules, and the generated config, on small inventories written to a temporary directory.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{endpoints::Row, node_config, *};
use crate::config::{Config, FrontendDefaults};

/// A temporary directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kha-kubespray-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// node1 has all three address variables, node2 ip and ansible_host, node3 ansible_host only.
const INVENTORY: &str = "\
all:
  hosts:
    node1:
      ansible_host: 192.0.2.11
      ip: 10.0.0.11
      access_ip: 10.1.0.11
    node2:
      ansible_host: 192.0.2.12
      ip: 10.0.0.12
    node3:
      ansible_host: 192.0.2.13
    node4:
      ansible_host: 192.0.2.14
      ip: 10.0.0.14
  children:
    kube_control_plane:
      hosts:
        node1:
        node2:
        node3:
    kube_node:
      hosts:
        node4:
    etcd:
      hosts:
        node1:
        node2:
        node3:
    k8s_cluster:
      children:
        kube_control_plane:
        kube_node:
";

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Writes `inventory` as `inventory/hosts.yaml` and each `(path, text)` under `inventory/`.
fn setup(dir: &Dir, inventory: &str, files: &[(&str, &str)]) -> PathBuf {
    for (rel, text) in files {
        dir.write(&format!("inventory/{rel}"), text);
    }
    dir.write("inventory/hosts.yaml", inventory)
}

fn try_eval(
    inventory: &str,
    files: &[(&str, &str)],
    flags: &[&str],
    ext: Option<&str>,
) -> Result<Evaluation, KubesprayError> {
    let dir = Dir::new();
    let path = setup(&dir, inventory, files);
    let inv = Inventory::from_file(&path)?;
    let vars = Vars::load(&inv, None, &s(flags))?;
    let ext = ext.map(ExternalUrl::parse).transpose()?;
    evaluate(&vars, &inv, ext.as_ref(), true)
}

fn eval(inventory: &str, files: &[(&str, &str)], flags: &[&str], ext: Option<&str>) -> Evaluation {
    try_eval(inventory, files, flags, ext).unwrap_or_else(|e| panic!("{e}"))
}

/// (kube-master, non-master, external) of the selected mode.
fn urls(e: &Evaluation) -> (&str, &str, &str) {
    (&e.kube_master, &e.non_master, e.external.as_deref().unwrap_or("-"))
}

fn term<'a>(e: &'a Evaluation, abbr: &str) -> &'a endpoints::Term {
    e.terms.iter().find(|t| t.abbr == abbr).unwrap_or_else(|| panic!("no term {abbr}"))
}

fn flags_only(flags: &[&str]) -> Evaluation {
    eval(INVENTORY, &[], flags, None)
}

// ---- the four rows ----

#[test]
fn row_local_lb_is_the_default() {
    let e = flags_only(&[]);
    assert_eq!(e.mode, Mode::LocalLb);
    // bip:sp, lc:nsp, m[0].aip:sp
    assert_eq!(urls(&e), ("https://localhost:6443", "https://localhost:6443", "https://10.1.0.11:6443"));
    assert!(e.reason.contains("loadbalancer_apiserver is not set"), "{}", e.reason);
    assert!(e.reason.contains("loadbalancer_apiserver_localhost defaults to true"), "{}", e.reason);
}

#[test]
fn row_local_lb_with_unmanaged_lb() {
    let e = eval(INVENTORY, &[], &[], Some("https://api.example.com:8383"));
    assert_eq!(e.mode, Mode::LocalLbUnmanagedLb);
    // bip:sp, lc:nsp, ext
    assert_eq!(
        urls(&e),
        ("https://localhost:6443", "https://localhost:6443", "https://api.example.com:8383")
    );
    assert_eq!(term(&e, "ext").value, "https://api.example.com:8383");
    // Also with the local LB switched on explicitly.
    let e = eval(INVENTORY, &[], &["loadbalancer_apiserver_localhost=true"], Some("https://[2001:db8::10]"));
    assert_eq!((e.mode, e.external.as_deref()), (Mode::LocalLbUnmanagedLb, Some("https://[2001:db8::10]")));
}

#[test]
fn row_external_lb_no_internal() {
    let group_vars = "\
apiserver_loadbalancer_domain_name: api.example.com
loadbalancer_apiserver:
  address: 192.0.2.10
  port: 8383
";
    let e = eval(INVENTORY, &[("group_vars/all/all.yml", group_vars)], &[], None);
    assert_eq!(e.mode, Mode::ExternalLb);
    // bip:sp, lb:lp, lb:lp
    assert_eq!(
        urls(&e),
        ("https://localhost:6443", "https://api.example.com:8383", "https://api.example.com:8383")
    );
    assert!(e.reason.contains("loadbalancer_apiserver_localhost defaults to false"), "{}", e.reason);
    // The mapping's first key is where it is.
    assert!(e.reason.contains("group_vars/all/all.yml:3:3"), "{}", e.reason);
    assert_eq!(term(&e, "lb addr").value, "192.0.2.10");
    // An explicit false says the same.
    let e = eval(
        INVENTORY,
        &[("group_vars/all/all.yml", group_vars)],
        &["loadbalancer_apiserver_localhost=false"],
        None,
    );
    assert_eq!(e.mode, Mode::ExternalLb);
}

#[test]
fn row_no_ext_no_int_lb() {
    let e = flags_only(&["loadbalancer_apiserver_localhost=false"]);
    assert_eq!(e.mode, Mode::NoLb);
    // bip:sp, m[0].aip:sp, m[0].aip:sp
    assert_eq!(urls(&e), ("https://localhost:6443", "https://10.1.0.11:6443", "https://10.1.0.11:6443"));
    // YAML 1.1 and Ansible spellings of false.
    for no in ["no", "False", "off", "0", "'false'"] {
        let e = flags_only(&[&format!("loadbalancer_apiserver_localhost={no}")]);
        assert_eq!(e.mode, Mode::NoLb, "{no}");
    }
}

#[test]
fn all_modes_table() {
    let e = flags_only(&["kube_apiserver_port=7443"]);
    let modes = e.modes.as_ref().unwrap();
    let row = |m: Mode| -> &Row { modes.iter().find(|r| r.mode == m).unwrap() };
    assert_eq!(modes.len(), 4);
    assert!(modes.iter().all(|r| r.kube_master == "https://localhost:7443"), "kube-master is always bip:sp");
    assert_eq!(row(Mode::LocalLb).non_master, "https://localhost:7443");
    assert_eq!(row(Mode::LocalLb).external.as_deref(), Some("https://10.1.0.11:7443"));
    assert_eq!(row(Mode::LocalLbUnmanagedLb).external, None, "no --external-url");
    assert_eq!(row(Mode::ExternalLb).non_master, "https://lb-apiserver.kubernetes.local:7443");
    assert_eq!(row(Mode::NoLb).non_master, "https://10.1.0.11:7443");
    let text = endpoints::render_text(&e);
    assert!(text.contains("* Local LB (default)"), "{text}");
    assert!(text.contains("(needs --external-url)"), "{text}");
    assert!(text.contains("No ext/int LB"), "{text}");
}

// ---- the abbreviations ----

#[test]
fn bip_custom_bind_address_or_localhost_for_the_default() {
    let e = flags_only(&["kube_apiserver_bind_address=10.0.0.11"]);
    assert_eq!(e.kube_master, "https://10.0.0.11:6443");
    assert_eq!(term(&e, "bip").from, "--var kube_apiserver_bind_address");
    for every in ["0.0.0.0", "'::'"] {
        let e = flags_only(&[&format!("kube_apiserver_bind_address={every}")]);
        assert_eq!(e.kube_master, "https://localhost:6443", "{every}");
    }
    let e = flags_only(&[]);
    assert_eq!(term(&e, "bip").from, "default 0.0.0.0: localhost");
    let e = flags_only(&["kube_apiserver_bind_address=2001:db8::11"]);
    assert_eq!(e.kube_master, "https://[2001:db8::11]:6443");
    let err = try_eval(INVENTORY, &[], &["kube_apiserver_bind_address=master-1"], None).unwrap_err();
    assert!(matches!(err, KubesprayError::BadValue { .. }), "{err}");
}

#[test]
fn lc_is_localhost_for_non_masters() {
    let e = flags_only(&[]);
    assert!(e.non_master.starts_with("https://localhost:"), "{}", e.non_master);
    assert_eq!(term(&e, "lc").value, "localhost");
}

#[test]
fn sp_defaults_to_6443_and_nsp_defers_to_sp() {
    let e = flags_only(&[]);
    assert_eq!((term(&e, "sp").value.as_str(), term(&e, "sp").from.as_str()), ("6443", "default"));
    assert_eq!((term(&e, "nsp").value.as_str(), term(&e, "nsp").from.as_str()), ("6443", "defers to sp"));

    let e = flags_only(&["kube_apiserver_port=7443"]);
    assert_eq!(urls(&e), ("https://localhost:7443", "https://localhost:7443", "https://10.1.0.11:7443"));

    // nsp set: only the non-master endpoint moves.
    let e = flags_only(&["kube_apiserver_port=7443", "loadbalancer_apiserver_port=8443"]);
    assert_eq!(urls(&e), ("https://localhost:7443", "https://localhost:8443", "https://10.1.0.11:7443"));
    // Quoted ports are ports too.
    let e = flags_only(&["kube_apiserver_port='7443'"]);
    assert_eq!(e.kube_master, "https://localhost:7443");
    for bad in ["0", "65536", "https", "[6443]"] {
        let err = try_eval(INVENTORY, &[], &[&format!("kube_apiserver_port={bad}")], None).unwrap_err();
        assert!(matches!(err, KubesprayError::BadValue { .. }), "{bad}: {err}");
        assert!(err.to_string().contains("--var kube_apiserver_port"), "{err}");
    }
}

#[test]
fn lp_defers_to_sp_and_lb_has_a_default_name() {
    let e = flags_only(&["kube_apiserver_port=7443", "loadbalancer_apiserver={address: 192.0.2.10}"]);
    assert_eq!(e.mode, Mode::ExternalLb);
    assert_eq!(e.non_master, "https://lb-apiserver.kubernetes.local:7443");
    assert_eq!(term(&e, "lb").from, "default");
    assert!(term(&e, "lp").from.contains("no port, defers to sp"), "{}", term(&e, "lp").from);
    let e = flags_only(&[
        "loadbalancer_apiserver={port: 8383}",
        "apiserver_loadbalancer_domain_name=api.example.com",
    ]);
    assert_eq!(e.external.as_deref(), Some("https://api.example.com:8383"));
    let err = try_eval(INVENTORY, &[], &["loadbalancer_apiserver=192.0.2.10"], None).unwrap_err();
    assert!(err.to_string().contains("not a mapping with address and port"), "{err}");
}

#[test]
fn m0_is_the_first_control_plane_host_and_aip_defers_to_ip_then_ansible_host() {
    let cases = [
        // (hosts entry of the first master, its access address, the variable used)
        ("{ansible_host: 192.0.2.11, ip: 10.0.0.11, access_ip: 10.1.0.11}", "10.1.0.11", "access_ip"),
        ("{ansible_host: 192.0.2.11, ip: 10.0.0.11}", "10.0.0.11", "ip (access_ip not set)"),
        ("{ansible_host: 192.0.2.11}", "192.0.2.11", "ansible_host (access_ip, ip not set)"),
        (
            "{ansible_host: master-1.example.com}",
            "master-1.example.com",
            "ansible_host (access_ip, ip not set)",
        ),
    ];
    for (vars, aip, variable) in cases {
        let inv = format!(
            "all:\n  hosts:\n    node9: {{ip: 10.9.9.9}}\n    master-a: {vars}\n  children:\n    kube_control_plane:\n      hosts:\n        master-a:\n        node9:\n"
        );
        let e = eval(&inv, &[], &[], None);
        assert_eq!(term(&e, "m[0]").value, "master-a", "the group's order, not the file's");
        assert_eq!(term(&e, "m[0].aip").value, aip);
        assert_eq!(term(&e, "m[0].aip").variable, variable);
        assert_eq!(e.external.as_deref(), Some(format!("https://{aip}:6443").as_str()));
    }
    // No variable at all: Ansible connects to the host name, usable when it is an address.
    let e = eval(
        "all:\n  children:\n    kube_control_plane:\n      hosts:\n        10.0.0.21:\n",
        &[],
        &[],
        None,
    );
    assert_eq!(e.external.as_deref(), Some("https://10.0.0.21:6443"));
}

#[test]
fn a_groups_own_hosts_come_before_its_childrens() {
    let inv = "\
all:
  children:
    kube_control_plane:
      children:
        cp_extra:
          hosts:
            m2: {ip: 10.0.0.2}
      hosts:
        m1: {ip: 10.0.0.1}
";
    let e = eval(inv, &[], &[], None);
    assert_eq!(term(&e, "m[0]").value, "m1");
}

#[test]
fn ipv6_addresses_are_bracketed() {
    let inv = "\
all:
  hosts:
    node1: {ip: 'fd00::11', access_ip: '2001:db8::11'}
  children:
    kube_control_plane: {hosts: {node1: }}
";
    let e = eval(inv, &[], &["loadbalancer_apiserver_localhost=false"], None);
    assert_eq!(e.non_master, "https://[2001:db8::11]:6443");
    let e = eval(
        inv,
        &[],
        &["apiserver_loadbalancer_domain_name=2001:db8::10", "loadbalancer_apiserver={}"],
        None,
    );
    assert_eq!(e.non_master, "https://[2001:db8::10]:6443");
    // Already bracketed in the inventory: not twice.
    let e = eval(&inv.replace("'2001:db8::11'", "'[2001:db8::11]'"), &[], &[], None);
    assert_eq!(e.external.as_deref(), Some("https://[2001:db8::11]:6443"));
}

// ---- the rules ----

#[test]
fn external_lb_and_localhost_lb_are_mutually_exclusive() {
    let group_vars =
        "loadbalancer_apiserver_localhost: true\nloadbalancer_apiserver:\n  address: 192.0.2.10\n";
    let err = try_eval(INVENTORY, &[("group_vars/all/all.yml", group_vars)], &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::MutuallyExclusive { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("loadbalancer_apiserver (") && msg.contains("loadbalancer_apiserver_localhost: true"),
        "{msg}"
    );
    assert!(msg.contains("mutually exclusive"), "{msg}");
    assert!(msg.contains("all.yml:1:") && msg.contains("all.yml:3:"), "both places named: {msg}");
    // --var can resolve it, either way.
    assert_eq!(
        eval(INVENTORY, &[("group_vars/all/all.yml", group_vars)], &["loadbalancer_apiserver="], None).mode,
        Mode::LocalLb
    );
    assert_eq!(
        eval(
            INVENTORY,
            &[("group_vars/all/all.yml", group_vars)],
            &["loadbalancer_apiserver_localhost=no"],
            None
        )
        .mode,
        Mode::ExternalLb
    );
}

#[test]
fn an_unmanaged_lb_goes_with_the_local_lb_only() {
    let err = try_eval(
        INVENTORY,
        &[],
        &["loadbalancer_apiserver_localhost=false"],
        Some("https://api.example.com"),
    )
    .unwrap_err();
    assert!(matches!(err, KubesprayError::ExternalUrlWithoutLocalLb { .. }), "{err}");
    assert!(err.to_string().contains("loadbalancer_apiserver_localhost is false"), "{err}");
    let err = try_eval(INVENTORY, &[], &[], Some("api.example.com:8383")).unwrap_err();
    assert!(matches!(err, KubesprayError::ExternalUrl { problem: UrlProblem::Scheme, .. }), "{err}");
}

#[test]
fn the_old_control_plane_group_name_works() {
    let old = INVENTORY.replace("kube_control_plane", "kube-master");
    let e = eval(&old, &[], &[], None);
    assert_eq!(term(&e, "m[0]").variable, "first host of kube-master");
    assert_eq!(e.external.as_deref(), Some("https://10.1.0.11:6443"));
    // Both names: the current one, unless only the old one has hosts.
    let both = "all:\n  hosts:\n    a: {ip: 10.0.0.1}\n    b: {ip: 10.0.0.2}\n  children:\n    kube_control_plane:\n      hosts:\n        b:\n    kube-master:\n      hosts:\n        a:\n";
    assert_eq!(term(&eval(both, &[], &[], None), "m[0]").value, "b");
    let empty_current = "all:\n  hosts:\n    a: {ip: 10.0.0.1}\n  children:\n    kube_control_plane:\n    kube-master:\n      hosts:\n        a:\n";
    assert_eq!(term(&eval(empty_current, &[], &[], None), "m[0]").value, "a");
}

#[test]
fn variables_follow_ansible_precedence() {
    let inv = format!(
        "{INVENTORY}  vars:\n    kube_apiserver_port: 1001\n    loadbalancer_apiserver_port: 2001\n    apiserver_loadbalancer_domain_name: from-inventory-all\n"
    )
    .replace(
        "    k8s_cluster:\n      children:",
        "    k8s_cluster:\n      vars:\n        kube_apiserver_port: 1002\n      children:",
    );
    let sp = |files: &[(&str, &str)], flags: &[&str]| {
        let e = eval(&inv, files, flags, Some("https://ext.example.com"));
        (term(&e, "sp").value.clone(), term(&e, "sp").from.clone())
    };
    // Inventory: the child group's vars over all's.
    let (v, from) = sp(&[], &[]);
    assert_eq!(v, "1002");
    assert!(from.ends_with("hosts.yaml:") || from.contains("hosts.yaml:"), "{from}");
    // group_vars/all over the inventory; in a directory, later files over earlier ones.
    let all = [
        ("group_vars/all/a.yml", "kube_apiserver_port: 1003\n"),
        ("group_vars/all/b.yml", "kube_apiserver_port: 1004\n"),
    ];
    assert_eq!(sp(&all, &[]).0, "1004");
    // A directory `all/` hides `all.yml`, as in Ansible.
    let hidden = [all[0], all[1], ("group_vars/all.yml", "kube_apiserver_port: 1999\n")];
    assert_eq!(sp(&hidden, &[]).0, "1004");
    assert_eq!(sp(&[("group_vars/all.yml", "kube_apiserver_port: 1005\n")], &[]).0, "1005");
    // group_vars/k8s_cluster (and the old k8s-cluster) over group_vars/all.
    let k8s = [all[0], ("group_vars/k8s_cluster/k8s-cluster.yml", "kube_apiserver_port: 1006\n")];
    assert_eq!(sp(&k8s, &[]).0, "1006");
    let old = [all[0], ("group_vars/k8s-cluster/k8s-cluster.yml", "kube_apiserver_port: 1007\n")];
    assert_eq!(sp(&old, &[]).0, "1007");
    // --var over everything; the last one wins.
    let (v, from) = sp(&k8s, &["kube_apiserver_port=1008", "kube_apiserver_port=1009"]);
    assert_eq!((v.as_str(), from.as_str()), ("1009", "--var kube_apiserver_port"));
    // An empty --var unsets: back to the default.
    assert_eq!(sp(&[], &["kube_apiserver_port="]).0, "6443");
    // Variables a file does not set keep the lower source's value.
    let e = eval(&inv, &k8s, &[], None);
    assert_eq!(term(&e, "nsp").value, "2001");
    assert_eq!(term(&e, "lb").value, "from-inventory-all");
    // A null value does not count as set; other variables, comments and vault-tagged values are ignored.
    let noisy = "# kubespray sample\nkube_apiserver_port:\nfoo: [1, 2]\nsecret: !vault |\n  $ANSIBLE_VAULT;1.1;AES256\n  6162\n";
    assert_eq!(sp(&[("group_vars/all/all.yml", noisy)], &[]).0, "1002");
    assert_eq!(sp(&[("group_vars/all/empty.yml", "# nothing\n")], &[]).0, "1002");
}

#[test]
fn group_vars_may_be_named_explicitly() {
    let dir = Dir::new();
    let inv = dir.write("hosts.yaml", INVENTORY);
    dir.write("elsewhere/all/all.yml", "kube_apiserver_port: 7443\n");
    dir.write("group_vars/all/all.yml", "kube_apiserver_port: 9999\n");
    let inventory = Inventory::from_file(&inv).unwrap();
    let vars = Vars::load(&inventory, Some(&dir.0.join("elsewhere")), &[]).unwrap();
    assert_eq!(vars.apiserver_port().unwrap(), 7443);
    assert_eq!(vars.files.len(), 2);
    // Without --group-vars: the group_vars/ beside the inventory.
    assert_eq!(Vars::load(&inventory, None, &[]).unwrap().apiserver_port().unwrap(), 9999);
    let err = Vars::load(&inventory, Some(&dir.0.join("missing")), &[]).unwrap_err();
    assert!(matches!(err, KubesprayError::GroupVarsDir { .. }), "{err}");
}

#[test]
fn symlink_loops_in_group_vars_are_refused_naming_the_link() {
    let dir = Dir::new();
    let inv = dir.write("hosts.yaml", INVENTORY);
    dir.write("group_vars/all/all.yml", "kube_apiserver_port: 7443\n");
    // A link to a directory outside the tree is read, as Ansible reads it.
    dir.write("shared/lb.yml", "loadbalancer_apiserver_port: 8443\n");
    std::os::unix::fs::symlink("../../shared", dir.0.join("group_vars/all/shared")).unwrap();
    let inventory = Inventory::from_file(&inv).unwrap();
    let vars = Vars::load(&inventory, None, &[]).unwrap();
    assert_eq!((vars.apiserver_port().unwrap(), vars.local_lb_port().unwrap()), (7443, 8443));
    // A link back to a directory being read: one clear error, not the same files again and
    // again (with two such links, forever).
    let link = dir.0.join("group_vars/all/again");
    std::os::unix::fs::symlink("../all", &link).unwrap();
    let err = Vars::load(&inventory, None, &[]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, KubesprayError::VarsDirLoop { ref path, .. } if *path == link), "{msg}");
    assert!(msg.contains("group_vars/all/again: a symlink loop") && msg.contains("remove the link"), "{msg}");
    std::os::unix::fs::symlink(".", dir.0.join("group_vars/all/again2")).unwrap();
    assert!(matches!(Vars::load(&inventory, None, &[]), Err(KubesprayError::VarsDirLoop { .. })));
}

#[test]
fn endless_vars_trees_are_refused() {
    let dir = Dir::new();
    let inv = dir.write("hosts.yaml", INVENTORY);
    let deep: String = (0..=vars::MAX_VARS_DEPTH).map(|i| format!("d{i}/")).collect();
    dir.write(&format!("group_vars/all/{deep}x.yml"), "kube_apiserver_port: 7443\n");
    let inventory = Inventory::from_file(&inv).unwrap();
    let err = Vars::load(&inventory, None, &[]).unwrap_err();
    assert!(matches!(err, KubesprayError::VarsDirTooDeep { limit: vars::MAX_VARS_DEPTH, .. }), "{err}");
    // One level less is fine.
    let shallow: String = (0..vars::MAX_VARS_DEPTH - 2).map(|i| format!("d{i}/")).collect();
    let dir = Dir::new();
    let inv = dir.write("hosts.yaml", INVENTORY);
    dir.write(&format!("group_vars/all/{shallow}x.yml"), "kube_apiserver_port: 7443\n");
    let inventory = Inventory::from_file(&inv).unwrap();
    assert_eq!(Vars::load(&inventory, None, &[]).unwrap().apiserver_port().unwrap(), 7443);
}

#[test]
fn bad_var_flags_are_refused() {
    type Is = fn(&KubesprayError) -> bool;
    let cases: [(&str, Is); 5] = [
        ("kube_apiserver_port", |e| matches!(e, KubesprayError::VarSyntax { .. })),
        ("=6443", |e| matches!(e, KubesprayError::VarSyntax { .. })),
        ("kube_apiserver_prot=6443", |e| matches!(e, KubesprayError::UnknownVar { .. })),
        ("loadbalancer_apiserver={address: [1", |e| matches!(e, KubesprayError::VarYaml { .. })),
        ("loadbalancer_apiserver_localhost=maybe", |e| matches!(e, KubesprayError::BadValue { .. })),
    ];
    for (flag, is) in cases {
        let err = try_eval(INVENTORY, &[], &[flag], None).unwrap_err();
        assert!(is(&err), "{flag}: {err:?}");
    }
    // Jinja in a flag is a template, not broken YAML.
    let err = try_eval(INVENTORY, &[], &["kube_apiserver_bind_address={{ ip }}"], None).unwrap_err();
    assert!(matches!(err, KubesprayError::Template { .. }), "{err}");
    let err = try_eval(INVENTORY, &[], &["kube_apiserver_prot=6443"], None).unwrap_err();
    assert!(err.to_string().contains("kube_apiserver_port"), "lists the known names: {err}");
}

#[test]
fn templates_are_refused_where_they_matter_only() {
    let files = [("group_vars/k8s_cluster/k8s-cluster.yml", "kube_apiserver_bind_address: \"{{ ip }}\"\n")];
    let err = try_eval(INVENTORY, &files, &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::Template { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("k8s-cluster.yml:1:30") && msg.contains("--var kube_apiserver_bind_address="),
        "{msg}"
    );
    // The node config does not need the bind address.
    let dir = Dir::new();
    let path = setup(&dir, INVENTORY, &files);
    let inventory = Inventory::from_file(&path).unwrap();
    node_config::generate(&Vars::load(&inventory, None, &[]).unwrap(), &inventory, false).unwrap();
    // A host address can be a template too.
    let inv = INVENTORY.replace("access_ip: 10.1.0.11", "access_ip: \"{{ ip }}\"");
    let err = try_eval(&inv, &[], &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::HostTemplate { .. }), "{err}");
    assert!(err.to_string().contains("node1") && err.to_string().contains("access_ip"), "{err}");
}

// ---- bad inventories ----

#[test]
fn invalid_yaml_names_file_line_and_column() {
    let bad = "all:\n  children:\n    kube_control_plane:\n      hosts:\n        node1: {ip: 10.0.0.1\n";
    let err = try_eval(bad, &[], &[], None).unwrap_err();
    let KubesprayError::Yaml { path, line, .. } = &err else { panic!("{err:?}") };
    assert!(path.ends_with("inventory/hosts.yaml"));
    assert!(*line >= 5, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("hosts.yaml:") && msg.contains("cannot read this YAML"), "{msg}");

    // Well-formed YAML of the wrong shape: the key is named.
    let wrong = "all:\n  children:\n    kube_control_plane:\n      hosts: [node1, node2]\n";
    let err = try_eval(wrong, &[], &[], None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("hosts.yaml:4:14"), "{msg}");
    assert!(msg.contains("all.children.kube_control_plane.hosts"), "{msg}");

    // In group_vars: that file is named.
    let files = [("group_vars/all/all.yml", "kube_apiserver_port: 6443\n  bad: indent\n")];
    let err = try_eval(INVENTORY, &files, &[], None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("group_vars/all/all.yml:2:"), "{msg}");
    // The parser's own words follow as the source.
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn missing_control_plane_group_lists_the_groups_found() {
    let inv = "all:\n  hosts:\n    node1: {ip: 10.0.0.1}\n  children:\n    masters:\n      hosts:\n        node1:\n";
    let err = try_eval(inv, &[], &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::MissingGroup { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("hosts.yaml") && msg.contains("kube_control_plane") && msg.contains("kube-master"),
        "{msg}"
    );
    assert!(msg.contains("groups found: all, masters"), "{msg}");
    let err = try_eval("", &[], &[], None).unwrap_err();
    assert!(err.to_string().contains("groups found: none"), "{err}");
    let err = try_eval("all:\n  children:\n    kube_control_plane:\n", &[], &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::EmptyGroup { .. }), "{err}");
}

#[test]
fn hosts_without_an_address_are_named() {
    let inv = "all:\n  children:\n    kube_control_plane:\n      hosts:\n        master-1:\n";
    let err = try_eval(inv, &[], &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::NoAddress { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("master-1") && msg.contains("access_ip, ip or ansible_host"), "{msg}");
    let inv = "all:\n  children:\n    kube_control_plane:\n      hosts:\n        m1: {ip: [10.0.0.1]}\n";
    let err = try_eval(inv, &[], &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::HostBadValue { .. }), "{err}");
}

#[test]
fn ini_and_vault_files_get_a_hint() {
    let err = try_eval("# kubespray\n[kube_control_plane]\nnode1 ansible_host=10.0.0.1\n", &[], &[], None)
        .unwrap_err();
    assert!(matches!(err, KubesprayError::IniInventory { .. }), "{err}");
    assert!(err.to_string().contains("ansible-inventory -i"), "{err}");
    let files = [("group_vars/all/secret.yml", "$ANSIBLE_VAULT;1.1;AES256\n6162636465\n")];
    let err = try_eval(INVENTORY, &files, &[], None).unwrap_err();
    assert!(matches!(err, KubesprayError::Vault { .. }), "{err}");
}

// ---- the commands ----

fn source(dir: &Dir, files: &[(&str, &str)], inventory: &str, flags: &[&str]) -> Source {
    let inventory = setup(dir, inventory, files);
    Source { inventory, group_vars: None, vars: s(flags) }
}

#[test]
fn endpoints_command_text_and_json() {
    let dir = Dir::new();
    let args = EndpointsArgs {
        source: source(&dir, &[], INVENTORY, &[]),
        external_url: None,
        all_modes: false,
        output: Format::Text,
    };
    let text = endpoints_command(&args).unwrap();
    assert!(text.starts_with("mode: Local LB (default)\n"), "{text}");
    assert!(text.contains("  external     https://10.1.0.11:6443\n"), "{text}");
    assert!(!text.contains("endpoint type"), "the table only with --all-modes: {text}");

    let args = EndpointsArgs {
        output: Format::Json,
        all_modes: true,
        external_url: Some("https://api.example.com:8383".into()),
        ..args
    };
    let json: serde_json::Value = serde_json::from_str(&endpoints_command(&args).unwrap()).unwrap();
    assert_eq!(json["mode"], "local-lb-unmanaged-lb");
    assert_eq!(json["non_master"], "https://localhost:6443");
    assert_eq!(json["external"], "https://api.example.com:8383");
    assert_eq!(json["modes"].as_array().unwrap().len(), 4);
    assert_eq!(json["modes"][2]["mode"], "external-lb");
    assert!(json["terms"].as_array().unwrap().iter().any(|t| t["abbr"] == "m[0].aip"));
}

fn config_of(
    files: &[(&str, &str)],
    inventory: &str,
    flags: &[&str],
    etcd: bool,
) -> Result<String, KubesprayError> {
    let dir = Dir::new();
    config_command(&ConfigArgs { source: source(&dir, files, inventory, flags), etcd, output: None })
}

fn parsed(text: &str) -> Config {
    Config::from_toml(text, &FrontendDefaults::default()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn sa(v: &[&str]) -> Vec<SocketAddr> {
    v.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn config_serves_localhost_with_every_master() {
    let text = config_of(&[], INVENTORY, &[], false).unwrap();
    let c = parsed(&text);
    assert_eq!(c.ca_file.as_deref(), Some(Path::new("/etc/kubernetes/ssl/ca.crt")));
    assert_eq!(c.frontends.len(), 2);
    let masters = sa(&["10.1.0.11:6443", "10.0.0.12:6443", "192.0.2.13:6443"]);
    assert_eq!(c.frontends[0].address, "127.0.0.1:6443".parse().unwrap());
    assert_eq!(c.frontends[1].address, "[::1]:6443".parse().unwrap());
    for f in &c.frontends {
        assert_eq!(f.backends, masters);
        assert_eq!(f.health_path, "/readyz");
    }
    assert!(text.contains("# node3"), "hosts are named: {text}");
    assert!(text.contains("kubespray mode: Local LB (default)"), "{text}");
}

#[test]
fn config_frontends_on_nsp_backends_on_sp() {
    let files = [
        ("group_vars/all/all.yml", "loadbalancer_apiserver_port: 8443\n"),
        ("group_vars/k8s_cluster/k8s-cluster.yml", "kube_apiserver_port: 7443\n"),
    ];
    let c = parsed(&config_of(&files, INVENTORY, &[], false).unwrap());
    assert_eq!(c.frontends[0].address, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(c.frontends[0].backends[0], "10.1.0.11:7443".parse().unwrap());
    // nsp defers to sp.
    let c = parsed(&config_of(&files[1..], INVENTORY, &[], false).unwrap());
    assert_eq!(c.frontends[1].address, "[::1]:7443".parse().unwrap());
}

#[test]
fn config_fleet_size_is_the_k8s_cluster_host_count() {
    let text = config_of(&[], INVENTORY, &[], false).unwrap();
    assert_eq!(parsed(&text).fleet_size, Some(4), "{text}");
    let old = INVENTORY.replace("    k8s_cluster:\n", "    k8s-cluster:\n");
    assert_eq!(parsed(&config_of(&[], &old, &[], false).unwrap()).fleet_size, Some(4));
    let none = INVENTORY.replace("    k8s_cluster:\n", "    other:\n");
    let text = config_of(&[], &none, &[], false).unwrap();
    assert_eq!(parsed(&text).fleet_size, None);
    assert!(text.contains("set fleet_size"), "{text}");
}

#[test]
fn config_ipv6_masters_back_the_ipv6_frontend_only() {
    let inv = INVENTORY.replace("access_ip: 10.1.0.11", "access_ip: '2001:db8::11'");
    let text = config_of(&[], &inv, &[], false).unwrap();
    let c = parsed(&text);
    assert_eq!(c.frontends[0].backends, sa(&["10.0.0.12:6443", "192.0.2.13:6443"]));
    assert_eq!(c.frontends[1].backends, sa(&["[2001:db8::11]:6443", "10.0.0.12:6443", "192.0.2.13:6443"]));
    assert!(text.contains("node1 is IPv6: an IPv4 frontend cannot have IPv6 backends"), "{text}");
    // Only IPv6 masters: no IPv4 frontend at all.
    let v6 = "all:\n  hosts:\n    a: {ip: 'fd00::1'}\n    b: {ip: 'fd00::2'}\n  children:\n    kube_control_plane:\n      hosts: {a: , b: }\n";
    let text = config_of(&[], v6, &[], false).unwrap();
    let c = parsed(&text);
    assert_eq!(c.frontends.len(), 1);
    assert_eq!(c.frontends[0].address, "[::1]:6443".parse().unwrap());
    assert!(text.contains("No IPv4 member"), "{text}");
}

#[test]
fn config_with_etcd() {
    let text = config_of(&[], INVENTORY, &[], true).unwrap();
    let c = parsed(&text);
    assert_eq!(c.frontends.len(), 3, "{text}");
    let etcd = &c.frontends[2];
    assert_eq!(etcd.address, "127.0.0.1:2379".parse().unwrap());
    assert_eq!(etcd.backends, sa(&["10.1.0.11:2379", "10.0.0.12:2379", "192.0.2.13:2379"]));
    assert_eq!(etcd.health_path, "/health");
    // etcd's own CA for its probes; the apiserver frontends keep the cluster CA.
    assert_eq!(etcd.probe_tls.ca_file.as_deref(), Some(std::path::Path::new("/etc/ssl/etcd/ssl/ca.pem")));
    assert_eq!(c.frontends[0].probe_tls.ca_file, None);
    assert!(text.contains("# client_cert = "), "{text}");
    // An IPv6 member brings [::1]:2379.
    let inv = INVENTORY.replace("access_ip: 10.1.0.11", "access_ip: '2001:db8::11'");
    let c = parsed(&config_of(&[], &inv, &[], true).unwrap());
    assert_eq!(c.frontends.len(), 4);
    assert_eq!(c.frontends[3].address, "[::1]:2379".parse().unwrap());
    assert_eq!(c.frontends[3].backends.len(), 3);
    // No etcd group.
    let inv = INVENTORY.replace("    etcd:\n", "    etcd_old:\n");
    let err = config_of(&[], &inv, &[], true).unwrap_err();
    assert!(matches!(err, KubesprayError::MissingGroup { wanted: "etcd", .. }), "{err}");
    assert!(err.to_string().contains("etcd_old"), "{err}");
}

#[test]
fn config_refuses_names_and_duplicates() {
    let inv = INVENTORY.replace("ansible_host: 192.0.2.13", "ansible_host: node3.example.com");
    let err = config_of(&[], &inv, &[], false).unwrap_err();
    assert!(matches!(err, KubesprayError::AddressIsName { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("node3") && msg.contains("ansible_host `node3.example.com`"), "{msg}");
    assert!(msg.contains("set access_ip or ip of `node3`"), "{msg}");
    assert!(msg.contains("hosts.yaml:11:21"), "{msg}");
    let inv = INVENTORY.replace("ip: 10.0.0.12", "ip: 10.1.0.11");
    let err = config_of(&[], &inv, &[], false).unwrap_err();
    assert!(matches!(err, KubesprayError::DuplicateAddress { .. }), "{err}");
}

#[test]
fn config_outside_the_local_lb_modes_says_so() {
    let text = config_of(&[], INVENTORY, &["loadbalancer_apiserver={address: 192.0.2.10}"], false).unwrap();
    assert!(text.contains("NOTE: in this mode non-master nodes do not dial localhost"), "{text}");
    parsed(&text);
    let err = config_of(
        &[],
        INVENTORY,
        &["loadbalancer_apiserver={address: 192.0.2.10}", "loadbalancer_apiserver_localhost=true"],
        false,
    )
    .unwrap_err();
    assert!(matches!(err, KubesprayError::MutuallyExclusive { .. }), "{err}");
}

#[test]
fn config_output_file_reads_back() {
    let dir = Dir::new();
    let out = dir.0.join("kha.toml");
    let args =
        ConfigArgs { source: source(&dir, &[], INVENTORY, &[]), etcd: false, output: Some(out.clone()) };
    assert_eq!(config_command(&args).unwrap(), format!("wrote {}\n", out.display()));
    let c = Config::from_file(&out, &FrontendDefaults::default()).unwrap();
    assert_eq!(c.frontends.len(), 2);
    let args = ConfigArgs { output: Some(dir.0.join("no/such/dir/kha.toml")), ..args };
    assert!(matches!(config_command(&args), Err(KubesprayError::Write { .. })));
}
