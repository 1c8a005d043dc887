use std::path::{Path, PathBuf};

use super::*;

/// A self-signed certificate for `names` (the first is also the CN), written as PEM files
/// `<stem>.crt` and `<stem>.key` in `dir`.
fn make_pair(dir: &Path, stem: &str, names: &[&str]) -> CertPair {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    let cert = params.self_signed(&key).unwrap();
    let pair = CertPair {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&pair.cert, cert.pem()).unwrap();
    std::fs::write(&pair.key, key.serialize_pem()).unwrap();
    pair
}

fn leaf_der(pair: &CertPair) -> Vec<u8> {
    let pem = std::fs::read(&pair.cert).unwrap();
    let first = rustls_pemfile::certs(&mut pem.as_slice()).next();
    first.unwrap().unwrap().to_vec()
}

fn served(resolver: &CertResolver, sni: Option<&str>) -> Vec<u8> {
    resolver.chain_for(sni)[0].to_vec()
}

/// Replaces a pair's files with those of `from` (rename, as deploy tools do).
fn swap_in(pair: &CertPair, from: &CertPair) {
    for (src, dst) in [(&from.cert, &pair.cert), (&from.key, &pair.key)] {
        let tmp: PathBuf = dst.with_extension("new");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
}

#[test]
fn sni_picks_exact_then_wildcard_then_the_first_pair() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_pair(dir.path(), "a", &["private.a.test", "alt.a.test"]);
    let b = make_pair(dir.path(), "b", &["*.b.test"]);
    let c = make_pair(dir.path(), "c", &["private.a.test", "c.test"]);
    let r = CertResolver::load("server.tls[0]", &[a.clone(), b.clone(), c.clone()]).unwrap();
    let (a, b, c) = (leaf_der(&a), leaf_der(&b), leaf_der(&c));
    assert_eq!(served(&r, Some("private.a.test")), a);
    assert_eq!(
        served(&r, Some("ALT.A.test.")),
        a,
        "case and a trailing dot"
    );
    assert_eq!(served(&r, Some("x.b.test")), b);
    assert_eq!(served(&r, Some("c.test")), c);
    // A wildcard covers one label only.
    assert_eq!(served(&r, Some("y.x.b.test")), a);
    assert_eq!(served(&r, Some("b.test")), a);
    // No SNI, or a name nobody claims: the first pair.
    assert_eq!(served(&r, None), a);
    assert_eq!(served(&r, Some("unknown.test")), a);
}

#[test]
fn load_errors_name_the_key_and_never_quote_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_pair(dir.path(), "a", &["a.test"]);
    let b = make_pair(dir.path(), "b", &["b.test"]);
    let mismatched = CertPair {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    let err = CertResolver::load("server.tls[1]", &[a.clone(), mismatched]).unwrap_err();
    assert!(err.starts_with("server.tls[1].certs[1]:"), "{err}");
    assert!(err.contains("does not belong"), "{err}");

    let missing = CertPair {
        cert: dir.path().join("nope.crt"),
        key: a.key.clone(),
    };
    let err = CertResolver::load("server.tls[0]", &[missing]).unwrap_err();
    assert!(err.starts_with("server.tls[0].certs[0].cert:"), "{err}");

    let secret_words = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n";
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, secret_words).unwrap();
    let err = CertResolver::load(
        "server.tls[0]",
        &[CertPair {
            cert: a.cert.clone(),
            key: garbage,
        }],
    )
    .unwrap_err();
    assert!(err.starts_with("server.tls[0].certs[0].key:"), "{err}");
    assert!(!err.contains("c2VjcmV0"), "{err}");

    let no_cert = dir.path().join("empty.crt");
    std::fs::write(&no_cert, "hello\n").unwrap();
    let err = CertResolver::load(
        "server.tls[0]",
        &[CertPair {
            cert: no_cert,
            key: a.key.clone(),
        }],
    )
    .unwrap_err();
    assert!(err.contains("no PEM CERTIFICATE"), "{err}");
}

#[test]
fn refresh_reloads_changed_files_and_keeps_the_old_pair_when_new_files_are_broken() {
    let dir = tempfile::tempdir().unwrap();
    let live = make_pair(dir.path(), "live", &["a.test"]);
    let first = leaf_der(&live);
    let r = CertResolver::load("server.tls[0]", std::slice::from_ref(&live)).unwrap();

    let report = r.refresh(false);
    assert!(report.reloaded.is_empty() && report.failed.is_empty());

    let next = make_pair(dir.path(), "next", &["a.test"]);
    swap_in(&live, &next);
    let report = r.refresh(false);
    assert_eq!(report.reloaded, ["server.tls[0].certs[0]"]);
    assert_eq!(served(&r, Some("a.test")), leaf_der(&next));
    assert_ne!(served(&r, Some("a.test")), first);

    // A broken certificate: the pair in use stays, the failure names the key, once.
    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    let report = r.refresh(false);
    assert!(report.reloaded.is_empty());
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0].starts_with("server.tls[0].certs[0]"),
        "{:?}",
        report.failed
    );
    assert_eq!(served(&r, Some("a.test")), leaf_der(&next));
    assert!(r.refresh(false).failed.is_empty(), "reported once");

    // Half a swap (new cert, old key) is also kept out.
    let third = make_pair(dir.path(), "third", &["a.test"]);
    std::fs::copy(&third.cert, &live.cert).unwrap();
    let report = r.refresh(false);
    assert!(report.failed[0].contains("does not belong"), "{report:?}");
    assert_eq!(served(&r, Some("a.test")), leaf_der(&next));
    // ... until the key follows.
    std::fs::copy(&third.key, &live.key).unwrap();
    assert_eq!(r.refresh(false).reloaded.len(), 1);
    assert_eq!(served(&r, Some("a.test")), leaf_der(&third));

    // `force` (SIGHUP) re-reads unchanged files too.
    assert_eq!(r.refresh(true).reloaded.len(), 1);
}

#[test]
fn client_certificate_subjects_are_the_cn_and_dns_sans_once_each() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![
        "build-farm.internal".to_string(),
        "Build-Farm.Internal".to_string(),
        "10.0.0.1".to_string(),
        "ci.internal".to_string(),
    ])
    .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "build-farm.internal");
    let cert = params.self_signed(&key).unwrap();
    assert_eq!(
        certificate_subjects(cert.der()),
        ["build-farm.internal", "ci.internal"]
    );
    assert!(certificate_subjects(b"not a certificate").is_empty());
}

#[test]
fn client_ca_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "nothing here\n").unwrap();
    let err = client_verifier("server.tls[2]", &ca, false).expect_err("no CA in the file");
    assert!(err.starts_with("server.tls[2].client_ca:"), "{err}");
    let a = make_pair(dir.path(), "a", &["a.test"]);
    assert!(client_verifier("server.tls[0]", &a.cert, true).is_ok());
}
