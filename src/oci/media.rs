//! Manifest media types, the manifest size cap, and what a manifest points at.
//!
//! Owns: which `Content-Type`s are manifests, which of them are indexes (multi-platform lists),
//! the `Accept` header pullgate sends upstream, the default size cap, and the digests a
//! manifest references. Must never: fetch or store a manifest (the upstream client and the
//! store do that, under the cap).

use super::Digest;

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
    // Header values hold no whitespace but SP and HTAB (RFC 9110), so no Unicode trim.
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim_matches([' ', '\t'])
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

/// True when a client sending `accept` (all its `Accept` values joined by commas) takes
/// `media_type`: listed (parameters ignored, case-insensitive), or `*/*`, `application/*`, or
/// no `Accept` at all.
pub fn accepts(accept: &str, media_type: &str) -> bool {
    let wanted = essence(media_type);
    let mut any = false;
    for range in accept.split(',').filter(|r| !essence(r).is_empty()) {
        any = true;
        let offered = essence(range);
        let matches = offered == "*/*"
            || offered.eq_ignore_ascii_case("application/*")
            || offered.eq_ignore_ascii_case(wanted);
        if matches && !refused(range) {
            return true;
        }
    }
    !any
}

/// True for a media range with `q=0` (RFC 9110: "not acceptable").
fn refused(range: &str) -> bool {
    range.split(';').skip(1).any(|param| {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        name.trim().eq_ignore_ascii_case("q") && value.trim().parse::<f32>().is_ok_and(|q| q == 0.0)
    })
}

/// True for Docker schema 1 (signed or not): deprecated, and what distribution converts a
/// manifest to on the fly for clients that take nothing newer (so not content it stores).
pub fn is_schema1(media_type: &str) -> bool {
    let essence = essence(media_type);
    [DOCKER_MANIFEST_V1_SIGNED, DOCKER_MANIFEST_V1]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(essence))
}

/// The signed payload of a Docker schema 1 manifest (libtrust JWS): the bytes its digest is
/// computed over, i.e. the body up to the first signature's `formatLength` followed by its
/// `formatTail`. `None` for anything else.
pub fn schema1_signed_payload(body: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let protected = doc.get("signatures")?.get(0)?.get("protected")?.as_str()?;
    let header: serde_json::Value =
        serde_json::from_slice(&b64.decode(protected.trim_end_matches('=')).ok()?).ok()?;
    let length = usize::try_from(header.get("formatLength")?.as_u64()?).ok()?;
    let tail = b64
        .decode(header.get("formatTail")?.as_str()?.trim_end_matches('='))
        .ok()?;
    let mut payload = body.get(..length)?.to_vec();
    payload.extend_from_slice(&tail);
    Some(payload)
}

/// How many values [`accept_set`] can take (one bit per [`MANIFEST_MEDIA_TYPES`] entry).
pub const ACCEPT_SETS: u8 = 1 << MANIFEST_MEDIA_TYPES.len();

/// The manifest types an `Accept` admits, one bit per [`MANIFEST_MEDIA_TYPES`] entry (bit 0:
/// the OCI index). Clients with the same set get the same answers from a registry.
pub fn accept_set(accept: &str) -> u8 {
    thread_local! {
        /// The last `Accept` this thread read, and its set: a tag poller sends the same one on
        /// every request.
        static LAST: std::cell::RefCell<(String, u8)> =
            const { std::cell::RefCell::new((String::new(), ACCEPT_SETS - 1)) };
    }
    if accept.len() > 1024 {
        return parse_accept_set(accept);
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != accept {
            let set = parse_accept_set(accept);
            last.0.clear();
            last.0.push_str(accept);
            last.1 = set;
        }
        last.1
    })
}

/// [`accept_set`] without the memo.
fn parse_accept_set(accept: &str) -> u8 {
    // One pass over the ranges: bit i is set exactly when
    // `accepts(accept, MANIFEST_MEDIA_TYPES[i])`.
    const EVERY: u8 = ACCEPT_SETS - 1;
    let mut set = 0;
    let mut any = false;
    for range in accept.split(',') {
        let offered = essence(range);
        if offered.is_empty() {
            continue;
        }
        any = true;
        if refused(range) {
            continue;
        }
        if offered == "*/*" || offered.eq_ignore_ascii_case("application/*") {
            set = EVERY;
        } else if let Some(i) = type_index(offered) {
            set |= 1 << i;
        }
    }
    if any {
        set
    } else {
        EVERY
    }
}

/// Where `media_type` (parameters ignored) is in [`MANIFEST_MEDIA_TYPES`].
fn type_index(media_type: &str) -> Option<usize> {
    let essence = essence(media_type);
    MANIFEST_MEDIA_TYPES
        .iter()
        .position(|t| t.eq_ignore_ascii_case(essence))
}

/// [`accepts`] for a client whose [`accept_set`] is `set`, when `media_type` is a manifest
/// type (`None` otherwise: ask [`accepts`]).
pub fn set_admits(set: u8, media_type: &str) -> Option<bool> {
    type_index(media_type).map(|i| set & (1 << i) != 0)
}

/// True when an [`accept_set`] holds images and indexes in both OCI and Docker terms
/// ([`takes_every_modern_type`]).
pub fn set_takes_every_modern_type(set: u8) -> bool {
    const MODERN: u8 = 0b1111;
    set & MODERN == MODERN
}

/// True when the client takes images and indexes in both OCI and Docker terms: the
/// registry's answer to it is the tag's real target.
pub fn takes_every_modern_type(accept: &str) -> bool {
    set_takes_every_modern_type(accept_set(accept))
}

/// True when the `Accept` holds a wildcard (`*/*`, `application/*`), which registries such as
/// distribution do not honour: they answer only the types listed.
pub fn has_wildcard(accept: &str) -> bool {
    accept
        .split(',')
        .map(essence)
        .any(|t| t == "*/*" || t.eq_ignore_ascii_case("application/*"))
}

/// The digests a manifest points at: its config and layers (image manifests), its child
/// manifests (indexes), or its `fsLayers` (Docker schema 1). The upstream served these as part
/// of the repository, so they are what a pull of it will ask for next. Malformed or unknown
/// documents have none; invalid digests are skipped.
pub fn manifest_references(body: &[u8]) -> Vec<Digest> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let digest_of = |v: &serde_json::Value, field: &str| {
        v.get(field)
            .and_then(|d| d.as_str())
            .and_then(|d| Digest::parse(d).ok())
    };
    let mut out: Vec<Digest> = doc
        .get("config")
        .and_then(|c| digest_of(c, "digest"))
        .into_iter()
        .collect();
    for (list, field) in [
        ("layers", "digest"),
        ("manifests", "digest"),
        ("fsLayers", "blobSum"),
    ] {
        if let Some(items) = doc.get(list).and_then(|l| l.as_array()) {
            out.extend(items.iter().filter_map(|item| digest_of(item, field)));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_are_matched_by_essence() {
        assert!(accepts(MANIFEST_ACCEPT, OCI_INDEX_V1));
        assert!(accepts("", OCI_INDEX_V1), "no Accept takes anything");
        assert!(accepts("*/*", DOCKER_MANIFEST_V2));
        assert!(accepts("application/*;q=0.5", DOCKER_MANIFEST_V2));
        assert!(accepts(
            "application/vnd.docker.distribution.manifest.v2+json; q=1, text/plain",
            "Application/VND.docker.distribution.manifest.v2+json"
        ));
        assert!(!accepts(DOCKER_MANIFEST_V2, OCI_INDEX_V1));
        assert!(!accepts(&format!("{OCI_INDEX_V1};q=0"), OCI_INDEX_V1));
        assert!(accepts(&format!("{OCI_INDEX_V1};q=0.5"), OCI_INDEX_V1));
        assert!(!accepts("text/html, application/json", OCI_MANIFEST_V1));
    }

    #[test]
    fn schema1_payloads_are_cut_where_the_signature_says() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = "{\n   \"schemaVersion\": 1,\n   \"name\": \"a\"\n}";
        let head = &payload[..payload.len() - 2];
        let protected = b64.encode(format!(
            r#"{{"formatLength":{},"formatTail":"{}"}}"#,
            head.len(),
            b64.encode("\n}")
        ));
        let body = format!(
            "{head},\n   \"signatures\": [{{\"protected\": \"{protected}\", \"signature\": \"x\"}}]\n}}"
        );
        assert_eq!(
            schema1_signed_payload(body.as_bytes()).as_deref(),
            Some(payload.as_bytes())
        );
        assert_eq!(schema1_signed_payload(b"{\"schemaVersion\":2}"), None);
        assert!(is_schema1(DOCKER_MANIFEST_V1_SIGNED) && !is_schema1(DOCKER_MANIFEST_V2));
    }

    #[test]
    fn the_one_pass_accept_set_agrees_with_accepts() {
        for accept in [
            "",
            " , ",
            "*/*",
            "application/*;q=0.5",
            MANIFEST_ACCEPT,
            OCI_MANIFEST_V1,
            "APPLICATION/VND.OCI.IMAGE.MANIFEST.V1+JSON; charset=utf-8",
            "application/vnd.oci.image.index.v1+json;q=0, */*",
            "application/vnd.oci.image.index.v1+json;q=0",
            "text/html, application/json",
            "application/vnd.docker.distribution.manifest.v2+json;q=0.9,application/vnd.docker.distribution.manifest.v1+prettyjws",
        ] {
            let set = accept_set(accept);
            for (i, t) in MANIFEST_MEDIA_TYPES.iter().enumerate() {
                assert_eq!(set & (1 << i) != 0, accepts(accept, t), "{accept:?} / {t}");
                assert_eq!(set_admits(set, t), Some(accepts(accept, t)));
            }
            assert_eq!(
                set_takes_every_modern_type(set),
                [OCI_INDEX_V1, OCI_MANIFEST_V1, DOCKER_MANIFEST_LIST_V2, DOCKER_MANIFEST_V2]
                    .iter()
                    .all(|t| accepts(accept, t))
            );
        }
        assert_eq!(set_admits(0, "application/json"), None);
    }

    #[test]
    fn accept_sets_and_wildcards() {
        assert_eq!(
            accept_set(""),
            ACCEPT_SETS - 1,
            "no Accept takes every type"
        );
        assert_eq!(accept_set("*/*"), ACCEPT_SETS - 1);
        assert_eq!(accept_set(OCI_INDEX_V1), 1);
        assert_eq!(
            accept_set(&format!("{OCI_MANIFEST_V1}, {DOCKER_MANIFEST_V2}")),
            0b1010
        );
        assert!(takes_every_modern_type(""));
        assert!(takes_every_modern_type("application/*"));
        assert!(!takes_every_modern_type(OCI_MANIFEST_V1));
        assert!(has_wildcard("application/json, */*;q=0.1"));
        assert!(has_wildcard("Application/*"));
        assert!(!has_wildcard(MANIFEST_ACCEPT));
    }

    #[test]
    fn references_of_manifests_and_indexes() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"{}"}},{{"digest":"bogus"}}]}}"#,
            d('a'),
            d('b'),
            d('a')
        );
        let got: Vec<String> = manifest_references(image.as_bytes())
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(got, vec![d('a'), d('b')]);
        let index = format!(r#"{{"manifests":[{{"digest":"{}"}}]}}"#, d('c'));
        assert_eq!(manifest_references(index.as_bytes())[0].to_string(), d('c'));
        let schema1 = format!(r#"{{"fsLayers":[{{"blobSum":"{}"}}]}}"#, d('e'));
        assert_eq!(
            manifest_references(schema1.as_bytes())[0].to_string(),
            d('e')
        );
        assert!(manifest_references(b"not json").is_empty());
        assert!(manifest_references(b"[1,2]").is_empty());
    }

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
