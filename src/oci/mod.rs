//! The distribution-spec vocabulary every other module speaks: repository names, tags,
//! digests, API paths, media types and the OCI error table.
//!
//! Owns: the spec grammar. Invariant 2: names, tags and digests are checked here before they
//! touch a path, a URL or a log line, and cache paths come only from a [`Digest`]. Must stay
//! free of I/O, of Pingora and HTTP-library types, and of every other pullgate module: it is
//! pure functions over strings and bytes, tested without a server.

pub mod digest;
pub mod error;
pub mod media;
pub mod name;
pub mod request;

pub use digest::{Algorithm, Digest, DigestHasher};
pub use error::{echo, ErrorCode, OciError};
pub use media::{
    accept_set, accepts, has_wildcard, is_index, is_manifest_media_type, manifest_references,
    takes_every_modern_type, DEFAULT_MAX_MANIFEST_SIZE, MANIFEST_ACCEPT,
};
pub use name::{Reference, Repository, Tag};
pub use request::{parse_path, ApiRequest, Endpoint};
