//! Sigstore bundles (`application/vnd.dev.sigstore.bundle*`), as cosign 3 attaches them: an
//! OCI artifact whose `subject` is the image, found through the referrers API or its fallback
//! tag, with one layer holding the bundle JSON.
//!
//! Two shapes are checked, both key-based (the bundle's verification material, certificates
//! and transparency log entries are not consulted):
//! - `dsseEnvelope`: a DSSE signature over PAE(payloadType, payload), the payload an in-toto
//!   statement one of whose `subject` entries has the manifest's digest;
//! - `messageSignature`: a signature over the manifest's own bytes, with `messageDigest` equal
//!   to the manifest's digest.

use super::{base64_decode, verified_by_any, PublicKey};
use crate::oci::{Algorithm, Digest};

/// `Ok` when the bundle `doc` holds a signature over `manifest` by one of `keys`. `body` is the
/// manifest's bytes, needed for a `messageSignature`.
pub fn verify(
    manifest: &Digest,
    body: Option<&[u8]>,
    doc: &[u8],
    keys: &[PublicKey],
) -> Result<(), String> {
    let bundle: serde_json::Value =
        serde_json::from_slice(doc).map_err(|e| format!("the sigstore bundle is not JSON: {e}"))?;
    match bundle["mediaType"].as_str() {
        Some(t) if t.starts_with(super::BUNDLE_MEDIA_TYPE_PREFIX) => {}
        other => return Err(format!("not a sigstore bundle (mediaType {other:?})")),
    }
    if bundle.get("dsseEnvelope").is_some() {
        dsse(manifest, &bundle["dsseEnvelope"], keys)
    } else if bundle.get("messageSignature").is_some() {
        message_signature(manifest, body, &bundle["messageSignature"], keys)
    } else {
        Err("the sigstore bundle has neither a dsseEnvelope nor a messageSignature".into())
    }
}

/// DSSE's pre-authentication encoding: what the signature is over.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

fn dsse(manifest: &Digest, env: &serde_json::Value, keys: &[PublicKey]) -> Result<(), String> {
    let payload_type = env["payloadType"]
        .as_str()
        .ok_or("the DSSE envelope has no payloadType")?;
    let payload = base64_decode(env["payload"].as_str().unwrap_or_default())
        .map_err(|e| format!("the DSSE payload is {e}"))?;
    let message = pae(payload_type, &payload);
    let signed = env["signatures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| base64_decode(s["sig"].as_str()?).ok())
        .any(|sig| verified_by_any(keys, &message, &sig));
    if !signed {
        return Err("the DSSE envelope has no valid signature by a trusted key".into());
    }
    let statement: serde_json::Value = serde_json::from_slice(&payload)
        .map_err(|e| format!("the DSSE payload is not an in-toto statement: {e}"))?;
    let alg = match manifest.algorithm() {
        Algorithm::Sha256 => "sha256",
        Algorithm::Sha512 => "sha512",
    };
    let named = statement["subject"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["digest"][alg].as_str() == Some(manifest.hex()));
    if named {
        Ok(())
    } else {
        Err(format!(
            "the signed in-toto statement has no subject with the digest {manifest}"
        ))
    }
}

fn message_signature(
    manifest: &Digest,
    body: Option<&[u8]>,
    sig: &serde_json::Value,
    keys: &[PublicKey],
) -> Result<(), String> {
    let want_alg = match manifest.algorithm() {
        Algorithm::Sha256 => "SHA2_256",
        Algorithm::Sha512 => "SHA2_512",
    };
    let digest = &sig["messageDigest"];
    let named = base64_decode(digest["digest"].as_str().unwrap_or_default())
        .map_err(|e| format!("the bundle's messageDigest is {e}"))?;
    if digest["algorithm"].as_str() != Some(want_alg) || hex::encode(&named) != manifest.hex() {
        return Err(format!(
            "the bundle's messageDigest is not the digest {manifest}"
        ));
    }
    let body = body
        .filter(|b| manifest.verify(b))
        .ok_or("the manifest's bytes are needed to check a messageSignature")?;
    let signature = base64_decode(sig["signature"].as_str().unwrap_or_default())
        .map_err(|e| format!("the bundle's signature is {e}"))?;
    if verified_by_any(keys, body, &signature) {
        Ok(())
    } else {
        Err("the bundle's messageSignature is not a valid signature by a trusted key".into())
    }
}
