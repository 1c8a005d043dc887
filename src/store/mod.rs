//! The blob store: a content-addressed, size-bounded disk cache of verified blobs, filled once
//! per digest from a [`BlobSource`] while any number of clients stream from the growing file.
//!
//! Owns: `<cache dir>/blobs/sha256/<2 hex>/<hex>` and `<cache dir>/tmp/`, the size index and
//! eviction, and single flight (the in-flight map). Plain Rust on tokio: no Pingora and no HTTP
//! types — the gateway maps [`Blob`] / [`Fill`] to responses, the upstream client implements
//! [`BlobSource`].
//! Must never: serve or commit bytes that are not the digest's (invariant 3), start a second
//! fetch of a digest that is being fetched (invariant 4), build a path from anything but a
//! verified [`Digest`] (invariant 2), or hold a blob in memory beyond the bounded tier of
//! small blobs (invariant 7: memory does not grow with blob size).
//!
//! Sharp edge for callers: a reader's `Err` after bytes were sent means "abort the response
//! mid-body". Ending the body instead hands the client a short blob that looks complete.

mod disk;
mod fill;
mod handover;
mod index;
mod l2;
mod links;
mod manifest;
mod seal;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::oci::{Digest, OciError};

pub use disk::{Blob, BlobReader, MAX_CHUNK};
pub use fill::{Fill, FillFailure, FillPolicy, FillReader, FillState, Progress};
pub use l2::{L2Stats, L2};
pub(crate) use links::unix_secs;
pub use links::Links;
pub use manifest::{
    CachedManifest, ManifestStats, ManifestStore, ReferrersEntry, ReferrersKey, TagEntry, TagKey,
};

use disk::Layout;

/// The in-memory caches a warm request looks up (tags, manifests, small blobs, sizes,
/// confirmations), hashed with foldhash seeded per process: moka's default SipHash cost a warm
/// HEAD about 1,400 instructions over its lookups.
type MemCache<K, V> = moka::sync::Cache<K, V, foldhash::fast::RandomState>;

fn mem_hasher() -> foldhash::fast::RandomState {
    foldhash::fast::RandomState::default()
}
use index::Index;
pub use index::PinError;
pub use seal::{header_digest, KeyMissing, Keys};

/// The list of pinned blobs under the cache directory.
const PINS_FILE: &str = "pins";
/// The longest wait a source's "not now" is remembered for, whatever its `Retry-After` says:
/// an upstream that recovers sooner is asked again after this.
const MAX_BUSY_MEMORY: Duration = Duration::from_secs(600);

/// Where a fill gets its bytes: the upstream registry today, a peer or a second tier later.
#[async_trait::async_trait]
pub trait BlobSource: Send + Sync + 'static {
    /// Opens the blob at byte `offset` (0 = whole blob; >0 = resume, i.e. an HTTP Range
    /// request). Returns the TOTAL blob length if known and a stream of chunks from `offset`.
    /// A source that cannot resume should answer `Broken` for `offset > 0`, never restart at 0.
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError>;

    /// Where the bytes of this fill came from, asked once the fill ended: only what came from
    /// the upstream is uploaded to L2 (a peer's copy is uploaded by that peer).
    fn origin(&self) -> Origin {
        Origin::Upstream
    }
}

/// Where a fill's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Upstream,
    /// The object store ([`L2`]).
    L2,
    /// Another replica of the cluster.
    Peer,
}

/// An opened source body.
pub struct SourceBody {
    /// Length of the whole blob (not of the remainder), when the source knows it.
    pub total_len: Option<u64>,
    /// Chunks from the requested offset; an `Err` item means the transfer broke (resumable).
    pub chunks: BoxStream<'static, Result<Bytes, String>>,
}

/// Why a source could not be opened.
#[derive(Debug, Clone)]
pub enum SourceError {
    /// Final, e.g. upstream 404/403: told to the client, not retried.
    Refused(OciError),
    /// A transport problem worth retrying.
    Broken(String),
    /// The source answered "not now" (HTTP 429, 5xx): worth retrying after `retry_after` when
    /// it said (else after the fill's own backoff). `error` is what clients get if the attempts
    /// run out, or at once if the source asks for a longer wait than a fill holds clients.
    Busy {
        error: OciError,
        retry_after: Option<Duration>,
    },
}

/// What [`BlobStore::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenStats {
    /// Blobs indexed (after any start-up eviction).
    pub entries: u64,
    pub bytes: u64,
    /// Leftover temp files deleted (fills cut by a crash or restart).
    pub temp_files_removed: u64,
    pub elapsed: Duration,
}

/// Counters for metrics; read with [`BlobStore::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Every committed blob (pinned ones included) and their bytes.
    pub entries: u64,
    pub bytes: u64,
    /// Blobs kept out of eviction ([`BlobStore::pin`]) and their bytes.
    pub pinned_entries: u64,
    pub pinned_bytes: u64,
    pub fills_in_flight: u64,
    pub evictions: u64,
    pub fills_started: u64,
    pub fills_joined: u64,
    pub fills_committed: u64,
    /// Every failed fill, and the same split by reason (see [`FillFailure`]).
    pub fills_failed: u64,
    pub fills_refused: u64,
    pub fills_broken: u64,
    pub fills_invalid: u64,
    pub fills_storage: u64,
    /// Sealed files (blobs and manifests) that failed their integrity check and were
    /// quarantined.
    pub integrity_failures: u64,
    /// Files deleted because encryption was turned on or off, or their key was revoked.
    pub resealed_evictions: u64,
    /// The object store's counters, when there is one.
    pub l2: Option<L2Stats>,
}

#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub(crate) struct FillCounters {
    pub(crate) started: Counter,
    pub(crate) joined: Counter,
    pub(crate) committed: Counter,
    pub(crate) failed: Counter,
    pub(crate) refused: Counter,
    pub(crate) broken: Counter,
    pub(crate) invalid: Counter,
    pub(crate) storage: Counter,
}

impl FillCounters {
    pub(crate) fn failed(&self, failure: &FillFailure) {
        self.failed.inc();
        match failure {
            FillFailure::Refused(_) => self.refused.inc(),
            FillFailure::Broken(_) | FillFailure::Busy(_) => self.broken.inc(),
            FillFailure::Invalid(_) => self.invalid.inc(),
            FillFailure::Storage(_) => self.storage.inc(),
        }
    }
}

/// State shared by the store handle and its fill tasks.
pub(crate) struct Shared {
    pub(crate) layout: Layout,
    pub(crate) index: Index,
    /// hex -> the running fill. Not an evicting cache: an entry leaves only when its fill ends.
    inflight: Mutex<HashMap<String, Arc<Fill>>>,
    next_fill_id: AtomicU64,
    pub(crate) policy: FillPolicy,
    /// `policy.stall_timeout`, changeable while serving ([`BlobStore::set_stall_timeout`]).
    pub(crate) stall_timeout_ms: AtomicU64,
    pub(crate) counters: FillCounters,
    /// The key hierarchy while encryption is on; `None` stores plaintext (as before).
    keys: std::sync::RwLock<Option<Arc<dyn Keys>>>,
    /// Shared with the manifest store ([`BlobStore::integrity_counter`]).
    integrity_failures: Arc<AtomicU64>,
    stale_evictions: Counter,
    /// The object store behind the disk ([`BlobStore::set_l2`]).
    l2: std::sync::OnceLock<Arc<L2>>,
    /// Pieces of sealed blobs opened for one reader and kept for the others.
    opened: disk::OpenedPieces,
    /// hex -> a source's "not now" with a wait longer than a fill holds clients, and when that
    /// wait ends: new fills of the blob fail with it until then, without asking the source.
    busy: moka::sync::Cache<String, (OciError, Instant)>,
}

impl Shared {
    pub(crate) fn keys(&self) -> Option<Arc<dyn Keys>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A stored file that must not be served: out of the index, off the disk (so no upgrade
    /// hand-over takes it for a committed blob), counted when it was damaged.
    fn drop_file(&self, hex: &str, why: &seal::Unfit) {
        self.index.invalidate(hex);
        let path = self.layout.blob_path(hex);
        match why {
            seal::Unfit::Integrity(reason) => {
                self.integrity_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(blob = hex, %reason, "cached blob failed its integrity check; quarantined, it will be fetched again");
            }
            seal::Unfit::Stale(reason) => {
                self.stale_evictions.inc();
                tracing::info!(blob = hex, %reason, "cached blob evicted");
            }
            seal::Unfit::NotNow => return,
        }
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a quarantined blob");
            }
        }
    }
    fn inflight(&self) -> MutexGuard<'_, HashMap<String, Arc<Fill>>> {
        // No code panics while holding this lock; recover the map rather than panic if it did.
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers a source's answer that asked to wait `wait` (at most [`MAX_BUSY_MEMORY`]).
    pub(crate) fn remember_busy(&self, hex: &str, error: &OciError, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_BUSY_MEMORY);
        self.busy.insert(hex.to_owned(), (error.clone(), until));
    }

    /// The remembered answer while its wait lasts, its `Retry-After` the time left.
    fn still_busy(&self, hex: &str) -> Option<FillFailure> {
        let (error, until) = self.busy.get(hex)?;
        let left = until.checked_duration_since(Instant::now())?;
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(FillFailure::Busy(error.with_retry_after(secs.to_string())))
    }

    /// Removes fill `id` from the in-flight map (a newer fill of the same digest stays).
    pub(crate) fn leave_inflight(&self, hex: &str, id: u64) {
        let mut map = self.inflight();
        if map.get(hex).is_some_and(|f| f.id() == id) {
            map.remove(hex);
        }
    }
}

/// The blob store. Cloning is cheap (one `Arc`); all clones are the same store.
#[derive(Clone)]
pub struct BlobStore {
    shared: Arc<Shared>,
}

impl BlobStore {
    /// Opens (creating if needed) the store under `dir`, bounded to `max_size` bytes: creates
    /// `blobs/sha256/` and `tmp/`, deletes every leftover temp file, rebuilds the index from
    /// `blobs/` (oldest mtime = least recently used; non-digest names are logged and ignored),
    /// and evicts down to `max_size`. Blocking I/O: call before serving, or in `spawn_blocking`.
    pub fn open(dir: &Path, max_size: u64) -> std::io::Result<(BlobStore, OpenStats)> {
        BlobStore::open_with(dir, max_size, FillPolicy::default())
    }

    /// [`BlobStore::open`] with a non-default stall timeout and resume backoff.
    pub fn open_with(
        dir: &Path,
        max_size: u64,
        policy: FillPolicy,
    ) -> std::io::Result<(BlobStore, OpenStats)> {
        let started = Instant::now();
        let layout = Layout::new(dir);
        layout.create_dirs()?;
        let temp_files_removed = layout.clear_tmp()?;
        let mut found = layout.scan()?;
        found.sort_by_key(|(_, _, mtime)| *mtime);
        let index = Index::new(layout.clone(), max_size);
        // What the list names stays pinned, whatever the budget (it fitted when it was pinned);
        // new pins need `set_pinned_max_size` (none fit until then).
        index.load_pins(dir.join(PINS_FILE), u64::MAX);
        for (hex, size, _) in found {
            index.insert_scanned(hex, size);
        }
        index.finish_scan();
        index.set_pinned_max(0);
        index.run_pending_tasks();
        let stats = OpenStats {
            entries: index.entries(),
            bytes: index.bytes(),
            temp_files_removed,
            elapsed: started.elapsed(),
        };
        let shared = Shared {
            layout,
            index,
            inflight: Mutex::new(HashMap::new()),
            next_fill_id: AtomicU64::new(1),
            stall_timeout_ms: AtomicU64::new(
                u64::try_from(policy.stall_timeout.as_millis()).unwrap_or(u64::MAX),
            ),
            policy,
            counters: FillCounters::default(),
            keys: std::sync::RwLock::new(None),
            integrity_failures: Arc::new(AtomicU64::new(0)),
            stale_evictions: Counter::default(),
            l2: std::sync::OnceLock::new(),
            opened: disk::OpenedPieces::new(),
            busy: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(MAX_BUSY_MEMORY)
                .build(),
        };
        tracing::info!(dir = %dir.display(), entries = stats.entries, bytes = stats.bytes,
            temp_files_removed, elapsed = ?stats.elapsed, "blob store opened");
        let store = BlobStore {
            shared: Arc::new(shared),
        };
        Ok((store, stats))
    }

    /// A committed blob: an open file and its size, marking it recently used. `None` if absent.
    /// Does one `open` + `fstat` (+ one header read when encryption is on). A file that does
    /// not fit (damaged, foreign header, unknown generation, sealed while encryption is off or
    /// plaintext while it is on) is dropped and deleted here, so the next fill replaces it.
    pub fn lookup(&self, digest: &Digest) -> Option<Blob> {
        let blob = self.open_committed(digest)?;
        if blob.len <= index::SMALL_BLOB {
            // Read once, checked against its digest, then served from memory ([`BlobStore::small`]).
            match blob.read_all() {
                Ok(plain) if digest.verify(&plain) => {
                    self.shared
                        .index
                        .keep_small(digest.hex(), Bytes::from(plain));
                }
                Ok(_) => {
                    let why = seal::Unfit::Integrity("the bytes do not match the digest".into());
                    self.shared.drop_file(digest.hex(), &why);
                    return None;
                }
                // A sealed chunk that failed was quarantined by its reader; anything else is
                // the disk's problem, and the streamed read below will report it.
                Err(_) => {}
            }
        }
        Some(blob)
    }

    /// A small committed blob (at most 64 KiB) from memory, marking it recently used: no file
    /// is touched. `None` when it is not in memory; [`BlobStore::lookup`] puts it there. The
    /// memory tier is bounded (32 MiB) and emptied whenever a key is revoked or encryption
    /// changes.
    pub fn small(&self, digest: &Digest) -> Option<Bytes> {
        self.shared.index.small(digest.hex())
    }

    fn open_committed(&self, digest: &Digest) -> Option<Blob> {
        let shared = &self.shared;
        let hex = digest.hex();
        let size = shared.index.get(hex)?;
        let blob = match open_blob(&shared.layout.blob_path(hex), size) {
            Ok(blob) => blob,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Gone behind our back: forget it; the next fill replaces it.
                tracing::warn!(digest = %digest, error = %e, "indexed blob unreadable; dropping from index");
                shared.index.invalidate(hex);
                return None;
            }
            Err(e) => {
                // Changed behind our back (truncated, grown): it must not stay at its path,
                // or the next fill would take it for one another process committed.
                shared.drop_file(hex, &seal::Unfit::Integrity(e.to_string()));
                return None;
            }
        };
        let keys = shared.keys();
        match seal::open_file(
            &blob.file,
            blob.len,
            digest,
            crate::crypt::Kind::Blob,
            keys.as_deref(),
        ) {
            Ok(seal::Opened::Plain) => Some(blob),
            Ok(seal::Opened::Sealed(key, geometry)) => {
                let weak = Arc::downgrade(&self.shared);
                let owned = hex.to_owned();
                let on_failure = move || {
                    if let Some(shared) = weak.upgrade() {
                        shared.drop_file(&owned, &seal::Unfit::Integrity("a chunk failed".into()));
                    }
                };
                Some(Blob {
                    file: blob.file,
                    len: geometry.plaintext_len,
                    sealed: Some(Arc::new(disk::SealedFile {
                        key: *key,
                        keys,
                        on_failure: Some(Box::new(on_failure)),
                        pieces: Some(shared.opened.clone()),
                    })),
                })
            }
            Err(unfit) => {
                shared.drop_file(hex, &unfit);
                None
            }
        }
    }

    /// Encryption at rest on (`Some`) or off (`None`), for files written and read from now on.
    /// A change starts a background sweep that deletes what no longer fits (plaintext files
    /// once it is on, sealed ones once it is off, files of unknown generations): they are
    /// fetched again, sealed or not, on their next pull. Lookups never serve such a file in
    /// the meantime.
    pub fn set_keys(&self, keys: Option<Arc<dyn Keys>>) {
        let changed = {
            let mut slot = self.shared.keys.write().unwrap_or_else(|e| e.into_inner());
            let changed = !same_keys(slot.as_ref(), keys.as_ref());
            *slot = keys;
            changed
        };
        if changed {
            self.sweep();
        }
    }

    /// Deletes, in the background, every committed blob that does not fit the current keys
    /// (see [`BlobStore::set_keys`]). Returns at once.
    pub fn sweep(&self) {
        // At once, before the files: nothing a revoked key opened is served from memory.
        self.shared.index.forget_small();
        self.shared.opened.forget();
        let store = self.clone();
        let run = move || {
            let swept = store.sweep_now();
            tracing::info!(swept, "cache swept for encryption at rest");
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// [`BlobStore::sweep`], blocking: returns how many files were deleted.
    pub fn sweep_now(&self) -> u64 {
        let shared = &self.shared;
        shared.index.forget_small();
        shared.opened.forget();
        let Ok(found) = shared.layout.scan() else {
            return 0;
        };
        let keys = shared.keys();
        let mut swept = 0;
        for (hex, len, _) in found {
            let Some(digest) = digest_of_hex(&hex) else {
                continue;
            };
            let Ok(file) = std::fs::File::open(shared.layout.blob_path(&hex)) else {
                continue;
            };
            let kind = crate::crypt::Kind::Blob;
            if let Err(unfit) = seal::open_file(&file, len, &digest, kind, keys.as_deref()) {
                if unfit != seal::Unfit::NotNow {
                    shared.drop_file(&hex, &unfit);
                    swept += 1;
                }
            }
        }
        swept
    }

    /// The integrity failure counter, to share with the manifest store.
    pub fn integrity_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.integrity_failures)
    }

    /// Single flight (invariant 4): joins the running fill of `digest`, or returns the committed
    /// blob as a finished fill, or starts a fill on a new tokio task that belongs to no client
    /// and pulls from `source`. Exactly one `source.open` sequence runs per concurrent set of
    /// callers. Blobs are verified with their digest's algorithm (SHA-256 or SHA-512). Never
    /// fails directly: problems (no temp file, no tokio runtime) come back as a fill already in
    /// `Failed`.
    pub fn fill_or_join(&self, digest: &Digest, source: Arc<dyn BlobSource>) -> Arc<Fill> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Fill::failed(digest, FillFailure::Storage("no tokio runtime".into()));
        };
        let shared = &self.shared;
        let hex = digest.hex();
        // Joining a running fill needs no disk look (below); only a new fill does.
        if let Some(fill) = shared.inflight().get(hex).cloned() {
            shared.counters.joined.inc();
            return fill;
        }
        let source = match shared.l2.get() {
            Some(l2) => Arc::new(l2::L2Source::new(
                Arc::clone(l2),
                digest,
                source,
                shared.keys(),
            )),
            None => source,
        };
        // A blob another process on this cache (the old one, during an upgrade) is filling, or
        // committed after this one indexed the directory: the fill re-verifies it from disk.
        // Looked at outside the map's lock (it reads `tmp/`); the map is checked again below.
        let source = match shared.layout.foreign_fill(hex) {
            Some(temp) => Arc::new(
                handover::AfterOtherProcess::new(
                    digest.clone(),
                    shared.layout.blob_path(hex),
                    temp,
                    shared.policy.stall_timeout,
                    source,
                )
                .with_keys(shared.keys()),
            ) as Arc<dyn BlobSource>,
            None if shared.layout.blob_path(hex).exists() => Arc::new(
                handover::AfterOtherProcess::committed(
                    digest.clone(),
                    shared.layout.blob_path(hex),
                    source,
                )
                .with_keys(shared.keys()),
            ),
            None => source,
        };
        let mut map = shared.inflight();
        if let Some(fill) = map.get(hex) {
            shared.counters.joined.inc();
            return Arc::clone(fill);
        }
        // Invariant 4: a fill indexes its blob BEFORE it leaves this map, and we look under the
        // map's lock, so a request racing a commit finds the blob here or joins above.
        if let Some(blob) = self.lookup(digest) {
            return Fill::committed(digest, blob);
        }
        if let Some(failure) = shared.still_busy(hex) {
            return Fill::failed(digest, failure);
        }
        let seal = match shared.keys() {
            None => None,
            Some(keys) => {
                match seal::new_file_key(keys.as_ref(), crate::crypt::Kind::Blob, digest) {
                    Ok(key) => Some(key),
                    Err(missing) => {
                        // Nothing is cached without a key: the gateway serves it uncached.
                        return Fill::failed(
                            digest,
                            FillFailure::Storage(format!("no encryption key ({missing:?})")),
                        );
                    }
                }
            }
        };
        let (file, temp) = match shared.layout.create_temp(hex) {
            Ok(created) => created,
            Err(e) => {
                tracing::error!(digest = %digest, error = %e, "cannot create temp file");
                return Fill::failed(digest, FillFailure::Storage(format!("temp file: {e}")));
            }
        };
        let id = shared.next_fill_id.fetch_add(1, Ordering::Relaxed);
        let (fill, task) = fill::new_fill(shared, id, digest, source, file, temp, seal);
        map.insert(hex.to_owned(), Arc::clone(&fill));
        drop(map);
        shared.counters.started.inc();
        runtime.spawn(task.run());
        fill
    }

    pub fn stats(&self) -> StoreStats {
        let shared = &self.shared;
        let (pinned_entries, pinned_bytes) = shared.index.pinned();
        StoreStats {
            entries: shared.index.entries(),
            bytes: shared.index.bytes(),
            pinned_entries,
            pinned_bytes,
            fills_in_flight: shared.inflight().len() as u64,
            evictions: shared.index.evictions(),
            fills_started: shared.counters.started.get(),
            fills_joined: shared.counters.joined.get(),
            fills_committed: shared.counters.committed.get(),
            fills_failed: shared.counters.failed.get(),
            fills_refused: shared.counters.refused.get(),
            fills_broken: shared.counters.broken.get(),
            fills_invalid: shared.counters.invalid.get(),
            fills_storage: shared.counters.storage.get(),
            integrity_failures: shared.integrity_failures.load(Ordering::Relaxed),
            resealed_evictions: shared.stale_evictions.get(),
            l2: shared.l2.get().map(|l2| l2.stats()),
        }
    }

    /// Puts `l2` behind the disk: every fill asks it first, and every blob fetched from the
    /// upstream is uploaded to it once verified. Set once, at start.
    pub fn set_l2(&self, l2: Arc<L2>) {
        let _ = self.shared.l2.set(l2);
    }

    /// The key hierarchy while encryption is on.
    pub(crate) fn keys(&self) -> Option<Arc<dyn Keys>> {
        self.shared.keys()
    }

    /// The object store behind the disk, when there is one.
    pub fn l2(&self) -> Option<&Arc<L2>> {
        self.shared.l2.get()
    }

    /// A new `cache.max_size` (a reload): shrinking evicts down to it now.
    pub fn set_max_size(&self, max_size: u64) {
        self.shared.index.resize(max_size);
    }

    /// A new `cache.fill_stall_timeout` (a reload), for fills that start from now on.
    pub fn set_stall_timeout(&self, timeout: Duration) {
        self.shared.stall_timeout_ms.store(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Keeps a cached blob from ever being evicted, within `cache.pinned_max_size`; kept across
    /// restarts (`<cache dir>/pins`).
    pub fn pin(&self, digest: &Digest) -> Result<(), PinError> {
        self.shared.index.pin(digest.hex())
    }

    /// Waits for a running fill of `digest` to end (committed and indexed, or failed). A
    /// reader has every byte once the blob is verified, a moment before the commit: a pin
    /// right after a read waits here first.
    pub async fn settled(&self, digest: &Digest) {
        let fill = self.shared.inflight().get(digest.hex()).cloned();
        if let Some(fill) = fill {
            let _ = fill.wait_done().await;
        }
    }

    /// Every pinned blob (sha256 only: the index holds no other).
    pub fn pinned_digests(&self) -> Vec<Digest> {
        self.shared
            .index
            .pinned_names()
            .into_iter()
            .filter_map(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
            .collect()
    }

    /// Lets a pinned blob be evicted again (it is not deleted).
    pub fn unpin(&self, digest: &Digest) {
        self.shared.index.unpin(digest.hex());
    }

    /// A new `cache.pinned_max_size`: what is pinned stays, new pins must fit.
    pub fn set_pinned_max_size(&self, max: u64) {
        self.shared.index.set_pinned_max(max);
    }

    /// Another process is taking this cache over (a binary upgrade): from now on this one
    /// never deletes a committed blob, which the new process may already have indexed.
    pub fn hand_over(&self) {
        self.shared.index.keep_files();
    }

    /// Applies moka's batched index maintenance (evictions) now. For tests and shutdown.
    pub fn run_pending_tasks(&self) {
        self.shared.index.run_pending_tasks();
    }
}

fn open_blob(path: &Path, size: u64) -> std::io::Result<Blob> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len != size {
        return Err(std::io::Error::other(format!(
            "file is {len} bytes, index says {size}"
        )));
    }
    Ok(Blob {
        file: Arc::new(file),
        len,
        sealed: None,
    })
}

/// Whether two key handles are the same service (or both off).
pub(crate) fn same_keys(a: Option<&Arc<dyn Keys>>, b: Option<&Arc<dyn Keys>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
        _ => false,
    }
}

/// The digest a blob file name (checked by the scan) stands for.
fn digest_of_hex(hex: &str) -> Option<Digest> {
    let algorithm = if hex.len() == 128 { "sha512" } else { "sha256" };
    format!("{algorithm}:{hex}").parse().ok()
}
