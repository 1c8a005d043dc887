//! Signature policy (`[[registry.signatures]]`, issue 19) in front of the real upstream, pulled
//! through by real clients (skopeo, ctr). The signatures themselves are made by test support
//! in cosign's formats (`support/signing.rs`): Debian 12's skopeo 1.9 and podman 4.3 are built
//! with sigstore disabled, so neither can sign nor verify, and cosign is not installable.

use crate::api::{push_blob_upstream, push_manifest_upstream};
use crate::harness::{get, registry, request, Answer, Gateway};
use crate::support::signing::{base64, cosign_attachment, simple_signing_payload};
use crate::support::{
    digest_of, skopeo_copy_to_oci, ClientTls, CosignKey, TestImage, Upstream, UpstreamOptions,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// `[[registry.signatures]]` covering `team-a/**` with `key`, in `mode`.
fn policy(key: &CosignKey, mode: &str) -> String {
    format!(
        "[[registry.signatures]]\nrepositories = [\"team-a/**\"]\nkeys = [\"{}\"]\nmode = \"{mode}\"\n",
        key.public_path().display()
    )
}

/// The value of `pullgate_signature_checks_total{registry="icr", outcome}` (0 when absent).
pub fn checks(gw: &Gateway, outcome: &str) -> u64 {
    let text = String::from_utf8(get(&gw.admin_url("/metrics")).body).expect("utf-8");
    let want =
        format!("pullgate_signature_checks_total{{outcome=\"{outcome}\",registry=\"icr\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

/// Stores a cosign `.sig` attachment for `subject` in `repo` of the upstream: `payload` with
/// the signature annotation `signature`.
fn attach(up: &Upstream, repo: &str, subject: &str, payload: &[u8], signature: &str) {
    let (config, payload, manifest) = cosign_attachment(payload, signature);
    push_blob_upstream(up, repo, &digest_of(&config), &config);
    push_blob_upstream(up, repo, &digest_of(&payload), &payload);
    let tag = format!("sha256-{}.sig", subject.trim_start_matches("sha256:"));
    push_manifest_upstream(up, repo, &tag, OCI_MANIFEST, &manifest);
}

/// Signs `subject` of `repo` with `key`, as `cosign sign --key` would.
pub fn sign(up: &Upstream, repo: &str, subject: &str, key: &CosignKey) {
    let payload = simple_signing_payload(&format!("{}/{repo}", up.host_port()), subject);
    attach(up, repo, subject, &payload, &base64(&key.sign(&payload)));
}

fn manifest(gw: &Gateway, repo: &str, reference: &str, method: &str) -> Answer {
    request(
        method,
        &gw.url(&format!("/v2/{repo}/manifests/{reference}")),
        &[],
    )
}

#[test]
fn only_manifests_signed_by_a_trusted_key_are_served() {
    let up = Upstream::start(UpstreamOptions::default());
    let trusted = CosignKey::generate();
    let repo = "team-a/app";
    let push = |seed: &str, tag: &str| up.push(&TestImage::small(seed), &format!("{repo}:{tag}"));
    let signed = push("sig-signed", "signed");
    sign(&up, repo, &signed, &trusted);
    let unsigned = push("sig-unsigned", "unsigned");
    let foreign = push("sig-other-key", "other");
    sign(&up, repo, &foreign, &CosignKey::generate());
    // A valid signature, but over another manifest's digest.
    let elsewhere = push("sig-elsewhere", "elsewhere");
    let payload = simple_signing_payload(&format!("{}/{repo}", up.host_port()), &signed);
    attach(
        &up,
        repo,
        &elsewhere,
        &payload,
        &base64(&trusted.sign(&payload)),
    );
    // The trusted key's signature with one byte changed.
    let tampered = push("sig-tampered", "tampered");
    let payload = simple_signing_payload(&format!("{}/{repo}", up.host_port()), &tampered);
    let mut sig = trusted.sign(&payload);
    let mid = sig.len() / 2;
    sig[mid] ^= 0x01;
    attach(&up, repo, &tampered, &payload, &base64(&sig));
    up.push(&TestImage::small("sig-unsigned"), "free/app:v1");

    let gw = Gateway::start(&registry(
        "icr",
        &up,
        &format!("default = true\n{}", policy(&trusted, "enforce")),
    ));

    // Signed by the trusted key: by tag and by digest, GET and HEAD.
    for reference in ["signed", signed.as_str()] {
        for method in ["GET", "HEAD"] {
            let a = manifest(&gw, repo, reference, method);
            assert_eq!(a.status, 200, "{method} {reference}: {}", a.oci_message());
            assert_eq!(a.header("docker-content-digest"), Some(signed.clone()));
        }
    }

    // Everything else is refused before any byte of the manifest, naming why.
    for (tag, digest, why) in [
        ("unsigned", &unsigned, "unsigned"),
        ("other", &foreign, "not a valid signature by a trusted key"),
        ("elsewhere", &elsewhere, "names the manifest"),
        (
            "tampered",
            &tampered,
            "not a valid signature by a trusted key",
        ),
    ] {
        for reference in [tag, digest.as_str()] {
            for method in ["GET", "HEAD"] {
                let a = manifest(&gw, repo, reference, method);
                assert_eq!(a.status, 403, "{method} {reference}");
                assert!(a.header("docker-content-digest").is_none());
                if method == "GET" {
                    assert_eq!(a.oci_code().as_deref(), Some("DENIED"));
                    let m = a.oci_message();
                    for part in [repo, digest.as_str(), "registry.icr.signatures[0]", why] {
                        assert!(m.contains(part), "{reference}: {part:?} not in {m}");
                    }
                }
            }
        }
    }

    // Outside the policy's repositories: no check. The signature artifact itself: served.
    assert_eq!(manifest(&gw, "free/app", "v1", "GET").status, 200);
    let sig_tag = format!("sha256-{}.sig", &signed["sha256:".len()..]);
    assert_eq!(manifest(&gw, repo, &sig_tag, "GET").status, 200);

    // A real client: skopeo pulls the signed image, and fails on the unsigned one.
    let image = |tag: &str| format!("{}/{repo}:{tag}", gw.addr());
    skopeo_copy_to_oci(&image("signed"), ClientTls::Plain, None, false)
        .expect("the signed image pulls");
    let refused = skopeo_copy_to_oci(&image("unsigned"), ClientTls::Plain, None, false)
        .expect_err("the unsigned image is refused");
    assert!(refused.contains("denied"), "{refused}");

    // Counted and audited with the reason.
    assert!(checks(&gw, "verified") >= 1);
    assert!(checks(&gw, "unsigned") >= 1);
    assert!(checks(&gw, "bad_signature") >= 3);
    let audit = gw.audit_lines();
    let denied = audit
        .iter()
        .find(|l| l["reference"] == "unsigned" && l["decision"] == "deny")
        .expect("an audit line for the denial");
    assert_eq!(denied["reason"], "signature_unsigned");
    assert!(denied["message"]
        .as_str()
        .unwrap()
        .contains("registry.icr.signatures[0]"));
}
