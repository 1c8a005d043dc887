//! The on-disk layout and every file operation of the store.
//!
//! Owns: `blobs/sha256/<2 hex>/<hex>`, `blobs/sha512/<2 hex>/<hex>` and `tmp/<hex>.<unique>`
//! under the cache directory;
//! creating, syncing, renaming and deleting those files; the start-up scan; and THE read path
//! ([`ChunkReader`]), the one place a transform such as encryption at rest would sit.
//! Must never: build a path from anything but a verified [`Digest`] hex or a name it checked
//! itself (invariant 2), make a file visible under `blobs/` before the fill verified it
//! (invariant 3), or hold more than two chunks of a reader in memory (the one being sent and,
//! for a sealed blob, the next one being opened; invariant 7).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};

use super::seal::{self, Keys};
use crate::crypt::FileKey;

/// Largest chunk a reader hands out (invariant 7: memory per reader is bounded by this).
pub const MAX_CHUNK: usize = 1 << 20;
/// Reads at least this large go to the blocking pool; smaller ones are done inline.
const BLOCKING_READ_MIN: usize = 64 << 10;
const SHA256_HEX_LEN: usize = 64;
const SHA512_HEX_LEN: usize = 128;

/// Paths under the cache directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// `<dir>/blobs/sha256`
    blobs: PathBuf,
    /// `<dir>/blobs/sha512`
    blobs_sha512: PathBuf,
    /// `<dir>/tmp`
    tmp: PathBuf,
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Layout {
        Layout {
            blobs: dir.join("blobs").join("sha256"),
            blobs_sha512: dir.join("blobs").join("sha512"),
            tmp: dir.join("tmp"),
        }
    }

    pub(crate) fn create_dirs(&self) -> io::Result<()> {
        fs::create_dir_all(&self.blobs)?;
        fs::create_dir_all(&self.blobs_sha512)?;
        fs::create_dir_all(&self.tmp)
    }

    /// Where a committed blob lives. `hex` comes from a `Digest` or from [`is_blob_hex`]
    /// (invariant 2), so it holds only `[0-9a-f]` and cannot escape the directory; its length
    /// names the algorithm (64: sha256, 128: sha512), so the index can key blobs by hex alone.
    pub(crate) fn blob_path(&self, hex: &str) -> PathBuf {
        self.shard_dir(hex).join(hex)
    }

    fn shard_dir(&self, hex: &str) -> PathBuf {
        let blobs = if hex.len() == SHA512_HEX_LEN {
            &self.blobs_sha512
        } else {
            &self.blobs
        };
        blobs.join(hex.get(..2).unwrap_or("00"))
    }

    /// Bytes the file system of the cache can still take (for an unprivileged writer), or `None`
    /// when it cannot tell.
    pub(crate) fn available(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.tmp).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Creates a new, empty temp file for a fill of `hex`; the name is unique per process run.
    pub(crate) fn create_temp(&self, hex: &str) -> io::Result<(File, PathBuf)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{hex}.{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Deletes every leftover temp file (fills cut by a crash or a restart), except those of
    /// another living process (a binary upgrade shares the cache with the old process while
    /// its fills finish). Returns how many were deleted.
    pub(crate) fn clear_tmp(&self) -> io::Result<u64> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let path = entry.path();
            if temp_owner(&entry.file_name().to_string_lossy()).is_some_and(is_other_live_process) {
                continue;
            }
            let result = if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove temp file")
                }
            }
        }
        Ok(removed)
    }

    /// A temp file of a fill of `hex` run by another living process, if there is one.
    pub(crate) fn foreign_fill(&self, hex: &str) -> Option<PathBuf> {
        let prefix = format!("{hex}.");
        fs::read_dir(&self.tmp).ok()?.flatten().find_map(|entry| {
            let name = entry.file_name();
            let name = name.to_str()?;
            let owner = temp_owner(name.strip_prefix(&prefix).map(|_| name)?)?;
            is_other_live_process(owner).then(|| entry.path())
        })
    }

    /// Every committed blob as `(hex, size, mtime)`. Names that are not a digest's hex of the
    /// directory's algorithm in the right shard are logged and skipped, never indexed
    /// (invariant 2).
    pub(crate) fn scan(&self) -> io::Result<Vec<(String, u64, SystemTime)>> {
        let mut found = Vec::new();
        for (blobs, hex_len) in [
            (&self.blobs, SHA256_HEX_LEN),
            (&self.blobs_sha512, SHA512_HEX_LEN),
        ] {
            let entries = match fs::read_dir(blobs) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for shard in entries {
                let shard = shard?;
                let name = shard.file_name();
                let shard_name = name.to_str().unwrap_or("");
                if !shard.file_type()?.is_dir()
                    || shard_name.len() != 2
                    || !is_lower_hex(shard_name)
                {
                    tracing::warn!(path = %shard.path().display(), "ignoring unexpected entry in blobs/");
                    continue;
                }
                scan_shard(&shard.path(), shard_name, hex_len, &mut found)?;
            }
        }
        Ok(found)
    }

    /// Verified temp file -> `blobs/<algorithm>/ab/<hex>`, durably: fsync the file, rename, fsync
    /// the directory. Invariant 3: the caller has already checked length and SHA-256.
    pub(crate) fn commit(&self, file: &File, temp: &Path, hex: &str) -> io::Result<PathBuf> {
        file.sync_all()?;
        let shard = self.shard_dir(hex);
        fs::create_dir_all(&shard)?;
        let dest = shard.join(hex);
        fs::rename(temp, &dest)?;
        File::open(&shard)?.sync_all()?;
        Ok(dest)
    }
}

fn scan_shard(
    shard: &Path,
    prefix: &str,
    hex_len: usize,
    found: &mut Vec<(String, u64, SystemTime)>,
) -> io::Result<()> {
    for entry in fs::read_dir(shard)? {
        let entry = entry?;
        let name = entry.file_name();
        let hex = name.to_str().unwrap_or("");
        let meta = entry.metadata()?;
        if !meta.is_file() || !is_blob_hex(hex, hex_len) || !hex.starts_with(prefix) {
            tracing::warn!(path = %entry.path().display(), "ignoring file that is not a blob");
            continue;
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        found.push((hex.to_owned(), meta.len(), mtime));
    }
    Ok(())
}

/// The process id in a temp file name (`<hex>.<pid>-<n>`, see [`Layout::create_temp`]).
fn temp_owner(name: &str) -> Option<u32> {
    let (_, rest) = name.split_once('.')?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Another running pullgate (its command name), not this process: a reused pid that belongs
/// to something else does not keep a dead fill's temp file.
fn is_other_live_process(pid: u32) -> bool {
    pid != std::process::id()
        && fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.starts_with("pullgate"))
}

/// `len` lowercase hex characters (64 under sha256/, 128 under sha512/): the only file names
/// indexed as blobs.
pub(crate) fn is_blob_hex(s: &str, len: usize) -> bool {
    s.len() == len && is_lower_hex(s)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Positional, chunked reads of `[pos, end)` from a file that may still be growing.
///
/// One reusable buffer of at most [`MAX_CHUNK`] (invariant 7). Positional reads (`read_at`)
/// need no shared cursor, so any number of readers share one fd, and a temp file keeps being
/// readable after it is renamed into `blobs/` (same inode). For a sealed file positions are
/// plaintext offsets: each read fetches the sealed chunks it touches in one `pread` and opens
/// them (only those: a Range decrypts nothing outside it).
#[derive(Debug)]
pub(crate) struct ChunkReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
    buf: BytesMut,
    /// The second buffer of a sealed blob's read-ahead ([`BlobReader`]).
    spare: BytesMut,
    sealed: Option<Arc<SealedFile>>,
    /// Counts this reader among a committed sealed file's readers.
    reading: Option<Reading>,
}

/// How to open a sealed file, and what to do when a chunk does not authenticate.
pub(crate) struct SealedFile {
    pub(crate) key: FileKey,
    /// Asked before every read: a revoked generation aborts open streams at the next chunk.
    pub(crate) keys: Option<Arc<dyn Keys>>,
    /// Called once when a chunk fails (quarantine and count); `None` for a fill's temp file.
    pub(crate) on_failure: Option<Box<dyn Fn() + Send + Sync>>,
    /// Where the readers of a committed blob share its opened pieces; `None` for a temp file.
    pub(crate) pieces: Option<OpenedPieces>,
}

/// Opened (decrypted) [`MAX_CHUNK`] pieces of committed sealed blobs, shared by the readers
/// that stream one blob at about the same time (a burst of pulls of one layer): a piece is
/// opened once for all of them, not once per reader, and a reader that asks while another
/// opens it waits for that one. Only whole pieces at piece-aligned offsets, so a hit is the
/// same bytes the reader would have opened itself. Bounded by count and by age, emptied when
/// a key is revoked (the store's sweep), and a piece is handed out only while its generation
/// key is still there. A lone reader opens into its own two buffers: pieces are shared only
/// while a file has more than one reader.
#[derive(Clone)]
pub(crate) struct OpenedPieces {
    pieces: moka::sync::Cache<PieceKey, Arc<tokio::sync::OnceCell<Bytes>>>,
    readers: Arc<std::sync::Mutex<std::collections::HashMap<Salt, usize>>>,
}

/// A sealed file's salt: unique to the file.
type Salt = [u8; crate::crypt::SALT_LEN];
/// A file and a piece's index in it.
type PieceKey = (Salt, u64);

/// One reader of a sealed committed file, counted while it lives.
#[derive(Debug)]
struct Reading {
    pieces: OpenedPieces,
    salt: Salt,
}

impl Reading {
    fn new(pieces: &OpenedPieces, salt: Salt) -> Reading {
        *pieces.readers().entry(salt).or_default() += 1;
        Reading {
            pieces: pieces.clone(),
            salt,
        }
    }

    /// Whether another reader reads the same file now.
    fn shared(&self) -> bool {
        self.pieces
            .readers()
            .get(&self.salt)
            .is_some_and(|n| *n > 1)
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        let mut readers = self.pieces.readers();
        if let Some(n) = readers.get_mut(&self.salt) {
            *n -= 1;
            if *n == 0 {
                readers.remove(&self.salt);
            }
        }
    }
}

/// Opened pieces kept at most. Readers of one burst move in step (a reader that asks for a
/// piece being opened waits for it), so a few pieces serve them all.
const OPENED_PIECES: u64 = 4;
/// How long an opened piece is kept: readers of one burst are well within it.
const OPENED_PIECE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl OpenedPieces {
    pub(crate) fn new() -> OpenedPieces {
        OpenedPieces {
            pieces: moka::sync::Cache::builder()
                // Each piece is read a burst of times, then never again: least recently used
                // goes first (the default admission would keep the old, popular pieces).
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .max_capacity(OPENED_PIECES)
                .time_to_live(OPENED_PIECE_TTL)
                .build(),
            readers: Default::default(),
        }
    }

    /// Forgets every opened piece (a key was revoked, or encryption changed).
    pub(crate) fn forget(&self) {
        self.pieces.invalidate_all();
        self.pieces.run_pending_tasks();
    }

    /// How many pieces are kept now.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> u64 {
        self.pieces.run_pending_tasks();
        self.pieces.entry_count()
    }

    /// The piece when another reader opened it already.
    fn get(&self, key: &PieceKey) -> Option<Bytes> {
        self.pieces.get(key)?.get().cloned()
    }

    fn readers(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Salt, usize>> {
        self.readers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for OpenedPieces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedPieces")
            .field("pieces", &self.pieces.entry_count())
            .finish()
    }
}

impl std::fmt::Debug for SealedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedFile")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// What of a (growing) file is on disk: its plaintext bytes, and whether they are all of it
/// (then its last chunk was sealed as the last).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent {
    pub(crate) written: u64,
    pub(crate) complete: bool,
}

impl ChunkReader {
    pub(crate) fn new(
        file: Arc<File>,
        start: u64,
        end: u64,
        sealed: Option<Arc<SealedFile>>,
    ) -> ChunkReader {
        ChunkReader {
            file,
            pos: start,
            end: end.max(start),
            buf: BytesMut::new(),
            spare: BytesMut::new(),
            reading: sealed
                .as_ref()
                .and_then(|f| Some(Reading::new(f.pieces.as_ref()?, f.key.header().salt))),
            sealed,
        }
    }

    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    pub(crate) fn is_done(&self) -> bool {
        self.pos >= self.end
    }

    /// Moves past `n` bytes the caller got elsewhere (a fill's live chunks).
    pub(crate) fn skip(&mut self, n: u64) {
        self.pos = (self.pos + n).min(self.end);
    }

    /// For a sealed, complete file: starts reading and opening the next chunk on a blocking
    /// thread and moves past it; `None` when there is nothing (or too little) left, or the file
    /// is plaintext (the page cache makes its reads cheap enough).
    fn read_ahead(&mut self, extent: Extent) -> Option<Ahead> {
        let sealed = Arc::clone(self.sealed.as_ref()?);
        let len = usize::try_from(extent.written.min(self.end).saturating_sub(self.pos))
            .unwrap_or(MAX_CHUNK)
            .min(MAX_CHUNK);
        if !extent.complete || len < BLOCKING_READ_MIN {
            return None;
        }
        if self.opened_piece(len, extent).is_some() {
            // Another reader opened it: the next read takes it, nothing to overlap.
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let opening = self.opening(sealed, len, extent);
        let shared = self.shared_piece(opening.from, opening.to, extent);
        self.pos = opening.to;
        let buf = std::mem::take(&mut self.spare);
        Some(match shared {
            // Started here and now: the blocking thread opens while this one sends.
            None => opening.start(buf),
            shared => runtime.spawn(opening.shared_or_own(shared, buf)),
        })
    }

    /// The next `len` plaintext bytes of this sealed file.
    fn opening(&self, sealed: Arc<SealedFile>, len: usize, extent: Extent) -> Opening {
        Opening {
            file: Arc::clone(&self.file),
            sealed,
            from: self.pos,
            to: self.pos + len as u64,
            extent,
        }
    }

    /// Where plaintext `[from, to)` is shared with the other readers of this file: when it is
    /// a whole piece of a complete, committed sealed file that others read now.
    fn shared_piece(&self, from: u64, to: u64, extent: Extent) -> Option<(OpenedPieces, PieceKey)> {
        let reading = self.reading.as_ref()?;
        let whole = to - from == MAX_CHUNK as u64 || to == extent.written;
        (extent.complete && from % MAX_CHUNK as u64 == 0 && whole && reading.shared()).then(|| {
            let key = (reading.salt, from / MAX_CHUNK as u64);
            (reading.pieces.clone(), key)
        })
    }

    /// The piece at the reader's position when another reader opened it already.
    fn opened_piece(&self, len: usize, extent: Extent) -> Option<Bytes> {
        let (pieces, key) = self.shared_piece(self.pos, self.pos + len as u64, extent)?;
        pieces.get(&key)
    }

    /// A sealed file's generation key is still there (not revoked).
    fn check_key(&self) -> io::Result<()> {
        let Some(sealed) = &self.sealed else {
            return Ok(());
        };
        match &sealed.keys {
            Some(keys) if keys.opening_key(sealed.key.header().generation).is_err() => {
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the encryption key of this file is no longer available",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Reads the next chunk of `[pos, min(available, end))`, at most [`MAX_CHUNK`] bytes.
    /// The caller guarantees those bytes were written (`extent` says how far the file goes).
    /// A read that comes back empty is an `UnexpectedEof` error, never a silent end
    /// (invariant 3); a sealed chunk that does not authenticate is an `InvalidData` error.
    pub(crate) async fn read(&mut self, available: u64, extent: Extent) -> io::Result<Bytes> {
        let want = available.min(self.end).saturating_sub(self.pos);
        let len = usize::try_from(want).unwrap_or(MAX_CHUNK).min(MAX_CHUNK);
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(sealed) = &self.sealed {
            let opening = self.opening(Arc::clone(sealed), len, extent);
            let to = opening.to;
            if let Some(piece) = self.opened_piece(len, extent) {
                self.check_key()?;
                self.pos = to;
                return Ok(piece);
            }
            let shared = self.shared_piece(opening.from, to, extent);
            let buf = std::mem::take(&mut self.buf);
            let (returned, piece) = opening.shared_or_own(shared, buf).await;
            self.buf = returned;
            let piece = piece?;
            // Perhaps opened by another reader before a revocation: never handed out after one.
            self.check_key()?;
            self.pos = to;
            return Ok(piece);
        }
        // Reclaims the previous chunk's allocation when the consumer has dropped it.
        self.buf.reserve(len);
        self.buf.resize(len, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let n = if len >= BLOCKING_READ_MIN {
            let file = Arc::clone(&self.file);
            let pos = self.pos;
            let (returned, n) = tokio::task::spawn_blocking(move || {
                let n = read_full_at(&file, &mut buf, pos);
                (buf, n)
            })
            .await
            .map_err(io::Error::other)?;
            buf = returned;
            n?
        } else {
            read_full_at(&self.file, &mut buf, self.pos)?
        };
        buf.truncate(n);
        let chunk = buf.split().freeze();
        self.buf = buf;
        self.pos += n as u64;
        Ok(chunk)
    }
}

/// Plaintext `[from, to)` of a sealed file with `extent` on disk, to be opened.
struct Opening {
    file: Arc<File>,
    sealed: Arc<SealedFile>,
    from: u64,
    to: u64,
    extent: Extent,
}

impl Opening {
    /// The plaintext, and `buf` back for reuse. A `shared` piece is opened once for every
    /// reader that asks while it is kept ([`OpenedPieces`]): the others wait for it without a
    /// buffer of their own.
    async fn shared_or_own(
        self,
        shared: Option<(OpenedPieces, PieceKey)>,
        buf: BytesMut,
    ) -> (BytesMut, io::Result<Bytes>) {
        let Some((pieces, key)) = shared else {
            return self.run(buf).await;
        };
        let cell = pieces.pieces.get_with(key, Default::default);
        // The cache applies its bound lazily (after dozens of writes): here, at once, or it
        // would hold most of a blob's pieces in memory.
        pieces.pieces.run_pending_tasks();
        let mut slot = Some(buf);
        let back = &mut slot;
        let piece = cell
            .get_or_try_init(move || async move {
                let (returned, piece) = self.run(back.take().unwrap_or_default()).await;
                *back = Some(returned);
                piece
            })
            .await
            .cloned();
        (slot.unwrap_or_default(), piece)
    }

    /// Opens in `buf`, on a blocking thread when large.
    async fn run(self, buf: BytesMut) -> (BytesMut, io::Result<Bytes>) {
        if self.to - self.from >= BLOCKING_READ_MIN as u64 {
            return self
                .start(buf)
                .await
                .unwrap_or_else(|e| (BytesMut::new(), Err(io::Error::other(e))));
        }
        let buf = self.sized(buf);
        self.open_in(buf)
    }

    /// Starts opening in `buf` on a blocking thread.
    fn start(self, buf: BytesMut) -> Ahead {
        let buf = self.sized(buf);
        tokio::task::spawn_blocking(move || self.open_in(buf))
    }

    /// `buf` sized for the sealed chunks the plaintext touches. Done on the async worker, not
    /// on the blocking thread: memory freed on another thread than the one that allocated it
    /// is what makes RSS grow under many readers.
    fn sized(&self, mut buf: BytesMut) -> BytesMut {
        let raw_len = seal::span(self.from, self.to, self.extent.written).2;
        buf.reserve(raw_len);
        buf.resize(raw_len, 0);
        buf
    }

    /// One buffer, reused like the plaintext path's: the sealed chunks are read into it,
    /// opened in place and the plaintext moved to its front; the plaintext is split off, the
    /// rest of `buf` goes back for reuse.
    fn open_in(&self, mut buf: BytesMut) -> (BytesMut, io::Result<Bytes>) {
        let (file, sealed) = (&self.file, &self.sealed);
        let piece = open_sealed(file, sealed, &mut buf, self.from, self.to, self.extent).map(|n| {
            buf.truncate(n);
            buf.split().freeze()
        });
        (buf, piece)
    }
}

/// Plaintext `[from, to)` of a sealed file into the front of `buf` (sized for the sealed chunks
/// it touches): one read, each chunk opened in place. Returns the plaintext length.
fn open_sealed(
    file: &File,
    sealed: &SealedFile,
    buf: &mut [u8],
    from: u64,
    to: u64,
    extent: Extent,
) -> io::Result<usize> {
    if let Some(keys) = &sealed.keys {
        if keys.opening_key(sealed.key.header().generation).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the encryption key of this file is no longer available",
            ));
        }
    }
    let (offset, first, _) = seal::span(from, to, extent.written);
    let result = match file.read_exact_at(buf, offset) {
        Ok(()) => seal::open_span_in_place(
            &sealed.key,
            buf,
            first,
            extent.written,
            extent.complete,
            from..to,
        )
        .map_err(|e| e.to_string()),
        // A sealed file shorter than its chunks: truncated behind our back.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(e.to_string()),
        Err(e) => return Err(e),
    };
    match result {
        Ok(n) => Ok(n),
        Err(why) => {
            if let Some(on_failure) = &sealed.on_failure {
                on_failure();
            }
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sealed file failed its integrity check: {why}"),
            ))
        }
    }
}

/// Fills `buf` from `offset`; an early end of file is an error.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    file.read_exact_at(buf, offset)?;
    Ok(buf.len())
}

/// A committed, verified blob: an open file and its (plaintext) length.
///
/// The file stays readable even if the blob is evicted meanwhile (unlink removes only the name).
#[derive(Debug, Clone)]
pub struct Blob {
    pub file: Arc<File>,
    pub len: u64,
    /// How to open it when it is sealed.
    pub(crate) sealed: Option<Arc<SealedFile>>,
}

impl Blob {
    /// The whole plaintext, read (and, when sealed, opened) in one go: for small blobs only.
    pub(crate) fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.len).map_err(io::Error::other)?;
        match &self.sealed {
            Some(sealed) => {
                let extent = Extent {
                    written: self.len,
                    complete: true,
                };
                let (_, _, sealed_len) = seal::span(0, self.len, self.len);
                let mut buf = vec![0; sealed_len];
                let n = open_sealed(&self.file, sealed, &mut buf, 0, self.len, extent)?;
                buf.truncate(n);
                Ok(buf)
            }
            None => {
                let mut plain = vec![0; len];
                self.file.read_exact_at(&mut plain, 0)?;
                Ok(plain)
            }
        }
    }

    /// Streams `[start, end)` (end exclusive). A range reaching past `len` ends in an error from
    /// `next_chunk`, never in a short body that looks complete: check ranges (416) before.
    pub fn reader(&self, start: u64, end: u64) -> BlobReader {
        BlobReader {
            inner: ChunkReader::new(Arc::clone(&self.file), start, end, self.sealed.clone()),
            len: self.len,
            ahead: None,
            may_read_ahead: None,
        }
    }
}

/// Chunks of a committed blob, at most 1 MiB each.
#[derive(Debug)]
pub struct BlobReader {
    inner: ChunkReader,
    len: u64,
    /// A sealed blob's next chunk, read and opened on a blocking thread while the caller sends
    /// the current one, so decryption overlaps the socket writes (two chunks in memory at most).
    ahead: Option<Ahead>,
    /// Held while this reader may read ahead (and keeps its second buffer).
    may_read_ahead: Option<tokio::sync::SemaphorePermit<'static>>,
}

/// A chunk being read and opened on a blocking thread: the buffer comes back with it.
type Ahead = tokio::task::JoinHandle<(BytesMut, io::Result<Bytes>)>;

/// Readers that may read ahead at once, process-wide: each holds a second buffer of about
/// 1 MiB for its life, so this bounds the extra memory however many clients stream (the others
/// read as plaintext readers do). A few readers gain the most: many already use both cores.
static READ_AHEADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

impl BlobReader {
    /// The next chunk; `Ok(None)` only after every byte of the range was returned.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let extent = Extent {
            written: self.len,
            complete: true,
        };
        let chunk = if let Some(ahead) = self.ahead.take() {
            let (buf, piece) = ahead.await.map_err(io::Error::other)?;
            // The two buffers take turns: the next read-ahead gets the one whose chunk the
            // caller has sent by now, so both allocations are reused.
            self.inner.spare = std::mem::replace(&mut self.inner.buf, buf);
            let piece = piece?;
            // Opened before a revocation, perhaps: never handed out after one.
            self.inner.check_key()?;
            piece
        } else {
            if self.inner.is_done() {
                return Ok(None);
            }
            if self.inner.pos() >= self.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "range extends past the end of the blob",
                ));
            }
            self.inner.read(self.len, extent).await?
        };
        if self.may_read_ahead.is_none() && self.inner.sealed.is_some() {
            self.may_read_ahead = READ_AHEADS.try_acquire().ok();
        }
        if self.may_read_ahead.is_some() {
            self.ahead = self.inner.read_ahead(extent);
        }
        Ok(Some(chunk))
    }
}
