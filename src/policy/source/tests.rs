use std::net::{IpAddr, Ipv4Addr};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn proxies(nets: &[&str]) -> TrustedProxies {
    let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
    TrustedProxies::new(&nets)
}

/// 10.0.0.0/24 and fd00::/64 are the proxies.
fn trusted() -> TrustedProxies {
    proxies(&["10.0.0.0/24", "fd00::/64"])
}

fn xff(t: &TrustedProxies, peer: &str, values: &[&str]) -> IpAddr {
    t.client_addr(ip(peer), values, &[])
}

fn fwd(t: &TrustedProxies, peer: &str, values: &[&str]) -> IpAddr {
    t.client_addr(ip(peer), &[], values)
}

#[test]
fn untrusted_peer_headers_are_ignored() {
    let t = trusted();
    // A spoofed header straight from a client: the peer wins.
    assert_eq!(xff(&t, "203.0.113.9", &["10.1.2.3"]), ip("203.0.113.9"));
    assert_eq!(fwd(&t, "203.0.113.9", &["for=10.1.2.3"]), ip("203.0.113.9"));
    assert_eq!(xff(&t, "2001:db8::9", &["10.1.2.3"]), ip("2001:db8::9"));
    // No trusted proxies configured: never read.
    let none = TrustedProxies::default();
    assert!(none.is_empty());
    assert_eq!(xff(&none, "10.0.0.1", &["192.0.2.7"]), ip("10.0.0.1"));
}

#[test]
fn trusted_peer_right_most_untrusted_hop() {
    let t = trusted();
    assert_eq!(xff(&t, "10.0.0.1", &["192.0.2.7"]), ip("192.0.2.7"));
    // The client wrote "1.1.1.1" itself; the proxy appended what it saw.
    assert_eq!(
        xff(&t, "10.0.0.1", &["1.1.1.1, 192.0.2.7"]),
        ip("192.0.2.7")
    );
    // Chains of trusted proxies are skipped.
    assert_eq!(
        xff(&t, "10.0.0.1", &["1.1.1.1, 192.0.2.7, 10.0.0.5, 10.0.0.6"]),
        ip("192.0.2.7")
    );
    // Several header lines read as one list, in order.
    assert_eq!(
        xff(&t, "10.0.0.1", &["1.1.1.1", "192.0.2.7", "10.0.0.5"]),
        ip("192.0.2.7")
    );
    // Everyone in the chain is trusted: the left-most is the client.
    assert_eq!(xff(&t, "10.0.0.1", &["10.0.0.9, 10.0.0.5"]), ip("10.0.0.9"));
}

#[test]
fn a_spoofed_trusted_address_left_of_the_client_does_not_help() {
    let t = trusted();
    // A client claims to be a proxy: it sits left of its real address and is never reached.
    assert_eq!(
        xff(&t, "10.0.0.1", &["10.0.0.2, 203.0.113.9"]),
        ip("203.0.113.9")
    );
}

#[test]
fn no_header_or_empty_header_is_the_peer() {
    let t = trusted();
    assert_eq!(xff(&t, "10.0.0.1", &[]), ip("10.0.0.1"));
    assert_eq!(xff(&t, "10.0.0.1", &[""]), ip("10.0.0.1"));
    assert_eq!(xff(&t, "10.0.0.1", &[" , "]), ip("10.0.0.1"));
}

#[test]
fn malformed_hops_fall_back_to_the_peer() {
    let t = trusted();
    for bad in [
        "garbage",
        "unknown",
        "192.0.2.300",
        "192.0.2.7:",
        "192.0.2.7:abc",
        "[2001:db8::1",
        "[2001:db8::1]x",
        "[192.0.2.7]",
        "2001:db8::1]:80",
    ] {
        assert_eq!(xff(&t, "10.0.0.1", &[bad]), ip("10.0.0.1"), "{bad:?}");
        // Garbage behind a trusted hop is still garbage.
        let value = format!("{bad}, 10.0.0.5");
        assert_eq!(xff(&t, "10.0.0.1", &[&value]), ip("10.0.0.1"), "{value:?}");
    }
    // Garbage left of the client is never reached.
    assert_eq!(
        xff(&t, "10.0.0.1", &["garbage, 192.0.2.7"]),
        ip("192.0.2.7")
    );
}

#[test]
fn node_forms() {
    let t = trusted();
    for (value, want) in [
        ("192.0.2.7:4711", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("  192.0.2.7  ", "192.0.2.7"),
    ] {
        assert_eq!(xff(&t, "10.0.0.1", &[value]), ip(want), "{value:?}");
    }
}

#[test]
fn ipv6_proxies_and_mapped_addresses() {
    let t = trusted();
    assert_eq!(xff(&t, "fd00::1", &["2001:db8::7"]), ip("2001:db8::7"));
    // A dual-stack socket reports an IPv4 proxy as a mapped address: still trusted.
    let mapped_peer = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
    assert!(t.contains(mapped_peer));
    assert_eq!(
        t.client_addr(mapped_peer, &["192.0.2.7"], &[]),
        ip("192.0.2.7")
    );
    // Mapped hops come back as IPv4, and mapped trusted hops are skipped.
    assert_eq!(
        xff(&t, "10.0.0.1", &["::ffff:192.0.2.7, ::ffff:10.0.0.5"]),
        ip("192.0.2.7")
    );
    // An untrusted mapped peer is returned as IPv4.
    let untrusted = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
    assert_eq!(t.client_addr(untrusted, &["1.1.1.1"], &[]), ip("192.0.2.9"));
    // Trusted proxies written the mapped way.
    let mapped_net = proxies(&["::ffff:10.0.0.0/120"]);
    assert!(mapped_net.contains(ip("10.0.0.77")));
}

#[test]
fn forwarded_header() {
    let t = trusted();
    assert_eq!(fwd(&t, "10.0.0.1", &["for=192.0.2.7"]), ip("192.0.2.7"));
    assert_eq!(
        fwd(
            &t,
            "10.0.0.1",
            &["for=1.1.1.1, for=192.0.2.60;proto=http;by=203.0.113.43, For=\"10.0.0.5\""]
        ),
        ip("192.0.2.60")
    );
    assert_eq!(
        fwd(&t, "10.0.0.1", &["for=\"[2001:db8:cafe::17]:4711\""]),
        ip("2001:db8:cafe::17")
    );
    assert_eq!(
        fwd(&t, "10.0.0.1", &["for=\"192.0.2.7:_port\""]),
        ip("192.0.2.7")
    );
    // Quoted commas and semicolons do not split.
    assert_eq!(
        fwd(&t, "10.0.0.1", &["proto=\"a,b;c\";for=192.0.2.7"]),
        ip("192.0.2.7")
    );
    // Several lines.
    assert_eq!(
        fwd(&t, "10.0.0.1", &["for=1.1.1.1", "for=192.0.2.7"]),
        ip("192.0.2.7")
    );
}

#[test]
fn forwarded_unusable_elements_fall_back_to_the_peer() {
    let t = trusted();
    for bad in [
        "for=unknown",
        "for=_hidden",
        "proto=https",
        "for=192.0.2.7;for=192.0.2.8",
        "for=\"192.0.2.7",
        "for=\"[2001:db8::1]\";for",
        "for=",
    ] {
        assert_eq!(fwd(&t, "10.0.0.1", &[bad]), ip("10.0.0.1"), "{bad:?}");
    }
    // An obfuscated node left of the client is never reached.
    assert_eq!(
        fwd(&t, "10.0.0.1", &["for=_x, for=192.0.2.7"]),
        ip("192.0.2.7")
    );
}

#[test]
fn x_forwarded_for_is_preferred_over_forwarded() {
    let t = trusted();
    // The proxy writes X-Forwarded-For; a client-written Forwarded is not read.
    assert_eq!(
        t.client_addr(ip("10.0.0.1"), &["192.0.2.7"], &["for=10.9.9.9"]),
        ip("192.0.2.7")
    );
    // An empty X-Forwarded-For does not count as present.
    assert_eq!(
        t.client_addr(ip("10.0.0.1"), &[""], &["for=192.0.2.8"]),
        ip("192.0.2.8")
    );
}

#[test]
fn parsing_helpers() {
    assert_eq!(split_unquoted("a,\"b,c\",d", b','), ["a", "\"b,c\"", "d"]);
    assert_eq!(split_unquoted("\"a\\\",b\",c", b','), ["\"a\\\",b\"", "c"]);
    assert_eq!(unquote("\"a\\\"b\"").as_deref(), Some("a\"b"));
    assert_eq!(unquote("plain").as_deref(), Some("plain"));
    assert_eq!(unquote("\"open"), None);
    assert!(is_port("80") && is_port("_abc-1") && !is_port("") && !is_port("8x"));
}
