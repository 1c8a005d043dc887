//! The size index: which committed blobs exist, how large they are, and which go first when the
//! cache is over budget.
//!
//! Owns: the `moka` cache of `hex -> size`, the byte and entry accounting, and deleting a blob
//! file when the index evicts it for size. Must never: delete a file for any other removal cause
//! (an explicit invalidation or a replacement leaves the file alone), or hold a lock while it
//! touches the disk for longer than one `unlink`.
//!
//! Pinned blobs (warm-up entries with `pin = true`) live outside the LRU, in a map of their own
//! with its own budget (`pinned_max`), so no eviction can reach them; the list is kept in
//! `<cache dir>/pins` so a restart's start-up eviction spares them too.
//!
//! Small blobs (at most [`SMALL_BLOB`] bytes) that were read once are also kept in memory, in
//! a second cache bounded by [`SMALL_BUDGET`] bytes: a hit on one then touches no file. An entry
//! leaves it whenever the blob leaves the index, for any cause.
//!
//! Policy: moka's plain LRU (`EvictionPolicy::lru()`), "least recently used first". TinyLFU's
//! admission filter was not chosen on purpose: it can reject a blob that was just fetched (a
//! newcomer has no frequency yet), which would delete a file clients are still being served from
//! and make the next pull fetch it again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::SystemTime;

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::{mem_hasher, MemCache};

use super::disk::Layout;

/// Weights are in KiB so a `u32` weight covers blobs up to 4 TiB.
const WEIGHT_UNIT: u64 = 1024;

/// Blobs up to this size are kept in memory once read (configs, small layers, signatures).
pub(crate) const SMALL_BLOB: u64 = 64 * 1024;
/// The memory all small blobs together may take (memory does not grow with blob size or count).
pub(crate) const SMALL_BUDGET: u64 = 32 * 1024 * 1024;

/// Counters shared between the index and its eviction listener.
#[derive(Debug, Default)]
struct Counters {
    entries: AtomicU64,
    bytes: AtomicU64,
    evictions: AtomicU64,
    /// Set while another process takes over the cache (a binary upgrade): evictions still
    /// leave the index but no longer delete files, which the new process may have indexed.
    keep_files: AtomicBool,
}

/// `hex -> size` of every committed sha256 blob, bounded by the store's `max_size`.
pub(crate) struct Index {
    /// Swapped whole by [`Index::resize`] (moka's capacity is fixed per cache).
    cache: RwLock<MemCache<String, u64>>,
    counters: Arc<Counters>,
    layout: Layout,
    pins: Mutex<Pins>,
    /// `hex -> bytes` of small indexed blobs; never holds one the index does not.
    small: MemCache<String, Bytes>,
}

/// Blobs that are never evicted: `hex -> size`, their bytes, their budget, and the file that
/// lists them.
struct Pins {
    blobs: HashMap<String, u64>,
    bytes: u64,
    max: u64,
    file: Option<PathBuf>,
}

/// Why a blob could not be pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinError {
    /// It is not in the cache (fill it first).
    NotCached,
    /// Pinning it would take the pinned bytes past `cache.pinned_max_size`.
    OverBudget { needed: u64, pinned: u64, max: u64 },
}

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinError::NotCached => f.write_str("the blob is not in the cache"),
            PinError::OverBudget {
                needed,
                pinned,
                max,
            } => write!(
                f,
                "pinning {needed} more bytes would exceed cache.pinned_max_size ({pinned} of {max} bytes pinned)"
            ),
        }
    }
}

impl Index {
    /// An empty index whose evictions delete files under `layout`.
    pub(crate) fn new(layout: Layout, max_size: u64) -> Index {
        let counters = Arc::new(Counters::default());
        let small = Cache::builder()
            .max_capacity(SMALL_BUDGET)
            .weigher(|_hex: &String, bytes: &Bytes| u32::try_from(bytes.len()).unwrap_or(u32::MAX))
            .build_with_hasher(mem_hasher());
        let cache = build_cache(&layout, &counters, &small, max_size);
        Index {
            cache: RwLock::new(cache),
            counters,
            small,
            layout,
            pins: Mutex::new(Pins {
                blobs: HashMap::new(),
                bytes: 0,
                max: 0,
                file: None,
            }),
        }
    }

    fn pins(&self) -> MutexGuard<'_, Pins> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the pin list from `file` (missing: none) before the start-up scan is indexed:
    /// [`Index::insert_scanned`] then keeps those blobs out of the LRU. Returns how many
    /// names it read.
    pub(crate) fn load_pins(&self, file: PathBuf, max: u64) -> usize {
        let listed: Vec<String> = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
            .collect();
        let mut pins = self.pins();
        pins.file = Some(file);
        pins.max = max;
        // Sizes are filled in by `insert_scanned`; a listed blob that is gone is dropped then.
        for hex in &listed {
            pins.blobs.insert(hex.clone(), u64::MAX);
        }
        listed.len()
    }

    /// A blob found by the start-up scan: pinned if the pin list names it (and the budget
    /// holds), else into the LRU.
    pub(crate) fn insert_scanned(&self, hex: String, size: u64) {
        {
            let mut pins = self.pins();
            let listed = pins.blobs.get(&hex) == Some(&u64::MAX);
            if listed && pins.bytes + size <= pins.max {
                pins.blobs.insert(hex, size);
                pins.bytes += size;
                self.counters.entries.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes.fetch_add(size, Ordering::Relaxed);
                return;
            }
            if listed {
                pins.blobs.remove(&hex);
            }
        }
        self.insert(hex, size);
    }

    /// After the start-up scan: listed pins whose blob is gone are forgotten (and the list
    /// rewritten without them).
    pub(crate) fn finish_scan(&self) {
        let mut pins = self.pins();
        let before = pins.blobs.len();
        pins.blobs.retain(|_, size| *size != u64::MAX);
        if pins.blobs.len() != before {
            write_pins(&pins);
        }
    }

    /// Keeps a cached blob out of every eviction until [`Index::unpin`].
    pub(crate) fn pin(&self, hex: &str) -> Result<(), PinError> {
        let mut pins = self.pins();
        if pins.blobs.contains_key(hex) {
            return Ok(());
        }
        let cache = self.cache();
        let size = cache.get(hex).ok_or(PinError::NotCached)?;
        if pins.bytes + size > pins.max {
            return Err(PinError::OverBudget {
                needed: size,
                pinned: pins.bytes,
                max: pins.max,
            });
        }
        // Out of the LRU (an explicit removal: the listener subtracts it and keeps the file),
        // then counted again as pinned.
        cache.invalidate(hex);
        self.counters.entries.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(size, Ordering::Relaxed);
        pins.blobs.insert(hex.to_owned(), size);
        pins.bytes += size;
        write_pins(&pins);
        Ok(())
    }

    /// Back into the LRU (where it may be evicted at once if the cache is full). Not deleted.
    pub(crate) fn unpin(&self, hex: &str) {
        let size = {
            let mut pins = self.pins();
            let Some(size) = pins.blobs.remove(hex) else {
                return;
            };
            pins.bytes -= size;
            write_pins(&pins);
            size
        };
        self.counters.entries.fetch_sub(1, Ordering::Relaxed);
        self.counters.bytes.fetch_sub(size, Ordering::Relaxed);
        self.commit(hex.to_owned(), size);
    }

    /// A new `cache.pinned_max_size`. What is pinned stays pinned; new pins must fit.
    pub(crate) fn set_pinned_max(&self, max: u64) {
        self.pins().max = max;
    }

    /// Pinned blobs and their bytes.
    pub(crate) fn pinned(&self) -> (u64, u64) {
        let pins = self.pins();
        (pins.blobs.len() as u64, pins.bytes)
    }

    /// The hex names of every pinned blob.
    pub(crate) fn pinned_names(&self) -> Vec<String> {
        self.pins().blobs.keys().cloned().collect()
    }

    fn cache(&self) -> RwLockReadGuard<'_, MemCache<String, u64>> {
        // Nothing panics while holding this lock; recover rather than panic if it did.
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A new size bound (`cache.max_size` changed on a reload). Entries move to a cache of the
    /// new capacity oldest file first, the order a restart would rebuild them in, so a
    /// smaller bound evicts (and deletes) the least recently written blobs now.
    pub(crate) fn resize(&self, max_size: u64) {
        let mut slot = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let mut entries: Vec<(SystemTime, String, u64)> = slot
            .iter()
            .map(|(hex, size)| {
                let mtime = std::fs::metadata(self.layout.blob_path(&hex))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (mtime, (*hex).clone(), size)
            })
            .collect();
        entries.sort();
        let resized = build_cache(&self.layout, &self.counters, &self.small, max_size);
        for (_, hex, size) in entries {
            // Moved, not new: the counters already include them (evictions subtract).
            resized.insert(hex, size);
        }
        resized.run_pending_tasks();
        // The old cache is dropped without notifications: no file is deleted for the move.
        *slot = resized;
    }

    /// From now on, evictions forget blobs but keep their files (see `Counters::keep_files`).
    pub(crate) fn keep_files(&self) {
        self.counters.keep_files.store(true, Ordering::SeqCst);
    }

    /// Records a committed blob. Call only after the file is renamed into place (invariant 3).
    pub(crate) fn insert(&self, hex: String, size: u64) {
        self.counters.entries.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(size, Ordering::Relaxed);
        // A replaced entry comes back through the listener (RemovalCause::Replaced), which
        // subtracts the old size: the counters stay exact.
        self.cache().insert(hex, size);
    }

    /// [`Index::insert`] for a fill's commit. moka batches evictions; applying them at every
    /// commit keeps the disk under `max_size` now rather than at some later cache operation.
    pub(crate) fn commit(&self, hex: String, size: u64) {
        let cache = self.cache();
        self.counters.entries.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(size, Ordering::Relaxed);
        cache.insert(hex, size);
        cache.run_pending_tasks();
    }

    /// The size of a committed blob, marking it recently used.
    pub(crate) fn get(&self, hex: &str) -> Option<u64> {
        if let Some(size) = self.cache().get(hex) {
            return Some(size);
        }
        self.pins().blobs.get(hex).copied()
    }

    /// The bytes of a small blob kept in memory, marking it recently used; `None` when it is
    /// not in memory or no longer indexed.
    pub(crate) fn small(&self, hex: &str) -> Option<Bytes> {
        let bytes = self.small.get(hex)?;
        self.get(hex)?;
        Some(bytes)
    }

    /// Keeps the verified bytes of an indexed small blob in memory.
    pub(crate) fn keep_small(&self, hex: &str, bytes: Bytes) {
        if bytes.len() as u64 <= SMALL_BLOB {
            self.small.insert(hex.to_owned(), bytes);
            // Evicted meanwhile: the listener may have run before the insert.
            if self.get(hex).is_none() {
                self.small.invalidate(hex);
            }
        }
    }

    /// Empties the memory tier (a key was revoked, or encryption changed).
    pub(crate) fn forget_small(&self) {
        self.small.invalidate_all();
    }

    /// Forgets an entry without deleting its file (e.g. the file vanished behind our back).
    pub(crate) fn invalidate(&self, hex: &str) {
        self.small.invalidate(hex);
        self.cache().invalidate(hex);
        let mut pins = self.pins();
        if let Some(size) = pins.blobs.remove(hex) {
            pins.bytes -= size;
            self.counters.entries.fetch_sub(1, Ordering::Relaxed);
            self.counters.bytes.fetch_sub(size, Ordering::Relaxed);
            write_pins(&pins);
        }
    }

    /// Applies pending evictions now (moka batches them); tests call it for determinism.
    pub(crate) fn run_pending_tasks(&self) {
        self.cache().run_pending_tasks();
    }

    pub(crate) fn entries(&self) -> u64 {
        self.counters.entries.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.counters.evictions.load(Ordering::Relaxed)
    }
}

/// Rewrites the pin list (temp file and rename). A failure is logged: the pins hold in memory,
/// and only a restart could then lose them.
fn write_pins(pins: &Pins) {
    let Some(file) = &pins.file else {
        return;
    };
    let mut text = String::new();
    let mut names: Vec<&String> = pins.blobs.keys().collect();
    names.sort();
    for hex in names {
        text.push_str(hex);
        text.push('\n');
    }
    let tmp = file.with_extension("tmp");
    let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        tracing::warn!(path = %file.display(), error = %e, "cannot write the pin list");
    }
}

/// A moka LRU bounded to `max_size` whose size evictions delete their files under `layout`.
fn build_cache(
    layout: &Layout,
    counters: &Arc<Counters>,
    small: &MemCache<String, Bytes>,
    max_size: u64,
) -> MemCache<String, u64> {
    let layout = layout.clone();
    let counters = Arc::clone(counters);
    let small = small.clone();
    Cache::builder()
        .eviction_policy(EvictionPolicy::lru())
        .max_capacity(max_size / WEIGHT_UNIT)
        .weigher(|_hex: &String, size: &u64| weight(*size))
        .eviction_listener(move |hex: Arc<String>, size: u64, cause| {
            // Whatever the cause (evicted, invalidated, replaced, pinned): not served from memory.
            small.invalidate(hex.as_str());
            on_removal(&layout, &counters, &hex, size, cause);
        })
        .build_with_hasher(mem_hasher())
}

/// KiB, rounded up, at least 1 (an empty blob still occupies an entry), at most `u32::MAX`.
fn weight(size: u64) -> u32 {
    let kib = size.div_ceil(WEIGHT_UNIT).max(1);
    u32::try_from(kib).unwrap_or(u32::MAX)
}

fn on_removal(layout: &Layout, counters: &Counters, hex: &str, size: u64, cause: RemovalCause) {
    counters.entries.fetch_sub(1, Ordering::Relaxed);
    counters.bytes.fetch_sub(size, Ordering::Relaxed);
    if cause != RemovalCause::Size {
        return;
    }
    counters.evictions.fetch_add(1, Ordering::Relaxed);
    if counters.keep_files.load(Ordering::SeqCst) {
        return;
    }
    // Readers holding the file open keep reading: unlink only removes the name.
    let path: PathBuf = layout.blob_path(hex);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::debug!(blob = hex, size, "evicted blob"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(blob = hex, error = %e, "could not delete evicted blob"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_is_kib_rounded_up_and_clamped() {
        assert_eq!(weight(0), 1);
        assert_eq!(weight(1), 1);
        assert_eq!(weight(1024), 1);
        assert_eq!(weight(1025), 2);
        assert_eq!(weight(5 << 30), 5 << 20);
        assert_eq!(weight(u64::MAX), u32::MAX);
    }
}
