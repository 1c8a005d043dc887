//! The second cache tier: an object store (S3 or S3-compatible) the replicas share, so a blob
//! one of them fetched from the upstream is never fetched from the upstream again by any, and a
//! replica that starts with an empty disk starts warm.
//!
//! Owns: the object store client, object names, [`L2Source`] (a fill's first source: the object
//! store, then whatever the fill would have used) and the upload of a verified blob.
//! Must never: upload what was not verified (an upload reads the committed L1 file, which the
//! fill verified against its digest), complete an upload that did not carry every byte (an
//! error aborts the multipart upload), or fail a pull because the object store failed (every
//! error falls through to the next source and is counted). What comes from L2 is verified by
//! the fill like any other source's bytes; an object that does not match is deleted.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::disk::Blob;
use super::seal::{self, Keys};
use super::{BlobSource, Origin, SourceBody, SourceError};
use crate::crypt::{self, FileKey, Geometry, Header, Kind, Opener, HEADER_LEN};
use crate::oci::Digest;

/// How long the object store may take to start answering a read before the fill goes on to
/// the next source: a slow L2 must not make a pull slower than the upstream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);
/// Objects up to this size go up in one PUT; larger ones in parts of this size.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// How a sealed object starts (`[cache.encryption]` on): these 8 bytes, the length of the
/// wrapped generation key (u32 big-endian), the wrapped key (`Keys::wrapped_key`), then the
/// sealed file exactly as on the writing replica's disk. Any replica with the same operator's
/// key unwraps the key (one key-service call per generation, then from memory) and opens the
/// chunks as they stream in; the object store never sees plaintext.
const ENVELOPE_MAGIC: &[u8; 8] = b"PGL2ENV1";
const ENVELOPE_FIXED: usize = ENVELOPE_MAGIC.len() + 4;
/// A wrapped key is a few hundred bytes at most; longer is not an envelope.
const MAX_WRAPPED: usize = 16 * 1024;

/// The envelope prefix for `wrapped`.
fn envelope(wrapped: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_FIXED + wrapped.len());
    out.extend_from_slice(ENVELOPE_MAGIC);
    out.extend_from_slice(&(wrapped.len() as u32).to_be_bytes());
    out.extend_from_slice(wrapped);
    out
}

/// The length of the envelope prefix `head` starts with: `Ok(None)` while more bytes are
/// needed to tell, `Err` when it is not an envelope (a plaintext object).
fn envelope_len(head: &[u8]) -> Result<Option<usize>, ()> {
    let magic = head.len().min(ENVELOPE_MAGIC.len());
    if head[..magic] != ENVELOPE_MAGIC[..magic] {
        return Err(());
    }
    if head.len() < ENVELOPE_FIXED {
        return Ok(None);
    }
    let mut n = [0u8; 4];
    n.copy_from_slice(&head[ENVELOPE_MAGIC.len()..ENVELOPE_FIXED]);
    match u32::from_be_bytes(n) as usize {
        n if n > MAX_WRAPPED => Err(()),
        n => Ok(Some(ENVELOPE_FIXED + n)),
    }
}

/// Counters, read by the metrics at each scrape.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct L2Stats {
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub read_bytes: u64,
    pub uploads: u64,
    pub uploaded_bytes: u64,
    /// Manifests by digest read from the store, asked for and not there, and uploaded.
    pub manifest_hits: u64,
    pub manifest_misses: u64,
    pub manifest_uploads: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    read_bytes: Arc<AtomicU64>,
    uploads: AtomicU64,
    uploaded_bytes: AtomicU64,
    manifest_hits: AtomicU64,
    manifest_misses: AtomicU64,
    manifest_uploads: AtomicU64,
}

/// The object store and where pullgate's objects live in it.
pub struct L2 {
    objects: Arc<dyn ObjectStore>,
    prefix: String,
    counters: Counters,
    /// Digests being uploaded by this process (one upload per digest).
    uploading: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L2({}, prefix {:?})", self.objects, self.prefix)
    }
}

impl L2 {
    /// An L2 over `objects`; object names start with `prefix` (may be empty).
    pub fn new(objects: Arc<dyn ObjectStore>, prefix: &str) -> L2 {
        L2 {
            objects,
            prefix: prefix.trim_matches('/').to_owned(),
            counters: Counters::default(),
            uploading: Mutex::new(HashSet::new()),
        }
    }

    /// `[cache.l2]` as a client. Errors name the key.
    pub fn from_config(config: &crate::config::L2) -> Result<L2, String> {
        use object_store::aws::AmazonS3Builder;
        let tls = crate::upstream::tls::client_config(config.ca.as_deref())
            .map_err(|e| format!("cache.l2.ca: {e}"))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(Duration::from_secs(30))
            .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cache.l2: cannot build the HTTP client: {e}"))?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_http_connector(Connector(http))
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
            });
        if let Some(endpoint) = &config.endpoint {
            // S3-compatible stores (MinIO, Garage, Ceph) are addressed by path, not by a
            // bucket subdomain.
            builder = builder
                .with_endpoint(endpoint.as_str().trim_end_matches('/'))
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.scheme() == "http");
        }
        if let (Some(var), Some(file)) = (&config.access_key_id_env, &config.secret_access_key_file)
        {
            let id = std::env::var(var)
                .map_err(|_| format!("cache.l2.access_key_id_env: {var} is not set"))?;
            let secret = std::fs::read_to_string(file)
                .map_err(|e| format!("cache.l2.secret_access_key_file: {e}"))?;
            builder = builder
                .with_access_key_id(id.trim())
                .with_secret_access_key(secret.trim());
        }
        let objects = builder.build().map_err(|e| format!("cache.l2: {e}"))?;
        Ok(L2::new(Arc::new(objects), &config.prefix))
    }

    pub fn stats(&self) -> L2Stats {
        let c = &self.counters;
        L2Stats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            uploads: c.uploads.load(Ordering::Relaxed),
            uploaded_bytes: c.uploaded_bytes.load(Ordering::Relaxed),
            manifest_hits: c.manifest_hits.load(Ordering::Relaxed),
            manifest_misses: c.manifest_misses.load(Ordering::Relaxed),
            manifest_uploads: c.manifest_uploads.load(Ordering::Relaxed),
        }
    }

    /// `<prefix>/blobs/<algorithm>/<hex>`: content-addressed, so any replica's copy is the
    /// same object.
    fn blob_path(&self, digest: &Digest) -> ObjectPath {
        self.path("blobs", digest)
    }

    /// `<prefix>/manifests/<algorithm>/<hex>`: the media type on the first line, then the
    /// manifest's bytes as the upstream sent them (the disk cache's format).
    fn manifest_path(&self, digest: &Digest) -> ObjectPath {
        self.path("manifests", digest)
    }

    fn path(&self, kind: &str, digest: &Digest) -> ObjectPath {
        let name = format!("{kind}/{}/{}", digest.algorithm(), digest.hex());
        match self.prefix.as_str() {
            "" => ObjectPath::from(name),
            prefix => ObjectPath::from(format!("{prefix}/{name}")),
        }
    }

    /// The manifest named `digest` (media type, bytes), verified against its digest (and
    /// opened with `keys` when encryption is on); `None` when the store does not hold it in
    /// this replica's mode, cannot be reached within [`OPEN_TIMEOUT`], or holds a copy that
    /// does not match (deleted). Never an error: the caller asks the upstream.
    pub async fn manifest(
        &self,
        digest: &Digest,
        keys: Option<Arc<dyn Keys>>,
    ) -> Option<(String, bytes::Bytes)> {
        let counters = &self.counters;
        let read = async {
            let got = self.objects.get(&self.manifest_path(digest)).await?;
            got.bytes().await
        };
        let object = match tokio::time::timeout(OPEN_TIMEOUT, read).await {
            Ok(Ok(object)) => object,
            Ok(Err(object_store::Error::NotFound { .. })) => {
                counters.manifest_misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Ok(Err(e)) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%digest, error = %e, "object store (cache.l2) failed; asking the upstream");
                return None;
            }
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%digest, timeout = ?OPEN_TIMEOUT, "object store (cache.l2) too slow; asking the upstream");
                return None;
            }
        };
        let object = match (envelope_len(&object), keys) {
            // Sealed by a replica with encryption on: opened here, or not ours to read.
            (Ok(Some(prefix)), Some(keys)) if object.len() >= prefix => {
                match open_manifest(&object, prefix, digest, keys).await {
                    Ok(plain) => bytes::Bytes::from(plain),
                    Err(why) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%digest, error = %why, "cannot open the object store's sealed manifest; asking the upstream");
                        return None;
                    }
                }
            }
            (Err(()), None) => object,
            // Plaintext while this replica encrypts (an upload replaces it), or sealed while
            // it does not: a miss.
            _ => {
                counters.manifest_misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let parsed = object
            .iter()
            .position(|b| *b == b'\n')
            .and_then(|end| {
                let media_type = std::str::from_utf8(&object[..end]).ok()?.to_owned();
                let body = object.slice(end + 1..);
                digest.verify(&body).then_some((media_type, body))
            })
            .filter(|(media_type, _)| crate::oci::is_manifest_media_type(media_type));
        match parsed {
            Some(found) => {
                counters.manifest_hits.fetch_add(1, Ordering::Relaxed);
                Some(found)
            }
            None => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%digest, "the object store's manifest does not match its digest; deleting it");
                if let Err(e) = self.objects.delete(&self.manifest_path(digest)).await {
                    tracing::warn!(%digest, error = %e, "cannot delete the damaged object");
                }
                None
            }
        }
    }

    /// Uploads a verified manifest in the background (one PUT; manifests are small and
    /// content-addressed, so a second upload of the same one writes the same bytes), sealed
    /// under the current generation when `keys` is set.
    pub fn upload_manifest(
        self: &Arc<Self>,
        digest: &Digest,
        media_type: &str,
        body: bytes::Bytes,
        keys: Option<Arc<dyn Keys>>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut plain = Vec::with_capacity(media_type.len() + 1 + body.len());
        plain.extend_from_slice(media_type.as_bytes());
        plain.push(b'\n');
        plain.extend_from_slice(&body);
        let sealing = keys.is_some();
        let object = match keys {
            None => plain,
            Some(keys) => {
                let sealed = seal::new_file_key(keys.as_ref(), Kind::Manifest, digest)
                    .ok()
                    .and_then(|fk| {
                        let wrapped = keys.wrapped_key(fk.header().generation)?;
                        let mut object = envelope(&wrapped);
                        object.extend_from_slice(&crypt::seal_all(&fk, &plain));
                        Some(object)
                    });
                // No key at hand: nothing goes up (never plaintext while encryption is on).
                let Some(object) = sealed else {
                    return;
                };
                object
            }
        };
        let key = format!("m{}", digest.hex());
        if !self.lock_uploading().insert(key.clone()) {
            return;
        }
        let (l2, digest) = (Arc::clone(self), digest.clone());
        runtime.spawn(async move {
            let path = l2.manifest_path(&digest);
            // Without encryption, any copy there stays: a sealed one is never replaced by
            // plaintext (a damaged one was deleted by the read that found it out).
            if !sealing && l2.objects.head(&path).await.is_ok() {
                l2.lock_uploading().remove(&key);
                return;
            }
            match l2.objects.put(&path, PutPayload::from(object)).await {
                Ok(_) => {
                    l2.counters.manifest_uploads.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%digest, "manifest uploaded to the object store");
                }
                Err(e) => {
                    l2.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%digest, error = %e, "cannot upload the manifest to the object store (cache.l2)");
                }
            }
            l2.lock_uploading().remove(&key);
        });
    }

    /// The blob from `offset`, or `None` when the store does not hold it.
    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<SourceBody>, String> {
        let options = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        let got = match self
            .objects
            .get_opts(&self.blob_path(digest), options)
            .await
        {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let total_len = got.meta.size;
        let read_bytes = Arc::clone(&self.counters.read_bytes);
        let mut stream = got.into_stream();
        let mut head: Vec<bytes::Bytes> = Vec::new();
        if offset == 0 {
            // A sealed object (a replica with encryption on wrote it) is not this replica's
            // to read, nor its to delete as damaged: a miss.
            let mut seen = 0;
            while seen < ENVELOPE_MAGIC.len() {
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        seen += chunk.len();
                        head.push(chunk);
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => break,
                }
            }
            let start: Vec<u8> = head
                .iter()
                .flat_map(|c| c.iter().copied())
                .take(8)
                .collect();
            if envelope_len(&start).is_ok() && start.len() == ENVELOPE_MAGIC.len() {
                return Ok(None);
            }
        }
        let chunks = futures_util::stream::iter(head.into_iter().map(Ok))
            .chain(stream)
            .map(move |chunk| {
                chunk
                    .inspect(|c| {
                        read_bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                    })
                    .map_err(|e| format!("object store: {e}"))
            })
            .boxed();
        Ok(Some(SourceBody {
            total_len: Some(total_len),
            chunks,
        }))
    }

    /// A sealed blob object from `offset` (of the plaintext), opened chunk by chunk as it
    /// arrives: the whole object is read (a resume decrypts from the start and skips what the
    /// fill has; resumes are rare). `None` when the store does not hold a sealed copy. A
    /// damaged object (a header that does not fit, a chunk that does not authenticate) is
    /// deleted, and `passed` set so the fill's next try goes to the next source.
    async fn read_sealed(
        &self,
        digest: &Digest,
        offset: u64,
        keys: Arc<dyn Keys>,
        passed: Arc<AtomicBool>,
    ) -> Result<Option<SourceBody>, String> {
        let path = self.blob_path(digest);
        let got = match self.objects.get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let size = got.meta.size;
        let mut stream = got.into_stream();
        let mut head: Vec<u8> = Vec::new();
        let prefix = loop {
            match envelope_len(&head) {
                // Plaintext, written while encryption was off: not read (an upload of this
                // replica's sealed copy replaces it).
                Err(()) => return Ok(None),
                Ok(Some(n)) if head.len() >= n + HEADER_LEN => break n,
                Ok(_) => {}
            }
            match stream.next().await {
                Some(Ok(chunk)) => head.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(e.to_string()),
                None => break head.len() + 1,
            }
        };
        self.counters
            .read_bytes
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        let damaged = |why: &str| {
            self.delete_damaged(&path);
            format!("the sealed object is damaged ({why}); deleted")
        };
        if head.len() < prefix + HEADER_LEN {
            return Err(damaged("shorter than its header"));
        }
        let key = keys
            .unwrap_key(head[ENVELOPE_FIXED..prefix].to_vec())
            .await
            .map_err(|missing| format!("its key cannot be unwrapped ({missing:?})"))?;
        let header = Header::parse(&head[prefix..]).map_err(|e| damaged(&e.to_string()))?;
        if header.kind != Kind::Blob || header.digest != seal::header_digest(digest) {
            return Err(damaged("its header names another blob"));
        }
        let geometry = Geometry::of_file(size.saturating_sub(prefix as u64))
            .map_err(|e| damaged(&e.to_string()))?;
        let mut opener = Opener::new(FileKey::derive(&key, &header), geometry);
        let mut first = Vec::new();
        opener
            .push(&head[prefix + HEADER_LEN..], &mut first)
            .map_err(|e| damaged(&e.to_string()))?;
        let opened = Opened {
            opener,
            skip: offset,
            read_bytes: Arc::clone(&self.counters.read_bytes),
            on_damage: {
                let (objects, path) = (Arc::clone(&self.objects), path.clone());
                Box::new(move || {
                    passed.store(true, Ordering::Relaxed);
                    spawn_delete(Arc::clone(&objects), path.clone());
                })
            },
        };
        Ok(Some(SourceBody {
            total_len: Some(geometry.plaintext_len),
            chunks: opened.stream(first, stream),
        }))
    }

    /// Deletes an object found damaged, in the background.
    fn delete_damaged(&self, path: &ObjectPath) {
        tracing::error!(object = %path, "the object store's copy is damaged; deleting it");
        spawn_delete(Arc::clone(&self.objects), path.clone());
    }

    /// Uploads a verified, committed blob in the background unless the store already holds it
    /// or this process is uploading it. Failures are counted and logged, nothing else.
    pub(crate) fn upload(self: &Arc<Self>, digest: &Digest, blob: Blob) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let hex = digest.hex().to_owned();
        if !self.lock_uploading().insert(hex.clone()) {
            return;
        }
        let (l2, digest) = (Arc::clone(self), digest.clone());
        runtime.spawn(async move {
            match l2.put(&digest, blob).await {
                Ok(Some(len)) => {
                    l2.counters.uploads.fetch_add(1, Ordering::Relaxed);
                    l2.counters
                        .uploaded_bytes
                        .fetch_add(len, Ordering::Relaxed);
                    tracing::debug!(%digest, len, "blob uploaded to the object store");
                }
                Ok(None) => {}
                Err(why) => {
                    l2.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%digest, error = %why, "cannot upload the blob to the object store (cache.l2)");
                }
            }
            l2.lock_uploading().remove(&hex);
        });
    }

    /// `Some(len)` when uploaded, `None` when the store already had it.
    /// A sealed blob (encryption on) goes up as the envelope and its file's bytes as they
    /// are on disk: the object store never sees plaintext.
    async fn put(&self, digest: &Digest, blob: Blob) -> Result<Option<u64>, String> {
        let path = self.blob_path(digest);
        let mut reader = UploadReader::new(&blob)?;
        match self.objects.head(&path).await {
            Ok(meta) if meta.size == reader.len() => return Ok(None),
            // Without encryption, any copy there stays: a sealed one must never be replaced
            // by plaintext (a damaged one is deleted when a fill finds it out).
            Ok(_) if blob.sealed.is_none() => return Ok(None),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        let total = reader.len();
        if total <= PART_SIZE as u64 {
            let mut payload = Vec::with_capacity(total as usize);
            while let Some(chunk) = reader.next_chunk().await? {
                payload.extend_from_slice(&chunk);
            }
            self.objects
                .put(&path, PutPayload::from(payload))
                .await
                .map_err(|e| e.to_string())?;
            return Ok(Some(total));
        }
        let upload = self
            .objects
            .put_multipart(&path)
            .await
            .map_err(|e| e.to_string())?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        loop {
            let next = match parts.wait_for_capacity(PARTS_IN_FLIGHT).await {
                Ok(()) => reader.next_chunk().await,
                Err(e) => Err(e.to_string()),
            };
            match next {
                Ok(Some(chunk)) => parts.put(chunk),
                Ok(None) => break,
                Err(why) => {
                    // Nothing half-written stays behind as an open upload.
                    if let Err(e) = parts.abort().await {
                        tracing::warn!(%digest, error = %e, "cannot abort the multipart upload");
                    }
                    return Err(why);
                }
            }
        }
        // `finish` aborts the upload itself when a part or the completion fails.
        parts.finish().await.map_err(|e| e.to_string())?;
        Ok(Some(total))
    }

    /// Deletes an object that failed verification, so the next fill asks the next source.
    pub(crate) fn forget(self: &Arc<Self>, digest: &Digest) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (l2, digest) = (Arc::clone(self), digest.clone());
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        runtime.spawn(async move {
            tracing::error!(%digest, "the object store's copy does not match its digest; deleting it");
            if let Err(e) = l2.objects.delete(&l2.blob_path(&digest)).await {
                tracing::warn!(%digest, error = %e, "cannot delete the damaged object");
            }
        });
    }

    fn lock_uploading(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.uploading.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What an upload sends: a plaintext blob's bytes, or a sealed blob's envelope and then its
/// file's bytes as they are on disk (header and sealed chunks, never opened).
enum UploadReader {
    Plain {
        reader: super::disk::BlobReader,
        len: u64,
    },
    Sealed {
        envelope: Option<Vec<u8>>,
        file: Arc<std::fs::File>,
        at: u64,
        file_len: u64,
        len: u64,
    },
}

impl UploadReader {
    fn new(blob: &Blob) -> Result<UploadReader, String> {
        let Some(sealed) = &blob.sealed else {
            return Ok(UploadReader::Plain {
                reader: blob.reader(0, blob.len),
                len: blob.len,
            });
        };
        let generation = sealed.key.header().generation;
        let wrapped = sealed
            .keys
            .as_ref()
            .and_then(|keys| keys.wrapped_key(generation))
            .ok_or_else(|| format!("generation {generation} is not in the keyring"))?;
        let envelope = envelope(&wrapped);
        let file_len = Geometry::new(blob.len).file_len();
        Ok(UploadReader::Sealed {
            len: envelope.len() as u64 + file_len,
            envelope: Some(envelope),
            file: Arc::clone(&blob.file),
            at: 0,
            file_len,
        })
    }

    async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        match self {
            UploadReader::Plain { reader, .. } => {
                reader.next_chunk().await.map_err(|e| e.to_string())
            }
            UploadReader::Sealed {
                envelope,
                file,
                at,
                file_len,
                ..
            } => {
                if let Some(envelope) = envelope.take() {
                    return Ok(Some(bytes::Bytes::from(envelope)));
                }
                if *at >= *file_len {
                    return Ok(None);
                }
                let want = (*file_len - *at).min(1 << 20) as usize;
                let (file, from) = (Arc::clone(file), *at);
                let chunk = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0; want];
                    file.read_exact_at(&mut buf, from).map(|()| buf)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                *at += chunk.len() as u64;
                Ok(Some(bytes::Bytes::from(chunk)))
            }
        }
    }

    fn len(&self) -> u64 {
        match self {
            UploadReader::Plain { len, .. } | UploadReader::Sealed { len, .. } => *len,
        }
    }
}

fn spawn_delete(objects: Arc<dyn ObjectStore>, path: ObjectPath) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = objects.delete(&path).await {
                tracing::warn!(object = %path, error = %e, "cannot delete the damaged object");
            }
        });
    }
}

/// A sealed object's chunks opened as they stream in.
struct Opened {
    opener: Opener,
    /// Plaintext bytes the fill already has (a resume).
    skip: u64,
    read_bytes: Arc<AtomicU64>,
    on_damage: Box<dyn Fn() + Send + Sync>,
}

type ObjectStream = futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>;

impl Opened {
    /// The plaintext: `first` (opened from the bytes read with the header), then the rest.
    fn stream(
        self,
        first: Vec<u8>,
        rest: ObjectStream,
    ) -> futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>> {
        futures_util::stream::unfold(Some((self, Some(first), rest)), |state| async move {
            let (mut me, mut pending, mut rest) = state?;
            loop {
                if let Some(plain) = pending.take().map(|p| me.skipped(p)) {
                    if !plain.is_empty() {
                        return Some((Ok(plain), Some((me, None, rest))));
                    }
                }
                match rest.next().await {
                    Some(Ok(chunk)) => {
                        me.read_bytes
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        let mut plain = Vec::new();
                        if let Err(e) = me.opener.push(&chunk, &mut plain) {
                            (me.on_damage)();
                            return Some((Err(format!("sealed object: {e}")), None));
                        }
                        pending = Some(plain);
                    }
                    Some(Err(e)) => return Some((Err(format!("object store: {e}")), None)),
                    None if me.opener.done() => return None,
                    None => return Some((Err("the sealed object ended early".to_owned()), None)),
                }
            }
        })
        .boxed()
    }

    /// `plain` without the bytes still to skip.
    fn skipped(&mut self, plain: Vec<u8>) -> bytes::Bytes {
        let drop = self.skip.min(plain.len() as u64) as usize;
        self.skip -= drop as u64;
        bytes::Bytes::from(plain).slice(drop..)
    }
}

/// The plaintext of a sealed manifest object whose envelope is `prefix` bytes long.
async fn open_manifest(
    object: &[u8],
    prefix: usize,
    digest: &Digest,
    keys: Arc<dyn Keys>,
) -> Result<Vec<u8>, String> {
    let wrapped = object[ENVELOPE_FIXED..prefix].to_vec();
    let key = keys
        .unwrap_key(wrapped)
        .await
        .map_err(|missing| format!("its key cannot be unwrapped ({missing:?})"))?;
    let sealed = &object[prefix..];
    let header = Header::parse(sealed).map_err(|e| e.to_string())?;
    if header.kind != Kind::Manifest || header.digest != seal::header_digest(digest) {
        return Err("its header names another manifest".into());
    }
    crypt::open_all(&FileKey::derive(&key, &header), sealed).map_err(|e| e.to_string())
}

/// A fill's source with L2 in front: the object store first, then `next` (the upstream or
/// the owner) from the point where L2 missed, failed or was slow.
pub(crate) struct L2Source {
    l2: Arc<L2>,
    digest: Digest,
    next: Arc<dyn BlobSource>,
    /// Set while encryption is on: objects are sealed, and opened with these.
    keys: Option<Arc<dyn Keys>>,
    /// The object store held the blob (so it needs no upload, and a mismatch is its fault).
    had_it: AtomicBool,
    /// L2 is not asked again during this fill (also set by a sealed chunk that failed).
    passed: Arc<AtomicBool>,
}

impl L2Source {
    pub(crate) fn new(
        l2: Arc<L2>,
        digest: &Digest,
        next: Arc<dyn BlobSource>,
        keys: Option<Arc<dyn Keys>>,
    ) -> L2Source {
        L2Source {
            l2,
            digest: digest.clone(),
            next,
            keys,
            had_it: AtomicBool::new(false),
            passed: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[async_trait]
impl BlobSource for L2Source {
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError> {
        if !self.passed.load(Ordering::Relaxed) {
            let counters = &self.l2.counters;
            let read = async {
                match &self.keys {
                    None => self.l2.read(&self.digest, offset).await,
                    Some(keys) => {
                        let (keys, passed) = (Arc::clone(keys), Arc::clone(&self.passed));
                        self.l2
                            .read_sealed(&self.digest, offset, keys, passed)
                            .await
                    }
                }
            };
            match tokio::time::timeout(OPEN_TIMEOUT, read).await {
                Ok(Ok(Some(body))) => {
                    counters.hits.fetch_add(1, Ordering::Relaxed);
                    self.had_it.store(true, Ordering::Relaxed);
                    return Ok(body);
                }
                Ok(Ok(None)) => {
                    counters.misses.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(why)) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(digest = %self.digest, error = %why, "object store (cache.l2) failed; using the next source");
                }
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(digest = %self.digest, timeout = ?OPEN_TIMEOUT, "object store (cache.l2) too slow; using the next source");
                }
            }
            self.passed.store(true, Ordering::Relaxed);
        }
        self.next.open(offset).await
    }

    fn origin(&self) -> Origin {
        if self.had_it.load(Ordering::Relaxed) {
            Origin::L2
        } else {
            self.next.origin()
        }
    }
}

/// Our own reqwest client (rustls on ring, the configured CA) under object_store.
#[derive(Debug)]
struct Connector(reqwest::Client);

impl object_store::client::HttpConnector for Connector {
    fn connect(
        &self,
        _options: &object_store::ClientOptions,
    ) -> object_store::Result<object_store::client::HttpClient> {
        Ok(object_store::client::HttpClient::new(self.0.clone()))
    }
}
