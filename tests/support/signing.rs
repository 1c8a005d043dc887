//! Signing keys and signature documents in cosign's formats, made here because no real signer
//! runs on the test bed: Debian 12's skopeo 1.9 and podman 4.3 are built with sigstore
//! disabled ("Debian-local change: sigstore disabled" for `--sign-by-sigstore-private-key` and
//! for `sigstoreSigned` policies), and cosign is not installable.
//!
//! The documents follow what containers/image writes with `use-sigstore-attachments: true` and
//! what cosign writes: a manifest tagged `sha256-<hex>.sig` whose one layer is the simple
//! signing payload (`application/vnd.dev.cosign.simplesigning.v1+json`) with the base64
//! signature in its `dev.cosignproject.cosign/signature` annotation; and sigstore bundles
//! (v0.3, DSSE over an in-toto statement) attached as referrers.

use std::path::PathBuf;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

/// SubjectPublicKeyInfo DER up to the point, for a P-256 key.
const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = b64(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A P-256 signing key, its public half as a PEM file (`cosign.pub`).
pub struct CosignKey {
    dir: tempfile::TempDir,
    pair: EcdsaKeyPair,
}

impl CosignKey {
    pub fn generate() -> CosignKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .expect("generate P-256");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .expect("parse PKCS#8");
        let dir = tempfile::Builder::new()
            .prefix("cosign-key-")
            .tempdir()
            .expect("tempdir");
        let key = CosignKey { dir, pair };
        std::fs::write(key.public_path(), key.public_pem()).expect("write public key");
        key
    }

    pub fn public_path(&self) -> PathBuf {
        self.dir.path().join("cosign.pub")
    }

    pub fn public_pem(&self) -> String {
        let mut der = hex::decode(P256_SPKI_PREFIX).expect("hex");
        der.extend_from_slice(self.pair.public_key().as_ref());
        pem("PUBLIC KEY", &der)
    }

    /// An ASN.1 ECDSA P-256 SHA-256 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair
            .sign(&SystemRandom::new(), message)
            .expect("sign")
            .as_ref()
            .to_vec()
    }

    /// A sigstore bundle (v0.3, DSSE over an in-toto statement naming `subject`) signed by this
    /// key: the shape `cosign sign --key` 3.x attaches as a referrer. Made here, not by cosign.
    pub fn dsse_bundle(&self, subject: &str) -> Vec<u8> {
        let hex = subject.trim_start_matches("sha256:");
        let statement = serde_json::to_vec(&serde_json::json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": "image", "digest": {"sha256": hex}}],
            "predicateType": "https://sigstore.dev/cosign/sign/v1",
            "predicate": {},
        }))
        .expect("json");
        let payload_type = "application/vnd.in-toto+json";
        let mut pae = format!(
            "DSSEv1 {} {payload_type} {} ",
            payload_type.len(),
            statement.len()
        )
        .into_bytes();
        pae.extend_from_slice(&statement);
        serde_json::to_vec(&serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"publicKey": {"hint": ""}},
            "dsseEnvelope": {
                "payload": b64(&statement),
                "payloadType": payload_type,
                "signatures": [{"sig": b64(&self.sign(&pae)), "keyid": ""}],
            },
        }))
        .expect("json")
    }
}

/// The cosign simple-signing payload for `digest` of `docker_reference`, as containers/image
/// and cosign write it.
pub fn simple_signing_payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": {},
    }))
    .expect("json")
}

/// The blobs and manifest of a cosign `.sig` attachment holding one signature layer:
/// `(config, payload, manifest)`. `signature` is the annotation's value (base64).
pub fn cosign_attachment(payload: &[u8], signature: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let payload_digest = super::digest_of(payload);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [payload_digest]},
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": super::digest_of(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": payload_digest,
            "size": payload.len(),
            "annotations": {"dev.cosignproject.cosign/signature": signature},
        }],
    }))
    .expect("json");
    (config, payload.to_vec(), manifest)
}

/// Standard base64, as the signature annotation carries it.
pub fn base64(bytes: &[u8]) -> String {
    b64(bytes)
}

/// Stores a cosign `.sig` attachment for `subject` in `repo` of the upstream: `payload` with
/// the signature annotation `signature`.
pub fn attach(up: &super::Upstream, repo: &str, subject: &str, payload: &[u8], signature: &str) {
    use super::upstream::{push_blob_upstream, push_manifest_upstream};
    let (config, payload, manifest) = cosign_attachment(payload, signature);
    push_blob_upstream(up, repo, &super::digest_of(&config), &config);
    push_blob_upstream(up, repo, &super::digest_of(&payload), &payload);
    let tag = format!("sha256-{}.sig", subject.trim_start_matches("sha256:"));
    push_manifest_upstream(
        up,
        repo,
        &tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
}

/// Signs `subject` of `repo` in the upstream with `key`, as `cosign sign --key` would.
pub fn sign(up: &super::Upstream, repo: &str, subject: &str, key: &CosignKey) {
    let payload = simple_signing_payload(&format!("{}/{repo}", up.host_port()), subject);
    attach(up, repo, subject, &payload, &base64(&key.sign(&payload)));
}
