//! Hosts in URLs (IPv6 in brackets) and the `--external-url` of an unmanaged LB.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use serde::Serialize;

use super::error::{KubesprayError, UrlProblem};

/// A host as a URL names it: an IP address, or a name (which kha never resolves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl Host {
    /// `localhost`: the table's `lc`, and `bip` for the default bind address.
    pub fn localhost() -> Self {
        Host::Name("localhost".into())
    }

    /// An inventory or variable value: an IP address (IPv6 with or without brackets) or a name.
    pub fn parse(value: &str) -> Self {
        let v = value.trim();
        let unbracketed = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(v);
        match unbracketed.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(v.to_owned()),
        }
    }

    /// The address the kernel sees: a v4-mapped IPv6 address is the IPv4 address.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(ip.to_canonical()),
            Host::Name(_) => None,
        }
    }

    pub fn url(&self, port: u16) -> String {
        format!("https://{self}:{port}")
    }
}

/// As in a URL or an `IP:PORT`: IPv6 in brackets.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl Serialize for Host {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `ext` of the table: an LB in front of the masters that kubespray knows nothing of
/// ("Externally load balanced VIP:port and FQDN, not managed by Kubespray").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalUrl {
    pub host: Host,
    /// `None`: the URL's default, 443.
    pub port: Option<u16>,
}

impl ExternalUrl {
    /// `https://HOST[:PORT][/]`, HOST an IP address (IPv6 in brackets) or a DNS name.
    pub fn parse(value: &str) -> Result<Self, KubesprayError> {
        let fail = |problem| KubesprayError::ExternalUrl { value: value.to_owned(), problem };
        let rest = value
            .strip_prefix("https://")
            .or_else(|| value.get(..8).filter(|p| p.eq_ignore_ascii_case("https://")).map(|_| &value[8..]))
            .ok_or(fail(UrlProblem::Scheme))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(fail(UrlProblem::Extra));
        }
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            let (v6, after) = inner.split_once(']').ok_or(fail(UrlProblem::BadV6))?;
            let ip: Ipv6Addr = v6.parse().map_err(|_| fail(UrlProblem::BadV6))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(fail(UrlProblem::BadPort))?),
            };
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            if authority.matches(':').count() > 1 {
                return Err(fail(UrlProblem::UnbracketedV6));
            }
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            if host.is_empty() {
                return Err(fail(UrlProblem::NoHost));
            }
            let host = match host.parse::<IpAddr>() {
                Ok(ip) => Host::Ip(ip),
                Err(_) if is_dns_name(host) => Host::Name(host.to_ascii_lowercase()),
                Err(_) => return Err(fail(UrlProblem::BadHost)),
            };
            (host, port)
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err(fail(UrlProblem::BadPort)),
            },
        };
        Ok(ExternalUrl { host, port })
    }
}

impl fmt::Display for ExternalUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "https://{}:{port}", self.host),
            None => write!(f, "https://{}", self.host),
        }
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens; not all
/// numeric (that would be a mistyped IPv4 address).
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(label_ok)
        && !name.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_bracket_ipv6_only() {
        assert_eq!(Host::parse("2001:db8::11").url(6443), "https://[2001:db8::11]:6443");
        assert_eq!(Host::parse("[2001:db8::11]").url(6443), "https://[2001:db8::11]:6443");
        assert_eq!(Host::parse("192.0.2.11").url(6443), "https://192.0.2.11:6443");
        assert_eq!(Host::parse("master-1.example.com").url(6443), "https://master-1.example.com:6443");
        assert_eq!(Host::parse("::ffff:192.0.2.11").ip(), Some("192.0.2.11".parse().unwrap()));
    }

    #[test]
    fn external_urls_are_parsed_and_normalised() {
        let ok = |v: &str| ExternalUrl::parse(v).unwrap().to_string();
        assert_eq!(ok("https://api.example.com:8383"), "https://api.example.com:8383");
        assert_eq!(ok("https://API.example.com/"), "https://api.example.com");
        assert_eq!(ok("https://203.0.113.10:8383"), "https://203.0.113.10:8383");
        assert_eq!(ok("https://[2001:db8::10]:8383"), "https://[2001:db8::10]:8383");
        assert_eq!(ok("HTTPS://[2001:db8::10]"), "https://[2001:db8::10]");
    }

    #[test]
    fn bad_external_urls_say_why() {
        let cases = [
            ("api.example.com:8383", UrlProblem::Scheme),
            ("http://api.example.com", UrlProblem::Scheme),
            ("https://", UrlProblem::NoHost),
            ("https://:8383", UrlProblem::NoHost),
            ("https://2001:db8::10", UrlProblem::UnbracketedV6),
            ("https://[2001:db8::zz]:1", UrlProblem::BadV6),
            ("https://[2001:db8::10]x", UrlProblem::BadPort),
            ("https://api_example.com", UrlProblem::BadHost),
            ("https://10.0.0.300", UrlProblem::BadHost),
            ("https://api.example.com:0", UrlProblem::BadPort),
            ("https://api.example.com:65536", UrlProblem::BadPort),
            ("https://api.example.com:+80", UrlProblem::BadPort),
            ("https://api.example.com/readyz", UrlProblem::Extra),
            ("https://user@api.example.com", UrlProblem::Extra),
        ];
        for (value, want) in cases {
            match ExternalUrl::parse(value) {
                Err(KubesprayError::ExternalUrl { problem, .. }) => assert_eq!(problem, want, "{value}"),
                other => panic!("{value}: {other:?}"),
            }
        }
        let e = ExternalUrl::parse("https://2001:db8::10").unwrap_err().to_string();
        assert!(e.contains("--external-url `https://2001:db8::10`") && e.contains("brackets"), "{e}");
    }
}
