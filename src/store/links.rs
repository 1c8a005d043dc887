//! Which repositories the upstream confirmed hold a digest, and when (invariant 5).
//!
//! Owns: `<cache dir>/links/<repository key>/<digest hex>`, one small file per (registry,
//! repository, digest) holding the Unix time of the last confirmation, plus an in-memory memo.
//! Kept on disk so that a restarted gateway can still serve what it served before while the
//! upstream is down (`stale_if_error`), without re-asking for every blob.
//! Must never: build a path from a request string (the repository key is a hash, the file name
//! a verified digest hex), or move a confirmation back in time.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::oci::{Digest, Repository};

/// A confirmation is rewritten on disk only when it moves forward by more than this, so a busy
/// hit path does not write a file per request.
const WRITE_EVERY: Duration = Duration::from_secs(60);

/// `<registry>\0<repository>\0<digest>`: one allocation per lookup (NUL is in none of them).
type Key = String;

/// Upstream confirmations that a repository holds a digest.
pub struct Links {
    dir: PathBuf,
    /// Key -> Unix seconds of the last confirmation known on disk or newer.
    memo: super::MemCache<Key, u64>,
    /// Manifest key -> Unix seconds up to which its references were recorded, so a hit does
    /// not parse the manifest again for a confirmation it already passed on.
    references: super::MemCache<Key, u64>,
}

impl Links {
    /// Opens (creating) `<cache dir>/links`.
    pub fn open(cache_dir: &Path) -> std::io::Result<Links> {
        let dir = cache_dir.join("links");
        fs::create_dir_all(&dir)?;
        Ok(Links {
            dir,
            memo: moka::sync::Cache::builder()
                .max_capacity(500_000)
                .build_with_hasher(super::mem_hasher()),
            references: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .build_with_hasher(super::mem_hasher()),
        })
    }

    /// When the upstream last confirmed that `repository` of `registry` holds `digest`.
    pub fn confirmed_at(
        &self,
        registry: &str,
        repository: &Repository,
        digest: &Digest,
    ) -> Option<SystemTime> {
        let key = key(registry, repository, digest);
        let secs = match self.memo.get(&key) {
            Some(secs) => secs,
            None => {
                let secs = self.read(registry, repository, digest)?;
                self.memo.insert(key, secs);
                secs
            }
        };
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Records a confirmation made at `at` (never moves an existing one back).
    pub fn confirm(
        &self,
        registry: &str,
        repository: &Repository,
        digest: &Digest,
        at: SystemTime,
    ) {
        let secs = unix_secs(at);
        let key = key(registry, repository, digest);
        let known = self.memo.get(&key).or_else(|| {
            // Memoized even when it is not moved forward, so a hit reads the disk once.
            let on_disk = self.read(registry, repository, digest)?;
            self.memo.insert(key.clone(), on_disk);
            Some(on_disk)
        });
        if known.is_some_and(|k| k >= secs) {
            return;
        }
        self.memo.insert(key, secs);
        if known.is_some_and(|k| secs - k < WRITE_EVERY.as_secs()) {
            return;
        }
        if let Some(path) = self.path(registry, repository, digest) {
            let written = path
                .parent()
                .map_or(Ok(()), fs::create_dir_all)
                .and_then(|()| fs::write(&path, secs.to_string()));
            if let Err(e) = written {
                tracing::debug!(error = %e, "cannot record a confirmation on disk");
            }
        }
    }

    /// True (once per newer `at`) when the references of manifest `digest` should be recorded
    /// as confirmed at `at`.
    pub fn references_due(
        &self,
        registry: &str,
        repository: &Repository,
        digest: &Digest,
        at: SystemTime,
    ) -> bool {
        let secs = unix_secs(at);
        let key = key(registry, repository, digest);
        if self.references.get(&key).is_some_and(|done| done >= secs) {
            return false;
        }
        self.references.insert(key, secs);
        true
    }

    /// Drops a confirmation the upstream withdrew (it answered 404 or denied).
    pub fn forget(&self, registry: &str, repository: &Repository, digest: &Digest) {
        self.memo.invalidate(&key(registry, repository, digest));
        if let Some(path) = self.path(registry, repository, digest) {
            let _ = fs::remove_file(path);
        }
    }

    fn read(&self, registry: &str, repository: &Repository, digest: &Digest) -> Option<u64> {
        let path = self.path(registry, repository, digest)?;
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Named by the digest's hex (64 characters for sha256, 128 for sha512: never the same).
    fn path(&self, registry: &str, repository: &Repository, digest: &Digest) -> Option<PathBuf> {
        let mut hasher = Sha256::new();
        hasher.update(registry.as_bytes());
        hasher.update([0]);
        hasher.update(repository.as_str().as_bytes());
        let repo_key = hex::encode(&hasher.finalize()[..16]);
        Some(self.dir.join(repo_key).join(digest.hex()))
    }
}

fn key(registry: &str, repository: &Repository, digest: &Digest) -> Key {
    let (repository, digest) = (repository.as_str(), digest.as_str());
    let mut key = String::with_capacity(registry.len() + repository.len() + digest.len() + 2);
    for part in [registry, "\0", repository, "\0", digest] {
        key.push_str(part);
    }
    key
}

pub(crate) fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> (Repository, Digest) {
        (
            Repository::parse("team/app").unwrap(),
            Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap(),
        )
    }

    #[test]
    fn confirmations_survive_a_reopen_and_never_move_back() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, digest) = names();
        let t1 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t0 = UNIX_EPOCH + Duration::from_secs(999_000);
        let links = Links::open(dir.path()).unwrap();
        assert_eq!(links.confirmed_at("hub", &repo, &digest), None);
        links.confirm("hub", &repo, &digest, t1);
        links.confirm("hub", &repo, &digest, t0);
        assert_eq!(links.confirmed_at("hub", &repo, &digest), Some(t1));
        assert_eq!(
            links.confirmed_at("other", &repo, &digest),
            None,
            "per registry"
        );

        let reopened = Links::open(dir.path()).unwrap();
        assert_eq!(reopened.confirmed_at("hub", &repo, &digest), Some(t1));
        // An older confirmation after a reopen read the disk once and memoized it.
        let again = Links::open(dir.path()).unwrap();
        again.confirm("hub", &repo, &digest, t0);
        fs::remove_dir_all(dir.path().join("links")).unwrap();
        assert_eq!(again.confirmed_at("hub", &repo, &digest), Some(t1));
        fs::create_dir_all(dir.path().join("links")).unwrap();
        reopened.forget("hub", &repo, &digest);
        assert_eq!(reopened.confirmed_at("hub", &repo, &digest), None);
        assert_eq!(
            Links::open(dir.path())
                .unwrap()
                .confirmed_at("hub", &repo, &digest),
            None
        );
    }
}
