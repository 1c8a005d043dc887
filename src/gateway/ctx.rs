//! `RequestCtx`: what is known about one request as it moves through the gateway, and the
//! access log line written from it at the end.

use std::net::IpAddr;
use std::time::Instant;

/// A request's id: 16 hex digits, kept inline (made for every request, so no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId([u8; 16]);

impl RequestId {
    pub fn new(n: u64) -> RequestId {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut id = [0; 16];
        for (i, digit) in id.iter_mut().enumerate() {
            *digit = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
        }
        RequestId(id)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("-")
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-request state, filled as the request is routed and served.
#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: RequestId,
    /// The config snapshot this request runs on, from its start to its end (a reload during
    /// the request changes nothing for it).
    pub gateway: std::sync::Arc<super::Gateway>,
    pub started: Instant,
    pub method: String,
    /// The request path, escaped and cut to a safe length: fit for a log line.
    pub path: String,
    /// The registry the request was routed to.
    pub registry: Option<String>,
    /// `manifest`, `blob`, `tags`, `referrers`, `base`, ...
    pub kind: &'static str,
    /// Echoed as `OCI-Namespace` when the request was routed by `?ns=`.
    pub namespace: Option<String>,
    pub upstream_status: Option<u16>,
    /// Cache outcome: `hit`, `fill` (a blob fill started or joined), `miss` (a manifest
    /// fetched), `revalidated` (a tag asked again), `peer` (a tag answered by its owner in
    /// the cluster), `negative` (a remembered 404), `bypass`, or `-`.
    pub cache: &'static str,
    /// Served from the cache while the upstream could not be asked (`stale_if_error`); the
    /// response carries a `Warning` header.
    pub stale: bool,
    /// Body bytes written to the client.
    pub bytes_sent: u64,
    /// The repository (upstream name) and the tag or digest, once parsed and routed.
    pub repository: Option<String>,
    pub reference: Option<String>,
    /// Verified client-certificate subjects (CN, DNS SANs) of a TLS connection.
    pub tls_subjects: Vec<String>,
    /// What policy saw and decided (see `access.rs`).
    pub client: Option<IpAddr>,
    pub zone: Option<String>,
    pub identity: Option<String>,
    /// `pull` or `push`.
    pub action: &'static str,
    /// `allow`, `deny`, or `none` when the request ended before policy.
    pub decision: &'static str,
    pub reason: Option<&'static str>,
    /// The name of the upstream credential in use, for the audit line.
    pub credential: Option<String>,
    /// Policy allowed an anonymous caller while password identities exist: an upstream
    /// refusal is answered with pullgate's own Basic challenge (`refusal.rs`).
    pub could_log_in: bool,
    /// An error found on Pingora's proxy path (an upstream refusal), written by
    /// `fail_to_proxy` instead of the upstream's answer.
    pub proxy_error: Option<crate::oci::OciError>,
    /// Set for a push: the request goes to the upstream through Pingora's proxy path.
    pub push: Option<super::push::PushPlan>,
    /// Set for this process's own warm requests (the secret header checked by `serve`).
    pub warm: Option<WarmCaller>,
    /// Why the request failed, for the access line (never a secret: built from our own errors).
    pub error: Option<String>,
    /// For a blob fill: which replica fetched it from the upstream (audit `filled_by`).
    pub filled_by: Option<String>,
}

/// A warm request of this process's engine: the scoped credentials it fills for (`None`: the
/// registry's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmCaller {
    pub account: Option<String>,
}

impl RequestCtx {
    pub fn new(request_id: RequestId, gateway: std::sync::Arc<super::Gateway>) -> Self {
        RequestCtx {
            request_id,
            gateway,
            started: Instant::now(),
            method: String::new(),
            path: String::new(),
            registry: None,
            kind: "other",
            namespace: None,
            upstream_status: None,
            cache: "-",
            stale: false,
            bytes_sent: 0,
            repository: None,
            reference: None,
            tls_subjects: Vec::new(),
            client: None,
            zone: None,
            identity: None,
            action: "pull",
            decision: "none",
            reason: None,
            credential: None,
            could_log_in: false,
            proxy_error: None,
            push: None,
            warm: None,
            error: None,
            filled_by: None,
        }
    }

    pub fn mark_stale(&mut self, stale: bool) {
        self.stale |= stale;
    }

    pub fn note_error(&mut self, message: &str) {
        self.error = Some(message.chars().take(512).collect());
    }

    /// One access line per request.
    pub fn log_access(&self, status: u16) {
        crate::access_log::AccessLine {
            request_id: self.request_id.as_str(),
            method: &self.method,
            path: &self.path,
            status,
            registry: self.registry.as_deref().unwrap_or("-"),
            kind: self.kind,
            upstream_status: self.upstream_status.unwrap_or(0),
            cache: self.cache,
            stale: self.stale,
            client: self.client,
            zone: self.zone.as_deref().unwrap_or(""),
            identity: self.identity.as_deref().unwrap_or(""),
            decision: self.decision,
            bytes: self.bytes_sent,
            duration_ms: self.started.elapsed().as_millis() as u64,
            error: self.error.as_deref().unwrap_or(""),
        }
        .log();
    }
}

/// A path made safe to log: control characters escaped, at most 256 characters.
pub fn loggable_path(path: &str) -> String {
    let plain = |b: u8| (0x20..0x7f).contains(&b) && !matches!(b, b'\\' | b'"' | b'\'');
    if path.len() <= 256 && path.bytes().all(plain) {
        // What clients send: printable ASCII that `escape_debug` leaves alone.
        return path.to_owned();
    }
    let escaped: String = path.escape_debug().collect();
    if escaped.chars().count() > 256 {
        let cut: String = escaped.chars().take(256).collect();
        format!("{cut}...")
    } else {
        escaped
    }
}

#[cfg(test)]
mod tests {
    use super::{loggable_path, RequestId};

    #[test]
    fn a_request_id_is_its_number_in_16_hex_digits() {
        for n in [0, 1, 0xabc, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(RequestId::new(n).as_str(), format!("{n:016x}"));
        }
    }

    #[test]
    fn a_plain_path_is_logged_as_it_came_and_others_escaped() {
        for path in [
            "/v2/team/app/manifests/v1",
            "/v2/a b/blobs/sha256:00",
            "/v2/a\\b\"c'd/tags/list",
            "/v2/x\ny\u{1b}[31m/é",
        ] {
            let escaped: String = path.escape_debug().collect();
            assert_eq!(loggable_path(path), escaped, "{path:?}");
        }
        let long = format!("/v2/{}", "a".repeat(300));
        assert_eq!(loggable_path(&long).chars().count(), 259);
        assert!(loggable_path(&long).ends_with("..."));
    }
}
