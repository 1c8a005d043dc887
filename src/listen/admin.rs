//! The admin listener (`server.admin_listen`): `/metrics`, `/healthz`, `/readyz`.
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

use crate::metrics::Metrics;
use crate::store::BlobStore;

pub struct Admin {
    /// Bound at build time, so a taken port is a start-up error naming the key.
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    metrics: Arc<Metrics>,
    store: BlobStore,
    /// The gateway's own listeners, polled until they accept.
    gateway_listeners: Vec<SocketAddr>,
    ready: Arc<AtomicBool>,
}

impl Admin {
    pub fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        store: BlobStore,
        gateway_listeners: Vec<SocketAddr>,
    ) -> Result<Admin, String> {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("server.admin_listen: cannot listen on {addr}: {e}"))?;
        Ok(Admin {
            listener: std::sync::Mutex::new(Some(listener)),
            metrics,
            store,
            gateway_listeners,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }
}

#[async_trait]
impl BackgroundService for Admin {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .and_then(|l| tokio::net::TcpListener::from_std(l).ok())
        else {
            tracing::error!("admin listener unavailable");
            return;
        };
        let state = Arc::new(State {
            metrics: Arc::clone(&self.metrics),
            store: self.store.clone(),
            ready: Arc::clone(&self.ready),
        });
        tokio::spawn(accept_loop(listener, state));
        let listeners = self.gateway_listeners.clone();
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
}

async fn wait_listening(addrs: &[SocketAddr]) {
    for addr in addrs {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(answer(&state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer<B>(state: &State, req: &Request<B>) -> Response<Full<Bytes>> {
    let text = |status: u16, body: String, content_type: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        return text(405, "GET only\n".into(), "text/plain");
    }
    match req.uri().path() {
        "/metrics" => text(
            200,
            state.metrics.render(&state.store.stats()),
            "text/plain; version=0.0.4",
        ),
        "/healthz" => text(200, "ok\n".into(), "text/plain"),
        "/readyz" if state.ready.load(Ordering::SeqCst) => {
            text(200, "ready\n".into(), "text/plain")
        }
        "/readyz" => text(503, "not ready\n".into(), "text/plain"),
        _ => text(
            404,
            "not found: try /metrics, /healthz or /readyz\n".into(),
            "text/plain",
        ),
    }
}
