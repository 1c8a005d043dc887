//! The client's source address (issue 5, item 6): the TCP peer, or what trusted proxies say.
//!
//! Owns: `server.trusted_proxies` and the reading of `X-Forwarded-For` and `Forwarded`
//! (RFC 7239). Must never: believe a forwarding header from a peer outside `trusted_proxies`,
//! or take an address that a client could have written into the header itself.
//!
//! The walk: start at the peer. If it is a trusted proxy, read the hops of the forwarding header
//! right to left (each proxy appends the address it received the request from). Skip hops that
//! are themselves trusted proxies; the first untrusted hop is the client. Everything to its left
//! was written by the client and is ignored. If every hop is trusted, the left-most is the
//! client (it connected from a proxy's network). A malformed, obfuscated (`_hidden`) or
//! `unknown` hop reached before an untrusted one ends the walk at the peer: nothing behind it
//! can be attributed.
//!
//! Which header: `X-Forwarded-For` when the request has one, else `Forwarded`. Proxies append
//! to the header they manage and pass others through untouched, so a header the proxy does not
//! manage is entirely client-written. Nearly all proxies (nginx, HAProxy, Envoy, cloud load
//! balancers) manage `X-Forwarded-For`; when the proxy writes it, a client-sent `Forwarded` is
//! never read. Behind a proxy that writes only `Forwarded`, a client could add an
//! `X-Forwarded-For` of its own: such a proxy must strip it (or pullgate would need a
//! `server.forwarded_header` key naming the header; not built).

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

use super::zone::canonical_net;

/// The peers whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn new(nets: &[IpNet]) -> TrustedProxies {
        TrustedProxies {
            nets: nets.iter().map(|n| canonical_net(*n)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Is `ip` (IPv4-mapped IPv6 read as IPv4) a trusted proxy?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client's address. `x_forwarded_for` and `forwarded` are the values of every header
    /// line of that name, in the order received (several lines of one header read as one
    /// comma-separated list, RFC 9110 section 5.3). Mapped IPv6 results come back as IPv4.
    pub fn client_addr(
        &self,
        peer: IpAddr,
        x_forwarded_for: &[&str],
        forwarded: &[&str],
    ) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            // Spoofing guard: an untrusted peer's headers are never read.
            return peer;
        }
        let use_xff = x_forwarded_for.iter().any(|v| !v.trim().is_empty());
        let hops: Vec<Option<IpAddr>> = if use_xff {
            list_items(x_forwarded_for).map(parse_node).collect()
        } else {
            forwarded_for_hops(forwarded)
        };
        self.walk(peer, &hops)
    }

    fn walk(&self, peer: IpAddr, hops: &[Option<IpAddr>]) -> IpAddr {
        let mut leftmost_trusted = None;
        for hop in hops.iter().rev() {
            let Some(ip) = hop.map(|ip| ip.to_canonical()) else {
                return peer;
            };
            if !self.contains(ip) {
                return ip;
            }
            leftmost_trusted = Some(ip);
        }
        leftmost_trusted.unwrap_or(peer)
    }
}

/// The items of a comma-separated header list, trimmed, empty items dropped.
fn list_items<'a>(values: &'a [&'a str]) -> impl Iterator<Item = &'a str> + 'a {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A node as proxies write it: `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711`. `None` for anything else (`unknown`, `_hidden`, garbage).
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']')?;
        if !tail.is_empty() && !tail.strip_prefix(':').is_some_and(is_port) {
            return None;
        }
        return addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // IPv4 with a port; an IPv6 address with a port must be bracketed.
    let (addr, port) = s.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A port or an obfuscated port (RFC 7239 section 6.3: `_` followed by token characters).
fn is_port(p: &str) -> bool {
    let b = p.as_bytes();
    !b.is_empty()
        && (b.iter().all(u8::is_ascii_digit)
            || (b[0] == b'_'
                && b[1..]
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))))
}

/// The `for=` node of every `Forwarded` element, left to right; `None` for an element without
/// exactly one usable `for=`, or with a parameter that is not `key=value`.
fn forwarded_for_hops(values: &[&str]) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for value in values {
        for element in split_unquoted(value, b',') {
            if element.trim().is_empty() {
                continue;
            }
            let mut node = None;
            let mut fors = 0;
            let mut well_formed = true;
            for pair in split_unquoted(element, b';') {
                if pair.trim().is_empty() {
                    continue;
                }
                let Some((key, val)) = pair.split_once('=') else {
                    well_formed = false;
                    continue;
                };
                if key.trim().eq_ignore_ascii_case("for") {
                    fors += 1;
                    node = unquote(val.trim()).and_then(|v| parse_node(&v));
                }
            }
            hops.push(if fors == 1 && well_formed { node } else { None });
        }
    }
    hops
}

/// Splits at `sep` outside double-quoted strings (which may hold `\`-escapes).
fn split_unquoted(s: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in s.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A token or a quoted-string's content; `None` for an unterminated quote.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        return Some(v.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next()? } else { c });
    }
    Some(out)
}

#[cfg(test)]
mod tests;
