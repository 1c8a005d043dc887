//! Tests for `parse_path`: every endpoint shape, hostile syntax, and non-API paths.

use super::*;

fn sha(n: char) -> String {
    format!("sha256:{}", n.to_string().repeat(64))
}

fn digest(n: char) -> Digest {
    Digest::parse(&sha(n)).unwrap()
}

#[test]
fn base_and_catalog() {
    assert_eq!(parse_path("/v2/").unwrap(), ApiRequest::Base);
    assert_eq!(parse_path("/v2").unwrap(), ApiRequest::Base);
    assert_eq!(parse_path("/v2/_catalog").unwrap(), ApiRequest::Catalog);
    assert_eq!(parse_path("/v2/").unwrap().kind(), "base");
    assert_eq!(parse_path("/v2/_catalog").unwrap().kind(), "catalog");
}

#[test]
fn every_endpoint_shape() {
    let tag = |t: &str| Endpoint::Manifest(Reference::parse(t).unwrap());
    let by_digest = Endpoint::Manifest(Reference::Digest(digest('a')));
    let cases: Vec<(String, &str, Endpoint, &str)> = vec![
        (
            "/v2/alpine/manifests/latest".into(),
            "alpine",
            tag("latest"),
            "manifest",
        ),
        (
            format!("/v2/library/alpine/manifests/{}", sha('a')),
            "library/alpine",
            by_digest,
            "manifest",
        ),
        (
            format!("/v2/a/b/blobs/{}", sha('b')),
            "a/b",
            Endpoint::Blob(digest('b')),
            "blob",
        ),
        (
            "/v2/a/b/tags/list".into(),
            "a/b",
            Endpoint::TagsList,
            "tags",
        ),
        (
            format!("/v2/a/referrers/{}", sha('c')),
            "a",
            Endpoint::Referrers(digest('c')),
            "referrers",
        ),
        (
            "/v2/a/blobs/uploads/".into(),
            "a",
            Endpoint::UploadStart,
            "upload",
        ),
        (
            "/v2/a/blobs/uploads".into(),
            "a",
            Endpoint::UploadStart,
            "upload",
        ),
        (
            "/v2/a/blobs/uploads/Ab-1_2.3=".into(),
            "a",
            Endpoint::Upload("Ab-1_2.3=".into()),
            "upload",
        ),
        // The name is what precedes the LAST marker: names may contain marker components.
        (
            "/v2/a/manifests/b/manifests/v1".into(),
            "a/manifests/b",
            tag("v1"),
            "manifest",
        ),
        (
            "/v2/blobs/x/tags/list".into(),
            "blobs/x",
            Endpoint::TagsList,
            "tags",
        ),
        (
            format!("/v2/a/blobs/uploads/blobs/{}", sha('d')),
            "a/blobs/uploads",
            Endpoint::Blob(digest('d')),
            "blob",
        ),
        (
            "/v2/tags/list/tags/list".into(),
            "tags/list",
            Endpoint::TagsList,
            "tags",
        ),
        // Names are NOT validated here: routing does that after stripping a prefix.
        (
            "/v2/Docker.IO/X/manifests/latest".into(),
            "Docker.IO/X",
            tag("latest"),
            "manifest",
        ),
    ];
    for (path, name, endpoint, kind) in cases {
        let got = parse_path(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(got.kind(), kind, "{path}");
        assert_eq!(got, ApiRequest::Api { name, endpoint }, "{path}");
    }
}

#[test]
fn hostile_paths_are_name_invalid() {
    let long = format!("/v2/{}/manifests/latest", "a/".repeat(1100));
    let cases = [
        "/v2/%2e%2e/manifests/latest",
        "/v2/a%2fb/manifests/latest",
        "/v2/a\\b/manifests/latest",
        "/v2/a/../b/manifests/latest",
        "/v2/../manifests/latest",
        "/v2/./a/manifests/latest",
        "/v2/a/./manifests/latest",
        "/v2/a/manifests/..",
        "/v2/a//b/manifests/latest",
        "/v2//",
        "//v2/",
        "/v2/a\nb/manifests/latest",
        "/v2/a\0/manifests/latest",
        "/v2/a\u{7f}/manifests/latest",
        "/v2/a\u{85}/manifests/latest",
        "/v2/manifests/latest",
        "/v2/a/../../etc/passwd",
        &long,
    ];
    for path in cases {
        let err = parse_path(path).unwrap_err();
        assert_eq!(err.code, ErrorCode::NameInvalid, "{path:?}");
        assert_eq!(err.status, 400, "{path:?}");
        assert!(!err.message.contains("passwd"), "path not echoed");
    }
}

#[test]
fn non_api_paths_are_404_unsupported() {
    let cases = [
        "",
        "/",
        "/v1/",
        "/v20/",
        "/v2x",
        "v2/",
        "/healthz",
        "/v2/alpine",
        "/v2/alpine/",
        "/v2/alpine/manifests",
        "/v2/alpine/tags",
        "/v2/alpine/tags/list/",
        "/v2/alpine/blob/x",
        "/v2/a/manifests/b/c",
        "/v2/_catalog/",
    ];
    for path in cases {
        let err = parse_path(path).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unsupported, "{path:?}");
        assert_eq!(err.status, 404, "{path:?}");
        assert_eq!(err.message, "not a registry API path");
    }
}

#[test]
fn bad_parameters_carry_their_own_codes() {
    let long_id = format!("/v2/a/blobs/uploads/{}", "x".repeat(129));
    let cases = [
        ("/v2/a/manifests/-bad", ErrorCode::TagInvalid),
        ("/v2/a/manifests/", ErrorCode::TagInvalid),
        ("/v2/a/manifests/sha256:abc", ErrorCode::DigestInvalid),
        ("/v2/a/blobs/latest", ErrorCode::DigestInvalid),
        ("/v2/a/blobs/", ErrorCode::DigestInvalid),
        ("/v2/a/referrers/latest", ErrorCode::DigestInvalid),
        ("/v2/a/blobs/uploads/a:b", ErrorCode::BlobUploadUnknown),
        ("/v2/a/blobs/uploads/a b", ErrorCode::BlobUploadUnknown),
        (&long_id, ErrorCode::BlobUploadUnknown),
    ];
    for (path, code) in cases {
        let err = parse_path(path).unwrap_err();
        assert_eq!(err.code, code, "{path:?}");
    }
    let max_id = format!("/v2/a/blobs/uploads/{}", "x".repeat(128));
    assert!(parse_path(&max_id).is_ok());
}
