//! The referrers cache: the image index of the manifests that name a subject digest, as the
//! upstream's referrers API or its referrers tag gave it, with the time it did. Kept like tag
//! answers (memory and `<cache dir>/manifests/referrers/`, per account); freshness is the
//! caller's (`tag_ttl`, `stale_if_error`).

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::super::links::unix_secs;
use super::ManifestStore;
use crate::oci::{Digest, Repository};

/// The identity of a referrers answer: account, repository, subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReferrersKey(String);

impl ReferrersKey {
    pub fn new(partition: &str, repository: &Repository, subject: &Digest) -> ReferrersKey {
        let mut hasher = Sha256::new();
        for part in [
            partition,
            repository.as_str(),
            "referrers",
            subject.as_str(),
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        ReferrersKey(crate::oci::digest::to_hex(&hasher.finalize()))
    }
}

/// One referrers answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferrersEntry {
    /// The image index, unfiltered.
    pub index: Bytes,
    /// The upstream's `Link` (a next page of its referrers API), as it sent it.
    pub link: Option<String>,
    pub validated_at: SystemTime,
}

impl ReferrersEntry {
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.validated_at).unwrap_or_default()
    }
}

#[derive(Serialize, Deserialize)]
struct ReferrersFile {
    index: String,
    #[serde(default)]
    link: Option<String>,
    validated_at: u64,
}

impl ManifestStore {
    /// The last referrers answer for a subject, from memory or disk.
    pub fn referrers(&self, key: &ReferrersKey) -> Option<Arc<ReferrersEntry>> {
        if let Some(entry) = self.hot_referrers.get(key) {
            return Some(entry);
        }
        let raw = fs::read(self.referrers_path(key)).ok()?;
        let file: ReferrersFile = serde_json::from_slice(&raw).ok()?;
        let entry = Arc::new(ReferrersEntry {
            index: Bytes::from(file.index),
            link: file.link,
            validated_at: UNIX_EPOCH + Duration::from_secs(file.validated_at),
        });
        self.hot_referrers.insert(key.clone(), Arc::clone(&entry));
        Some(entry)
    }

    /// Records a referrers answer (memory and disk). `index` must be UTF-8 JSON.
    pub fn set_referrers(&self, key: &ReferrersKey, entry: ReferrersEntry) {
        let Ok(index) = std::str::from_utf8(&entry.index) else {
            return;
        };
        let file = ReferrersFile {
            index: index.to_owned(),
            link: entry.link.clone(),
            validated_at: unix_secs(entry.validated_at),
        };
        self.hot_referrers.insert(key.clone(), Arc::new(entry));
        let written = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| self.write_atomically(&self.referrers_path(key), &bytes));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record a referrers answer on disk");
        }
    }

    /// Forgets a subject's referrers (a manifest naming it, or its referrers tag, was pushed).
    pub fn forget_referrers(&self, key: &ReferrersKey) {
        self.hot_referrers.invalidate(key);
        let _ = fs::remove_file(self.referrers_path(key));
    }

    fn referrers_path(&self, key: &ReferrersKey) -> PathBuf {
        self.referrers_dir.join(&key.0[..2]).join(&key.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referrers_answers_survive_a_reopen_and_are_kept_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        let repo = Repository::parse("team/app").unwrap();
        let subject = Digest::compute(crate::oci::Algorithm::Sha256, b"subject");
        let key = ReferrersKey::new("hub", &repo, &subject);
        assert_ne!(key, ReferrersKey::new("hub/other", &repo, &subject));
        let entry = ReferrersEntry {
            index: Bytes::from_static(b"{\"manifests\":[]}"),
            link: Some("</v2/team/app/referrers/x?n=1>; rel=\"next\"".into()),
            validated_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        store.set_referrers(&key, entry.clone());
        let reopened = ManifestStore::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(reopened.referrers(&key).as_deref(), Some(&entry));
        reopened.forget_referrers(&key);
        assert_eq!(reopened.referrers(&key), None);
    }
}
