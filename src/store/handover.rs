//! Sharing one cache directory with another pullgate process during a binary upgrade.
//!
//! The new process indexes `blobs/` when it starts; the old one keeps finishing its fills for a
//! few seconds. A blob the old process is filling, or committed after the scan, would otherwise
//! be fetched from the upstream a second time. [`AfterOtherProcess`] is the source of such a
//! fill: it waits for the other process's temp file to go away, then serves the committed file
//! if it hashes to the digest, and only otherwise asks the real source (the upstream). A sealed
//! file (the encrypted cache) is opened with the keys first and its plaintext checked and
//! served; the fill seals it again under a file key of its own.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::disk::{ChunkReader, Extent, SealedFile};
use super::seal::{self, Keys};
use super::{BlobSource, SourceBody, SourceError};
use crate::oci::{Digest, DigestHasher};

/// How often the other process's temp file is looked at.
const POLL: Duration = Duration::from_millis(50);
/// Bytes per read when checking and streaming the committed file.
const CHUNK: usize = 1 << 20;

pub(crate) struct AfterOtherProcess {
    digest: Digest,
    committed: PathBuf,
    /// The other process's temp file, while its fill runs.
    foreign_temp: Option<PathBuf>,
    /// Longest wait for the other fill: the stall timeout (it would have given up by then).
    wait: Duration,
    upstream: std::sync::Arc<dyn BlobSource>,
    /// The keys in use when the fill started (`None`: encryption off).
    keys: Option<std::sync::Arc<dyn Keys>>,
}

impl AfterOtherProcess {
    /// Waits for `foreign_temp` to disappear, then prefers the committed file.
    pub(crate) fn new(
        digest: Digest,
        committed: PathBuf,
        foreign_temp: PathBuf,
        wait: Duration,
        upstream: std::sync::Arc<dyn BlobSource>,
    ) -> Self {
        AfterOtherProcess {
            digest,
            committed,
            foreign_temp: Some(foreign_temp),
            wait,
            upstream,
            keys: None,
        }
    }

    /// The blob is on disk already (committed by another process): check it and use it.
    pub(crate) fn committed(
        digest: Digest,
        committed: PathBuf,
        upstream: std::sync::Arc<dyn BlobSource>,
    ) -> Self {
        AfterOtherProcess {
            digest,
            committed,
            foreign_temp: None,
            wait: Duration::ZERO,
            upstream,
            keys: None,
        }
    }

    /// With encryption on, a committed sealed file is opened with `keys`.
    pub(crate) fn with_keys(mut self, keys: Option<std::sync::Arc<dyn Keys>>) -> Self {
        self.keys = keys;
        self
    }

    /// The committed file, sealed: its key and plaintext length, when its header fits.
    fn open_sealed(&self) -> Option<(std::sync::Arc<std::fs::File>, SealedFile, u64)> {
        let keys = self.keys.as_ref()?;
        let file = std::fs::File::open(&self.committed).ok()?;
        let len = file.metadata().ok()?.len();
        match seal::open_file(
            &file,
            len,
            &self.digest,
            crate::crypt::Kind::Blob,
            Some(keys.as_ref()),
        ) {
            Ok(seal::Opened::Sealed(key, geometry)) => Some((
                std::sync::Arc::new(file),
                SealedFile {
                    key: *key,
                    keys: None,
                    on_failure: None,
                    pieces: None,
                },
                geometry.plaintext_len,
            )),
            _ => None,
        }
    }

    /// Plaintext chunks of the sealed committed file from `offset`; `verify` hashes them all
    /// first (`None` when they do not hash to the digest).
    async fn sealed_body(&self, offset: u64) -> Option<SourceBody> {
        let (file, sealed, len) = self.open_sealed()?;
        let sealed = std::sync::Arc::new(sealed);
        let extent = Extent {
            written: len,
            complete: true,
        };
        let mut check = ChunkReader::new(file.clone(), 0, len, Some(sealed.clone()));
        let mut hasher = DigestHasher::new(self.digest.algorithm());
        while !check.is_done() {
            hasher.update(&check.read(len, extent).await.ok()?);
        }
        if hasher.finish() != self.digest {
            return None;
        }
        let reader = ChunkReader::new(file, offset, len, Some(sealed));
        let chunks = futures_util::stream::unfold(Some(reader), move |reader| async move {
            let mut reader = reader.filter(|r| !r.is_done())?;
            match reader.read(len, extent).await {
                Ok(chunk) => Some((Ok(chunk), Some(reader))),
                Err(e) => Some((Err(e.to_string()), None)),
            }
        })
        .boxed();
        Some(SourceBody {
            total_len: Some(len),
            chunks,
        })
    }

    async fn wait_for_other_fill(&self) {
        let Some(temp) = &self.foreign_temp else {
            return;
        };
        let deadline = Instant::now() + self.wait;
        while temp.exists() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
    }

    /// The committed file's length when its bytes hash to the digest.
    async fn verified_len(&self) -> Option<u64> {
        let path = self.committed.clone();
        let digest = self.digest.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = std::fs::File::open(&path).ok()?;
            let mut hasher = DigestHasher::new(digest.algorithm());
            let mut buf = vec![0u8; CHUNK];
            let mut len = 0u64;
            loop {
                let n = file.read(&mut buf).ok()?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            (hasher.finish() == digest).then_some(len)
        })
        .await
        .ok()
        .flatten()
    }
}

#[async_trait::async_trait]
impl BlobSource for AfterOtherProcess {
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError> {
        self.wait_for_other_fill().await;
        if self.keys.is_some() {
            if let Some(body) = self.sealed_body(offset).await {
                tracing::info!(digest = %self.digest, "sealed blob committed by another pullgate process on this cache: used, not fetched again");
                return Ok(body);
            }
            return self.upstream.open(offset).await;
        }
        let Some(len) = self.verified_len().await else {
            return self.upstream.open(offset).await;
        };
        tracing::info!(digest = %self.digest, "blob committed by another pullgate process on this cache: used, not fetched again");
        let path = self.committed.clone();
        let chunks = futures_util::stream::unfold((path, offset), move |(path, pos)| async move {
            if pos >= len {
                return None;
            }
            let read = tokio::task::spawn_blocking({
                let path = path.clone();
                move || {
                    use std::os::unix::fs::FileExt;
                    let file = std::fs::File::open(&path)?;
                    let want = usize::try_from((len - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
                    let mut buf = vec![0u8; want];
                    file.read_exact_at(&mut buf, pos)?;
                    Ok::<_, std::io::Error>(bytes::Bytes::from(buf))
                }
            })
            .await;
            match read {
                Ok(Ok(chunk)) => {
                    let next = pos + chunk.len() as u64;
                    Some((Ok(chunk), (path, next)))
                }
                Ok(Err(e)) => Some((Err(e.to_string()), (path, len))),
                Err(e) => Some((Err(e.to_string()), (path, len))),
            }
        })
        .boxed();
        Ok(SourceBody {
            total_len: Some(len),
            chunks,
        })
    }
}
