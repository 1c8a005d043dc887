//! Hostile input, generated: every parser that sees bytes from a client, an upstream or an
//! operator is fed arbitrary and near-valid input (proptest; `cargo fuzz` needs a nightly
//! toolchain this project does not use). Properties: no panic, and what is accepted is safe to
//! use (cache paths from digests only, names within the grammar, no escape from the repository).
//! The number of cases per property is `PROPTEST_CASES` (default below); CI runs the default.

use std::net::IpAddr;

use proptest::prelude::*;
use pullgate::oci::{self, ApiRequest, Digest, Reference};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Paths that look like registry API paths, with hostile pieces mixed in.
fn api_like_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-z0-9]{1,8}",
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2F".to_string()),
        Just("\\".to_string()),
        Just("".to_string()),
        Just("manifests".to_string()),
        Just("blobs".to_string()),
        Just("uploads".to_string()),
        Just("tags".to_string()),
        Just("list".to_string()),
        Just(format!("sha256:{}", "a".repeat(64))),
        "[ -~]{0,12}",
    ];
    proptest::collection::vec(piece, 0..10).prop_map(|parts| format!("/v2/{}", parts.join("/")))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn api_paths_never_panic_and_accepted_names_hold_no_traversal(
        path in prop_oneof![api_like_path(), "\\PC{0,80}"]
    ) {
        // parse_path rejects hostile syntax; the name grammar is checked when routing turns the
        // name into a Repository (also exercised here).
        if let Ok(ApiRequest::Api { name, endpoint }) = oci::parse_path(&path) {
            if let Ok(repo) = oci::Repository::parse(name) {
                prop_assert_eq!(repo.as_str(), name);
            }
            prop_assert!(!name.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
            prop_assert!(!name.contains('\\') && !name.contains('%'));
            if let oci::Endpoint::Blob(d) | oci::Endpoint::Referrers(d) = &endpoint {
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
            }
        }
    }

    #[test]
    fn digests_and_references_never_panic(s in "\\PC{0,140}") {
        if let Ok(d) = Digest::parse(&s) {
            // A cache path component: hex only, so it cannot name another directory.
            prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        if let Ok(Reference::Tag(t)) = Reference::parse(&s) {
            prop_assert!(t.as_str().len() <= 128 && !t.as_str().contains('/'));
        }
    }

    #[test]
    fn www_authenticate_values_never_panic(
        value in prop_oneof![
            "\\PC{0,200}",
            "(Bearer|Basic|bearer) (realm|service|scope|error)=\"[ -~]{0,40}\"(,[a-z]{1,8}=\"?[ -~]{0,20}\"?){0,4}",
        ]
    ) {
        let _ = pullgate::upstream::parse_challenges(&value);
    }

    #[test]
    fn config_text_never_panics(
        text in prop_oneof![
            "\\PC{0,300}",
            "\\[(server|cache|zones)\\]\n[a-z_]{1,16} = (\"[ -~]{0,20}\"|[0-9]{1,12}|true|\\[\\])\n",
            "\\[\\[registry\\]\\]\nname = \"[a-z]{1,6}\"\nupstream = \"[ -~]{0,30}\"\n(prefix|ns|hosts|tag_ttl) = (\"[ -~]{0,20}\"|\\[\"[ -~]{0,10}\"\\])\n",
        ]
    ) {
        let _ = pullgate::config::load_str(&text, std::path::Path::new("/nonexistent"));
    }

    #[test]
    fn manifest_references_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        for d in oci::manifest_references(&body) {
            prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn repository_globs_never_panic_and_star_stays_in_its_component(
        glob in "[a-z*/]{0,16}", name in "[a-z/]{0,24}"
    ) {
        let matched = pullgate::policy::glob::matches(&glob, &name);
        if matched && !glob.contains("**") {
            prop_assert_eq!(glob.matches('/').count(), name.matches('/').count());
        }
    }

    #[test]
    fn forwarding_headers_never_panic_and_untrusted_peers_are_never_overridden(
        xff in "\\PC{0,60}", fwd in "\\PC{0,60}", peer in any::<[u8; 4]>()
    ) {
        let proxies = pullgate::policy::TrustedProxies::new(&["10.0.0.0/8".parse().unwrap()]);
        let peer = IpAddr::from(peer);
        let got = proxies.client_addr(peer, &[xff.as_str()], &[fwd.as_str()]);
        if !proxies.contains(peer) {
            prop_assert_eq!(got, peer);
        }
    }

    #[test]
    fn proxy_headers_never_panic_and_complete_ones_lie_within_the_input(
        buf in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            // Near-valid v1: the signature, then printable bytes with CR/LF mixed in.
            "PROXY (TCP4|TCP6|UNKNOWN|[A-Z0-9]{0,5})[ -~\r\n]{0,120}".prop_map(String::into_bytes),
            // Near-valid v2: the signature, then arbitrary version, family, length and body.
            proptest::collection::vec(any::<u8>(), 0..120).prop_map(|tail| {
                let mut b = pullgate::policy::proxy_header::V2_SIGNATURE.to_vec();
                b.extend(tail);
                b
            }),
        ]
    ) {
        use pullgate::policy::proxy_header::{parse, Parsed, V1_MAX_LEN, V2_MAX_LEN};
        match parse(&buf) {
            Ok(Parsed::Complete { len, .. }) => {
                prop_assert!(len <= buf.len() && len <= V1_MAX_LEN.max(V2_MAX_LEN));
                // The same bytes followed by anything parse to the same header.
                let mut longer = buf.clone();
                longer.extend(b"\x16\x03\x01");
                prop_assert_eq!(parse(&longer), parse(&buf));
            }
            // Incomplete only while short of the longest header.
            Ok(Parsed::Incomplete) => prop_assert!(buf.len() < V2_MAX_LEN),
            Err(_) => {}
        }
    }
}
