//! `[[registry]]` tests: names and the default, unique routing keys, credentials, the CA file,
//! access and redirect values, and scoped credentials.

use super::*;

#[test]
fn registry_names_and_defaults() {
    assert_err("", "registry", "at least one [[registry]]");
    assert_err(
        &format!("{HUB}{HUB}"),
        "registry[1].name",
        "duplicate registry name \"hub\"",
    );
    assert_err(
        "[[registry]]\nupstream = \"https://h\"\n",
        "registry[0].name",
        "missing",
    );
    assert_err(
        "[[registry]]\nname = \"Hub!\"\nupstream = \"https://h\"\n",
        "registry[0].name",
        "invalid name",
    );
    let two_defaults = "[[registry]]\nname = \"a\"\nupstream = \"https://a\"\ndefault = true\n[[registry]]\nname = \"b\"\nupstream = \"https://b\"\ndefault = true\n";
    assert_err(two_defaults, "registry.b.default", "registry.a already is");
}

#[test]
fn routing_claims_are_unique() {
    let two = |a: &str, b: &str| {
        format!("[[registry]]\nname = \"a\"\nupstream = \"https://a\"\n{a}\n[[registry]]\nname = \"b\"\nupstream = \"https://b\"\n{b}\n")
    };
    assert_err(
        &two("hosts = [\"x.io\"]", "hosts = [\"X.io\"]"),
        "registry.b.hosts[0]",
        "already claimed by registry.a.hosts[0]",
    );
    assert_err(
        &two("data_hosts = [\"x.io\"]", "hosts = [\"x.io\"]"),
        "registry.b.hosts[0]",
        "already claimed by registry.a.data_hosts[0]",
    );
    assert_err(
        &two("ns = [\"x.io\"]", "ns = [\"x.io\"]"),
        "registry.b.ns[0]",
        "ns \"x.io\" is already claimed",
    );
    assert_err(
        &two("prefix = \"x\"", "prefix = \"x\""),
        "registry.b.prefix",
        "already claimed by registry.a.prefix",
    );
    // Default hosts collide too: both would answer at private.h.
    assert_err(
        "[[registry]]\nname = \"a\"\nupstream = \"https://h\"\n[[registry]]\nname = \"b\"\nupstream = \"http://h:8080\"\n",
        "registry.b.hosts[0]",
        "\"private.h\" is already claimed",
    );
}

#[test]
fn credentials() {
    let base = Path::new("/etc/pullgate");
    let text = format!(
        "{HUB}credentials = {{ username = \"u\", password_env = \"PULLGATE_TEST_UNSET\" }}\n"
    );
    let errs = load_env(&text, base, &[]).unwrap_err();
    assert_error(
        &errs,
        "registry.hub.credentials.password_env",
        "environment variable PULLGATE_TEST_UNSET is not set",
    );
    assert!(load_env(&text, base, &[("PULLGATE_TEST_UNSET", "v")]).is_ok());

    assert_err(
        &format!(
            "{HUB}credentials = {{ username = \"u\", password_file = \"/nonexistent/pw\" }}\n"
        ),
        "registry.hub.credentials.password_file",
        "does not exist",
    );
    assert_err(
        &format!("{HUB}credentials = {{ username = \"u\", password = \"p\", docker_config = \"d.json\" }}\n"),
        "registry.hub.credentials",
        "use one kind",
    );
    assert_err(
        &format!(
            "{HUB}credentials = {{ username = \"u\", password = \"p\", password_env = \"X\" }}\n"
        ),
        "registry.hub.credentials",
        "exactly one of password",
    );
    assert_err(
        &format!("{HUB}credentials = {{ username = \"u\" }}\n"),
        "registry.hub.credentials",
        "exactly one of password",
    );
    assert_err(
        &format!("{HUB}credentials = {{ password = \"p\" }}\n"),
        "registry.hub.credentials.username",
        "missing",
    );
    assert_err(
        &format!("{HUB}credentials = {{}}\n"),
        "registry.hub.credentials",
        "empty",
    );
    assert_err(
        &format!("{HUB}credentials = {{ credential_helper = \"../evil\" }}\n"),
        "registry.hub.credentials.credential_helper",
        "invalid helper name",
    );
    let config = ok(&format!(
        "{HUB}credentials = {{ username = \"u\", password = \"p\" }}\n"
    ));
    assert_eq!(config.warnings[0].key, "registry.hub.credentials.password");
    assert!(config.warnings[0].message.contains("prefer password_env"));
}

#[test]
fn registry_ca_must_exist() {
    assert_err(
        &format!("{HUB}ca = \"missing-ca.pem\"\n"),
        "registry.hub.ca",
        "/etc/pullgate/missing-ca.pem",
    );
    let dir = tempfile::tempdir().unwrap();
    let errs = load_env(&format!("{HUB}ca = \".\"\n"), dir.path(), &[]).unwrap_err();
    assert_error(&errs, "registry.hub.ca", "is a directory");
}

#[test]
fn registry_policy_values() {
    assert_err(
        &format!("{HUB}network_access = \"open\"\n"),
        "registry.hub.network_access",
        "\"enabled\", \"selected\" or \"disabled\"",
    );
    assert_err(
        &format!("{HUB}network_access = \"selected\"\n"),
        "registry.hub.zones",
        "at least one zone",
    );
    assert_err(
        &format!("{HUB}zones = [\"vpc\"]\n"),
        "registry.hub.zones[0]",
        "unknown zone \"vpc\"",
    );
    assert_err(
        &format!("{HUB}redirect = \"data-endpoint\"\n"),
        "registry.hub.redirect",
        "data_hosts",
    );
    assert_err(
        &format!("{HUB}redirect = \"bounce\"\n"),
        "registry.hub.redirect",
        "\"follow\" or \"data-endpoint\"",
    );
}

#[test]
fn scoped_credentials_are_checked() {
    let config = ok(&format!(
        "[zones]\nvpc = [\"10.0.0.0/8\"]\n[[identity]]\nname = \"ci\"\nmtls_subject = \"ci.internal\"\n{HUB}\
         [[registry.scoped_credentials]]\nname = \"team-a\"\nzones = [\"vpc\"]\nidentities = [\"ci\"]\nrepositories = [\"team-a/**\"]\n\
         credentials = {{ username = \"a\", password_file = \"/dev/null\" }}\n"
    ));
    let scoped = &config.registries[0].scoped_credentials[0];
    assert_eq!(
        (
            scoped.name.as_str(),
            scoped.zones.len(),
            scoped.identities.len()
        ),
        ("team-a", 1, 1)
    );
    let scoped_table =
        |body: &str| format!("{HUB}[[registry.scoped_credentials]]\nname = \"x\"\n{body}\n");
    assert_err(
        &scoped_table("zones = [\"nowhere\"]\ncredentials = { username = \"a\", password_file = \"/dev/null\" }"),
        "registry.hub.scoped_credentials.x.zones[0]",
        "unknown zone",
    );
    assert_err(
        &scoped_table("identities = [\"ghost\"]\ncredentials = { username = \"a\", password_file = \"/dev/null\" }"),
        "registry.hub.scoped_credentials.x.identities[0]",
        "unknown identity",
    );
    assert_err(
        &scoped_table("credentials = { username = \"a\", password_file = \"/dev/null\" }"),
        "registry.hub.scoped_credentials.x",
        "selects every caller",
    );
    assert_err(
        &scoped_table("repositories = [\"a/**\"]"),
        "registry.hub.scoped_credentials.x.credentials",
        "missing",
    );
}
