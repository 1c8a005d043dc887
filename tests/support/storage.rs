//! In-process stand-ins for what no real part here can do: an object store that answers
//! pre-signed-style URLs ([`StorageHost`]), and a registry front that redirects blob GETs to it
//! the way Docker Hub, GHCR and ECR redirect to S3/CDN ([`Redirector`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;

use super::{http_client, resp, serve, Handler, Resp, ServerHandle, Upstream};

/// One request the storage host saw.
#[derive(Clone, Debug)]
pub struct StorageRequest {
    pub method: String,
    pub path_and_query: String,
    pub had_authorization: bool,
}

#[derive(Default)]
struct StoreState {
    objects: Mutex<HashMap<String, Bytes>>,
    requests: Mutex<Vec<StorageRequest>>,
    next: AtomicUsize,
}

/// Plain-HTTP object host on 127.0.0.1:0 serving registered bodies at `/objects/<id>`
/// (GET/HEAD, single `Range: bytes=a-b|a-`). Records whether any request carried an
/// `Authorization` header: a client must NOT forward registry credentials to a redirect target.
#[derive(Clone)]
pub struct StorageHost {
    state: Arc<StoreState>,
    server: Arc<ServerHandle>,
}

impl StorageHost {
    pub fn start() -> StorageHost {
        let state = Arc::new(StoreState::default());
        let st = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move { serve_object(&st, req) })
        });
        StorageHost {
            state,
            server: Arc::new(serve(None, handler)),
        }
    }
    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }
    /// "http://127.0.0.1:P"
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }
    /// Stores a body; returns its id (served at `/objects/<id>`).
    pub fn register(&self, body: impl Into<Bytes>) -> String {
        let id = format!("obj{}", self.state.next.fetch_add(1, Ordering::SeqCst));
        self.state
            .objects
            .lock()
            .unwrap()
            .insert(id.clone(), body.into());
        id
    }
    /// `http://127.0.0.1:P/objects/<id>?X-Signature=abc`, like a pre-signed URL.
    pub fn signed_url(&self, id: &str) -> String {
        format!("{}/objects/{id}?X-Signature=abc", self.url())
    }
    /// Requests so far.
    pub fn requests(&self) -> Vec<StorageRequest> {
        self.state.requests.lock().unwrap().clone()
    }
    pub fn hits(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
    /// Did any request carry an `Authorization` header?
    pub fn saw_authorization(&self) -> bool {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.had_authorization)
    }
}

fn serve_object(st: &StoreState, req: Request<Incoming>) -> Resp {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    st.requests.lock().unwrap().push(StorageRequest {
        method: req.method().to_string(),
        path_and_query: pq,
        had_authorization: req.headers().contains_key("authorization"),
    });
    let id = req.uri().path().strip_prefix("/objects/").unwrap_or("");
    let Some(body) = st.objects.lock().unwrap().get(id).cloned() else {
        return resp(404, &[], "no such object");
    };
    let len = body.len();
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| parse_range(r, len));
    let (status, body, extra) = match range {
        Some((a, b)) => (206, body.slice(a..=b), Some(format!("bytes {a}-{b}/{len}"))),
        None => (200, body, None),
    };
    let cl = body.len().to_string();
    let mut headers = vec![
        ("content-type", "application/octet-stream"),
        ("content-length", cl.as_str()),
        ("accept-ranges", "bytes"),
    ];
    if let Some(cr) = &extra {
        headers.push(("content-range", cr.as_str()));
    }
    let body = if req.method() == "HEAD" {
        Bytes::new()
    } else {
        body
    };
    resp(status, &headers, body)
}

/// `bytes=a-b` or `bytes=a-` within `len`; None for anything else (served whole).
fn parse_range(r: &str, len: usize) -> Option<(usize, usize)> {
    let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
    let a: usize = a.trim().parse().ok()?;
    let b: usize = if b.trim().is_empty() {
        len.checked_sub(1)?
    } else {
        b.trim().parse().ok()?
    };
    (a <= b && b < len).then_some((a, b.min(len - 1)))
}

/// Chooses the `Location` for a blob: gets the digest and the StorageHost id of its bytes.
pub type LocationFn = Arc<dyn Fn(&str, &str) -> String + Send + Sync>;

struct RedirState {
    upstream: String,
    client: reqwest::Client,
    storage: StorageHost,
    target: Mutex<Option<LocationFn>>,
    redirects: AtomicUsize,
}

/// An HTTPS registry front (the Pki's loopback cert) that forwards every request to an
/// [`Upstream`] verbatim, except blob GETs: those it fetches itself with the request's own
/// Authorization, registers with a [`StorageHost`] and answers `307 Location: <storage URL>`.
pub struct Redirector {
    state: Arc<RedirState>,
    server: ServerHandle,
}

impl Redirector {
    /// A front for `upstream` with a new StorageHost.
    pub fn start(upstream: &Upstream) -> Redirector {
        let state = Arc::new(RedirState {
            upstream: upstream.url(),
            client: http_client(Some(upstream.pki().ca_pem())),
            storage: StorageHost::start(),
            target: Mutex::new(None),
            redirects: AtomicUsize::new(0),
        });
        let st = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move { handle_front(st, req).await })
        });
        let server = serve(Some(upstream.pki().server_config()), handler);
        Redirector { state, server }
    }

    /// Redirect blob GETs to `location_fn(digest, storage_id)` instead of the storage host
    /// (e.g. `|_, _| format!("http://0.0.0.0:{port}/x")` to test redirect-target rules).
    pub fn with_target(
        self,
        location_fn: impl Fn(&str, &str) -> String + Send + Sync + 'static,
    ) -> Redirector {
        *self.state.target.lock().unwrap() = Some(Arc::new(location_fn));
        self
    }
    /// "https://127.0.0.1:P"
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.server.addr.port())
    }
    /// "127.0.0.1:P"
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.server.addr.port())
    }
    pub fn storage(&self) -> &StorageHost {
        &self.state.storage
    }
    /// Blob GETs answered with a 307 so far.
    pub fn blob_redirects(&self) -> usize {
        self.state.redirects.load(Ordering::SeqCst)
    }
}

/// `GET /v2/<name>/blobs/sha256:<hex>` -> the digest.
fn blob_get_digest(req: &Request<Incoming>) -> Option<String> {
    if req.method() != "GET" {
        return None;
    }
    let path = req.uri().path();
    let (_, d) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
    d.starts_with("sha256:").then(|| d.to_string())
}

async fn handle_front(st: Arc<RedirState>, req: Request<Incoming>) -> Resp {
    let digest = blob_get_digest(&req);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut out = st
        .client
        .request(parts.method.clone(), format!("{}{pq}", st.upstream));
    for (k, v) in parts.headers.iter() {
        if !is_hop_by_hop(k.as_str()) && k != "host" {
            out = out.header(k, v);
        }
    }
    let up = match out.body(body).send().await {
        Ok(r) => r,
        Err(e) => return resp(502, &[], format!("redirector: upstream error: {e}")),
    };
    let status = up.status().as_u16();
    let headers = up.headers().clone();
    let bytes = up.bytes().await.unwrap_or_default();
    if let (Some(d), 200) = (&digest, status) {
        let id = st.storage.register(bytes);
        let target = st.target.lock().unwrap().clone();
        let location = match target {
            Some(f) => f(d, &id),
            None => st.storage.signed_url(&id),
        };
        st.redirects.fetch_add(1, Ordering::SeqCst);
        return resp(
            307,
            &[("location", location.as_str()), ("content-length", "0")],
            Bytes::new(),
        );
    }
    let mut b = hyper::Response::builder().status(status);
    for (k, v) in headers.iter() {
        if !is_hop_by_hop(k.as_str()) {
            b = b.header(k, v);
        }
    }
    b.body(http_body_util::Full::new(bytes)).expect("response")
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-authorization"
    )
}
