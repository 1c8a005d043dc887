//! The sealed file format: content encrypted at rest, chunk by chunk, with random access.
//!
//! Owns: the byte layout of an encrypted cache file, the per-file key derivation and the
//! sealing and opening of chunks. Pure: no file I/O, no key policy (which generation key, when
//! to rotate: `keys/`), no paths (`store/`). Depends on nothing else in the crate.
//! Must never: hand out plaintext of a chunk that did not authenticate under the header it
//! was read with, or let a chunk authenticate at another position, under another header, or
//! with the wrong last-chunk flag.
//!
//! The construction is STREAM (Hoang, Reyhanitabar, Rogaway, Vizár, "Online
//! Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015) as age's payload uses
//! it, with AES-256-GCM from `ring` instead of ChaCha20-Poly1305:
//!
//! ```text
//! file   = header || chunk_0 || chunk_1 || ... || chunk_{n-1}
//! header = magic "\x89PGSEAL\n" (8) | version 1 (1) | cipher 1 = AES-256-GCM (1)
//!        | chunk size as log2, 16 = 64 KiB (1) | kind 1 = blob, 2 = manifest (1)
//!        | generation id, u32 big-endian (4) | salt (32) | SHA-256 digest of the plaintext (32)
//!                                                                           = 80 bytes
//! key    = HKDF-SHA256(ikm = generation key, salt = salt, info = "pullgate/seal/v1")
//! chunk_i = AES-256-GCM(key, nonce = i as 11 bytes big-endian || last flag (0 or 1),
//!                       aad = the 80 header bytes, 64 KiB of plaintext) -> ciphertext || tag (16)
//! ```
//!
//! Every chunk holds 64 KiB of plaintext except the last, which holds 1 to 64 KiB, or 0 when
//! the whole plaintext is empty (a file always has at least one chunk, so the header is always
//! authenticated). So the plaintext length follows from the file length, and:
//! - a flipped bit anywhere (header included) fails the chunk it lands in;
//! - chunks swapped or moved fail (the counter is in the nonce);
//! - a truncation fails: cut inside a chunk, the geometry is wrong or the shortened chunk fails;
//!   cut exactly at a chunk boundary, the new final chunk was sealed with flag 0 and fails when
//!   opened as the last;
//! - a header copied from another file fails (another salt, so another key; another digest);
//! - the wrong generation key fails every chunk.
//!
//! A reader decrypts only the chunks its byte range touches ([`Geometry`]); a writer seals a
//! chunk once 64 KiB are in and one more byte shows it is not the last ([`Sealer`]).

#[cfg(test)]
mod tests;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use zeroize::Zeroize;

/// First bytes of every sealed file. The high byte and the newline catch text-mode mangling,
/// and no blob stored in the clear by an older pullgate could be mistaken for a sealed one
/// unless it starts with these 8 bytes (then it fails authentication and is refilled).
pub const MAGIC: [u8; 8] = *b"\x89PGSEAL\n";
/// The format version written in every header.
pub const VERSION: u8 = 1;
/// Cipher id 1: AES-256-GCM.
pub const CIPHER_AES_256_GCM: u8 = 1;
/// Plaintext bytes per chunk (all but the last).
pub const CHUNK_SIZE: usize = 1 << CHUNK_LOG2;
const CHUNK_LOG2: u8 = 16;
/// AES-GCM's tag, after every chunk's ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes of a sealed chunk on disk (all but the last).
pub const SEALED_CHUNK: usize = CHUNK_SIZE + TAG_LEN;
pub const SALT_LEN: usize = 32;
pub const DIGEST_LEN: usize = 32;
pub const HEADER_LEN: usize = 8 + 4 + 4 + SALT_LEN + DIGEST_LEN;
/// Length of a generation key (and of a KEK for the `file` provider).
pub const KEY_LEN: usize = 32;
/// The HKDF `info` of a file key.
const FILE_KEY_INFO: &[u8] = b"pullgate/seal/v1";

/// What a sealed file holds; bound in the header so a manifest file can never be read as the
/// blob of the same digest (their plaintexts differ: a manifest file starts with its media type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob = 1,
    Manifest = 2,
}

/// Why sealed bytes could not be opened. Nothing here carries key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a sealed file (bad magic)")]
    BadMagic,
    #[error("sealed file format version {0} is not supported")]
    Version(u8),
    #[error("cipher id {0} is not supported")]
    Cipher(u8),
    #[error("chunk size 2^{0} is not supported")]
    ChunkSize(u8),
    #[error("content kind {0} is unknown")]
    Kind(u8),
    #[error("a sealed file of {0} bytes cannot hold whole chunks")]
    Length(u64),
    #[error("chunk {0} failed authentication")]
    Authentication(u64),
}

/// A 256-bit secret key (a generation key, or the `file` provider's KEK). Zeroed when dropped;
/// `Debug` never shows it.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SecretKey {
        SecretKey(bytes)
    }

    /// 32 bytes from the system's CSPRNG.
    pub fn random() -> Result<SecretKey, ring::error::Unspecified> {
        let mut bytes = [0u8; KEY_LEN];
        fill_random(&mut bytes)?;
        Ok(SecretKey(bytes))
    }

    /// The key bytes: for wrapping it, never for logging it.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A key as a key file holds it: exactly 32 raw bytes, or their base64 (standard alphabet,
/// padding optional) with surrounding whitespace. The problem never quotes the file's bytes.
pub fn parse_key_material(bytes: &[u8]) -> Result<SecretKey, &'static str> {
    use base64::Engine as _;
    if let Ok(raw) = <[u8; KEY_LEN]>::try_from(bytes) {
        return Ok(SecretKey(raw));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| "must hold 32 raw bytes or their base64")?
        .trim();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let mut decoded = engine
        .decode(text)
        .map_err(|_| "must hold 32 raw bytes or their base64")?;
    let key = <[u8; KEY_LEN]>::try_from(decoded.as_slice())
        .map_err(|_| "the base64 does not decode to 32 bytes");
    decoded.zeroize();
    key.map(SecretKey)
}

/// Fills `buf` from the system's CSPRNG (ring's `SystemRandom`).
pub fn fill_random(buf: &mut [u8]) -> Result<(), ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf)
}

/// The header of a sealed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The generation whose key the file key is derived from.
    pub generation: u32,
    pub salt: [u8; SALT_LEN],
    /// SHA-256 of the whole plaintext: the name the file is stored under.
    pub digest: [u8; DIGEST_LEN],
}

impl Header {
    /// A header with a fresh random salt.
    pub fn new(
        kind: Kind,
        generation: u32,
        digest: [u8; DIGEST_LEN],
    ) -> Result<Header, ring::error::Unspecified> {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt)?;
        Ok(Header {
            kind,
            generation,
            salt,
            digest,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8] = VERSION;
        out[9] = CIPHER_AES_256_GCM;
        out[10] = CHUNK_LOG2;
        out[11] = self.kind as u8;
        out[12..16].copy_from_slice(&self.generation.to_be_bytes());
        out[16..16 + SALT_LEN].copy_from_slice(&self.salt);
        out[16 + SALT_LEN..].copy_from_slice(&self.digest);
        out
    }

    /// Parses the first [`HEADER_LEN`] bytes. The header is authenticated only by opening a
    /// chunk with it; a parsed header is a claim, not a fact.
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        if bytes.len() < HEADER_LEN || !is_sealed(bytes) {
            return Err(FormatError::BadMagic);
        }
        if bytes[8] != VERSION {
            return Err(FormatError::Version(bytes[8]));
        }
        if bytes[9] != CIPHER_AES_256_GCM {
            return Err(FormatError::Cipher(bytes[9]));
        }
        if bytes[10] != CHUNK_LOG2 {
            return Err(FormatError::ChunkSize(bytes[10]));
        }
        let kind = match bytes[11] {
            1 => Kind::Blob,
            2 => Kind::Manifest,
            other => return Err(FormatError::Kind(other)),
        };
        let mut generation = [0u8; 4];
        generation.copy_from_slice(&bytes[12..16]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[16..16 + SALT_LEN]);
        let mut digest = [0u8; DIGEST_LEN];
        digest.copy_from_slice(&bytes[16 + SALT_LEN..HEADER_LEN]);
        Ok(Header {
            kind,
            generation: u32::from_be_bytes(generation),
            salt,
            digest,
        })
    }
}

/// Whether `prefix` (the first bytes of a file, at least 8) starts like a sealed file.
pub fn is_sealed(prefix: &[u8]) -> bool {
    prefix.len() >= MAGIC.len() && prefix[..MAGIC.len()] == MAGIC
}

/// Where chunks sit in a sealed file of a given plaintext length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub plaintext_len: u64,
}

impl Geometry {
    pub fn new(plaintext_len: u64) -> Geometry {
        Geometry { plaintext_len }
    }

    /// The geometry of a complete sealed file of `file_len` bytes, or why it cannot be one.
    pub fn of_file(file_len: u64) -> Result<Geometry, FormatError> {
        let bad = || FormatError::Length(file_len);
        let body = file_len.checked_sub(HEADER_LEN as u64).ok_or_else(bad)?;
        let full = body / SEALED_CHUNK as u64;
        let rest = body % SEALED_CHUNK as u64;
        let plaintext_len = match rest {
            // Only whole 64 KiB chunks: the last one is full (and there is at least one).
            0 if full > 0 => full * CHUNK_SIZE as u64,
            // The empty last chunk exists only in a file whose whole plaintext is empty.
            r if r == TAG_LEN as u64 && full == 0 => 0,
            r if r > TAG_LEN as u64 => full * CHUNK_SIZE as u64 + (r - TAG_LEN as u64),
            _ => return Err(bad()),
        };
        Ok(Geometry { plaintext_len })
    }

    /// Number of chunks: at least one.
    pub fn chunks(&self) -> u64 {
        self.plaintext_len.div_ceil(CHUNK_SIZE as u64).max(1)
    }

    /// Length of the sealed file.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + self.plaintext_len + self.chunks() * TAG_LEN as u64
    }

    /// The chunk holding plaintext byte `pos`.
    pub fn chunk_of(pos: u64) -> u64 {
        pos / CHUNK_SIZE as u64
    }

    /// Plaintext offset of chunk `index`.
    pub fn plaintext_start(index: u64) -> u64 {
        index * CHUNK_SIZE as u64
    }

    /// File offset of sealed chunk `index`.
    pub fn file_offset(index: u64) -> u64 {
        HEADER_LEN as u64 + index * SEALED_CHUNK as u64
    }

    /// Plaintext bytes in chunk `index` (which must exist).
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = Geometry::plaintext_start(index);
        let len = self
            .plaintext_len
            .saturating_sub(start)
            .min(CHUNK_SIZE as u64);
        len as usize
    }

    pub fn is_last(&self, index: u64) -> bool {
        index + 1 == self.chunks()
    }
}

/// The key of one sealed file, with its header (the associated data of every chunk).
#[derive(Clone)]
pub struct FileKey {
    key: LessSafeKey,
    aad: [u8; HEADER_LEN],
    header: Header,
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKey")
            .field("generation", &self.header.generation)
            .finish_non_exhaustive()
    }
}

/// HKDF output length for an AES-256-GCM key.
struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

impl FileKey {
    /// `HKDF-SHA256(generation key, header salt)`: a key no other file shares.
    pub fn derive(generation_key: &SecretKey, header: &Header) -> FileKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &header.salt).extract(generation_key.expose());
        let mut bytes = [0u8; KEY_LEN];
        // Infallible for a 32-byte output (at most 255 * 32 bytes may be asked for).
        prk.expand(&[FILE_KEY_INFO], KeyLen)
            .and_then(|okm| okm.fill(&mut bytes))
            .expect("HKDF-SHA256 yields 32 bytes");
        let key = UnboundKey::new(&AES_256_GCM, &bytes).expect("AES-256-GCM takes 32-byte keys");
        bytes.zeroize();
        FileKey {
            key: LessSafeKey::new(key),
            aad: header.encode(),
            header: header.clone(),
        }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header as written at the start of the file.
    pub fn header_bytes(&self) -> &[u8; HEADER_LEN] {
        &self.aad
    }

    /// Seals chunk `index` in place: `buf` holds its plaintext (at most [`CHUNK_SIZE`]) and
    /// gets the tag appended.
    pub fn seal_chunk(&self, index: u64, last: bool, buf: &mut Vec<u8>) {
        debug_assert!(buf.len() <= CHUNK_SIZE);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(index, last), Aad::from(&self.aad), buf)
            // ring fails only past GCM's per-message limit (~64 GiB), far above a chunk.
            .expect("AES-GCM seals a 64 KiB chunk");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Opens chunk `index` in place: `buf` holds its ciphertext and tag; returns the
    /// plaintext (the front of `buf`).
    pub fn open_chunk<'a>(
        &self,
        index: u64,
        last: bool,
        buf: &'a mut [u8],
    ) -> Result<&'a mut [u8], FormatError> {
        if buf.len() < TAG_LEN || buf.len() > SEALED_CHUNK {
            return Err(FormatError::Authentication(index));
        }
        self.key
            .open_in_place(nonce(index, last), Aad::from(&self.aad), buf)
            .map_err(|_| FormatError::Authentication(index))
    }

    /// Opens chunk `index` whose ciphertext and tag fill `buf` from `src` to its end, writing
    /// the plaintext to the front of `buf` in the same pass (so a reader compacting several
    /// chunks moves no byte twice); returns the plaintext's length.
    pub fn open_chunk_to_front(
        &self,
        index: u64,
        last: bool,
        buf: &mut [u8],
        src: usize,
    ) -> Result<usize, FormatError> {
        let sealed = buf.len().checked_sub(src);
        if !sealed.is_some_and(|n| (TAG_LEN..=SEALED_CHUNK).contains(&n)) {
            return Err(FormatError::Authentication(index));
        }
        self.key
            .open_within(nonce(index, last), Aad::from(&self.aad), buf, src..)
            .map(|plain| plain.len())
            .map_err(|_| FormatError::Authentication(index))
    }
}

/// 11-byte big-endian chunk counter, then the last-chunk flag.
fn nonce(index: u64, last: bool) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Seals a stream of plaintext chunk by chunk. A full chunk is sealed only once a byte beyond
/// it arrives (then it is not the last); [`Sealer::finish`] seals what is left as the last.
#[derive(Debug)]
pub struct Sealer {
    key: FileKey,
    /// Chunks sealed so far.
    sealed: u64,
    buf: Vec<u8>,
}

impl Sealer {
    pub fn new(key: FileKey) -> Sealer {
        Sealer {
            key,
            sealed: 0,
            buf: Vec::with_capacity(SEALED_CHUNK),
        }
    }

    pub fn header_bytes(&self) -> &[u8; HEADER_LEN] {
        self.key.header_bytes()
    }

    /// Plaintext bytes covered by the chunks sealed so far.
    pub fn sealed_plaintext(&self) -> u64 {
        self.sealed * CHUNK_SIZE as u64
    }

    /// Takes `data`; every chunk it completes (and that is followed by more data) goes to
    /// `out` as `(file offset, sealed bytes)`.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        mut out: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            if self.buf.len() == CHUNK_SIZE {
                self.seal(false, &mut out)?;
            }
            let take = (CHUNK_SIZE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seals the last chunk (possibly empty, for an empty plaintext) and hands it to `out`.
    /// Returns the total plaintext length.
    pub fn finish<E>(mut self, mut out: impl FnMut(u64, &[u8]) -> Result<(), E>) -> Result<u64, E> {
        let total = self.sealed_plaintext() + self.buf.len() as u64;
        self.seal(true, &mut out)?;
        Ok(total)
    }

    fn seal<E>(
        &mut self,
        last: bool,
        out: &mut impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let index = self.sealed;
        self.key.seal_chunk(index, last, &mut self.buf);
        let result = out(Geometry::file_offset(index), &self.buf);
        self.buf.clear();
        self.sealed += 1;
        result
    }
}

/// Opens a sealed file as it streams in, chunk by chunk (a sealed object read from the shared
/// object store): a chunk's plaintext comes out once all of it and its tag are in and it
/// authenticated, the last as the last; nothing past the last chunk is taken.
#[derive(Debug)]
pub struct Opener {
    key: FileKey,
    geometry: Geometry,
    /// The chunk being gathered.
    next: u64,
    buf: Vec<u8>,
}

impl Opener {
    /// For a sealed file of `geometry` whose header `key` was derived from; it takes the
    /// bytes after the header.
    pub fn new(key: FileKey, geometry: Geometry) -> Opener {
        Opener {
            key,
            geometry,
            next: 0,
            buf: Vec::with_capacity(SEALED_CHUNK),
        }
    }

    /// Takes the next sealed bytes; appends the plaintext of every chunk they complete to
    /// `out`. An error is final (a chunk that does not authenticate, or bytes past the end).
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), FormatError> {
        while !data.is_empty() {
            if self.done() {
                return Err(FormatError::Length(
                    self.geometry.file_len() + data.len() as u64,
                ));
            }
            let want = self.geometry.chunk_len(self.next) + TAG_LEN;
            let take = (want - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == want {
                let last = self.geometry.is_last(self.next);
                let plain = self.key.open_chunk(self.next, last, &mut self.buf)?;
                out.extend_from_slice(plain);
                self.buf.clear();
                self.next += 1;
            }
        }
        Ok(())
    }

    /// Every chunk arrived and authenticated.
    pub fn done(&self) -> bool {
        self.next == self.geometry.chunks()
    }
}

/// A whole plaintext sealed into one buffer (manifests; tests).
pub fn seal_all(key: &FileKey, plaintext: &[u8]) -> Vec<u8> {
    let geometry = Geometry::new(plaintext.len() as u64);
    let mut out = Vec::with_capacity(geometry.file_len() as usize);
    out.extend_from_slice(key.header_bytes());
    let mut sealer = Sealer::new(key.clone());
    let mut append = |_offset: u64, sealed: &[u8]| {
        out.extend_from_slice(sealed);
        Ok::<(), std::convert::Infallible>(())
    };
    let _ = sealer.push(plaintext, &mut append);
    let _ = sealer.finish(&mut append);
    out
}

/// Opens a whole sealed file held in memory with `key` (derived from the header in `sealed`).
/// Checks the header bytes are the key's and every chunk, the last as the last.
pub fn open_all(key: &FileKey, sealed: &[u8]) -> Result<Vec<u8>, FormatError> {
    if sealed.len() < HEADER_LEN || sealed[..HEADER_LEN] != key.aad {
        return Err(FormatError::Authentication(0));
    }
    let geometry = Geometry::of_file(sealed.len() as u64)?;
    let mut out = Vec::with_capacity(geometry.plaintext_len as usize);
    let mut buf = Vec::with_capacity(SEALED_CHUNK);
    for index in 0..geometry.chunks() {
        let start = Geometry::file_offset(index) as usize;
        let end = start + geometry.chunk_len(index) + TAG_LEN;
        buf.clear();
        buf.extend_from_slice(&sealed[start..end]);
        let plain = key.open_chunk(index, geometry.is_last(index), &mut buf)?;
        out.extend_from_slice(plain);
    }
    Ok(out)
}
