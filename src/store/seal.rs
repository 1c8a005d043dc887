//! Encryption at rest for the store's files: which key seals a new file, which key opens an old
//! one, and what happens to a file that does not open.
//!
//! Owns: the [`Keys`] seam between the store and the key hierarchy (`keys/`, which implements
//! it), the header check of a sealed file before it is served, and quarantine (a file that
//! failed is deleted and dropped from the index, so the next request refills it).
//! Must never: serve a sealed file whose header names another digest, kind or an unknown
//! generation, or leave a damaged file at its blob path (the upgrade hand-over would take a
//! file found there without an index entry for a committed one).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::crypt::{self, FileKey, Geometry, Header, Kind, SecretKey, HEADER_LEN};
use crate::oci::{Algorithm, Digest};

/// Why no key is at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMissing {
    /// The keyring never had this generation (a file from another keyring, or a lost one): the
    /// file is an integrity failure.
    Unknown,
    /// The operator's key was revoked: the file must go, and nothing new is cached.
    Revoked,
    /// The key service cannot be reached and the grace ran out, or the key is not unwrapped
    /// yet: the file stays, but is not served; nothing new is cached.
    Unavailable,
}

/// Generation keys, as the store needs them. Implemented by `keys::KeyService`.
pub trait Keys: Send + Sync + 'static {
    /// The generation new files are sealed with, and its key.
    fn sealing_key(&self) -> Result<(u32, Arc<SecretKey>), KeyMissing>;
    /// The key of generation `id`.
    fn opening_key(&self, id: u32) -> Result<Arc<SecretKey>, KeyMissing>;
    /// Generation `id`'s key as the operator's key service wrapped it, to travel with a sealed
    /// object to the other replicas (the shared object store); `None` when this keyring has no
    /// such generation. Opaque to the store.
    fn wrapped_key(&self, _id: u32) -> Option<Vec<u8>> {
        None
    }
    /// The key a [`wrapped_key`](Keys::wrapped_key) of any replica with the same operator's
    /// key stands for: from memory when known, else one call to the key service.
    fn unwrap_key(
        self: Arc<Self>,
        _wrapped: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'static, Result<Arc<SecretKey>, KeyMissing>> {
        Box::pin(async { Err(KeyMissing::Unknown) })
    }
}

/// The header's 32-byte digest field: a sha256 digest itself, the SHA-256 of the hex of any
/// other (sha512), so the field names the file's digest whatever its algorithm.
pub fn header_digest(digest: &Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    match digest.algorithm() {
        Algorithm::Sha256 if hex::decode_to_slice(digest.hex(), &mut out).is_ok() => out,
        _ => Sha256::digest(digest.hex().as_bytes()).into(),
    }
}

/// A new file key for a file of `digest`, under the current generation.
pub(crate) fn new_file_key(
    keys: &dyn Keys,
    kind: Kind,
    digest: &Digest,
) -> Result<FileKey, KeyMissing> {
    let (generation, key) = keys.sealing_key()?;
    let header = Header::new(kind, generation, header_digest(digest))
        .map_err(|_| KeyMissing::Unavailable)?;
    Ok(FileKey::derive(&key, &header))
}

/// What the first bytes of a stored file say.
#[derive(Debug)]
pub(crate) enum Opened {
    /// Not sealed: plaintext of `len` bytes.
    Plain,
    /// Sealed and its header fits: the key and the plaintext length.
    Sealed(Box<FileKey>, Geometry),
}

/// Why a stored file cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unfit {
    /// Damaged or foreign: quarantine it and count an integrity failure.
    Integrity(String),
    /// Sealed while encryption is off, plaintext while it is on, or of a revoked key: delete it
    /// (not a fault).
    Stale(&'static str),
    /// Its key is not at hand now: leave the file, serve it from the upstream.
    NotNow,
}

/// Reads the header of a stored file of `file_len` bytes and checks it against the digest,
/// the kind and the keyring. `keys` is `None` when encryption is off.
pub(crate) fn open_file(
    file: &File,
    file_len: u64,
    digest: &Digest,
    kind: Kind,
    keys: Option<&dyn Keys>,
) -> Result<Opened, Unfit> {
    let mut head = [0u8; HEADER_LEN];
    let n = read_prefix(file, &mut head);
    let sealed = crypt::is_sealed(&head[..n]);
    let Some(keys) = keys else {
        return match sealed {
            true => Err(Unfit::Stale("sealed file while encryption is off")),
            false => Ok(Opened::Plain),
        };
    };
    if !sealed {
        return Err(Unfit::Stale("plaintext file while encryption is on"));
    }
    let header = Header::parse(&head[..n]).map_err(|e| Unfit::Integrity(e.to_string()))?;
    if header.kind != kind {
        return Err(Unfit::Integrity("header of another kind of file".into()));
    }
    if header.digest != header_digest(digest) {
        return Err(Unfit::Integrity("header of another digest".into()));
    }
    let geometry = Geometry::of_file(file_len).map_err(|e| Unfit::Integrity(e.to_string()))?;
    let key = match keys.opening_key(header.generation) {
        Ok(key) => key,
        Err(KeyMissing::Unknown) => {
            return Err(Unfit::Integrity(format!(
                "generation {} is not in the keyring",
                header.generation
            )))
        }
        Err(KeyMissing::Revoked) => return Err(Unfit::Stale("key revoked")),
        Err(KeyMissing::Unavailable) => return Err(Unfit::NotNow),
    };
    Ok(Opened::Sealed(
        Box::new(FileKey::derive(&key, &header)),
        geometry,
    ))
}

/// As many of the first bytes as the file has, up to `buf.len()`.
fn read_prefix(file: &File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// Opens the sealed chunks `first..` in `buf` (bytes read from the file starting at chunk
/// `first`) in place and moves the plaintext of `range` (plaintext offsets) to the front of
/// `buf`; returns its length. `written` is the plaintext bytes on disk, `complete` whether they
/// are all of them.
pub(crate) fn open_span_in_place(
    key: &FileKey,
    buf: &mut [u8],
    first: u64,
    written: u64,
    complete: bool,
    range: std::ops::Range<u64>,
) -> Result<usize, crypt::FormatError> {
    let (from, to) = (range.start, range.end);
    let mut at = 0usize;
    let mut out = 0usize;
    let mut index = first;
    while Geometry::plaintext_start(index) < to {
        let start = Geometry::plaintext_start(index);
        let len = (written - start).min(crypt::CHUNK_SIZE as u64) as usize;
        let last = complete && start + len as u64 == written;
        let end = at + len + crypt::TAG_LEN;
        // Decrypted straight to where it belongs (`out <= at`): one pass over the bytes.
        let region = buf
            .get_mut(out..end)
            .ok_or(crypt::FormatError::Authentication(index))?;
        let plain_len = key.open_chunk_to_front(index, last, region, at - out)?;
        let lo = from.saturating_sub(start) as usize;
        let hi = ((to - start) as usize).min(plain_len);
        if lo > 0 {
            // Only the first chunk of a range that starts inside it.
            buf.copy_within(out + lo..out + hi, out);
        }
        out += hi - lo;
        at = end;
        index += 1;
    }
    Ok(out)
}

/// File bytes to read for plaintext `[from, to)` with `written` plaintext bytes on disk: the
/// offset of the first chunk touched, its index, and the length through the last one.
pub(crate) fn span(from: u64, to: u64, written: u64) -> (u64, u64, usize) {
    let first = Geometry::chunk_of(from);
    let last = Geometry::chunk_of(to.saturating_sub(1).max(from));
    let last_start = Geometry::plaintext_start(last);
    let last_len = (written.saturating_sub(last_start)).min(crypt::CHUNK_SIZE as u64);
    let begin = Geometry::file_offset(first);
    let end = Geometry::file_offset(last) + last_len + crypt::TAG_LEN as u64;
    (begin, first, (end - begin) as usize)
}
