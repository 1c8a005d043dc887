//! Warning tests: defaults never warn, and each audit rule names itself and the key.

use super::*;

#[test]
fn warnings_only_for_non_default_values() {
    let config = ok(&format!(
        "[server]\nadmin_listen = \"127.0.0.1:9090\"\naudit_log = \"stdout\"\n{HUB}network_access = \"enabled\"\ntrusted_identities = true\npush = false\nredirect = \"follow\"\n"
    ));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let config = ok(&format!("[server]\naudit_log = \"/tmp/audit.log\"\n{HUB}"));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn audit_rules_name_the_rule_and_the_key() {
    let findings = |text: &str| -> Vec<String> {
        ok(text)
            .warnings
            .iter()
            .map(|w| format!("{} {}", w.key, w.message))
            .collect()
    };
    let open = findings(&format!(
        "[server]\nlisten = [\"0.0.0.0:5000\"]\n{HUB}credentials = {{ username = \"u\", password = \"p\" }}\n"
    ));
    assert!(
        open.iter()
            .any(|f| f.starts_with("registry.hub.network_access [open-credentials]")),
        "{open:?}"
    );
    assert!(
        open.iter().any(|f| f.contains("[inline-password]")),
        "{open:?}"
    );
    let loopback = findings(&format!(
        "[server]\nlisten = [\"127.0.0.1:5000\"]\n{HUB}credentials = {{ username = \"u\", password_file = \"/dev/null\" }}\n"
    ));
    assert!(
        loopback.is_empty(),
        "a loopback mirror is fine: {loopback:?}"
    );
    let exposed = findings(&format!(
        "[server]\nlisten = [\"0.0.0.0:5000\"]\nadmin_listen = \"0.0.0.0:9090\"\n[zones]\nall = [\"0.0.0.0/0\"]\n\
         [[identity]]\nname = \"ci\"\nusername = \"ci\"\npassword_sha256 = \"{}\"\n{HUB}",
        "5e".repeat(32)
    ));
    for want in [
        "server.listen [plaintext-passwords]",
        "server.admin_listen [admin-exposed]",
        "zones.all [zone-everything]",
    ] {
        assert!(
            exposed.iter().any(|f| f.starts_with(want)),
            "{want}: {exposed:?}"
        );
    }
}

#[test]
fn an_object_store_over_plain_http_off_the_host_is_named() {
    let rules = |endpoint: &str| -> Vec<String> {
        ok(&format!(
            "[cache.l2]\nurl = \"s3://b\"\nendpoint = \"{endpoint}\"\n{HUB}"
        ))
        .warnings
        .iter()
        .map(|w| format!("{} {}", w.key, w.message))
        .collect()
    };
    let remote = rules("http://s3.internal:9000");
    assert!(
        remote
            .iter()
            .any(|f| f.starts_with("cache.l2.endpoint [l2-plain-http]")),
        "{remote:?}"
    );
    assert!(rules("https://s3.internal:9000").is_empty());
    assert!(rules("http://127.0.0.1:9000").is_empty());
}
