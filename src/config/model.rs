//! The validated configuration: the only config types the rest of pullgate sees.
//!
//! Everything here has already been checked by `validate/`: addresses parsed, sizes and
//! durations converted, zone and identity names resolved, hosts lowercased, the upstream URL
//! split. Code outside `config/` must never need to re-validate a field, and must never see the
//! serde schema in `file.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::secret::Secret;

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub cache: Cache,
    pub zones: Vec<Zone>,
    pub identities: Vec<Identity>,
    pub registries: Vec<Arc<Registry>>,
    /// `[[warm]]` entries in file order. Their images are resolved against the registries by
    /// `warm::plan` (routing lives outside `config/`), which `pullgate check` runs too.
    pub warm: Vec<WarmEntry>,
    /// `[cluster]`: replicas that fetch each blob once for all of them; `None`: alone.
    pub cluster: Option<Cluster>,
    /// Findings that do not stop pullgate from starting (inline passwords, keys whose behaviour
    /// is not built yet). `pullgate check` prints them; `serve` logs them once at start.
    pub warnings: Vec<Warning>,
}

/// `[cluster]`, validated: `advertise` is one of `peers`, `key_file` holds a usable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Every member, this replica included (`peers`); empty with `peers_dns`.
    pub peers: Vec<SocketAddr>,
    /// Members from DNS instead: every address the name resolves to, re-resolved.
    pub peers_dns: Option<PeersDns>,
    /// How peers reach this replica: one of `peers` (or of what `peers_dns` resolves to).
    pub advertise: SocketAddr,
    /// The key that authenticates peer-to-peer requests.
    pub key_file: PathBuf,
}

/// `cluster.peers_dns`: a name whose addresses are the members (a Kubernetes headless Service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeersDns {
    pub name: String,
    pub port: u16,
    /// How often the name is resolved again (`peers_dns_refresh`, default 10 s).
    pub refresh: Duration,
}

/// A non-fatal finding about the config, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Dotted key path, e.g. `registry.hub.credentials.password`.
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Server {
    /// Plain HTTP listeners.
    pub listen: Vec<SocketAddr>,
    /// `/metrics`, `/healthz`, `/readyz`; `None` when set to `""`.
    pub admin_listen: Option<SocketAddr>,
    /// Worker threads of the gateway service.
    pub threads: usize,
    /// Peers whose `X-Forwarded-For`/`Forwarded`/PROXY headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    pub log_format: LogFormat,
    pub audit_log: AuditSink,
    pub tls: Vec<TlsListener>,
    /// The key that signs data-endpoint redirects (`redirect_key_file`); `None`: a key
    /// generated once and kept in `cache.dir` (`sign::GENERATED_KEY_FILE`).
    pub redirect_key_file: Option<PathBuf>,
    /// How long a signed data-endpoint URL stays valid. Default 5 minutes.
    pub redirect_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    /// Certificate/key pairs; the first is the default for clients without SNI.
    pub certs: Vec<CertPair>,
    pub client_ca: Option<PathBuf>,
    pub require_client_cert: bool,
    /// Every connection starts with a PROXY protocol v1/v2 header from a peer in
    /// `server.trusted_proxies`, whose source address replaces the TCP peer's; any other
    /// connection is closed before TLS.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    /// Bytes.
    pub max_size: u64,
    /// How long a tag -> digest answer is reused without asking the upstream.
    pub tag_ttl: Duration,
    /// How long cached tags keep serving while the upstream fails.
    pub stale_if_error: Duration,
    /// How long an upstream 404 for a manifest is remembered (0 = not at all).
    pub negative_ttl: Duration,
    /// Manifests larger than this are refused (invariant 7). Default 4 MiB.
    pub max_manifest_size: u64,
    /// A blob fill that gets no byte from the upstream for this long gives up on the
    /// connection and resumes with `Range`. Default 60 s.
    pub fill_stall_timeout: Duration,
    /// The budget of pinned blobs (`[[warm]] pin = true`), outside `max_size`. Default 0:
    /// nothing can be pinned until it is set.
    pub pinned_max_size: u64,
    /// Warm-job fetches (manifests and blobs) running at once, over all jobs. Default 2.
    pub warm_concurrency: usize,
    /// Bytes per second all warm jobs together may read; `None`: no cap.
    pub warm_bandwidth: Option<u64>,
    /// `[cache.encryption]`: blobs and manifests sealed at rest; `None` = plaintext.
    pub encryption: Option<Encryption>,
    /// `[cache.l2]`: a second tier in an object store; `None` = disk only.
    pub l2: Option<L2>,
}

/// `[cache.l2]`: an S3 bucket (or an S3-compatible store) shared by every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2 {
    pub bucket: String,
    /// Object names start with this (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// `None`: AWS's own endpoint for `region`.
    pub endpoint: Option<url::Url>,
    pub region: String,
    /// The name of the environment variable holding the access key id.
    pub access_key_id_env: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    /// CA bundle for an `https` endpoint with a private CA.
    pub ca: Option<PathBuf>,
}

/// One `[[warm]]` entry, checked for its own values (not yet routed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmEntry {
    /// `warm[i]`, for messages.
    pub key: String,
    /// As a client names it through pullgate: `host/repo:tag`, `host/repo@digest`.
    pub image: String,
    /// `os/arch[/variant]` strings; empty: every platform of an index.
    pub platforms: Vec<String>,
    /// Also fetch the referrers (signatures, SBOMs, attestations) of what is warmed.
    pub referrers: bool,
    /// Re-resolve the tag this often; `None`: once per start or reload.
    pub refresh: Option<Duration>,
    /// Never evict what this entry fetched while it is listed.
    pub pin: bool,
    /// The registry's `scoped_credentials` name whose view to fill; `None`: its own
    /// credentials.
    pub account: Option<String>,
}

/// `[cache.encryption]`: the operator's key (KEK) and how pullgate uses it (`keys/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    pub provider: KeyProvider,
    /// A new generation key this often (and whenever the KEK's version changes).
    pub rotate: Duration,
    pub on_revoked: OnRevoked,
    /// How long keys already unwrapped keep working while the provider cannot be reached.
    pub unavailable_grace: Duration,
    /// How often the provider is asked whether the key still works (at most 60 s).
    pub check_interval: Duration,
}

/// Where the KEK lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProvider {
    /// 32 random bytes (raw or base64) in a file; re-read when it changes.
    File { key_file: PathBuf },
    /// An OpenBao / Vault Transit key.
    Transit {
        address: url::Url,
        key: String,
        token_file: PathBuf,
        ca: Option<PathBuf>,
    },
    /// A helper program speaking JSON lines on stdin/stdout (README, "The exec protocol").
    Exec { command: Vec<String> },
}

impl KeyProvider {
    pub fn name(&self) -> &'static str {
        match self {
            KeyProvider::File { .. } => "file",
            KeyProvider::Transit { .. } => "transit",
            KeyProvider::Exec { .. } => "exec",
        }
    }
}

/// What clients get once the key is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRevoked {
    /// Blobs and manifests stream from the upstream, nothing is cached.
    Passthrough,
    /// 503 with an OCI error.
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    pub nets: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub auth: IdentityAuth,
    pub roles: Roles,
}

#[derive(Debug, Clone)]
pub enum IdentityAuth {
    /// A verified client certificate whose CN or a DNS SAN equals `subject`.
    Mtls { subject: String },
    /// HTTP Basic with a username and a password checked against a SHA-256 hash.
    Password {
        username: String,
        password: PasswordCheck,
    },
}

#[derive(Clone)]
pub enum PasswordCheck {
    /// 32 bytes, from `password_sha256` (hex).
    Sha256([u8; 32]),
    /// The password is the (trimmed) content of this file, read when checked.
    File(PathBuf),
}

/// Never shows the hash: a password hash is a secret too.
impl std::fmt::Debug for PasswordCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordCheck::Sha256(_) => f.write_str("Sha256(<redacted>)"),
            PasswordCheck::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    pub pull: bool,
    pub push: bool,
    /// DELETE of manifests, tags and blobs (on registries with `delete = true`).
    pub delete: bool,
}

/// One upstream registry and the names it answers to.
#[derive(Debug, Clone)]
pub struct Registry {
    /// Unique; used in metrics, logs and the audit log.
    pub name: String,
    pub upstream: Upstream,
    /// Lowercased Host names (no port) this registry answers at.
    /// Default: `["private.<upstream host>"]`.
    pub hosts: Vec<String>,
    /// Lowercased blob-only Host names.
    pub data_hosts: Vec<String>,
    /// containerd `?ns=` values (lowercased; may carry a `:port`).
    pub ns: Vec<String>,
    /// Path prefix: `/v2/<prefix>/<repository>/...`. No leading or trailing `/`.
    pub prefix: Option<String>,
    /// Requests that no other rule routes go here. At most one registry has it.
    pub default: bool,
    /// One-component names get `library/` (Docker Hub's convention). Default: true when the
    /// upstream host is Docker Hub's, else false.
    pub library_namespace: bool,
    /// `None`: anonymous upstream access.
    pub credentials: Option<CredentialSource>,
    /// Extra token realm hosts that may receive the credentials, besides the upstream host and
    /// hosts on its registrable domain.
    pub realm_hosts: Vec<String>,
    /// Extra trust anchors (PEM file) for this upstream and its token realm.
    pub ca: Option<PathBuf>,
    pub network_access: NetworkAccess,
    /// Zone names, each known to `Config::zones`.
    pub zones: Vec<String>,
    pub trusted_identities: bool,
    /// Allowed repository globs; empty means all.
    pub repositories: Vec<String>,
    /// Denied repository globs, checked before `repositories`.
    pub deny_repositories: Vec<String>,
    pub push: bool,
    /// DELETE of manifests (by digest), tags and blobs goes to the upstream. Default false:
    /// such requests are `UNSUPPORTED` (405) before anything reaches the upstream.
    pub delete: bool,
    pub redirect: RedirectMode,
    /// Per-registry override of `cache.tag_ttl`.
    pub tag_ttl: Option<Duration>,
    /// Other upstream credentials for some callers; the first that matches is used, else
    /// `credentials`.
    pub scoped_credentials: Vec<ScopedCredentials>,
    /// Signature policies (`[[registry.signatures]]`); the first whose globs match a
    /// repository covers it.
    pub signatures: Vec<SignaturePolicy>,
}

/// `[[registry.signatures]]`: manifests in these repositories are served only when signed by
/// one of `keys` (issue 19; `verify/` checks, `gateway/signature.rs` enforces).
#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    /// The policy's own key, `registry.<name>.signatures[<i>]`: named in denials.
    pub key: String,
    /// Repository globs; empty means every repository of the registry.
    pub repositories: Vec<String>,
    /// The trusted keys, read and parsed at load (a reload reads them again).
    pub keys: Vec<crate::verify::PublicKey>,
    pub mode: SignatureMode,
    /// SHA-256 (hex) over the policy's key, mode, globs and keys: verdicts are cached per
    /// (digest, fingerprint), so a changed policy never reuses an old verdict.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureMode {
    /// Refuse what does not verify.
    Enforce,
    /// Serve it, but audit and count.
    Audit,
}

/// Upstream credentials for the callers a rule selects: every non-empty list must match (any
/// entry of it): the caller's zones, its identity, the repository.
#[derive(Debug, Clone)]
pub struct ScopedCredentials {
    /// Unique within the registry; named in the audit log and kept apart in the cache.
    pub name: String,
    pub zones: Vec<String>,
    pub identities: Vec<String>,
    /// Repository globs.
    pub repositories: Vec<String>,
    pub credentials: CredentialSource,
}

/// The upstream registry's origin, split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `https://host[:port]` exactly as requests are built from it (no path, no trailing `/`).
    pub origin: String,
    pub https: bool,
    /// Lowercased host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub enum CredentialSource {
    Basic {
        username: String,
        password: PasswordSource,
    },
    /// A docker `config.json`; the entry for the upstream host is used (`auths` or its helpers).
    DockerConfig { path: PathBuf },
    /// `docker-credential-<name> get`, the upstream host on stdin.
    Helper { name: String },
}

#[derive(Debug, Clone)]
pub enum PasswordSource {
    /// `password = "..."` in the file itself (`check` warns).
    Inline(Secret),
    /// `password_env`: read once at load; an unset variable is a config error.
    Env { var: String, value: Secret },
    /// `password_file`: read when used, re-read when the file changes.
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkAccess {
    /// Any source address.
    Enabled,
    /// Only sources in the registry's zones (and trusted identities).
    Selected,
    /// Only identities.
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectMode {
    /// pullgate follows upstream storage redirects itself.
    Follow,
    /// Blob GETs on registry hosts are answered with a signed 307 to a data host.
    DataEndpoint,
}

impl Registry {
    /// The tag TTL in force for this registry.
    pub fn tag_ttl(&self, cache: &Cache) -> Duration {
        self.tag_ttl.unwrap_or(cache.tag_ttl)
    }
}
