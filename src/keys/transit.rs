//! The `transit` provider: the KEK is a key of an OpenBao (or HashiCorp Vault) Transit engine,
//! used through its HTTP API: `transit/encrypt`, `transit/decrypt`, `transit/rewrap` and
//! `transit/keys/<key>` (the version check).
//!
//! Owns: those calls, reading the token file (again on every call, so a renewed token is
//! used at once), and classing answers: 400/403/404 (too old a version, a deleted key,
//! permission denied, an unknown key) are `Denied`; connection errors, timeouts, 429 and 5xx
//! are `Unavailable`.
//! Must never: log the token, a plaintext key or the service's answer body beyond its `errors`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::provider::{Provider, ProviderError, Wrapped};
use crate::crypt::{SecretKey, KEY_LEN};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub struct TransitProvider {
    address: url::Url,
    key: String,
    token_file: PathBuf,
    http: reqwest::Client,
}

impl TransitProvider {
    pub fn new(
        address: url::Url,
        key: String,
        token_file: PathBuf,
        ca: Option<&Path>,
    ) -> Result<TransitProvider, String> {
        let tls = crate::upstream::tls::client_config(ca)
            .map_err(|e| format!("cache.encryption.ca: {e}"))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(8))
            .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(TransitProvider {
            address,
            key,
            token_file,
            http,
        })
    }

    fn token(&self) -> Result<String, ProviderError> {
        std::fs::read_to_string(&self.token_file)
            .map(|t| t.trim().to_owned())
            .map_err(|e| {
                ProviderError::Denied(format!("token file {}: {e}", self.token_file.display()))
            })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/v1/transit/{path}/{}",
            self.address.as_str().trim_end_matches('/'),
            self.key
        )
    }

    /// One call; the `data` object of the answer.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ProviderError> {
        let token = self.token()?;
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("X-Vault-Token", token);
        if let Some(body) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.map_err(|e| {
            ProviderError::Unavailable(format!("transit {path}: {}", without_url(&e)))
        })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(value["data"].clone());
        }
        let errors = value["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let message = format!("transit {path}: HTTP {status}: {errors}");
        Err(match status {
            400 | 401 | 403 | 404 => ProviderError::Denied(message),
            _ => ProviderError::Unavailable(message),
        })
    }
}

/// A reqwest error without its URL (it names the key service, not a secret, but keeps logs short).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "");
    }
    text
}

/// `N` of `vault:vN:...`.
fn version_of(ciphertext: &str) -> Result<String, ProviderError> {
    ciphertext
        .strip_prefix("vault:v")
        .and_then(|rest| rest.split(':').next())
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
        .ok_or_else(|| {
            ProviderError::Unavailable("transit answered an unexpected ciphertext".into())
        })
}

#[async_trait::async_trait]
impl Provider for TransitProvider {
    fn kind(&self) -> &'static str {
        "transit"
    }

    fn identity(&self) -> String {
        format!("transit:{}:{}", self.address, self.key)
    }

    async fn status(&self) -> Result<String, ProviderError> {
        let data = self.call(reqwest::Method::GET, "keys", None).await?;
        let latest = data["latest_version"]
            .as_u64()
            .ok_or_else(|| ProviderError::Unavailable("transit keys: no latest_version".into()))?;
        Ok(latest.to_string())
    }

    async fn wrap(&self, key: &SecretKey) -> Result<Wrapped, ProviderError> {
        let body = json!({ "plaintext": B64.encode(key.expose()) });
        let data = self
            .call(reqwest::Method::POST, "encrypt", Some(body))
            .await?;
        let ciphertext = data["ciphertext"]
            .as_str()
            .ok_or_else(|| ProviderError::Unavailable("transit encrypt: no ciphertext".into()))?
            .to_owned();
        Ok(Wrapped {
            kek_version: version_of(&ciphertext)?,
            ciphertext,
        })
    }

    async fn unwrap(&self, wrapped: &Wrapped) -> Result<SecretKey, ProviderError> {
        let body = json!({ "ciphertext": wrapped.ciphertext });
        let data = self
            .call(reqwest::Method::POST, "decrypt", Some(body))
            .await?;
        let mut raw = data["plaintext"]
            .as_str()
            .and_then(|p| B64.decode(p).ok())
            .ok_or_else(|| ProviderError::Unavailable("transit decrypt: no plaintext".into()))?;
        let key = <[u8; KEY_LEN]>::try_from(raw.as_slice())
            .map_err(|_| ProviderError::Denied("transit decrypt: not a 32-byte key".into()));
        zeroize::Zeroize::zeroize(&mut raw);
        key.map(SecretKey::from_bytes)
    }

    async fn rewrap(&self, wrapped: &Wrapped) -> Result<Option<Wrapped>, ProviderError> {
        let body = json!({ "ciphertext": wrapped.ciphertext });
        let data = self
            .call(reqwest::Method::POST, "rewrap", Some(body))
            .await?;
        let ciphertext = data["ciphertext"]
            .as_str()
            .ok_or_else(|| ProviderError::Unavailable("transit rewrap: no ciphertext".into()))?
            .to_owned();
        Ok(Some(Wrapped {
            kek_version: version_of(&ciphertext)?,
            ciphertext,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_the_ciphertext_prefix() {
        assert_eq!(version_of("vault:v12:abc=").unwrap(), "12");
        assert!(version_of("vault:x:abc").is_err());
        assert!(version_of("abc").is_err());
    }
}
