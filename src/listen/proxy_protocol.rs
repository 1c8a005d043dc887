//! PROXY protocol on TLS listeners (`[[server.tls]] proxy_protocol = true`, issue 5 item 6):
//! behind an L4 load balancer, the client's address comes from the header the balancer writes
//! before the TLS handshake.
//!
//! Owns: the Pingora pre-TLS hook. For a connection on a listener with `proxy_protocol`, it
//! closes the connection unless the TCP peer is in `server.trusted_proxies`, reads the header
//! within [`HEADER_TIMEOUT`], hands any bytes read past it back to the stream for the TLS
//! handshake, and makes the header's source the connection's peer address (so
//! `session.client_addr()`, the zones and the audit log see the client, not the balancer). The
//! parsing itself is `policy::proxy_header`. Must never: believe a header from a peer outside
//! `trusted_proxies`, let a connection on such a listener through without a header, or let a
//! slow peer hold anything but its own connection task.
//!
//! Why one hook for every TLS listener: Pingora keeps the pre-TLS callback per `Listeners`
//! collection (`Listeners::set_pre_tls_callback` sets it on every endpoint, before and after
//! the call), and all listeners share one gateway service. So the hook is installed once, when
//! any TLS listener asks for it, and finds the listener a connection came in on by the
//! connection's local address ([`ListenerTable`]). Plain listeners never reach the hook: Pingora
//! runs it only before a TLS handshake.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::{Error, ErrorType};
use tokio::io::AsyncReadExt;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::policy::proxy_header::{self, Parsed, ProxyHeader};

/// How long a trusted peer has to send its whole header. Load balancers send it at once, with
/// the connection; a peer that trickles bytes loses its connection, not the listener.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes asked of the socket per read while looking for the end of the header. What comes
/// after the header (the ClientHello) is handed back with `rewind`.
const READ_CHUNK: usize = 512;

/// What a connection that closes before sending a byte is taken for.
const HEALTH_CHECK: &str = "closed without sending anything (a TCP health check?)";

/// Which TLS listeners want a header, looked up by a connection's local address.
#[derive(Debug, Clone, Default)]
pub struct ListenerTable {
    listeners: Vec<(SocketAddr, bool)>,
}

impl ListenerTable {
    /// `(listen address, proxy_protocol)` of each TLS listener.
    pub fn new(listeners: impl IntoIterator<Item = (SocketAddr, bool)>) -> ListenerTable {
        ListenerTable {
            listeners: listeners.into_iter().collect(),
        }
    }

    /// Whether a connection accepted at `local` must start with a header. The listener is the
    /// one bound to exactly that address, else the wildcard of the same port and family, else
    /// an IPv6 wildcard of that port (a dual-stack socket). A connection matching no listener
    /// (or with no known local address) must send a header: when in doubt, closed.
    pub fn requires_header(&self, local: Option<SocketAddr>) -> bool {
        let Some(local) = local else {
            return true;
        };
        let ip = local.ip().to_canonical();
        let port = local.port();
        let on = |want: IpAddr| {
            self.listeners
                .iter()
                .find(|(addr, _)| addr.port() == port && addr.ip().to_canonical() == want)
                .map(|(_, pp)| *pp)
        };
        let family_wildcard = match ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        on(ip)
            .or_else(|| on(family_wildcard))
            .or_else(|| on(IpAddr::V6(Ipv6Addr::UNSPECIFIED)))
            .unwrap_or(true)
    }
}

/// The pre-TLS hook of the gateway service.
pub struct ProxyProtocol {
    listeners: ListenerTable,
    /// Whether a peer is in `server.trusted_proxies`, asked of the config in use at each
    /// connection (a reload changes the list for new connections).
    trusted: Box<dyn Fn(IpAddr) -> bool + Send + Sync>,
    metrics: Arc<Metrics>,
    timeout: Duration,
}

impl ProxyProtocol {
    /// The hook for `config`, or `None` when no TLS listener has `proxy_protocol` (then there
    /// is nothing to install and TLS listeners work as before).
    pub fn for_config(
        config: &Config,
        metrics: Arc<Metrics>,
        gateway: Arc<ArcSwap<Gateway>>,
    ) -> Option<ProxyProtocol> {
        let tls = &config.server.tls;
        if !tls.iter().any(|t| t.proxy_protocol) {
            return None;
        }
        Some(ProxyProtocol {
            listeners: ListenerTable::new(tls.iter().map(|t| (t.listen, t.proxy_protocol))),
            trusted: Box::new(move |ip| gateway.load().trusts_proxy(ip)),
            metrics,
            timeout: HEADER_TIMEOUT,
        })
    }

    fn reject(&self, peer: Option<SocketAddr>, reason: &'static str, detail: &str) -> Box<Error> {
        self.metrics
            .proxy_protocol_rejected
            .with_label_values(&[reason])
            .inc();
        let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        if detail == HEALTH_CHECK {
            // A trusted balancer's TCP health check: connect, close. Counted, not warned about.
            tracing::debug!(%peer, reason, "PROXY protocol: {detail}");
        } else {
            tracing::warn!(%peer, reason, "PROXY protocol: connection closed before TLS: {detail}");
        }
        Error::explain(
            ErrorType::Custom("PROXY protocol"),
            format!("{reason}: {detail}"),
        )
    }
}

#[async_trait]
impl PreTlsProcess for ProxyProtocol {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let digest = stream.get_socket_digest();
        let inet = |a: Option<&pingora::protocols::l4::socket::SocketAddr>| {
            a.and_then(|a| a.as_inet()).copied()
        };
        let local = inet(digest.as_ref().and_then(|d| d.local_addr()));
        if !self.listeners.requires_header(local) {
            return Ok(());
        }
        let peer = inet(digest.as_ref().and_then(|d| d.peer_addr()));
        if !peer.is_some_and(|p| (self.trusted)(p.ip())) {
            // Checked before reading a byte: an untrusted peer's header is never looked at.
            return Err(self.reject(peer, "untrusted_peer", "peer not in server.trusted_proxies"));
        }
        let (header, rest) = match tokio::time::timeout(self.timeout, read_header(stream)).await {
            Err(_) => {
                let detail = format!("no complete header within {:?}", self.timeout);
                return Err(self.reject(peer, "timeout", &detail));
            }
            Ok(Err(Refused::Header(e))) => {
                return Err(self.reject(peer, e.label(), &e.to_string()))
            }
            Ok(Err(Refused::Closed(detail))) => return Err(self.reject(peer, "closed", &detail)),
            Ok(Ok(read)) => read,
        };
        stream.rewind(&rest);
        if let ProxyHeader::Proxied { source, .. } = header {
            // A new digest whose peer is the client; the local address is still read from the
            // socket when asked for.
            use std::os::fd::AsRawFd;
            let replaced = SocketDigest::from_raw_fd(stream.as_raw_fd());
            let _ = replaced.peer_addr.set(Some(source.into()));
            stream.set_socket_digest(replaced);
            tracing::debug!(peer = ?peer, %source, "PROXY protocol: client address taken");
        }
        Ok(())
    }
}

enum Refused {
    Header(proxy_header::HeaderError),
    /// End of stream or a read error before the header was complete.
    Closed(String),
}

/// Reads until the bytes parse as a whole header (or cannot become one). Returns the header
/// and the bytes read past it.
async fn read_header(stream: &mut L4Stream) -> Result<(ProxyHeader, Vec<u8>), Refused> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        match proxy_header::parse(&buf) {
            Ok(Parsed::Complete { header, len }) => return Ok((header, buf.split_off(len))),
            Ok(Parsed::Incomplete) => {}
            Err(e) => return Err(Refused::Header(e)),
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Refused::Closed(format!("read failed: {e}")))?;
        if n == 0 {
            return Err(Refused::Closed(if buf.is_empty() {
                HEALTH_CHECK.to_owned()
            } else {
                format!("connection closed after {} bytes of a header", buf.len())
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Accepts one connection from `from` the way Pingora does (with a socket digest), after
    /// the client wrote `bytes`, and runs the hook on it. The result, the peer address the
    /// connection reports afterwards, and what the stream then yields.
    async fn hook_on(
        from: &str,
        trusted: &str,
        bytes: &[u8],
    ) -> (
        pingora::Result<()>,
        Option<SocketAddr>,
        Vec<u8>,
        Arc<Metrics>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(from.parse().unwrap(), 0))
            .unwrap();
        let mut client = socket.connect(local).await.unwrap();
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut stream = L4Stream::from(accepted);
        {
            use std::os::fd::AsRawFd;
            stream.set_socket_digest(SocketDigest::from_raw_fd(stream.as_raw_fd()));
        }
        let metrics = Arc::new(Metrics::new(1));
        let hook = ProxyProtocol {
            listeners: ListenerTable::new([(local, true)]),
            trusted: {
                let proxies = crate::policy::TrustedProxies::new(&[trusted.parse().unwrap()]);
                Box::new(move |ip| proxies.contains(ip))
            },
            metrics: metrics.clone(),
            timeout: Duration::from_secs(5),
        };
        let result = hook.process(&mut stream).await;
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let mut rest = Vec::new();
        if result.is_ok() {
            stream.read_to_end(&mut rest).await.unwrap();
        }
        (result, peer, rest, metrics)
    }

    fn rejected(metrics: &Metrics, reason: &str) -> u64 {
        metrics
            .proxy_protocol_rejected
            .with_label_values(&[reason])
            .get()
    }

    #[tokio::test]
    async fn a_trusted_header_becomes_the_peer_and_the_bytes_after_it_stay_readable() {
        let mut bytes = b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 443\r\n".to_vec();
        bytes.extend(b"\x16\x03\x01 the ClientHello");
        let (result, peer, rest, _) = hook_on("127.0.0.2", "127.0.0.2/32", &bytes).await;
        result.expect("accepted");
        assert_eq!(peer, Some("10.1.2.3:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01 the ClientHello");
    }

    #[tokio::test]
    async fn a_local_header_keeps_the_peer() {
        let mut bytes = proxy_header::V2_SIGNATURE.to_vec();
        bytes.extend([0x20, 0x00, 0x00, 0x00]);
        bytes.extend(b"rest");
        let (result, peer, rest, _) = hook_on("127.0.0.2", "127.0.0.2/32", &bytes).await;
        result.expect("accepted");
        assert_eq!(peer.map(|p| p.ip()), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(rest, b"rest");
    }

    #[tokio::test]
    async fn untrusted_missing_malformed_and_silent_connections_are_refused_by_reason() {
        let header = b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 443\r\n";
        for (from, bytes, reason) in [
            ("127.0.0.3", &header[..], "untrusted_peer"),
            ("127.0.0.2", b"\x16\x03\x01\x02\x00", "missing"),
            ("127.0.0.2", b"PROXY TCP4 nonsense\r\n", "malformed"),
            ("127.0.0.2", b"PROXY TCP4 10.1", "closed"),
            ("127.0.0.2", b"", "closed"),
        ] {
            let (result, _, _, metrics) = hook_on(from, "127.0.0.2/32", bytes).await;
            assert!(result.is_err(), "{reason}");
            assert_eq!(rejected(&metrics, reason), 1, "{reason}");
        }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_listener_is_found_by_exact_address_then_wildcards() {
        let table = ListenerTable::new([
            (a("127.0.0.1:8443"), true),
            (a("127.0.0.2:8443"), false),
            (a("0.0.0.0:9443"), true),
            (a("[::]:9443"), false),
            (a("[::]:10443"), true),
            (a("[::1]:11443"), false),
        ]);
        let on = |s: &str| table.requires_header(Some(a(s)));
        assert!(on("127.0.0.1:8443"));
        assert!(!on("127.0.0.2:8443"));
        assert!(on("10.1.2.3:9443"), "IPv4 wildcard of the port");
        assert!(!on("[fd00::1]:9443"), "IPv6 wildcard of the port");
        assert!(on("10.1.2.3:10443"), "dual-stack IPv6 wildcard");
        assert!(on("[::ffff:10.1.2.3]:10443"), "mapped address");
        assert!(!on("[::1]:11443"));
        assert!(on("127.0.0.9:12443"), "no listener: closed");
        assert!(table.requires_header(None), "no local address: closed");
    }
}
