//! The PROXY protocol header (HAProxy's "PROXY protocol" specification, versions 1 and 2): what
//! an L4 load balancer writes before the client's bytes to say whom it accepted the connection
//! from.
//!
//! Owns: parsing the header from the first bytes of a connection. Pure: no I/O, no Pingora; the
//! listener glue (`listen/proxy_protocol.rs`) reads the bytes, decides whether the peer may send
//! a header at all (`server.trusted_proxies`), and calls [`parse`] until it has an answer. Must
//! never: panic or read past its input on any bytes (a proptest feeds it garbage), or accept a
//! header it only half understands: anything that is not exactly a header is an error, and the
//! connection is closed.
//!
//! What the header means here: [`ProxyHeader::Proxied`] carries the client's address, which
//! replaces the TCP peer as the source; [`ProxyHeader::Local`] (v2 `LOCAL`, v2 family `UNSPEC`
//! or `AF_UNIX`, v1 `UNKNOWN`) keeps the TCP peer, as the specification asks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, CRLF included (specification section 2.1).
pub const V1_MAX_LEN: usize = 107;

/// The first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The fixed part of a v2 header: signature, version/command, family/transport, length.
pub const V2_FIXED_LEN: usize = 16;

/// The longest v2 header: the fixed part and a 16-bit length of addresses and TLVs.
pub const V2_MAX_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection's source as the proxy saw it: the client.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No address to take: keep the TCP peer (health checks, unknown or unix families).
    Local,
}

/// The result of looking at the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes; the bytes after it belong to the client's stream.
    Complete { header: ProxyHeader, len: usize },
    /// So far a valid beginning: read more bytes and ask again.
    Incomplete,
}

/// Why the bytes are not a usable header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The stream does not start with either version's signature (e.g. a TLS ClientHello).
    #[error("no PROXY protocol header")]
    Missing,
    /// It starts like a header but breaks the grammar; the text says where.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

impl HeaderError {
    /// A metric label from a fixed list.
    pub fn label(self) -> &'static str {
        match self {
            HeaderError::Missing => "missing",
            HeaderError::Malformed(_) => "malformed",
        }
    }
}

/// Looks at the first bytes of a connection. `Ok(Incomplete)` only while `buf` is a proper
/// prefix of some valid header, so a caller that reads until it gets another answer reads at
/// most [`V1_MAX_LEN`] or [`V2_MAX_LEN`] bytes.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    const V1_SIGNATURE: &[u8] = b"PROXY ";
    if buf.starts_with(&V2_SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(V1_SIGNATURE) {
        parse_v1(buf)
    } else if V2_SIGNATURE.starts_with(buf) || V1_SIGNATURE.starts_with(buf) {
        Ok(Parsed::Incomplete)
    } else {
        Err(HeaderError::Missing)
    }
}

// ---------------------------------------------------------------------------------------------
// Version 1: "PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.len() == V1_MAX_LEN {
            return Err(HeaderError::Malformed("v1 line longer than 107 bytes"));
        }
        if window.contains(&b'\n') {
            return Err(HeaderError::Malformed("v1 line ends without CR"));
        }
        return Ok(Parsed::Incomplete);
    };
    match window.get(cr + 1) {
        None if cr + 1 < V1_MAX_LEN => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        _ => return Err(HeaderError::Malformed("v1 line does not end in CRLF")),
    }
    let line = std::str::from_utf8(&window[..cr])
        .map_err(|_| HeaderError::Malformed("v1 line is not ASCII"))?;
    let header = v1_fields(line)?;
    Ok(Parsed::Complete {
        header,
        len: cr + 2,
    })
}

fn v1_fields(line: &str) -> Result<ProxyHeader, HeaderError> {
    let mut fields = line.split(' ');
    fields.next(); // "PROXY", checked by the caller
    let proto = fields.next().unwrap_or("");
    if proto == "UNKNOWN" {
        // Section 2.1: the rest of the line up to CRLF is to be ignored.
        return Ok(ProxyHeader::Local);
    }
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(HeaderError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let rest: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = rest[..] else {
        return Err(HeaderError::Malformed(
            "v1 line needs exactly: source, destination, source port, destination port",
        ));
    };
    let ip = |s: &str| -> Result<IpAddr, HeaderError> {
        let ip = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        ip.map_err(|_| HeaderError::Malformed("v1 address does not match the protocol"))
    };
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(ip(src)?, v1_port(sport)?),
        destination: SocketAddr::new(ip(dst)?, v1_port(dport)?),
    })
}

/// 0..=65535 in decimal without a sign or leading zeros (a lone "0" is fine).
fn v1_port(s: &str) -> Result<u16, HeaderError> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(HeaderError::Malformed("v1 port is not a decimal number"));
    }
    s.parse()
        .map_err(|_| HeaderError::Malformed("v1 port above 65535"))
}

// ---------------------------------------------------------------------------------------------
// Version 2: signature, ver/cmd, family/transport, length (big-endian), addresses, TLVs

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < V2_FIXED_LEN {
        // The signature is complete; check what we have of the next bytes early.
        if let Some(&ver_cmd) = buf.get(12) {
            v2_command(ver_cmd)?;
        }
        if let Some(&fam) = buf.get(13) {
            v2_family(fam)?;
        }
        return Ok(Parsed::Incomplete);
    }
    let local = v2_command(buf[12])?;
    let family = v2_family(buf[13])?;
    let body_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = V2_FIXED_LEN + body_len;
    let Some(body) = buf.get(V2_FIXED_LEN..len) else {
        return Ok(Parsed::Incomplete);
    };
    if local {
        // Section 2.2: LOCAL keeps the real connection endpoints, whatever the family says.
        return Ok(Parsed::Complete {
            header: ProxyHeader::Local,
            len,
        });
    }
    let header = match family {
        Family::Unspec | Family::Unix => ProxyHeader::Local,
        Family::Inet => {
            let a: &[u8; 12] = body
                .get(..12)
                .and_then(|a| a.try_into().ok())
                .ok_or(HeaderError::Malformed("v2 INET length below 12"))?;
            let ip = |o: usize| IpAddr::from([a[o], a[o + 1], a[o + 2], a[o + 3]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), u16::from_be_bytes([a[8], a[9]])),
                destination: SocketAddr::new(ip(4), u16::from_be_bytes([a[10], a[11]])),
            }
        }
        Family::Inet6 => {
            let a: &[u8; 36] = body
                .get(..36)
                .and_then(|a| a.try_into().ok())
                .ok_or(HeaderError::Malformed("v2 INET6 length below 36"))?;
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[o..o + 16]);
                IpAddr::from(octets)
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), u16::from_be_bytes([a[32], a[33]])),
                destination: SocketAddr::new(ip(16), u16::from_be_bytes([a[34], a[35]])),
            }
        }
    };
    // TLVs after the addresses (ALPN, authority, CRC32C, cloud-specific ids) are skipped.
    Ok(Parsed::Complete { header, len })
}

/// `true` for LOCAL, `false` for PROXY.
fn v2_command(ver_cmd: u8) -> Result<bool, HeaderError> {
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::Malformed("v2 version is not 2"));
    }
    match ver_cmd & 0x0f {
        0 => Ok(true),
        1 => Ok(false),
        _ => Err(HeaderError::Malformed(
            "v2 command is neither LOCAL nor PROXY",
        )),
    }
}

#[derive(Debug, Clone, Copy)]
enum Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

/// The family of the 0x00, 0x11, 0x21, 0x31 bytes. Section 2.2 says every other value must be
/// rejected; the datagram ones (0x12, 0x22, 0x32) are valid there but cannot describe the
/// stream a TLS listener accepted, so they are refused too.
fn v2_family(fam: u8) -> Result<Family, HeaderError> {
    match fam {
        0x00 => Ok(Family::Unspec),
        0x11 => Ok(Family::Inet),
        0x21 => Ok(Family::Inet6),
        0x31 => Ok(Family::Unix),
        _ => Err(HeaderError::Malformed(
            "v2 family/transport is not UNSPEC or a stream over INET, INET6 or UNIX",
        )),
    }
}

#[cfg(test)]
mod tests;
