use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

use super::cosign::SignedLayer;
use super::*;
use crate::oci::Algorithm;

const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";
const ED25519_SPKI_PREFIX: &str = "302a300506032b6570032100";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = b64(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

struct Signer(EcdsaKeyPair);

impl Signer {
    fn new() -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        Signer(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap(),
        )
    }
    fn public(&self) -> PublicKey {
        let mut der = hex::decode(P256_SPKI_PREFIX).unwrap();
        der.extend_from_slice(self.0.public_key().as_ref());
        PublicKey::from_pem(pem("PUBLIC KEY", &der).as_bytes()).unwrap()
    }
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0
            .sign(&SystemRandom::new(), message)
            .unwrap()
            .as_ref()
            .to_vec()
    }
}

fn manifest() -> (Vec<u8>, Digest) {
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    (body.to_vec(), Digest::compute(Algorithm::Sha256, body))
}

fn payload_for(digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": "registry.example/team-a/app"},
            "image": {"docker-manifest-digest": digest},
            "type": cosign::SIGNATURE_TYPE,
        },
        "optional": null,
    }))
    .unwrap()
}

fn layer(signer: &Signer, payload: Vec<u8>) -> SignedLayer {
    SignedLayer {
        digest: Digest::compute(Algorithm::Sha256, &payload),
        signature: b64(&signer.sign(&payload)),
        payload,
    }
}

fn simple(layers: Vec<SignedLayer>) -> Evidence {
    Evidence {
        simple_signing: layers,
        bundles: Vec::new(),
    }
}

#[test]
fn a_cosign_signature_by_a_trusted_key_verifies() {
    let (body, digest) = manifest();
    let signer = Signer::new();
    let ev = simple(vec![layer(&signer, payload_for(digest.as_str()))]);
    assert_eq!(
        decide(&digest, Some(&body), &ev, &[signer.public()]),
        Outcome::Verified
    );
    // Any one of several keys, any one of several layers.
    let other = Signer::new();
    let ev = simple(vec![
        layer(&other, payload_for(digest.as_str())),
        layer(&signer, payload_for(digest.as_str())),
    ]);
    assert_eq!(
        decide(&digest, None, &ev, &[signer.public()]),
        Outcome::Verified
    );
    assert_eq!(
        decide(&digest, None, &ev, &[other.public(), signer.public()]),
        Outcome::Verified
    );
}

#[test]
fn cosign_signatures_that_do_not_hold_are_bad_signatures() {
    let (_, digest) = manifest();
    let trusted = Signer::new();
    let keys = [trusted.public()];
    let bad = |ev: Evidence| match decide(&digest, None, &ev, &keys) {
        Outcome::BadSignature(why) => why,
        other => panic!("expected a bad signature, got {other:?}"),
    };
    assert_eq!(
        decide(&digest, None, &Evidence::default(), &keys),
        Outcome::Unsigned
    );
    // Another key.
    let why = bad(simple(vec![layer(
        &Signer::new(),
        payload_for(digest.as_str()),
    )]));
    assert!(why.contains("trusted key"), "{why}");
    // A payload naming another digest, validly signed.
    let elsewhere = Digest::compute(Algorithm::Sha256, b"another manifest");
    let why = bad(simple(vec![layer(
        &trusted,
        payload_for(elsewhere.as_str()),
    )]));
    assert!(why.contains(elsewhere.as_str()), "{why}");
    // A tampered signature.
    let mut tampered = layer(&trusted, payload_for(digest.as_str()));
    let mut sig = base64_decode(&tampered.signature).unwrap();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    tampered.signature = b64(&sig);
    assert!(bad(simple(vec![tampered])).contains("trusted key"));
    // A payload that is not the layer's blob.
    let mut swapped = layer(&trusted, payload_for(digest.as_str()));
    swapped.digest = Digest::compute(Algorithm::Sha256, b"x");
    assert!(bad(simple(vec![swapped])).contains("layer digest"));
    // Garbage annotation, not JSON, wrong type.
    let mut garbage = layer(&trusted, payload_for(digest.as_str()));
    garbage.signature = "%%%".into();
    assert!(bad(simple(vec![garbage])).contains("base64"));
    assert!(bad(simple(vec![layer(&trusted, b"not json".to_vec())])).contains("JSON"));
    let wrong_type = serde_json::to_vec(&serde_json::json!({"critical": {
        "type": "atomic container signature",
        "image": {"docker-manifest-digest": digest.as_str()}}}))
    .unwrap();
    assert!(bad(simple(vec![layer(&trusted, wrong_type)])).contains("critical.type"));
}

fn dsse_bundle(signer: &Signer, subject_hex: &str) -> Vec<u8> {
    let statement = serde_json::to_vec(&serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "registry.example/team-a/app", "digest": {"sha256": subject_hex}}],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {},
    }))
    .unwrap();
    let payload_type = "application/vnd.in-toto+json";
    let sig = signer.sign(&bundle::pae(payload_type, &statement));
    serde_json::to_vec(&serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": "k"}},
        "dsseEnvelope": {
            "payload": b64(&statement),
            "payloadType": payload_type,
            "signatures": [{"sig": b64(&sig), "keyid": ""}],
        },
    }))
    .unwrap()
}

fn bundles(docs: Vec<Vec<u8>>) -> Evidence {
    Evidence {
        simple_signing: Vec::new(),
        bundles: docs,
    }
}

#[test]
fn sigstore_bundles_verify_as_dsse_or_message_signatures() {
    let (body, digest) = manifest();
    let trusted = Signer::new();
    let keys = [trusted.public()];
    assert_eq!(
        decide(
            &digest,
            None,
            &bundles(vec![dsse_bundle(&trusted, digest.hex())]),
            &keys
        ),
        Outcome::Verified
    );
    let other_hex = Digest::compute(Algorithm::Sha256, b"other")
        .hex()
        .to_owned();
    assert!(matches!(
        decide(&digest, None, &bundles(vec![dsse_bundle(&trusted, &other_hex)]), &keys),
        Outcome::BadSignature(why) if why.contains("subject")
    ));
    assert!(matches!(
        decide(&digest, None, &bundles(vec![dsse_bundle(&Signer::new(), digest.hex())]), &keys),
        Outcome::BadSignature(why) if why.contains("trusted key")
    ));

    let message = |signer: &Signer, named: &[u8]| {
        serde_json::to_vec(&serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "messageSignature": {
                "messageDigest": {"algorithm": "SHA2_256", "digest": b64(named)},
                "signature": b64(&signer.sign(&body)),
            },
        }))
        .unwrap()
    };
    let raw = hex::decode(digest.hex()).unwrap();
    let good = bundles(vec![message(&trusted, &raw)]);
    assert_eq!(
        decide(&digest, Some(&body), &good, &keys),
        Outcome::Verified
    );
    assert!(matches!(
        decide(&digest, None, &good, &keys),
        Outcome::BadSignature(why) if why.contains("bytes")
    ));
    let wrong = bundles(vec![message(&trusted, &[0u8; 32])]);
    assert!(matches!(
        decide(&digest, Some(&body), &wrong, &keys),
        Outcome::BadSignature(_)
    ));
    for junk in [
        &b"{}"[..],
        b"[]",
        b"not json",
        br#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json"}"#,
    ] {
        assert!(matches!(
            decide(&digest, Some(&body), &bundles(vec![junk.to_vec()]), &keys),
            Outcome::BadSignature(_)
        ));
    }
}

#[test]
fn keys_are_read_from_pem_and_what_is_not_a_public_key_is_named() {
    let signer = Signer::new();
    assert_eq!(signer.public().kind(), KeyKind::EcdsaP256);
    let rng = SystemRandom::new();
    let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let ed_pair = Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap();
    let mut der = hex::decode(ED25519_SPKI_PREFIX).unwrap();
    der.extend_from_slice(ed_pair.public_key().as_ref());
    let ed_key = PublicKey::from_pem(pem("PUBLIC KEY", &der).as_bytes()).unwrap();
    assert_eq!(ed_key.kind(), KeyKind::Ed25519);
    assert!(ed_key.verify(b"m", ed_pair.sign(b"m").as_ref()));
    assert!(!ed_key.verify(b"n", ed_pair.sign(b"m").as_ref()));

    let err = |text: &str| PublicKey::from_pem(text.as_bytes()).unwrap_err();
    assert!(err(&pem("PRIVATE KEY", ed.as_ref())).contains("private key"));
    assert!(err(&pem("ENCRYPTED SIGSTORE PRIVATE KEY", b"x")).contains("private key"));
    assert!(err(&pem("CERTIFICATE", b"x")).contains("certificate"));
    assert!(err("hello").contains("not a PEM"));
    assert!(err("-----BEGIN PUBLIC KEY-----\n%%%\n-----END PUBLIC KEY-----\n").contains("base64"));
    assert!(err("-----BEGIN PUBLIC KEY-----\nAAAA\n").contains("END"));
    assert!(err(&pem("PUBLIC KEY", b"\x30\x03\x02\x01\x01")).contains("SubjectPublicKeyInfo"));
    // secp256k1: a curve ring does not verify.
    let k1 = hex::decode("3056301006072a8648ce3d020106052b8104000a034200").unwrap();
    let mut k1 = k1;
    k1.extend_from_slice(&[4u8; 65]);
    assert!(err(&pem("PUBLIC KEY", &k1)).contains("unsupported elliptic curve"));
    // A DSA key's algorithm.
    let dsa = hex::decode("300e300906072a8648ce3804010301").unwrap();
    assert!(err(&pem("PUBLIC KEY", &[dsa, vec![0]].concat())).contains("unsupported key type"));
}
