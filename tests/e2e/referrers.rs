//! The referrers API on an upstream without one (distribution 2.8): a client pushes signed
//! artifacts and the referrers tag schema's index through pullgate (as OCI 1.1 clients do on
//! such registries), and reads them back as `GET /v2/<name>/referrers/<digest>`: always an OCI
//! image index, filtered by `artifactType`, cached like a tag, served stale while the upstream
//! is down.

use crate::api::{send, sha256};
use crate::harness::{registry, request, Answer, Gateway};
use crate::support::{TestImage, Upstream, UpstreamOptions};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const SIGNATURE: &str = "application/vnd.example.signature.v1";
const SBOM: &str = "application/vnd.example.sbom.v1";

/// Uploads a blob through pullgate (POST, then one PUT).
pub(crate) fn push_blob(gw: &Gateway, repo: &str, body: &[u8]) -> String {
    let digest = sha256(body);
    let started = send(
        "POST",
        &gw.url(&format!("/v2/{repo}/blobs/uploads/")),
        &[],
        vec![],
    );
    assert_eq!(started.status, 202);
    let location = started.header("location").expect("Location");
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = send(
        "PUT",
        &gw.url(&format!("{location}{sep}digest={digest}")),
        &[("Content-Type", "application/octet-stream")],
        body.to_vec(),
    );
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    digest
}

pub(crate) fn put_manifest(
    gw: &Gateway,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Answer {
    send(
        "PUT",
        &gw.url(&format!("/v2/{repo}/manifests/{reference}")),
        &[("Content-Type", media_type)],
        body.to_vec(),
    )
}

/// Pushes an artifact of `artifact_type` whose subject is `subject`; returns its descriptor.
pub(crate) fn push_artifact(
    gw: &Gateway,
    repo: &str,
    artifact_type: &str,
    subject: (&str, usize),
    payload: &[u8],
) -> serde_json::Value {
    let config = push_blob(gw, repo, b"{}");
    let layer = push_blob(gw, repo, payload);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": payload.len()}],
        "subject": {"mediaType": MANIFEST, "digest": subject.0, "size": subject.1},
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = sha256(&bytes);
    let put = put_manifest(gw, repo, &digest, MANIFEST, &bytes);
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    serde_json::json!({
        "mediaType": MANIFEST,
        "digest": digest,
        "size": bytes.len(),
        "artifactType": artifact_type,
    })
}

fn manifests_of(a: &Answer) -> Vec<serde_json::Value> {
    let doc: serde_json::Value = serde_json::from_slice(&a.body).expect("an index");
    assert_eq!(doc["mediaType"], INDEX);
    assert_eq!(doc["schemaVersion"], 2);
    doc["manifests"].as_array().cloned().expect("manifests")
}

#[test]
fn referrers_come_from_the_tag_schema_index_filtered_cached_and_stale() {
    let mut up = Upstream::start(UpstreamOptions::default());
    let subject = TestImage::small("referrers-subject");
    up.push(&subject, "team/app:v1");
    let gw = Gateway::start(&format!(
        "{}{}",
        registry("hub", &up, "default = true\npush = true\ntag_ttl = \"1h\""),
        registry(
            "due",
            &up,
            "prefix = \"due\"\nhosts = [\"due.example\"]\ntag_ttl = \"0s\""
        )
    ));
    let s = subject.manifest_digest().to_string();
    let referrers = |prefix: &str, query: &str| {
        request(
            "GET",
            &gw.url(&format!("/v2/{prefix}team/app/referrers/{s}{query}")),
            &[],
        )
    };

    // Nothing refers to it yet: an empty index (distribution 2.8 has no referrers API).
    let empty = referrers("", "");
    assert_eq!(
        empty.status,
        200,
        "{}",
        String::from_utf8_lossy(&empty.body)
    );
    assert_eq!(empty.header("content-type").as_deref(), Some(INDEX));
    assert!(manifests_of(&empty).is_empty());
    assert!(
        up.requests()
            .iter()
            .any(|r| r.uri.contains("/referrers/") && r.status == 404),
        "the upstream was asked for its referrers API"
    );

    // A client on a registry without the API: artifacts with a subject, then the referrers
    // tag's index (sha256-<hex>), all pushed through pullgate.
    let size = subject.manifest_bytes().len();
    let sig = push_artifact(&gw, "team/app", SIGNATURE, (&s, size), b"signature bytes");
    let sbom = push_artifact(&gw, "team/app", SBOM, (&s, size), b"sbom bytes");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [sig, sbom],
    });
    let tag = format!("sha256-{}", &s["sha256:".len()..]);
    let put = put_manifest(
        &gw,
        "team/app",
        &tag,
        INDEX,
        &serde_json::to_vec(&index).unwrap(),
    );
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));

    // The push made the cached empty answer stale at once.
    let all = referrers("", "");
    assert_eq!(all.status, 200);
    assert_eq!(all.header("content-type").as_deref(), Some(INDEX));
    assert_eq!(manifests_of(&all), vec![sig.clone(), sbom.clone()]);
    assert_eq!(all.header("oci-filters-applied"), None);
    let before = up.requests().len();
    let signatures = referrers("", &format!("?artifactType={SIGNATURE}"));
    assert_eq!(
        signatures.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    assert_eq!(manifests_of(&signatures), vec![sig.clone()]);
    assert!(manifests_of(&referrers("", "?artifactType=application/none")).is_empty());
    assert_eq!(referrers("", "").status, 200);
    assert_eq!(up.requests().len(), before, "cached within tag_ttl");

    // An unknown subject: an empty index.
    let unknown = request(
        "GET",
        &gw.url(&format!("/v2/team/app/referrers/sha256:{}", "0".repeat(64))),
        &[],
    );
    assert_eq!(unknown.status, 200);
    assert!(manifests_of(&unknown).is_empty());

    // Stale within stale_if_error while the upstream is down (tag_ttl 0: always due).
    assert_eq!(manifests_of(&referrers("due/", "")).len(), 2);
    up.stop();
    let stale = referrers("due/", &format!("?artifactType={SBOM}"));
    assert_eq!(
        stale.status,
        200,
        "{}",
        String::from_utf8_lossy(&stale.body)
    );
    assert_eq!(manifests_of(&stale), vec![sbom]);
    assert!(stale
        .header("warning")
        .is_some_and(|w| w.starts_with("110")));
}
