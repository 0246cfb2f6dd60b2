use super::*;

fn d() -> FrontendDefaults {
    FrontendDefaults::default()
}

/// `Config::from_toml` with the default frontend settings.
fn toml(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, &d())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn sa(v: &str) -> SocketAddr {
    v.parse().unwrap()
}

#[test]
fn flags_default_to_both_localhost_frontends() {
    let c = Config::from_flags(&[], &s(&["192.0.2.11:6443", "192.0.2.12:6443"]), &d()).unwrap();
    assert_eq!(c.frontends.len(), 2);
    assert_eq!(c.frontends[0].address, sa("127.0.0.1:6443"));
    assert_eq!(c.frontends[1].address, sa("[::1]:6443"));
    assert_eq!(c.frontends[1].backends, vec![sa("192.0.2.11:6443"), sa("192.0.2.12:6443")]);
}

#[test]
fn flags_without_backends_are_refused() {
    assert!(matches!(Config::from_flags(&[], &[], &d()), Err(ConfigError::NoBackends)));
}

#[test]
fn file_with_several_frontends_each_with_its_own_set() {
    let c = toml(
        r#"
        [[frontend]]
        address = "127.0.0.1:6443"
        backends = ["192.0.2.11:6443", "192.0.2.12:6443"]
        [[frontend]]
        address = "[::1]:2379"
        backends = ["[2001:db8::11]:2379", "192.0.2.11:2379"]
        [[frontend]]
        address = "127.0.0.1:7443"
        "#,
    )
    .unwrap();
    assert_eq!(c.frontends.len(), 3);
    assert_eq!(c.frontends[1].backends[0], sa("[2001:db8::11]:2379"));
    assert!(c.frontends[2].backends.is_empty(), "an empty set is allowed: connects fail fast");
    assert_eq!(c.ca_file, None);
    let c = toml("ca_file = \"/etc/kubernetes/ssl/ca.crt\"\n[[frontend]]\naddress = \"127.0.0.1:6443\"\n")
        .unwrap();
    assert_eq!(c.ca_file.as_deref(), Some(Path::new("/etc/kubernetes/ssl/ca.crt")));
}

#[test]
fn unparsable_address_names_the_field() {
    let e =
        toml("[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"192.0.2.300:6443\"]\n").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::Address { .. }));
    assert!(msg.contains("frontend[0].backends[0]") && msg.contains("192.0.2.300:6443"), "{msg}");
}

#[test]
fn names_are_not_addresses() {
    let e = Config::from_flags(&[], &s(&["master-1:6443"]), &d()).unwrap_err();
    assert!(matches!(e, ConfigError::Address { .. }), "{e}");
}

#[test]
fn port_zero_is_refused() {
    let e = Config::from_flags(&s(&["127.0.0.1:0"]), &s(&["192.0.2.11:6443"]), &d()).unwrap_err();
    assert!(matches!(e, ConfigError::PortZero { .. }), "{e}");
    let e = Config::from_flags(&[], &s(&["192.0.2.11:0"]), &d()).unwrap_err();
    assert!(matches!(e, ConfigError::PortZero { ref field, .. } if field == "--backend"), "{e}");
}

#[test]
fn backend_equal_to_a_frontend_is_refused() {
    let e = Config::from_flags(&s(&["127.0.0.1:6443"]), &s(&["127.0.0.1:6443"]), &d()).unwrap_err();
    assert!(matches!(e, ConfigError::BackendIsFrontend { .. }), "{e}");
}

#[test]
fn v4_mapped_backend_equal_to_a_v4_frontend_is_refused() {
    let e = Config::from_flags(&s(&["127.0.0.1:6443"]), &s(&["[::ffff:127.0.0.1]:6443"]), &d()).unwrap_err();
    assert!(matches!(e, ConfigError::BackendIsFrontend { .. }), "{e}");
}

#[test]
fn duplicates_are_refused() {
    let e = Config::from_flags(&[], &s(&["192.0.2.11:6443", "192.0.2.11:6443"]), &d()).unwrap_err();
    assert!(matches!(e, ConfigError::Duplicate { .. }), "{e}");
    let e = Config::from_flags(
        &s(&["127.0.0.1:6443", "[::ffff:127.0.0.1]:6443"]),
        &s(&["192.0.2.11:6443"]),
        &d(),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Duplicate { .. }), "{e}");
}

#[test]
fn v6_backend_for_v4_frontend_is_refused() {
    let e = Config::from_flags(&[], &s(&["[2001:db8::11]:6443"]), &d()).unwrap_err();
    assert!(matches!(e, ConfigError::V6BackendForV4Frontend { .. }), "{e}");
    // An IPv6 frontend takes both families: IPv4 through v4-mapped addresses.
    Config::from_flags(&s(&["[::1]:6443"]), &s(&["[2001:db8::11]:6443", "192.0.2.11:6443"]), &d()).unwrap();
}

#[test]
fn unspecified_and_multicast_are_refused() {
    for bad in ["0.0.0.0:6443", "[::]:6443", "224.0.0.1:6443", "255.255.255.255:6443"] {
        let e = Config::from_flags(&[], &s(&[bad]), &d()).unwrap_err();
        assert!(matches!(e, ConfigError::NotUnicast { .. }), "{bad}: {e}");
    }
}

#[test]
fn unknown_keys_and_bad_toml_are_refused() {
    let e = toml("[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackend = []\n").unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    assert!(e.to_string().contains("unknown field"), "{e}");
    assert!(matches!(toml("[[frontend]\n"), Err(ConfigError::Parse { .. })));
    assert!(matches!(toml(""), Err(ConfigError::NoFrontends)));
}

#[test]
fn limits_are_enforced() {
    let many: Vec<String> = (0..=MAX_BACKENDS_PER_FRONTEND).map(|i| format!("192.0.2.1:{}", i + 1)).collect();
    let e = Config::from_flags(&s(&["127.0.0.1:6443"]), &many, &d()).unwrap_err();
    assert!(matches!(e, ConfigError::TooManyBackends { .. }), "{e}");
}

#[test]
fn policy_and_health_path_per_frontend_with_defaults() {
    let c = toml(
        "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"192.0.2.11:6443\"]\n\
         [[frontend]]\naddress = \"127.0.0.1:2379\"\nbackends = [\"192.0.2.11:2379\"]\npolicy = \"p2c\"\nhealth_path = \"/health\"\n",
    )
    .unwrap();
    assert_eq!(
        (c.frontends[0].policy, c.frontends[0].health_path.as_str()),
        (Policy::LeastConnections, "/readyz")
    );
    assert_eq!((c.frontends[1].policy, c.frontends[1].health_path.as_str()), (Policy::P2c, "/health"));
    let e = toml("[[frontend]]\naddress = \"127.0.0.1:6443\"\npolicy = \"fastest\"\n").unwrap_err();
    assert!(e.to_string().contains("frontend[0].policy: unknown policy `fastest`"), "{e}");
    let e = toml("[[frontend]]\naddress = \"127.0.0.1:6443\"\nhealth_path = \"readyz now\"\n").unwrap_err();
    assert!(matches!(e, ConfigError::HealthPath { .. }), "{e}");
    let c = toml(
        "[[frontend]]\naddress = \"127.0.0.1:2379\"\nca_file = \"/etc/ssl/etcd/ssl/ca.pem\"\n\
         client_cert = \"/etc/ssl/etcd/ssl/node-n1.pem\"\nclient_key = \"/etc/ssl/etcd/ssl/node-n1-key.pem\"\n",
    )
    .unwrap();
    assert_eq!(c.frontends[0].probe_tls.ca_file.as_deref(), Some(Path::new("/etc/ssl/etcd/ssl/ca.pem")));
    let e = toml("[[frontend]]\naddress = \"127.0.0.1:2379\"\nclient_cert = \"/x.pem\"\n").unwrap_err();
    assert!(matches!(e, ConfigError::ClientCertPair { .. }), "{e}");
    for (i, name) in kha_common::POLICY_NAMES.iter().enumerate() {
        let p = Policy::parse("policy", name).unwrap();
        assert_eq!(p.code(), i as u8);
        // `--policy` takes the same names.
        assert_eq!(clap::ValueEnum::to_possible_value(&p).unwrap().get_name(), *name);
    }
}

#[test]
fn discover_is_per_frontend_and_off_by_default() {
    let c = toml(
        "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"192.0.2.11:6443\"]\ndiscover = true\n\
         [[frontend]]\naddress = \"127.0.0.1:2379\"\n",
    )
    .unwrap();
    assert_eq!((c.frontends[0].discover, c.frontends[1].discover), (true, false));
    assert!(!Config::from_flags(&[], &s(&["192.0.2.11:6443"]), &d()).unwrap().frontends[0].discover);
    let e = toml("[[frontend]]\naddress = \"127.0.0.1:6443\"\ndiscover = \"yes\"\n").unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
}

#[test]
fn fleet_size_is_optional_and_never_zero() {
    let fe = "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"192.0.2.11:6443\"]\n";
    assert_eq!(toml(fe).unwrap().fleet_size, None);
    assert_eq!(toml(&format!("fleet_size = 5000\n{fe}")).unwrap().fleet_size, Some(5000));
    assert!(matches!(toml(&format!("fleet_size = 0\n{fe}")), Err(ConfigError::FleetSizeZero)));
    assert!(matches!(toml(&format!("fleet_size = -1\n{fe}")), Err(ConfigError::Parse { .. })));
}

#[test]
fn missing_file_names_the_path() {
    let e = Config::from_file(Path::new("/nonexistent/kha.toml"), &d()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/kha.toml"), "{e}");
}
