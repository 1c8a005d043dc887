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
mod data;
mod delete;
mod manifest;
mod push;
mod range;
mod referrers;
mod refusal;
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
use crate::store::{BlobStore, FillPolicy, Links, ManifestStore};
use crate::upstream::UpstreamClient;
pub use ctx::RequestCtx;

/// Connecting to an upstream for a push.
const PUSH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// No byte either way for this long ends a push request.
const PUSH_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Pooled upstream connections of the push path close after this long unused.
const PUSH_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The names of a verified client certificate (its CN and DNS SANs), attached to a TLS
/// connection by the listener after the handshake and copied into every request's context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCertSubjects(pub Vec<String>);

/// Shared, read-only state of a running gateway.
pub struct Gateway {
    config: Arc<Config>,
    routes: RouteTable,
    upstreams: HashMap<String, Arc<UpstreamClient>>,
    /// Extra trust anchors per registry (its `ca`), for the push path's Pingora connections.
    upstream_cas: HashMap<String, Arc<[pingora::utils::tls::WrappedX509]>>,
    store: BlobStore,
    manifests: ManifestStore,
    links: Arc<Links>,
    metrics: Arc<Metrics>,
    policy: Policy,
    audit: Audit,
    /// Signs and checks data-endpoint URLs; loaded when any registry has `data_hosts`.
    redirect_key: Option<crate::sign::RedirectKey>,
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
            // One client per scoped credential: its own tokens, challenge and connections.
            for scoped in &registry.scoped_credentials {
                let mut with = (**registry).clone();
                with.credentials = Some(scoped.credentials.clone());
                let client = UpstreamClient::new(Arc::new(with), metrics.clone()).map_err(|e| {
                    format!(
                        "registry.{}.scoped_credentials.{}: {e}",
                        registry.name, scoped.name
                    )
                })?;
                let key = serve::partition(&registry.name, Some(&scoped.name));
                upstreams.insert(key, Arc::new(client));
            }
        }
        let mut upstream_cas = HashMap::new();
        for registry in &config.registries {
            if let Some(path) = &registry.ca {
                let ca =
                    load_ca(path).map_err(|e| format!("registry.{}.ca: {e}", registry.name))?;
                upstream_cas.insert(registry.name.clone(), ca);
            }
        }
        let fill_policy = FillPolicy {
            stall_timeout: config.cache.fill_stall_timeout,
            ..FillPolicy::default()
        };
        let (store, stats) =
            BlobStore::open_with(&config.cache.dir, config.cache.max_size, fill_policy).map_err(
                |e| format!("cache.dir: cannot use {}: {e}", config.cache.dir.display()),
            )?;
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
        let redirect_key = redirect_key(&config)?;
        let id_nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            .rotate_left(32);
        Ok(Gateway {
            config,
            routes,
            upstreams,
            upstream_cas,
            store,
            manifests,
            links,
            metrics,
            policy,
            audit,
            redirect_key,
            next_request: AtomicU64::new(1),
            id_nonce,
        })
    }

    /// The blob store handle (for the admin listener's metrics).
    pub fn store(&self) -> BlobStore {
        self.store.clone()
    }

    /// The upstream client of a cache partition (`serve::partition`).
    fn upstream(&self, partition: &str) -> Option<&Arc<UpstreamClient>> {
        self.upstreams.get(partition)
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
            // A push continues on Pingora's proxy path (upstream_peer and the filters below).
            Ok(()) if ctx.push.is_some() => Ok(false),
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
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(plan) = &ctx.push else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "pullgate answers every pull in request_filter",
            ));
        };
        // Resolved here, without blocking, and checked by the SSRF guard: `HttpPeer::new`
        // would resolve with blocking DNS.
        let addr = plan
            .client
            .resolve()
            .await
            .map_err(|e| Error::explain(ErrorType::ConnectError, e.to_string()))?;
        let registry = plan.client.registry();
        let up = &registry.upstream;
        let mut peer = HttpPeer::new(addr, up.https, up.host.clone());
        peer.options.connection_timeout = Some(PUSH_CONNECT_TIMEOUT);
        peer.options.total_connection_timeout = Some(PUSH_CONNECT_TIMEOUT);
        peer.options.read_timeout = Some(PUSH_IO_TIMEOUT);
        peer.options.write_timeout = Some(PUSH_IO_TIMEOUT);
        peer.options.idle_timeout = Some(PUSH_IDLE_TIMEOUT);
        if let Some(ca) = self.upstream_cas.get(&registry.name) {
            peer.options.ca = Some(ca.clone());
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(plan) = &ctx.push else {
            return Ok(());
        };
        let uri = plan
            .path_and_query
            .parse::<http::Uri>()
            .map_err(|e| Error::explain(ErrorType::InternalError, e.to_string()))?;
        upstream_request.set_uri(uri);
        upstream_request.insert_header(http::header::HOST, plan.host.as_str())?;
        // Invariant 1: the caller's credentials (for pullgate) never reach the upstream.
        upstream_request.remove_header(&http::header::AUTHORIZATION);
        if let Some(auth) = &plan.authorization {
            upstream_request.insert_header(http::header::AUTHORIZATION, auth.expose())?;
        }
        for hop in ["x-forwarded-for", "forwarded", "cookie"] {
            upstream_request.remove_header(hop);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(plan) = &ctx.push else {
            return Ok(());
        };
        let status = upstream_response.status;
        ctx.upstream_status = Some(status.as_u16());
        if let Some(error) = push::refusal(plan, status.as_u16()) {
            // Never the upstream's challenge: `fail_to_proxy` writes pullgate's own error.
            ctx.proxy_error = Some(error);
            return Err(Error::explain(
                ErrorType::HTTPStatus(status.as_u16()),
                "upstream refused the request",
            ));
        }
        if let Some(location) = upstream_response
            .headers
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
        {
            let Some(rewritten) = push::rewrite_location(location, &plan.locations) else {
                let error = push::foreign_location(plan);
                ctx.note_error("upstream sent a Location outside the repository");
                ctx.proxy_error = Some(error);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(502),
                    "upstream sent a Location outside the repository",
                ));
            };
            upstream_response.insert_header(http::header::LOCATION, rewritten)?;
        }
        upstream_response.remove_header("set-cookie");
        if status.is_success() {
            if let Some(write) = &plan.manifest {
                // A new digest for a tag is visible to the next pull at once.
                push::after_manifest_write(self, plan, write, upstream_response);
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> pingora::proxy::FailToProxy {
        push::fail_to_proxy(session, e, ctx).await
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
                "-" | "redirect" => "local",
                _ => "upstream",
            },
            bytes: ctx.bytes_sent,
            seconds: ctx.started.elapsed().as_secs_f64(),
            stale: ctx.stale,
        });
    }
}

/// The data-endpoint key: from `server.redirect_key_file`, else generated once in the cache
/// dir. `None` when no registry has data hosts (nothing to sign or check).
fn redirect_key(config: &Config) -> Result<Option<crate::sign::RedirectKey>, String> {
    use crate::sign::RedirectKey;
    if config.registries.iter().all(|r| r.data_hosts.is_empty()) {
        return Ok(None);
    }
    let key = match &config.server.redirect_key_file {
        Some(path) => {
            RedirectKey::load(path).map_err(|e| format!("server.redirect_key_file: {e}"))?
        }
        None => RedirectKey::load_or_create(&config.cache.dir)
            .map_err(|e| format!("cache.dir: cannot keep the data-endpoint key: {e}"))?,
    };
    Ok(Some(key))
}

/// Whether the request came over a TLS listener.
fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Every certificate of a PEM file, as Pingora's per-peer trust anchors.
fn load_ca(
    path: &std::path::Path,
) -> std::result::Result<Arc<[pingora::utils::tls::WrappedX509]>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<pingora::utils::tls::WrappedX509> = rustls_pemfile::certs(&mut pem.as_slice())
        .map(|c| {
            c.map(|der| {
                pingora::utils::tls::WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509)
            })
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs.into())
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
