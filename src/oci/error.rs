//! OCI error codes: the ONE table from a code to its HTTP status and default message, and the
//! JSON error body of the distribution spec.
//!
//! Owns: `ErrorCode`, `OciError`, and `echo`, the only way attacker input goes into a message.
//! Must never: build JSON in `Display` (Display is for logs), or put a credential, an upstream
//! URL or unbounded client input into a message (invariant 1: never into an error body).

use std::fmt;

use serde::Serialize;

/// The error codes pullgate answers with: those of the distribution spec ("Error Codes"), plus
/// `Unavailable`, pullgate's own for an upstream it cannot reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Upstream unreachable or answering garbage: 502 by default; use `with_status(503)` when
    /// pullgate itself is not ready.
    Unavailable,
}

/// One row of the table: wire code, default status, default message.
struct Descriptor {
    code: &'static str,
    status: u16,
    message: &'static str,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BlobUnknown,
        ErrorCode::BlobUploadInvalid,
        ErrorCode::BlobUploadUnknown,
        ErrorCode::DigestInvalid,
        ErrorCode::ManifestBlobUnknown,
        ErrorCode::ManifestInvalid,
        ErrorCode::ManifestUnknown,
        ErrorCode::NameInvalid,
        ErrorCode::NameUnknown,
        ErrorCode::SizeInvalid,
        ErrorCode::TagInvalid,
        ErrorCode::Unauthorized,
        ErrorCode::Denied,
        ErrorCode::Unsupported,
        ErrorCode::TooManyRequests,
        ErrorCode::Unavailable,
    ];

    /// The table. Statuses follow distribution's `registry/api/errcode` descriptors.
    const fn descriptor(self) -> Descriptor {
        let (code, status, message) = match self {
            ErrorCode::BlobUnknown => ("BLOB_UNKNOWN", 404, "blob unknown to registry"),
            ErrorCode::BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", 400, "blob upload invalid"),
            ErrorCode::BlobUploadUnknown => (
                "BLOB_UPLOAD_UNKNOWN",
                404,
                "blob upload unknown to registry",
            ),
            ErrorCode::DigestInvalid => (
                "DIGEST_INVALID",
                400,
                "provided digest did not match uploaded content",
            ),
            ErrorCode::ManifestBlobUnknown => (
                "MANIFEST_BLOB_UNKNOWN",
                404,
                "manifest references a manifest or blob unknown to registry",
            ),
            ErrorCode::ManifestInvalid => ("MANIFEST_INVALID", 400, "manifest invalid"),
            ErrorCode::ManifestUnknown => ("MANIFEST_UNKNOWN", 404, "manifest unknown to registry"),
            ErrorCode::NameInvalid => ("NAME_INVALID", 400, "invalid repository name"),
            ErrorCode::NameUnknown => {
                ("NAME_UNKNOWN", 404, "repository name not known to registry")
            }
            ErrorCode::SizeInvalid => (
                "SIZE_INVALID",
                400,
                "provided length did not match content length",
            ),
            ErrorCode::TagInvalid => ("TAG_INVALID", 400, "invalid tag"),
            ErrorCode::Unauthorized => ("UNAUTHORIZED", 401, "authentication required"),
            ErrorCode::Denied => ("DENIED", 403, "requested access to the resource is denied"),
            ErrorCode::Unsupported => ("UNSUPPORTED", 405, "the operation is unsupported"),
            ErrorCode::TooManyRequests => ("TOOMANYREQUESTS", 429, "too many requests"),
            ErrorCode::Unavailable => ("UNAVAILABLE", 502, "upstream registry unavailable"),
        };
        Descriptor {
            code,
            status,
            message,
        }
    }

    /// The wire code, e.g. `"NAME_UNKNOWN"`.
    pub const fn as_str(self) -> &'static str {
        self.descriptor().code
    }

    /// The HTTP status this code is answered with unless overridden.
    pub const fn status(self) -> u16 {
        self.descriptor().status
    }

    /// The message used when there is nothing more specific to say.
    pub const fn default_message(self) -> &'static str {
        self.descriptor().message
    }

    /// The code for a wire string (e.g. an upstream's error body); `None` if unknown.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the client will see it: code, status, message, optional `Retry-After`.
///
/// The message goes into the response body: build it only from constants, config values that
/// are not secrets, and client input passed through [`echo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciError {
    pub code: ErrorCode,
    /// Defaults to `code.status()`.
    pub status: u16,
    pub message: String,
    /// Value for a `Retry-After` header (seconds or an HTTP date), e.g. relayed from a 429.
    pub retry_after: Option<String>,
}

impl OciError {
    /// An error with the code's default status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OciError {
        OciError {
            code,
            status: code.status(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// An error with the code's default status and default message.
    pub fn from_code(code: ErrorCode) -> OciError {
        OciError::new(code, code.default_message())
    }

    /// Overrides the HTTP status (e.g. 404 for a path that is not a registry API path).
    pub fn with_status(mut self, status: u16) -> OciError {
        self.status = status;
        self
    }

    /// Sets the `Retry-After` value the response carries.
    pub fn with_retry_after(mut self, retry_after: impl Into<String>) -> OciError {
        self.retry_after = Some(retry_after.into());
        self
    }

    /// The response body: `{"errors":[{"code":"...","message":"...","detail":null}]}`.
    pub fn to_json(&self) -> Vec<u8> {
        let body = Body {
            errors: [Entry {
                code: self.code.as_str(),
                message: &self.message,
                detail: None,
            }],
        };
        // Serializing two strings and a null cannot fail; fall back to a fixed body anyway so
        // that no input can make this panic.
        serde_json::to_vec(&body).unwrap_or_else(|_| FALLBACK_BODY.to_vec())
    }
}

const FALLBACK_BODY: &[u8] =
    br#"{"errors":[{"code":"UNAVAILABLE","message":"error","detail":null}]}"#;

#[derive(Serialize)]
struct Body<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'static str,
    message: &'a str,
    detail: Option<()>,
}

impl fmt::Display for OciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for OciError {}

/// At most this many characters of client input are echoed into a message.
pub const MAX_ECHO_CHARS: usize = 300;

/// Client input made safe to put into an error message or a log line: quoted, at most
/// [`MAX_ECHO_CHARS`] characters of it, `"` and `\` escaped, and every character outside
/// printable ASCII written as `\u{..}` (control characters, bidi overrides, newlines).
pub fn echo(input: &str) -> String {
    let mut out = String::with_capacity(input.len().min(MAX_ECHO_CHARS) + 2);
    out.push('"');
    for c in input.chars().take(MAX_ECHO_CHARS) {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.extend(c.escape_unicode()),
        }
    }
    out.push('"');
    if input.chars().nth(MAX_ECHO_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_wire_codes_and_statuses() {
        let cases = [
            (ErrorCode::BlobUnknown, "BLOB_UNKNOWN", 404),
            (ErrorCode::BlobUploadInvalid, "BLOB_UPLOAD_INVALID", 400),
            (ErrorCode::BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN", 404),
            (ErrorCode::DigestInvalid, "DIGEST_INVALID", 400),
            (ErrorCode::ManifestBlobUnknown, "MANIFEST_BLOB_UNKNOWN", 404),
            (ErrorCode::ManifestInvalid, "MANIFEST_INVALID", 400),
            (ErrorCode::ManifestUnknown, "MANIFEST_UNKNOWN", 404),
            (ErrorCode::NameInvalid, "NAME_INVALID", 400),
            (ErrorCode::NameUnknown, "NAME_UNKNOWN", 404),
            (ErrorCode::SizeInvalid, "SIZE_INVALID", 400),
            (ErrorCode::TagInvalid, "TAG_INVALID", 400),
            (ErrorCode::Unauthorized, "UNAUTHORIZED", 401),
            (ErrorCode::Denied, "DENIED", 403),
            (ErrorCode::Unsupported, "UNSUPPORTED", 405),
            (ErrorCode::TooManyRequests, "TOOMANYREQUESTS", 429),
            (ErrorCode::Unavailable, "UNAVAILABLE", 502),
        ];
        assert_eq!(cases.len(), ErrorCode::ALL.len());
        for (code, wire, status) in cases {
            assert_eq!(code.as_str(), wire);
            assert_eq!(code.status(), status, "{wire}");
            assert!(!code.default_message().is_empty());
            assert_eq!(OciError::from_code(code).status, status);
        }
    }

    #[test]
    fn json_shape() {
        let err = OciError::new(ErrorCode::NameUnknown, "no \"such\" repo");
        let v: serde_json::Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "errors": [{"code": "NAME_UNKNOWN", "message": "no \"such\" repo", "detail": null}]
            })
        );
        assert_eq!(
            String::from_utf8(err.to_json()).unwrap(),
            r#"{"errors":[{"code":"NAME_UNKNOWN","message":"no \"such\" repo","detail":null}]}"#
        );
    }

    #[test]
    fn display_is_code_and_message_without_json() {
        let err = OciError::new(ErrorCode::Denied, "zone vpc only");
        assert_eq!(err.to_string(), "DENIED: zone vpc only");
    }

    #[test]
    fn builders_override_status_and_retry_after() {
        let err = OciError::from_code(ErrorCode::Unavailable)
            .with_status(503)
            .with_retry_after("30");
        assert_eq!(err.status, 503);
        assert_eq!(err.retry_after.as_deref(), Some("30"));
        assert_eq!(err.code, ErrorCode::Unavailable);
    }

    #[test]
    fn echo_escapes_and_bounds_input() {
        let cases = [
            ("abc", "\"abc\""),
            ("a\"b\\c", "\"a\\\"b\\\\c\""),
            ("a\nb\x1b[31m", "\"a\\u{a}b\\u{1b}[31m\""),
            ("\u{202e}x", "\"\\u{202e}x\""),
            ("", "\"\""),
        ];
        for (input, want) in cases {
            assert_eq!(echo(input), want, "{input:?}");
        }
        let long = "a".repeat(5000);
        let echoed = echo(&long);
        assert_eq!(echoed, format!("\"{}\"...", "a".repeat(MAX_ECHO_CHARS)));
        assert_eq!(echo(&"a".repeat(MAX_ECHO_CHARS)).len(), MAX_ECHO_CHARS + 2);
    }
}
