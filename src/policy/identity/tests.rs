use std::path::PathBuf;
use std::time::Instant;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

use super::*;

const PULL: Roles = Roles {
    pull: true,
    push: false,
    delete: false,
};
const PULL_PUSH: Roles = Roles {
    pull: true,
    push: true,
    delete: false,
};

fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn password_identity(name: &str, user: &str, password: &str, roles: Roles) -> Identity {
    Identity {
        name: name.to_owned(),
        auth: IdentityAuth::Password {
            username: user.to_owned(),
            password: PasswordCheck::Sha256(sha256(password.as_bytes())),
        },
        roles,
    }
}

fn file_identity(name: &str, user: &str, path: PathBuf) -> Identity {
    Identity {
        name: name.to_owned(),
        auth: IdentityAuth::Password {
            username: user.to_owned(),
            password: PasswordCheck::File(path),
        },
        roles: PULL,
    }
}

fn mtls_identity(name: &str, subject: &str, roles: Roles) -> Identity {
    Identity {
        name: name.to_owned(),
        auth: IdentityAuth::Mtls {
            subject: subject.to_owned(),
        },
        roles,
    }
}

fn who(authn: &Authn) -> Option<(&str, AuthMethod)> {
    match authn {
        Authn::Identity { name, method, .. } => Some((name, *method)),
        _ => None,
    }
}

#[test]
fn parses_basic_credentials() {
    let creds = Credentials::parse_authorization(&basic_header("ci", "s3cr:et")).unwrap();
    let Credentials::Basic { username, password } = &creds;
    assert_eq!(username, "ci");
    assert_eq!(password.expose(), "s3cr:et", "split at the first colon");

    let lower = format!("basic   {}  ", STANDARD_NO_PAD.encode("u:p"));
    let Credentials::Basic { username, password } =
        Credentials::parse_authorization(&lower).unwrap();
    assert_eq!((username.as_str(), password.expose()), ("u", "p"));

    let empty = Credentials::parse_authorization(&basic_header("u", "")).unwrap();
    let Credentials::Basic { password, .. } = empty;
    assert!(password.is_empty());

    let utf8 = Credentials::parse_authorization(&basic_header("jürgen", "pässwörd")).unwrap();
    let Credentials::Basic { username, .. } = utf8;
    assert_eq!(username, "jürgen");
}

#[test]
fn rejects_malformed_and_foreign_schemes() {
    let malformed = [
        "Basic".to_owned(),
        "Basic !!!".to_owned(),
        format!("Basic {}", STANDARD.encode("no-colon")),
        format!("Basic {}", STANDARD.encode([0xff, 0xfe, b':', b'x'])),
        format!("Basic {}", "A".repeat(MAX_AUTHORIZATION_LEN)),
    ];
    for value in &malformed {
        assert_eq!(
            Credentials::parse_authorization(value),
            Err(AuthFailure::Malformed),
            "{value:.40}"
        );
    }
    for value in ["Bearer abc.def", "Digest x", "", "   "] {
        assert_eq!(
            Credentials::parse_authorization(value),
            Err(AuthFailure::UnsupportedScheme),
            "{value}"
        );
    }
}

#[test]
fn debug_never_shows_the_password() {
    let creds = Credentials::parse_authorization(&basic_header("ci", "hunter2")).unwrap();
    let debug = format!("{creds:?}");
    assert!(
        debug.contains("ci") && !debug.contains("hunter2"),
        "{debug}"
    );

    let auth = Authenticator::new(&[password_identity("ci", "ci", "hunter2", PULL)]);
    let debug = format!("{auth:?}");
    let hash_hex = hex::encode(sha256(b"hunter2"));
    assert!(
        !debug.contains("hunter2") && !debug.contains(&hash_hex[..8]),
        "{debug}"
    );
    let hash_debug = format!("{:?}", sha256(b"hunter2"));
    assert!(!debug.contains(&hash_debug), "{debug}");

    let authn = auth.authenticate(Some(&basic_header("ci", "wrong-hunter2")), &[]);
    let shown = format!("{authn:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn sha256_passwords() {
    let auth = Authenticator::new(&[
        password_identity("build-farm", "ci", "right", PULL_PUSH),
        mtls_identity("mesh", "mesh.internal", PULL),
    ]);
    let ok = auth.authenticate(Some(&basic_header("ci", "right")), &[]);
    assert_eq!(
        ok,
        Authn::Identity {
            name: "build-farm".into(),
            roles: PULL_PUSH,
            method: AuthMethod::Basic
        }
    );
    assert_eq!(ok.identity(), Some("build-farm"));
    for (user, password) in [
        ("ci", "wrong"),
        ("ci", "Right"),
        ("ci", ""),
        ("nobody", "right"),
    ] {
        assert_eq!(
            auth.authenticate(Some(&basic_header(user, password)), &[]),
            Authn::BadCredentials(AuthFailure::WrongCredentials),
            "{user}:{password}"
        );
    }
    // Wrong credentials win over a valid certificate: no silent downgrade.
    assert!(matches!(
        auth.authenticate(Some(&basic_header("ci", "wrong")), &["mesh.internal"]),
        Authn::BadCredentials(_)
    ));
    assert_eq!(
        auth.authenticate(Some("Bearer x"), &[]),
        Authn::BadCredentials(AuthFailure::UnsupportedScheme)
    );
}

#[test]
fn same_username_twice_either_password_works() {
    let auth = Authenticator::new(&[
        password_identity("old", "ci", "one", PULL),
        password_identity("new", "ci", "two", PULL_PUSH),
    ]);
    let one = auth.authenticate(Some(&basic_header("ci", "one")), &[]);
    let two = auth.authenticate(Some(&basic_header("ci", "two")), &[]);
    assert_eq!(who(&one), Some(("old", AuthMethod::Basic)));
    assert_eq!(who(&two), Some(("new", AuthMethod::Basic)));
}

#[test]
fn password_file_is_read_when_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.password");
    std::fs::write(&path, "first\n").unwrap();
    let auth = Authenticator::new(&[file_identity("ci", "ci", path.clone())]);
    let check = |p: &str| auth.authenticate(Some(&basic_header("ci", p)), &[]);

    assert_eq!(who(&check("first")), Some(("ci", AuthMethod::Basic)));
    assert!(matches!(check("first\n"), Authn::BadCredentials(_)));
    assert!(matches!(check("second"), Authn::BadCredentials(_)));

    // Rotation without a reload.
    std::fs::write(&path, "  second \r\n").unwrap();
    assert_eq!(who(&check("second")), Some(("ci", AuthMethod::Basic)));
    assert!(matches!(check("first"), Authn::BadCredentials(_)));

    std::fs::remove_file(&path).unwrap();
    let Authn::BadCredentials(failure) = check("second") else {
        panic!("a missing password file authenticates nobody");
    };
    assert_eq!(failure.label(), "password_file_unreadable");
    assert_eq!(
        failure.public_message(),
        "unknown username or wrong password"
    );
    let logged = failure.to_string();
    assert!(
        logged.contains("identity ci") && !logged.contains("second"),
        "{logged}"
    );
}

#[test]
fn mtls_subjects() {
    let auth = Authenticator::new(&[
        mtls_identity("farm", "build-farm.internal", PULL_PUSH),
        mtls_identity("farm-cn", "Build Farm", PULL),
    ]);
    let farm = auth.authenticate(None, &["BUILD-FARM.internal"]);
    assert_eq!(who(&farm), Some(("farm", AuthMethod::Mtls)));
    let Authn::Identity { roles, .. } = farm else {
        unreachable!()
    };
    assert_eq!(roles, PULL_PUSH);
    // Config order decides when a certificate carries two configured subjects.
    let both = auth.authenticate(None, &["Build Farm", "build-farm.internal"]);
    assert_eq!(who(&both), Some(("farm", AuthMethod::Mtls)));
    assert_eq!(
        who(&auth.authenticate(None, &["Build Farm"])),
        Some(("farm-cn", AuthMethod::Mtls))
    );
    // A verified certificate that names no identity, or no certificate.
    assert_eq!(
        auth.authenticate(None, &["other.internal"]),
        Authn::Anonymous
    );
    assert_eq!(auth.authenticate(None, &[]), Authn::Anonymous);
    // No password identity: an Authorization header is ignored, the certificate still counts.
    assert_eq!(
        who(&auth.authenticate(Some("Basic garbage"), &["build-farm.internal"])),
        Some(("farm", AuthMethod::Mtls))
    );
    assert_eq!(auth.authenticate(Some("Bearer x"), &[]), Authn::Anonymous);
}

#[test]
fn basic_and_certificate_together() {
    let auth = Authenticator::new(&[
        mtls_identity("cert", "svc.internal", PULL),
        password_identity("pw", "ci", "right", PULL_PUSH),
    ]);
    let authn = auth.authenticate(Some(&basic_header("ci", "right")), &["svc.internal"]);
    assert_eq!(who(&authn), Some(("pw", AuthMethod::Basic)));
    assert_eq!(
        who(&auth.authenticate(None, &["svc.internal"])),
        Some(("cert", AuthMethod::Mtls))
    );
}

#[test]
fn identity_kinds() {
    assert_eq!(Authenticator::new(&[]).kinds(), IdentityKinds::default());
    let mtls = Authenticator::new(&[mtls_identity("m", "m", PULL)]);
    assert_eq!(
        mtls.kinds(),
        IdentityKinds {
            any: true,
            password: false
        }
    );
    let both = Authenticator::new(&[
        mtls_identity("m", "m", PULL),
        password_identity("p", "p", "p", PULL),
    ]);
    assert!(both.kinds().any && both.kinds().password);
    // No identity at all: credentials are ignored, never "bad".
    let none = Authenticator::new(&[]);
    assert_eq!(
        none.authenticate(Some(&basic_header("a", "b")), &["x"]),
        Authn::Anonymous
    );
}

#[test]
fn failure_labels_and_messages() {
    for (failure, label) in [
        (AuthFailure::Malformed, "malformed"),
        (AuthFailure::UnsupportedScheme, "unsupported_scheme"),
        (AuthFailure::WrongCredentials, "wrong_credentials"),
    ] {
        assert_eq!(failure.label(), label);
        assert_eq!(failure.to_string(), failure.public_message());
    }
    assert_eq!(AuthMethod::Mtls.label(), "mtls");
    assert_eq!(AuthMethod::Basic.label(), "basic");
}

#[test]
fn constant_time_compare_is_correct() {
    let a = sha256(b"a");
    assert!(ct_eq(&a, &a));
    assert!(ct_eq(&[0; 32], &[0; 32]));
    for i in 0..32 {
        for bit in 0..8 {
            let mut b = a;
            b[i] ^= 1 << bit;
            assert!(!ct_eq(&a, &b), "byte {i} bit {bit}");
            assert!(!ct_eq(&b, &a), "byte {i} bit {bit}");
        }
    }
    assert!(!ct_eq(&[0; 32], &[0xff; 32]));
}

/// Prints the cost of equal, first-byte-different and last-byte-different compares; the three
/// should be indistinguishable. Asserts nothing about time.
/// `cargo test --release -- --ignored --nocapture constant_time_compare_timing`
#[test]
#[ignore]
fn constant_time_compare_timing() {
    let a = sha256(b"timing");
    let mut first = a;
    first[0] ^= 1;
    let mut last = a;
    last[31] ^= 1;
    let rounds = 5_000_000u32;
    for (label, b) in [
        ("equal", a),
        ("first byte differs", first),
        ("last byte differs", last),
    ] {
        let started = Instant::now();
        let mut n = 0u32;
        for _ in 0..rounds {
            n += u32::from(ct_eq(std::hint::black_box(&a), std::hint::black_box(&b)));
        }
        let per = started.elapsed().as_nanos() as f64 / f64::from(rounds);
        println!("ct_eq {label:>18}: {per:.2} ns ({n} equal)");
    }
}
