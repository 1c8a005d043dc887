//! The seam to the operator's key service: wrap and unwrap generation keys, tell the KEK's
//! version, and class every failure as denied or unavailable.
//!
//! Owns: the [`Provider`] trait, [`Wrapped`] and [`ProviderError`]. Must never: carry key
//! material or a token in an error message.

use crate::crypt::SecretKey;

/// A generation key wrapped by the KEK: opaque text for the provider, and the KEK version
/// that wrapped it (a fingerprint for `file`, `N` of `vault:vN:` for `transit`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Wrapped {
    pub kek_version: String,
    pub ciphertext: String,
}

/// How a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The key service answered no: key disabled, deleted, version too old, permission
    /// removed. Treated as revocation.
    #[error("denied: {0}")]
    Denied(String),
    /// The key service cannot be reached or failed (connect error, timeout, 5xx).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// A key service holding the KEK. One call per generation key (wrap at creation, unwrap at
/// start), plus the periodic [`Provider::status`]; never one per blob or request.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `file`, `transit` or `exec` (for logs, metrics and the keyring).
    fn kind(&self) -> &'static str;
    /// Names the KEK (not its bytes): a keyring made with another KEK cannot be opened here.
    fn identity(&self) -> String;
    /// The version of the KEK now in use; `Denied` when it is revoked.
    async fn status(&self) -> Result<String, ProviderError>;
    async fn wrap(&self, key: &SecretKey) -> Result<Wrapped, ProviderError>;
    async fn unwrap(&self, wrapped: &Wrapped) -> Result<SecretKey, ProviderError>;
    /// Wraps again under the current KEK version without the key leaving the service; `None`
    /// where the provider cannot (then the caller wraps the unwrapped key again).
    async fn rewrap(&self, _wrapped: &Wrapped) -> Result<Option<Wrapped>, ProviderError> {
        Ok(None)
    }
}
