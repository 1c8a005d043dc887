//! An HTTP-level fault relay between pullgate and the real upstream.
//!
//! The TCP [`super::Relay`] cannot touch HTTP bodies because the bytes are TLS. This relay
//! terminates TLS itself, with a certificate for 127.0.0.1 from the upstream's test CA (so a
//! registry configured with that CA as `ca` trusts it), forwards every request (method, path,
//! query, headers including `Authorization`, body) to the upstream over TLS, and streams the
//! answer back. On command it misbehaves on blob GETs (paths with `/blobs/sha256:`): flips a
//! byte, truncates, stalls, drips, or answers 503/429 itself. HTTP/1.1 towards pullgate.
//!
//! A fault is armed for the next `times` blob responses; body faults are spent only on 2xx
//! answers of the upstream (a 401 challenge does not use one up), status faults on any blob
//! GET. The relay counts the faults it injected and the bytes it corrupted.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::sync::watch;

use super::{block_on, http_client, rt, Pki};

/// What the relay does to the next blob responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFault {
    /// Flip every bit of the body byte at offset `at` (counted from the start of this
    /// response's body); lengths stay as announced.
    Corrupt { at: u64 },
    /// Send the first `after` body bytes, then close the connection (fewer bytes than
    /// `Content-Length`).
    Truncate { after: u64 },
    /// Corrupt the byte at `at`, then truncate after `after` bytes: the fill resumes with a
    /// Range request for clean bytes, and only the whole-blob digest can catch the damage.
    CorruptThenTruncate { at: u64, after: u64 },
    /// Drop `Content-Length` and end the body cleanly (chunked, with its last chunk) after
    /// `after` bytes: a short body that looks complete on the wire.
    CleanShort { after: u64 },
    /// Send the first `after` body bytes, then nothing more, keeping the connection open
    /// (until pullgate drops it or the relay stops).
    Stall { after: u64 },
    /// Send the body in pieces of at most `chunk` bytes with `pause` before each.
    Drip { chunk: usize, pause: Duration },
    /// Answer with this status (503, 429, ...) and an OCI error body instead of forwarding;
    /// with `Retry-After: <secs>` when given.
    Status { code: u16, retry_after: Option<u32> },
}

impl HttpFault {
    fn is_status(&self) -> bool {
        matches!(self, HttpFault::Status { .. })
    }
}

#[derive(Default)]
struct State {
    /// The armed fault and how many more responses it applies to.
    armed: Mutex<Option<(HttpFault, usize)>>,
    injected: AtomicUsize,
    corrupted: AtomicU64,
    /// The `Range` header (or none) of every blob GET seen.
    blob_gets: Mutex<Vec<Option<String>>>,
}

impl State {
    /// Takes one use of the armed fault if `want` accepts it.
    fn take(&self, want: impl Fn(&HttpFault) -> bool) -> Option<HttpFault> {
        let mut armed = self.armed.lock().unwrap();
        let (fault, times) = armed.as_mut()?;
        if *times == 0 || !want(fault) {
            return None;
        }
        if *times != usize::MAX {
            *times -= 1;
        }
        Some(*fault)
    }

    fn injected(&self) {
        self.injected.fetch_add(1, Ordering::SeqCst);
    }
}

/// A running fault relay on 127.0.0.1 (HTTPS); stops, connections included, on Drop.
pub struct FaultRelay {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

type RelayBody = UnsyncBoxBody<Bytes, io::Error>;

impl FaultRelay {
    /// Relays to `upstream_url` (`https://127.0.0.1:P`), whose certificate `pki` issued; serves
    /// the loopback certificate of the same `pki`.
    pub fn start(pki: &Pki, upstream_url: &str) -> FaultRelay {
        let mut tls = (*pki.server_config()).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let client = http_client(Some(pki.ca_pem()));
        let listener = block_on(async { tokio::net::TcpListener::bind("127.0.0.1:0").await })
            .expect("fault relay bind");
        let addr = listener.local_addr().expect("fault relay addr");
        let state = Arc::new(State::default());
        let (shutdown, _) = watch::channel(false);
        let upstream = Arc::new(upstream_url.trim_end_matches('/').to_string());
        let (shared, stop) = (Arc::clone(&state), shutdown.clone());
        let accept = rt().spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conn = Conn {
                    acceptor: acceptor.clone(),
                    client: client.clone(),
                    upstream: Arc::clone(&upstream),
                    state: Arc::clone(&shared),
                };
                tokio::spawn(conn.serve(tcp, stop.subscribe()));
            }
        });
        FaultRelay {
            addr,
            state,
            shutdown,
            accept,
        }
    }

    /// `https://127.0.0.1:P`: the `upstream` of a registry that goes through the relay.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Arms `fault` for the next `times` blob responses (`usize::MAX`: all of them),
    /// replacing whatever was armed.
    pub fn inject(&self, fault: HttpFault, times: usize) {
        *self.state.armed.lock().unwrap() = Some((fault, times));
    }

    /// Stops misbehaving.
    pub fn heal(&self) {
        *self.state.armed.lock().unwrap() = None;
    }

    /// Faults injected so far (responses that were corrupted, cut, stalled, dripped or
    /// answered with a status by the relay).
    pub fn injected(&self) -> usize {
        self.state.injected.load(Ordering::SeqCst)
    }

    /// Body bytes the relay corrupted so far.
    pub fn corrupted_bytes(&self) -> u64 {
        self.state.corrupted.load(Ordering::SeqCst)
    }

    /// The `Range` header of every blob GET the relay saw, in order (`None`: whole blob).
    pub fn blob_gets(&self) -> Vec<Option<String>> {
        self.state.blob_gets.lock().unwrap().clone()
    }
}

/// What serving one connection needs.
struct Conn {
    acceptor: tokio_rustls::TlsAcceptor,
    client: reqwest::Client,
    upstream: Arc<String>,
    state: Arc<State>,
}

impl Conn {
    /// Serves HTTP/1.1 over TLS until the connection ends or the relay stops (which also ends
    /// stalled bodies).
    async fn serve(self, tcp: tokio::net::TcpStream, mut down: watch::Receiver<bool>) {
        let Ok(tls) = self.acceptor.accept(tcp).await else {
            return;
        };
        let (client, upstream, state) = (self.client, self.upstream, self.state);
        let svc = hyper::service::service_fn(move |req| {
            let (client, upstream, state) =
                (client.clone(), Arc::clone(&upstream), Arc::clone(&state));
            async move { Ok::<_, Infallible>(handle(req, &client, &upstream, state).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
        tokio::select! {
            _ = conn => {}
            _ = down.wait_for(|stopped| *stopped) => {}
        }
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.accept.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    client: &reqwest::Client,
    upstream: &str,
    state: Arc<State>,
) -> Response<RelayBody> {
    let is_blob_get =
        req.method() == hyper::Method::GET && req.uri().path().contains("/blobs/sha256:");
    if is_blob_get {
        let range = req
            .headers()
            .get(hyper::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        state.blob_gets.lock().unwrap().push(range);
        if let Some(HttpFault::Status { code, retry_after }) = state.take(HttpFault::is_status) {
            state.injected();
            return status_answer(code, retry_after);
        }
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(400, &format!("fault relay: reading the request body: {e}")),
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut headers = parts.headers.clone();
    for h in HOP_BY_HOP.iter().chain(&["host", "content-length"]) {
        headers.remove(*h);
    }
    let sent = client
        .request(parts.method.clone(), format!("{upstream}{path}"))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let answer = match sent {
        Ok(a) => a,
        Err(e) => return plain(502, &format!("fault relay: upstream: {e}")),
    };
    let fault = if is_blob_get && answer.status().is_success() {
        state.take(|f| !f.is_status())
    } else {
        None
    };
    let unframed = matches!(fault, Some(HttpFault::CleanShort { .. }));
    let mut builder = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        let framing = unframed && name == hyper::header::CONTENT_LENGTH;
        if !HOP_BY_HOP.contains(&name.as_str()) && !framing {
            builder = builder.header(name, value);
        }
    }
    let chunks = answer
        .bytes_stream()
        .map(|r| r.map_err(io::Error::other))
        .boxed();
    let body = match fault {
        None => StreamBody::new(chunks.map(|r| r.map(Frame::data))).boxed_unsync(),
        Some(fault) => faulty_body(chunks, fault, state),
    };
    builder.body(body).expect("relay response")
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// The upstream body with `fault` applied.
fn faulty_body(
    chunks: BoxStream<'static, io::Result<Bytes>>,
    fault: HttpFault,
    state: Arc<State>,
) -> RelayBody {
    struct Body {
        chunks: BoxStream<'static, io::Result<Bytes>>,
        pending: Bytes,
        sent: u64,
        fault: HttpFault,
        state: Arc<State>,
        /// What happens after the piece just sent: end with an error, or stall.
        then: Then,
        counted: bool,
        upstream_done: bool,
    }
    #[derive(PartialEq)]
    enum Then {
        Go,
        Cut,
        Stall,
        Over,
    }
    if let HttpFault::Drip { .. } = fault {
        state.injected();
    }
    let start = Body {
        chunks,
        pending: Bytes::new(),
        sent: 0,
        fault,
        state,
        then: Then::Go,
        counted: false,
        upstream_done: false,
    };
    let stream = futures_util::stream::unfold(start, |mut b| async move {
        match b.then {
            Then::Over => return None,
            Then::Cut => {
                b.then = Then::Over;
                let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "fault relay: cut");
                return Some((Err(cut), b));
            }
            Then::Stall => {
                // Never resolves: the connection task ends when pullgate goes away or the
                // relay stops (it selects on the relay's shutdown).
                std::future::pending::<()>().await;
            }
            Then::Go => {}
        }
        // A drip gathers up to `chunk` bytes (network reads are smaller) per pause.
        let want = match b.fault {
            HttpFault::Drip { chunk, .. } => chunk.max(1),
            _ => 1,
        };
        while b.pending.len() < want && !b.upstream_done {
            match b.chunks.next().await {
                None => b.upstream_done = true,
                Some(Err(e)) => {
                    b.then = Then::Over;
                    return Some((Err(e), b));
                }
                Some(Ok(chunk)) if b.pending.is_empty() => b.pending = chunk,
                Some(Ok(chunk)) => {
                    let mut joined = BytesMut::from(&b.pending[..]);
                    joined.extend_from_slice(&chunk);
                    b.pending = joined.freeze();
                }
            }
        }
        if b.pending.is_empty() {
            return None;
        }
        let take = match b.fault {
            HttpFault::Drip { chunk, pause } => {
                tokio::time::sleep(pause).await;
                chunk.max(1).min(b.pending.len())
            }
            _ => b.pending.len(),
        };
        let mut piece = b.pending.split_to(take);
        let (from, to) = (b.sent, b.sent + piece.len() as u64);
        let corrupt_at = match b.fault {
            HttpFault::Corrupt { at } | HttpFault::CorruptThenTruncate { at, .. } => Some(at),
            _ => None,
        };
        if let Some(at) = corrupt_at.filter(|at| (from..to).contains(at)) {
            let mut bytes = BytesMut::from(&piece[..]);
            bytes[(at - from) as usize] ^= 0xff;
            piece = bytes.freeze();
            b.state.corrupted.fetch_add(1, Ordering::SeqCst);
            if matches!(b.fault, HttpFault::Corrupt { .. }) {
                b.state.injected();
            }
        }
        let stop_at = match b.fault {
            HttpFault::Truncate { after } | HttpFault::CorruptThenTruncate { after, .. } => {
                Some((after, Then::Cut))
            }
            HttpFault::Stall { after } => Some((after, Then::Stall)),
            HttpFault::CleanShort { after } => Some((after, Then::Over)),
            _ => None,
        };
        if let Some((after, then)) = stop_at.filter(|(after, _)| to > *after) {
            piece.truncate((after.max(from) - from) as usize);
            b.pending = Bytes::new();
            b.then = then;
            if !b.counted {
                b.counted = true;
                b.state.injected();
            }
        }
        b.sent += piece.len() as u64;
        Some((Ok(Frame::data(piece)), b))
    });
    StreamBody::new(stream).boxed_unsync()
}

fn status_answer(code: u16, retry_after: Option<u32>) -> Response<RelayBody> {
    let oci = if code == 429 {
        "TOOMANYREQUESTS"
    } else {
        "UNAVAILABLE"
    };
    let body = format!(r#"{{"errors":[{{"code":"{oci}","message":"fault relay: {code}"}}]}}"#);
    let mut b = Response::builder()
        .status(code)
        .header("content-type", "application/json");
    if let Some(secs) = retry_after {
        b = b.header("retry-after", secs.to_string());
    }
    b.body(full(body)).expect("status answer")
}

fn plain(code: u16, text: &str) -> Response<RelayBody> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain")
        .body(full(text.to_string()))
        .expect("plain answer")
}

fn full(text: String) -> RelayBody {
    Full::new(Bytes::from(text))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}
