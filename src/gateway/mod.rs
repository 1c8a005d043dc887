//! The edge: the only `impl ProxyHttp` ([`Edge`]), where Pingora's `Session` meets pullgate,
//! and the config snapshot every request runs on ([`Gateway`]).
//!
//! Pulls are answered from `request_filter` (the `Ok(true)` contract): parse the path, route,
//! decide, answer from the store or through `UpstreamClient`. Pushes are planned there and then
//! go through Pingora's proxy path (`upstream_peer` and the filters below), with credentials
//! injected. The hooks stay short; the work lives in `serve.rs` (what to ask and answer) and
//! `respond.rs` (how bytes are written).

mod access;
mod blob;
mod confirm;
mod ctx;
mod data;
mod delete;
mod flight;
mod job;
mod manifest;
mod peer;
mod push;
mod range;
mod referrers;
mod refusal;
mod respond;
mod serve;
mod signature;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};

use crate::audit::{Audit, AuditRecord};
use crate::config::{Config, OnRevoked};
use crate::keys::{Health, KeyService};
use crate::metrics::{Metrics, RequestRecord};
use crate::policy::Policy;
use crate::route::RouteTable;
use crate::store::{BlobStore, FillPolicy, Links, ManifestStore};
use crate::upstream::UpstreamClient;
pub use ctx::RequestCtx;
pub use peer::PROBE_INTERVAL;

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

/// One snapshot of the running gateway: everything derived from one config (routes, upstream
/// clients, policy, audit sink, data-endpoint key) plus handles to the stores, which every
/// snapshot shares. Immutable: a reload builds the next one and swaps it in whole ([`Edge`]);
/// a request keeps the snapshot it started with until it ends, fills included.
pub struct Gateway {
    config: Arc<Config>,
    routes: RouteTable,
    upstreams: HashMap<String, Arc<UpstreamClient>>,
    /// What each upstream client was built from ([`UpstreamKey`]), to carry it over a reload.
    upstream_keys: HashMap<String, UpstreamKey>,
    /// Extra trust anchors per registry (its `ca`), for the push path's Pingora connections.
    upstream_cas: HashMap<String, Arc<[pingora::utils::tls::WrappedX509]>>,
    store: BlobStore,
    manifests: Arc<ManifestStore>,
    links: Arc<Links>,
    metrics: Arc<Metrics>,
    policy: Policy,
    audit: Arc<Audit>,
    /// The key hierarchy while `[cache.encryption]` is set. Carried over a reload that keeps
    /// the provider; a new one otherwise (the stores switch in `apply_cache_limits`).
    keys: Option<Arc<KeyService>>,
    /// Signs and checks data-endpoint URLs; loaded when any registry has `data_hosts`.
    redirect_key: Option<crate::sign::RedirectKey>,
    /// `[cluster]`: membership, owner choice and the peer client (`peer.rs`); rebuilt on a
    /// reload, so a reload also forgets which peers were in back-off.
    cluster: Option<Arc<peer::Cluster>>,
    /// Signature verdicts; carried over a reload that changes no signature policy.
    verdicts: Arc<signature::Verdicts>,
    /// Manifest and tag questions to the upstream in progress (`flight.rs`); carried over.
    flights: Arc<flight::Flights>,
    /// Marks this process's own warm requests (one per process, carried across reloads).
    warm_key: crate::warm::WarmKey,
    /// `cache.warm_bandwidth`, shared with the warm engine: paces the fills warm requests start.
    warm_pace: crate::warm::Pace,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("registries", &self.config.registries.len())
            .finish_non_exhaustive()
    }
}

/// The stores every snapshot shares: opened once per process, at start.
struct Stores {
    store: BlobStore,
    manifests: Arc<ManifestStore>,
    keys: Option<Arc<KeyService>>,
    links: Arc<Links>,
    warm_key: crate::warm::WarmKey,
    warm_pace: crate::warm::Pace,
}

/// Everything an upstream client is built from besides its metrics: the registry's name,
/// upstream origin, credentials (the source, and an inline or env value), token realm hosts and
/// the bytes of its `ca` file. Equal keys on a reload carry the client over, with its tokens,
/// learned challenge and pooled connections, so a reload causes no token storm. A hash, so no
/// secret is kept twice; no `Debug`, as it is derived from one.
#[derive(PartialEq, Eq)]
struct UpstreamKey([u8; 32]);

impl UpstreamKey {
    fn of(registry: &crate::config::Registry) -> UpstreamKey {
        use crate::config::{CredentialSource, PasswordSource};
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(registry.name.as_bytes());
        field(registry.upstream.origin.as_bytes());
        for realm in &registry.realm_hosts {
            field(realm.as_bytes());
        }
        field(b"|");
        match &registry.credentials {
            None => field(b"anonymous"),
            Some(CredentialSource::Basic { username, password }) => {
                field(b"basic");
                field(username.as_bytes());
                match password {
                    PasswordSource::Inline(secret) => field(secret.expose().as_bytes()),
                    PasswordSource::Env { var, value } => {
                        field(var.as_bytes());
                        field(value.expose().as_bytes());
                    }
                    // Re-read by the client itself whenever the file changes.
                    PasswordSource::File(path) => field(path.as_os_str().as_encoded_bytes()),
                }
            }
            Some(CredentialSource::DockerConfig { path }) => {
                field(b"docker_config");
                field(path.as_os_str().as_encoded_bytes());
            }
            Some(CredentialSource::Helper { name }) => {
                field(b"helper");
                field(name.as_bytes());
            }
        }
        match &registry.ca {
            None => field(b"no ca"),
            // A CA file rewritten in place is a new trust store: the contents count.
            Some(path) => field(&std::fs::read(path).unwrap_or_default()),
        }
        UpstreamKey(h.finalize().into())
    }
}

/// A key operation as an audit line.
#[derive(serde::Serialize)]
struct KeyAuditLine<'a> {
    time: String,
    action: &'static str,
    #[serde(flatten)]
    event: &'a crate::keys::KeyEvent,
}

/// The key service for `config`: `previous` when its provider config is the same (timings
/// may differ), a new one otherwise, none without `[cache.encryption]`.
fn start_keys(
    config: &Config,
    previous: Option<&Arc<KeyService>>,
) -> Result<Option<Arc<KeyService>>, String> {
    let Some(enc) = &config.cache.encryption else {
        return Ok(None);
    };
    if let Some(previous) = previous.filter(|p| p.config().provider == enc.provider) {
        return Ok(Some(Arc::clone(previous)));
    }
    KeyService::start(enc, &config.cache.dir)
        .map(Some)
        .map_err(|e| format!("cache.encryption: {e}"))
}

impl Gateway {
    /// The first snapshot: opens the cache under `cache.dir` (blocking: call before serving).
    pub fn open(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, String> {
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
        let mut manifests = ManifestStore::open(&config.cache.dir, config.cache.negative_ttl)
            .map_err(cache_error)?;
        manifests.share_integrity_counter(store.integrity_counter());
        let links = Arc::new(Links::open(&config.cache.dir).map_err(cache_error)?);
        store.set_pinned_max_size(config.cache.pinned_max_size);
        if let Some(l2) = &config.cache.l2 {
            store.set_l2(Arc::new(crate::store::L2::from_config(l2)?));
        }
        let keys = start_keys(&config, None)?;
        let stores = Stores {
            store,
            manifests: Arc::new(manifests),
            keys,
            links,
            warm_key: crate::warm::WarmKey::generate(),
            warm_pace: crate::warm::Pace::default(),
        };
        let gateway = Gateway::build(config, metrics, stores, None)?;
        gateway.apply_keys();
        Ok(gateway)
    }

    /// The snapshot for a reloaded `config`: the same stores and metrics; upstream clients whose
    /// [`UpstreamKey`] did not change carried over. Has no effect on `self` or the stores (see
    /// [`Gateway::apply_cache_limits`]), so a failure leaves the running gateway as it was.
    pub fn next(&self, config: Arc<Config>) -> Result<Self, String> {
        let stores = Stores {
            store: self.store.clone(),
            manifests: Arc::clone(&self.manifests),
            keys: start_keys(&config, self.keys.as_ref())?,
            links: Arc::clone(&self.links),
            warm_key: self.warm_key.clone(),
            warm_pace: self.warm_pace.clone(),
        };
        Gateway::build(config, Arc::clone(&self.metrics), stores, Some(self))
    }

    /// Brings the shared stores to this snapshot's `cache.max_size` (shrinking evicts now),
    /// `negative_ttl` and `fill_stall_timeout`. Run once this snapshot is the one in use.
    pub fn apply_cache_limits(&self) {
        let cache = &self.config.cache;
        self.store.set_max_size(cache.max_size);
        self.store.set_stall_timeout(cache.fill_stall_timeout);
        self.store.set_pinned_max_size(cache.pinned_max_size);
        self.manifests.set_negative_ttl(cache.negative_ttl);
        self.metrics.set_cache_max_bytes(cache.max_size);
        self.apply_keys();
    }

    /// Points the stores at this snapshot's key service (or none: plaintext), its audit
    /// lines at this snapshot's audit log, and its revocations at the stores.
    fn apply_keys(&self) {
        let Some(keys) = &self.keys else {
            self.store.set_keys(None);
            if self.manifests.set_keys(None) {
                let manifests = Arc::clone(&self.manifests);
                std::thread::spawn(move || manifests.sweep_now());
            }
            return;
        };
        if let Some(enc) = &self.config.cache.encryption {
            keys.set_timings(enc);
        }
        let audit = Arc::clone(&self.audit);
        let metrics = Arc::clone(&self.metrics);
        keys.set_sink(Box::new(move |event| {
            metrics.key_operation(event.operation, event.outcome);
            audit.record_value(&KeyAuditLine {
                time: crate::audit::now(),
                action: "key",
                event,
            });
        }));
        keys.set_metrics(Arc::clone(&self.metrics));
        let (store, manifests) = (self.store.clone(), Arc::clone(&self.manifests));
        keys.set_on_revoked(Box::new(move || {
            manifests.forget_memory();
            store.sweep();
            let manifests = Arc::clone(&manifests);
            std::thread::spawn(move || manifests.sweep_now());
        }));
        let as_keys: Arc<dyn crate::store::Keys> = Arc::clone(keys) as _;
        self.store.set_keys(Some(Arc::clone(&as_keys)));
        if self.manifests.set_keys(Some(as_keys)) {
            let manifests = Arc::clone(&self.manifests);
            std::thread::spawn(move || manifests.sweep_now());
        }
    }

    /// `on_revoked = "deny"` and the key is revoked: cached content is answered with 503.
    pub(crate) fn keys_deny(&self) -> bool {
        let deny = self
            .config
            .cache
            .encryption
            .as_ref()
            .is_some_and(|e| e.on_revoked == OnRevoked::Deny);
        deny && self
            .keys
            .as_ref()
            .is_some_and(|k| k.health() == Health::Denied)
    }

    /// The key service, for `pullgate keys` through the admin listener.
    pub fn keys(&self) -> Option<Arc<KeyService>> {
        self.keys.clone()
    }

    /// Members of the cluster as this replica sees them (0 without `[cluster]`). A scrape also
    /// starts a due DNS refresh, so an idle replica's list (and this figure) stays current.
    /// The members this replica hashes over, and how many of them are in back-off (0, 0
    /// outside a cluster). Also refreshes a DNS member list that is due.
    pub fn cluster_members(&self) -> (usize, usize) {
        self.cluster.as_ref().map_or((0, 0), |c| {
            c.refresh_members();
            let m = &c.membership;
            (m.members().len(), m.down_count(std::time::Instant::now()))
        })
    }

    /// Probes the other members once (`peer::Cluster::probe`); nothing outside a cluster.
    pub async fn probe_peers(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.probe().await;
        }
    }

    fn build(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        stores: Stores,
        previous: Option<&Gateway>,
    ) -> Result<Self, String> {
        let routes = RouteTable::new(&config.registries);
        let mut upstreams = HashMap::new();
        let mut upstream_keys = HashMap::new();
        let mut carried = 0usize;
        let mut client_for = |partition: String,
                              registry: Arc<crate::config::Registry>,
                              key_name: &dyn Fn() -> String|
         -> Result<(), String> {
            let key = UpstreamKey::of(&registry);
            let old = previous.and_then(|p| {
                (p.upstream_keys.get(&partition) == Some(&key))
                    .then(|| p.upstreams.get(&partition).cloned())
                    .flatten()
            });
            let client = match old {
                Some(client) => {
                    carried += 1;
                    client
                }
                None => Arc::new(
                    UpstreamClient::new(registry, metrics.clone())
                        .map_err(|e| format!("{}: {e}", key_name()))?,
                ),
            };
            upstreams.insert(partition.clone(), client);
            upstream_keys.insert(partition, key);
            Ok(())
        };
        for registry in &config.registries {
            client_for(registry.name.clone(), registry.clone(), &|| {
                format!("registry.{}", registry.name)
            })?;
            // One client per scoped credential: its own tokens, challenge and connections.
            for scoped in &registry.scoped_credentials {
                let mut with = (**registry).clone();
                with.credentials = Some(scoped.credentials.clone());
                client_for(
                    job::partition(&registry.name, Some(&scoped.name)),
                    Arc::new(with),
                    &|| {
                        format!(
                            "registry.{}.scoped_credentials.{}",
                            registry.name, scoped.name
                        )
                    },
                )?;
            }
        }
        if previous.is_some() {
            tracing::debug!(
                carried,
                new = upstreams.len() - carried,
                "upstream clients for the new config"
            );
        }
        let mut upstream_cas = HashMap::new();
        for registry in &config.registries {
            if let Some(path) = &registry.ca {
                let ca =
                    load_ca(path).map_err(|e| format!("registry.{}.ca: {e}", registry.name))?;
                upstream_cas.insert(registry.name.clone(), ca);
            }
        }
        let audit = Arc::new(Audit::open(&config.server.audit_log)?);
        let policy = Policy::new(&config);
        let redirect_key = redirect_key(&config)?;
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(peer::Cluster::from_config(c)?)),
            None => None,
        };
        let verdicts = signature::Verdicts::carry(previous.map(|p| &p.verdicts), &config);
        Ok(Gateway {
            config,
            routes,
            upstreams,
            upstream_keys,
            upstream_cas,
            store: stores.store,
            manifests: stores.manifests,
            links: stores.links,
            metrics,
            policy,
            audit,
            keys: stores.keys,
            redirect_key,
            cluster,
            verdicts,
            flights: previous.map_or_else(Default::default, |p| Arc::clone(&p.flights)),
            warm_key: stores.warm_key,
            warm_pace: stores.warm_pace,
        })
    }

    /// The config this snapshot was built from.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The blob store handle (for the admin listener's metrics).
    pub fn store(&self) -> BlobStore {
        self.store.clone()
    }

    /// The secret of this process's warm requests, for its warm engine.
    pub fn warm_key(&self) -> crate::warm::WarmKey {
        self.warm_key.clone()
    }

    /// The warm bandwidth cap, for its warm engine (which sets it from the config).
    pub fn warm_pace(&self) -> crate::warm::Pace {
        self.warm_pace.clone()
    }

    /// Whether `ip` is in this config's `server.trusted_proxies` (the PROXY protocol hook).
    pub fn trusts_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.policy.trusted_proxies().contains(ip)
    }

    /// The upstream client of a cache partition (`job::partition`).
    fn upstream(&self, partition: &str) -> Option<&Arc<UpstreamClient>> {
        self.upstreams.get(partition)
    }
}

/// The edge: Pingora's `ProxyHttp`. Holds the snapshot in use behind an atomic swap; every
/// request loads it once, in `new_ctx`, and keeps it in its context to the end.
pub struct Edge {
    current: Arc<ArcSwap<Gateway>>,
    next_request: AtomicU64,
    /// Mixed into request ids so they differ across restarts.
    id_nonce: u64,
}

impl Edge {
    pub fn new(current: Arc<ArcSwap<Gateway>>) -> Edge {
        let id_nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            .rotate_left(32);
        Edge {
            current,
            next_request: AtomicU64::new(1),
            id_nonce,
        }
    }

    fn request_id(&self) -> ctx::RequestId {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        ctx::RequestId::new(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.id_nonce)
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.request_id(), self.current.load_full())
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // None. Pingora's default is its compression module, switched off, which still
        // allocates and runs its filters on every request; pullgate compresses nothing
        // (layers are compressed already, manifests are small).
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.tls_subjects = client_cert_subjects(session);
        let gw = Arc::clone(&ctx.gateway);
        match serve::serve(&gw, session, ctx).await {
            // A push continues on Pingora's proxy path (upstream_peer and the filters below).
            Ok(()) if ctx.push.is_some() => Ok(false),
            Ok(()) => Ok(true),
            Err(job::Failure::Respond(error)) => {
                respond::oci_error(session, ctx, &error).await?;
                Ok(true)
            }
            Err(job::Failure::Abort(reason)) => {
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
        if let Some(ca) = ctx.gateway.upstream_cas.get(&registry.name) {
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
        for hop in [
            "x-forwarded-for",
            "forwarded",
            "cookie",
            crate::warm::KEY_HEADER,
            crate::warm::ACCOUNT_HEADER,
        ] {
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
                push::after_manifest_write(&ctx.gateway, plan, write, upstream_response);
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
        if ctx.kind == peer::HEALTH_KIND {
            // Every member probes every other every 2 s: not worth a line; the prober logs a
            // probe that failed.
            return;
        }
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
        let gw = Arc::clone(&ctx.gateway);
        if ctx.kind != "other" {
            gw.audit.record(&AuditRecord {
                time: std::time::SystemTime::now(),
                request_id: ctx.request_id.as_str(),
                client: ctx.client,
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
                filled_by: ctx.filled_by.as_deref(),
                served_by: gw.cluster.as_deref().map(peer::Cluster::advertise),
            });
        }
        gw.metrics.request(&RequestRecord {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, password: &str, zones: &str) -> Arc<Config> {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:5000\"]\naudit_log = \"{}\"\n[cache]\ndir = \"{}\"\n{zones}\n\
             [[registry]]\nname = \"a\"\nupstream = \"https://a.example\"\nhosts = [\"a.internal\"]\n\
             credentials = {{ username = \"u\", password = \"{password}\" }}\n\
             [[registry]]\nname = \"b\"\nupstream = \"https://b.example\"\nhosts = [\"b.internal\"]\n",
            dir.join("audit.log").display(),
            dir.join("cache").display()
        );
        Arc::new(crate::config::load_str(&text, dir).expect("valid config"))
    }

    /// A snapshot of a small config with its cache in a temp dir, for tests that need one.
    pub(super) fn snapshot() -> (tempfile::TempDir, Arc<Gateway>) {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let gw = Gateway::open(
            config(dir.path(), "one", ""),
            Arc::new(Metrics::new(1 << 30)),
        );
        (dir, Arc::new(gw.unwrap()))
    }

    #[test]
    fn a_reload_carries_over_the_upstream_clients_whose_settings_did_not_change() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new(1 << 30));
        let first = Gateway::open(config(dir.path(), "one", ""), metrics).unwrap();
        let same = |a: &Gateway, b: &Gateway, name: &str| {
            Arc::ptr_eq(&a.upstreams[name], &b.upstreams[name])
        };

        // A policy edit: every client (tokens, challenge, connections) carried over.
        let zoned = first
            .next(config(
                dir.path(),
                "one",
                "[zones]\nvpc = [\"10.0.0.0/8\"]\n",
            ))
            .unwrap();
        assert!(same(&first, &zoned, "a") && same(&first, &zoned, "b"));
        assert!(Arc::ptr_eq(&first.manifests, &zoned.manifests), "one cache");

        // A rotated password: a new client for that registry only.
        let rotated = zoned.next(config(dir.path(), "two", "")).unwrap();
        assert!(!same(&zoned, &rotated, "a"));
        assert!(same(&zoned, &rotated, "b"));
    }

    #[test]
    fn a_reload_turns_the_cluster_on_changes_its_members_and_turns_it_off() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.key"), "k".repeat(40)).unwrap();
        let cluster = |peers: &str| {
            format!(
                "[cluster]\npeers = [{peers}]\nadvertise = \"127.0.0.1:5000\"\nkey_file = \"cluster.key\"\n"
            )
        };
        let metrics = Arc::new(Metrics::new(1 << 30));
        let alone = Gateway::open(config(dir.path(), "one", ""), metrics).unwrap();
        assert!(alone.cluster.is_none());
        let two = alone
            .next(config(
                dir.path(),
                "one",
                &cluster("\"127.0.0.1:5000\", \"127.0.0.2:5000\""),
            ))
            .unwrap();
        let members = |gw: &Gateway| gw.cluster.as_ref().map(|c| c.membership.members().len());
        assert_eq!(members(&two), Some(2));
        let three = two
            .next(config(
                dir.path(),
                "one",
                &cluster("\"127.0.0.1:5000\", \"127.0.0.2:5000\", \"127.0.0.3:5000\""),
            ))
            .unwrap();
        assert_eq!(members(&three), Some(3));
        assert!(three
            .next(config(dir.path(), "one", ""))
            .unwrap()
            .cluster
            .is_none());
    }
}
