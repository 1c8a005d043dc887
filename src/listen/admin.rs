//! The admin listener (`server.admin_listen`): `/metrics`, `/healthz`, `/readyz`, the config in
//! use at `/-/config`, `POST /-/reload`, warm jobs (`POST /warm`, `GET /warm`,
//! `GET /warm/<id>`), and the cache encryption keys at `/-/keys` (status) and
//! `POST /-/keys/rotate` (what `pullgate keys` calls).
//!
//! It runs as a Pingora background service with its own small HTTP/1.1 server rather than as a
//! Pingora listening service, because listening services stop accepting the moment shutdown
//! starts: an orchestrator must instead see `/readyz` answer 503 during the grace period, while
//! in-flight pulls finish.
//! Ready means: config loaded and cache index loaded (both done before this service exists) and
//! every gateway listener accepting connections (polled here).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use super::reload::{Reloader, Trigger};
use crate::metrics::Metrics;
use crate::store::BlobStore;

pub struct Admin {
    addr: SocketAddr,
    /// Bound at build time, so a taken port is a start-up error naming the key; `None` when
    /// an `--upgrade` found the old process still on it (bound once that one lets go).
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    ready: Arc<AtomicBool>,
    parts: Parts,
}

/// What the admin listener answers from.
pub struct Parts {
    pub metrics: Arc<Metrics>,
    pub store: BlobStore,
    /// The gateway's own listeners, polled until they accept.
    pub gateway_listeners: Vec<SocketAddr>,
    pub reloader: Arc<Reloader>,
    /// Becomes true when this process hands over to a new one: the port is let go.
    pub handing_over: watch::Receiver<bool>,
    pub warmer: crate::warm::Warmer,
}

/// How long an upgrading process waits for the old one to let go of the admin port.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(30);

impl Admin {
    pub fn bind(addr: SocketAddr, upgrade: bool, parts: Parts) -> Result<Admin, String> {
        let listener = match bind(addr) {
            Ok(l) => Some(l),
            Err(e) if upgrade && e.kind() == std::io::ErrorKind::AddrInUse => None,
            Err(e) => return Err(format!("server.admin_listen: cannot listen on {addr}: {e}")),
        };
        Ok(Admin {
            addr,
            listener: std::sync::Mutex::new(listener),
            ready: Arc::new(AtomicBool::new(false)),
            parts,
        })
    }

    /// The listener bound at build time, or (upgrading) the port once the old process has
    /// let go of it.
    async fn listener(&self) -> Option<tokio::net::TcpListener> {
        let bound = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let listener = match bound {
            Some(l) => l,
            None => {
                let deadline = tokio::time::Instant::now() + TAKE_OVER_WAIT;
                loop {
                    match bind(self.addr) {
                        Ok(l) => break l,
                        Err(e) if tokio::time::Instant::now() > deadline => {
                            tracing::error!(addr = %self.addr, error = %e, "server.admin_listen: the old process never let go of the admin port");
                            return None;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        };
        tokio::net::TcpListener::from_std(listener).ok()
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l))
}

#[async_trait]
impl BackgroundService for Admin {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(listener) = self.listener().await else {
            tracing::error!("admin listener unavailable");
            return;
        };
        let parts = &self.parts;
        let state = Arc::new(State {
            metrics: Arc::clone(&parts.metrics),
            store: parts.store.clone(),
            ready: Arc::clone(&self.ready),
            reloader: Arc::clone(&parts.reloader),
            warmer: parts.warmer.clone(),
        });
        tokio::spawn(accept_loop(listener, state, parts.handing_over.clone()));
        let listeners = parts.gateway_listeners.clone();
        tokio::select! {
            () = wait_listening(&listeners) => {
                self.ready.store(true, Ordering::SeqCst);
                tracing::info!("ready");
                let _ = shutdown.changed().await;
            }
            _ = shutdown.changed() => {}
        }
        // Shutting down: keep answering, now "not ready", until the runtime stops.
        self.ready.store(false, Ordering::SeqCst);
    }
}

struct State {
    metrics: Arc<Metrics>,
    store: BlobStore,
    ready: Arc<AtomicBool>,
    reloader: Arc<Reloader>,
    warmer: crate::warm::Warmer,
}

async fn wait_listening(addrs: &[SocketAddr]) {
    for addr in addrs {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut handing_over: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // A new process takes the port over; connections already accepted are answered.
            Ok(_) = handing_over.wait_for(|h| *h) => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(answer(state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The largest `POST /warm` body read.
const MAX_WARM_REQUEST: usize = 64 * 1024;

async fn answer(state: Arc<State>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let text = |status: u16, body: String, content_type: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.uri().path() == "/-/reload" {
        if *req.method() != http::Method::POST {
            return text(405, "POST only\n".into(), "text/plain");
        }
        let reloader = Arc::clone(&state.reloader);
        let outcome = tokio::task::spawn_blocking(move || reloader.reload(Trigger::Admin)).await;
        return match outcome {
            Ok(outcome) => {
                let status = match outcome.label() {
                    "ok" => 200,
                    "invalid" => 422,
                    _ => 409,
                };
                text(
                    status,
                    format!("{}\n", outcome.to_json()),
                    "application/json",
                )
            }
            Err(e) => text(500, format!("reload failed: {e}\n"), "text/plain"),
        };
    }
    let path = req.uri().path().to_owned();
    if path == "/warm" || path.starts_with("/warm/") {
        return warm(&state.warmer, req, &path).await;
    }
    if req.uri().path() == "/-/keys/rotate" {
        if *req.method() != http::Method::POST {
            return text(405, "POST only\n".into(), "text/plain");
        }
        return match state.reloader.current().keys() {
            Some(keys) => {
                keys.rotate();
                text(
                    202,
                    "{\"rotate\":\"at the next check\"}\n".into(),
                    "application/json",
                )
            }
            None => text(409, "cache encryption is off\n".into(), "text/plain"),
        };
    }
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        return text(405, "GET only\n".into(), "text/plain");
    }
    if req.uri().path() == "/-/keys" {
        return match state.reloader.current().keys() {
            Some(keys) => text(
                200,
                format!(
                    "{}\n",
                    serde_json::to_string(&keys.status()).unwrap_or_default()
                ),
                "application/json",
            ),
            None => text(409, "cache encryption is off\n".into(), "text/plain"),
        };
    }
    match req.uri().path() {
        "/metrics" => {
            let (members, down) = state.reloader.current().cluster_members();
            state
                .metrics
                .sync_cluster(members, down, crate::cluster::member_changes());
            text(
                200,
                state.metrics.render(&state.store.stats()),
                "text/plain; version=0.0.4",
            )
        }
        "/healthz" => text(200, "ok\n".into(), "text/plain"),
        "/-/config" => text(
            200,
            format!(
                "{}\n",
                serde_json::to_string(&state.reloader.in_use()).unwrap_or_default()
            ),
            "application/json",
        ),
        "/readyz" if state.ready.load(Ordering::SeqCst) => {
            text(200, "ready\n".into(), "text/plain")
        }
        "/readyz" => text(503, "not ready\n".into(), "text/plain"),
        _ => text(
            404,
            "not found: try /metrics, /healthz, /readyz, /-/config, POST /-/reload or /warm\n"
                .into(),
            "text/plain",
        ),
    }
}

/// `POST /warm` (start a job: `{"images": [...], "platforms": [...], "referrers": false}`),
/// `GET /warm` (every job kept), `GET /warm/<id>` (one job's progress). Errors are JSON
/// `{"errors": [{"key", "message"}]}`; a bad request starts nothing.
async fn warm(
    warmer: &crate::warm::Warmer,
    req: Request<hyper::body::Incoming>,
    path: &str,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let json = |status: u16, body: serde_json::Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!("{body}\n"))))
            .unwrap_or_default()
    };
    let error = |status: u16, problems: Vec<(String, String)>| {
        let errors: Vec<serde_json::Value> = problems
            .into_iter()
            .map(|(key, message)| serde_json::json!({"key": key, "message": message}))
            .collect();
        json(status, serde_json::json!({ "errors": errors }))
    };
    let one = |key: &str, message: &str| vec![(key.to_owned(), message.to_owned())];
    let method = req.method().clone();
    match (path.strip_prefix("/warm/"), method) {
        (None, http::Method::POST) => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_WARM_REQUEST)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return error(
                        400,
                        one("body", &format!("cannot read it (at most 64 KiB): {e}")),
                    )
                }
            };
            let request: crate::warm::engine::WarmRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        400,
                        one(
                            "body",
                            &format!("not a warm request ({e}): send {{\"images\": [\"host/repo:tag\"], \"platforms\": [\"linux/amd64\"]}}"),
                        ),
                    )
                }
            };
            match warmer.submit(&request) {
                Ok(job) => json(202, serde_json::json!({"id": job.id, "job": job})),
                // The engine starts with the process: a moment at start, worth a retry.
                Err(problems) if problems.iter().any(|(k, _)| k == "warm") => error(503, problems),
                Err(problems) => error(400, problems),
            }
        }
        (None, http::Method::GET | http::Method::HEAD) => {
            json(200, serde_json::json!({ "jobs": warmer.jobs() }))
        }
        (Some(id), http::Method::GET | http::Method::HEAD) => match warmer.job(id) {
            Some(job) => json(200, serde_json::to_value(job).unwrap_or_default()),
            None => error(
                404,
                one(
                    "id",
                    &format!(
                        "no warm job {:?} (GET /warm lists them)",
                        id.chars().take(64).collect::<String>()
                    ),
                ),
            ),
        },
        _ => error(
            405,
            one("method", "POST /warm, GET /warm or GET /warm/<id>"),
        ),
    }
}
