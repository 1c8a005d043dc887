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
use super::{BlobSource, Origin, SourceBody, SourceError};
use crate::oci::Digest;

/// How long the object store may take to start answering a read before the fill goes on to
/// the next source: a slow L2 must not make a pull slower than the upstream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);
/// Objects up to this size go up in one PUT; larger ones in parts of this size.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

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

    /// The manifest named `digest` (media type, bytes), verified against its digest; `None`
    /// when the store does not hold it, cannot be reached within [`OPEN_TIMEOUT`], or holds a
    /// copy that does not match (deleted). Never an error: the caller asks the upstream.
    pub async fn manifest(&self, digest: &Digest) -> Option<(String, bytes::Bytes)> {
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
    /// content-addressed, so a second upload of the same one writes the same bytes).
    pub fn upload_manifest(
        self: &Arc<Self>,
        digest: &Digest,
        media_type: &str,
        body: bytes::Bytes,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = format!("m{}", digest.hex());
        if !self.lock_uploading().insert(key.clone()) {
            return;
        }
        let mut object = Vec::with_capacity(media_type.len() + 1 + body.len());
        object.extend_from_slice(media_type.as_bytes());
        object.push(b'\n');
        object.extend_from_slice(&body);
        let (l2, digest) = (Arc::clone(self), digest.clone());
        runtime.spawn(async move {
            let path = l2.manifest_path(&digest);
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
        let chunks = got
            .into_stream()
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
    async fn put(&self, digest: &Digest, blob: Blob) -> Result<Option<u64>, String> {
        let path = self.blob_path(digest);
        match self.objects.head(&path).await {
            Ok(meta) if meta.size == blob.len => return Ok(None),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut reader = blob.reader(0, blob.len);
        if blob.len <= PART_SIZE as u64 {
            let mut payload = Vec::with_capacity(blob.len as usize);
            while let Some(chunk) = reader.next_chunk().await.map_err(|e| e.to_string())? {
                payload.extend_from_slice(&chunk);
            }
            self.objects
                .put(&path, PutPayload::from(payload))
                .await
                .map_err(|e| e.to_string())?;
            return Ok(Some(blob.len));
        }
        let upload = self
            .objects
            .put_multipart(&path)
            .await
            .map_err(|e| e.to_string())?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        loop {
            let next = match parts.wait_for_capacity(PARTS_IN_FLIGHT).await {
                Ok(()) => reader.next_chunk().await.map_err(|e| e.to_string()),
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
        Ok(Some(blob.len))
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

/// A fill's source with L2 in front: the object store first, then `next` (the upstream or
/// the owner) from the point where L2 missed, failed or was slow.
pub(crate) struct L2Source {
    l2: Arc<L2>,
    digest: Digest,
    next: Arc<dyn BlobSource>,
    /// The object store held the blob (so it needs no upload, and a mismatch is its fault).
    had_it: AtomicBool,
    /// L2 is not asked again during this fill.
    passed: AtomicBool,
}

impl L2Source {
    pub(crate) fn new(l2: Arc<L2>, digest: &Digest, next: Arc<dyn BlobSource>) -> L2Source {
        L2Source {
            l2,
            digest: digest.clone(),
            next,
            had_it: AtomicBool::new(false),
            passed: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl BlobSource for L2Source {
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError> {
        if !self.passed.load(Ordering::Relaxed) {
            let counters = &self.l2.counters;
            match tokio::time::timeout(OPEN_TIMEOUT, self.l2.read(&self.digest, offset)).await {
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
