//! Manifest media types and the manifest size cap.
//!
//! Owns: which `Content-Type`s are manifests, which of them are indexes (multi-platform lists),
//! the `Accept` header pullgate sends upstream, and the default size cap. Must never: read a
//! manifest body (that is the store's and the upstream client's job, under the cap).

/// OCI image manifest v1.
pub const OCI_MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index v1 (multi-platform).
pub const OCI_INDEX_V1: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list, schema 2 (multi-platform).
pub const DOCKER_MANIFEST_LIST_V2: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1, signed (deprecated; recognised for completeness).
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker schema 1, unsigned (deprecated; recognised for completeness).
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Every manifest media type, preferred first.
pub const MANIFEST_MEDIA_TYPES: [&str; 6] = [
    OCI_INDEX_V1,
    OCI_MANIFEST_V1,
    DOCKER_MANIFEST_LIST_V2,
    DOCKER_MANIFEST_V2,
    DOCKER_MANIFEST_V1_SIGNED,
    DOCKER_MANIFEST_V1,
];

/// `Accept` value for manifest requests pullgate makes upstream on its own (warm-up, tag
/// refresh): every type above, so the upstream never downgrades to schema 1 for lack of one.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, \
application/vnd.docker.distribution.manifest.v1+json";

/// Manifests larger than this are refused unless the config says otherwise (invariant 7).
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// The media type without parameters (`; charset=...`), trimmed. Comparison is
/// case-insensitive (RFC 9110 media types).
fn essence(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or("").trim()
}

/// True for any manifest or index media type (parameters ignored).
pub fn is_manifest_media_type(media_type: &str) -> bool {
    let essence = essence(media_type);
    MANIFEST_MEDIA_TYPES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(essence))
}

/// True for a multi-platform index: OCI image index or Docker manifest list.
pub fn is_index(media_type: &str) -> bool {
    let essence = essence(media_type);
    [OCI_INDEX_V1, DOCKER_MANIFEST_LIST_V2]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(essence))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_media_types() {
        // (media type, is manifest, is index)
        let cases = [
            (OCI_MANIFEST_V1, true, false),
            (OCI_INDEX_V1, true, true),
            (DOCKER_MANIFEST_V2, true, false),
            (DOCKER_MANIFEST_LIST_V2, true, true),
            (DOCKER_MANIFEST_V1_SIGNED, true, false),
            (DOCKER_MANIFEST_V1, true, false),
            (
                "application/vnd.oci.image.index.v1+json; charset=utf-8",
                true,
                true,
            ),
            ("Application/VND.OCI.Image.Manifest.v1+JSON", true, false),
            ("application/json", false, false),
            ("application/vnd.oci.image.layer.v1.tar+gzip", false, false),
            ("", false, false),
        ];
        for (media_type, manifest, index) in cases {
            assert_eq!(is_manifest_media_type(media_type), manifest, "{media_type}");
            assert_eq!(is_index(media_type), index, "{media_type}");
        }
    }

    #[test]
    fn accept_lists_every_manifest_type() {
        let listed: Vec<&str> = MANIFEST_ACCEPT.split(", ").collect();
        assert_eq!(listed, MANIFEST_MEDIA_TYPES);
        assert_eq!(DEFAULT_MAX_MANIFEST_SIZE, 4_194_304);
    }
}
