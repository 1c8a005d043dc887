//! What the gateway asks the upstream for each registry API request, and how it answers.
//!
//! The request path of DESIGN.md in order: parse (OCI grammar) -> route (closed world) ->
//! policy and method check (on a data host: the URL's signature instead, `data.rs`) -> upstream
//! (credentials injected) -> answer. Manifests are read whole (capped, invariant 7) so their
//! digest can be checked and their bytes passed on unchanged; blobs stream.

use bytes::Bytes;
use http::{header, HeaderName, Method};
use pingora::proxy::Session;

use super::access;
use super::blob::{self, BlobJob};
use super::ctx::loggable_path;
use super::data;
use super::delete;
use super::job::{
    client_headers, error_from_upstream, manifest_read_error, partition, rewrite_link, Failure, Job,
};
use super::manifest;
use super::peer;
use super::push;
use super::referrers;
use super::respond;
use super::{request_host, Gateway, RequestCtx};
use crate::config::RedirectMode;
use crate::oci::{self, ApiRequest, Digest, Endpoint, ErrorCode, OciError};
use crate::policy::Action;
use crate::route::{Routed, RoutedBy};
use crate::upstream;

/// Registry clients send small heads; a large one is refused before any work (Pingora alone
/// accepts up to 1 MiB).
const MAX_REQUEST_HEAD: usize = 32 * 1024;

pub async fn serve(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), Failure> {
    let req = session.req_header();
    ctx.method = req.method.to_string();
    ctx.path = loggable_path(req.uri.path());
    let head_bytes: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum::<usize>()
        + req.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    if head_bytes > MAX_REQUEST_HEAD {
        return Err(OciError::new(
            ErrorCode::Unsupported,
            format!("request head of {head_bytes} bytes exceeds pullgate's {MAX_REQUEST_HEAD}"),
        )
        .with_status(431)
        .into());
    }
    ctx.warm = warm_caller(gw, session);
    let req = session.req_header();
    let method = req.method.clone();
    let path = req.uri.path().to_string();
    let query = req.uri.query().map(str::to_string);
    let host = request_host(req).map(str::to_string);
    let ns = query.as_deref().and_then(|q| query_value(q, "ns"));

    if [peer::PATH, peer::TAG_PATH, peer::HEALTH_PATH].contains(&path.as_str()) {
        // Another cluster member asking this one, the digest's or tag's owner (`peer.rs`).
        return peer::serve(gw, session, ctx).await;
    }
    match oci::parse_path(&path)? {
        ApiRequest::Base => {
            ctx.kind = "base";
            if !matches!(method, Method::GET | Method::HEAD) {
                return Err(unsupported_method(&method).into());
            }
            match gw.routes.registry_for(host.as_deref(), ns.as_deref())? {
                Some(registry) => {
                    ctx.registry = Some(registry.name.clone());
                    // No repository: only the credential and network rules apply. A denial
                    // with a challenge here is what makes clients send their credentials.
                    access::check(gw, session, ctx, &registry, None, Action::Pull)?;
                }
                None => access::check_credentials(gw, session, ctx)?,
            }
            let mut resp = respond::head(200, ctx)?;
            resp.insert_header(header::CONTENT_TYPE, "application/json")?;
            respond::write_body(session, ctx, resp, Bytes::from_static(b"{}")).await?;
            Ok(())
        }
        ApiRequest::Catalog => {
            ctx.kind = "catalog";
            Err(OciError::new(
                ErrorCode::Unsupported,
                "the catalog is not served: it would list what the injected credentials can see",
            )
            .into())
        }
        ApiRequest::Api { name, endpoint } => {
            ctx.kind = endpoint.kind();
            let routed = gw.routes.resolve(host.as_deref(), ns.as_deref(), name)?;
            ctx.registry = Some(routed.registry.name.clone());
            if routed.by == RoutedBy::Ns {
                ctx.namespace = ns.clone();
            }
            ctx.repository = Some(routed.repository.as_str().to_owned());
            ctx.reference = endpoint.reference();
            let (scoped, partition) = if routed.by == RoutedBy::DataHost {
                // A signature stands in for policy here (`data.rs`).
                let partition = data::admit(gw, session, ctx, &routed, &endpoint)?;
                (None, partition)
            } else {
                let scoped = access::check(
                    gw,
                    session,
                    ctx,
                    &routed.registry,
                    Some(&routed.repository),
                    access::action_of(&method, &endpoint),
                )?;
                check_method(&routed, &endpoint, &method)?;
                let partition = partition(&routed.registry.name, scoped.as_deref());
                (scoped, partition)
            };
            let client = gw
                .upstream(&partition)
                .ok_or_else(|| {
                    OciError::new(ErrorCode::NameUnknown, "registry has no upstream client")
                })?
                .clone();
            let headers = client_headers(&session.req_header().headers);
            let query = query.as_deref().map(without_ns).unwrap_or_default();
            let range = headers
                .get(header::RANGE)
                .and_then(|r| r.to_str().ok())
                .map(str::to_string);
            let job = Job {
                client: &client,
                routed: &routed,
                partition: partition.clone(),
                method,
                headers,
                query,
                max_manifest: gw.config.cache.max_manifest_size,
                revalidate_tags: ctx.warm.is_some(),
            };
            if job.method == Method::DELETE {
                // Deletes (and upload cancels) go through the upstream client, whose token
                // scope learns `delete` from the upstream's challenge (`delete.rs`).
                return delete::serve(gw, session, ctx, &job, &endpoint).await;
            }
            if push::is_push(&endpoint, &job.method) {
                let from = mount_source(gw, session, ctx, &job, host.as_deref(), ns.as_deref());
                let plan = push::plan(ctx, &client, &job, &endpoint, ns.clone(), from).await?;
                // Answered by Pingora's proxy path (see `push.rs`).
                ctx.push = Some(plan);
                return Ok(());
            }
            if gw.keys_deny() && matches!(endpoint, Endpoint::Manifest(_) | Endpoint::Blob(_)) {
                return Err(OciError::new(
                    ErrorCode::Unavailable,
                    "the cache encryption key was revoked",
                )
                .with_status(503)
                .into());
            }
            match endpoint {
                Endpoint::Manifest(reference) => {
                    manifest::serve(gw, session, ctx, &job, &reference).await
                }
                Endpoint::Blob(digest)
                    if job.method == Method::GET
                        && routed.by != RoutedBy::DataHost
                        && routed.registry.redirect == RedirectMode::DataEndpoint
                        // A warm job fills the cache itself rather than follow a redirect.
                        && ctx.warm.is_none() =>
                {
                    data::redirect(
                        gw,
                        session,
                        ctx,
                        &routed,
                        scoped.as_deref(),
                        &digest,
                        host.as_deref(),
                    )
                    .await
                }
                Endpoint::Blob(digest) => {
                    let cached = BlobJob {
                        store: &gw.store,
                        links: &gw.links,
                        client: &client,
                        registry: &routed.registry.name,
                        partition: &partition,
                        repository: &routed.repository,
                        stale_if_error: gw.config.cache.stale_if_error,
                        digest: &digest,
                        method: job.method.clone(),
                        range,
                        forward: gw.cluster.as_ref().and_then(|cluster| {
                            cluster.owner_of(&digest).map(|owner| blob::Forward {
                                cluster,
                                metrics: &gw.metrics,
                                owner,
                            })
                        }),
                        pace: ctx.warm.as_ref().and_then(|_| gw.warm_pace.bucket()),
                    };
                    if blob::serve(session, ctx, &cached).await? {
                        return Ok(());
                    }
                    ctx.cache = "bypass";
                    blob(session, ctx, &job, &digest).await
                }
                Endpoint::TagsList => passthrough(session, ctx, &job, "tags/list", true).await,
                Endpoint::Referrers(digest) => {
                    referrers::serve(gw, session, ctx, &job, &digest).await
                }
                // Every upload request is a push, handled above.
                Endpoint::UploadStart | Endpoint::Upload(_) => Err(push_denied(&routed).into()),
            }
        }
    }
}

/// This process's own warm engine asking (`warm`): the secret header matches, compared in
/// constant time, on a loopback connection. The headers are dropped from the request either
/// way, so nothing later (the push path included) can pass them on.
fn warm_caller(gw: &Gateway, session: &mut Session) -> Option<super::ctx::WarmCaller> {
    // Parsed once: a lookup by `&str` parses the name on every request.
    static KEY: HeaderName = HeaderName::from_static(crate::warm::KEY_HEADER);
    static ACCOUNT: HeaderName = HeaderName::from_static(crate::warm::ACCOUNT_HEADER);
    let headers = &session.req_header().headers;
    if !headers.contains_key(&KEY) && !headers.contains_key(&ACCOUNT) {
        // A client's request: nothing to check or strip.
        return None;
    }
    let req = session.req_header_mut();
    let key = req.headers.get(crate::warm::KEY_HEADER).cloned();
    let account = req
        .headers
        .get(crate::warm::ACCOUNT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    req.remove_header(crate::warm::KEY_HEADER);
    req.remove_header(crate::warm::ACCOUNT_HEADER);
    let key = key?;
    let loopback = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .is_some_and(|a| a.ip().is_loopback());
    (loopback && gw.warm_key.verify(key.as_bytes())).then_some(super::ctx::WarmCaller { account })
}

/// The upstream name of a mount source (`?mount=<digest>&from=<name>`), when the client's
/// `from` name routes to the same registry and the caller may pull it; `None` drops the mount
/// (the upstream then starts a plain upload).
fn mount_source(
    gw: &Gateway,
    session: &Session,
    ctx: &RequestCtx,
    job: &Job<'_>,
    host: Option<&str>,
    ns: Option<&str>,
) -> Option<oci::Repository> {
    query_value(&job.query, "mount")?;
    let from = query_value(&job.query, "from")?;
    let source = gw.routes.resolve(host, ns, &from).ok()?;
    let same_registry = source.registry.name == job.routed.registry.name;
    let may_pull = same_registry
        && access::allows(
            gw,
            session,
            ctx,
            &source.registry,
            &source.repository,
            Action::Pull,
        );
    may_pull.then_some(source.repository)
}

fn check_method(routed: &Routed, endpoint: &Endpoint, method: &Method) -> Result<(), OciError> {
    let allowed: &[Method] = match endpoint {
        Endpoint::UploadStart => &[Method::POST],
        Endpoint::Upload(_) => &[Method::GET, Method::PATCH, Method::PUT, Method::DELETE],
        Endpoint::Manifest(_) => &[Method::GET, Method::HEAD, Method::PUT, Method::DELETE],
        Endpoint::Blob(_) => &[Method::GET, Method::HEAD, Method::DELETE],
        Endpoint::TagsList | Endpoint::Referrers(_) => &[Method::GET, Method::HEAD],
    };
    if !allowed.contains(method) {
        return Err(unsupported_method(method));
    }
    let delete =
        *method == Method::DELETE && matches!(endpoint, Endpoint::Manifest(_) | Endpoint::Blob(_));
    if push::is_push(endpoint, method) && !delete && !routed.registry.push {
        return Err(push_denied(routed));
    }
    Ok(())
}

fn push_denied(routed: &Routed) -> OciError {
    OciError::new(
        ErrorCode::Denied,
        format!(
            "pushes through pullgate are not enabled for registry {:?}",
            routed.registry.name
        ),
    )
}

fn unsupported_method(method: &Method) -> OciError {
    OciError::new(
        ErrorCode::Unsupported,
        format!("method {method} is not supported here"),
    )
    .with_status(405)
}

/// GET or HEAD a blob, streamed; `Range` is passed through.
async fn blob(
    session: &mut Session,
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    digest: &Digest,
) -> Result<(), Failure> {
    let headers = upstream::forwarded_headers(&job.headers, true);
    let answer = job
        .client
        .send(&job.request(
            job.method.clone(),
            &format!("blobs/{digest}"),
            headers,
            false,
        ))
        .await?
        .response;
    let status = answer.status();
    ctx.upstream_status = Some(status.as_u16());
    if !status.is_success() {
        return Err(
            error_from_upstream(&job.routed.registry.name, "blob", answer)
                .await
                .into(),
        );
    }
    let mut resp = respond::head(status.as_u16(), ctx)?;
    respond::pass_headers(&mut resp, answer.headers())?;
    resp.insert_header("Docker-Content-Digest", digest.to_string())?;
    if resp.headers.get(header::CONTENT_TYPE).is_none() {
        resp.insert_header(header::CONTENT_TYPE, "application/octet-stream")?;
    }
    respond::stream_body(session, ctx, resp, respond::Body::Upstream(answer))
        .await
        .map_err(Failure::Abort)
}

/// Tags list and referrers: small JSON documents passed through (capped like manifests).
async fn passthrough(
    session: &mut Session,
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    tail: &str,
    with_query: bool,
) -> Result<(), Failure> {
    let headers = upstream::forwarded_headers(&job.headers, false);
    let answer = job
        .client
        .send(&job.request(Method::GET, tail, headers, with_query))
        .await?
        .response;
    ctx.upstream_status = Some(answer.status().as_u16());
    if !answer.status().is_success() {
        return Err(
            error_from_upstream(&job.routed.registry.name, ctx.kind, answer)
                .await
                .into(),
        );
    }
    let status = answer.status().as_u16();
    let upstream_headers = answer.headers().clone();
    let body = upstream::read_capped(answer, job.max_manifest)
        .await
        .map_err(|detail| manifest_read_error(job, &detail))?;
    let mut resp = respond::head(status, ctx)?;
    respond::pass_headers(&mut resp, &upstream_headers)?;
    if let Some(link) = upstream_headers
        .get(header::LINK)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| rewrite_link(l, job.routed.repository.as_str(), &job.routed.client_name))
    {
        resp.insert_header(header::LINK, link)?;
    }
    respond::write_body(session, ctx, resp, Bytes::from(body)).await?;
    Ok(())
}

/// The decoded value of a query parameter.
fn query_value(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The query without `ns` (the upstream has no use for it), re-encoded.
fn without_ns(query: &str) -> String {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k != "ns")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_are_rewritten_to_the_client_name() {
        assert_eq!(
            rewrite_link(
                r#"</v2/library/alpine/tags/list?last=b&n=2>; rel="next""#,
                "library/alpine",
                "docker.io/alpine"
            )
            .as_deref(),
            Some(r#"</v2/docker.io/alpine/tags/list?last=b&n=2>; rel="next""#)
        );
        assert_eq!(
            rewrite_link(
                r#"<https://up.example/v2/a/b/tags/list?n=1>; rel="next""#,
                "a/b",
                "a/b"
            )
            .as_deref(),
            Some(r#"</v2/a/b/tags/list?n=1>; rel="next""#)
        );
        assert!(rewrite_link("<https://evil/x>; rel=next", "a", "a").is_none());
        assert!(rewrite_link("garbage", "a", "a").is_none());
    }

    #[test]
    fn ns_is_removed_from_forwarded_queries() {
        assert_eq!(without_ns("ns=docker.io&n=10&last=a%20b"), "n=10&last=a+b");
        assert_eq!(without_ns("ns=docker.io"), "");
        assert_eq!(
            query_value("n=1&ns=ghcr.io", "ns").as_deref(),
            Some("ghcr.io")
        );
    }
}
