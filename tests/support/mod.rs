//! Integration-test support: a REAL upstream (CNCF distribution 2.8 with bearer-token auth over
//! TLS, token issuer in Rust), deterministic test images, and real-client drivers (skopeo,
//! containerd's `ctr`, dockerd, podman).
//!
//! Design notes (the why):
//! - Every in-process server (token issuer, storage host, redirector) runs on ONE background
//!   tokio runtime owned by this module, never on the test's runtime. So the helpers are plain
//!   synchronous functions that work from `#[test]` and from `#[tokio::test]` alike, and a test
//!   that blocks its own runtime thread on `skopeo` cannot starve the issuer it depends on.
//!   (Blocking helpers called from a current-thread `#[tokio::test]` still block that test's
//!   runtime: if pullgate itself runs on the test's runtime, use
//!   `#[tokio::test(flavor = "multi_thread")]` or `spawn_blocking`.)
//! - All traffic is on 127.0.0.1; ports are chosen at run time; readiness is polled.
//! - Every child process is wrapped in [`ChildGuard`], which kills and reaps it by PID on Drop.
//! - Every client process gets proxy variables pointing at a closed loopback port, so nothing
//!   can leave the machine (see [`isolate_env`]).
#![allow(dead_code, unused_imports)]

pub mod containerd;
pub mod dockerd;
pub mod fault_http;
pub mod hosts;
pub mod images;
pub mod openbao;
pub mod pki;
pub mod podman;
pub mod relay;
pub mod s3;
pub mod signing;
pub mod skopeo;
pub mod storage;
pub mod token;
pub mod upstream;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};

pub use containerd::{write_hosts_toml, Containerd, PullOpts};
pub use dockerd::Dockerd;
pub use fault_http::{FaultRelay, HttpFault};
pub use hosts::PrivateHosts;
pub use images::TestImage;
pub use openbao::OpenBao;
pub use pki::Pki;
pub use podman::Podman;
pub use relay::{Fault, Relay};
pub use s3::S3Server;
pub use signing::CosignKey;
pub use skopeo::{
    skopeo_copy_to_dir, skopeo_copy_to_oci, skopeo_copy_to_registry, skopeo_inspect_raw, ClientTls,
    PulledImage,
};
pub use storage::{Redirector, StorageHost};
pub use token::{TokenIssuer, TokenIssuerOptions, TokenRequest};
pub use upstream::{Auth, Upstream, UpstreamOptions};

/// The background runtime that hosts every in-process server of the test bed.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        install_crypto_provider();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("testbed-rt")
            .enable_all()
            .build()
            .expect("testbed runtime")
    })
}

/// Runs a future on the background runtime and waits for it from any context (sync test,
/// or inside another runtime: a plain channel receive never panics the way `block_on` would).
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    rt().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("testbed task panicked")
}

/// rustls 0.23 needs a process-wide provider when several are possible; ring is the only one
/// allowed here. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A free loopback port (bind :0, read it, release it). A tiny race with other processes is
/// accepted; callers that hand the port to a child retry on "address already in use".
pub fn free_port() -> u16 {
    // The kernel may hand the same free port to two binds in a row once the first is closed:
    // never give a port out twice in this process (two listeners of one config would clash).
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Polls `ready` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when something accepts TCP connections on `addr`.
pub fn can_connect(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// `<cli> image inspect` `.RepoDigests` of a pulled image (`name@sha256:...`); docker and
/// podman answer alike.
pub fn repo_digests(mut cli: Command, reference: &str) -> Result<Vec<String>, String> {
    let out = run_cmd(cli.args([
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        reference,
    ]))?;
    serde_json::from_slice(&out.stdout).map_err(|e| format!("RepoDigests: {e}"))
}

/// Points every proxy variable at a closed loopback port (so a fallback to the internet fails at
/// once, without a DNS lookup) while loopback itself stays unproxied.
pub fn isolate_env(cmd: &mut Command) -> &mut Command {
    for k in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env(k, "http://127.0.0.1:9");
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
}

/// Runs a client command to completion (with [`isolate_env`]); Err carries the command line,
/// exit status, stdout and stderr so a failing test explains itself.
pub fn run_cmd(cmd: &mut Command) -> Result<Output, String> {
    isolate_env(cmd);
    let out = cmd.output().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({})\n--- stdout:\n{}\n--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// `sha256:<hex>` of the bytes, the OCI digest form.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The last `n` lines of a text, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child process killed and reaped by PID when dropped.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard { child: Some(child) }
    }
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    /// Still running? (Reaps it if it exited.)
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
    /// Kills (SIGKILL) and waits; idempotent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Response type of the in-process servers: small bodies, fully buffered.
pub type Resp = Response<Full<Bytes>>;
/// A request handler of an in-process server.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Resp> + Send>> + Send + Sync,
>;

/// An in-process HTTP(S) server on the background runtime; aborted on Drop.
pub struct ServerHandle {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` on 127.0.0.1:0, over TLS when `tls` is given (h2 and http/1.1 by ALPN).
pub fn serve(tls: Option<Arc<rustls::ServerConfig>>, handler: Handler) -> ServerHandle {
    let listener =
        block_on(async { tokio::net::TcpListener::bind("127.0.0.1:0").await }).expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let task = rt().spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(h(req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                match acceptor {
                    Some(acc) => {
                        if let Ok(tls) = acc.accept(tcp).await {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                            .await;
                    }
                }
            });
        }
    });
    ServerHandle { addr, task }
}

/// Builds a buffered response.
pub fn resp(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).expect("response")
}

/// A reqwest client that trusts the given CA PEM (and nothing else), never uses a proxy.
pub fn http_client(ca_pem: Option<&str>) -> reqwest::Client {
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = ca_pem {
        let cert = reqwest::Certificate::from_pem(pem.as_bytes()).expect("CA pem");
        b = b.tls_certs_only([cert]);
    }
    b.build().expect("reqwest client")
}

/// Reads a file to a string, empty when missing (logs of processes that never started).
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
