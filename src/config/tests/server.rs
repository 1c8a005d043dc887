//! `[server]` tests: listener addresses and clashes, threads, log and audit sinks, TLS files,
//! PROXY protocol and the redirect key.

use std::time::Duration;

use super::*;

#[test]
fn bad_values_in_server() {
    assert_err(
        &format!("[server]\nlisten = [\"localhost:5000\"]\n{HUB}"),
        "server.listen[0]",
        "invalid address",
    );
    assert_err(
        &format!("[server]\nadmin_listen = \"9090\"\n{HUB}"),
        "server.admin_listen",
        "ip:port",
    );
    assert_err(
        &format!("[server]\nthreads = 0\n{HUB}"),
        "server.threads",
        "between 1 and 256",
    );
    assert_err(
        &format!("[server]\nthreads = 257\n{HUB}"),
        "server.threads",
        "between 1 and 256",
    );
    assert_err(
        &format!("[server]\nlog_format = \"xml\"\n{HUB}"),
        "server.log_format",
        "\"text\" or \"json\"",
    );
    assert_err(
        &format!("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n{HUB}"),
        "server.trusted_proxies[0]",
        "invalid CIDR",
    );
    assert_err(
        &format!("[server]\naudit_log = \"\"\n{HUB}"),
        "server.audit_log",
        "stdout",
    );
}

#[test]
fn listeners() {
    assert_err(
        &format!("[server]\nlisten = []\n{HUB}"),
        "server.listen",
        "no listener",
    );
    assert_err(
        &format!("[server]\nlisten = [\"127.0.0.1:5000\", \"127.0.0.1:5000\"]\n{HUB}"),
        "server.listen[1]",
        "already used by server.listen[0]",
    );
    assert_err(
        &format!("[server]\nadmin_listen = \"127.0.0.1:5000\"\n{HUB}"),
        "server.admin_listen",
        "already used by server.listen[0]",
    );
    let dir = dir_with(&["c.pem", "k.pem"]);
    let text = format!(
        "[server]\nlisten = []\n[[server.tls]]\nlisten = \"127.0.0.1:9090\"\ncerts = [{{ cert = \"c.pem\", key = \"k.pem\" }}]\n{HUB}"
    );
    let errs = load_env(&text, dir.path(), &[]).unwrap_err();
    assert_error(
        &errs,
        "server.admin_listen",
        "already used by server.tls[0].listen",
    );
}

#[test]
fn tls_files() {
    let dir = dir_with(&["c.pem"]);
    let text = format!(
        "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncerts = [{{ cert = \"c.pem\", key = \"c.pem\" }}, {{ cert = \"c.pem\", key = \"missing.key\" }}]\nclient_ca = \"no-ca.pem\"\n\n[[server.tls]]\nlisten = \"127.0.0.1:8444\"\ncerts = []\nrequire_client_cert = true\n{HUB}"
    );
    let errs = load_env(&text, dir.path(), &[]).unwrap_err();
    assert_error(&errs, "server.tls[0].certs[1].key", "does not exist");
    assert_error(&errs, "server.tls[0].client_ca", "does not exist");
    assert_error(&errs, "server.tls[1].certs", "at least one");
    assert_error(
        &errs,
        "server.tls[1].require_client_cert",
        "requires client_ca",
    );
    assert!(!errs.has_key("server.tls[0].certs[0].cert"));
}

#[test]
fn proxy_protocol_needs_trusted_proxies_and_exists_only_on_tls_listeners() {
    let dir = dir_with(&["c.pem"]);
    let tls = "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncerts = [{ cert = \"c.pem\", key = \"c.pem\" }]\nproxy_protocol = true\n";
    let errs = load_env(&format!("{tls}{HUB}"), dir.path(), &[]).unwrap_err();
    assert_error(
        &errs,
        "server.tls[0].proxy_protocol",
        "needs server.trusted_proxies",
    );
    let trusted = format!("[server]\ntrusted_proxies = [\"10.0.0.5\"]\n{tls}{HUB}");
    let config = load_env(&trusted, dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.server.tls[0].proxy_protocol);
    // Plain listeners have no hook before the request: the key does not exist there.
    let errs = errors(&format!(
        "[server]\ntrusted_proxies = [\"10.0.0.5\"]\nproxy_protocol = true\n{HUB}"
    ));
    assert!(errs.to_string().contains("proxy_protocol"), "{errs}");
}

#[test]
fn redirect_key_file_and_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let with = |server: &str| load_str(&format!("[server]\n{server}\n{HUB}"), dir.path());
    let config = with("").expect("defaults");
    assert_eq!(config.server.redirect_key_file, None);
    assert_eq!(config.server.redirect_ttl, Duration::from_secs(300));

    std::fs::write(
        dir.path().join("good.key"),
        "0123456789abcdef0123456789abcdef01\n",
    )
    .expect("write");
    let config = with("redirect_key_file = \"good.key\"\nredirect_ttl = \"90s\"").expect("ok");
    assert_eq!(
        config.server.redirect_key_file,
        Some(dir.path().join("good.key"))
    );
    assert_eq!(config.server.redirect_ttl, Duration::from_secs(90));

    std::fs::write(dir.path().join("short.key"), "hunter2-but-short\n").expect("write");
    let err = with("redirect_key_file = \"short.key\"")
        .expect_err("too short")
        .to_string();
    assert!(err.contains("server.redirect_key_file"), "{err}");
    assert!(err.contains("at least 32 bytes"), "{err}");
    assert!(!err.contains("hunter2"), "the key is never shown: {err}");
    let err = with("redirect_key_file = \"absent.key\"")
        .expect_err("missing")
        .to_string();
    assert!(err.contains("server.redirect_key_file"), "{err}");
    for bad in ["0s", "25h", "soon"] {
        let err = with(&format!("redirect_ttl = \"{bad}\""))
            .expect_err("bad ttl")
            .to_string();
        assert!(err.contains("server.redirect_ttl"), "{bad}: {err}");
    }
}
