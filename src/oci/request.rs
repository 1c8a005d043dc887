//! `parse_path`: a request path into the distribution-spec endpoint it names.
//!
//! Owns: the `/v2/...` URL shapes of the distribution spec ("Endpoints" table). Hostile path
//! syntax (`%`, `\`, control characters, `//`, dot segments, over-long paths) is refused before
//! anything else looks at the path (invariant 2). Must never: validate or interpret the
//! repository name (routing decides which part is the upstream's name), or see the query string.

use super::digest::Digest;
use super::error::{ErrorCode, OciError};
use super::name::Reference;

/// Longest path looked at.
pub const MAX_PATH_LEN: usize = 2048;
/// Longest upload session id.
const MAX_SESSION_ID_LEN: usize = 128;

/// What a `/v2/` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest<'a> {
    /// `/v2/` (and `/v2`): the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/...`.
    Api {
        /// The raw name as the client sent it, NOT yet validated: pass it to
        /// `RouteTable::resolve`, which strips prefixes and validates it.
        name: &'a str,
        endpoint: Endpoint,
    },
}

impl ApiRequest<'_> {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiRequest::Base => "base",
            ApiRequest::Catalog => "catalog",
            ApiRequest::Api { endpoint, .. } => endpoint.kind(),
        }
    }
}

/// The endpoint under `/v2/<name>/`, its parameter already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `manifests/<reference>`.
    Manifest(Reference),
    /// `blobs/<digest>`.
    Blob(Digest),
    /// `tags/list`.
    TagsList,
    /// `referrers/<digest>`.
    Referrers(Digest),
    /// `blobs/uploads/` (with or without the trailing slash).
    UploadStart,
    /// `blobs/uploads/<session id>`, the id matching `[A-Za-z0-9._=-]{1,128}`.
    Upload(String),
}

impl Endpoint {
    /// A bounded label for metrics (STYLE.md guideline 13: never the raw path).
    pub fn kind(&self) -> &'static str {
        match self {
            Endpoint::Manifest(_) => "manifest",
            Endpoint::Blob(_) => "blob",
            Endpoint::TagsList => "tags",
            Endpoint::Referrers(_) => "referrers",
            Endpoint::UploadStart | Endpoint::Upload(_) => "upload",
        }
    }

    /// The tag or digest the endpoint names, for logs and the audit line.
    pub fn reference(&self) -> Option<String> {
        match self {
            Endpoint::Manifest(r) => Some(r.to_string()),
            Endpoint::Blob(d) | Endpoint::Referrers(d) => Some(d.to_string()),
            Endpoint::TagsList | Endpoint::UploadStart | Endpoint::Upload(_) => None,
        }
    }
}

/// Parses a request path (WITHOUT the query string).
///
/// Errors: `NAME_INVALID` (400) for hostile path syntax or an empty name, `UNSUPPORTED` (404)
/// for paths that are not registry API paths, and the parameter's own error (`TAG_INVALID`,
/// `DIGEST_INVALID`, `BLOB_UPLOAD_UNKNOWN`) for a bad reference, digest or session id.
pub fn parse_path(path: &str) -> Result<ApiRequest<'_>, OciError> {
    reject_hostile(path)?;
    let rest = match path {
        "/v2" | "/v2/" => return Ok(ApiRequest::Base),
        "/v2/_catalog" => return Ok(ApiRequest::Catalog),
        _ => path.strip_prefix("/v2/").ok_or_else(not_api)?,
    };
    let (name, endpoint) = split_endpoint(rest)?;
    if name.is_empty() {
        return Err(OciError::new(
            ErrorCode::NameInvalid,
            "repository name is empty",
        ));
    }
    Ok(ApiRequest::Api { name, endpoint })
}

/// Invariant 2: refuse encodings and path syntax before any part of the path is used.
fn reject_hostile(path: &str) -> Result<(), OciError> {
    let problem = if path.len() > MAX_PATH_LEN {
        Some("path is too long")
    } else if path.contains('%') {
        Some("path contains a percent-encoding")
    } else if path.contains('\\') {
        Some("path contains a backslash")
    } else if path.chars().any(char::is_control) {
        Some("path contains a control character")
    } else if path.contains("//") {
        Some("path contains an empty segment")
    } else if path.split('/').any(|seg| seg == "." || seg == "..") {
        Some("path contains a dot segment")
    } else {
        None
    };
    match problem {
        Some(message) => Err(OciError::new(ErrorCode::NameInvalid, message)),
        None => Ok(()),
    }
}

/// Splits `<name>/<endpoint>` at the LAST endpoint marker, so that a name may itself contain
/// `manifests` or `blobs` as a component.
fn split_endpoint(rest: &str) -> Result<(&str, Endpoint), OciError> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((name, Endpoint::TagsList));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Ok((name, Endpoint::UploadStart));
    }
    let (head, last) = rest.rsplit_once('/').ok_or_else(not_api)?;
    if let Some(name) = head.strip_suffix("/blobs/uploads") {
        return Ok((name, Endpoint::Upload(session_id(last)?)));
    }
    let (name, marker) = head.rsplit_once('/').unwrap_or(("", head));
    let endpoint = match marker {
        "manifests" => Endpoint::Manifest(Reference::parse(last)?),
        "blobs" => Endpoint::Blob(Digest::parse(last)?),
        "referrers" => Endpoint::Referrers(Digest::parse(last)?),
        _ => return Err(not_api()),
    };
    Ok((name, endpoint))
}

/// Upload session ids go back into an upstream URL: keep them to `[A-Za-z0-9._=-]{1,128}`.
fn session_id(id: &str) -> Result<String, OciError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'=' | b'-'));
    if ok {
        Ok(id.to_owned())
    } else {
        Err(OciError::new(
            ErrorCode::BlobUploadUnknown,
            "invalid upload session id",
        ))
    }
}

fn not_api() -> OciError {
    OciError::new(ErrorCode::Unsupported, "not a registry API path").with_status(404)
}

#[cfg(test)]
mod tests;
