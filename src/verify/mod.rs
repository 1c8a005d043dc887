//! Image signatures checked against trusted public keys (issue 19): the pure half of
//! `[[registry.signatures]]`.
//!
//! Owns: reading PEM public keys ([`PublicKey`]), and deciding whether signature material
//! fetched for a manifest digest is a valid signature over that digest by one of the keys: the
//! cosign tag scheme's simple-signing payloads ([`cosign`]) and sigstore bundles ([`bundle`]).
//! Key-based only: no certificate chain, no transparency log, no timestamps (what
//! `cosign verify --key K --insecure-ignore-tlog` checks).
//!
//! Must never: do I/O (the gateway fetches the material, `gateway/signature.rs`), accept a
//! signature that is not over the exact digest asked about, or let a malformed document panic.
//! Depends on `oci` only; signature arithmetic is ring's.

pub mod bundle;
pub mod cosign;
mod keys;

pub use keys::{KeyKind, PublicKey};

use crate::oci::Digest;

/// The annotation of a cosign signature layer that holds the base64 signature.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Sigstore bundle media types all start so (`...bundle+json;version=0.1`, `...bundle.v0.3+json`).
pub const BUNDLE_MEDIA_TYPE_PREFIX: &str = "application/vnd.dev.sigstore.bundle";

/// Signature material found for one manifest, as fetched (unverified).
#[derive(Debug, Default, Clone)]
pub struct Evidence {
    /// Layers of the `sha256-<hex>.sig` manifest that carry a signature annotation.
    pub simple_signing: Vec<cosign::SignedLayer>,
    /// Sigstore bundle documents from the manifest's referrers.
    pub bundles: Vec<Vec<u8>>,
}

impl Evidence {
    pub fn is_empty(&self) -> bool {
        self.simple_signing.is_empty() && self.bundles.is_empty()
    }
}

/// What the material says about a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A signature over this digest by a trusted key.
    Verified,
    /// No signature material at all.
    Unsigned,
    /// Material was found but none of it is a valid signature over this digest by a trusted key:
    /// the reason of the first one.
    BadSignature(String),
    /// The material could not be fetched (the upstream is unavailable or refused).
    Error(String),
}

impl Outcome {
    /// The `outcome` label of `pullgate_signature_checks_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Verified => "verified",
            Outcome::Unsigned => "unsigned",
            Outcome::BadSignature(_) => "bad_signature",
            Outcome::Error(_) => "error",
        }
    }

    /// For messages: the label and the reason.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Verified => "verified".into(),
            Outcome::Unsigned => "unsigned: no signature was found".into(),
            Outcome::BadSignature(why) => format!("bad_signature: {why}"),
            Outcome::Error(why) => format!("error: {why}"),
        }
    }
}

/// Decides on `digest` (whose bytes are `manifest`, needed for bundles that sign the artifact
/// itself) from `evidence`: verified when any one piece is valid for any key.
pub fn decide(
    digest: &Digest,
    manifest: Option<&[u8]>,
    evidence: &Evidence,
    keys: &[PublicKey],
) -> Outcome {
    if evidence.is_empty() {
        return Outcome::Unsigned;
    }
    let mut first_failure: Option<String> = None;
    let mut note = |r: Result<(), String>| match r {
        Ok(()) => true,
        Err(why) => {
            first_failure.get_or_insert(why);
            false
        }
    };
    for layer in &evidence.simple_signing {
        if note(cosign::verify(digest, layer, keys)) {
            return Outcome::Verified;
        }
    }
    for doc in &evidence.bundles {
        if note(bundle::verify(digest, manifest, doc, keys)) {
            return Outcome::Verified;
        }
    }
    Outcome::BadSignature(first_failure.unwrap_or_else(|| "no usable signature".into()))
}

/// Any key that verifies `signature` over `message`.
fn verified_by_any(keys: &[PublicKey], message: &[u8], signature: &[u8]) -> bool {
    keys.iter().any(|k| k.verify(message, signature))
}

/// Standard base64, tolerating line breaks some producers insert.
fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let cleaned: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| format!("not base64: {e}"))
}

#[cfg(test)]
mod tests;
