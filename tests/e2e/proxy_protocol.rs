//! PROXY protocol on a TLS listener (`proxy_protocol = true`): a raw TCP client bound to a
//! trusted proxy's address (127.0.0.2) writes a v1 or v2 header claiming a client, then does
//! the TLS handshake with rustls over the same socket and sends one HTTP/1.1 request. The
//! claimed source, not the socket's, decides the zone and shows in the audit log; an untrusted
//! peer, a missing or malformed header, and a header that never completes get the connection
//! closed before TLS, each counted by reason.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{get, registry, Gateway, MANIFEST_ACCEPT};
use crate::support::{block_on, free_port, wait_until, Pki, TestImage, Upstream, UpstreamOptions};

const HOST: &str = "private.pp.test";
const TRUSTED: &str = "127.0.0.2";
const UNTRUSTED: &str = "127.0.0.3";
const PATH: &str = "/v2/team/app/manifests/v1";

/// An upstream with one image and pullgate with a `proxy_protocol` TLS listener; the registry
/// serves only the `vpc` zone (10.0.0.0/8, fd00::/8), which no loopback address is in.
struct Bed {
    _up: Upstream,
    certs: Pki,
    tls_port: u16,
    gw: Gateway,
}

fn start(seed: &str) -> Bed {
    let up = Upstream::start(UpstreamOptions::default());
    up.push(&TestImage::small(seed), "team/app:v1");
    let certs = Pki::new();
    let (cert, key) = certs.issue(&[HOST]);
    let tls_port = free_port();
    // 127.0.0.1 is trusted too, only so that the readiness probes (connections from it that
    // close at once) count as "closed" and leave the other reasons to the tests.
    let server = format!(
        "trusted_proxies = [\"127.0.0.1/32\", \"{TRUSTED}/32\"]\n\
         tls = [{{ listen = \"127.0.0.1:{tls_port}\", certs = [{{ cert = \"{}\", key = \"{}\" }}], proxy_protocol = true }}]",
        cert.display(),
        key.display()
    );
    let rest = format!(
        "[zones]\nvpc = [\"10.0.0.0/8\", \"fd00::/8\"]\n\n{}",
        registry(
            "ppreg",
            &up,
            &format!("hosts = [\"{HOST}\"]\nnetwork_access = \"selected\"\nzones = [\"vpc\"]")
        )
    );
    let gw = Gateway::start_full(&server, &rest, None, "");
    Bed {
        _up: up,
        certs,
        tls_port,
        gw,
    }
}

impl Bed {
    /// A TCP connection to the TLS listener from source address `from`.
    fn connect_from(&self, from: &str) -> TcpStream {
        let from: IpAddr = from.parse().expect("ip");
        let to = SocketAddr::from(([127, 0, 0, 1], self.tls_port));
        let tcp = block_on(async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(SocketAddr::new(from, 0)).expect("bind source");
            let stream = socket.connect(to).await.expect("connect");
            stream.into_std().expect("std stream")
        });
        tcp.set_nonblocking(false).expect("blocking");
        tcp.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        tcp
    }

    /// `prefix` (a PROXY header) and the ClientHello in one write, the handshake, then
    /// `GET PATH` over HTTP/1.1. The status, or Err when the connection failed.
    fn request(&self, from: &str, prefix: &[u8]) -> Result<u16, String> {
        crate::support::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.certs.ca_pem().as_bytes()) {
            roots.add(cert.expect("CA pem")).expect("CA");
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(HOST).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut tcp = self.connect_from(from);
        // Header and ClientHello together: the gateway reads past the header and must hand
        // the rest back to the handshake.
        let mut first = prefix.to_vec();
        conn.write_tls(&mut first).expect("client hello");
        tcp.write_all(&first).map_err(|e| format!("write: {e}"))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| format!("handshake: {e}"))?;
        }
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        write!(
            tls,
            "GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\nAccept: {MANIFEST_ACCEPT}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        if let Err(e) = tls.read_to_end(&mut raw) {
            // A server that closes without close_notify after the response is still an answer.
            if raw.is_empty() {
                return Err(format!("read: {e}"));
            }
        }
        let text = String::from_utf8_lossy(&raw);
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))
    }

    /// `pullgate_proxy_protocol_rejected_total{reason}` now.
    fn rejected(&self, reason: &str) -> u64 {
        let metrics = String::from_utf8(get(&self.gw.admin_url("/metrics")).body).expect("utf-8");
        let series = format!("pullgate_proxy_protocol_rejected_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.trim().parse().expect("a count"))
    }

    /// The audit line of the `n`-th request (0-based), once written.
    fn audit(&self, n: usize) -> serde_json::Value {
        wait_until(Duration::from_secs(5), "the audit line", || {
            self.gw.audit_lines().len() > n
        })
        .expect("audited");
        self.gw.audit_lines()[n].clone()
    }
}

fn v1(source: &str, port: u16) -> Vec<u8> {
    let proto = if source.contains(':') { "TCP6" } else { "TCP4" };
    let dest = if source.contains(':') {
        "fd00::1"
    } else {
        "10.0.0.1"
    };
    format!("PROXY {proto} {source} {dest} 40000 {port}\r\n").into_bytes()
}

/// A v2 header: `cmd` 0 LOCAL / 1 PROXY, the source and destination (same family), and an
/// ALPN TLV after the addresses.
fn v2(cmd: u8, source: IpAddr, destination: IpAddr) -> Vec<u8> {
    let mut body = Vec::new();
    let fam = match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend(s.octets());
            body.extend(d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            body.extend(s.octets());
            body.extend(d.octets());
            0x21
        }
        _ => panic!("one family"),
    };
    body.extend(40000u16.to_be_bytes());
    body.extend(443u16.to_be_bytes());
    body.extend([0x01, 0x00, 0x08]);
    body.extend(b"http/1.1");
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x20 | cmd, fam]);
    h.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
    h.extend(body);
    h
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn proxy_protocol_claimed_source_decides_the_zone_and_is_audited() {
    let bed = start("pp-zones");
    let port = bed.tls_port;
    let v6 = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().expect("v6"));
    // (what, header, expected status, audited client)
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("v1 TCP4 in the zone", v1("10.1.2.3", port), 200, "10.1.2.3"),
        ("v1 TCP4 outside", v1("192.0.2.7", port), 403, "192.0.2.7"),
        ("v1 TCP6 in the zone", v1("fd00::7", port), 200, "fd00::7"),
        (
            "v1 UNKNOWN keeps the peer",
            b"PROXY UNKNOWN\r\n".to_vec(),
            403,
            TRUSTED,
        ),
        (
            "v2 INET in the zone",
            v2(1, ip("10.4.4.4"), ip("10.0.0.1")),
            200,
            "10.4.4.4",
        ),
        (
            "v2 INET outside",
            v2(1, ip("198.51.100.9"), ip("10.0.0.1")),
            403,
            "198.51.100.9",
        ),
        (
            "v2 INET6 in the zone",
            v2(1, v6("fd00::8"), v6("fd00::1")),
            200,
            "fd00::8",
        ),
        (
            "v2 INET6 outside",
            v2(1, v6("2001:db8::9"), v6("fd00::1")),
            403,
            "2001:db8::9",
        ),
        (
            "v2 LOCAL keeps the peer",
            v2(0, ip("10.4.4.4"), ip("10.0.0.1")),
            403,
            TRUSTED,
        ),
    ];
    for (n, (what, header, status, client)) in cases.iter().enumerate() {
        let got = bed.request(TRUSTED, header);
        assert_eq!(got, Ok(*status), "{what}");
        let line = bed.audit(n);
        assert_eq!(line["client"].as_str(), Some(*client), "{what}: {line}");
        if *status == 200 {
            assert_eq!(line["zone"], "vpc", "{what}: {line}");
        } else {
            assert_eq!(line["reason"], "source_not_in_zone", "{what}: {line}");
        }
    }
    for reason in ["untrusted_peer", "missing", "malformed", "timeout"] {
        assert_eq!(bed.rejected(reason), 0, "{reason}");
    }
}

#[test]
fn proxy_protocol_listener_closes_untrusted_peers_and_bad_or_missing_headers() {
    let bed = start("pp-closed");
    let header = v1("10.1.2.3", bed.tls_port);

    // The header that works from the trusted proxy is not believed from anyone else: closed.
    bed.request(UNTRUSTED, &header)
        .expect_err("an untrusted peer is closed before TLS");
    bed.request(UNTRUSTED, &v2(1, ip("10.4.4.4"), ip("10.0.0.1")))
        .expect_err("v2 too");
    // A trusted peer must still send a header: a bare ClientHello is closed.
    bed.request(TRUSTED, b"").expect_err("no header is closed");
    // Garbage that starts like a header.
    bed.request(TRUSTED, b"PROXY TCP4 10.1.2.3 nowhere 1 2\r\n")
        .expect_err("a malformed header is closed");
    let mut bad_version = v2(1, ip("10.4.4.4"), ip("10.0.0.1"));
    bad_version[12] = 0x11;
    bed.request(TRUSTED, &bad_version)
        .expect_err("a v2 header of another version is closed");

    // Nothing reached the gateway's request path, and each closing was counted by reason.
    assert!(bed.gw.audit_lines().is_empty());
    wait_until(Duration::from_secs(5), "the rejections", || {
        bed.rejected("untrusted_peer") == 2
            && bed.rejected("missing") == 1
            && bed.rejected("malformed") == 2
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: untrusted_peer {} missing {} malformed {}",
            bed.rejected("untrusted_peer"),
            bed.rejected("missing"),
            bed.rejected("malformed")
        )
    });
    // The listener still serves the trusted proxy afterwards.
    assert_eq!(bed.request(TRUSTED, &header), Ok(200));
}

#[test]
fn proxy_protocol_header_that_never_completes_is_closed_after_the_timeout() {
    let bed = start("pp-slow");
    let mut tcp = bed.connect_from(TRUSTED);
    let started = Instant::now();
    tcp.write_all(b"PROXY TCP4 10.1.2.3 ").expect("write");
    // While that connection waits, others are accepted and served.
    assert_eq!(bed.request(TRUSTED, &v1("10.1.2.3", bed.tls_port)), Ok(200));
    // Then the gateway closes it; the read sees the end (or a reset).
    let mut buf = [0u8; 16];
    let read = tcp.read(&mut buf);
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(14),
        "closed after {waited:?}"
    );
    wait_until(Duration::from_secs(5), "the timeout counted", || {
        bed.rejected("timeout") == 1
    })
    .expect("counted");
}
