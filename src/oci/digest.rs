//! `Digest`: a content address checked against the distribution-spec digest grammar.
//!
//! Owns: the digest grammar, the algorithms pullgate supports (sha256, sha512) and hashing bytes
//! to check them. A `Digest` is THE ONLY source of cache path components (invariant 2): its
//! algorithm name and hex are from a closed set of characters (`[a-z0-9]` and `[0-9a-f]`), so
//! they can never form `..`, `/` or any other path syntax. Must never: accept uppercase or
//! short hex, or hand out a `Digest` that did not go through [`Digest::parse`] or a hasher.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use super::error::{echo, ErrorCode, OciError};

/// Longest digest string looked at; longer input is refused before it is scanned.
const MAX_DIGEST_LEN: usize = 256;

/// A supported digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The registered name, as in `sha256:...`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding.
    pub const fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated digest, `<algorithm>:<lowercase hex>`.
///
/// Fields are private so that every `Digest` has passed the grammar (invariant 2).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    /// The whole `algorithm:hex` string; `hex()` is the part after the colon.
    value: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`.
    ///
    /// A malformed digest, and a well-formed one with an algorithm pullgate cannot verify
    /// (e.g. `blake3:...`), is `DIGEST_INVALID` (400).
    pub fn parse(s: &str) -> Result<Digest, OciError> {
        if s.len() > MAX_DIGEST_LEN {
            return Err(invalid(s));
        }
        let Some((name, encoded)) = s.split_once(':') else {
            return Err(invalid(s));
        };
        // distribution-spec "Digests": algorithm-component (separator component)* ":" encoded.
        if !is_algorithm_grammar(name) || !is_encoded_grammar(encoded) {
            return Err(invalid(s));
        }
        let Some(algorithm) = Algorithm::from_name(name) else {
            let message = format!(
                "unsupported digest algorithm {} (pullgate verifies sha256 and sha512)",
                echo(name)
            );
            return Err(OciError::new(ErrorCode::DigestInvalid, message));
        };
        if encoded.len() != algorithm.hex_len() || !is_lower_hex(encoded) {
            return Err(invalid(s));
        }
        Ok(Digest {
            algorithm,
            value: s.to_owned(),
        })
    }

    /// The digest of `bytes` under `algorithm`.
    pub fn compute(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part: safe as a file name (invariant 2).
    pub fn hex(&self) -> &str {
        &self.value[self.algorithm.as_str().len() + 1..]
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// True when `bytes` hash to this digest. For streams, use [`DigestHasher`].
    pub fn verify(&self, bytes: &[u8]) -> bool {
        Digest::compute(self.algorithm, bytes) == *self
    }

    /// A hasher for this digest's algorithm, to verify a body as it streams.
    pub fn hasher(&self) -> DigestHasher {
        DigestHasher::new(self.algorithm)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

impl FromStr for Digest {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Digest, OciError> {
        Digest::parse(s)
    }
}

/// Incremental hashing, so blobs are verified as they stream (invariants 3 and 7). Opaque, so
/// the hash crate stays an implementation detail.
#[derive(Clone)]
pub struct DigestHasher(HashState);

#[derive(Clone)]
enum HashState {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl DigestHasher {
    pub fn new(algorithm: Algorithm) -> DigestHasher {
        DigestHasher(match algorithm {
            Algorithm::Sha256 => HashState::Sha256(Sha256::new()),
            Algorithm::Sha512 => HashState::Sha512(Sha512::new()),
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.0 {
            HashState::Sha256(_) => Algorithm::Sha256,
            HashState::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            HashState::Sha256(h) => h.update(bytes),
            HashState::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything passed to `update`.
    pub fn finish(self) -> Digest {
        let algorithm = self.algorithm();
        let hex = match self.0 {
            HashState::Sha256(h) => to_hex(&h.finalize()),
            HashState::Sha512(h) => to_hex(&h.finalize()),
        };
        Digest {
            algorithm,
            value: format!("{}:{hex}", algorithm.as_str()),
        }
    }
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DigestHasher({})", self.algorithm())
    }
}

/// Lower-case hex of `bytes`. (`hex::encode` builds its string a `char` at a time, which
/// showed in the profile of warm tag requests, each of which names its tag by a hash.)
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

fn invalid(s: &str) -> OciError {
    OciError::new(
        ErrorCode::DigestInvalid,
        format!("invalid digest {}", echo(s)),
    )
}

/// `[a-z0-9]+([+._-][a-z0-9]+)*`
fn is_algorithm_grammar(name: &str) -> bool {
    name.split(['+', '.', '_', '-']).all(|c| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// `[a-zA-Z0-9=_-]+`
fn is_encoded_grammar(encoded: &str) -> bool {
    !encoded.is_empty()
        && encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn accepts_supported_digests() {
        let sha512 = "a".repeat(128);
        let cases = [
            (format!("sha256:{EMPTY_SHA256}"), Algorithm::Sha256),
            (format!("sha512:{sha512}"), Algorithm::Sha512),
        ];
        for (input, algorithm) in cases {
            let d = Digest::parse(&input).unwrap();
            assert_eq!(d.algorithm(), algorithm);
            assert_eq!(d.to_string(), input);
            assert_eq!(d.as_str(), input);
            assert_eq!(d.hex(), input.split_once(':').unwrap().1);
        }
    }

    #[test]
    fn hex_is_what_the_hex_crate_writes() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(to_hex(&bytes), hex::encode(&bytes));
        assert_eq!(to_hex(&[]), "");
    }

    #[test]
    fn rejects_malformed_digests() {
        let upper = EMPTY_SHA256.to_uppercase();
        let cases = [
            String::new(),
            "sha256".into(),
            "sha256:".into(),
            ":abc".into(),
            format!("sha256:{}", &EMPTY_SHA256[..63]),
            format!("sha256:{EMPTY_SHA256}0"),
            format!("sha256:{upper}"),
            format!("SHA256:{EMPTY_SHA256}"),
            format!("sha256:{}g", &EMPTY_SHA256[..63]),
            format!("sha256:../{}", &EMPTY_SHA256[..61]),
            format!("sha256:{EMPTY_SHA256}/x"),
            format!("sha512:{EMPTY_SHA256}"),
            format!("sha256:{EMPTY_SHA256}\n"),
            format!("sha256::{EMPTY_SHA256}"),
            format!("-sha256:{EMPTY_SHA256}"),
            format!("sha256:{}", "a".repeat(300)),
            "%73ha256:abc".into(),
        ];
        for input in cases {
            let err = Digest::parse(&input).unwrap_err();
            assert_eq!(err.code, ErrorCode::DigestInvalid, "{input:?}");
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn well_formed_unknown_algorithm_is_digest_invalid() {
        for input in [
            "blake3:abcd",
            "sha384:ab",
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
        ] {
            let err = Digest::parse(input).unwrap_err();
            assert_eq!(err.code, ErrorCode::DigestInvalid, "{input}");
            assert_eq!(err.status, 400);
            assert!(err.message.contains("sha512"), "{}", err.message);
        }
    }

    #[test]
    fn verify_and_hasher_agree() {
        let empty = Digest::parse(&format!("sha256:{EMPTY_SHA256}")).unwrap();
        assert!(empty.verify(b""));
        assert!(!empty.verify(b"x"));
        assert_eq!(Digest::compute(Algorithm::Sha256, b""), empty);

        let d = Digest::compute(Algorithm::Sha512, b"hello world");
        assert_eq!(d.hex().len(), 128);
        let mut h = d.hasher();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), d);
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
    }
}
