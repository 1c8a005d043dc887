//! Policy tests: `[zones]` CIDRs and names, and `[[identity]]` entries (mTLS or password, roles,
//! names). Trusted-proxy CIDRs are tested with the other `[server]` keys.

use super::*;

#[test]
fn bad_cidr_in_zone() {
    assert_err(
        &format!("[zones]\nvpc = [\"10.0.0.0/8\", \"fd00::/8\", \"::1\", \"nope\"]\n{HUB}"),
        "zones.vpc[3]",
        "invalid CIDR",
    );
    assert_err(
        &format!("[zones]\nVPC = [\"10.0.0.0/8\"]\n{HUB}"),
        "zones.VPC",
        "zone names",
    );
    assert_err(
        &format!("[zones]\nempty = []\n{HUB}"),
        "zones.empty",
        "at least one",
    );
}

#[test]
fn identities() {
    let id = |body: &str| format!("[[identity]]\nname = \"ci\"\n{body}\n{HUB}");
    assert_err(
        &id("mtls_subject = \"a\"\nusername = \"b\""),
        "identity.ci",
        "not both",
    );
    assert_err(&id(""), "identity.ci", "mtls_subject or username");
    assert_err(
        &id("username = \"b\""),
        "identity.ci",
        "exactly one of password_sha256 or password_file",
    );
    assert_err(
        &id("username = \"b\"\npassword_sha256 = \"abc\""),
        "identity.ci.password_sha256",
        "64 hex",
    );
    assert_err(
        &id("username = \"b\"\npassword_file = \"/nonexistent\""),
        "identity.ci.password_file",
        "does not exist",
    );
    assert_err(
        &id("mtls_subject = \"a\"\npassword_sha256 = \"00\""),
        "identity.ci.password_sha256",
        "only for username",
    );
    assert_err(
        &id("mtls_subject = \"a\"\nroles = [\"admin\"]"),
        "identity.ci.roles[0]",
        "unknown role",
    );
    assert_err(
        &id("mtls_subject = \"a\"\nroles = []"),
        "identity.ci.roles",
        "at least one role",
    );
    let dup = "[[identity]]\nname = \"ci\"\nmtls_subject = \"a\"\n[[identity]]\nname = \"ci\"\nmtls_subject = \"b\"\n";
    assert_err(
        &format!("{dup}{HUB}"),
        "identity[1].name",
        "duplicate identity name",
    );
    assert_err(
        &format!("[[identity]]\nmtls_subject = \"a\"\n{HUB}"),
        "identity[0].name",
        "missing",
    );
}
