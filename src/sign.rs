//! Signed blob URLs for data endpoints (DESIGN.md: Azure's dedicated data endpoints as
//! `data_hosts`; `redirect = "data-endpoint"`).
//!
//! A registry host that has decided a blob GET may proceed answers with a 307 to one of the
//! registry's `data_hosts`, carrying a [`Grant`] and its HMAC-SHA256 in the query. The data host
//! checks the HMAC instead of running policy again: the client following the redirect sends no
//! credentials, and its source address may differ. So a signature is a policy decision in
//! transit, and this module's one job is that nobody can forge, widen or prolong one.
//!
//! Owns: the [`RedirectKey`] (from `server.redirect_key_file`, or generated once in the cache dir
//! so restarts and processes sharing the cache dir agree), the wire form of a signed query, and
//! [`RedirectKey::verify`]. Depends on nothing else in the crate; no HTTP types.
//!
//! Must never: log or print the key (its `Debug` is redacted; it is not `Display`), compare
//! MACs with `==` (the comparison is constant-time), or accept a signature whose registry,
//! account, repository, digest or expiry differs in any byte from what was signed.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key file pullgate creates in the cache dir when `server.redirect_key_file` is not set.
pub const GENERATED_KEY_FILE: &str = "redirect.key";

/// A key shorter than this (after trimming whitespace) is refused: HMAC-SHA256 wants 32 bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Query parameters of a signed URL.
pub const PARAM_EXPIRES: &str = "expires";
pub const PARAM_ACCOUNT: &str = "account";
pub const PARAM_SIGNATURE: &str = "signature";

/// Domain separation: a MAC made for something else with the same key never verifies here.
const CONTEXT: &[u8] = b"pullgate blob url v1";

/// The context of a cluster peer request (`cluster.key_file`): a data-endpoint URL and a peer
/// request never stand for each other, even under one key.
const PEER_CONTEXT: &[u8] = b"pullgate peer blob v1";

/// The context of a peer tag request: a blob grant never stands for a tag grant.
const PEER_TAG_CONTEXT: &[u8] = b"pullgate peer tag v1";

type HmacSha256 = Hmac<Sha256>;

/// The secret behind every signature. Never printed: `Debug` is redacted and there is no
/// `Display`.
#[derive(Clone)]
pub struct RedirectKey(Vec<u8>);

impl fmt::Debug for RedirectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedirectKey(<redacted>)")
    }
}

/// What a signature allows: one blob of one repository, fetched with one upstream account,
/// until a moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The registry's configured name.
    pub registry: String,
    /// The `scoped_credentials` name the registry host chose; `None` for the registry's own
    /// credentials. The data host fills with the same account (invariant 5 per account).
    pub account: Option<String>,
    /// The repository as the upstream knows it (after prefix stripping and `library/`).
    pub repository: String,
    /// `algorithm:hex` (for a peer tag request, the tag).
    pub digest: String,
    /// Unix seconds after which the signature is refused.
    pub expires: u64,
}

/// What a data host found wrong with a URL. Each has a bounded [`label`](Self::label) for
/// metrics and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// No `signature` or no `expires` parameter: not a URL a registry host made.
    Missing,
    /// Malformed, or a MAC that does not match what the request asks for (altered URL, or
    /// signed with another key).
    Invalid,
    /// Genuine, but past its expiry.
    Expired { expired_at: u64, now: u64 },
}

impl SignatureError {
    pub fn label(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Invalid => "signature_invalid",
            SignatureError::Expired { .. } => "signature_expired",
        }
    }

    /// A sentence for the client: what is wrong and what to do. `data_host` is the host asked,
    /// `registry_host` the one to pull through instead.
    pub fn message(&self, data_host: &str, registry_host: &str) -> String {
        match self {
            SignatureError::Missing => format!(
                "{data_host} is a data endpoint: it serves only blob URLs signed by a redirect \
                 from {registry_host}; pull through {registry_host}"
            ),
            SignatureError::Invalid => format!(
                "the signature of this blob URL on {data_host} does not match the URL (altered, \
                 or signed with another key); pull again through {registry_host}"
            ),
            SignatureError::Expired { expired_at, now } => format!(
                "this signed blob URL on {data_host} expired {}s ago (server.redirect_ttl); pull \
                 again through {registry_host}",
                now.saturating_sub(*expired_at)
            ),
        }
    }
}

/// The signature parameters of a request's query, before they are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub account: Option<String>,
    pub expires: String,
    pub signature: String,
}

impl Presented {
    /// The parameters from a raw query (`?` removed). The first occurrence of each counts.
    pub fn from_query(query: &str) -> Result<Presented, SignatureError> {
        let mut account = None;
        let mut expires = None;
        let mut signature = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match k.as_ref() {
                PARAM_ACCOUNT => &mut account,
                PARAM_EXPIRES => &mut expires,
                PARAM_SIGNATURE => &mut signature,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v.into_owned());
            }
        }
        match (expires, signature) {
            (Some(expires), Some(signature)) => Ok(Presented {
                account,
                expires,
                signature,
            }),
            _ => Err(SignatureError::Missing),
        }
    }
}

impl RedirectKey {
    /// A key from raw bytes; `Err` names what is wrong (never the bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<RedirectKey, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the key must be at least {MIN_KEY_BYTES} bytes (not counting surrounding \
                 whitespace), found {}; make one with `openssl rand -base64 48`",
                trimmed.len()
            ));
        }
        Ok(RedirectKey(trimmed.to_vec()))
    }

    /// The key in `path`: the file's contents with surrounding whitespace trimmed.
    pub fn load(path: &Path) -> Result<RedirectKey, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        RedirectKey::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key in `<cache_dir>/redirect.key`, created with 256 bits from the operating system's
    /// CSPRNG (mode 0600) when absent. Several processes starting at once on one cache dir end
    /// up with the same key: the file is written aside and hard-linked into place, which fails
    /// for every process but the first; the others read the winner's file.
    pub fn load_or_create(cache_dir: &Path) -> Result<RedirectKey, String> {
        let path = cache_dir.join(GENERATED_KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                return RedirectKey::from_bytes(&bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| format!("cannot create {}: {e}", cache_dir.display()))?;
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw)
            .map_err(|e| format!("the operating system's random source failed: {e}"))?;
        let temp = temp_path(cache_dir);
        // Left by a crashed process that had our pid: nobody else uses the name.
        let _ = std::fs::remove_file(&temp);
        let written = write_private(&temp, format!("{}\n", hex::encode(raw)).as_bytes());
        let published = written.and_then(|()| match std::fs::hard_link(&temp, &path) {
            Ok(()) => Ok(()),
            // Another process won the race: its key is the key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        });
        let _ = std::fs::remove_file(&temp);
        published.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        RedirectKey::load(&path)
    }

    /// The `signature` parameter for `grant`: base64url (no padding) of the HMAC-SHA256.
    pub fn sign(&self, grant: &Grant) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(CONTEXT, grant).finalize().into_bytes())
    }

    /// The query (without `?`) that carries `grant` and its signature.
    pub fn signed_query(&self, grant: &Grant) -> String {
        self.query_in(CONTEXT, grant)
    }

    /// The query of a peer request (`cluster`): like [`signed_query`](Self::signed_query) under
    /// the peer context, so only [`verify_peer`](Self::verify_peer) accepts it.
    pub fn peer_query(&self, grant: &Grant) -> String {
        self.query_in(PEER_CONTEXT, grant)
    }

    /// [`verify`](Self::verify) for a peer request.
    pub fn verify_peer(
        &self,
        presented: &Presented,
        registry: &str,
        repository: &str,
        digest: &str,
        now: SystemTime,
    ) -> Result<Grant, SignatureError> {
        self.verify_in(PEER_CONTEXT, presented, registry, repository, digest, now)
    }

    /// The query of a peer tag request: `grant.digest` holds the tag.
    pub fn peer_tag_query(&self, grant: &Grant) -> String {
        self.query_in(PEER_TAG_CONTEXT, grant)
    }

    /// [`verify`](Self::verify) for a peer tag request.
    pub fn verify_peer_tag(
        &self,
        presented: &Presented,
        registry: &str,
        repository: &str,
        tag: &str,
        now: SystemTime,
    ) -> Result<Grant, SignatureError> {
        self.verify_in(PEER_TAG_CONTEXT, presented, registry, repository, tag, now)
    }

    fn query_in(&self, context: &[u8], grant: &Grant) -> String {
        let signature = URL_SAFE_NO_PAD.encode(self.mac(context, grant).finalize().into_bytes());
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(account) = &grant.account {
            query.append_pair(PARAM_ACCOUNT, account);
        }
        query
            .append_pair(PARAM_EXPIRES, &grant.expires.to_string())
            .append_pair(PARAM_SIGNATURE, &signature)
            .finish()
    }

    /// Checks `presented` against what the request asks for (`registry`, `repository`,
    /// `digest`, as the data host routed and parsed them) at `now`. `Ok` is the grant the
    /// caller may act on, with the account to fill with. The MAC is checked before the expiry,
    /// so `Expired` is only ever said of a genuine URL.
    pub fn verify(
        &self,
        presented: &Presented,
        registry: &str,
        repository: &str,
        digest: &str,
        now: SystemTime,
    ) -> Result<Grant, SignatureError> {
        self.verify_in(CONTEXT, presented, registry, repository, digest, now)
    }

    fn verify_in(
        &self,
        context: &[u8],
        presented: &Presented,
        registry: &str,
        repository: &str,
        digest: &str,
        now: SystemTime,
    ) -> Result<Grant, SignatureError> {
        let expires = parse_unix_seconds(&presented.expires).ok_or(SignatureError::Invalid)?;
        let mac = URL_SAFE_NO_PAD
            .decode(presented.signature.as_bytes())
            .map_err(|_| SignatureError::Invalid)?;
        let grant = Grant {
            registry: registry.to_owned(),
            account: presented.account.clone(),
            repository: repository.to_owned(),
            digest: digest.to_owned(),
            expires,
        };
        // Constant-time comparison (hmac's `verify_slice`).
        self.mac(context, &grant)
            .verify_slice(&mac)
            .map_err(|_| SignatureError::Invalid)?;
        let now = unix_seconds(now);
        if now > expires {
            return Err(SignatureError::Expired {
                expired_at: expires,
                now,
            });
        }
        Ok(grant)
    }

    /// The MAC over an unambiguous encoding of the grant: every field is length-prefixed, so
    /// no two different grants encode alike.
    fn mac(&self, context: &[u8], grant: &Grant) -> HmacSha256 {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        let account = grant.account.as_deref();
        let fields: [&[u8]; 6] = [
            context,
            grant.registry.as_bytes(),
            if account.is_some() { b"scoped" } else { b"own" },
            account.unwrap_or("").as_bytes(),
            grant.repository.as_bytes(),
            grant.digest.as_bytes(),
        ];
        for field in fields {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac.update(&grant.expires.to_be_bytes());
        mac
    }
}

/// The expiry of a grant made at `now` for `ttl`, in unix seconds.
pub fn expiry(now: SystemTime, ttl: Duration) -> u64 {
    unix_seconds(now).saturating_add(ttl.as_secs().max(1))
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A u64 written the way [`RedirectKey::signed_query`] writes it: canonical decimal, nothing
/// else (no sign, spaces or leading zeros).
fn parse_unix_seconds(raw: &str) -> Option<u64> {
    if raw.is_empty() || raw.len() > 20 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = raw.parse().ok()?;
    (value.to_string() == raw).then_some(value)
}

/// A name no other process or thread uses at the same time.
fn temp_path(dir: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(
        ".{GENERATED_KEY_FILE}.{}-{n}.tmp",
        std::process::id()
    ))
}

/// Creates `path` (which must not exist) readable by its owner only, and writes `bytes` durably.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests;
