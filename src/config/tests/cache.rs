//! `[cache]` tests: the default and absolute cache dir, and the manifest size bounds. Size and
//! duration syntax is in `values.rs`.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

#[test]
fn load_str_defaults_cache_dir_and_absolute_paths_stay() {
    let config = load_str(HUB, Path::new("/x")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.cache.dir, PathBuf::from("/var/cache/pullgate"));
    let config = ok(&format!("[cache]\ndir = \"/srv/c\"\n{HUB}"));
    assert_eq!(config.cache.dir, PathBuf::from("/srv/c"));
}

#[test]
fn manifest_size_bounds() {
    assert_err(
        &format!("[cache]\nmax_manifest_size = \"512B\"\n{HUB}"),
        "cache.max_manifest_size",
        "between 1KiB and 64MiB",
    );
    assert_err(
        &format!("[cache]\nmax_manifest_size = \"65MiB\"\n{HUB}"),
        "cache.max_manifest_size",
        "between",
    );
    ok(&format!("[cache]\nmax_manifest_size = \"64MiB\"\n{HUB}"));
}

#[test]
fn encryption_with_the_file_provider_and_its_defaults() {
    let dir = dir_with(&["cache.kek"]);
    let kek = dir.path().join("cache.kek");
    let text = format!(
        "[cache.encryption]\nprovider = \"file\"\nkey_file = \"{}\"\n{HUB}",
        kek.display()
    );
    let enc = ok(&text).cache.encryption.expect("encryption on");
    assert_eq!(enc.provider, KeyProvider::File { key_file: kek });
    assert_eq!(enc.rotate, Duration::from_secs(24 * 3600));
    assert_eq!(enc.unavailable_grace, Duration::from_secs(3600));
    assert_eq!(enc.on_revoked, OnRevoked::Passthrough);
    assert!(enc.check_interval <= Duration::from_secs(60));
    assert!(ok(HUB).cache.encryption.is_none());
}

#[test]
fn encryption_errors_name_their_key() {
    assert_err(
        &format!("[cache.encryption]\nkey_file = \"/k\"\n{HUB}"),
        "cache.encryption.provider",
        "is required",
    );
    assert_err(
        &format!("[cache.encryption]\nprovider = \"kms\"\n{HUB}"),
        "cache.encryption.provider",
        "\"file\", \"transit\" or \"exec\"",
    );
    assert_err(
        &format!("[cache.encryption]\nprovider = \"file\"\n{HUB}"),
        "cache.encryption.key_file",
        "is required",
    );
    assert_err(
        &format!("[cache.encryption]\nprovider = \"file\"\nkey_file = \"/nonexistent/k\"\n{HUB}"),
        "cache.encryption.key_file",
        "does not exist",
    );
    assert_err(
        &format!(
            "[cache.encryption]\nprovider = \"exec\"\ncommand = [\"h\"]\nkey_file = \"/k\"\n{HUB}"
        ),
        "cache.encryption.key_file",
        "does not apply",
    );
    assert_err(
        &format!("[cache.encryption]\nprovider = \"exec\"\ncommand = []\n{HUB}"),
        "cache.encryption.command",
        "is required",
    );
    assert_err(
        &format!("[cache.encryption]\nprovider = \"transit\"\naddress = \"bao:8200\"\nkey = \"k\"\ntoken_file = \"/t\"\n{HUB}"),
        "cache.encryption.address",
        "http(s) URL",
    );
    assert_err(
        &format!("[cache.encryption]\nprovider = \"exec\"\ncommand = [\"h\"]\non_revoked = \"drop\"\n{HUB}"),
        "cache.encryption.on_revoked",
        "\"passthrough\" or \"deny\"",
    );
    assert_err(
        &format!("[cache.encryption]\nprovider = \"exec\"\ncommand = [\"h\"]\ncheck_interval = \"5m\"\n{HUB}"),
        "cache.encryption.check_interval",
        "between 100ms and 60s",
    );
    assert_err(
        &format!(
            "[cache.encryption]\nprovider = \"exec\"\ncommand = [\"h\"]\nrotate = \"soon\"\n{HUB}"
        ),
        "cache.encryption.rotate",
        "",
    );
}

#[test]
fn encryption_with_transit_and_exec() {
    let dir = dir_with(&["token", "ca.pem"]);
    let text = format!(
        "[cache.encryption]\nprovider = \"transit\"\naddress = \"https://bao.internal:8200\"\nkey = \"pullgate\"\ntoken_file = \"{}\"\nca = \"{}\"\non_revoked = \"deny\"\nunavailable_grace = \"10m\"\n{HUB}",
        dir.path().join("token").display(),
        dir.path().join("ca.pem").display()
    );
    let enc = ok(&text).cache.encryption.unwrap();
    assert!(matches!(enc.provider, KeyProvider::Transit { ref key, .. } if key == "pullgate"));
    assert_eq!(enc.on_revoked, OnRevoked::Deny);
    assert_eq!(enc.unavailable_grace, Duration::from_secs(600));
    let enc = ok(&format!(
        "[cache.encryption]\nprovider = \"exec\"\ncommand = [\"/bin/helper\", \"--key\", \"k\"]\n{HUB}"
    ))
    .cache
    .encryption
    .unwrap();
    assert_eq!(enc.provider.name(), "exec");
}

#[test]
fn check_warns_about_a_world_readable_key_and_an_exposed_admin_listener() {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir_with(&["cache.kek"]);
    let kek = dir.path().join("cache.kek");
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = format!(
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\n[cache.encryption]\nprovider = \"file\"\nkey_file = \"{}\"\n{HUB}",
        kek.display()
    );
    let config = ok(&text);
    let has = |rule: &str, key: &str| {
        config
            .warnings
            .iter()
            .any(|w| w.key == key && w.message.contains(rule))
    };
    assert!(has("[key-world-readable]", "cache.encryption.key_file"));
    assert!(has("[keys-admin-exposed]", "server.admin_listen"));
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = ok(&text.replace("0.0.0.0:9090", "127.0.0.1:9090"));
    assert!(
        !config.warnings.iter().any(|w| w.message.contains("key")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn check_warns_about_an_exec_helper_that_cannot_run() {
    let config = ok(&format!(
        "[cache.encryption]\nprovider = \"exec\"\ncommand = [\"/nonexistent/kms-helper\"]\n{HUB}"
    ));
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.key == "cache.encryption.command"
                && w.message.contains("[kms-helper-missing]"))
    );
    // A name looked up on PATH is left alone.
    let config = ok(&format!(
        "[cache.encryption]\nprovider = \"exec\"\ncommand = [\"python3\", \"h.py\"]\n{HUB}"
    ));
    assert!(!config
        .warnings
        .iter()
        .any(|w| w.message.contains("kms-helper")));
}

#[test]
fn l2_bucket_prefix_endpoint_and_credentials() {
    let dir = dir_with(&["s3.secret"]);
    let secret = dir.path().join("s3.secret");
    // PATH is set in every environment the tests run in.
    let text = format!(
        "[cache.l2]\nurl = \"s3://pullgate-cache/blobs/\"\nendpoint = \"http://127.0.0.1:9000\"\n\
         access_key_id_env = \"PATH\"\nsecret_access_key_file = \"{}\"\n{HUB}",
        secret.display()
    );
    let l2 = ok(&text).cache.l2.expect("l2 on");
    assert_eq!(
        (l2.bucket.as_str(), l2.prefix.as_str()),
        ("pullgate-cache", "blobs")
    );
    assert_eq!(l2.region, "us-east-1");
    assert_eq!(
        l2.endpoint.as_ref().map(|u| u.as_str()),
        Some("http://127.0.0.1:9000/")
    );
    assert_eq!(l2.secret_access_key_file, Some(secret));
    let bare = ok(&format!("[cache.l2]\nurl = \"s3://b\"\n{HUB}"))
        .cache
        .l2
        .unwrap();
    assert_eq!((bare.prefix.as_str(), bare.endpoint), ("", None));
    assert!(ok(HUB).cache.l2.is_none());
}

#[test]
fn l2_errors_name_their_key() {
    assert_err(
        &format!("[cache.l2]\nregion = \"eu-west-1\"\n{HUB}"),
        "cache.l2.url",
        "is required",
    );
    assert_err(
        &format!("[cache.l2]\nurl = \"gs://bucket\"\n{HUB}"),
        "cache.l2.url",
        "only s3://",
    );
    assert_err(
        &format!("[cache.l2]\nurl = \"s3://b\"\nendpoint = \"s3.internal:9000\"\n{HUB}"),
        "cache.l2.endpoint",
        "http(s) URL",
    );
    assert_err(
        &format!("[cache.l2]\nurl = \"s3://b\"\naccess_key_id_env = \"PATH\"\n{HUB}"),
        "cache.l2.access_key_id_env",
        "or neither",
    );
    let dir = dir_with(&["s3.secret"]);
    assert_err(
        &format!(
            "[cache.l2]\nurl = \"s3://b\"\naccess_key_id_env = \"PULLGATE_NO_SUCH_VARIABLE\"\n\
             secret_access_key_file = \"{}\"\n{HUB}",
            dir.path().join("s3.secret").display()
        ),
        "cache.l2.access_key_id_env",
        "is not set",
    );
    // The object store together with the encrypted cache: objects are sealed the same way.
    let kek = dir_with(&["cache.kek"]);
    let config = ok(&format!(
        "[cache.l2]\nurl = \"s3://b\"\n[cache.encryption]\nprovider = \"file\"\n\
         key_file = \"{}\"\n{HUB}",
        kek.path().join("cache.kek").display()
    ));
    assert!(config.cache.l2.is_some() && config.cache.encryption.is_some());
}
