//! `[[registry.signatures]]`: keys that are PEM public keys of a supported type, each error
//! naming its `keys[i]`; the mode; the fingerprint a verdict is cached under; and the
//! `signatures-never-match` rule.

use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

use super::*;
use crate::config::SignatureMode;

fn p256_pem() -> String {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let mut der = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
    der.extend_from_slice(pair.public_key().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
}

fn registry_with(extra: &str, policy: &str) -> String {
    format!("[[registry]]\nname = \"icr\"\nupstream = \"https://icr.example\"\n{extra}\n{policy}")
}

fn load_in(dir: &Path, text: &str) -> Result<Config, ConfigErrors> {
    load_env(text, dir, &[])
}

#[test]
fn signature_policies_load_keys_and_name_each_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("team-a.pub"), p256_pem()).unwrap();
    std::fs::write(
        dir.path().join("private.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("junk.pub"), "hello").unwrap();
    let policy =
        "[[registry.signatures]]\nrepositories = [\"team-a/**\"]\nkeys = [\"team-a.pub\"]\n";
    let config = load_in(dir.path(), &registry_with("", policy)).unwrap();
    let p = &config.registries[0].signatures[0];
    assert_eq!(p.key, "registry.icr.signatures[0]");
    assert_eq!(p.mode, SignatureMode::Enforce);
    assert_eq!(p.repositories, ["team-a/**"]);
    assert_eq!(p.keys.len(), 1);

    let bad = "[[registry.signatures]]\nkeys = [\"team-a.pub\", \"private.pem\", \"junk.pub\", \"missing.pub\"]\nmode = \"warn\"\nrepositories = [\"Team\"]\n[[registry.signatures]]\n";
    let errs = load_in(dir.path(), &registry_with("", bad)).unwrap_err();
    assert_error(&errs, "registry.icr.signatures[0].keys[1]", "private key");
    assert_error(&errs, "registry.icr.signatures[0].keys[2]", "not a PEM");
    assert_error(&errs, "registry.icr.signatures[0].keys[3]", "missing.pub");
    assert_error(
        &errs,
        "registry.icr.signatures[0].mode",
        "\"enforce\" or \"audit\"",
    );
    assert_error(
        &errs,
        "registry.icr.signatures[0].repositories[0]",
        "invalid glob",
    );
    assert_error(&errs, "registry.icr.signatures[1].keys", "at least one");
    assert!(!errs.0.iter().any(|e| e.key.ends_with("keys[0]")), "{errs}");
}

#[test]
fn the_fingerprint_changes_with_the_keys_mode_and_globs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.pub"), p256_pem()).unwrap();
    std::fs::write(dir.path().join("b.pub"), p256_pem()).unwrap();
    let fp = |policy: &str| {
        load_in(dir.path(), &registry_with("", policy))
            .unwrap()
            .registries[0]
            .signatures[0]
            .fingerprint
            .clone()
    };
    let base = fp("[[registry.signatures]]\nkeys = [\"a.pub\"]\n");
    assert_eq!(base, fp("[[registry.signatures]]\nkeys = [\"a.pub\"]\n"));
    assert_ne!(base, fp("[[registry.signatures]]\nkeys = [\"b.pub\"]\n"));
    assert_ne!(
        base,
        fp("[[registry.signatures]]\nkeys = [\"a.pub\"]\nmode = \"audit\"\n")
    );
    assert_ne!(
        base,
        fp("[[registry.signatures]]\nkeys = [\"a.pub\"]\nrepositories = [\"x/**\"]\n")
    );
    // The key file rewritten in place is a new policy too.
    std::fs::write(dir.path().join("a.pub"), p256_pem()).unwrap();
    assert_ne!(base, fp("[[registry.signatures]]\nkeys = [\"a.pub\"]\n"));
}

#[test]
fn policies_that_can_match_nothing_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.pub"), p256_pem()).unwrap();
    let warned = |extra: &str, policy: &str| {
        load_in(dir.path(), &registry_with(extra, policy))
            .unwrap()
            .warnings
            .into_iter()
            .filter(|w| w.message.contains("[signatures-never-match]"))
            .map(|w| format!("{}: {}", w.key, w.message))
            .collect::<Vec<_>>()
    };
    let p = |globs: &str| {
        format!("[[registry.signatures]]\nkeys = [\"a.pub\"]\nrepositories = [{globs}]\n")
    };
    assert!(warned("repositories = [\"team-a/**\"]", &p("\"team-a/app\"")).is_empty());
    assert!(warned("repositories = [\"team-*\"]", &p("\"team-a/**\"")).is_empty());
    assert!(warned("", &p("\"anything/**\"")).is_empty());
    let outside = warned(
        "repositories = [\"team-a/**\"]",
        &p("\"team-b/**\", \"other\""),
    );
    assert_eq!(outside.len(), 1, "{outside:?}");
    assert!(
        outside[0].starts_with("registry.icr.signatures[0]: "),
        "{outside:?}"
    );
    assert!(
        outside[0].contains("registry.icr.repositories"),
        "{outside:?}"
    );
    let denied = warned("deny_repositories = [\"team-b/**\"]", &p("\"team-b/**\""));
    assert!(denied[0].contains("deny_repositories"), "{denied:?}");
    let shadowed = warned(
        "",
        &format!(
            "[[registry.signatures]]\nkeys = [\"a.pub\"]\n{}",
            p("\"x\"")
        ),
    );
    assert!(
        shadowed[0].starts_with("registry.icr.signatures[1]"),
        "{shadowed:?}"
    );
    assert!(shadowed[0].contains("signatures[0]"), "{shadowed:?}");
}
