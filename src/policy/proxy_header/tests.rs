use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
    match parse(buf) {
        Ok(Parsed::Complete { header, len }) => (header, len),
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

fn malformed(buf: &[u8]) {
    assert!(
        matches!(parse(buf), Err(HeaderError::Malformed(_))),
        "{:?}: {:?}",
        String::from_utf8_lossy(buf),
        parse(buf)
    );
}

/// A v2 header: command (0 LOCAL, 1 PROXY), family/transport byte, body.
fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x20 | cmd);
    h.push(fam);
    h.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
    h.extend(body);
    h
}

fn inet_body(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut b = src.to_vec();
    b.extend(dst);
    b.extend(sport.to_be_bytes());
    b.extend(dport.to_be_bytes());
    b
}

// ---------------------------------------------------------------------------------------------
// v1

#[test]
fn v1_tcp4_gives_the_source_and_the_header_length() {
    let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n";
    let mut buf = line.to_vec();
    buf.extend(b"\x16\x03\x01"); // the ClientHello that follows is not part of it
    assert_eq!(
        complete(&buf),
        (
            ProxyHeader::Proxied {
                source: addr("192.0.2.7:56324"),
                destination: addr("198.51.100.1:443"),
            },
            line.len()
        )
    );
}

#[test]
fn v1_tcp6_gives_the_source() {
    let (header, _) = complete(b"PROXY TCP6 2001:db8::7 2001:db8::1 4711 443\r\n");
    assert_eq!(
        header,
        ProxyHeader::Proxied {
            source: addr("[2001:db8::7]:4711"),
            destination: addr("[2001:db8::1]:443"),
        }
    );
}

#[test]
fn v1_unknown_keeps_the_peer_and_ignores_the_rest_of_the_line() {
    assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (ProxyHeader::Local, 15));
    let line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
    assert_eq!(complete(line), (ProxyHeader::Local, line.len()));
}

#[test]
fn v1_at_the_maximum_length_is_accepted() {
    // The specification's worst case: UNKNOWN with full-length TCP6 addresses and ports.
    let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let line = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
    assert_eq!(line.len(), V1_MAX_LEN);
    assert_eq!(complete(line.as_bytes()), (ProxyHeader::Local, V1_MAX_LEN));
    let line = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
    assert!(matches!(
        complete(line.as_bytes()).0,
        ProxyHeader::Proxied { .. }
    ));
}

#[test]
fn v1_truncated_is_incomplete_at_every_length() {
    let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n";
    for end in 0..line.len() {
        assert_eq!(
            parse(&line[..end]),
            Ok(Parsed::Incomplete),
            "{:?}",
            String::from_utf8_lossy(&line[..end])
        );
    }
}

#[test]
fn v1_over_long_line_is_refused_without_waiting_for_more() {
    let mut buf = b"PROXY TCP4 ".to_vec();
    buf.resize(V1_MAX_LEN, b'1');
    malformed(&buf);
    // CR as the 107th byte: the LF would be the 108th.
    let mut buf = b"PROXY UNKNOWN ".to_vec();
    buf.resize(V1_MAX_LEN - 1, b'x');
    buf.push(b'\r');
    malformed(&buf);
}

#[test]
fn v1_grammar_violations_are_malformed() {
    for line in [
        &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\n"[..], // LF without CR
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\rX",     // CR without LF
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",        // a field missing
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443 1\r\n",  // a field too many
        b"PROXY TCP4 192.0.2.7  198.51.100.1 56324 443\r\n",   // two spaces
        b"PROXY TCP4 2001:db8::7 198.51.100.1 56324 443\r\n",  // v6 address in TCP4
        b"PROXY TCP6 192.0.2.7 2001:db8::1 56324 443\r\n",     // v4 address in TCP6
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",    // port out of range
        b"PROXY TCP4 192.0.2.7 198.51.100.1 +80 443\r\n",      // signed port
        b"PROXY TCP4 192.0.2.7 198.51.100.1 080 443\r\n",      // leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 443\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 56324 443\r\n", // not a stream
        b"PROXY tcp4 192.0.2.7 198.51.100.1 56324 443\r\n", // case matters
        b"PROXY \r\n",
        b"PROXY TCP4 192.0.2.\xff 198.51.100.1 56324 443\r\n", // not UTF-8
    ] {
        malformed(line);
    }
}

// ---------------------------------------------------------------------------------------------
// v2

#[test]
fn v2_proxy_inet_gives_the_source_and_the_header_length() {
    let mut buf = v2(
        1,
        0x11,
        &inet_body([10, 1, 2, 3], [10, 9, 9, 9], 40000, 443),
    );
    let len = buf.len();
    buf.extend(b"\x16\x03\x01");
    assert_eq!(
        complete(&buf),
        (
            ProxyHeader::Proxied {
                source: addr("10.1.2.3:40000"),
                destination: addr("10.9.9.9:443"),
            },
            len
        )
    );
    assert_eq!(len, 28);
}

#[test]
fn v2_proxy_inet6_gives_the_source() {
    let src: Ipv6Addr = "fd00::7".parse().unwrap();
    let dst: Ipv6Addr = "fd00::1".parse().unwrap();
    let mut body = src.octets().to_vec();
    body.extend(dst.octets());
    body.extend(4711u16.to_be_bytes());
    body.extend(443u16.to_be_bytes());
    assert_eq!(
        complete(&v2(1, 0x21, &body)),
        (
            ProxyHeader::Proxied {
                source: addr("[fd00::7]:4711"),
                destination: addr("[fd00::1]:443"),
            },
            16 + 36
        )
    );
}

#[test]
fn v2_local_keeps_the_peer_whatever_the_family_and_body() {
    let body = inet_body([10, 1, 2, 3], [10, 9, 9, 9], 1, 2);
    assert_eq!(complete(&v2(0, 0x11, &body)), (ProxyHeader::Local, 28));
    assert_eq!(complete(&v2(0, 0x00, &[])), (ProxyHeader::Local, 16));
}

#[test]
fn v2_unspec_and_unix_keep_the_peer() {
    assert_eq!(complete(&v2(1, 0x00, &[])), (ProxyHeader::Local, 16));
    assert_eq!(complete(&v2(1, 0x31, &[0; 216])).0, ProxyHeader::Local);
}

#[test]
fn v2_tlvs_after_the_addresses_are_skipped() {
    let mut body = inet_body([10, 1, 2, 3], [10, 9, 9, 9], 40000, 443);
    // PP2_TYPE_ALPN "h2", PP2_TYPE_AUTHORITY "private.icr.io", and an unknown type 0xEE.
    body.extend([0x01, 0x00, 0x02]);
    body.extend(b"h2");
    body.extend([0x02, 0x00, 0x0e]);
    body.extend(b"private.icr.io");
    body.extend([0xee, 0x00, 0x00]);
    let header = v2(1, 0x11, &body);
    let (parsed, len) = complete(&header);
    assert_eq!(len, header.len());
    assert!(
        matches!(parsed, ProxyHeader::Proxied { source, .. } if source == addr("10.1.2.3:40000"))
    );
}

#[test]
fn v2_truncated_is_incomplete_at_every_length() {
    let mut body = inet_body([10, 1, 2, 3], [10, 9, 9, 9], 40000, 443);
    body.extend([0x01, 0x00, 0x02, b'h', b'2']);
    let header = v2(1, 0x11, &body);
    for end in 0..header.len() {
        assert_eq!(parse(&header[..end]), Ok(Parsed::Incomplete), "{end} bytes");
    }
}

#[test]
fn v2_bad_version_command_family_or_short_addresses_are_malformed() {
    let body = inet_body([10, 1, 2, 3], [10, 9, 9, 9], 1, 2);
    let mut wrong_version = v2(1, 0x11, &body);
    wrong_version[12] = 0x11;
    malformed(&wrong_version);
    malformed(&wrong_version[..13]); // refused as soon as the byte is there
    malformed(&v2(2, 0x11, &body)); // command 2
    for fam in [0x12, 0x22, 0x32, 0x01, 0x10, 0x41, 0xff] {
        malformed(&v2(1, fam, &body));
    }
    malformed(&v2(1, 0x11, &body[..11]));
    malformed(&v2(1, 0x21, &[0; 35]));
}

#[test]
fn v2_longest_length_is_read_to_its_end() {
    let mut body = inet_body([10, 1, 2, 3], [10, 9, 9, 9], 1, 2);
    body.resize(usize::from(u16::MAX), 0);
    let header = v2(1, 0x11, &body);
    assert_eq!(header.len(), V2_MAX_LEN);
    assert_eq!(complete(&header).1, V2_MAX_LEN);
    assert_eq!(parse(&header[..V2_MAX_LEN - 1]), Ok(Parsed::Incomplete));
}

// ---------------------------------------------------------------------------------------------
// Neither

#[test]
fn garbage_and_a_bare_tls_client_hello_are_missing_headers() {
    for buf in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n",
        b"PROXYTCP4",
        b"\r\n\r\n\0\r\nQUIX\n",
        b"\0",
    ] {
        assert_eq!(parse(buf), Err(HeaderError::Missing), "{buf:?}");
    }
    assert_eq!(parse(b""), Ok(Parsed::Incomplete));
}
