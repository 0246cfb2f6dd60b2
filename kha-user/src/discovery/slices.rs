//! EndpointSlices -> the masters they announce. Pure.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};

/// The port name the `kubernetes` service gives the apiservers' secure port.
pub const PORT_NAME: &str = "https";

/// The one EndpointSlice the apiservers' endpoint reconciler writes for the `kubernetes`
/// service, named like the service (it sets no `endpointslice.kubernetes.io/managed-by` label:
/// no controller owns it).
pub const APISERVER_SLICE: &str = "kubernetes";
/// The label a controller other than the apiservers' reconciler puts on the slices it owns.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// The slices that can speak for the apiservers. Anyone allowed to create an EndpointSlice in
/// `default` can label it `kubernetes.io/service-name=kubernetes`; only the reconciler's own
/// slice is taken, so such a slice can neither add masters nor push the real ones out. Every
/// other slice is named in a warning, since it is either a mistake or an attack.
pub fn apiserver_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> impl Iterator<Item = &'a EndpointSlice> {
    slices.into_iter().filter(|slice| {
        let name = slice.metadata.name.as_deref().unwrap_or("?");
        let managed_by = slice.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY));
        let ours = name == APISERVER_SLICE && managed_by.is_none();
        if !ours {
            log::warn!(
                "EndpointSlice {name} (managed by {}) claims the kubernetes service but is not the apiservers' own slice `{APISERVER_SLICE}`; ignored",
                managed_by.map_or("nobody", String::as_str)
            );
        }
        ours
    })
}

/// Every ready endpoint of `slices` as IP:PORT. An endpoint counts unless its conditions say
/// `ready: false` or `terminating: true` (an absent condition means ready, as the API says).
/// Its first address is taken (the API calls an endpoint's addresses fungible); the port is
/// the slice's TCP port named `https`, or its only TCP port. Slices of FQDN addresses, without
/// a usable port, and addresses that are not unicast IPs are skipped with a warning.
pub fn ready_endpoints<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> BTreeSet<SocketAddr> {
    let mut out = BTreeSet::new();
    for slice in slices {
        let name = slice.metadata.name.as_deref().unwrap_or("?");
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            log::warn!(
                "EndpointSlice {name}: address type {} is not an IP family; skipped",
                slice.address_type
            );
            continue;
        }
        let Some(port) = slice_port(slice.ports.as_deref().unwrap_or_default()) else {
            log::warn!(
                "EndpointSlice {name}: no TCP port named {PORT_NAME} (nor a single TCP port); skipped"
            );
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready) != Some(false);
            let terminating = conditions.and_then(|c| c.terminating) == Some(true);
            if !ready || terminating {
                continue;
            }
            let Some(first) = endpoint.addresses.first() else { continue };
            // Canonical first: `::ffff:227.0.2.12` is an IPv4 multicast address in disguise.
            match first.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
                Ok(ip) if unicast(ip) => {
                    out.insert(SocketAddr::new(ip, port));
                }
                _ => log::warn!("EndpointSlice {name}: `{first}` is not a unicast IP address; skipped"),
            }
        }
    }
    out
}

fn slice_port(ports: &[EndpointPort]) -> Option<u16> {
    let tcp: Vec<&EndpointPort> =
        ports.iter().filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP")).collect();
    let chosen = match tcp.iter().find(|p| p.name.as_deref() == Some(PORT_NAME)) {
        Some(p) => *p,
        None if tcp.len() == 1 => tcp[0],
        None => return None,
    };
    chosen.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

fn unicast(ip: IpAddr) -> bool {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    !(ip.is_unspecified() || ip.is_multicast() || broadcast)
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    use super::*;

    /// A slice of `family` with the given ports and endpoints `(address, ready, terminating)`.
    pub fn slice(
        name: &str,
        family: &str,
        ports: &[(Option<&str>, i32)],
        endpoints: &[(&str, Option<bool>, Option<bool>)],
    ) -> EndpointSlice {
        let mut s = EndpointSlice { address_type: family.into(), ..Default::default() };
        s.metadata.name = Some(name.into());
        s.ports = Some(
            ports
                .iter()
                .map(|(n, p)| EndpointPort {
                    name: n.map(Into::into),
                    port: Some(*p),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        );
        s.endpoints = endpoints
            .iter()
            .map(|(a, ready, terminating)| Endpoint {
                addresses: vec![a.to_string()],
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    terminating: *terminating,
                    serving: None,
                }),
                ..Default::default()
            })
            .collect();
        s
    }

    fn set(v: &[&str]) -> BTreeSet<SocketAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn ready_unknown_and_not_ready_and_terminating() {
        let s = slice(
            "kubernetes",
            "IPv4",
            &[(Some("https"), 6443)],
            &[
                ("192.0.2.11", Some(true), None),
                ("192.0.2.12", None, None),
                ("192.0.2.13", Some(false), None),
                ("192.0.2.14", Some(true), Some(true)),
                ("192.0.2.15", Some(false), Some(true)),
            ],
        );
        assert_eq!(ready_endpoints([&s]), set(&["192.0.2.11:6443", "192.0.2.12:6443"]));
        let mut no_conditions = s.clone();
        no_conditions.endpoints.iter_mut().for_each(|e| e.conditions = None);
        assert_eq!(ready_endpoints([&no_conditions]).len(), 5, "no conditions: ready");
    }

    #[test]
    fn ipv6_and_several_slices_merge() {
        let v4 = slice("kubernetes", "IPv4", &[(Some("https"), 6443)], &[("192.0.2.11", Some(true), None)]);
        let v6 = slice(
            "kubernetes-v6",
            "IPv6",
            &[(Some("https"), 6443)],
            &[("2001:db8::11", Some(true), None), ("::ffff:192.0.2.12", Some(true), None)],
        );
        let more =
            slice("kubernetes-x", "IPv4", &[(Some("https"), 6443)], &[("192.0.2.13", Some(true), None)]);
        assert_eq!(
            ready_endpoints([&v4, &v6, &more]),
            set(&["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443", "[2001:db8::11]:6443"]),
            "v4-mapped addresses become IPv4"
        );
    }

    #[test]
    fn only_the_apiservers_own_slice_speaks_for_them() {
        let real = slice("kubernetes", "IPv4", &[(Some("https"), 6443)], &[("192.0.2.11", Some(true), None)]);
        let forged =
            slice("kubernetes-x", "IPv4", &[(Some("https"), 6443)], &[("198.51.100.1", Some(true), None)]);
        let mut managed = real.clone();
        managed.metadata.labels =
            Some([(MANAGED_BY.to_string(), "someone".to_string())].into_iter().collect());
        let taken: Vec<_> = apiserver_slices([&real, &forged, &managed]).collect();
        assert_eq!(taken.len(), 1);
        assert_eq!(ready_endpoints(taken), set(&["192.0.2.11:6443"]));
    }

    /// Found by the fuzzer (`endpoint_slices`): a v4-mapped multicast address passed as an
    /// IPv6 unicast one, then the config refused it.
    #[test]
    fn a_v4_mapped_address_is_judged_as_the_ipv4_it_is() {
        let s = slice(
            "kubernetes",
            "IPv6",
            &[(Some("https"), 6443)],
            &[("::ffff:227.0.2.12", Some(true), None), ("::ffff:192.0.2.11", Some(true), None)],
        );
        assert_eq!(ready_endpoints([&s]), set(&["192.0.2.11:6443"]));
    }

    #[test]
    fn port_by_name_https_else_the_only_one() {
        let named = slice(
            "a",
            "IPv4",
            &[(Some("metrics"), 9000), (Some("https"), 8443)],
            &[("192.0.2.11", Some(true), None)],
        );
        assert_eq!(ready_endpoints([&named]), set(&["192.0.2.11:8443"]));
        let only = slice("b", "IPv4", &[(None, 6443)], &[("192.0.2.11", Some(true), None)]);
        assert_eq!(ready_endpoints([&only]), set(&["192.0.2.11:6443"]));
        let ambiguous =
            slice("c", "IPv4", &[(None, 6443), (Some("x"), 7443)], &[("192.0.2.11", Some(true), None)]);
        assert!(ready_endpoints([&ambiguous]).is_empty());
        let mut udp = only.clone();
        udp.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        assert!(ready_endpoints([&udp]).is_empty());
        let mut none = only.clone();
        none.ports = None;
        assert!(ready_endpoints([&none]).is_empty());
    }

    #[test]
    fn bad_addresses_and_fqdn_slices_are_skipped() {
        let s = slice(
            "a",
            "IPv4",
            &[(Some("https"), 6443)],
            &[("master-1", Some(true), None), ("0.0.0.0", Some(true), None), ("192.0.2.11", None, None)],
        );
        assert_eq!(ready_endpoints([&s]), set(&["192.0.2.11:6443"]));
        let fqdn = slice("b", "FQDN", &[(Some("https"), 6443)], &[("master-1.example", Some(true), None)]);
        assert!(ready_endpoints([&fqdn]).is_empty());
        let mut two = slice("c", "IPv4", &[(Some("https"), 6443)], &[("192.0.2.11", None, None)]);
        two.endpoints[0].addresses.push("192.0.2.99".into());
        assert_eq!(ready_endpoints([&two]), set(&["192.0.2.11:6443"]), "first address only");
    }
}
