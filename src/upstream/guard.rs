//! Where pullgate may connect: the SSRF guard for redirects and token realms.
//!
//! Invariant 8: a redirect (or realm) that points at a loopback, private or link-local address is
//! refused unless the upstream itself lives on that kind of address; unspecified, multicast and
//! reserved addresses are always refused. The check runs on IP literals in URLs and, through
//! `GuardedResolver`, on every address a host name resolves to, right before reqwest dials it,
//! so a DNS answer cannot slip a private address past it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

/// Starts every error the resolver returns for a refused host, so callers can tell a refusal
/// from a failed lookup.
pub const REFUSAL: &str = "refusing to connect to";

/// What kind of network an address belongs to, as far as SSRF is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    Public,
    Loopback,
    /// RFC 1918, shared address space (RFC 6598), unique local IPv6.
    Private,
    LinkLocal,
    /// Unspecified, multicast, broadcast, reserved: never a dial target.
    Forbidden,
}

pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 || ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        AddrClass::Forbidden
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_link_local() {
        AddrClass::LinkLocal
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let first = ip.segments()[0];
    if ip.is_unspecified() || ip.is_multicast() {
        AddrClass::Forbidden
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if (first & 0xffc0) == 0xfe80 {
        AddrClass::LinkLocal
    } else if (first & 0xfe00) == 0xfc00 {
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

/// The address classes this registry may reach besides public ones: those its upstream lives on.
#[derive(Debug, Default)]
pub struct AddressGuard {
    upstream_host: String,
    allowed: RwLock<HashSet<AddrClass>>,
}

impl AddressGuard {
    /// `upstream_host` is the registry's host (IP literal or name). An IP literal's class is
    /// allowed at once; a name's classes are learned when it is first resolved.
    pub fn new(upstream_host: &str) -> Self {
        let guard = AddressGuard {
            upstream_host: upstream_host.to_ascii_lowercase(),
            allowed: RwLock::new(HashSet::new()),
        };
        if let Ok(ip) = upstream_host.parse::<IpAddr>() {
            guard.learn_upstream(&[ip]);
        } else if upstream_host.eq_ignore_ascii_case("localhost") {
            guard.learn_upstream(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        }
        guard
    }

    fn learn_upstream(&self, ips: &[IpAddr]) {
        let mut allowed = self.allowed.write().unwrap_or_else(|e| e.into_inner());
        for ip in ips {
            match classify(*ip) {
                AddrClass::Public | AddrClass::Forbidden => {}
                class => {
                    allowed.insert(class);
                }
            }
        }
    }

    /// May pullgate connect to `ip`?
    pub fn allows(&self, ip: IpAddr) -> bool {
        match classify(ip) {
            AddrClass::Public => true,
            AddrClass::Forbidden => false,
            class => self
                .allowed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&class),
        }
    }

    /// Keep the addresses of `host` pullgate may dial. The upstream host itself is always kept
    /// (and teaches the guard which private classes are the upstream's own).
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        if host.eq_ignore_ascii_case(&self.upstream_host) {
            let ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
            self.learn_upstream(&ips);
            return addrs;
        }
        addrs.into_iter().filter(|a| self.allows(a.ip())).collect()
    }
}

/// A reqwest DNS resolver that applies the guard to every resolved address.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<AddressGuard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = guard.filter(&host, found);
            if kept.is_empty() {
                let msg = format!("{REFUSAL} {host}: it resolves only to loopback, private, link-local or reserved addresses");
                return Err(msg.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_addresses() {
        let cases = [
            ("8.8.8.8", AddrClass::Public),
            ("2001:db8::1", AddrClass::Public),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.9.9.9", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Private),
            ("fd00::1", AddrClass::Private),
            ("::ffff:10.0.0.1", AddrClass::Private),
            ("169.254.169.254", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("0.0.0.0", AddrClass::Forbidden),
            ("0.1.2.3", AddrClass::Forbidden),
            ("::", AddrClass::Forbidden),
            ("224.0.0.1", AddrClass::Forbidden),
            ("255.255.255.255", AddrClass::Forbidden),
            ("ff02::1", AddrClass::Forbidden),
        ];
        for (addr, class) in cases {
            assert_eq!(classify(ip(addr)), class, "{addr}");
        }
    }

    #[test]
    fn public_upstream_may_reach_only_public_addresses() {
        let guard = AddressGuard::new("registry.example.com");
        assert!(guard.allows(ip("93.184.216.34")));
        for bad in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "fd00::1",
        ] {
            assert!(!guard.allows(ip(bad)), "{bad}");
        }
    }

    #[test]
    fn loopback_upstream_may_reach_loopback_but_not_private_or_unspecified() {
        let guard = AddressGuard::new("127.0.0.1");
        assert!(guard.allows(ip("127.0.0.1")));
        assert!(guard.allows(ip("::1")));
        assert!(!guard.allows(ip("10.0.0.1")));
        assert!(!guard.allows(ip("169.254.169.254")));
        assert!(!guard.allows(ip("0.0.0.0")));
    }

    #[test]
    fn upstream_name_teaches_the_guard_its_class() {
        let guard = AddressGuard::new("registry.internal");
        assert!(!guard.allows(ip("10.0.0.9")));
        let kept = guard.filter("registry.internal", vec!["10.0.0.5:443".parse().unwrap()]);
        assert_eq!(kept.len(), 1);
        assert!(guard.allows(ip("10.0.0.9")));
        let other = guard.filter(
            "evil.example",
            vec![
                "169.254.169.254:80".parse().unwrap(),
                "1.2.3.4:80".parse().unwrap(),
            ],
        );
        assert_eq!(other, vec!["1.2.3.4:80".parse::<SocketAddr>().unwrap()]);
    }
}
