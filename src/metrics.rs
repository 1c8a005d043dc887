//! Every Prometheus metric pullgate exports, registered once per gateway in its own registry.
//!
//! Owns: metric names, help texts and label sets. Labels are bounded: registry names, methods,
//! request kinds, status classes, cache outcomes, sources and reasons from fixed lists; never a
//! repository, a tag, a digest or a client address. Depends on nothing but the store's counters
//! (read at scrape time), so any module may record into a [`Metrics`] handle it was given.
//! A private registry per gateway (not the process-global one) keeps gateways that share a
//! process, as in tests, apart.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::store::StoreStats;

/// Request durations: 1 ms .. ~5 min.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The metrics of one gateway.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub served_bytes: IntCounterVec,
    pub stale_served: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub token_fetches: IntCounterVec,
    pub denials: IntCounterVec,
    pub signature_checks: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub proxy_protocol_rejected: IntCounterVec,
    /// Config reloads by outcome (`ok`, `invalid`, `refused`).
    pub config_reloads: IntCounterVec,
    /// The generation of the config in use: 1 at start, +1 per successful reload.
    pub config_generation: IntGauge,
    /// Always 1, labelled with the SHA-256 of the config text in use (one series at a time).
    config_info: IntGaugeVec,
    // Mirrors of the blob store's own counters, brought up to date at each scrape.
    cache_entries: IntGauge,
    cache_bytes: IntGauge,
    cache_max_bytes: IntGauge,
    fills_in_flight: IntGauge,
    fills_started: IntCounter,
    fill_waiters: IntCounter,
    fills_committed: IntCounter,
    fill_failures: IntCounterVec,
    evictions: IntCounter,
    pinned_entries: IntGauge,
    pinned_bytes: IntGauge,
    /// Warm jobs finished, by source (`config`, `api`) and outcome (`ok`, `failed`).
    pub warm_jobs: IntCounterVec,
    /// Warm jobs running now.
    pub warm_running: IntGauge,
    pub warm_manifests: IntCounter,
    pub warm_blobs: IntCounter,
    pub warm_bytes: IntCounter,
    integrity_failures: IntCounter,
    resealed_evictions: IntCounter,
    /// Key operations (`keys/`), by operation and outcome.
    key_operations: IntCounterVec,
    /// Calls to the key provider (KMS), by provider.
    kms_calls: IntCounterVec,
    /// Cluster: blob fills this replica asked another member for.
    pub forwards_sent: IntCounter,
    /// Cluster: peer requests this replica answered as the owner.
    pub forwards_served: IntCounter,
    /// Cluster: forwards that fell back to the upstream (the owner failed or refused).
    pub forwards_failed_over: IntCounter,
    cluster_members: IntGauge,
    cluster_members_down: IntGauge,
    cluster_member_changes: IntCounter,
    // Mirrors of the object store's (L2) counters.
    l2_hits: IntCounter,
    l2_misses: IntCounter,
    l2_errors: IntCounter,
    l2_read_bytes: IntCounter,
    l2_uploads: IntCounter,
    l2_uploaded_bytes: IntCounter,
    l2_manifest_hits: IntCounter,
    l2_manifest_misses: IntCounter,
    l2_manifest_uploads: IntCounter,
}

impl Metrics {
    /// Registers every metric in a new registry. `max_bytes` is `cache.max_size`.
    pub fn new(max_bytes: u64) -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let build_info = IntGaugeVec::new(
            Opts::new("pullgate_build_info", "Always 1; the version is a label."),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Metrics {
            requests: counter_vec(
                "pullgate_requests_total",
                "Requests answered, by registry, method, kind, status class and cache outcome.",
                &["registry", "method", "kind", "status", "cache"],
            ),
            request_duration: histogram(
                "pullgate_request_duration_seconds",
                "Time from request to the end of the response.",
                &["registry", "kind"],
            ),
            served_bytes: counter_vec(
                "pullgate_served_bytes_total",
                "Body bytes sent to clients, by where they came from (cache, fill, upstream).",
                &["registry", "source"],
            ),
            stale_served: counter_vec(
                "pullgate_stale_served_total",
                "Answers served from the cache while the upstream was unavailable (stale_if_error).",
                &["registry"],
            ),
            upstream_requests: counter_vec(
                "pullgate_upstream_requests_total",
                "Requests sent to upstream registries, by status class (error: no answer).",
                &["registry", "method", "status"],
            ),
            upstream_duration: histogram(
                "pullgate_upstream_request_duration_seconds",
                "Time until an upstream answered with its response head.",
                &["registry"],
            ),
            token_fetches: counter_vec(
                "pullgate_token_fetches_total",
                "Bearer token requests to token realms, by outcome (ok, error).",
                &["registry", "outcome"],
            ),
            denials: counter_vec(
                "pullgate_denials_total",
                "Requests refused by policy, by reason.",
                &["registry", "reason"],
            ),
            signature_checks: counter_vec(
                "pullgate_signature_checks_total",
                "Manifest answers decided by a signature policy, by outcome (verified, unsigned, \
                 bad_signature, error); a cached verdict counts.",
                &["registry", "outcome"],
            ),
            tls_handshakes: counter_vec(
                "pullgate_tls_handshakes_total",
                "Completed TLS handshakes on TLS listeners (outcome=\"ok\"; failed ones are logged).",
                &["outcome"],
            ),
            proxy_protocol_rejected: counter_vec(
                "pullgate_proxy_protocol_rejected_total",
                "Connections closed before TLS on proxy_protocol listeners, by reason \
                 (untrusted_peer, missing, malformed, timeout, closed).",
                &["reason"],
            ),
            config_reloads: counter_vec(
                "pullgate_config_reloads_total",
                "Config reloads (SIGHUP, file change, POST /-/reload) by outcome: ok, invalid \
                 (the new config does not validate), refused (it changes keys that need a restart).",
                &["outcome"],
            ),
            config_generation: gauge(
                "pullgate_config_generation",
                "Generation of the config in use: 1 at start, one more per applied reload.",
            ),
            config_info: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "pullgate_config_info",
                        "Always 1; sha256 is the SHA-256 of the config text in use.",
                    ),
                    &["sha256"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            cache_entries: gauge("pullgate_cache_entries", "Blobs in the cache."),
            cache_bytes: gauge("pullgate_cache_size_bytes", "Bytes of blobs in the cache."),
            cache_max_bytes: gauge(
                "pullgate_cache_max_size_bytes",
                "The cache's size bound (cache.max_size).",
            ),
            fills_in_flight: gauge(
                "pullgate_cache_fills_in_flight",
                "Blob fills from the upstream running now.",
            ),
            fills_started: counter(
                "pullgate_cache_fills_started_total",
                "Blob fills started (cache misses that fetched from the upstream).",
            ),
            fill_waiters: counter(
                "pullgate_cache_fill_waiters_total",
                "Requests that joined a fill already running instead of fetching again.",
            ),
            fills_committed: counter(
                "pullgate_cache_fills_committed_total",
                "Blob fills verified and committed to the cache.",
            ),
            fill_failures: counter_vec(
                "pullgate_cache_fill_failures_total",
                "Blob fills that ended without a committed blob, by reason.",
                &["reason"],
            ),
            evictions: counter(
                "pullgate_cache_evictions_total",
                "Blobs evicted to keep the cache under cache.max_size.",
            ),
            pinned_entries: gauge(
                "pullgate_cache_pinned_entries",
                "Blobs pinned against eviction ([[warm]] pin = true).",
            ),
            pinned_bytes: gauge(
                "pullgate_cache_pinned_bytes",
                "Bytes of pinned blobs (bounded by cache.pinned_max_size).",
            ),
            warm_jobs: counter_vec(
                "pullgate_warm_jobs_total",
                "Warm jobs finished, by source (config, api) and outcome (ok, failed).",
                &["source", "outcome"],
            ),
            warm_running: gauge("pullgate_warm_jobs_running", "Warm jobs running now."),
            warm_manifests: counter(
                "pullgate_warm_manifests_total",
                "Manifests fetched by warm jobs (through pullgate's own listener).",
            ),
            warm_blobs: counter(
                "pullgate_warm_blobs_total",
                "Blobs fetched whole by warm jobs.",
            ),
            warm_bytes: counter(
                "pullgate_warm_bytes_total",
                "Blob bytes warm jobs read through pullgate's own listener.",
            ),
            integrity_failures: counter(
                "pullgate_cache_integrity_failures_total",
                "Sealed cache files (blobs, manifests) that failed their integrity check and were quarantined.",
            ),
            resealed_evictions: counter(
                "pullgate_cache_encryption_evictions_total",
                "Cached blobs deleted because encryption was turned on or off or their key was revoked.",
            ),
            forwards_sent: counter(
                "pullgate_cluster_forwards_sent_total",
                "Blob fills that asked the digest's owner in the cluster instead of the upstream.",
            ),
            forwards_served: counter(
                "pullgate_cluster_forwards_served_total",
                "Peer blob requests answered as the digest's owner.",
            ),
            forwards_failed_over: counter(
                "pullgate_cluster_forwards_failed_over_total",
                "Forwards that fell back to the upstream because the owner failed or refused.",
            ),
            cluster_members: gauge(
                "pullgate_cluster_members",
                "Members of the cluster as this replica sees them, itself included (0 without [cluster]).",
            ),
            cluster_members_down: gauge(
                "pullgate_cluster_members_down",
                "Members skipped for now: a forward to them or a health probe of them failed within the back-off (10 s).",
            ),
            cluster_member_changes: counter(
                "pullgate_cluster_member_changes_total",
                "Times the member list changed (cluster.peers_dns answered differently); each change moves the owners of some digests.",
            ),
            l2_hits: counter(
                "pullgate_l2_hits_total",
                "Blob fills served from the object store (cache.l2) instead of the upstream or a peer.",
            ),
            l2_misses: counter(
                "pullgate_l2_misses_total",
                "Blob fills that found nothing in the object store.",
            ),
            l2_errors: counter(
                "pullgate_l2_errors_total",
                "Object store reads and uploads that failed or timed out (the pull went on without it), and objects deleted for not matching their digest.",
            ),
            l2_read_bytes: counter(
                "pullgate_l2_read_bytes_total",
                "Bytes read from the object store.",
            ),
            l2_uploads: counter(
                "pullgate_l2_uploads_total",
                "Verified blobs uploaded to the object store.",
            ),
            l2_uploaded_bytes: counter(
                "pullgate_l2_uploaded_bytes_total",
                "Bytes uploaded to the object store.",
            ),
            l2_manifest_hits: counter(
                "pullgate_l2_manifest_hits_total",
                "Manifests by digest read from the object store instead of the upstream.",
            ),
            l2_manifest_misses: counter(
                "pullgate_l2_manifest_misses_total",
                "Manifests by digest asked of the object store and not there.",
            ),
            l2_manifest_uploads: counter(
                "pullgate_l2_manifest_uploads_total",
                "Verified manifests uploaded to the object store.",
            ),
            key_operations: counter_vec(
                "pullgate_key_operations_total",
                "Operations on the cache encryption keys (unwrap, wrap, rewrap, rotate, check, revoked, unavailable, restored), by outcome.",
                &["operation", "outcome"],
            ),
            kms_calls: counter_vec(
                "pullgate_kms_calls_total",
                "Calls to the key provider holding the cache's KEK.",
                &["provider"],
            ),
            registry,
        };
        metrics.cache_max_bytes.set(clamp(max_bytes));
        metrics
    }

    /// Records the config now in use (its generation and text hash).
    pub fn config_in_use(&self, generation: u64, sha256: &str) {
        self.config_generation.set(clamp(generation));
        self.config_info.reset();
        self.config_info.with_label_values(&[sha256]).set(1);
    }

    /// `cache.max_size` changed on a reload.
    pub fn set_cache_max_bytes(&self, max_bytes: u64) {
        self.cache_max_bytes.set(clamp(max_bytes));
    }

    /// Records one answered request.
    pub fn request(&self, r: &RequestRecord<'_>) {
        self.requests
            .with_label_values(&[
                r.registry,
                r.method,
                r.kind,
                status_class(r.status),
                r.cache,
            ])
            .inc();
        self.request_duration
            .with_label_values(&[r.registry, r.kind])
            .observe(r.seconds);
        if r.bytes > 0 {
            self.served_bytes
                .with_label_values(&[r.registry, r.source])
                .inc_by(r.bytes);
        }
        if r.stale {
            self.stale_served.with_label_values(&[r.registry]).inc();
        }
    }

    /// Records one upstream exchange; `status` is `None` when no answer came.
    pub fn upstream(&self, registry: &str, method: &str, status: Option<u16>, seconds: f64) {
        let class = status.map_or("error", status_class);
        self.upstream_requests
            .with_label_values(&[registry, method_label(method), class])
            .inc();
        self.upstream_duration
            .with_label_values(&[registry])
            .observe(seconds);
    }

    pub fn key_operation(&self, operation: &str, outcome: &str) {
        self.key_operations
            .with_label_values(&[operation, outcome])
            .inc();
    }

    pub fn kms_call(&self, provider: &str) {
        self.kms_calls.with_label_values(&[provider]).inc();
    }

    pub fn token_fetch(&self, registry: &str, ok: bool) {
        self.token_fetches
            .with_label_values(&[registry, if ok { "ok" } else { "error" }])
            .inc();
    }

    /// The name of every metric registered, whether or not it has samples yet.
    pub fn names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let collectors: Vec<&dyn Collector> = vec![
            &self.requests,
            &self.request_duration,
            &self.served_bytes,
            &self.stale_served,
            &self.upstream_requests,
            &self.upstream_duration,
            &self.token_fetches,
            &self.denials,
            &self.signature_checks,
            &self.tls_handshakes,
            &self.cache_entries,
            &self.cache_bytes,
            &self.cache_max_bytes,
            &self.fills_in_flight,
            &self.fills_started,
            &self.fill_waiters,
            &self.fills_committed,
            &self.fill_failures,
            &self.evictions,
            &self.integrity_failures,
            &self.resealed_evictions,
            &self.key_operations,
            &self.kms_calls,
            &self.forwards_sent,
            &self.forwards_served,
            &self.forwards_failed_over,
            &self.cluster_members,
            &self.cluster_members_down,
            &self.cluster_member_changes,
            &self.l2_hits,
            &self.l2_misses,
            &self.l2_errors,
            &self.l2_read_bytes,
            &self.l2_uploads,
            &self.l2_uploaded_bytes,
            &self.l2_manifest_hits,
            &self.l2_manifest_misses,
            &self.l2_manifest_uploads,
        ];
        let mut names: Vec<String> = collectors
            .iter()
            .flat_map(|c| c.desc())
            .map(|d| d.fq_name.clone())
            .collect();
        names.push("pullgate_build_info".into());
        names
    }

    /// The Prometheus text format of every metric, with the store's counters brought up to date.
    pub fn render(&self, store: &StoreStats) -> String {
        self.sync_store(store);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// The cluster's member count and membership changes, brought up to date before a render.
    pub fn sync_cluster(&self, members: usize, down: usize, changes: u64) {
        self.cluster_members.set(clamp(members as u64));
        self.cluster_members_down.set(clamp(down as u64));
        catch_up(&self.cluster_member_changes, changes);
    }

    fn sync_store(&self, s: &StoreStats) {
        self.cache_entries.set(clamp(s.entries));
        self.cache_bytes.set(clamp(s.bytes));
        self.fills_in_flight.set(clamp(s.fills_in_flight));
        catch_up(&self.fills_started, s.fills_started);
        catch_up(&self.fill_waiters, s.fills_joined);
        catch_up(&self.fills_committed, s.fills_committed);
        catch_up(&self.evictions, s.evictions);
        self.pinned_entries.set(clamp(s.pinned_entries));
        self.pinned_bytes.set(clamp(s.pinned_bytes));
        catch_up(&self.integrity_failures, s.integrity_failures);
        catch_up(&self.resealed_evictions, s.resealed_evictions);
        if let Some(l2) = &s.l2 {
            catch_up(&self.l2_hits, l2.hits);
            catch_up(&self.l2_misses, l2.misses);
            catch_up(&self.l2_errors, l2.errors);
            catch_up(&self.l2_read_bytes, l2.read_bytes);
            catch_up(&self.l2_uploads, l2.uploads);
            catch_up(&self.l2_uploaded_bytes, l2.uploaded_bytes);
            catch_up(&self.l2_manifest_hits, l2.manifest_hits);
            catch_up(&self.l2_manifest_misses, l2.manifest_misses);
            catch_up(&self.l2_manifest_uploads, l2.manifest_uploads);
        }
        for (reason, n) in [
            ("refused", s.fills_refused),
            ("broken", s.fills_broken),
            ("invalid", s.fills_invalid),
            ("storage", s.fills_storage),
        ] {
            catch_up(&self.fill_failures.with_label_values(&[reason]), n);
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// One answered request, as the gateway saw it.
pub struct RequestRecord<'a> {
    pub registry: &'a str,
    pub method: &'a str,
    pub kind: &'a str,
    pub status: u16,
    pub cache: &'a str,
    /// Where the body came from: `cache`, `fill`, `upstream` or `local`.
    pub source: &'a str,
    pub bytes: u64,
    pub seconds: f64,
    pub stale: bool,
}

/// Moves a mirrored counter up to the store's value (the store's counters only grow).
fn catch_up(counter: &IntCounter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `2xx`, `4xx`, ...; `error` for 0 (no response written).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "error",
    }
}

/// Methods outside the registry API's set collapse into `other` (bounded labels).
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_store_counters_render_with_bounded_labels() {
        let m = Metrics::new(1 << 30);
        m.request(&RequestRecord {
            registry: "hub",
            method: method_label("GET"),
            kind: "blob",
            status: 200,
            cache: "hit",
            source: "cache",
            bytes: 42,
            seconds: 0.01,
            stale: true,
        });
        m.upstream("hub", "BREW", None, 0.2);
        let stats = StoreStats {
            entries: 3,
            bytes: 300,
            fills_started: 2,
            fills_broken: 1,
            ..Default::default()
        };
        let text = m.render(&stats);
        for line in [
            r#"pullgate_requests_total{cache="hit",kind="blob",method="GET",registry="hub",status="2xx"} 1"#,
            r#"pullgate_served_bytes_total{registry="hub",source="cache"} 42"#,
            r#"pullgate_stale_served_total{registry="hub"} 1"#,
            r#"pullgate_upstream_requests_total{method="other",registry="hub",status="error"} 1"#,
            r#"pullgate_cache_fill_failures_total{reason="broken"} 1"#,
            "pullgate_cache_entries 3",
            "pullgate_cache_fills_started_total 2",
            "pullgate_cache_max_size_bytes 1073741824",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // Scraping again does not double the mirrored counters.
        assert!(m
            .render(&stats)
            .contains("pullgate_cache_fills_started_total 2"));
        assert!(text.contains("pullgate_build_info{version="));
    }

    /// The dashboard and the alert rules in deploy/ use only metrics that exist.
    #[test]
    fn deploy_files_name_only_exported_metrics() {
        let names = Metrics::new(1).names();
        for (file, text) in [
            (
                "deploy/grafana/pullgate.json",
                include_str!("../deploy/grafana/pullgate.json"),
            ),
            (
                "deploy/prometheus/alerts.yml",
                include_str!("../deploy/prometheus/alerts.yml"),
            ),
        ] {
            let mut used = 0;
            for (start, _) in text.match_indices("pullgate_") {
                let name: String = text[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    names.iter().any(|n| n == base),
                    "{file}: {name} is not exported"
                );
                used += 1;
            }
            assert!(used > 5, "{file} uses pullgate's metrics");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(206), "2xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(0), "error");
    }
}
