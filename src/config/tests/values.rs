//! Value parser tests: sizes, durations, upstream URLs, host names, `ns` values, prefixes and
//! globs, each called directly and through a key that uses it.

use std::time::Duration;

use super::*;
use crate::config::validate::values::{
    parse_duration, parse_ns, parse_prefix, parse_size, parse_upstream,
};

#[test]
fn sizes() {
    for (text, bytes) in [
        ("20GiB", 20u64 << 30),
        ("20 gib", 20 << 30),
        ("1KB", 1000),
        ("1kb", 1000),
        ("500MB", 500_000_000),
        ("2TB", 2_000_000_000_000),
        ("1TiB", 1 << 40),
        ("1.5KiB", 1536),
        ("4MiB", 4 << 20),
        ("123", 123),
        ("7B", 7),
        ("0", 0),
    ] {
        assert_eq!(parse_size(text), Ok(bytes), "{text}");
    }
    for bad in [
        "",
        "GiB",
        "20XB",
        "1.",
        ".5KiB",
        "1..5MiB",
        "-1GiB",
        "20 G",
        "99999999999TiB",
        "1e3",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
    }
    assert_eq!(
        ok(&format!("[cache]\nmax_size = 4096\n{HUB}"))
            .cache
            .max_size,
        4096
    );
    assert_err(
        &format!("[cache]\nmax_size = -1\n{HUB}"),
        "cache.max_size",
        "negative",
    );
    assert_err(
        &format!("[cache]\nmax_size = \"lots\"\n{HUB}"),
        "cache.max_size",
        "invalid size",
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
    assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    assert!(parse_duration("ten minutes").is_err());
    assert!(parse_duration("").is_err());
    assert_err(
        &format!("[cache]\ntag_ttl = \"soon\"\n{HUB}"),
        "cache.tag_ttl",
        "invalid duration",
    );
    assert_err(
        &format!("{HUB}tag_ttl = \"5 parsecs\"\n"),
        "registry.hub.tag_ttl",
        "invalid duration",
    );
    assert_err(
        &format!("[cache]\nstale_if_error = \"x\"\n{HUB}"),
        "cache.stale_if_error",
        "invalid",
    );
    assert_err(
        &format!("[cache]\nfill_stall_timeout = \"0s\"\n{HUB}"),
        "cache.fill_stall_timeout",
        "between 100ms and 1h",
    );
}

#[test]
fn upstream_urls() {
    let up = parse_upstream("https://Registry.Example:8443").unwrap();
    assert_eq!(
        (up.origin.as_str(), up.host.as_str(), up.port),
        ("https://registry.example:8443", "registry.example", 8443)
    );
    assert_eq!(parse_upstream("http://h").unwrap().port, 80);
    for (bad, fragment) in [
        ("ftp://h", "scheme"),
        ("https://u:p@h", "user info"),
        ("https://h/?q=1", "query"),
        ("https://h/#f", "fragment"),
        ("https://h/v2", "path"),
        ("not a url", "invalid URL"),
    ] {
        let err = parse_upstream(bad).unwrap_err();
        assert!(err.contains(fragment), "{bad}: {err}");
    }
    assert_err(
        "[[registry]]\nname = \"x\"\nupstream = \"ftp://h\"\n",
        "registry.x.upstream",
        "http or https",
    );
    assert_err(
        "[[registry]]\nname = \"x\"\n",
        "registry.x.upstream",
        "missing",
    );
}

#[test]
fn hosts_ns_and_prefixes() {
    assert_eq!(parse_ns("Docker.IO"), Ok("docker.io".to_owned()));
    assert!(parse_ns("reg.local:5000").is_ok());
    assert!(parse_ns("[fd00::1]:5000").is_ok() && parse_ns("fd00::1").is_ok());
    assert!(parse_ns("bad host").is_err() && parse_ns("h:99999").is_err());
    assert!(parse_prefix("docker.io").is_ok() && parse_prefix("a/b__c/d--e").is_ok());
    for bad in ["/a", "a/", "", "A", "a//b", "a..b", "a___b", "-a"] {
        assert!(parse_prefix(bad).is_err(), "{bad:?}");
    }
    assert_err(
        &format!("{HUB}hosts = [\"a..b\"]\n"),
        "registry.hub.hosts[0]",
        "invalid host name",
    );
    assert_err(
        &format!("{HUB}hosts = [\"h:5000\"]\n"),
        "registry.hub.hosts[0]",
        "invalid host name",
    );
    assert_err(
        &format!("{HUB}data_hosts = [\"a_b\"]\n"),
        "registry.hub.data_hosts[0]",
        "invalid host name",
    );
    assert_err(
        &format!("{HUB}realm_hosts = [\"\"]\n"),
        "registry.hub.realm_hosts[0]",
        "invalid host name",
    );
    assert_err(
        &format!("{HUB}ns = [\"a b\"]\n"),
        "registry.hub.ns[0]",
        "invalid ns",
    );
    assert_err(
        &format!("{HUB}prefix = \"/x\"\n"),
        "registry.hub.prefix",
        "invalid prefix",
    );
    let config = ok(&format!("{HUB}hosts = [\"MiXeD.example\"]\n"));
    assert_eq!(config.registries[0].hosts, ["mixed.example"]);
}

#[test]
fn globs() {
    assert_err(
        &format!("{HUB}repositories = [\"\"]\n"),
        "registry.hub.repositories[0]",
        "empty",
    );
    assert_err(
        &format!("{HUB}repositories = [\"a/B\"]\n"),
        "registry.hub.repositories[0]",
        "invalid glob",
    );
    assert_err(
        &format!("{HUB}deny_repositories = [\"a//b\"]\n"),
        "registry.hub.deny_repositories[0]",
        "invalid glob",
    );
    ok(&format!(
        "{HUB}repositories = [\"**\", \"a/*/b\", \"x.y_z-1/**\"]\n"
    ));
}
