//! What a client's cgroup path says of its pod: kubelet names pod and container cgroups after
//! the pod's UID and the container's ID, with the systemd driver
//! (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`)
//! and the cgroupfs one (`kubepods/burstable/pod<uid>/<id>`). The path holds no namespace or
//! pod name: those need the API server (`kubectl get pods -A -o wide | grep <uid>`). Pure.

use serde::Serialize;

/// A pod (and container) as its cgroup path names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRef {
    /// The pod's UID, with dashes (systemd slices write them as underscores).
    pub uid: String,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub qos: &'static str,
    /// The container ID, when the cgroup is a container's rather than the pod's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// Runtime prefixes of systemd container scopes: `<prefix><id>.scope`.
const SCOPE_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-conmon-", "crio-", "docker-"];

/// The pod a cgroup path (relative to the cgroup2 mount, `/`-separated) belongs to, if it is
/// under kubelet's `kubepods` hierarchy.
pub fn parse(path: &str) -> Option<PodRef> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let root = parts.iter().position(|p| *p == "kubepods.slice" || *p == "kubepods")?;
    let rest = &parts[root + 1..];
    if parts[root] == "kubepods.slice" { systemd(rest) } else { cgroupfs(rest) }
}

fn qos_of(level: &str) -> Option<&'static str> {
    match level {
        "burstable" => Some("burstable"),
        "besteffort" => Some("besteffort"),
        _ => None,
    }
}

/// `[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid>.slice[/<runtime>-<id>.scope]`.
fn systemd(rest: &[&str]) -> Option<PodRef> {
    let (qos, rest) = match rest.first().and_then(|s| s.strip_prefix("kubepods-")?.strip_suffix(".slice")) {
        Some(level) if qos_of(level).is_some() => (qos_of(level)?, &rest[1..]),
        _ => ("guaranteed", rest),
    };
    let slice = rest.first()?.strip_suffix(".slice")?;
    let uid = slice.rsplit_once("-pod").map(|(_, uid)| uid)?;
    if !slice.starts_with("kubepods") || !valid_uid(uid) {
        return None;
    }
    let container_id = rest.get(1).and_then(|s| {
        let s = s.strip_suffix(".scope")?;
        SCOPE_PREFIXES.iter().find_map(|p| s.strip_prefix(p)).map(str::to_owned)
    });
    Some(PodRef { uid: uid.replace('_', "-"), qos, container_id })
}

/// `[<qos>/]pod<uid>[/<id>]`.
fn cgroupfs(rest: &[&str]) -> Option<PodRef> {
    let (qos, rest) = match rest.first().and_then(|l| qos_of(l)) {
        Some(q) => (q, &rest[1..]),
        None => ("guaranteed", rest),
    };
    let uid = rest.first()?.strip_prefix("pod")?;
    if !valid_uid(uid) {
        return None;
    }
    Some(PodRef { uid: uid.to_owned(), qos, container_id: rest.get(1).map(|s| s.to_string()) })
}

/// A UID as kubelet writes it: hex digits and dashes (or underscores), 32 hex digits in all.
fn valid_uid(uid: &str) -> bool {
    let hex = uid.chars().filter(char::is_ascii_hexdigit).count();
    hex == 32 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b6a8f2c-1d3e-4f5a-9b7c-2e4d6f8a0b1c";

    #[test]
    fn systemd_driver_burstable_container() {
        let p = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b6a8f2c_1d3e_4f5a_9b7c_2e4d6f8a0b1c.slice/cri-containerd-4f1e2d.scope";
        let want = PodRef { uid: UID.into(), qos: "burstable", container_id: Some("4f1e2d".into()) };
        assert_eq!(parse(p), Some(want));
    }

    #[test]
    fn systemd_driver_guaranteed_pod_and_besteffort_crio() {
        let p = format!("/kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(parse(&p), Some(PodRef { uid: UID.into(), qos: "guaranteed", container_id: None }));
        let p = format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-abc.scope",
            UID.replace('-', "_")
        );
        let got = parse(&p).unwrap();
        assert_eq!((got.qos, got.container_id.as_deref()), ("besteffort", Some("abc")));
    }

    #[test]
    fn cgroupfs_driver() {
        let p = format!("/kubepods/burstable/pod{UID}/9f8e7d");
        let want = PodRef { uid: UID.into(), qos: "burstable", container_id: Some("9f8e7d".into()) };
        assert_eq!(parse(&p), Some(want));
        let p = format!("/kubepods/pod{UID}");
        assert_eq!(parse(&p), Some(PodRef { uid: UID.into(), qos: "guaranteed", container_id: None }));
    }

    #[test]
    fn other_paths_name_no_pod() {
        for p in [
            "/",
            "",
            "/system.slice/kubelet.service",
            "/kubepods.slice",
            "/kubepods/burstable",
            "/kubepods/burstable/podnot-a-uid/1",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podxyz.slice",
            "/user.slice/kubepods-pod0b6a8f2c_1d3e_4f5a_9b7c_2e4d6f8a0b1c.slice",
        ] {
            assert_eq!(parse(p), None, "{p}");
        }
    }

    #[test]
    fn a_nested_kubepods_is_found_below_a_node_slice() {
        // kind and other nested nodes: the kubelet's hierarchy below the node's own cgroup.
        let p = format!("/kubelet.slice/kubelet-kubepods.slice/kubepods/besteffort/pod{UID}/c1");
        assert_eq!(parse(&p).map(|p| p.qos), Some("besteffort"));
    }
}
