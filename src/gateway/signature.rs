//! Signature policy at the gateway (`[[registry.signatures]]`, issue 19): a manifest of a
//! covered repository reaches the client only once `verify::decide` says it is signed by a
//! trusted key, or, in audit mode, with an audit line and a count when it is not.
//!
//! Owns: which policy covers a request, fetching the signature material from the upstream
//! (cosign's `sha256-<hex>.sig` tag, then sigstore bundles through the referrers API or its
//! fallback tag), the verdict cache ([`Verdicts`]: per digest and policy fingerprint, fresh for
//! the registry's `tag_ttl`, kept for `stale_if_error` to decide while the upstream is
//! unavailable), the relation from a verified index to its children, the denial and the
//! `pullgate_signature_checks_total` count. Must never: let a byte of a covered manifest out
//! before the verdict (callers run [`gate`] before writing the head), or cache an `error`
//! verdict.
//!
//! Exempt, served without a check: signature artifacts asked by tag (`sha256-<hex>.sig`,
//! `.att`, `.sbom`, and the referrers fallback tag `sha256-<hex>`), and manifests no runtime can
//! run: artifacts whose config is not an image config, or whose layers are all signature
//! payloads. Blobs are not checked: they are only reachable through a manifest.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use super::job::{Failure, Job};
use super::{Gateway, RequestCtx};
use crate::config::{Registry, SignatureMode, SignaturePolicy};
use crate::oci::{self, Digest, ErrorCode, OciError, Repository};
use crate::policy::glob;
use crate::verify::{self, cosign::SignedLayer, Evidence, Outcome};

/// Signature layers, referrers and bundles looked at per manifest: bounds the work an upstream
/// can cause.
const MAX_PIECES: usize = 16;
/// A simple-signing payload or a bundle larger than this is not one.
const MAX_PIECE_BYTES: u64 = 256 * 1024;
/// Verdicts kept (digest x policy).
const MAX_VERDICTS: u64 = 100_000;

/// One verdict, with when it was reached.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub outcome: Outcome,
    pub at: SystemTime,
    /// Verified as a child of this index (not on its own signatures).
    pub via: Option<Digest>,
}

/// Verdicts per (digest, policy fingerprint), shared by snapshots whose policies are the same;
/// a snapshot with any policy changed starts an empty one (`Verdicts::carry`).
pub struct Verdicts {
    cache: moka::sync::Cache<(String, String), Arc<Verdict>>,
    fingerprints: Vec<String>,
}

impl Verdicts {
    fn fingerprints(config: &crate::config::Config) -> Vec<String> {
        config
            .registries
            .iter()
            .flat_map(|r| r.signatures.iter().map(|p| p.fingerprint.clone()))
            .collect()
    }

    /// The verdicts for `config`: `previous`'s when every policy is the same, else new ones.
    pub fn carry(previous: Option<&Arc<Verdicts>>, config: &crate::config::Config) -> Arc<Self> {
        let fingerprints = Verdicts::fingerprints(config);
        match previous {
            Some(p) if p.fingerprints == fingerprints => Arc::clone(p),
            _ => Arc::new(Verdicts {
                cache: moka::sync::Cache::new(MAX_VERDICTS),
                fingerprints,
            }),
        }
    }

    fn get(&self, digest: &Digest, policy: &SignaturePolicy) -> Option<Arc<Verdict>> {
        self.cache
            .get(&(digest.as_str().to_owned(), policy.fingerprint.clone()))
    }

    fn put(&self, digest: &Digest, policy: &SignaturePolicy, verdict: Verdict) {
        self.cache.insert(
            (digest.as_str().to_owned(), policy.fingerprint.clone()),
            Arc::new(verdict),
        );
    }
}

/// The policy covering `repository` (upstream name) of `registry`: the first whose globs match.
pub fn policy_for<'r>(
    registry: &'r Registry,
    repository: &Repository,
) -> Option<&'r SignaturePolicy> {
    registry.signatures.iter().find(|p| {
        p.repositories.is_empty()
            || p.repositories
                .iter()
                .any(|g| glob::matches(g, repository.as_str()))
    })
}

/// Tags of signature artifacts: cosign's `sha256-<hex>.sig|.att|.sbom` and the referrers tag
/// schema's `sha256-<hex>`.
pub fn is_signature_tag(tag: &str) -> bool {
    let base = [".sig", ".att", ".sbom"]
        .iter()
        .find_map(|s| tag.strip_suffix(s))
        .unwrap_or(tag);
    super::referrers::subject_of_tag(base).is_some()
}

/// A manifest no runtime runs: an artifact (its config is not an image config) or a manifest
/// whose layers are all signature payloads (cosign's `.sig` manifests).
fn is_artifact(body: &[u8]) -> bool {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    if doc.get("manifests").is_some() {
        return false;
    }
    let config = doc["config"]["mediaType"].as_str().unwrap_or_default();
    let image_config = [
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    ]
    .contains(&config);
    let layers = doc["layers"].as_array().cloned().unwrap_or_default();
    let all_signatures = !layers.is_empty()
        && layers.iter().all(|l| {
            let t = l["mediaType"].as_str().unwrap_or_default();
            t == verify::SIMPLE_SIGNING_MEDIA_TYPE
                || t.starts_with(verify::BUNDLE_MEDIA_TYPE_PREFIX)
        });
    (!config.is_empty() && !image_config) || all_signatures
}

/// Lets `digest` (bytes `body` when known) through, or refuses it. Run before the first byte of
/// a manifest answer. `exempt`: the request named a signature tag.
pub async fn gate(
    gw: &Gateway,
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    digest: &Digest,
    body: Option<Bytes>,
    exempt: bool,
) -> Result<(), Failure> {
    let routed = job.routed;
    let Some(policy) = policy_for(&routed.registry, &routed.repository) else {
        return Ok(());
    };
    if exempt {
        return Ok(());
    }
    let now = SystemTime::now();
    let cache = &gw.config.cache;
    let ttl = routed.registry.tag_ttl(cache);
    let age = |v: &Verdict| now.duration_since(v.at).unwrap_or_default();
    let cached = gw.verdicts.get(digest, policy);
    let outcome = match cached.as_ref().filter(|v| age(v) < ttl) {
        Some(v) => v.outcome.clone(),
        None => {
            let body = match body.or_else(|| gw.manifests.get(digest).map(|m| m.body.clone())) {
                Some(b) => Some(b),
                None => fetch_manifest(job, digest).await.ok(),
            };
            if body.as_deref().is_some_and(is_artifact) {
                return Ok(());
            }
            let parent = cached.as_ref().and_then(|v| v.via.clone());
            let fresh = match &parent {
                // A child of a verified index: the index decides again.
                Some(index) => check(gw, job, policy, index, None).await,
                None => check(gw, job, policy, digest, body.as_deref()).await,
            };
            match fresh {
                Outcome::Error(why) => match cached.filter(|v| age(v) < cache.stale_if_error) {
                    Some(old) => {
                        tracing::warn!(
                            registry = %routed.registry.name,
                            request_id = %ctx.request_id,
                            error = %why,
                            "signatures unavailable: the cached verdict decides (stale_if_error)"
                        );
                        old.outcome.clone()
                    }
                    None => Outcome::Error(why),
                },
                outcome => {
                    gw.verdicts.put(
                        digest,
                        policy,
                        Verdict {
                            outcome: outcome.clone(),
                            at: now,
                            via: parent,
                        },
                    );
                    if outcome == Outcome::Verified {
                        if let Some(body) = &body {
                            remember_children(gw, policy, digest, body, now);
                        }
                    }
                    outcome
                }
            }
        }
    };
    gw.metrics
        .signature_checks
        .with_label_values(&[routed.registry.name.as_str(), outcome.label()])
        .inc();
    if outcome == Outcome::Verified {
        return Ok(());
    }
    let message = format!(
        "manifest {digest} of repository {} is not signed by a key of {}: {}",
        routed.client_name,
        policy.key,
        outcome.describe()
    );
    ctx.reason = Some(reason_label(&outcome));
    ctx.note_error(&message);
    if policy.mode == SignatureMode::Audit {
        tracing::warn!(
            registry = %routed.registry.name,
            request_id = %ctx.request_id,
            policy = %policy.key,
            "{message} (mode = \"audit\": served)"
        );
        return Ok(());
    }
    ctx.decision = "deny";
    gw.metrics
        .denials
        .with_label_values(&[routed.registry.name.as_str(), reason_label(&outcome)])
        .inc();
    Err(OciError::new(ErrorCode::Denied, message)
        .with_status(403)
        .into())
}

fn reason_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Verified => "image_verified",
        Outcome::Unsigned => "image_unsigned",
        Outcome::BadSignature(_) => "image_bad_signature",
        Outcome::Error(_) => "image_signature_error",
    }
}

/// A verified index's children are allowed by the same verdict.
fn remember_children(
    gw: &Gateway,
    policy: &SignaturePolicy,
    index: &Digest,
    body: &[u8],
    at: SystemTime,
) {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    for child in doc["manifests"].as_array().into_iter().flatten() {
        if let Some(d) = child["digest"].as_str().and_then(|d| Digest::parse(d).ok()) {
            gw.verdicts.put(
                &d,
                policy,
                Verdict {
                    outcome: Outcome::Verified,
                    at,
                    via: Some(index.clone()),
                },
            );
        }
    }
}

/// The verdict on `digest` from the upstream's signature material now.
async fn check(
    gw: &Gateway,
    job: &Job<'_>,
    policy: &SignaturePolicy,
    digest: &Digest,
    body: Option<&[u8]>,
) -> Outcome {
    let body = match body {
        Some(b) => Some(Bytes::copy_from_slice(b)),
        None => match gw.manifests.get(digest) {
            Some(m) => Some(m.body.clone()),
            None => fetch_manifest(job, digest).await.ok(),
        },
    };
    let mut evidence = Evidence::default();
    match cosign_layers(job, digest).await {
        Ok(layers) => evidence.simple_signing = layers,
        Err(why) => return Outcome::Error(why),
    }
    // The cheap scheme first: one round trip when the tag is there and verifies.
    if !evidence.is_empty() {
        let outcome = verify::decide(digest, body.as_deref(), &evidence, &policy.keys);
        if outcome == Outcome::Verified {
            return outcome;
        }
    }
    match bundles(job, digest).await {
        Ok(found) => evidence.bundles = found,
        Err(why) => return Outcome::Error(why),
    }
    verify::decide(digest, body.as_deref(), &evidence, &policy.keys)
}

/// GETs `tail` in the job's repository; `Ok(None)` for a 404 (and the `also_missing` statuses).
async fn get_or(
    job: &Job<'_>,
    tail: &str,
    accept: &'static str,
    cap: u64,
    also_missing: &[u16],
) -> Result<Option<(HeaderMap, Vec<u8>)>, String> {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
    let answer = job
        .client
        .send(&job.request(Method::GET, tail, headers, false))
        .await
        .map_err(|e| e.to_string())?
        .response;
    let status = answer.status();
    if status == StatusCode::NOT_FOUND || also_missing.contains(&status.as_u16()) {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!(
            "upstream registry {:?} answered {} for {tail}",
            job.routed.registry.name,
            status.as_u16()
        ));
    }
    let headers = answer.headers().clone();
    let body = crate::upstream::read_capped(answer, cap).await?;
    Ok(Some((headers, body)))
}

async fn get(
    job: &Job<'_>,
    tail: &str,
    accept: &'static str,
    cap: u64,
) -> Result<Option<(HeaderMap, Vec<u8>)>, String> {
    get_or(job, tail, accept, cap, &[]).await
}

/// A blob that must hash to `digest`.
async fn blob(job: &Job<'_>, digest: &Digest) -> Result<Option<Vec<u8>>, String> {
    let Some((_, bytes)) = get(job, &format!("blobs/{digest}"), "*/*", MAX_PIECE_BYTES).await?
    else {
        return Ok(None);
    };
    if !digest.verify(&bytes) {
        return Err(format!(
            "the upstream's blob {digest} does not hash to its digest"
        ));
    }
    Ok(Some(bytes))
}

async fn fetch_manifest(job: &Job<'_>, digest: &Digest) -> Result<Bytes, String> {
    match get(
        job,
        &format!("manifests/{digest}"),
        oci::MANIFEST_ACCEPT,
        job.max_manifest,
    )
    .await?
    {
        Some((_, body)) if digest.verify(&body) => Ok(Bytes::from(body)),
        Some(_) => Err(format!(
            "the upstream's manifest {digest} does not hash to its digest"
        )),
        None => Err(format!("the upstream has no manifest {digest}")),
    }
}

fn layers_of(body: &[u8]) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|d| d["layers"].as_array().cloned())
        .unwrap_or_default()
}

/// The signature layers of cosign's `sha256-<hex>.sig` manifest, with their payloads.
async fn cosign_layers(job: &Job<'_>, digest: &Digest) -> Result<Vec<SignedLayer>, String> {
    let tag = format!("{}.sig", super::referrers::fallback_tag(digest));
    let accept = "application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json";
    let Some((_, body)) = get(job, &format!("manifests/{tag}"), accept, job.max_manifest).await?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for layer in layers_of(&body).iter().take(MAX_PIECES) {
        let Some(signature) = layer["annotations"][verify::COSIGN_SIGNATURE_ANNOTATION].as_str()
        else {
            continue;
        };
        let Some(d) = layer["digest"].as_str().and_then(|d| Digest::parse(d).ok()) else {
            continue;
        };
        if let Some(payload) = blob(job, &d).await? {
            out.push(SignedLayer {
                digest: d,
                payload,
                signature: signature.to_owned(),
            });
        }
    }
    Ok(out)
}

/// Sigstore bundles among the referrers of `digest` (the API, else the fallback tag's index).
/// Every referrer is looked at, whatever its `artifactType` says (GHCR's fallback index labels
/// bundles `oci.empty`); its layers with a bundle media type are the bundles.
async fn bundles(job: &Job<'_>, digest: &Digest) -> Result<Vec<Vec<u8>>, String> {
    let index = oci::media::OCI_INDEX_V1;
    // No API: a 404, or the 400/405 some registries send; then the fallback tag.
    let api = get_or(
        job,
        &format!("referrers/{digest}"),
        index,
        job.max_manifest,
        &[400, 405],
    )
    .await?;
    let listed = match api {
        Some((headers, body))
            if headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.contains("json")) =>
        {
            Some(body)
        }
        _ => None,
    };
    let listed = match listed {
        Some(b) => Some(b),
        None => {
            let tag = super::referrers::fallback_tag(digest);
            get(job, &format!("manifests/{tag}"), index, job.max_manifest)
                .await?
                .map(|(_, b)| b)
        }
    };
    let Some(listed) = listed else {
        return Ok(Vec::new());
    };
    let descriptors = serde_json::from_slice::<serde_json::Value>(&listed)
        .ok()
        .and_then(|d| d["manifests"].as_array().cloned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for d in descriptors.iter().take(MAX_PIECES) {
        let Some(referrer) = d["digest"].as_str().and_then(|d| Digest::parse(d).ok()) else {
            continue;
        };
        let Some((_, manifest)) = get(
            job,
            &format!("manifests/{referrer}"),
            oci::MANIFEST_ACCEPT,
            job.max_manifest,
        )
        .await?
        else {
            continue;
        };
        if !referrer.verify(&manifest) {
            continue;
        }
        for layer in layers_of(&manifest).iter().take(MAX_PIECES) {
            let is_bundle = layer["mediaType"]
                .as_str()
                .is_some_and(|t| t.starts_with(verify::BUNDLE_MEDIA_TYPE_PREFIX));
            let Some(ld) = layer["digest"].as_str().and_then(|d| Digest::parse(d).ok()) else {
                continue;
            };
            if is_bundle {
                if let Some(doc) = blob(job, &ld).await? {
                    out.push(doc);
                }
            }
        }
        if out.len() >= MAX_PIECES {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_tags_and_artifacts_are_told_apart() {
        let hex = "a".repeat(64);
        assert!(is_signature_tag(&format!("sha256-{hex}.sig")));
        assert!(is_signature_tag(&format!("sha256-{hex}.att")));
        assert!(is_signature_tag(&format!("sha256-{hex}")));
        assert!(!is_signature_tag("latest"));
        assert!(!is_signature_tag("sha256-abc.sig"));
        assert!(!is_signature_tag(&format!("v1-{hex}.sig")));

        let image = br#"{"config":{"mediaType":"application/vnd.oci.image.config.v1+json"},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip"}]}"#;
        let sig = br#"{"config":{"mediaType":"application/vnd.oci.image.config.v1+json"},"layers":[{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json"}]}"#;
        let bundle = br#"{"artifactType":"application/vnd.dev.sigstore.bundle.v0.3+json","config":{"mediaType":"application/vnd.oci.empty.v1+json"},"layers":[]}"#;
        let index = br#"{"manifests":[]}"#;
        assert!(!is_artifact(image));
        assert!(is_artifact(sig));
        assert!(is_artifact(bundle));
        assert!(!is_artifact(index));
        assert!(!is_artifact(b"not json"));
    }
}
