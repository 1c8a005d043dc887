//! Pushes through Pingora's proxy path, with injected credentials.
//!
//! Writes are not cached, so they take the path Pingora is built for: `request_filter` decides
//! (route, policy, method) and prepares a [`PushPlan`] — the upstream path, a `pull,push` token,
//! the cross-repository mount source — then Pingora streams the request body to the upstream
//! and the answer back with back-pressure both ways (memory does not grow with layer size).
//! The hooks in `mod.rs` only apply the plan: peer, request head, response head.
//!
//! Invariant 1 holds here too: the client's own `Authorization` never reaches the upstream, and
//! upload `Location`s are rewritten to the client's name so no upstream URL reaches the client.

use std::sync::Arc;

use http::Method;
use pingora::proxy::{FailToProxy, Session};

use super::job::{upstream_error, Job};
use super::{referrers, refusal, respond, Gateway, RequestCtx};
use crate::oci::{Digest, Endpoint, ErrorCode, OciError, Reference, Repository};
use crate::route::RoutedBy;
use crate::secret::Secret;
use crate::store::TagKey;
use crate::upstream::UpstreamClient;

/// Everything the proxy hooks need for one push request.
#[derive(Debug)]
pub struct PushPlan {
    pub client: Arc<UpstreamClient>,
    /// Path and query as the upstream must see them.
    pub path_and_query: String,
    /// `Host` for the upstream.
    pub host: String,
    pub authorization: Option<Secret>,
    pub locations: LocationMap,
    /// A manifest write: the cached answers to forget once the upstream accepts it.
    pub manifest: Option<ManifestWrite>,
}

/// For `Location` rewriting: the upstream's origin and repository, the client's name and the
/// `ns` value to carry on (containerd routes every request by it).
#[derive(Debug)]
pub struct LocationMap {
    pub upstream_origin: String,
    pub upstream_repository: String,
    pub client_name: String,
    pub ns: Option<String>,
}

/// What a manifest write makes stale: the tag's cached answer, a remembered 404, and the
/// cached referrers of a subject when the tag is its referrers tag.
#[derive(Debug)]
pub struct ManifestWrite {
    pub tag: Option<TagKey>,
    pub missing_key: String,
    pub repository: Repository,
    pub referrers_of: Option<Digest>,
}

/// After the upstream accepted a manifest write: the next pull sees it at once (the tag's
/// cached answers, a remembered 404 and the referrers it changes are forgotten). An
/// `OCI-Subject` answer names the subject whose referrers the manifest joined.
pub fn after_manifest_write(
    gw: &Gateway,
    plan: &PushPlan,
    write: &ManifestWrite,
    answer: &pingora::http::ResponseHeader,
) {
    if let Some(tag) = &write.tag {
        gw.manifests.forget_tag(tag);
    }
    gw.manifests.forget_missing(&write.missing_key);
    let registry = plan.client.registry();
    let subject = answer
        .headers
        .get("oci-subject")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v.trim()).ok());
    for subject in subject.iter().chain(write.referrers_of.iter()) {
        referrers::forget(gw, registry, &write.repository, subject);
    }
}

/// Whether this endpoint and method are a write (or an upload-session read) that goes to the
/// upstream as is.
pub fn is_push(endpoint: &Endpoint, method: &Method) -> bool {
    match endpoint {
        Endpoint::UploadStart | Endpoint::Upload(_) => true,
        Endpoint::Manifest(_) => matches!(*method, Method::PUT | Method::DELETE),
        Endpoint::Blob(_) => *method == Method::DELETE,
        Endpoint::TagsList | Endpoint::Referrers(_) => false,
    }
}

/// Builds the plan for a push the policy allowed. `from` is the client's name of a mount
/// source (`?mount=<digest>&from=<name>`), already routed: `Some` only when it lives in the
/// same registry and the caller may pull it; otherwise the mount is dropped and the upstream
/// starts a plain upload, as the distribution spec allows.
pub async fn plan(
    ctx: &mut RequestCtx,
    client: &Arc<UpstreamClient>,
    job: &Job<'_>,
    endpoint: &Endpoint,
    ns: Option<String>,
    from: Option<Repository>,
) -> Result<PushPlan, OciError> {
    let routed = job.routed;
    let repository = &routed.repository;
    let tail = match endpoint {
        Endpoint::UploadStart => "blobs/uploads/".to_owned(),
        Endpoint::Upload(id) => format!("blobs/uploads/{id}"),
        Endpoint::Manifest(reference) => format!("manifests/{reference}"),
        Endpoint::Blob(digest) => format!("blobs/{digest}"),
        Endpoint::TagsList | Endpoint::Referrers(_) => {
            return Err(OciError::new(ErrorCode::Unsupported, "not a write").with_status(405))
        }
    };
    let query = upstream_query(&job.query, from.as_ref());
    let mut path_and_query = format!("/v2/{}/{tail}", repository.as_str());
    if !query.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&query);
    }
    let authorization = job
        .client
        .push_authorization(repository, from.as_ref(), false)
        .await
        .map_err(|e| upstream_error(&e))?;
    let up = &job.client.registry().upstream;
    let default_port = if up.https { 443 } else { 80 };
    let host = match (up.host.contains(':'), up.port == default_port) {
        (true, true) => format!("[{}]", up.host),
        (true, false) => format!("[{}]:{}", up.host, up.port),
        (false, true) => up.host.clone(),
        (false, false) => format!("{}:{}", up.host, up.port),
    };
    let manifest = match endpoint {
        Endpoint::Manifest(reference) => Some(ManifestWrite {
            tag: match reference {
                Reference::Tag(tag) => Some(TagKey::new(&job.partition, repository, tag)),
                Reference::Digest(_) => None,
            },
            missing_key: format!("{}\0{}\0{reference}", job.partition, repository.as_str()),
            repository: repository.clone(),
            referrers_of: match reference {
                Reference::Tag(tag) => referrers::subject_of_tag(tag.as_str()),
                Reference::Digest(_) => None,
            },
        }),
        _ => None,
    };
    ctx.cache = "push";
    Ok(PushPlan {
        client: Arc::clone(client),
        path_and_query,
        host,
        authorization,
        locations: LocationMap {
            upstream_origin: up.origin.clone(),
            upstream_repository: repository.as_str().to_owned(),
            client_name: routed.client_name.clone(),
            ns: (routed.by == RoutedBy::Ns).then_some(ns).flatten(),
        },
        manifest,
    })
}

/// pullgate's own error for an upstream refusal (401/403) on the proxy path: the upstream's
/// answer, with its `WWW-Authenticate`, must not reach the client (`refusal.rs`).
pub fn refusal(plan: &PushPlan, status: u16) -> Option<OciError> {
    matches!(status, 401 | 403)
        .then(|| refusal::upstream_denied(&plan.client.registry().name, status, None))
}

/// The error for an upload `Location` that points outside the repository.
pub fn foreign_location(plan: &PushPlan) -> OciError {
    OciError::new(
        ErrorCode::Unavailable,
        format!(
            "upstream registry {:?} sent a Location outside the repository",
            plan.client.registry().name
        ),
    )
    .with_status(502)
}

/// `fail_to_proxy` for the proxy path: an error the hooks prepared (`ctx.proxy_error`) is
/// written as OCI JSON; anything else gets Pingora's default answer.
pub async fn fail_to_proxy(
    session: &mut Session,
    e: &pingora::Error,
    ctx: &mut RequestCtx,
) -> FailToProxy {
    use pingora::{ErrorSource, ErrorType};
    if let Some(error) = ctx.proxy_error.take() {
        if let Err(we) = respond::oci_error(session, ctx, &error).await {
            tracing::debug!(error = %we, "could not write the error response");
        }
        let error_code = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(error.status);
        return FailToProxy {
            error_code,
            can_reuse_downstream: false,
        };
    }
    // Pingora's default (`ProxyHttp::fail_to_proxy`).
    let code = match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    };
    if code > 0 {
        if let Err(we) = session.respond_error(code).await {
            tracing::debug!(error = %we, "could not write the error response");
        }
    }
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

/// The client's query for the upstream: `ns` dropped (it routed the request here), a mount's
/// `from` replaced by the upstream name of the source, or the mount dropped when it cannot be
/// honoured.
fn upstream_query(query: &str, from: Option<&Repository>) -> String {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k != "ns")
        .filter(|(k, _)| from.is_some() || (k != "mount" && k != "from"))
        .map(|(k, v)| match (k.as_ref(), from) {
            ("from", Some(f)) => (k.into_owned(), f.as_str().to_owned()),
            _ => (k.into_owned(), v.into_owned()),
        })
        .collect();
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// An upstream `Location` as the client must see it: on pullgate, under the client's name, with
/// the `ns` that routed the session. `None` for a target outside the upstream repository (it
/// must not reach the client).
pub fn rewrite_location(location: &str, plan: &LocationMap) -> Option<String> {
    let path = match location.strip_prefix(plan.upstream_origin.as_str()) {
        Some(rest) if rest.starts_with('/') => rest,
        Some(_) => return None,
        None if location.starts_with('/') && !location.starts_with("//") => location,
        None => return None,
    };
    let rest = path.strip_prefix(&format!("/v2/{}/", plan.upstream_repository))?;
    let mut out = format!("/v2/{}/{rest}", plan.client_name);
    if let Some(ns) = &plan.ns {
        out.push(if rest.contains('?') { '&' } else { '?' });
        out.push_str(
            &url::form_urlencoded::Serializer::new(String::new())
                .append_pair("ns", ns)
                .finish(),
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations_come_back_under_the_client_name() {
        let map = LocationMap {
            upstream_origin: "https://registry.example:5000".into(),
            upstream_repository: "library/app".into(),
            client_name: "docker.io/app".into(),
            ns: None,
        };
        let upload = "/v2/library/app/blobs/uploads/4f1c?_state=abc";
        assert_eq!(
            rewrite_location(&format!("https://registry.example:5000{upload}"), &map).as_deref(),
            Some("/v2/docker.io/app/blobs/uploads/4f1c?_state=abc")
        );
        assert_eq!(
            rewrite_location(upload, &map).as_deref(),
            Some("/v2/docker.io/app/blobs/uploads/4f1c?_state=abc")
        );
        let with_ns = LocationMap {
            ns: Some("docker.io".into()),
            ..map
        };
        assert_eq!(
            rewrite_location("/v2/library/app/blobs/sha256:ab", &with_ns).as_deref(),
            Some("/v2/docker.io/app/blobs/sha256:ab?ns=docker.io")
        );
        for foreign in [
            "https://storage.example/upload/1",
            "//storage.example/v2/library/app/blobs/uploads/1",
            "https://registry.example:5000.evil/v2/library/app/blobs/uploads/1",
            "/v2/other/app/blobs/uploads/1",
        ] {
            assert_eq!(rewrite_location(foreign, &with_ns), None, "{foreign}");
        }
    }

    #[test]
    fn mount_sources_are_renamed_or_dropped_and_ns_never_forwarded() {
        let from = Repository::parse("library/base").unwrap();
        assert_eq!(
            upstream_query(
                "mount=sha256%3Aab&from=docker.io%2Fbase&ns=docker.io",
                Some(&from)
            ),
            "mount=sha256%3Aab&from=library%2Fbase"
        );
        assert_eq!(
            upstream_query("mount=sha256%3Aab&from=elsewhere%2Fx", None),
            ""
        );
        assert_eq!(
            upstream_query("digest=sha256%3Aab", None),
            "digest=sha256%3Aab"
        );
    }
}
