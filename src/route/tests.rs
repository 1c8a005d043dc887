//! Tests for `RouteTable`: precedence, normalisation, closed-world lookups, error shapes.

use std::sync::Arc;

use super::*;
use crate::config::model::{NetworkAccess, RedirectMode, Registry, Upstream};

/// A registry with every field filled; only the routing keys vary.
fn registry(
    name: &str,
    hosts: &[&str],
    data_hosts: &[&str],
    ns: &[&str],
    prefix: Option<&str>,
    default: bool,
    library_namespace: bool,
) -> Arc<Registry> {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Arc::new(Registry {
        name: name.to_owned(),
        upstream: Upstream {
            origin: format!("https://{name}.upstream.test"),
            https: true,
            host: format!("{name}.upstream.test"),
            port: 443,
        },
        hosts: strings(hosts),
        data_hosts: strings(data_hosts),
        ns: strings(ns),
        prefix: prefix.map(str::to_owned),
        default,
        library_namespace,
        credentials: None,
        realm_hosts: Vec::new(),
        ca: None,
        network_access: NetworkAccess::Enabled,
        zones: Vec::new(),
        trusted_identities: false,
        repositories: Vec::new(),
        deny_repositories: Vec::new(),
        push: false,
        delete: false,
        redirect: RedirectMode::Follow,
        tag_ttl: None,
        scoped_credentials: Vec::new(),
        signatures: Vec::new(),
    })
}

fn table() -> RouteTable {
    RouteTable::new(&[
        registry(
            "hub",
            &["private.docker.io"],
            &[],
            &["docker.io"],
            Some("docker.io"),
            true,
            true,
        ),
        registry(
            "ghcr",
            &["private.ghcr.io"],
            &["ghcr.data.internal"],
            &["ghcr.io"],
            Some("ghcr.io"),
            false,
            false,
        ),
        registry(
            "icr",
            &["private.icr.io", "fd00::5"],
            &[],
            &["icr.io", "localhost:5000"],
            None,
            false,
            false,
        ),
        registry("mirror", &[], &[], &[], Some("mirror"), false, true),
        registry(
            "special",
            &[],
            &[],
            &[],
            Some("mirror/special"),
            false,
            false,
        ),
    ])
}

/// (host, ns, name) -> (registry, by, upstream repository, client name)
type Want = (&'static str, RoutedBy, &'static str);

fn check(table: &RouteTable, host: Option<&str>, ns: Option<&str>, name: &str, want: Want) {
    let routed = table
        .resolve(host, ns, name)
        .unwrap_or_else(|e| panic!("{host:?} {ns:?} {name}: {e}"));
    let got = (
        routed.registry.name.as_str(),
        routed.by,
        routed.repository.as_str(),
    );
    assert_eq!(got, want, "{host:?} {ns:?} {name}");
    assert_eq!(routed.client_name, name);
}

#[test]
fn precedence_ns_then_host_then_prefix_then_default() {
    let t = table();
    let cases: [(Option<&str>, Option<&str>, &str, Want); 8] = [
        // ns beats Host and prefix.
        (
            Some("private.icr.io"),
            Some("ghcr.io"),
            "docker.io/a/b",
            ("ghcr", RoutedBy::Ns, "docker.io/a/b"),
        ),
        // Host beats prefix.
        (
            Some("private.icr.io"),
            None,
            "ghcr.io/a/b",
            ("icr", RoutedBy::Host, "ghcr.io/a/b"),
        ),
        (
            Some("ghcr.data.internal"),
            None,
            "a/b",
            ("ghcr", RoutedBy::DataHost, "a/b"),
        ),
        // Prefix beats default; the prefix is stripped.
        (
            Some("127.0.0.1:5000"),
            None,
            "ghcr.io/a/b",
            ("ghcr", RoutedBy::Prefix, "a/b"),
        ),
        (None, None, "ghcr.io/a/b", ("ghcr", RoutedBy::Prefix, "a/b")),
        // Default when nothing else matches.
        (
            Some("127.0.0.1:5000"),
            None,
            "bitnami/redis",
            ("hub", RoutedBy::Default, "bitnami/redis"),
        ),
        (
            None,
            None,
            "quay.io/a/b",
            ("hub", RoutedBy::Default, "quay.io/a/b"),
        ),
        // Prefix must match whole components.
        (
            None,
            None,
            "ghcr.iox/a",
            ("hub", RoutedBy::Default, "ghcr.iox/a"),
        ),
    ];
    for (host, ns, name, want) in cases {
        check(&t, host, ns, name, want);
    }
}

#[test]
fn longest_prefix_wins_and_remainder_must_be_non_empty() {
    let t = table();
    check(
        &t,
        None,
        None,
        "mirror/special/x",
        ("special", RoutedBy::Prefix, "x"),
    );
    check(
        &t,
        None,
        None,
        "mirror/specialist/x",
        ("mirror", RoutedBy::Prefix, "specialist/x"),
    );
    check(
        &t,
        None,
        None,
        "mirror/x",
        ("mirror", RoutedBy::Prefix, "library/x"),
    );
    // `mirror/special` with nothing after the longer prefix: the shorter prefix takes it.
    check(
        &t,
        None,
        None,
        "mirror/special",
        ("mirror", RoutedBy::Prefix, "library/special"),
    );
    // Bare prefix: no remainder, falls through to the default.
    check(
        &t,
        None,
        None,
        "ghcr.io",
        ("hub", RoutedBy::Default, "library/ghcr.io"),
    );
}

#[test]
fn library_normalisation_on_and_off() {
    let t = table();
    check(
        &t,
        None,
        Some("docker.io"),
        "alpine",
        ("hub", RoutedBy::Ns, "library/alpine"),
    );
    check(
        &t,
        None,
        Some("docker.io"),
        "library/alpine",
        ("hub", RoutedBy::Ns, "library/alpine"),
    );
    check(
        &t,
        None,
        Some("docker.io"),
        "a/b",
        ("hub", RoutedBy::Ns, "a/b"),
    );
    check(
        &t,
        None,
        None,
        "docker.io/alpine",
        ("hub", RoutedBy::Prefix, "library/alpine"),
    );
    check(
        &t,
        None,
        None,
        "alpine",
        ("hub", RoutedBy::Default, "library/alpine"),
    );
    check(
        &t,
        None,
        Some("ghcr.io"),
        "alpine",
        ("ghcr", RoutedBy::Ns, "alpine"),
    );
    check(
        &t,
        None,
        None,
        "ghcr.io/alpine",
        ("ghcr", RoutedBy::Prefix, "alpine"),
    );
    // The prefixed name would exceed 255 characters.
    let long = "a".repeat(250);
    let err = t.resolve(None, Some("docker.io"), &long).unwrap_err();
    assert_eq!(err.code, ErrorCode::NameInvalid);
}

#[test]
fn host_normalisation() {
    let t = table();
    let hosts = [
        "private.icr.io",
        "PRIVATE.ICR.IO",
        "private.icr.io:443",
        "private.icr.io.",
        "Private.Icr.Io.:8443",
        "[fd00::5]",
        "[FD00::5]:443",
        "fd00::5",
        " private.icr.io ",
    ];
    for host in hosts {
        check(&t, Some(host), None, "a/b", ("icr", RoutedBy::Host, "a/b"));
    }
}

#[test]
fn ns_is_lowercased_and_may_carry_a_port() {
    let t = table();
    for ns in ["icr.io", "ICR.IO", "localhost:5000", "LocalHost:5000"] {
        check(&t, None, Some(ns), "a/b", ("icr", RoutedBy::Ns, "a/b"));
    }
}

#[test]
fn unknown_ns_is_name_unknown_and_never_falls_through() {
    let t = table();
    // Invariant 8: URLs, addresses, traversal and control characters are just unknown keys.
    let cases = [
        "quay.io",
        "",
        "https://evil.test",
        "evil.test/v2",
        "127.0.0.1",
        "[::1]:5000",
        "169.254.169.254",
        "../docker.io",
        "docker.io\n",
        "docker.io.",
        "localhost",
        "icr.io:443",
    ];
    for ns in cases {
        let err = t
            .resolve(Some("private.icr.io"), Some(ns), "a/b")
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NameUnknown, "{ns:?}");
        assert_eq!(err.status, 404);
        assert_eq!(
            err.message,
            format!("namespace {} is not served here", echo(ns))
        );
        assert!(!err.message.contains('\n'));
        let err = t
            .registry_for(Some("private.icr.io"), Some(ns))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NameUnknown, "{ns:?}");
    }
}

#[test]
fn unknown_host_and_prefix_without_default_is_name_unknown() {
    let t = RouteTable::new(&[registry(
        "ghcr",
        &["private.ghcr.io"],
        &[],
        &["ghcr.io"],
        Some("ghcr.io"),
        false,
        false,
    )]);
    let hosts = [
        Some("evil.test"),
        Some("https://private.ghcr.io"),
        Some("private.ghcr.io/../x"),
        Some("private.ghcr.io\r\nX: y"),
        Some("127.0.0.1"),
        Some("[::1]:443"),
        Some("private.ghcr.io:"),
        Some("private.ghcr.io:99999999"),
        Some("[private.ghcr.io]x"),
        Some(""),
        None,
    ];
    for host in hosts {
        let err = t.resolve(host, None, "quay.io/a").unwrap_err();
        assert_eq!(err.code, ErrorCode::NameUnknown, "{host:?}");
        assert_eq!(err.status, 404);
        let want = format!(
            "no registry is served for host {} and name \"quay.io/a\"",
            echo(host.unwrap_or(""))
        );
        assert_eq!(err.message, want);
        assert!(!err.message.contains(['\r', '\n']));
        assert!(t.registry_for(host, None).unwrap().is_none(), "{host:?}");
    }
    // The echoed input is bounded.
    let err = t
        .resolve(Some(&"h".repeat(5000)), None, &"n".repeat(5000))
        .unwrap_err();
    assert!(err.message.len() < 800);
}

#[test]
fn invalid_names_are_name_invalid_after_routing() {
    let t = table();
    let cases = [
        (None, "ghcr.io/A"),
        (None, "Alpine"),
        (Some("private.icr.io"), "a//b"),
        (Some("private.icr.io"), "-leading"),
        (Some("private.icr.io"), "a/"),
        (None, "ghcr.io/a/../b"),
        (None, "ghcr.io/"),
    ];
    for (host, name) in cases {
        let err = t.resolve(host, None, name).unwrap_err();
        assert_eq!(err.code, ErrorCode::NameInvalid, "{host:?} {name}");
        assert_eq!(err.status, 400);
    }
}

#[test]
fn registry_for_nameless_requests() {
    let t = table();
    let name_of = |host, ns| t.registry_for(host, ns).unwrap().map(|r| r.name.clone());
    assert_eq!(
        name_of(Some("private.icr.io"), Some("ghcr.io")).as_deref(),
        Some("ghcr")
    );
    assert_eq!(
        name_of(Some("private.icr.io:443"), None).as_deref(),
        Some("icr")
    );
    assert_eq!(
        name_of(Some("ghcr.data.internal"), None).as_deref(),
        Some("ghcr")
    );
    assert_eq!(name_of(Some("elsewhere"), None).as_deref(), Some("hub"));
    assert_eq!(name_of(None, None).as_deref(), Some("hub"));
    assert!(RouteTable::new(&[])
        .registry_for(None, None)
        .unwrap()
        .is_none());
}

#[test]
fn first_registry_keeps_a_duplicate_key_and_hosts_beat_data_hosts() {
    let t = RouteTable::new(&[
        registry("a", &[], &["shared.test"], &["dup"], None, true, false),
        registry("b", &["shared.test"], &[], &["dup"], None, true, false),
    ]);
    check(
        &t,
        Some("shared.test"),
        None,
        "x/y",
        ("b", RoutedBy::Host, "x/y"),
    );
    check(&t, None, Some("dup"), "x/y", ("a", RoutedBy::Ns, "x/y"));
    check(&t, None, None, "x/y", ("a", RoutedBy::Default, "x/y"));
}

#[test]
fn routed_by_labels() {
    let labels = [
        (RoutedBy::Ns, "ns"),
        (RoutedBy::Host, "host"),
        (RoutedBy::DataHost, "data_host"),
        (RoutedBy::Prefix, "prefix"),
        (RoutedBy::Default, "default"),
    ];
    for (by, label) in labels {
        assert_eq!(by.as_str(), label);
    }
}

#[test]
fn the_name_at_the_registry_resolves_alike_on_its_data_host() {
    let t = table();
    // ghcr: prefix "ghcr.io", data host "ghcr.data.internal".
    for (host, ns, name) in [
        (Some("private.ghcr.io"), None, "a/b"),
        (None, Some("ghcr.io"), "a/b"),
        (Some("127.0.0.1:5000"), None, "ghcr.io/a/b"),
    ] {
        let routed = t.resolve(host, ns, name).expect("routed");
        assert_eq!(routed.name_at_registry(), "a/b", "{host:?} {ns:?} {name}");
        let data = t
            .resolve(Some("ghcr.data.internal"), None, routed.name_at_registry())
            .expect("data host");
        assert_eq!(data.by, RoutedBy::DataHost);
        assert_eq!(data.repository, routed.repository);
    }
    // hub: library/ is added on both sides.
    let routed = t
        .resolve(Some("private.docker.io"), None, "alpine")
        .expect("routed");
    assert_eq!(routed.name_at_registry(), "alpine");
    assert_eq!(routed.repository.as_str(), "library/alpine");
}

#[test]
fn host_ports() {
    assert_eq!(host_port("private.icr.io:8443"), Some(8443));
    assert_eq!(host_port("[fd00::5]:443"), Some(443));
    assert_eq!(host_port("private.icr.io"), None);
    assert_eq!(host_port("[fd00::5]"), None);
    assert_eq!(host_port("fd00::5"), None);
    assert_eq!(host_port("x:99999"), None);
    assert_eq!(host_port("x:"), None);
    assert_eq!(host_port("x:1a"), None);
}

#[test]
fn a_data_host_stays_a_data_host_whatever_ns_says() {
    let t = table();
    for ns in [
        None,
        Some("docker.io"),
        Some("ghcr.io"),
        Some("not-served.example"),
    ] {
        let routed = t
            .resolve(Some("ghcr.data.internal:8443"), ns, "a/b")
            .expect("routed by the data host");
        assert_eq!(
            (routed.registry.name.as_str(), routed.by),
            ("ghcr", RoutedBy::DataHost)
        );
    }
    // A registry host still defers to ns.
    let routed = t
        .resolve(Some("private.ghcr.io"), Some("docker.io"), "a/b")
        .expect("routed");
    assert_eq!(routed.by, RoutedBy::Ns);
}
