//! cosign's tag scheme: the manifest tagged `sha256-<hex>.sig` next to the image holds one
//! layer per signature. Each layer's blob is a "simple signing" payload, JSON naming the signed
//! manifest's digest in `critical.image.docker-manifest-digest`, and its
//! `dev.cosignproject.cosign/signature` annotation is the base64 signature over the payload's
//! bytes.

use super::{base64_decode, verified_by_any, PublicKey};
use crate::oci::Digest;

/// The `critical.type` of a cosign image signature.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";

/// One signature layer as fetched: its descriptor's digest, the blob, the annotation.
#[derive(Debug, Clone)]
pub struct SignedLayer {
    pub digest: Digest,
    pub payload: Vec<u8>,
    pub signature: String,
}

/// `Ok` when `layer` is a signature over `manifest` by one of `keys`; otherwise why not.
pub fn verify(manifest: &Digest, layer: &SignedLayer, keys: &[PublicKey]) -> Result<(), String> {
    if !layer.digest.verify(&layer.payload) {
        return Err(format!(
            "the signature payload does not hash to its layer digest {}",
            layer.digest
        ));
    }
    let signature =
        base64_decode(&layer.signature).map_err(|e| format!("the signature annotation is {e}"))?;
    if !verified_by_any(keys, &layer.payload, &signature) {
        return Err("the signature is not a valid signature by a trusted key".into());
    }
    let doc: serde_json::Value = serde_json::from_slice(&layer.payload)
        .map_err(|e| format!("the signed payload is not JSON: {e}"))?;
    let critical = &doc["critical"];
    match critical["type"].as_str() {
        Some(SIGNATURE_TYPE) => {}
        other => {
            return Err(format!(
                "the signed payload's critical.type is {other:?}, not {SIGNATURE_TYPE:?}"
            ))
        }
    }
    match critical["image"]["docker-manifest-digest"].as_str() {
        Some(named) if named == manifest.as_str() => Ok(()),
        Some(named) => Err(format!(
            "the signed payload names the manifest {}, not {manifest}",
            crate::oci::error::echo(named)
        )),
        None => Err("the signed payload has no critical.image.docker-manifest-digest".into()),
    }
}
