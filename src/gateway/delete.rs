//! DELETE of manifests (by digest), tags and blobs, and upload cancels, through the upstream
//! client with injected credentials.
//!
//! The policy already decided (`delete = true` and the `delete` role for manifests, tags and
//! blobs; `push = true` and the `push` role for an upload cancel). The token asks for
//! `delete` on the repository (distribution's action for every DELETE), or for whatever the
//! upstream's challenge names instead (`UpstreamClient::send_scoped`). A refusal comes back as
//! pullgate's own error (`refusal.rs`). On success the cache forgets what it held for the
//! reference, for every upstream account of the registry, so the next request is answered with
//! what the upstream says now:
//!
//! - a tag: its cached answers;
//! - a manifest by digest: the manifest itself, the repository's confirmations of it, and (in
//!   memory) a note that older tag answers naming it are out of date;
//! - a blob: the repository's confirmations of it (the bytes stay: other repositories may hold
//!   the same digest, and invariant 5 keeps them from being served here).

use bytes::Bytes;
use http::Method;
use pingora::proxy::Session;

use super::job::{error_from_upstream, partitions, Failure, Job};
use super::respond;
use super::{Gateway, RequestCtx};
use crate::oci::{Endpoint, ErrorCode, OciError, Reference};
use crate::store::TagKey;
use crate::upstream;

/// Upstream answer headers a delete passes on, besides `respond::pass_headers`' set (never
/// `Location`: it would name the upstream).
const UPLOAD_HEADERS: &[&str] = &["docker-upload-uuid", "range"];

pub async fn serve(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    endpoint: &Endpoint,
) -> Result<(), Failure> {
    let (tail, query) = match endpoint {
        Endpoint::Manifest(reference) => (format!("manifests/{reference}"), false),
        Endpoint::Blob(digest) => (format!("blobs/{digest}"), false),
        // The upload's `_state` and the like stay with it.
        Endpoint::Upload(id) => (format!("blobs/uploads/{id}"), true),
        _ => {
            return Err(OciError::new(
                ErrorCode::Unsupported,
                "method DELETE is not supported here",
            )
            .with_status(405)
            .into())
        }
    };
    ctx.cache = "delete";
    let headers = upstream::forwarded_headers(&job.headers, false);
    let request = job.request(Method::DELETE, &tail, headers, query);
    let answer = job.client.send_scoped(&request, "delete").await?.response;
    let status = answer.status();
    ctx.upstream_status = Some(status.as_u16());
    if !status.is_success() {
        let kind = match endpoint {
            Endpoint::Blob(_) => "blob",
            Endpoint::Manifest(_) => "manifest",
            _ => "upload",
        };
        return Err(error_from_upstream(&job.routed.registry.name, kind, answer)
            .await
            .into());
    }
    forget(gw, job, endpoint);
    let upstream_headers = answer.headers().clone();
    let body = upstream::read_capped(answer, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut resp = respond::head(status.as_u16(), ctx)?;
    respond::pass_headers(&mut resp, &upstream_headers)?;
    for name in UPLOAD_HEADERS {
        if let Some(v) = upstream_headers.get(*name) {
            resp.insert_header(*name, v.clone())?;
        }
    }
    respond::write_body(session, ctx, resp, Bytes::from(body)).await?;
    Ok(())
}

/// Drops what the cache holds for a deleted reference, for every account of the registry.
fn forget(gw: &Gateway, job: &Job<'_>, endpoint: &Endpoint) {
    let registry = &job.routed.registry;
    let repository = &job.routed.repository;
    let partitions = partitions(registry);
    match endpoint {
        Endpoint::Manifest(Reference::Tag(tag)) => {
            for p in &partitions {
                gw.manifests.forget_tag(&TagKey::new(p, repository, tag));
            }
        }
        Endpoint::Manifest(Reference::Digest(digest)) => {
            gw.manifests.remove(digest);
            gw.manifests
                .mark_deleted(&deleted_scope(&registry.name, repository.as_str()), digest);
            for p in &partitions {
                gw.links.forget(p, repository, digest);
            }
        }
        Endpoint::Blob(digest) => {
            for p in &partitions {
                gw.links.forget(p, repository, digest);
            }
        }
        _ => {}
    }
}

/// The scope of [`crate::store::ManifestStore::mark_deleted`]: one repository of a registry,
/// whatever the account.
pub fn deleted_scope(registry: &str, repository: &str) -> String {
    format!("{registry}\0{repository}")
}
