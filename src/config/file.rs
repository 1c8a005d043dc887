//! The serde schema of the config file. Seen by nothing outside `config/`.
//!
//! Everything is optional or defaulted here and typed loosely (strings for addresses, sizes,
//! durations, enums): `validate/` converts each value and reports a problem with the key's
//! name, which a serde error could not do as readably. Only unknown keys and wrong TOML types
//! are left to serde (`deny_unknown_fields` everywhere).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub cache: CacheFile,
    /// Zone name -> CIDRs. Sorted by name, which keeps `Config::zones` stable.
    #[serde(default)]
    pub zones: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub identity: Vec<IdentityFile>,
    #[serde(default)]
    pub registry: Vec<RegistryFile>,
    #[serde(default)]
    pub warm: Vec<WarmFile>,
    pub cluster: Option<ClusterFile>,
}

/// `[cluster]`: the replicas that share the fetching of blobs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterFile {
    #[serde(default)]
    pub peers: Vec<String>,
    pub peers_dns: Option<String>,
    pub peers_dns_refresh: Option<String>,
    pub advertise: Option<String>,
    pub advertise_env: Option<String>,
    pub key_file: Option<String>,
}

/// `[[warm]]`: an image to fetch into the cache before anyone pulls it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WarmFile {
    pub image: Option<String>,
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub referrers: bool,
    pub refresh: Option<String>,
    #[serde(default)]
    pub pin: bool,
    pub account: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerFile {
    pub listen: Option<Vec<String>>,
    pub admin_listen: Option<String>,
    pub threads: Option<i64>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub log_format: Option<String>,
    pub audit_log: Option<String>,
    #[serde(default)]
    pub tls: Vec<TlsFile>,
    pub redirect_key_file: Option<String>,
    pub redirect_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsFile {
    pub listen: Option<String>,
    #[serde(default)]
    pub certs: Vec<CertFile>,
    pub client_ca: Option<String>,
    #[serde(default)]
    pub require_client_cert: bool,
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertFile {
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CacheFile {
    pub dir: Option<String>,
    pub max_size: Option<RawSize>,
    pub tag_ttl: Option<String>,
    pub stale_if_error: Option<String>,
    pub negative_ttl: Option<String>,
    pub max_manifest_size: Option<RawSize>,
    pub fill_stall_timeout: Option<String>,
    pub pinned_max_size: Option<RawSize>,
    pub warm_concurrency: Option<i64>,
    pub warm_bandwidth: Option<String>,
    pub encryption: Option<EncryptionFile>,
    pub l2: Option<L2File>,
}

/// `[cache.l2]`: the object store the replicas share.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct L2File {
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id_env: Option<String>,
    pub secret_access_key_file: Option<String>,
    pub ca: Option<String>,
}

/// `[cache.encryption]`: every provider's keys in one table; validation checks which belong.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EncryptionFile {
    pub provider: Option<String>,
    pub key_file: Option<String>,
    pub address: Option<String>,
    pub key: Option<String>,
    pub token_file: Option<String>,
    pub ca: Option<String>,
    pub command: Option<Vec<String>>,
    pub rotate: Option<String>,
    pub on_revoked: Option<String>,
    pub unavailable_grace: Option<String>,
    pub check_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IdentityFile {
    pub name: Option<String>,
    pub mtls_subject: Option<String>,
    pub username: Option<String>,
    pub password_sha256: Option<String>,
    pub password_file: Option<String>,
    pub roles: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegistryFile {
    pub name: Option<String>,
    pub upstream: Option<String>,
    pub hosts: Option<Vec<String>>,
    #[serde(default)]
    pub data_hosts: Vec<String>,
    #[serde(default)]
    pub ns: Vec<String>,
    pub prefix: Option<String>,
    #[serde(default)]
    pub default: bool,
    pub library_namespace: Option<bool>,
    pub credentials: Option<CredentialsFile>,
    #[serde(default)]
    pub realm_hosts: Vec<String>,
    pub ca: Option<String>,
    pub network_access: Option<String>,
    #[serde(default)]
    pub zones: Vec<String>,
    pub trusted_identities: Option<bool>,
    #[serde(default)]
    pub repositories: Vec<String>,
    #[serde(default)]
    pub deny_repositories: Vec<String>,
    #[serde(default)]
    pub push: bool,
    #[serde(default)]
    pub delete: bool,
    pub redirect: Option<String>,
    pub tag_ttl: Option<String>,
    #[serde(default)]
    pub scoped_credentials: Vec<ScopedCredentialsFile>,
    #[serde(default)]
    pub signatures: Vec<SignaturesFile>,
}

/// `[[registry.signatures]]`: manifests of these repositories must be signed by one of the keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SignaturesFile {
    #[serde(default)]
    pub repositories: Vec<String>,
    #[serde(default)]
    pub keys: Vec<String>,
    pub mode: Option<String>,
}

/// `[[registry.scoped_credentials]]`: other upstream credentials for some callers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScopedCredentialsFile {
    pub name: Option<String>,
    #[serde(default)]
    pub zones: Vec<String>,
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub repositories: Vec<String>,
    pub credentials: Option<CredentialsFile>,
}

/// All credential kinds in one table; `validate/credentials.rs` checks that exactly one kind is
/// used.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialsFile {
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub docker_config: Option<String>,
    pub credential_helper: Option<String>,
}

/// A size as written: `1048576` or `"20GiB"`. Negative integers are kept so that validation
/// can name the key instead of serde failing with a generic message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RawSize {
    Int(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawSizeVisitor)
    }
}

struct RawSizeVisitor;

impl Visitor<'_> for RawSizeVisitor {
    type Value = RawSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: integer bytes or a string like \"20GiB\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
        Ok(RawSize::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
        i64::try_from(v)
            .map(RawSize::Int)
            .map_err(|_| E::custom("size too large"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
        Ok(RawSize::Text(v.to_owned()))
    }
}
