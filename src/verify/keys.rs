//! PEM `PUBLIC KEY` (SubjectPublicKeyInfo) files: the trusted keys of a signature policy.
//!
//! Supported: ECDSA P-256 with SHA-256 (cosign's default), ECDSA P-384 with SHA-384, Ed25519,
//! and RSA (2048 to 8192 bits) with PKCS#1 v1.5 and SHA-256. Anything else is refused at load
//! with a message naming what it is, so a policy never holds a key that could verify nothing.

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The kind of a trusted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa,
}

impl KeyKind {
    pub fn label(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ECDSA P-256",
            KeyKind::EcdsaP384 => "ECDSA P-384",
            KeyKind::Ed25519 => "Ed25519",
            KeyKind::Rsa => "RSA",
        }
    }

    fn algorithm(self) -> &'static dyn VerificationAlgorithm {
        match self {
            KeyKind::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyKind::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
            KeyKind::Ed25519 => &signature::ED25519,
            KeyKind::Rsa => &signature::RSA_PKCS1_2048_8192_SHA256,
        }
    }
}

/// A trusted public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    kind: KeyKind,
    /// The SubjectPublicKeyInfo DER (what the policy's fingerprint covers).
    spki: Vec<u8>,
    /// The key bits in ring's terms: an uncompressed EC point, the raw Ed25519 key, or the
    /// PKCS#1 RSAPublicKey.
    bits: Vec<u8>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

impl PublicKey {
    /// The first PEM block of `text`, which must be a `PUBLIC KEY`. The error says what the
    /// file holds instead (a private key, a certificate, an unsupported curve).
    pub fn from_pem(text: &[u8]) -> Result<PublicKey, String> {
        let text = std::str::from_utf8(text).map_err(|_| "not a PEM file (not text)")?;
        let (label, der) = first_pem_block(text)?;
        match label.as_str() {
            "PUBLIC KEY" => PublicKey::from_spki(&der),
            l if l.contains("PRIVATE KEY") => Err(format!(
                "holds a private key ({l}); give the public key (cosign.pub), never the private one"
            )),
            "CERTIFICATE" => Err(
                "holds a certificate; give its public key (`openssl x509 -pubkey -noout`)".into(),
            ),
            l => Err(format!("holds a PEM {l:?} block, not a PUBLIC KEY")),
        }
    }

    /// A SubjectPublicKeyInfo in DER.
    pub fn from_spki(der: &[u8]) -> Result<PublicKey, String> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| format!("not a SubjectPublicKeyInfo: {e}"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the SubjectPublicKeyInfo".into());
        }
        let alg = spki.algorithm.algorithm.to_id_string();
        let bits = spki.subject_public_key.data.to_vec();
        let kind = match alg.as_str() {
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .unwrap_or_default();
                match curve.as_str() {
                    OID_P256 => KeyKind::EcdsaP256,
                    OID_P384 => KeyKind::EcdsaP384,
                    other => {
                        return Err(format!(
                            "unsupported elliptic curve {other:?}: use P-256 (cosign's default) or P-384"
                        ))
                    }
                }
            }
            OID_ED25519 => KeyKind::Ed25519,
            OID_RSA => KeyKind::Rsa,
            other => {
                return Err(format!(
                "unsupported key type (algorithm {other}): use ECDSA P-256, P-384, Ed25519 or RSA"
            ))
            }
        };
        let point_ok = match kind {
            KeyKind::EcdsaP256 => bits.len() == 65 && bits[0] == 4,
            KeyKind::EcdsaP384 => bits.len() == 97 && bits[0] == 4,
            KeyKind::Ed25519 => bits.len() == 32,
            KeyKind::Rsa => !bits.is_empty(),
        };
        if !point_ok {
            return Err(format!("a malformed {} public key", kind.label()));
        }
        Ok(PublicKey {
            kind,
            spki: der.to_vec(),
            bits,
        })
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// Whether `signature` (ASN.1 DER for ECDSA) is this key's over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(self.kind.algorithm(), &self.bits)
            .verify(message, signature)
            .is_ok()
    }
}

/// The label and decoded bytes of the first `-----BEGIN ...-----` block.
fn first_pem_block(text: &str) -> Result<(String, Vec<u8>), String> {
    let start = text
        .find("-----BEGIN ")
        .ok_or("not a PEM file (no -----BEGIN line)")?;
    let after = &text[start + "-----BEGIN ".len()..];
    let label_end = after.find("-----").ok_or("a malformed PEM BEGIN line")?;
    let label = after[..label_end].to_owned();
    let body_and_rest = &after[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let end = body_and_rest
        .find(&end_marker)
        .ok_or_else(|| format!("the PEM block {label:?} has no END line"))?;
    let der = super::base64_decode(&body_and_rest[..end])
        .map_err(|e| format!("the PEM block {label:?} is {e}"))?;
    Ok((label, der))
}
