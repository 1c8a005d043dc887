//! The edge: the only `impl ProxyHttp`, where Pingora's `Session` meets pullgate.
//!
//! Every registry request is answered from `request_filter` (the `Ok(true)` contract): parse the
//! path, route, ask the upstream through `UpstreamClient`, write the answer. Nothing reaches
//! Pingora's proxy path yet, so `upstream_peer` only refuses. The hooks stay short; the work
//! lives in `serve.rs` (what to ask and answer) and `respond.rs` (how bytes are written).

mod access;
mod blob;
mod confirm;
mod ctx;
mod manifest;
mod range;
mod respond;
mod serve;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};

use crate::audit::{Audit, AuditRecord};
use crate::config::Config;
use crate::metrics::{Metrics, RequestRecord};
use crate::policy::Policy;
use crate::route::RouteTable;
use crate::store::{BlobStore, Links, ManifestStore};
use crate::upstream::UpstreamClient;
pub use ctx::RequestCtx;

/// The names of a verified client certificate (its CN and DNS SANs), attached to a TLS
/// connection by the listener after the handshake and copied into every request's context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCertSubjects(pub Vec<String>);

/// Shared, read-only state of a running gateway.
pub struct Gateway {
    config: Arc<Config>,
    routes: RouteTable,
    upstreams: HashMap<String, Arc<UpstreamClient>>,
    store: BlobStore,
    manifests: ManifestStore,
    links: Arc<Links>,
    metrics: Arc<Metrics>,
    policy: Policy,
    audit: Audit,
    next_request: AtomicU64,
    /// Mixed into request ids so they differ across restarts.
    id_nonce: u64,
}

impl Gateway {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, String> {
        let routes = RouteTable::new(&config.registries);
        let mut upstreams = HashMap::new();
        for registry in &config.registries {
            let client = UpstreamClient::new(registry.clone(), metrics.clone())
                .map_err(|e| format!("registry.{}: {e}", registry.name))?;
            upstreams.insert(registry.name.clone(), Arc::new(client));
        }
        let (store, stats) = BlobStore::open(&config.cache.dir, config.cache.max_size)
            .map_err(|e| format!("cache.dir: cannot use {}: {e}", config.cache.dir.display()))?;
        tracing::info!(
            dir = %config.cache.dir.display(),
            blobs = stats.entries,
            bytes = stats.bytes,
            temp_files_removed = stats.temp_files_removed,
            elapsed_ms = stats.elapsed.as_millis() as u64,
            "blob cache opened"
        );
        let cache_error = |e: std::io::Error| {
            format!("cache.dir: cannot use {}: {e}", config.cache.dir.display())
        };
        let manifests = ManifestStore::open(&config.cache.dir, config.cache.negative_ttl)
            .map_err(cache_error)?;
        let links = Arc::new(Links::open(&config.cache.dir).map_err(cache_error)?);
        let audit = Audit::open(&config.server.audit_log)?;
        let policy = Policy::new(&config);
        let id_nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            .rotate_left(32);
        Ok(Gateway {
            config,
            routes,
            upstreams,
            store,
            manifests,
            links,
            metrics,
            policy,
            audit,
            next_request: AtomicU64::new(1),
            id_nonce,
        })
    }

    /// The blob store handle (for the admin listener's metrics).
    pub fn store(&self) -> BlobStore {
        self.store.clone()
    }

    fn upstream(&self, registry: &str) -> Option<&Arc<UpstreamClient>> {
        self.upstreams.get(registry)
    }

    fn request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!(
            "{:016x}",
            n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.id_nonce
        )
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.request_id())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.tls_subjects = client_cert_subjects(session);
        match serve::serve(self, session, ctx).await {
            Ok(()) => Ok(true),
            Err(serve::Failure::Respond(error)) => {
                respond::oci_error(session, ctx, &error).await?;
                Ok(true)
            }
            Err(serve::Failure::Abort(reason)) => {
                // Invariant 3: the response head is out; ending the body early would look
                // complete. Failing the request drops the connection mid-body instead.
                ctx.note_error(&reason);
                Err(Error::explain(ErrorType::WriteError, reason))
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "pullgate answers every request in request_filter",
        ))
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        // The access line below already carries the error.
        ctx.error.is_some()
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        if let Some(e) = error {
            if ctx.error.is_none() {
                ctx.note_error(&e.to_string());
            }
        }
        ctx.log_access(status);
        if ctx.kind != "other" {
            self.audit.record(&AuditRecord {
                time: AuditRecord::now(),
                request_id: &ctx.request_id,
                client: ctx.client.map(|c| c.to_string()),
                zone: ctx.zone.as_deref(),
                identity: ctx.identity.as_deref(),
                registry: ctx.registry.as_deref(),
                repository: ctx.repository.as_deref(),
                reference: ctx.reference.as_deref(),
                action: ctx.action,
                decision: ctx.decision,
                reason: ctx.reason,
                message: ctx.error.as_deref(),
                status,
                bytes: ctx.bytes_sent,
                cache: ctx.cache,
                credential: ctx.credential.as_deref(),
            });
        }
        self.metrics.request(&RequestRecord {
            registry: ctx.registry.as_deref().unwrap_or("-"),
            method: crate::metrics::method_label(&ctx.method),
            kind: ctx.kind,
            status,
            cache: ctx.cache,
            source: match ctx.cache {
                "hit" => "cache",
                "fill" => "fill",
                "-" => "local",
                _ => "upstream",
            },
            bytes: ctx.bytes_sent,
            seconds: ctx.started.elapsed().as_secs_f64(),
            stale: ctx.stale,
        });
    }
}

/// The subjects of the connection's verified client certificate; empty for plain HTTP and for
/// TLS clients that sent none.
fn client_cert_subjects(session: &Session) -> Vec<String> {
    session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|tls| tls.extension.get::<ClientCertSubjects>())
        .map(|s| s.0.clone())
        .unwrap_or_default()
}

/// The Host a request was sent to: the `Host` header (HTTP/1) or the `:authority` (HTTP/2).
fn request_host(req: &pingora::http::RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}
