//! `Repository`, `Tag` and `Reference`: names checked against the distribution-spec grammar.
//!
//! Owns: the name and tag grammar (distribution-spec "Pulling manifests"). Invariant 2: a name
//! or tag reaches a URL, a path or a log line only as one of these types. Must never: accept a
//! name component outside `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, or echo more than a bounded,
//! escaped slice of rejected input (see `error::echo`).

use std::fmt;
use std::str::FromStr;

use super::digest::Digest;
use super::error::{echo, ErrorCode, OciError};

/// Longest repository name accepted (distribution-spec: clients limit host + name to 255).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag (distribution-spec: 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// A repository name such as `library/alpine`: `/`-joined components, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    /// Parses a repository name; `NAME_INVALID` (400) naming the (escaped, bounded) input.
    pub fn parse(s: &str) -> Result<Repository, OciError> {
        if s.len() > MAX_NAME_LEN {
            let message = format!(
                "invalid repository name {}: longer than {MAX_NAME_LEN} characters",
                echo(s)
            );
            return Err(OciError::new(ErrorCode::NameInvalid, message));
        }
        if !s.split('/').all(is_valid_component) {
            let message = format!("invalid repository name {}", echo(s));
            return Err(OciError::new(ErrorCode::NameInvalid, message));
        }
        Ok(Repository(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `/`-separated components, each non-empty.
    pub fn components(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }

    /// Docker Hub's convention: `alpine` becomes `library/alpine`; names with more than one
    /// component are returned unchanged. Fails (`NAME_INVALID`) only when the prefixed name
    /// would exceed [`MAX_NAME_LEN`].
    pub fn with_library_prefix(&self) -> Result<Repository, OciError> {
        if self.0.contains('/') {
            return Ok(self.clone());
        }
        Repository::parse(&format!("library/{}", self.0))
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Repository {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Repository, OciError> {
        Repository::parse(s)
    }
}

/// One name component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, scanned without a regex.
fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let mut i = 0;
    loop {
        // An alphanumeric run: required at the start and after every separator.
        let start = i;
        while i < b.len() && (b[i].is_ascii_lowercase() || b[i].is_ascii_digit()) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        i = match b[i] {
            b'.' => i + 1,
            b'_' if b.get(i + 1) == Some(&b'_') => i + 2,
            b'_' => i + 1,
            b'-' => i + b[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return false,
        };
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// Parses a tag; `TAG_INVALID` (400) naming the (escaped, bounded) input.
    pub fn parse(s: &str) -> Result<Tag, OciError> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok = b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > MAX_TAG_LEN {
            let message = format!("invalid tag {}", echo(s));
            return Err(OciError::new(ErrorCode::TagInvalid, message));
        }
        Ok(Tag(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Tag {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Tag, OciError> {
        Tag::parse(s)
    }
}

/// The `<reference>` of `/v2/<name>/manifests/<reference>`: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A reference containing `:` is a digest (tags cannot contain one); anything else a tag.
    pub fn parse(s: &str) -> Result<Reference, OciError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(t) => t.as_str(),
            Reference::Digest(d) => d.as_str(),
        }
    }

    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }

    pub fn tag(&self) -> Option<&Tag> {
        match self {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reference {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Reference, OciError> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        let long = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        let cases = [
            "a",
            "alpine",
            "library/alpine",
            "0",
            "a/b/c/d/e",
            "foo.bar",
            "foo_bar",
            "foo__bar",
            "foo-bar",
            "foo---bar",
            "a.b_c__d-e--f",
            "gcr.io/distroless/static",
            "manifests/blobs",
            &long,
        ];
        for name in cases {
            let repo = Repository::parse(name).unwrap();
            assert_eq!(repo.as_str(), name);
            assert_eq!(repo.to_string(), name);
        }
    }

    #[test]
    fn rejects_names_outside_the_grammar() {
        let too_long = "a".repeat(256);
        let cases = [
            "",
            "..",
            ".",
            "a/../b",
            "a/./b",
            "%2e%2e",
            "a%2fb",
            "a//b",
            "/a",
            "a/",
            "Alpine",
            "library/Alpine",
            "-leading",
            "trailing-",
            ".leading",
            "trailing.",
            "_leading",
            "a..b",
            "a___b",
            "a._b",
            "a\\b",
            "a b",
            "a\nb",
            "a:b",
            "a@b",
            "é",
            &too_long,
        ];
        for name in cases {
            let err = Repository::parse(name).unwrap_err();
            assert_eq!(err.code, ErrorCode::NameInvalid, "{name:?}");
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn name_error_names_the_input_safely() {
        let err = Repository::parse("Bad\x1bName").unwrap_err();
        assert_eq!(err.message, "invalid repository name \"Bad\\u{1b}Name\"");
        let err = Repository::parse(&"X".repeat(10_000)).unwrap_err();
        assert!(err.message.len() < 400, "{}", err.message.len());
    }

    #[test]
    fn components_and_library_prefix() {
        let one = Repository::parse("alpine").unwrap();
        assert_eq!(one.components().collect::<Vec<_>>(), ["alpine"]);
        assert_eq!(
            one.with_library_prefix().unwrap().as_str(),
            "library/alpine"
        );

        let two = Repository::parse("bitnami/redis").unwrap();
        assert_eq!(two.components().collect::<Vec<_>>(), ["bitnami", "redis"]);
        assert_eq!(two.with_library_prefix().unwrap(), two);

        let longest = Repository::parse(&"a".repeat(255)).unwrap();
        let err = longest.with_library_prefix().unwrap_err();
        assert_eq!(err.code, ErrorCode::NameInvalid);
    }

    #[test]
    fn tags() {
        let max = format!("_{}", "a".repeat(127));
        for tag in ["latest", "v1.2.3", "_x", "A-b_c.d", "0", &max] {
            assert_eq!(Tag::parse(tag).unwrap().as_str(), tag);
        }
        let over = "a".repeat(129);
        for tag in [
            "", ".x", "-x", "a:b", "a/b", "a b", "..", "a\nb", "é", &over,
        ] {
            let err = Tag::parse(tag).unwrap_err();
            assert_eq!(err.code, ErrorCode::TagInvalid, "{tag:?}");
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn references() {
        let digest = format!("sha256:{}", "0".repeat(64));
        let r = Reference::parse(&digest).unwrap();
        assert!(r.digest().is_some() && r.tag().is_none());
        assert_eq!(r.as_str(), digest);

        let r = Reference::parse("latest").unwrap();
        assert_eq!(r.tag().map(Tag::as_str), Some("latest"));
        assert_eq!(r.to_string(), "latest");

        let err = Reference::parse("sha256:x/y").unwrap_err();
        assert_eq!(err.code, ErrorCode::DigestInvalid);
        // Well-formed digest grammar with an unknown algorithm.
        let err = Reference::parse("latest:x").unwrap_err();
        assert_eq!(err.code, ErrorCode::DigestInvalid);
        let err = Reference::parse("-x").unwrap_err();
        assert_eq!(err.code, ErrorCode::TagInvalid);
    }
}
