//! Tests for warm planning: image names routed as clients route them, platform strings and
//! selection, blobs of a manifest, config errors naming their key.

use super::*;

const REGISTRIES: &str = r#"
[server]
listen = ["127.0.0.1:5000"]
[cache]
dir = "/tmp/pullgate-warm-plan-test"
pinned_max_size = "1GiB"

[[registry]]
name = "icr"
upstream = "https://icr.io"
ns = ["icr.io"]
[[registry.scoped_credentials]]
name = "build"
repositories = ["build/**"]
credentials = { username = "b", password_file = "/dev/null" }

[[registry]]
name = "hub"
upstream = "https://registry-1.docker.io"
prefix = "hub"
default = true
"#;

fn config(warm: &str) -> Result<Vec<Target>, Vec<Problem>> {
    let text = format!("{REGISTRIES}\n{warm}");
    let config = crate::config::load_str(&text, std::path::Path::new("/")).expect("valid config");
    resolve_config(&config)
}

fn one(warm: &str) -> Target {
    config(warm).expect("resolves").remove(0)
}

fn problems(warm: &str) -> Vec<Problem> {
    config(warm).expect_err("refused")
}

#[test]
fn images_route_in_host_ns_and_prefix_form_as_clients_would() {
    let host = one("[[warm]]\nimage = \"private.icr.io/team/app:1.4\"\n");
    assert_eq!(host.registry, "icr");
    assert_eq!(host.host.as_deref(), Some("private.icr.io"));
    assert_eq!(host.ns, None);
    assert_eq!(host.name, "team/app");
    assert_eq!(host.reference.to_string(), "1.4");

    let ns = one("[[warm]]\nimage = \"icr.io/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n");
    assert_eq!(ns.registry, "icr");
    assert_eq!(
        (ns.host.as_deref(), ns.ns.as_deref()),
        (None, Some("icr.io"))
    );
    assert!(matches!(ns.reference, Reference::Digest(_)));

    let prefix = one("[[warm]]\nimage = \"pullgate.internal:5000/hub/library/alpine\"\n");
    assert_eq!(prefix.registry, "hub");
    assert_eq!(prefix.host.as_deref(), Some("pullgate.internal:5000"));
    assert_eq!(prefix.name, "hub/library/alpine");
    assert_eq!(prefix.repository.as_str(), "library/alpine");
    assert_eq!(
        prefix.reference.to_string(),
        "latest",
        "no tag is latest, as for clients"
    );
}

#[test]
fn bad_entries_are_config_errors_naming_the_key() {
    let p = problems(
        "[[warm]]\nimage = \"private.icr.io/team/app:1.4\"\n\
         [[warm]]\nimage = \"private.icr.io/team/app:1.4\"\nplatforms = [\"linux/amd64\", \"Linux/AMD64\", \"linux\"]\naccount = \"nobody\"\n\
         [[warm]]\nimage = \"private.icr.io/Team/app:1.4\"\n\
         [[warm]]\nimage = \"app\"\n",
    );
    let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "warm[1].platforms[1]",
            "warm[1].platforms[2]",
            "warm[1].account",
            "warm[2].image",
            "warm[3].image"
        ],
        "{p:?}"
    );
    assert!(p[0].1.contains("cannot match"), "{}", p[0].1);
    assert!(
        p[2].1.contains("build"),
        "names the accounts there are: {}",
        p[2].1
    );
}

#[test]
fn an_unknown_registry_is_a_config_error() {
    // Without a default registry an unknown host routes nowhere.
    let text = "[server]\nlisten = [\"127.0.0.1:5000\"]\n[[registry]]\nname = \"icr\"\nupstream = \"https://icr.io\"\n\
                [[warm]]\nimage = \"quay.io/team/app:1\"\n";
    let config = crate::config::load_str(text, std::path::Path::new("/")).expect("valid");
    let p = resolve_config(&config).expect_err("unknown registry");
    assert_eq!(p[0].0, "warm[0].image");
    assert!(p[0].1.contains("routes to no registry"), "{}", p[0].1);
}

#[test]
fn own_values_are_checked_by_config() {
    let text = format!(
        "{}\n[[warm]]\nimage = \"private.icr.io/a:1\"\nrefresh = \"500ms\"\n[[warm]]\nplatforms = []\n",
        REGISTRIES
    );
    let e = crate::config::load_str(&text, std::path::Path::new("/"))
        .expect_err("invalid")
        .to_string();
    assert!(e.contains("warm[0].refresh"), "{e}");
    assert!(e.contains("warm[1].image"), "{e}");
    let no_budget = REGISTRIES.replace(
        "pinned_max_size = \"1GiB\"",
        "warm_bandwidth = \"1KiB/s\"\nwarm_concurrency = 0",
    );
    let e = crate::config::load_str(
        &format!("{no_budget}\n[[warm]]\nimage = \"private.icr.io/a:1\"\npin = true\n"),
        std::path::Path::new("/"),
    )
    .expect_err("invalid")
    .to_string();
    assert!(e.contains("cache.pinned_max_size"), "{e}");
    assert!(e.contains("cache.warm_bandwidth"), "{e}");
    assert!(e.contains("cache.warm_concurrency"), "{e}");
}

#[test]
fn platforms_parse_and_match_index_entries() {
    let arm = Platform::parse("linux/arm64").unwrap();
    assert!(
        arm.matches(&serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"}))
    );
    assert!(!arm.matches(&serde_json::json!({"os": "linux", "architecture": "amd64"})));
    let v8 = Platform::parse("linux/arm64/v8").unwrap();
    assert!(v8.matches(&serde_json::json!({"os": "linux", "architecture": "arm64"})));
    let v7 = Platform::parse("linux/arm/v7").unwrap();
    assert!(
        !v7.matches(&serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v6"}))
    );
    for bad in [
        "linux",
        "linux/amd64/v1/x",
        "Linux/amd64",
        "linux/x86_64",
        "linux/arm/V7",
        "",
    ] {
        assert!(Platform::parse(bad).is_err(), "{bad:?}");
    }
}

fn index() -> Vec<u8> {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d('a'), "size": 10,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d('b'), "size": 11,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d('c'), "size": 12,
             "platform": {"os": "unknown", "architecture": "unknown"}}
        ]
    })
    .to_string()
    .into_bytes()
}

#[test]
fn selection_takes_the_asked_platforms_only_and_names_missing_ones() {
    let amd = select_manifests(&index(), &[Platform::parse("linux/amd64").unwrap()]).unwrap();
    assert_eq!(amd.len(), 1);
    assert!(amd[0].digest.hex().starts_with('a'));
    assert_eq!(amd[0].size, 10);
    assert_eq!(
        select_manifests(&index(), &[]).unwrap().len(),
        3,
        "default: every entry"
    );
    let e = select_manifests(&index(), &[Platform::parse("linux/s390x").unwrap()]).unwrap_err();
    assert!(e.contains("linux/s390x"), "{e}");
    assert!(is_index("", &index()));
    assert!(select_manifests(b"{}", &[]).is_err());
}

#[test]
fn a_manifest_needs_its_config_and_layers_once_each_and_no_foreign_layers() {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('1'), "size": 5},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('2'), "size": 6},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('2'), "size": 6},
            {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": d('3'),
             "size": 7, "urls": ["https://example.com/layer"]}
        ]
    });
    let blobs = blobs_of(manifest.to_string().as_bytes());
    let digests: Vec<String> = blobs.iter().map(|b| b.digest.to_string()).collect();
    assert_eq!(digests, [d('1'), d('2')]);
    assert_eq!(blobs.iter().map(|b| b.size).sum::<u64>(), 11);
    assert!(blobs_of(b"not json").is_empty());
    let referrers =
        serde_json::json!({"manifests": [{"mediaType": "x", "digest": d('4'), "size": 3}]});
    assert_eq!(referrers_of(referrers.to_string().as_bytes()).len(), 1);
}
