//! The manifest and tag cache.
//!
//! Owns: `<cache dir>/manifests/sha256/<2 hex>/<hex>` (a manifest's media type on the first
//! line, then its bytes exactly as the upstream sent them), `<cache dir>/manifests/tags/`
//! (tag -> digest answers with the time the upstream last gave them, and the variants given
//! to clients that refuse some manifest types), `<cache dir>/manifests/referrers/` (see
//! `referrers.rs`), a memory tier for hot manifests, and the short-lived memory of upstream
//! 404s and of deletes made through pullgate.
//! Must never: hand out manifest bytes that do not hash to their digest (checked on every read
//! from disk), or build a path from a request string (tags are hashed, manifests are named by a
//! verified digest).
//!
//! Freshness rules (tag TTL, stale-if-error) belong to the caller; this module stores answers
//! and their age.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::links::unix_secs;
use super::seal::{self, Keys};
use crate::crypt::Kind;
use crate::oci::{Digest, Repository, Tag};

mod referrers;
pub use referrers::{ReferrersEntry, ReferrersKey};

/// Bytes of manifests kept in memory besides the disk copy.
const HOT_BYTES: u64 = 32 << 20;
/// Tag answers kept in memory (the disk keeps all).
const HOT_TAGS: u64 = 100_000;

/// How long a delete through pullgate is remembered against older tag answers (memory only).
const DELETED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A manifest as the upstream sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedManifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

/// What a tag pointed at when the upstream last said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub validated_at: SystemTime,
}

impl TagEntry {
    /// How long ago the upstream gave this answer (zero if the clock went back).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.validated_at).unwrap_or_default()
    }
}

/// The identity of a tag answer: registry, repository and tag. (Clients differ in the `Accept`
/// lists they send; the caller decides which answers are fit to cache and to reuse.)
///
/// Held as the three parts joined by NUL (which none of them can contain), so a lookup in
/// memory hashes the name and nothing else; the SHA-256 form ([`hex`](TagKey::hex)) names the
/// file on disk and the tag's owner in a cluster, and is computed only for those.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey(String);

impl TagKey {
    pub fn new(registry: &str, repository: &Repository, tag: &Tag) -> TagKey {
        let (repository, tag) = (repository.as_str(), tag.as_str());
        let mut joined = String::with_capacity(registry.len() + repository.len() + tag.len() + 3);
        for part in [registry, repository, tag] {
            joined.push_str(part);
            joined.push('\0');
        }
        TagKey(joined)
    }

    /// The key as hex: the same on every replica for the same tag, account and repository.
    pub fn hex(&self) -> String {
        crate::oci::digest::to_hex(&Sha256::digest(self.0.as_bytes()))
    }
}

/// Everything known about one tag: its answer to clients that take every manifest type, and
/// its answers to clients that refuse some (one per media type).
#[derive(Debug, Clone, Default)]
struct TagRecord {
    primary: Option<TagEntry>,
    variants: Vec<TagEntry>,
}

/// On-disk form of a [`TagRecord`]: the primary answer's fields at the top (as files written
/// before variants existed have them; empty when there is none), variants beside them.
#[derive(Serialize, Deserialize)]
struct TagFile {
    #[serde(flatten)]
    primary: EntryFile,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    variants: Vec<EntryFile>,
}

/// On-disk form of a [`TagEntry`].
#[derive(Serialize, Deserialize, Default)]
struct EntryFile {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    validated_at: u64,
}

impl EntryFile {
    fn of(entry: &TagEntry) -> EntryFile {
        EntryFile {
            digest: entry.digest.to_string(),
            media_type: entry.media_type.clone(),
            size: entry.size,
            validated_at: unix_secs(entry.validated_at),
        }
    }

    fn entry(&self) -> Option<TagEntry> {
        Some(TagEntry {
            digest: Digest::parse(&self.digest).ok()?,
            media_type: self.media_type.clone(),
            size: self.size,
            validated_at: UNIX_EPOCH + Duration::from_secs(self.validated_at),
        })
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestStats {
    pub manifests_stored: u64,
    pub negative_hits: u64,
}

/// Manifests by digest, tags by key, and recent upstream 404s.
pub struct ManifestStore {
    /// `<cache dir>/manifests`: `<algorithm>/<2 hex>/<hex>` below it.
    manifests: PathBuf,
    tags: PathBuf,
    referrers_dir: PathBuf,
    tmp: PathBuf,
    hot: super::MemCache<Digest, Arc<CachedManifest>>,
    hot_tags: super::MemCache<TagKey, Arc<TagRecord>>,
    hot_referrers: moka::sync::Cache<ReferrersKey, Arc<ReferrersEntry>>,
    /// One tag record writer at a time (read, change, write back).
    tag_writes: std::sync::Mutex<()>,
    /// `None` when `negative_ttl` is zero. Replaced whole when a reload changes it.
    missing: std::sync::RwLock<Option<moka::sync::Cache<String, ()>>>,
    negative_ttl: std::sync::Mutex<Duration>,
    /// Manifests deleted through pullgate: `<registry>\0<repository>\0<digest>` -> when. A tag
    /// answer given before that time names a manifest the upstream no longer has.
    deleted: moka::sync::Cache<String, SystemTime>,
    /// Set by the first delete through pullgate: until then no answer can be undone by one,
    /// and a request need not build the key to ask.
    any_deleted: AtomicBool,
    stored: AtomicU64,
    negative_hits: AtomicU64,
    /// The key hierarchy while encryption is on (see `BlobStore::set_keys`).
    keys: std::sync::RwLock<Option<Arc<dyn Keys>>>,
    /// Shared with the blob store.
    integrity_failures: Arc<AtomicU64>,
}

/// Age past which a manifest temp file is a crash's leftover.
const STALE_TEMP: Duration = Duration::from_secs(60);

/// The cache of remembered upstream 404s; `None` when `ttl` is zero.
fn missing_cache(ttl: Duration) -> Option<moka::sync::Cache<String, ()>> {
    (!ttl.is_zero()).then(|| {
        moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(ttl)
            .build()
    })
}

impl ManifestStore {
    /// Opens (creating) `<cache dir>/manifests`, removing temp files a crash left behind.
    pub fn open(cache_dir: &Path, negative_ttl: Duration) -> std::io::Result<ManifestStore> {
        let root = cache_dir.join("manifests");
        let store = ManifestStore {
            manifests: root.clone(),
            tags: root.join("tags"),
            referrers_dir: root.join("referrers"),
            tmp: root.join("tmp"),
            hot: moka::sync::Cache::builder()
                .max_capacity(HOT_BYTES)
                .weigher(|_, m: &Arc<CachedManifest>| {
                    u32::try_from(m.body.len()).unwrap_or(u32::MAX)
                })
                .build_with_hasher(super::mem_hasher()),
            hot_tags: moka::sync::Cache::builder()
                .max_capacity(HOT_TAGS)
                .build_with_hasher(super::mem_hasher()),
            tag_writes: std::sync::Mutex::new(()),
            hot_referrers: moka::sync::Cache::builder().max_capacity(HOT_TAGS).build(),
            missing: std::sync::RwLock::new(missing_cache(negative_ttl)),
            negative_ttl: std::sync::Mutex::new(negative_ttl),
            deleted: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(DELETED_TTL)
                .build(),
            any_deleted: AtomicBool::new(false),
            stored: AtomicU64::new(0),
            negative_hits: AtomicU64::new(0),
            keys: std::sync::RwLock::new(None),
            integrity_failures: Arc::new(AtomicU64::new(0)),
        };
        for dir in [
            &store.manifests,
            &store.tags,
            &store.referrers_dir,
            &store.tmp,
        ] {
            fs::create_dir_all(dir)?;
        }
        // Temp files a crash left behind. Recent ones may belong to another pullgate on this
        // cache (a binary upgrade): its writes take milliseconds, so only old files go.
        for entry in fs::read_dir(&store.tmp)?.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_TEMP);
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(store)
    }

    /// Counts integrity failures in `counter` (the blob store's, so one metric covers both).
    pub fn share_integrity_counter(&mut self, counter: Arc<AtomicU64>) {
        self.integrity_failures = counter;
    }

    /// Encryption at rest on or off for manifest files written and read from now on; on a
    /// change the memory tier is emptied (it may hold manifests of a revoked key) and `true`
    /// returned: the caller then runs [`ManifestStore::sweep_now`] off the request path.
    pub fn set_keys(&self, keys: Option<Arc<dyn Keys>>) -> bool {
        let mut slot = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if super::same_keys(slot.as_ref(), keys.as_ref()) {
            return false;
        }
        *slot = keys;
        drop(slot);
        self.forget_memory();
        true
    }

    /// Empties the memory tier of manifests (a key was revoked: nothing it opened is served).
    pub fn forget_memory(&self) {
        self.hot.invalidate_all();
    }

    /// Deletes every manifest file that does not open under the current keys (plaintext while
    /// encryption is on, sealed while it is off, of a revoked key, damaged). Blocking: run it
    /// off the request path. Returns how many were deleted.
    pub fn sweep_now(&self) -> u64 {
        let mut swept = 0;
        for algorithm in ["sha256", "sha512"] {
            let Ok(shards) = fs::read_dir(self.manifests.join(algorithm)) else {
                continue;
            };
            for shard in shards.flatten() {
                let Ok(files) = fs::read_dir(shard.path()) else {
                    continue;
                };
                for file in files.flatten() {
                    let name = file.file_name();
                    let Some(digest) = name
                        .to_str()
                        .and_then(|hex| format!("{algorithm}:{hex}").parse::<Digest>().ok())
                    else {
                        continue;
                    };
                    if self.read_disk(&digest, &file.path()).is_none() && !file.path().exists() {
                        swept += 1;
                    }
                }
            }
        }
        swept
    }

    fn keys(&self) -> Option<Arc<dyn Keys>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// [`ManifestStore::get`] from the memory tier only: no file is touched.
    pub fn get_in_memory(&self, digest: &Digest) -> Option<Arc<CachedManifest>> {
        self.hot.get(digest)
    }

    /// A cached manifest, verified against its digest. A file that fails verification is
    /// deleted and reported absent.
    pub fn get(&self, digest: &Digest) -> Option<Arc<CachedManifest>> {
        if let Some(m) = self.hot.get(digest) {
            return Some(m);
        }
        let path = self.manifest_path(digest)?;
        let (media_type, body) = self.read_disk(digest, &path)?;
        let m = Arc::new(CachedManifest {
            digest: digest.clone(),
            media_type,
            body,
        });
        self.hot.insert(digest.clone(), Arc::clone(&m));
        Some(m)
    }

    /// The manifest file at `path`, opened (when sealed) and verified; a file that does not
    /// fit is deleted.
    fn read_disk(&self, digest: &Digest, path: &Path) -> Option<(String, Bytes)> {
        let file = fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let keys = self.keys();
        let raw = match seal::open_file(&file, len, digest, Kind::Manifest, keys.as_deref()) {
            Ok(seal::Opened::Plain) => fs::read(path).ok()?,
            Ok(seal::Opened::Sealed(key, _)) => {
                let opened = fs::read(path)
                    .ok()
                    .and_then(|sealed| crate::crypt::open_all(&key, &sealed).ok());
                match opened {
                    Some(raw) => raw,
                    None => {
                        self.unfit(
                            digest,
                            path,
                            seal::Unfit::Integrity("a chunk failed".into()),
                        );
                        return None;
                    }
                }
            }
            Err(unfit) => {
                self.unfit(digest, path, unfit);
                return None;
            }
        };
        let parsed = raw.iter().position(|&b| b == b'\n').and_then(|nl| {
            let media_type = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
            let body = Bytes::copy_from_slice(&raw[nl + 1..]);
            digest.verify(&body).then_some((media_type, body))
        });
        if parsed.is_none() {
            tracing::warn!(digest = %digest, "cached manifest fails verification; deleting it");
            let _ = fs::remove_file(path);
        }
        parsed
    }

    fn unfit(&self, digest: &Digest, path: &Path, why: seal::Unfit) {
        match why {
            seal::Unfit::NotNow => return,
            seal::Unfit::Integrity(reason) => {
                self.integrity_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(digest = %digest, %reason, "cached manifest failed its integrity check; deleted");
            }
            seal::Unfit::Stale(reason) => {
                tracing::info!(digest = %digest, %reason, "cached manifest evicted");
            }
        }
        let _ = fs::remove_file(path);
    }

    /// Stores a manifest after checking its bytes against its digest. Storage problems are
    /// logged, not returned: the manifest was already verified and is served regardless.
    /// With encryption on but no key at hand, nothing is written (nor kept in memory).
    pub fn put(&self, manifest: CachedManifest) -> Arc<CachedManifest> {
        let manifest = Arc::new(manifest);
        if !manifest.digest.verify(&manifest.body) || manifest.media_type.contains('\n') {
            tracing::error!(digest = %manifest.digest, "refusing to cache a manifest that fails verification");
            return manifest;
        }
        let keys = self.keys();
        let seal = match &keys {
            None => None,
            Some(keys) => match seal::new_file_key(keys.as_ref(), Kind::Manifest, &manifest.digest)
            {
                Ok(key) => Some(key),
                Err(_) => return manifest,
            },
        };
        if let Some(path) = self.manifest_path(&manifest.digest) {
            // A file of the other mode (or damaged) is deleted by the read and written anew.
            if !path.exists() || self.read_disk(&manifest.digest, &path).is_none() {
                let mut bytes =
                    Vec::with_capacity(manifest.media_type.len() + 1 + manifest.body.len());
                bytes.extend_from_slice(manifest.media_type.as_bytes());
                bytes.push(b'\n');
                bytes.extend_from_slice(&manifest.body);
                if let Some(key) = &seal {
                    bytes = crate::crypt::seal_all(key, &bytes);
                }
                match self.write_atomically(&path, &bytes) {
                    Ok(()) => {
                        self.stored.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(digest = %manifest.digest, error = %e, "cannot cache a manifest on disk")
                    }
                }
            }
        }
        self.hot
            .insert(manifest.digest.clone(), Arc::clone(&manifest));
        manifest
    }

    /// Drops a cached manifest (memory and disk): it was deleted upstream.
    pub fn remove(&self, digest: &Digest) {
        self.hot.invalidate(digest);
        if let Some(path) = self.manifest_path(digest) {
            let _ = fs::remove_file(path);
        }
    }

    /// Records that `digest` was deleted from `scope` (`<registry>\0<repository>`) now.
    pub fn mark_deleted(&self, scope: &str, digest: &Digest) {
        self.any_deleted.store(true, Ordering::Release);
        self.deleted
            .insert(format!("{scope}\0{digest}"), SystemTime::now());
    }

    /// False until something was deleted through this process ([`deleted_since`] is then
    /// false for everything).
    ///
    /// [`deleted_since`]: Self::deleted_since
    pub fn any_deleted(&self) -> bool {
        self.any_deleted.load(Ordering::Acquire)
    }

    /// True when `digest` was deleted from `scope` at or after `at` (so an answer given at
    /// `at` is out of date).
    pub fn deleted_since(&self, scope: &str, digest: &Digest, at: SystemTime) -> bool {
        self.deleted
            .get(&format!("{scope}\0{digest}"))
            .is_some_and(|when| when >= at)
    }

    /// The last answer for a tag to clients that take every manifest type (its real
    /// target), from memory or disk.
    pub fn tag(&self, key: &TagKey) -> Option<TagEntry> {
        self.tag_record(key)?.primary.clone()
    }

    /// The answers for a tag to clients that refuse some manifest types, at most one per media
    /// type (e.g. the `linux/amd64` image a registry picks from an index for a client that
    /// takes no indexes).
    pub fn tag_variants(&self, key: &TagKey) -> Vec<TagEntry> {
        self.tag_record(key)
            .map(|r| r.variants.clone())
            .unwrap_or_default()
    }

    /// Records the tag's answer to clients that take every manifest type (in memory and on
    /// disk); its variants stay.
    pub fn set_tag(&self, key: &TagKey, entry: TagEntry) {
        self.update_tag(key, |record| record.primary = Some(entry));
    }

    /// Records one variant of a tag, replacing the variant of the same media type.
    pub fn set_tag_variant(&self, key: &TagKey, entry: TagEntry) {
        self.update_tag(key, |record| {
            record
                .variants
                .retain(|v| !v.media_type.eq_ignore_ascii_case(&entry.media_type));
            record.variants.push(entry);
        });
    }

    /// Forgets the variant of `media_type` (the upstream no longer answers it).
    pub fn forget_tag_variant(&self, key: &TagKey, media_type: &str) {
        self.update_tag(key, |record| {
            record
                .variants
                .retain(|v| !v.media_type.eq_ignore_ascii_case(media_type));
        });
    }

    /// Forgets a tag and all its variants (the upstream no longer has it, or a push changed
    /// it).
    pub fn forget_tag(&self, key: &TagKey) {
        let _guard = self.tag_writes.lock().unwrap_or_else(|e| e.into_inner());
        self.hot_tags.invalidate(key);
        let _ = fs::remove_file(self.tag_path(key));
    }

    fn tag_record(&self, key: &TagKey) -> Option<Arc<TagRecord>> {
        if let Some(record) = self.hot_tags.get(key) {
            return Some(record);
        }
        let raw = fs::read(self.tag_path(key)).ok()?;
        let file: TagFile = serde_json::from_slice(&raw).ok()?;
        let record = Arc::new(TagRecord {
            primary: (!file.primary.digest.is_empty())
                .then(|| file.primary.entry())
                .flatten(),
            variants: file.variants.iter().filter_map(EntryFile::entry).collect(),
        });
        self.hot_tags.insert(key.clone(), Arc::clone(&record));
        Some(record)
    }

    /// Read, change and write back a tag's record (writes are rare: misses and
    /// revalidations), one writer at a time.
    fn update_tag(&self, key: &TagKey, change: impl FnOnce(&mut TagRecord)) {
        let _guard = self.tag_writes.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = self
            .tag_record(key)
            .map(|r| (*r).clone())
            .unwrap_or_default();
        change(&mut record);
        let file = TagFile {
            primary: record
                .primary
                .as_ref()
                .map(EntryFile::of)
                .unwrap_or_default(),
            variants: record.variants.iter().map(EntryFile::of).collect(),
        };
        self.hot_tags.insert(key.clone(), Arc::new(record));
        let written = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| self.write_atomically(&self.tag_path(key), &bytes));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record a tag answer on disk");
        }
    }

    /// A new `negative_ttl` (a reload). Remembered 404s are dropped when it changes: the next
    /// request asks the upstream again, which is always safe.
    pub fn set_negative_ttl(&self, ttl: Duration) {
        let mut current = self.negative_ttl.lock().unwrap_or_else(|e| e.into_inner());
        if *current != ttl {
            *current = ttl;
            *self.missing.write().unwrap_or_else(|e| e.into_inner()) = missing_cache(ttl);
        }
    }

    fn missing(&self) -> Option<moka::sync::Cache<String, ()>> {
        self.missing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Remembers that the upstream answered 404 for `what` (for `negative_ttl`).
    pub fn remember_missing(&self, what: String) {
        if let Some(missing) = self.missing() {
            missing.insert(what, ());
        }
    }

    /// True while an upstream 404 for `what` is remembered.
    pub fn known_missing(&self, what: &str) -> bool {
        let hit = self.missing().is_some_and(|m| m.contains_key(what));
        if hit {
            self.negative_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Forgets a remembered 404 (a push created the manifest), and the 404s remembered for
    /// clients that refuse some manifest types ([`ManifestStore::missing_key_for`]).
    pub fn forget_missing(&self, what: &str) {
        if let Some(missing) = self.missing() {
            missing.invalidate(what);
            for set in 0..crate::oci::media::ACCEPT_SETS {
                missing.invalidate(&Self::missing_key_for(what, Some(set)));
            }
        }
    }

    /// The key of a remembered 404 for `what` as answered to clients whose `Accept` admits
    /// exactly the manifest types of `accept_set` (`oci::media::accept_set`); `None`: clients
    /// that take every type.
    pub fn missing_key_for(what: &str, accept_set: Option<u8>) -> String {
        match accept_set {
            Some(set) => format!("{what}\0{set}"),
            None => what.to_owned(),
        }
    }

    pub fn stats(&self) -> ManifestStats {
        ManifestStats {
            manifests_stored: self.stored.load(Ordering::Relaxed),
            negative_hits: self.negative_hits.load(Ordering::Relaxed),
        }
    }

    fn manifest_path(&self, digest: &Digest) -> Option<PathBuf> {
        let hex = digest.hex();
        Some(
            self.manifests
                .join(digest.algorithm().as_str())
                .join(&hex[..2])
                .join(hex),
        )
    }

    fn tag_path(&self, key: &TagKey) -> PathBuf {
        let hex = key.hex();
        self.tags.join(&hex[..2]).join(&hex)
    }

    /// Writes a whole file under a temp name and renames it into place, so a reader or a crash
    /// sees the old file or the new one, never a mix.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self.tmp.join(format!("{}-{n}", std::process::id()));
        let result = (|| {
            let mut file = fs::File::create(&temp)?;
            file.write_all(bytes)?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&temp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn manifest(body: &'static [u8]) -> CachedManifest {
        CachedManifest {
            digest: Digest::compute(Algorithm::Sha256, body),
            media_type: crate::oci::media::OCI_MANIFEST_V1.to_owned(),
            body: Bytes::from_static(body),
        }
    }

    /// Generation key 1, or none once revoked.
    struct OneKey(crate::crypt::SecretKey, std::sync::atomic::AtomicBool);

    impl Keys for OneKey {
        fn sealing_key(&self) -> Result<(u32, Arc<crate::crypt::SecretKey>), seal::KeyMissing> {
            self.opening_key(1).map(|k| (1, k))
        }
        fn opening_key(&self, id: u32) -> Result<Arc<crate::crypt::SecretKey>, seal::KeyMissing> {
            match (id, self.1.load(Ordering::Relaxed)) {
                (_, true) => Err(seal::KeyMissing::Revoked),
                (1, false) => Ok(Arc::new(self.0.clone())),
                _ => Err(seal::KeyMissing::Unknown),
            }
        }
    }

    /// The key of `team/app:<tag>` on registry `hub`.
    fn hub_key(tag: &str) -> TagKey {
        TagKey::new(
            "hub",
            &Repository::parse("team/app").unwrap(),
            &Tag::parse(tag).unwrap(),
        )
    }

    #[test]
    fn manifests_are_sealed_checked_and_swept_with_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(OneKey(
            crate::crypt::SecretKey::random().unwrap(),
            Default::default(),
        ));
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let plain = manifest(b"{\"schemaVersion\":2,\"plain\":true}");
        store.put(plain.clone());
        store.set_keys(Some(Arc::clone(&keys) as Arc<dyn Keys>));
        // The plaintext file is not served once encryption is on, and the sweep removes it.
        assert!(store.get(&plain.digest).is_none());
        let m = manifest(b"{\"schemaVersion\":2,\"layers\":[]}");
        store.put(m.clone());
        let path = store.manifest_path(&m.digest).unwrap();
        let raw = fs::read(&path).unwrap();
        assert!(crate::crypt::is_sealed(&raw));
        assert!(!raw.windows(13).any(|w| w == b"schemaVersion"));
        // From disk (a new store has an empty memory tier): opened and verified.
        let reopened = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        reopened.set_keys(Some(Arc::clone(&keys) as Arc<dyn Keys>));
        assert_eq!(reopened.get(&m.digest).unwrap().body, m.body);
        // A flipped bit: deleted, never served.
        let mut bad = raw.clone();
        bad[crate::crypt::HEADER_LEN + 3] ^= 1;
        fs::write(&path, &bad).unwrap();
        let fresh = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        fresh.set_keys(Some(Arc::clone(&keys) as Arc<dyn Keys>));
        assert!(fresh.get(&m.digest).is_none());
        assert!(!path.exists());
        assert_eq!(fresh.integrity_failures.load(Ordering::Relaxed), 1);
        // Revoked: the sweep deletes what the key sealed.
        fresh.put(m.clone());
        assert!(path.exists());
        keys.1.store(true, Ordering::Relaxed);
        fresh.forget_memory();
        assert_eq!(fresh.sweep_now(), 1);
        assert!(!path.exists());
        assert!(fresh.get(&m.digest).is_none());
    }

    #[test]
    fn manifests_and_tags_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let m = manifest(b"{\"schemaVersion\":2}");
        store.put(m.clone());
        let key = hub_key("v1");
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let entry = TagEntry {
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            size: m.body.len() as u64,
            validated_at: at,
        };
        store.set_tag(&key, entry.clone());

        let reopened = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(reopened.get(&m.digest).as_deref(), Some(&m));
        assert_eq!(reopened.tag(&key), Some(entry));
        reopened.forget_tag(&key);
        assert_eq!(
            ManifestStore::open(dir.path(), Duration::ZERO)
                .unwrap()
                .tag(&key),
            None
        );
    }

    #[test]
    fn tag_variants_are_kept_one_per_media_type_beside_the_primary_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let key = hub_key("v1");
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let entry = |body: &[u8], media_type: &str| TagEntry {
            digest: Digest::compute(Algorithm::Sha256, body),
            media_type: media_type.to_owned(),
            size: body.len() as u64,
            validated_at: at,
        };
        let amd64 = entry(b"amd64", crate::oci::media::DOCKER_MANIFEST_V2);
        store.set_tag_variant(&key, amd64.clone());
        assert_eq!(
            store.tag(&key),
            None,
            "a variant is not the tag's real target"
        );
        let index = entry(b"index", crate::oci::media::OCI_INDEX_V1);
        store.set_tag(&key, index.clone());
        let newer = entry(b"amd64 v2", crate::oci::media::DOCKER_MANIFEST_V2);
        store.set_tag_variant(&key, newer.clone());
        let schema1 = entry(b"s1", crate::oci::media::DOCKER_MANIFEST_V1_SIGNED);
        store.set_tag_variant(&key, schema1.clone());

        let reopened = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(reopened.tag(&key), Some(index));
        assert_eq!(reopened.tag_variants(&key), vec![newer, schema1.clone()]);
        reopened.forget_tag_variant(&key, crate::oci::media::DOCKER_MANIFEST_V2);
        assert_eq!(reopened.tag_variants(&key), vec![schema1]);
        reopened.forget_tag(&key);
        assert!(reopened.tag_variants(&key).is_empty());
        assert_eq!(reopened.tag(&key), None);
    }

    #[test]
    fn a_tag_file_keeps_the_name_earlier_releases_gave_it() {
        // SHA-256 of "registry NUL repository NUL tag NUL", as hex: a cache written by an
        // earlier release (and every replica of a cluster) finds the same file and owner.
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let key = hub_key("v1");
        let hex = crate::oci::digest::to_hex(&Sha256::digest(b"hub\0team/app\0v1\0"));
        assert_eq!(key.hex(), hex);
        assert_eq!(store.tag_path(&key), store.tags.join(&hex[..2]).join(&hex));
    }

    #[test]
    fn tag_files_written_before_variants_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let key = hub_key("old");
        let digest = Digest::compute(Algorithm::Sha256, b"x");
        let old = format!(
            r#"{{"digest":"{digest}","media_type":"{}","size":1,"validated_at":1700000000}}"#,
            crate::oci::media::OCI_MANIFEST_V1
        );
        let path = store.tag_path(&key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, old).unwrap();
        let entry = store.tag(&key).expect("old file read");
        assert_eq!(entry.digest, digest);
        assert!(store.tag_variants(&key).is_empty());
    }

    #[test]
    fn forgetting_a_404_forgets_it_for_every_accept_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::from_secs(60)).unwrap();
        let narrow = ManifestStore::missing_key_for("k", Some(2));
        store.remember_missing(narrow.clone());
        store.remember_missing("k".into());
        assert!(store.known_missing(&narrow) && store.known_missing("k"));
        assert!(!store.known_missing(&ManifestStore::missing_key_for("k", Some(3))));
        store.forget_missing("k");
        assert!(!store.known_missing(&narrow) && !store.known_missing("k"));
    }

    #[test]
    fn a_corrupted_manifest_file_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let m = manifest(b"{\"layers\":[]}");
        store.put(m.clone());
        let path = store.manifest_path(&m.digest).unwrap();
        let mut raw = fs::read(&path).unwrap();
        *raw.last_mut().unwrap() = b' ';
        fs::write(&path, raw).unwrap();

        let reopened = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(reopened.get(&m.digest), None);
        assert!(!path.exists(), "the bad file is deleted");
    }

    #[test]
    fn bytes_that_do_not_match_their_digest_are_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let mut m = manifest(b"{}");
        m.body = Bytes::from_static(b"{ }");
        store.put(m.clone());
        assert!(!store.manifest_path(&m.digest).unwrap().exists());
    }

    #[test]
    fn upstream_404s_are_remembered_only_with_a_negative_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let off = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        off.remember_missing("x".into());
        assert!(!off.known_missing("x"));
        let on = ManifestStore::open(dir.path(), Duration::from_secs(60)).unwrap();
        on.remember_missing("x".into());
        assert!(on.known_missing("x"));
        on.forget_missing("x");
        assert!(!on.known_missing("x"));
        assert_eq!(on.stats().negative_hits, 1);
    }
}
