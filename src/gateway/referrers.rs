//! `GET /v2/<name>/referrers/<digest>`: always an OCI image index.
//!
//! From the upstream's referrers API when it has one; otherwise from the referrers tag schema
//! the distribution spec defines as the fallback (the index tagged `<alg>-<hex>` in the
//! repository, e.g. `sha256-0123...`), which clients maintain on registries without the API
//! (distribution 2.8, GHCR); otherwise an empty index. `?artifactType=` filters the
//! descriptors here and says so with `OCI-Filters-Applied: artifactType`. Answers are cached
//! like tags: reused for `tag_ttl`, served stale for `stale_if_error` while the upstream
//! fails, per upstream account. Upstream refusals are pullgate's own errors (`refusal.rs`).

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use pingora::proxy::Session;

use super::confirm::{is_unavailable_error, is_unavailable_status};
use super::job::{
    error_from_upstream, manifest_read_error, partitions, rewrite_link, upstream_error, Failure,
    Job,
};
use super::respond;
use super::{Gateway, RequestCtx};
use crate::config::Registry;
use crate::oci::{self, Digest, ErrorCode, OciError, Repository};
use crate::store::{ReferrersEntry, ReferrersKey};
use crate::upstream;

/// The referrers tag of a subject (distribution spec, "Referrers Tag Schema"):
/// `<alg>-<ref>`, the algorithm cut to 32 characters and the hex to 64.
pub fn fallback_tag(subject: &Digest) -> String {
    let alg = subject.algorithm().as_str();
    let hex = subject.hex();
    format!(
        "{}-{}",
        &alg[..alg.len().min(32)],
        &hex[..hex.len().min(64)]
    )
}

/// The subject a referrers tag names (`sha256-<64 hex>`), so pushing that tag can drop the
/// cached answer. Only sha256: longer digests are cut in their tags and cannot be recovered.
pub fn subject_of_tag(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}

/// Drops the cached referrers of `subject` in `repository`, for every account of `registry`.
pub fn forget(gw: &Gateway, registry: &Registry, repository: &Repository, subject: &Digest) {
    for p in partitions(registry) {
        gw.manifests
            .forget_referrers(&ReferrersKey::new(&p, repository, subject));
    }
}

pub async fn serve(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    subject: &Digest,
) -> Result<(), Failure> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(job.query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let artifact_type = pairs
        .iter()
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v.clone());
    // Anything else (a page of the upstream's API) is asked for as it is, not cached.
    let paged = pairs.iter().any(|(k, _)| k != "artifactType");
    let key = ReferrersKey::new(&job.partition, &job.routed.repository, subject);
    let now = SystemTime::now();
    let cache = &gw.config.cache;
    let cached = (!paged).then(|| gw.manifests.referrers(&key)).flatten();
    let ttl = job.routed.registry.tag_ttl(cache);
    if let Some(entry) = cached.as_ref().filter(|e| e.age(now) < ttl) {
        ctx.cache = "hit";
        return answer(session, ctx, job, entry, artifact_type.as_deref()).await;
    }
    let query = if paged {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter().filter(|(k, _)| k != "artifactType"))
            .finish()
    } else {
        String::new()
    };
    match ask(ctx, job, subject, &query).await {
        Ok(fresh) => {
            ctx.cache = if paged { "bypass" } else { "miss" };
            if !paged {
                gw.manifests.set_referrers(&key, fresh.clone());
            }
            answer(session, ctx, job, &fresh, artifact_type.as_deref()).await
        }
        Err(Asked::Unavailable(error)) => {
            match cached.filter(|e| e.age(now) < cache.stale_if_error) {
                Some(entry) => {
                    tracing::warn!(
                        registry = %job.routed.registry.name,
                        request_id = %ctx.request_id,
                        "upstream unavailable: serving cached referrers (stale_if_error)"
                    );
                    ctx.cache = "hit";
                    ctx.mark_stale(true);
                    answer(session, ctx, job, &entry, artifact_type.as_deref()).await
                }
                None => Err(error.into()),
            }
        }
        Err(Asked::Refused(error)) => Err(error.into()),
    }
}

/// Why the upstream gave no referrers.
enum Asked {
    /// It could not answer now (unreachable, 5xx, 429): a cached answer may serve.
    Unavailable(OciError),
    /// It refused or broke the protocol.
    Refused(OciError),
}

/// The referrers as the upstream has them: its API, else the referrers tag, else none.
async fn ask(
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    subject: &Digest,
    query: &str,
) -> Result<ReferrersEntry, Asked> {
    let registry = &job.routed.registry.name;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static(oci::media::OCI_INDEX_V1),
    );
    let mut path = format!("referrers/{subject}");
    if !query.is_empty() {
        path = format!("{path}?{query}");
    }
    let request = job.request(Method::GET, &path, headers.clone(), false);
    let api = send(ctx, job, &request).await?;
    let status = api.status();
    if status.is_success() && is_index_answer(api.headers()) {
        let link = api
            .headers()
            .get(header::LINK)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        let body = read(job, api).await?;
        let index = normalized_index(&body).ok_or_else(|| {
            Asked::Refused(protocol_error(
                registry,
                "its referrers API sent no image index",
            ))
        })?;
        return Ok(ReferrersEntry {
            index,
            link,
            validated_at: SystemTime::now(),
        });
    }
    if !matches!(status.as_u16(), 200..=299 | 400 | 404 | 405) {
        return Err(refusal(registry, api).await);
    }
    // No referrers API: the referrers tag schema.
    let tag = fallback_tag(subject);
    let request = job.request(Method::GET, &format!("manifests/{tag}"), headers, false);
    let tagged = send(ctx, job, &request).await?;
    let index = match tagged.status() {
        s if s.is_success() => {
            let body = read(job, tagged).await?;
            normalized_index(&body).unwrap_or_else(empty_index)
        }
        StatusCode::NOT_FOUND => empty_index(),
        _ => return Err(refusal(registry, tagged).await),
    };
    Ok(ReferrersEntry {
        index,
        link: None,
        validated_at: SystemTime::now(),
    })
}

async fn send(
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    request: &upstream::UpstreamRequest,
) -> Result<reqwest::Response, Asked> {
    match job.client.send(request).await {
        Ok(answer) => {
            ctx.upstream_status = Some(answer.response.status().as_u16());
            if is_unavailable_status(answer.response.status()) {
                let error =
                    error_from_upstream(&job.routed.registry.name, "referrers", answer.response)
                        .await;
                return Err(Asked::Unavailable(error));
            }
            Ok(answer.response)
        }
        Err(e) if is_unavailable_error(&e) => Err(Asked::Unavailable(upstream_error(&e))),
        Err(e) => Err(Asked::Refused(upstream_error(&e))),
    }
}

async fn read(job: &Job<'_>, answer: reqwest::Response) -> Result<Vec<u8>, Asked> {
    upstream::read_capped(answer, job.max_manifest)
        .await
        .map_err(|detail| Asked::Unavailable(manifest_read_error(job, &detail)))
}

async fn refusal(registry: &str, answer: reqwest::Response) -> Asked {
    Asked::Refused(error_from_upstream(registry, "referrers", answer).await)
}

fn protocol_error(registry: &str, detail: &str) -> OciError {
    OciError::new(
        ErrorCode::Unavailable,
        format!("upstream registry {registry:?}: {detail}"),
    )
    .with_status(502)
}

fn is_index_answer(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            oci::accepts(oci::media::OCI_INDEX_V1, t) || t.trim().starts_with("application/json")
        })
}

/// An image index holding `manifests` (descriptors), re-serialized as an OCI index; `None`
/// when the document has no `manifests` array.
fn normalized_index(body: &[u8]) -> Option<Bytes> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let manifests = doc.get("manifests")?.as_array()?.clone();
    Some(index_of(manifests))
}

fn empty_index() -> Bytes {
    index_of(Vec::new())
}

fn index_of(manifests: Vec<serde_json::Value>) -> Bytes {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::media::OCI_INDEX_V1,
        "manifests": manifests,
    });
    Bytes::from(serde_json::to_vec(&index).unwrap_or_default())
}

/// The index with only the descriptors of `artifact_type`.
fn filtered(index: &Bytes, artifact_type: &str) -> Bytes {
    let manifests = serde_json::from_slice::<serde_json::Value>(index)
        .ok()
        .and_then(|d| d.get("manifests")?.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.get("artifactType").and_then(|t| t.as_str()) == Some(artifact_type))
        .collect();
    index_of(manifests)
}

async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    entry: &ReferrersEntry,
    artifact_type: Option<&str>,
) -> Result<(), Failure> {
    let mut resp = respond::head(200, ctx)?;
    resp.insert_header(header::CONTENT_TYPE, oci::media::OCI_INDEX_V1)?;
    let body = match artifact_type {
        Some(t) => {
            resp.insert_header("OCI-Filters-Applied", "artifactType")?;
            filtered(&entry.index, t)
        }
        None => entry.index.clone(),
    };
    if let Some(link) = entry
        .link
        .as_deref()
        .and_then(|l| rewrite_link(l, job.routed.repository.as_str(), &job.routed.client_name))
    {
        resp.insert_header(header::LINK, link)?;
    }
    respond::write_body(session, ctx, resp, body).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referrers_tags_follow_the_tag_schema() {
        let sha256 = Digest::compute(oci::Algorithm::Sha256, b"x");
        assert_eq!(fallback_tag(&sha256), format!("sha256-{}", sha256.hex()));
        assert_eq!(subject_of_tag(&fallback_tag(&sha256)), Some(sha256));
        let sha512 = Digest::compute(oci::Algorithm::Sha512, b"x");
        let tag = fallback_tag(&sha512);
        assert_eq!(tag, format!("sha512-{}", &sha512.hex()[..64]));
        assert!(oci::Tag::parse(&tag).is_ok());
        assert_eq!(subject_of_tag("latest"), None);
        assert_eq!(subject_of_tag("sha256-abc"), None);
    }

    #[test]
    fn indexes_are_normalized_and_filtered_by_artifact_type() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"digest":"sha256:aa","artifactType":"application/sig"},
            {"digest":"sha256:bb","artifactType":"application/sbom"}],"annotations":{"x":"y"}}"#;
        let index = normalized_index(body).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(doc["mediaType"], oci::media::OCI_INDEX_V1);
        assert_eq!(doc["manifests"].as_array().unwrap().len(), 2);
        let sigs: serde_json::Value =
            serde_json::from_slice(&filtered(&index, "application/sig")).unwrap();
        assert_eq!(sigs["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(sigs["manifests"][0]["digest"], "sha256:aa");
        assert!(normalized_index(b"{\"layers\":[]}").is_none());
        let empty: serde_json::Value = serde_json::from_slice(&empty_index()).unwrap();
        assert_eq!(empty["manifests"], serde_json::json!([]));
    }
}
