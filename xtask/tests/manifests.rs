//! The deployment files: deploy/static-pod.yaml, deploy/daemonset.yaml, deploy/kha.service,
//! deploy/kha.toml.example and the Containerfile.
//!
//! The manifests validate against the Kubernetes API's own schemas (kubernetes-validate from
//! PyPI, strict, offline once installed into a venv under target/), `systemd-analyze verify`
//! accepts the unit, and each file says what kha needs on a node: the host network, the host's
//! cgroup v2 root, the host's bpffs so the pins outlive the pod, the config and the CA, probes
//! on the address the agent serves them, an agent that leaves the datapath attached when it
//! stops, and no privilege beyond the capabilities tests/e2e/privileges.rs proves kha needs.
//! No cluster and no root; a few seconds, plus one pip install on the first run.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Value, json};

const STATIC_POD: &str = "deploy/static-pod.yaml";
const DAEMONSET: &str = "deploy/daemonset.yaml";
const MANIFESTS: [&str; 2] = [STATIC_POD, DAEMONSET];
const SYSTEMD_UNIT: &str = "deploy/kha.service";
const EXAMPLE_CONFIG: &str = "deploy/kha.toml.example";
const CONTAINERFILE: &str = "Containerfile";

const KHA: &str = "/usr/local/bin/kha";
/// What kha is granted everywhere, as Kubernetes spells capabilities. Each is proved needed,
/// and the five enough, by tests/e2e/privileges.rs (its `GRANTED`).
const CAPABILITIES: [&str; 5] = ["BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_ADMIN"];
const CONFIG_PATH: &str = "/etc/kha/kha.toml";
const CA_FILE: &str = "/etc/kubernetes/ssl/ca.crt";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values (empty documents dropped).
fn yaml_docs(rel: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn at<'a>(v: &'a Value, pointer: &str, file: &str) -> &'a Value {
    v.pointer(pointer).unwrap_or_else(|| panic!("{file}: no {pointer}"))
}

fn str_at<'a>(v: &'a Value, pointer: &str, file: &str) -> &'a str {
    at(v, pointer, file).as_str().unwrap_or_else(|| panic!("{file}: {pointer} is not a string"))
}

fn array_at<'a>(v: &'a Value, pointer: &str, file: &str) -> &'a Vec<Value> {
    at(v, pointer, file).as_array().unwrap_or_else(|| panic!("{file}: {pointer} is not a list"))
}

fn named<'a>(list: &'a [Value], name: &str, file: &str) -> &'a Value {
    list.iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{file}: nothing named {name} in {list:?}"))
}

/// `--flag=value` and `--flag value` arguments after `kha run`, by flag.
fn flags(args: &[String], file: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let flag = arg.strip_prefix("--").unwrap_or_else(|| panic!("{file}: `{arg}` is not a --flag"));
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => (
                flag.to_owned(),
                it.next().unwrap_or_else(|| panic!("{file}: --{flag} has no value")).clone(),
            ),
        };
        assert!(out.insert(name.clone(), value).is_none(), "{file}: --{name} given twice");
    }
    out
}

/// Every flag is one of `kha run`'s: a field of the clap structs in kha-user/src/cli.rs
/// (clap derives `--health-addr` from `health_addr`). Keeps the files from naming flags that
/// do not exist.
fn assert_kha_flags_exist(flags: &BTreeMap<String, String>, file: &str) {
    let cli = read("kha-user/src/cli.rs");
    for flag in flags.keys() {
        let field = format!("{}:", flag.replace('-', "_"));
        assert!(
            cli.lines()
                .map(|l| l.trim_start().trim_start_matches("pub(crate) ").trim_start_matches("pub "))
                .any(|l| l.starts_with(&field)),
            "{file}: --{flag} is not a `kha run` flag (no field `{field}` in kha-user/src/cli.rs)"
        );
    }
}

/// The addresses the agent serves /healthz, /readyz and /metrics on, as every file sets them.
fn endpoints(flags: &BTreeMap<String, String>, file: &str) -> (SocketAddr, SocketAddr) {
    let addr = |flag: &str| -> SocketAddr {
        let value = flags.get(flag).unwrap_or_else(|| panic!("{file}: no --{flag}"));
        value.parse().unwrap_or_else(|e| panic!("{file}: --{flag} {value}: {e}"))
    };
    let (health, metrics) = (addr("health-addr"), addr("metrics-addr"));
    assert!(
        health.ip().is_loopback() && metrics.ip().is_loopback(),
        "{file}: endpoints leave the node's loopback"
    );
    // nginx-proxy listens on 0.0.0.0:8081 (kubespray's loadbalancer_apiserver_healthcheck_port)
    // while both run during the migration; kha would not start.
    assert_ne!(health.port(), 8081, "{file}: the health port collides with nginx-proxy's");
    (health, metrics)
}

/// What both manifests' pod specs must say; returns the `kha run` flags.
fn check_pod_spec(spec: &Value, file: &str) -> BTreeMap<String, String> {
    assert_eq!(spec["hostNetwork"], true, "{file}: kha serves the host's network namespace");
    assert_eq!(spec["priorityClassName"], "system-node-critical", "{file}: priority");
    let tolerations = array_at(spec, "/tolerations", file);
    assert!(
        tolerations.iter().any(|t| *t == json!({"operator": "Exists"})),
        "{file}: no toleration of every taint (`operator: Exists` without key or effect): {tolerations:?}"
    );
    let grace = at(spec, "/terminationGracePeriodSeconds", file).as_u64().expect("a number");
    assert!(grace <= 10, "{file}: terminationGracePeriodSeconds {grace}: kha exits at once on SIGTERM");

    let containers = array_at(spec, "/containers", file);
    assert_eq!(containers.len(), 1, "{file}: one container");
    let c = named(containers, "kha", file);
    check_least_privilege(spec, c, file);
    let command: Vec<String> = array_at(c, "/command", file)
        .iter()
        .map(|a| a.as_str().unwrap_or_else(|| panic!("{file}: command item {a} is not a string")).to_owned())
        .collect();
    assert_eq!(command[..2], [KHA, "run"], "{file}: the container runs `kha run`");
    let flags = flags(&command[2..], file);
    assert_kha_flags_exist(&flags, file);
    assert_eq!(flags.get("config").map(String::as_str), Some(CONFIG_PATH), "{file}: --config");

    let mounts = array_at(c, "/volumeMounts", file);
    let volumes = array_at(spec, "/volumes", file);
    let mount_at = |path: &str| -> (&Value, &Value) {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{file}: nothing mounted at {path}"));
        (m, named(volumes, m["name"].as_str().expect("a volume name"), file))
    };

    // The pins must be the host's: its bpffs, mounted by the host (Bidirectional, which would
    // carry a mount of kha's back out, is for privileged containers only).
    let (bpf, bpf_volume) = mount_at("/sys/fs/bpf");
    assert_eq!(bpf_volume["hostPath"]["path"], "/sys/fs/bpf", "{file}: /sys/fs/bpf is the host's");
    assert_eq!(bpf_volume["hostPath"]["type"], "Directory", "{file}: /sys/fs/bpf must exist on the host");
    assert_eq!(
        bpf["mountPropagation"], "HostToContainer",
        "{file}: a bpffs the host mounts after the pod started must show in the pod"
    );
    assert_ne!(bpf["readOnly"], true, "{file}: kha pins under /sys/fs/bpf");

    // The host's cgroup v2 root, by --cgroup: the container's own /sys/fs/cgroup is its
    // cgroup namespace, where attaching would serve this pod only.
    let cgroup = flags
        .get("cgroup")
        .unwrap_or_else(|| panic!("{file}: no --cgroup: kha would attach to the pod's cgroup"));
    let (cg, cg_volume) = mount_at(cgroup);
    let host_cgroup =
        cg_volume["hostPath"]["path"].as_str().unwrap_or_else(|| panic!("{file}: --cgroup is no hostPath"));
    assert!(
        ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].contains(&host_cgroup),
        "{file}: --cgroup {cgroup} is the host's {host_cgroup}, not its cgroup v2 mount"
    );
    assert_eq!(cg["readOnly"], true, "{file}: attaching needs only a read-only cgroup directory");

    // The config and the CA it names, read-only.
    let (config, _) = mount_at("/etc/kha");
    assert_eq!(config["readOnly"], true, "{file}: /etc/kha read-only");
    let (ssl, ssl_volume) = mount_at("/etc/kubernetes/ssl");
    assert_eq!(ssl["readOnly"], true, "{file}: the CA read-only");
    assert_eq!(ssl_volume["hostPath"]["path"], "/etc/kubernetes/ssl", "{file}: kubespray's kube_cert_dir");

    // The probes go where the agent listens: the node's loopback (hostNetwork), not the pod IP.
    let (health, _) = endpoints(&flags, file);
    for (probe, path) in
        [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
    {
        let get = at(c, &format!("/{probe}/httpGet"), file);
        assert_eq!(get["path"], path, "{file}: {probe} path");
        assert_eq!(get["port"], health.port(), "{file}: {probe} port is not --health-addr's");
        assert_eq!(
            get["host"],
            health.ip().to_string(),
            "{file}: {probe} must name the host --health-addr binds"
        );
    }
    flags
}

/// Not privileged: root with exactly [`CAPABILITIES`], no_new_privs, the runtime's seccomp
/// profile, a read-only image, and nothing else of the host's but its network.
fn check_least_privilege(spec: &Value, c: &Value, file: &str) {
    for key in ["hostPID", "hostIPC"] {
        assert_ne!(spec[key], true, "{file}: {key}: kha needs only the host's network");
    }
    if let Some(pod) = spec.get("securityContext") {
        assert!(
            pod.get("seccompProfile").is_none_or(|p| p["type"] == "RuntimeDefault"),
            "{file}: the pod's seccompProfile {pod}"
        );
    }
    let sc = at(c, "/securityContext", file);
    assert_ne!(sc["privileged"], true, "{file}: privileged; kha needs only its capabilities");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{file}: allowPrivilegeEscalation (no_new_privs)");
    assert_eq!(
        sc["readOnlyRootFilesystem"], true,
        "{file}: readOnlyRootFilesystem: kha writes only its pins"
    );
    // Root: the host's /sys/fs/bpf is root's, mode 0700, and there is no CAP_DAC_OVERRIDE.
    assert_eq!(sc["runAsUser"], 0, "{file}: runAsUser");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{file}: seccompProfile");
    // docker-default and cri-containerd.apparmor.d deny writes under /sys/fs/bpf: no pins.
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined", "{file}: appArmorProfile");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{file}: capabilities.drop");
    let add: Vec<&str> = array_at(sc, "/capabilities/add", file)
        .iter()
        .map(|c| c.as_str().unwrap_or_else(|| panic!("{file}: capability {c} is not a string")))
        .collect();
    let mut sorted = add.clone();
    sorted.sort_unstable();
    sorted.dedup();
    // Spelled without `CAP_`: the API refuses `allowPrivilegeEscalation: false` beside
    // `CAP_SYS_ADMIN`, not beside `SYS_ADMIN`.
    let mut wanted = CAPABILITIES.to_vec();
    wanted.sort_unstable();
    assert_eq!(sorted, wanted, "{file}: capabilities.add {add:?}, not exactly {CAPABILITIES:?}");
    assert_eq!(add.len(), CAPABILITIES.len(), "{file}: a capability added twice: {add:?}");
}

#[test]
fn the_granted_capabilities_are_the_ones_the_root_test_runs_kha_with() {
    let e2e = "tests/e2e/privileges.rs";
    let text = read(e2e);
    let line = text
        .lines()
        .find(|l| l.starts_with("const GRANTED:"))
        .unwrap_or_else(|| panic!("{e2e}: no `const GRANTED`"));
    let list = line.rsplit_once('[').and_then(|(_, l)| l.split_once(']')).map(|(l, _)| l);
    let granted: BTreeSet<&str> =
        list.unwrap_or_else(|| panic!("{e2e}: {line}")).split(',').map(str::trim).collect();
    assert_eq!(granted, CAPABILITIES.into_iter().collect(), "{e2e} proves another set than deploy/ grants");
}

fn image(spec: &Value, file: &str) -> String {
    let image = str_at(spec, "/containers/0/image", file).to_owned();
    assert!(image.contains(':') && !image.ends_with(":latest"), "{file}: image {image} has no fixed tag");
    image
}

#[test]
fn static_pod_starts_without_the_api_and_leaves_the_datapath_behind() {
    let docs = yaml_docs(STATIC_POD);
    assert_eq!(docs.len(), 1, "{STATIC_POD}: one pod");
    let pod = &docs[0];
    assert_eq!((&pod["apiVersion"], &pod["kind"]), (&json!("v1"), &json!("Pod")));
    assert_eq!(pod["metadata"]["namespace"], "kube-system");
    let spec = at(pod, "/spec", STATIC_POD);
    check_pod_spec(spec, STATIC_POD);
    // The kubelet runs a static pod from its file alone: nothing from the API.
    for volume in array_at(spec, "/volumes", STATIC_POD) {
        assert!(volume.get("hostPath").is_some(), "{STATIC_POD}: volume {volume} is not a hostPath");
    }
    assert!(
        spec.get("serviceAccountName").is_none(),
        "{STATIC_POD}: static pods cannot use service accounts"
    );
}

#[test]
fn daemonset_tolerates_everything_and_updates_one_node_at_a_time() {
    let docs = yaml_docs(DAEMONSET);
    let kind = |k: &str| -> &Value {
        let mut of_kind = docs.iter().filter(|d| d["kind"] == k);
        let doc = of_kind.next().unwrap_or_else(|| panic!("{DAEMONSET}: no {k}"));
        assert!(of_kind.next().is_none(), "{DAEMONSET}: two of {k}");
        assert_eq!(doc["metadata"]["namespace"], "kube-system", "{DAEMONSET}: {k} namespace");
        doc
    };
    let (sa, cm, ds) = (kind("ServiceAccount"), kind("ConfigMap"), kind("DaemonSet"));
    assert_eq!(docs.len(), 3, "{DAEMONSET}: ServiceAccount, ConfigMap, DaemonSet and nothing else");
    assert_eq!(ds["apiVersion"], "apps/v1");

    let strategy = at(ds, "/spec/updateStrategy", DAEMONSET);
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1);
    assert!(
        [Value::Null, json!(0)].contains(&strategy["rollingUpdate"]["maxSurge"]),
        "{DAEMONSET}: two agents on one node cannot share the pin dir"
    );
    let selector = at(ds, "/spec/selector/matchLabels", DAEMONSET).as_object().expect("labels");
    let labels = at(ds, "/spec/template/metadata/labels", DAEMONSET);
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "{DAEMONSET}: the selector does not match the template's labels");
    }

    let spec = at(ds, "/spec/template/spec", DAEMONSET);
    check_pod_spec(spec, DAEMONSET);
    assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"], "{DAEMONSET}: service account");
    // Not on control-plane nodes, where localhost:6443 is the local apiserver.
    let terms = array_at(
        spec,
        "/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms",
        DAEMONSET,
    );
    for term in terms {
        assert!(
            array_at(term, "/matchExpressions", DAEMONSET)
                .iter()
                .any(|e| *e
                    == json!({"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"})),
            "{DAEMONSET}: a node selector term admits control-plane nodes: {term}"
        );
    }

    // /etc/kha is the ConfigMap, which carries the example config.
    let mount =
        array_at(spec, "/containers/0/volumeMounts", DAEMONSET).iter().find(|m| m["mountPath"] == "/etc/kha");
    let volume = named(
        array_at(spec, "/volumes", DAEMONSET),
        mount.expect("checked")["name"].as_str().unwrap(),
        DAEMONSET,
    );
    assert_eq!(
        volume["configMap"]["name"], cm["metadata"]["name"],
        "{DAEMONSET}: /etc/kha is not the ConfigMap"
    );
    let key = Path::new(CONFIG_PATH).file_name().unwrap().to_str().unwrap();
    let text = str_at(cm, &format!("/data/{key}"), DAEMONSET);
    assert_eq!(
        check_config(text, DAEMONSET),
        check_config(&read(EXAMPLE_CONFIG), EXAMPLE_CONFIG),
        "the ConfigMap's {key} and {EXAMPLE_CONFIG} differ"
    );

    let pod = yaml_docs(STATIC_POD);
    assert_eq!(
        image(spec, DAEMONSET),
        image(at(&pod[0], "/spec", STATIC_POD), STATIC_POD),
        "the manifests run different images"
    );
}

/// Checks a kha config as `kha run --config` reads it (the keys it knows, addresses it can
/// parse, kubespray's CA); returns it for comparison.
fn check_config(text: &str, file: &str) -> toml::Table {
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{file}: not valid TOML: {e}"));
    for key in table.keys() {
        assert!(["ca_file", "frontend"].contains(&key.as_str()), "{file}: kha refuses the unknown key {key}");
    }
    assert_eq!(table.get("ca_file").and_then(|v| v.as_str()), Some(CA_FILE), "{file}: ca_file");
    let frontends =
        table.get("frontend").and_then(|f| f.as_array()).unwrap_or_else(|| panic!("{file}: no [[frontend]]"));
    let mut addresses = Vec::new();
    for f in frontends {
        let f = f.as_table().unwrap_or_else(|| panic!("{file}: a frontend is not a table"));
        for key in f.keys() {
            assert!(
                ["address", "backends", "policy", "health_path"].contains(&key.as_str()),
                "{file}: kha refuses the unknown frontend key {key}"
            );
        }
        let addr = |v: &toml::Value| -> SocketAddr {
            let s = v.as_str().unwrap_or_else(|| panic!("{file}: {v} is not a string"));
            let a: SocketAddr = s.parse().unwrap_or_else(|e| panic!("{file}: {s}: {e}"));
            assert_ne!(a.port(), 0, "{file}: {s}: port 0");
            a
        };
        addresses.push(addr(&f["address"]));
        let backends =
            f.get("backends").and_then(|b| b.as_array()).unwrap_or_else(|| panic!("{file}: no backends"));
        assert!(!backends.is_empty(), "{file}: a frontend without backends fails every connect");
        for b in backends {
            addr(b);
        }
    }
    // What kubelet and kube-proxy reach as https://localhost:6443.
    for localhost in ["127.0.0.1:6443", "[::1]:6443"] {
        assert!(addresses.contains(&localhost.parse().unwrap()), "{file}: no frontend {localhost}");
    }
    table
}

#[test]
fn example_config_is_what_kha_reads() {
    check_config(&read(EXAMPLE_CONFIG), EXAMPLE_CONFIG);
}

/// `[Section]` -> key -> values, in order (systemd allows keys to repeat).
fn unit_file(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (k, v) =
            line.split_once('=').unwrap_or_else(|| panic!("{SYSTEMD_UNIT}: `{line}` is not key=value"));
        assert!(!section.is_empty(), "{SYSTEMD_UNIT}: `{line}` before any section");
        sections
            .entry(section.clone())
            .or_default()
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    sections
}

#[test]
fn systemd_unit_restarts_the_agent_and_never_detaches() {
    let unit = unit_file(&read(SYSTEMD_UNIT));
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        match service.get(key).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{SYSTEMD_UNIT}: {key}= should be set once, is {other:?}"),
        }
    };
    assert_eq!(one("Type"), "simple");
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("KillSignal"), "SIGTERM");
    let exec: Vec<String> = one("ExecStart").split_whitespace().map(str::to_owned).collect();
    assert_eq!(exec[..2], [KHA, "run"], "{SYSTEMD_UNIT}: ExecStart runs `kha run`");
    let unit_flags = flags(&exec[2..], SYSTEMD_UNIT);
    assert_kha_flags_exist(&unit_flags, SYSTEMD_UNIT);
    assert_eq!(unit_flags.get("config").map(String::as_str), Some(CONFIG_PATH));

    // The datapath is meant to outlive the agent.
    for (key, values) in service {
        assert!(
            !(key.starts_with("ExecStop") || values.iter().any(|v| v.contains("detach"))),
            "{SYSTEMD_UNIT}: {key}={values:?} would take the datapath down with the service"
        );
    }
    // Root with the same capabilities as the pods, and nothing more.
    let caps: BTreeSet<&str> = one("CapabilityBoundingSet").split_whitespace().collect();
    let wanted: BTreeSet<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    assert_eq!(
        caps,
        wanted.iter().map(String::as_str).collect(),
        "{SYSTEMD_UNIT}: CapabilityBoundingSet= is not exactly {CAPABILITIES:?}"
    );
    for key in ["User", "DynamicUser", "AmbientCapabilities"] {
        assert!(!service.contains_key(key), "{SYSTEMD_UNIT}: {key}=: kha runs as root with a bounding set");
    }
    assert_eq!(one("NoNewPrivileges"), "yes");
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE= a number");
    assert!(nofile >= 4096, "{SYSTEMD_UNIT}: LimitNOFILE={nofile}");
    // Read-only but for the pins and the state dir, in a slave mount namespace, where the host's
    // bpffs is still the one pinned into (tests/e2e/privileges.rs runs kha in such a one).
    assert_eq!(one("ProtectSystem"), "strict");
    assert!(
        one("ReadWritePaths").split_whitespace().any(|p| p == "/sys/fs/bpf"),
        "{SYSTEMD_UNIT}: the pins under /sys/fs/bpf"
    );
    let state_dir = read("kha-user/src/discovery/mod.rs")
        .lines()
        .find_map(|l| l.trim().strip_prefix("pub const DEFAULT_STATE_DIR: &str = \"")?.split('"').next())
        .expect("kha-user/src/discovery/mod.rs: DEFAULT_STATE_DIR")
        .to_owned();
    assert_eq!(
        format!("/var/lib/{}", one("StateDirectory")),
        state_dir,
        "{SYSTEMD_UNIT}: StateDirectory= is not --state-dir's default"
    );
    // Options that change /sys or how mounts propagate, none tried with the pins.
    for key in [
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "PrivateTmp",
        "PrivateMounts",
        "PrivateDevices",
        "ProtectHome",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "RootDirectory",
        "RootImage",
        "BindPaths",
        "BindReadOnlyPaths",
        "MountFlags",
    ] {
        assert!(
            !service.contains_key(key),
            "{SYSTEMD_UNIT}: {key}= is not known to keep the pins the host's"
        );
    }
    assert!(
        unit["Unit"].get("Before").is_some_and(|v| v.iter().any(|b| b.contains("kubelet.service"))),
        "{SYSTEMD_UNIT}: start before the kubelet, whose API connections go through kha"
    );

    // The same endpoints as the manifests.
    for file in MANIFESTS {
        let docs = yaml_docs(file);
        let pod = docs.iter().find(|d| d["kind"] == "Pod" || d["kind"] == "DaemonSet").expect("a pod");
        let spec = if pod["kind"] == "Pod" { &pod["spec"] } else { &pod["spec"]["template"]["spec"] };
        let command: Vec<String> = array_at(spec, "/containers/0/command", file)
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            endpoints(&flags(&command[2..], file), file),
            endpoints(&unit_flags, SYSTEMD_UNIT),
            "{SYSTEMD_UNIT} and {file} serve the endpoints on different addresses"
        );
    }
}

/// The value of `const NAME: &str = "VALUE";` in xtask/src/setup/mod.rs.
fn setup_const(name: &str) -> String {
    let setup = read("xtask/src/setup/mod.rs");
    let prefix = format!("const {name}: &str = \"");
    let line = setup
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("setup.rs: no {name}"));
    line.split('"').next().unwrap().to_owned()
}

#[test]
fn containerfile_builds_as_xtask_setup_does_and_ships_what_the_manifests_run() {
    let text = read(CONTAINERFILE);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let from: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("FROM ")).collect();
    let toolchain: toml::Table = read("rust-toolchain.toml").parse().expect("rust-toolchain.toml");
    let channel = toolchain["toolchain"]["channel"].as_str().expect("a channel");
    assert!(
        from[0].contains(&format!("rust:{channel}-bookworm")),
        "{CONTAINERFILE}: build stage {} is not rust {channel} on bookworm",
        from[0]
    );
    assert!(from.last().unwrap().contains("debian:bookworm-slim"), "{CONTAINERFILE}: final stage");

    // The same LLVM and bpf-linker as `cargo xtask setup`.
    let bpf_linker = setup_const("BPF_LINKER");
    let llvm_prefix = setup_const("LLVM_PREFIX");
    for needed in [
        format!("bpf-linker@{bpf_linker}"),
        format!("LLVM_PREFIX={llvm_prefix}"),
        "--features llvm-22".to_owned(),
        "llvm-22-dev".to_owned(),
        "rustup toolchain install".to_owned(),
        "bpftool".to_owned(),
        "musl-tools".to_owned(),
        "cargo build --profile dist --target \"$target\" --locked -p kha-user".to_owned(),
        format!("install -m 0755 \"target/$target/dist/kha\" {KHA}"),
        format!("COPY --from=build {KHA} {KHA}"),
        format!("ENTRYPOINT [\"{KHA}\"]"),
    ] {
        assert!(text.contains(&needed), "{CONTAINERFILE}: no `{needed}`");
    }
    // cargo needs every workspace member's manifest.
    let workspace: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    for member in workspace["workspace"]["members"].as_array().expect("members") {
        let member = member.as_str().unwrap();
        assert!(
            lines.iter().any(|l| *l == format!("COPY {member} {member}")),
            "{CONTAINERFILE}: workspace member {member} is not copied into the build"
        );
    }
}

/// The kubernetes-validate release the manifests are checked with, and the Kubernetes
/// version whose schemas it applies (kubespray's oldest supported at the time of writing).
const KUBERNETES_VALIDATE: &str = "1.37.0";
const KUBERNETES_VERSION: &str = "1.33";

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The python of a venv holding kubernetes-validate, installed from PyPI on first use and kept
/// under target/ (Cargo's CARGO_TARGET_TMPDIR): later runs are offline. Built beside the final
/// place and renamed into it, so a half-made venv is never used and two runs at once are fine.
fn kubernetes_validate() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = tmp.join(format!("kubernetes-validate-{KUBERNETES_VALIDATE}"));
    let python = venv.join("bin/python");
    if python.is_file() {
        return python;
    }
    /// Removed when dropped: after a failed install; after the rename there is nothing left.
    struct Staging(PathBuf);
    impl Drop for Staging {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let staging =
        Staging(tmp.join(format!("kubernetes-validate-{KUBERNETES_VALIDATE}.{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&staging.0);
    std::fs::create_dir_all(tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    let what = "installing kubernetes-validate (needs python3 with venv, and PyPI)";
    run(Command::new("python3").args(["-m", "venv"]).arg(&staging.0), what);
    run(
        Command::new(staging.0.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
        ]),
        what,
    );
    // The venv's python finds its packages relative to itself (pyvenv.cfg), so it may move;
    // its console scripts may not, hence `python -m kubernetes_validate`. If another run got
    // there first, its venv is as good.
    if let Err(e) = std::fs::rename(&staging.0, &venv) {
        assert!(python.is_file(), "{}: {e}", venv.display());
    }
    python
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas() {
    let mut on_disk: Vec<String> = std::fs::read_dir(root().join("deploy"))
        .expect("deploy/")
        .flatten()
        .map(|e| format!("deploy/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml"))
        .collect();
    on_disk.sort();
    let mut known = MANIFESTS.map(str::to_owned).to_vec();
    known.sort();
    assert_eq!(on_disk, known, "a manifest in deploy/ this test does not know");

    let python = kubernetes_validate();
    let out = Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION])
        .args(MANIFESTS.map(|f| root().join(f)))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "kubernetes-validate --strict -k {KUBERNETES_VERSION} refused the manifests:\n{text}"
    );
    // Every document was checked against a schema of that version (an unknown kind is only a
    // warning to kubernetes-validate).
    for file in MANIFESTS {
        let passed = text
            .lines()
            .filter(|l| {
                l.contains(file)
                    && l.contains(" passed for resource ")
                    && l.ends_with(&format!("against version {KUBERNETES_VERSION}"))
            })
            .count();
        assert_eq!(passed, yaml_docs(file).len(), "{file}: not every document was validated:\n{text}");
    }
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    // verify insists that ExecStart= names an executable file: this test's own binary stands in
    // for /usr/local/bin/kha, which the test machine does not have.
    let exe = std::env::current_exe().expect("the test binary");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kha-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("kha.service");
    let text =
        read(SYSTEMD_UNIT).replace(&format!("ExecStart={KHA} "), &format!("ExecStart={} ", exe.display()));
    assert_ne!(text, read(SYSTEMD_UNIT), "{SYSTEMD_UNIT}: no `ExecStart={KHA} `");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze (Debian package systemd): {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // It exits 0 after ignoring a key it cannot parse, with a message naming the unit.
    assert!(
        out.status.success() && !text.contains("kha.service"),
        "systemd-analyze verify {SYSTEMD_UNIT} ({}):\n{text}",
        out.status
    );
}
