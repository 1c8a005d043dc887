//! What every endpoint handler shares: the [`Job`] one request gives its handler, how a
//! request fails ([`Failure`]), the cache partition of a credential, and the OCI errors made
//! from upstream answers. `serve.rs` builds the job and calls the handlers (`manifest.rs`,
//! `blob.rs`, `referrers.rs`, `delete.rs`, `push.rs`, `data.rs`, `confirm.rs`); they call in
//! here, never back into `serve.rs`.

use http::{header, HeaderMap, Method, StatusCode};

use super::refusal;
use crate::oci::{ErrorCode, OciError};
use crate::route::Routed;
use crate::upstream::{self, UpstreamClient, UpstreamError, UpstreamRequest};

/// How a request ended badly.
pub enum Failure {
    /// Nothing was sent yet: answer with this OCI error.
    Respond(OciError),
    /// The head was sent and the body broke: drop the connection.
    Abort(String),
}

impl From<OciError> for Failure {
    fn from(e: OciError) -> Self {
        Failure::Respond(e)
    }
}

impl From<UpstreamError> for Failure {
    fn from(e: UpstreamError) -> Self {
        Failure::Respond(upstream_error(&e))
    }
}

impl From<pingora::BError> for Failure {
    fn from(e: Box<pingora::Error>) -> Self {
        Failure::Abort(e.to_string())
    }
}

/// Everything one upstream call needs.
pub struct Job<'a> {
    pub client: &'a UpstreamClient,
    pub routed: &'a Routed,
    /// What the cache keeps apart per credential: tag answers, remembered 404s and repository
    /// confirmations (invariant 5 with scoped credentials). See [`partition`].
    pub partition: String,
    pub method: Method,
    /// The client's `Accept` lines and `Range`: all that negotiation and upstream requests
    /// read of its headers (see [`client_headers`]).
    pub headers: HeaderMap,
    /// The client's query without `ns`, `?`-less; empty when none.
    pub query: String,
    pub max_manifest: u64,
    /// Ask the upstream about a tag even when its cached answer is fresh: a warm job
    /// re-resolves tags (`refresh`), clients keep the `tag_ttl` rule.
    pub revalidate_tags: bool,
}

impl Job<'_> {
    pub fn request(
        &self,
        method: Method,
        tail: &str,
        headers: HeaderMap,
        query: bool,
    ) -> UpstreamRequest {
        let mut path = format!("/v2/{}/{tail}", self.routed.repository.as_str());
        if query && !self.query.is_empty() {
            path.push('?');
            path.push_str(&self.query);
        }
        UpstreamRequest {
            method,
            path_and_query: path,
            repository: Some(self.routed.repository.clone()),
            headers,
        }
    }
}

/// The headers of `request` a [`Job`] keeps: a copy of the whole map would cost a warm request
/// an allocation per header.
pub fn client_headers(request: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(2);
    for value in request.get_all(http::header::ACCEPT) {
        kept.append(http::header::ACCEPT, value.clone());
    }
    if let Some(range) = request.get(http::header::RANGE) {
        kept.insert(http::header::RANGE, range.clone());
    }
    kept
}

/// The registry's name for its own credentials, `<registry>/<scoped credentials name>` for
/// scoped ones (registry names cannot hold `/`, so partitions never collide). Also the key of
/// the gateway's upstream clients, one per credential.
pub fn partition(registry: &str, scoped: Option<&str>) -> String {
    match scoped {
        Some(name) => format!("{registry}/{name}"),
        None => registry.to_owned(),
    }
}

/// Every cache partition of a registry: its own credentials' and each scoped credential's.
pub fn partitions(registry: &crate::config::Registry) -> Vec<String> {
    std::iter::once(partition(&registry.name, None))
        .chain(
            registry
                .scoped_credentials
                .iter()
                .map(|s| partition(&registry.name, Some(&s.name))),
        )
        .collect()
}

/// The OCI error for a manifest body that could not be read whole.
pub fn manifest_read_error(job: &Job<'_>, detail: &str) -> OciError {
    if detail.contains("larger than") {
        OciError::new(
            ErrorCode::ManifestInvalid,
            format!(
                "the manifest from upstream registry {:?} is larger than the {} byte limit (cache.max_manifest_size)",
                job.routed.registry.name, job.max_manifest
            ),
        )
        .with_status(502)
    } else {
        OciError::new(
            ErrorCode::Unavailable,
            format!("upstream registry {:?}: {detail}", job.routed.registry.name),
        )
        .with_status(502)
    }
}

/// Pagination links name the upstream's repository on the upstream's origin; the client must
/// keep talking to pullgate under its own name. Anything unexpected is dropped, not passed on.
pub fn rewrite_link(link: &str, upstream_name: &str, client_name: &str) -> Option<String> {
    let start = link.find('<')? + 1;
    let end = link[start..].find('>')? + start;
    let target = &link[start..end];
    let path_start = target.find("/v2/")?;
    let path = &target[path_start..];
    let rest = path.strip_prefix(&format!("/v2/{upstream_name}/"))?;
    if !(rest.starts_with("tags/list") || rest.starts_with("referrers/")) {
        return None;
    }
    Some(format!("</v2/{client_name}/{rest}>{}", &link[end + 1..]))
}

/// Map an upstream error answer to what the client sees. Upstream error codes and messages are
/// kept where they are OCI errors; auth failures become `DENIED` naming the registry; server
/// errors become 502 naming the registry.
pub async fn error_from_upstream(
    registry: &str,
    kind: &str,
    answer: reqwest::Response,
) -> OciError {
    let status = answer.status();
    let retry_after = answer
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = upstream::read_capped(answer, 64 * 1024)
        .await
        .unwrap_or_default();
    let parsed = first_oci_error(&body);
    let message = |fallback: String| {
        parsed
            .as_ref()
            .map(|(_, m)| format!("upstream registry {registry:?}: {m}"))
            .unwrap_or(fallback)
    };
    match status {
        StatusCode::TOO_MANY_REQUESTS => {
            let mut e = OciError::new(
                ErrorCode::TooManyRequests,
                message(format!(
                    "upstream registry {registry:?} is rate limiting pullgate"
                )),
            );
            if let Some(r) = retry_after {
                e = e.with_retry_after(r);
            }
            e
        }
        // Never the upstream's message or challenge (`refusal.rs`).
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => refusal::upstream_denied(
            registry,
            status.as_u16(),
            parsed.as_ref().map(|(c, _)| c.as_str()),
        ),
        s if s.is_server_error() => OciError::new(
            ErrorCode::Unavailable,
            format!("upstream registry {registry:?} answered {}", s.as_u16()),
        )
        .with_status(502),
        s => {
            let code = parsed
                .as_ref()
                .and_then(|(c, _)| ErrorCode::parse(c))
                .unwrap_or(match (s, kind) {
                    (StatusCode::NOT_FOUND, "manifest") => ErrorCode::ManifestUnknown,
                    (StatusCode::NOT_FOUND, "blob") => ErrorCode::BlobUnknown,
                    (StatusCode::NOT_FOUND, _) => ErrorCode::NameUnknown,
                    _ => ErrorCode::Unsupported,
                });
            OciError::new(
                code,
                message(format!(
                    "upstream registry {registry:?} answered {}",
                    s.as_u16()
                )),
            )
            .with_status(s.as_u16())
        }
    }
}

/// The first `{code, message}` of an OCI error body.
fn first_oci_error(body: &[u8]) -> Option<(String, String)> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let first = json.get("errors")?.as_array()?.first()?;
    let code = first.get("code")?.as_str()?.to_string();
    let message: String = first
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    Some((code, message))
}

/// The OCI error for an upstream that gave no usable answer.
pub fn upstream_error(e: &UpstreamError) -> OciError {
    let message = e.to_string();
    match e {
        UpstreamError::Unreachable { .. } | UpstreamError::Protocol { .. } => {
            OciError::new(ErrorCode::Unavailable, message).with_status(502)
        }
        UpstreamError::Timeout { .. } => {
            OciError::new(ErrorCode::Unavailable, message).with_status(504)
        }
        UpstreamError::CredentialsRejected { .. } | UpstreamError::CredentialSource { .. } => {
            tracing::warn!(error = %message, "upstream credentials problem");
            OciError::new(ErrorCode::Denied, message)
        }
        UpstreamError::AccessDenied { .. } => OciError::new(ErrorCode::Denied, message),
        UpstreamError::RedirectRefused { .. } | UpstreamError::TooManyRedirects { .. } => {
            tracing::warn!(error = %message, "upstream redirect refused");
            OciError::new(ErrorCode::Unavailable, message).with_status(502)
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{header, HeaderMap, HeaderValue};

    #[test]
    fn a_job_keeps_the_accept_lines_and_range_and_nothing_else() {
        let mut request = HeaderMap::new();
        for (name, value) in [
            (header::ACCEPT, "application/vnd.oci.image.index.v1+json"),
            (header::AUTHORIZATION, "Basic c2VjcmV0"),
            (header::ACCEPT, "application/vnd.oci.image.manifest.v1+json"),
            (header::RANGE, "bytes=0-99"),
            (header::USER_AGENT, "containerd/2.0"),
        ] {
            request.append(name, HeaderValue::from_static(value));
        }
        let kept = super::client_headers(&request);
        let accept: Vec<_> = kept.get_all(header::ACCEPT).iter().collect();
        assert_eq!(
            accept,
            [
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.oci.image.manifest.v1+json"
            ],
            "every Accept line, in order"
        );
        assert_eq!(kept.get(header::RANGE).unwrap(), "bytes=0-99");
        assert_eq!(
            kept.len(),
            3,
            "the caller's credentials and the rest stay behind"
        );
    }
}
