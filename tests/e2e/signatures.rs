//! Signature policy (`[[registry.signatures]]`, issue 19) in front of the real upstream, pulled
//! through by real clients (skopeo, ctr). The signatures themselves are made by test support
//! in cosign's formats (`support/signing.rs`): Debian 12's skopeo 1.9 and podman 4.3 are built
//! with sigstore disabled, so neither can sign nor verify, and cosign is not installable.

use crate::api::{push_blob_upstream, push_manifest_upstream};
use crate::harness::{get, registry, request, Answer, Gateway};
use crate::support::signing::{attach, base64, sign, simple_signing_payload};
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
    assert_eq!(denied["reason"], "image_unsigned");
    assert!(denied["message"]
        .as_str()
        .unwrap()
        .contains("registry.icr.signatures[0]"));
}

#[test]
fn a_signed_index_lets_its_children_through_for_ctr_and_an_unsigned_one_does_not() {
    let up = Upstream::start(UpstreamOptions::default());
    let trusted = CosignKey::generate();
    let signed = TestImage::two_platform_index("sig-index-signed");
    let unsigned = TestImage::two_platform_index("sig-index-unsigned");
    let index = up.push(&signed, "team-a/multi:v1");
    sign(&up, "team-a/multi", &index, &trusted);
    up.push(&unsigned, "team-a/multi:unsigned");
    // tag_ttl 0: every verdict is reached again, a child's through its index.
    let gw = Gateway::start(&registry(
        "icr",
        &up,
        &format!(
            "default = true\ntag_ttl = \"0s\"\n{}",
            policy(&trusted, "enforce")
        ),
    ));
    let (_, child) = signed.platform_manifests()[0].clone();
    // A child on its own carries no signature.
    assert_eq!(manifest(&gw, "team-a/multi", &child, "GET").status, 403);

    let ctr = crate::support::Containerd::start();
    let opts = crate::support::PullOpts {
        plain_http: true,
        all_platforms: true,
        ..Default::default()
    };
    let pulled = ctr
        .pull_with(&format!("{}/team-a/multi:v1", gw.addr()), &opts)
        .expect("ctr pulls the signed index and its children");
    assert_eq!(pulled, index);
    // Once the index verified, its children are served by digest.
    for (_, child) in signed.platform_manifests() {
        assert_eq!(manifest(&gw, "team-a/multi", &child, "GET").status, 200);
    }
    let refused = ctr
        .pull_with(&format!("{}/team-a/multi:unsigned", gw.addr()), &opts)
        .expect_err("the unsigned index is refused");
    assert!(
        refused.contains("403") || refused.contains("denied"),
        "{refused}"
    );
    for (_, child) in unsigned.platform_manifests() {
        assert_eq!(manifest(&gw, "team-a/multi", &child, "GET").status, 403);
    }
}

#[test]
fn audit_mode_serves_unsigned_manifests_but_audits_and_counts_them() {
    let up = Upstream::start(UpstreamOptions::default());
    let trusted = CosignKey::generate();
    let signed = up.push(&TestImage::small("sig-audit-signed"), "team-a/app:signed");
    sign(&up, "team-a/app", &signed, &trusted);
    let unsigned = up.push(
        &TestImage::small("sig-audit-unsigned"),
        "team-a/app:unsigned",
    );
    let gw = Gateway::start(&registry(
        "icr",
        &up,
        &format!("default = true\n{}", policy(&trusted, "audit")),
    ));
    assert_eq!(manifest(&gw, "team-a/app", "signed", "GET").status, 200);
    let a = manifest(&gw, "team-a/app", "unsigned", "GET");
    assert_eq!(a.status, 200);
    assert_eq!(a.header("docker-content-digest"), Some(unsigned.clone()));
    skopeo_copy_to_oci(
        &format!("{}/team-a/app:unsigned", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("audit mode lets the pull through");
    assert_eq!(checks(&gw, "verified"), 1);
    assert!(checks(&gw, "unsigned") >= 2);
    let audit = gw.audit_lines();
    let line = audit
        .iter()
        .find(|l| l["reference"] == "unsigned")
        .expect("an audit line");
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["status"], 200);
    assert_eq!(line["reason"], "image_unsigned");
    let message = line["message"].as_str().unwrap();
    assert!(message.contains(&unsigned) && message.contains("registry.icr.signatures[0]"));
}

/// Attaches `bundle` to `subject` (of `size` bytes) the way cosign 3 does on a registry
/// without the referrers API: the bundle artifact, then the fallback tag's index listing it,
/// labelled `oci.empty` as GHCR's is.
fn attach_bundle(up: &Upstream, repo: &str, subject: &str, size: usize, bundle: &[u8]) {
    let empty = b"{}";
    push_blob_upstream(up, repo, &digest_of(empty), empty);
    push_blob_upstream(up, repo, &digest_of(bundle), bundle);
    let bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json";
    let artifact = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": bundle_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(empty), "size": 2},
        "layers": [{"mediaType": bundle_type, "digest": digest_of(bundle), "size": bundle.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": size},
    }))
    .unwrap();
    let artifact_digest = digest_of(&artifact);
    push_manifest_upstream(up, repo, &artifact_digest, OCI_MANIFEST, &artifact);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": artifact_digest,
            "size": artifact.len(),
            "artifactType": "application/vnd.oci.empty.v1+json",
        }],
    }))
    .unwrap();
    let tag = format!("sha256-{}", subject.trim_start_matches("sha256:"));
    push_manifest_upstream(
        up,
        repo,
        &tag,
        "application/vnd.oci.image.index.v1+json",
        &index,
    );
}

#[test]
fn sigstore_bundles_attached_as_referrers_verify_whatever_their_label() {
    let up = Upstream::start(UpstreamOptions::default());
    let trusted = CosignKey::generate();
    let good = TestImage::small("sig-bundle-good");
    let bad = TestImage::small("sig-bundle-bad");
    let good_digest = up.push(&good, "team-a/app:bundled");
    let bad_digest = up.push(&bad, "team-a/app:badbundle");
    attach_bundle(
        &up,
        "team-a/app",
        &good_digest,
        good.manifest_bytes().len(),
        &trusted.dsse_bundle(&good_digest),
    );
    attach_bundle(
        &up,
        "team-a/app",
        &bad_digest,
        bad.manifest_bytes().len(),
        &CosignKey::generate().dsse_bundle(&bad_digest),
    );
    let gw = Gateway::start(&registry(
        "icr",
        &up,
        &format!("default = true\n{}", policy(&trusted, "enforce")),
    ));
    let a = manifest(&gw, "team-a/app", "bundled", "GET");
    assert_eq!(a.status, 200, "{}", a.oci_message());
    let a = manifest(&gw, "team-a/app", "badbundle", "HEAD");
    assert_eq!(a.status, 403);
    let m = manifest(&gw, "team-a/app", "badbundle", "GET").oci_message();
    assert!(m.contains("bad_signature") && m.contains("DSSE"), "{m}");
    // The referrers themselves are served without a check.
    let referrers = request(
        "GET",
        &gw.url(&format!("/v2/team-a/app/referrers/{bad_digest}")),
        &[],
    );
    assert_eq!(referrers.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&referrers.body).unwrap();
    let artifact = doc["manifests"][0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(manifest(&gw, "team-a/app", &artifact, "GET").status, 200);
}

#[test]
fn verdicts_follow_reloads_and_decide_while_the_upstream_is_down() {
    let mut up = Upstream::start(UpstreamOptions::default());
    let trusted = CosignKey::generate();
    let other = CosignKey::generate();
    let signed = up.push(&TestImage::small("sig-stale-signed"), "team-a/app:signed");
    sign(&up, "team-a/app", &signed, &trusted);
    let unsigned = up.push(
        &TestImage::small("sig-stale-unsigned"),
        "team-a/app:unsigned",
    );
    // tag_ttl 0: a verdict is never fresh, so every request asks for signatures again.
    let gw = Gateway::start(&registry("icr", &up, "default = true\ntag_ttl = \"0s\""));
    let base = std::fs::read_to_string(gw.config_path()).unwrap();
    let reload = |extra: &str| {
        std::fs::write(gw.config_path(), format!("{base}{extra}")).unwrap();
        let answer = request("POST", &gw.admin_url("/-/reload"), &[]);
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    };
    let by_digest = |d: &str| manifest(&gw, "team-a/app", d, "GET");
    // No policy yet: served (and cached).
    assert_eq!(by_digest(&unsigned).status, 200);

    reload(&policy(&trusted, "enforce"));
    assert_eq!(by_digest(&unsigned).status, 403);
    assert_eq!(by_digest(&signed).status, 200);
    // Another key: the old verdict is not reused.
    reload(&policy(&other, "enforce"));
    let m = by_digest(&signed);
    assert_eq!(m.status, 403);
    assert!(
        m.oci_message().contains("bad_signature"),
        "{}",
        m.oci_message()
    );
    reload(&policy(&trusted, "enforce"));
    assert_eq!(by_digest(&signed).status, 200);

    // The upstream goes away: the cached verdict decides; without one, enforce refuses.
    up.stop();
    let a = by_digest(&signed);
    assert_eq!(a.status, 200, "{}", a.oci_message());
    let a = by_digest(&unsigned);
    assert_eq!(a.status, 403);
    assert!(a.oci_message().contains("error"), "{}", a.oci_message());
    assert!(checks(&gw, "error") >= 1);
}

#[test]
fn pullgate_check_names_bad_keys_and_policies_that_match_nothing() {
    let bin = env!("CARGO_BIN_EXE_pullgate");
    let dir = tempfile::tempdir().unwrap();
    let key = CosignKey::generate();
    std::fs::write(dir.path().join("good.pub"), key.public_pem()).unwrap();
    std::fs::write(
        dir.path().join("cosign.key"),
        "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
    )
    .unwrap();
    // secp256k1, which ring does not verify.
    let mut der = hex::decode("3056301006072a8648ce3d020106052b8104000a034200").unwrap();
    der.extend_from_slice(&[4u8; 65]);
    let k1 = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64(&der)
    );
    std::fs::write(dir.path().join("k1.pub"), k1).unwrap();
    let head = "[server]\nlisten = [\"127.0.0.1:5000\"]\n[[registry]]\nname = \"icr\"\nupstream = \"https://icr.example\"\nrepositories = [\"team-a/**\"]\n";
    let check = |text: &str| {
        let path = dir.path().join("pullgate.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(bin)
            .args(["check", "--strict", "-c"])
            .arg(&path)
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, out) = check(&format!(
        "{head}[[registry.signatures]]\nrepositories = [\"team-a/**\"]\nkeys = [\"good.pub\", \"cosign.key\", \"k1.pub\", \"gone.pub\"]\n"
    ));
    assert_eq!(code, Some(78), "{out}");
    for expected in [
        "registry.icr.signatures[0].keys[1]",
        "private key",
        "registry.icr.signatures[0].keys[2]",
        "unsupported elliptic curve",
        "registry.icr.signatures[0].keys[3]",
    ] {
        assert!(out.contains(expected), "{expected:?} not in {out}");
    }
    assert!(!out.contains("keys[0]"), "{out}");

    let (code, out) = check(&format!(
        "{head}[[registry.signatures]]\nrepositories = [\"team-b/**\"]\nkeys = [\"good.pub\"]\n"
    ));
    assert_ne!(code, Some(0), "--strict fails on the finding: {out}");
    assert!(out.contains("[signatures-never-match]"), "{out}");
    assert!(out.contains("registry.icr.signatures[0]"), "{out}");
    let (code, out) = check(&format!(
        "{head}[[registry.signatures]]\nrepositories = [\"team-a/app\"]\nkeys = [\"good.pub\"]\n"
    ));
    assert_eq!(code, Some(0), "{out}");
}
