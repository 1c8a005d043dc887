//! The `file` provider: the KEK is 32 random bytes (raw or base64) in a file, typically a
//! Kubernetes Secret volume.
//!
//! Owns: reading the key file (again on every call, so a file replaced in place or a Secret
//! volume's `..data` symlink swapped to a new directory is a new KEK at once), its fingerprint
//! (the KEK version) and wrapping with AES-256-GCM under it.
//! Must never: log or return the key's bytes; unwrap under a KEK other than the one that
//! wrapped (the fingerprint is bound as associated data).

use std::path::PathBuf;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sha2::{Digest as _, Sha256};

use super::provider::{Provider, ProviderError, Wrapped};
use crate::crypt::{fill_random, parse_key_material, SecretKey, KEY_LEN};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub struct FileProvider {
    path: PathBuf,
}

impl FileProvider {
    pub fn new(path: PathBuf) -> FileProvider {
        FileProvider { path }
    }

    /// The KEK as the file holds it now. A missing or unreadable file is a removed key.
    fn kek(&self) -> Result<(SecretKey, String), ProviderError> {
        let mut bytes = std::fs::read(&self.path)
            .map_err(|e| ProviderError::Denied(format!("key file {}: {e}", self.path.display())))?;
        let parsed = parse_key_material(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        let key = parsed.map_err(|why| {
            ProviderError::Denied(format!("key file {}: {why}", self.path.display()))
        })?;
        let version = fingerprint(&key);
        Ok((key, version))
    }
}

/// The KEK's identity: 16 hex digits of SHA-256 over a label and the key. Names the key
/// without revealing it.
pub fn fingerprint(key: &SecretKey) -> String {
    let mut h = Sha256::new();
    h.update(b"pullgate/kek-fingerprint/v1\0");
    h.update(key.expose());
    hex::encode(&h.finalize()[..8])
}

fn aead(kek: &SecretKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek.expose()).expect("32-byte key"))
}

#[async_trait::async_trait]
impl Provider for FileProvider {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn identity(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn status(&self) -> Result<String, ProviderError> {
        self.kek().map(|(_, version)| version)
    }

    async fn wrap(&self, key: &SecretKey) -> Result<Wrapped, ProviderError> {
        let (kek, version) = self.kek()?;
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce).map_err(|_| ProviderError::Unavailable("no randomness".into()))?;
        let mut buf = key.expose().to_vec();
        aead(&kek)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(version.as_bytes()),
                &mut buf,
            )
            .map_err(|_| ProviderError::Unavailable("seal failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(Wrapped {
            kek_version: version,
            ciphertext: B64.encode(out),
        })
    }

    async fn unwrap(&self, wrapped: &Wrapped) -> Result<SecretKey, ProviderError> {
        let (kek, version) = self.kek()?;
        if version != wrapped.kek_version {
            return Err(ProviderError::Denied(format!(
                "wrapped by KEK {}, the key file now holds KEK {version}",
                wrapped.kek_version
            )));
        }
        let raw = B64
            .decode(&wrapped.ciphertext)
            .map_err(|_| ProviderError::Denied("wrapped key is not base64".into()))?;
        if raw.len() != NONCE_LEN + KEY_LEN + 16 {
            return Err(ProviderError::Denied(
                "wrapped key has the wrong length".into(),
            ));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&raw[..NONCE_LEN]);
        let mut buf = raw[NONCE_LEN..].to_vec();
        let opened = aead(&kek)
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(version.as_bytes()),
                &mut buf,
            )
            .map_err(|_| ProviderError::Denied("wrapped key does not open under the KEK".into()))?;
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(opened);
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(SecretKey::from_bytes(bytes))
    }
}
