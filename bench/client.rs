//! The measuring client: one blocking HTTP/1.1 exchange per connection, over plain TCP or TLS
//! (rustls, for the direct pull from the upstream and for token requests).
//!
//! It reads bodies into one reused buffer and throws them away, so the numbers describe the
//! server, not the client. It decodes `Content-Length`, `chunked` and read-to-close bodies and
//! can hash a body (SHA-256) when a run checks correctness instead of speed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest;

/// Bytes asked of the socket per read.
const READ_BUF: usize = 512 * 1024;

/// Where a request goes.
#[derive(Clone)]
pub enum Target {
    Plain(SocketAddr),
    Tls {
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        /// The name checked against the server certificate.
        name: rustls::pki_types::ServerName<'static>,
    },
}

impl Target {
    pub fn plain(port: u16) -> Target {
        Target::Plain(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// TLS to 127.0.0.1:`port`, trusting only `ca_pem`, HTTP/1.1 by ALPN.
    pub fn tls(port: u16, ca_pem: &str) -> Target {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.expect("CA pem")).expect("CA cert");
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Target::Tls {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            config: Arc::new(config),
            name: rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Target::Plain(a) | Target::Tls { addr: a, .. } => *a,
        }
    }
}

/// What one exchange gave.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Body bytes received.
    pub bytes: u64,
    /// `sha256:<hex>` of the body when hashing was asked for.
    pub digest: Option<String>,
    /// The body, when it was asked to be kept (small answers such as tokens).
    pub body: Vec<u8>,
    /// From connect to the last body byte.
    pub elapsed: Duration,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What to do with a body.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Count it.
    Discard,
    /// Count and SHA-256 it.
    Hash,
    /// Keep it in memory (small bodies only).
    Keep,
}

/// One request on a new connection (`Connection: close`).
pub fn fetch(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    mode: BodyMode,
) -> Result<Fetched, String> {
    let start = Instant::now();
    let tcp = TcpStream::connect_timeout(&target.addr(), Duration::from_secs(5))
        .map_err(|e| format!("connect {}: {e}", target.addr()))?;
    tcp.set_nodelay(true).ok();
    tcp.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut out = match target {
        Target::Plain(_) => {
            let mut s = tcp;
            exchange(&mut s, target, method, path, headers, mode)
        }
        Target::Tls { config, name, .. } => {
            let conn = rustls::ClientConnection::new(config.clone(), name.clone())
                .map_err(|e| format!("tls: {e}"))?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            exchange(&mut s, target, method, path, headers, mode)
        }
    }?;
    out.elapsed = start.elapsed();
    Ok(out)
}

fn exchange<S: Read + Write>(
    s: &mut S,
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    mode: BodyMode,
) -> Result<Fetched, String> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pullgate-bench\r\nConnection: close\r\n",
        target.addr()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())
        .and_then(|_| s.flush())
        .map_err(|e| format!("send: {e}"))?;

    let mut buf = vec![0u8; READ_BUF];
    let (head, mut leftover) = read_head(s, &mut buf)?;
    let (status, resp_headers) = parse_head(&head)?;
    let mut sink = Sink::new(mode);
    let get = |n: &str| {
        resp_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let no_body = method.eq_ignore_ascii_case("HEAD")
        || status == 204
        || status == 304
        || (100..200).contains(&status);
    if no_body {
    } else if get("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        read_chunked(s, &mut buf, leftover, &mut sink)?;
    } else if let Some(len) = get("content-length") {
        let len: u64 = len
            .trim()
            .parse()
            .map_err(|_| format!("bad content-length {len:?}"))?;
        let first = leftover.len().min(len as usize);
        sink.take(&leftover[..first]);
        let mut left = len - first as u64;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = s
                .read(&mut buf[..want])
                .map_err(|e| format!("body read after {} bytes: {e}", sink.bytes))?;
            if n == 0 {
                return Err(format!("body ended after {} of {len} bytes", sink.bytes));
            }
            sink.take(&buf[..n]);
            left -= n as u64;
        }
    } else {
        sink.take(&leftover);
        leftover.clear();
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink.take(&buf[..n]),
                // rustls reports a peer that closed without close_notify as an error.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(format!("body read: {e}")),
            }
        }
    }
    Ok(Fetched {
        status,
        headers: resp_headers,
        bytes: sink.bytes,
        digest: sink.digest(),
        body: sink.kept,
        elapsed: Duration::ZERO,
    })
}

/// Reads until the end of the response head; returns the head and the body bytes read with it.
fn read_head<S: Read>(s: &mut S, buf: &mut [u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut acc = Vec::with_capacity(4096);
    loop {
        let n = s.read(buf).map_err(|e| format!("head read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed before the response head ({} bytes)",
                acc.len()
            ));
        }
        acc.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&acc, b"\r\n\r\n") {
            let rest = acc.split_off(end + 4);
            return Ok((acc, rest));
        }
        if acc.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Status code and headers of a response head.
pub fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>), String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

fn read_chunked<S: Read>(
    s: &mut S,
    buf: &mut [u8],
    mut pending: Vec<u8>,
    sink: &mut Sink,
) -> Result<(), String> {
    // `pending` holds bytes read but not yet decoded; chunk data goes straight to the sink.
    let mut fill = |pending: &mut Vec<u8>, buf: &mut [u8]| -> Result<(), String> {
        let n = s.read(buf).map_err(|e| format!("chunked read: {e}"))?;
        if n == 0 {
            return Err("connection closed inside a chunked body".into());
        }
        pending.extend_from_slice(&buf[..n]);
        Ok(())
    };
    loop {
        let line_end = loop {
            if let Some(i) = find(&pending, b"\r\n") {
                break i;
            }
            fill(&mut pending, buf)?;
        };
        let size_text = String::from_utf8_lossy(&pending[..line_end]).into_owned();
        let size = u64::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        pending.drain(..line_end + 2);
        if size == 0 {
            return Ok(());
        }
        let mut left = size;
        while left > 0 {
            if pending.is_empty() {
                fill(&mut pending, buf)?;
            }
            let take = pending
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            sink.take(&pending[..take]);
            pending.drain(..take);
            left -= take as u64;
        }
        while pending.len() < 2 {
            fill(&mut pending, buf)?;
        }
        pending.drain(..2);
    }
}

struct Sink {
    mode: BodyMode,
    bytes: u64,
    hasher: Option<sha2::Sha256>,
    kept: Vec<u8>,
}

impl Sink {
    fn new(mode: BodyMode) -> Sink {
        Sink {
            mode,
            bytes: 0,
            hasher: (mode == BodyMode::Hash).then(sha2::Sha256::new),
            kept: Vec::new(),
        }
    }
    fn take(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        if self.mode == BodyMode::Keep {
            self.kept.extend_from_slice(data);
        }
    }
    fn digest(&mut self) -> Option<String> {
        self.hasher
            .take()
            .map(|h| format!("sha256:{}", hex::encode(h.finalize())))
    }
}

/// Runs `n` fetches at once (threads released together), fetch `i` on `targets[i % len]` (one
/// server, or clients spread over replicas as a load balancer would); returns each result and
/// the wall time from the release to the last completion.
pub fn fetch_many(
    n: usize,
    targets: &[Target],
    path: &str,
    headers: &[(&str, &str)],
) -> (Vec<Result<Fetched, String>>, Duration) {
    let barrier = Arc::new(std::sync::Barrier::new(n + 1));
    let owned: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, target, path, owned) = (
                barrier.clone(),
                targets[i % targets.len()].clone(),
                path.to_string(),
                owned.clone(),
            );
            std::thread::spawn(move || {
                let h: Vec<(&str, &str)> = owned
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                barrier.wait();
                fetch(&target, "GET", &path, &h, BodyMode::Discard)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err("client thread panicked".into()))
        })
        .collect();
    (results, start.elapsed())
}
