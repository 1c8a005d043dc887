//! Signing and verification without a server: every bound field, the expiry, the key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

const DIGEST: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
const OTHER_DIGEST: &str =
    "sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

fn key(byte: u8) -> RedirectKey {
    RedirectKey::from_bytes(&[byte; 32]).expect("32 bytes")
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn grant(account: Option<&str>) -> Grant {
    Grant {
        registry: "icr".into(),
        account: account.map(str::to_owned),
        repository: "team/app".into(),
        digest: DIGEST.into(),
        expires: 1_000_300,
    }
}

/// The signed query of `grant`, read back as a data host would.
fn presented(key: &RedirectKey, grant: &Grant) -> Presented {
    Presented::from_query(&key.signed_query(grant)).expect("all parameters present")
}

#[test]
fn a_signed_grant_verifies_for_exactly_what_was_signed() {
    let k = key(7);
    for account in [None, Some("build")] {
        let g = grant(account);
        let p = presented(&k, &g);
        let ok = k
            .verify(&p, "icr", "team/app", DIGEST, at(1_000_000))
            .expect("valid");
        assert_eq!(ok, g);
    }
}

#[test]
fn every_bound_field_changed_is_invalid() {
    let k = key(7);
    let g = grant(None);
    let p = presented(&k, &g);
    let now = at(1_000_000);
    let invalid = Err(SignatureError::Invalid);
    assert_eq!(k.verify(&p, "ghcr", "team/app", DIGEST, now), invalid);
    assert_eq!(k.verify(&p, "icr", "team/other", DIGEST, now), invalid);
    assert_eq!(k.verify(&p, "icr", "team/app/x", DIGEST, now), invalid);
    assert_eq!(k.verify(&p, "icr", "team/app", OTHER_DIGEST, now), invalid);

    // The account: added, removed, changed.
    let scoped = Presented {
        account: Some("build".into()),
        ..p.clone()
    };
    assert_eq!(k.verify(&scoped, "icr", "team/app", DIGEST, now), invalid);
    let ps = presented(&k, &grant(Some("build")));
    let own = Presented {
        account: None,
        ..ps.clone()
    };
    assert_eq!(k.verify(&own, "icr", "team/app", DIGEST, now), invalid);
    let empty = Presented {
        account: Some(String::new()),
        ..p.clone()
    };
    assert_eq!(k.verify(&empty, "icr", "team/app", DIGEST, now), invalid);

    // The expiry pushed later, or written differently.
    for expires in [
        "1000301",
        "9999999999",
        "01000300",
        "+1000300",
        " 1000300",
        "",
        "x",
    ] {
        let moved = Presented {
            expires: expires.into(),
            ..p.clone()
        };
        assert_eq!(
            k.verify(&moved, "icr", "team/app", DIGEST, now),
            invalid,
            "{expires:?}"
        );
    }
}

#[test]
fn a_tampered_or_malformed_signature_is_invalid() {
    let k = key(7);
    let p = presented(&k, &grant(None));
    let now = at(1_000_000);
    let mut flipped = p.signature.clone().into_bytes();
    flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
    for signature in [
        String::from_utf8(flipped).expect("ascii"),
        p.signature[..p.signature.len() - 1].to_string(),
        format!("{}AA", p.signature),
        String::new(),
        "not base64!".into(),
    ] {
        let bad = Presented {
            signature: signature.clone(),
            ..p.clone()
        };
        assert_eq!(
            k.verify(&bad, "icr", "team/app", DIGEST, now),
            Err(SignatureError::Invalid),
            "{signature:?}"
        );
    }
}

#[test]
fn another_key_does_not_verify() {
    let p = presented(&key(7), &grant(None));
    assert_eq!(
        key(8).verify(&p, "icr", "team/app", DIGEST, at(1_000_000)),
        Err(SignatureError::Invalid)
    );
}

#[test]
fn expiry_is_checked_after_the_mac() {
    let k = key(7);
    let g = grant(None);
    let p = presented(&k, &g);
    assert!(k
        .verify(&p, "icr", "team/app", DIGEST, at(g.expires))
        .is_ok());
    assert_eq!(
        k.verify(&p, "icr", "team/app", DIGEST, at(g.expires + 1)),
        Err(SignatureError::Expired {
            expired_at: g.expires,
            now: g.expires + 1
        })
    );
    // A forged URL is invalid, never "expired": nothing about genuine URLs leaks.
    assert_eq!(
        k.verify(&p, "icr", "team/x", DIGEST, at(g.expires + 1)),
        Err(SignatureError::Invalid)
    );
    assert_eq!(expiry(at(100), Duration::from_secs(300)), 400);
    assert_eq!(expiry(at(100), Duration::ZERO), 101);
}

#[test]
fn missing_parameters_are_missing_and_first_occurrences_count() {
    assert_eq!(Presented::from_query(""), Err(SignatureError::Missing));
    assert_eq!(
        Presented::from_query("expires=5"),
        Err(SignatureError::Missing)
    );
    assert_eq!(
        Presented::from_query("signature=abc"),
        Err(SignatureError::Missing)
    );
    let p = Presented::from_query("signature=a&expires=5&signature=b&account=x&account=y")
        .expect("present");
    assert_eq!(
        p,
        Presented {
            account: Some("x".into()),
            expires: "5".into(),
            signature: "a".into()
        }
    );
}

#[test]
fn signed_query_is_url_safe_and_carries_the_account_only_when_scoped() {
    let k = key(7);
    let own = k.signed_query(&grant(None));
    assert!(own.starts_with("expires=1000300&signature="), "{own}");
    assert!(!own.contains("account"));
    let scoped = k.signed_query(&grant(Some("build")));
    assert!(scoped.starts_with("account=build&expires="), "{scoped}");
    let sig = k.sign(&grant(None));
    assert_eq!(sig.len(), 43);
    assert!(sig
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
}

#[test]
fn short_keys_are_refused_and_the_key_never_prints() {
    let err = RedirectKey::from_bytes(b"  short-secret  \n").expect_err("too short");
    assert!(err.contains("at least 32 bytes"), "{err}");
    assert!(!err.contains("short-secret"), "{err}");
    let k = RedirectKey::from_bytes(b"0123456789abcdef0123456789abcdef\n").expect("ok");
    assert_eq!(format!("{k:?}"), "RedirectKey(<redacted>)");
    // Surrounding whitespace is not part of the key.
    let same = RedirectKey::from_bytes(b"\t0123456789abcdef0123456789abcdef").expect("ok");
    let p = presented(&k, &grant(None));
    assert!(same
        .verify(&p, "icr", "team/app", DIGEST, at(1_000_000))
        .is_ok());
}

#[test]
fn the_generated_key_is_private_kept_and_shared() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let first = RedirectKey::load_or_create(&cache).expect("created");
    let path = cache.join(GENERATED_KEY_FILE);
    let mode = std::fs::metadata(&path)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A restart (or a second process) reads the same key.
    let again = RedirectKey::load_or_create(&cache).expect("read");
    let p = presented(&first, &grant(None));
    assert!(again
        .verify(&p, "icr", "team/app", DIGEST, at(1_000_000))
        .is_ok());
    // Nothing else was left in the cache dir.
    let names: Vec<_> = std::fs::read_dir(&cache)
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(GENERATED_KEY_FILE)]);
    // Another cache dir: another key.
    let other = RedirectKey::load_or_create(&dir.path().join("other")).expect("created");
    assert_eq!(
        other.verify(&p, "icr", "team/app", DIGEST, at(1_000_000)),
        Err(SignatureError::Invalid)
    );
}

#[test]
fn processes_racing_on_one_cache_dir_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().to_path_buf();
    let keys: Vec<RedirectKey> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| RedirectKey::load_or_create(&cache).expect("key")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    let p = presented(&keys[0], &grant(None));
    for k in &keys {
        assert!(k
            .verify(&p, "icr", "team/app", DIGEST, at(1_000_000))
            .is_ok());
    }
}

#[test]
fn peer_requests_and_blob_urls_never_stand_for_each_other() {
    let k = key(7);
    let g = grant(Some("build"));
    let peer = Presented::from_query(&k.peer_query(&g)).expect("parameters");
    assert_eq!(
        k.verify_peer(&peer, "icr", "team/app", DIGEST, at(1_000_000)),
        Ok(g.clone())
    );
    assert_eq!(
        k.verify(&peer, "icr", "team/app", DIGEST, at(1_000_000)),
        Err(SignatureError::Invalid)
    );
    let url = presented(&k, &g);
    assert_eq!(
        k.verify_peer(&url, "icr", "team/app", DIGEST, at(1_000_000)),
        Err(SignatureError::Invalid)
    );
    let other = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    assert_eq!(
        k.verify_peer(&peer, "icr", "team/app", other, at(1_000_000)),
        Err(SignatureError::Invalid)
    );
    assert!(matches!(
        k.verify_peer(&peer, "icr", "team/app", DIGEST, at(1_000_301)),
        Err(SignatureError::Expired { .. })
    ));
}

#[test]
fn peer_tag_requests_are_their_own_context() {
    let k = key(7);
    let mut g = grant(Some("build"));
    g.digest = "v1.2".to_owned();
    let tag = Presented::from_query(&k.peer_tag_query(&g)).expect("parameters");
    assert_eq!(
        k.verify_peer_tag(&tag, "icr", "team/app", "v1.2", at(1_000_000)),
        Ok(g.clone())
    );
    assert_eq!(
        k.verify_peer_tag(&tag, "icr", "team/app", "latest", at(1_000_000)),
        Err(SignatureError::Invalid),
        "another tag"
    );
    assert_eq!(
        k.verify_peer(&tag, "icr", "team/app", "v1.2", at(1_000_000)),
        Err(SignatureError::Invalid),
        "a tag grant is no blob grant"
    );
    let blob = Presented::from_query(&k.peer_query(&grant(Some("build")))).expect("parameters");
    assert_eq!(
        k.verify_peer_tag(&blob, "icr", "team/app", DIGEST, at(1_000_000)),
        Err(SignatureError::Invalid),
        "a blob grant is no tag grant"
    );
}
