//! Unit tests for loading and validation: each error class names its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::validate::{parse_duration, parse_ns, parse_prefix, parse_size, parse_upstream};
use super::*;

/// A registry that needs nothing from the environment.
const HUB: &str = "[[registry]]\nname = \"hub\"\nupstream = \"https://registry-1.docker.io\"\n";

/// Loads `text` with a fixed environment, never the process's.
fn load_env(text: &str, base: &Path, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let lookup = |var: &str| {
        env.iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| (*v).to_owned())
    };
    load_text(
        text,
        "test.toml",
        inputs(base, DEFAULT_CACHE_DIR.into(), &lookup),
    )
}

fn ok(text: &str) -> Config {
    match load_env(text, Path::new("/etc/pullgate"), &[]) {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

fn errors(text: &str) -> ConfigErrors {
    match load_env(text, Path::new("/etc/pullgate"), &[]) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errors) => errors,
    }
}

/// Asserts that some error has exactly `key` and a problem containing `fragment`.
#[track_caller]
fn assert_error(errs: &ConfigErrors, key: &str, fragment: &str) {
    assert!(
        errs.0
            .iter()
            .any(|e| e.key == key && e.problem.contains(fragment)),
        "no error {key}: ...{fragment}... in:\n{errs}"
    );
}

#[track_caller]
fn assert_err(text: &str, key: &str, fragment: &str) {
    assert_error(&errors(text), key, fragment);
}

/// A temp dir with the named (empty) files in it.
fn dir_with(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in files {
        std::fs::write(dir.path().join(name), "x").expect("write fixture");
    }
    dir
}

// --- the embedded default and the shipped files ---------------------------------------------

#[test]
fn default_toml_validates_with_zero_warnings() {
    let config = load_env(DEFAULT_TOML, Path::new("/"), &[]).expect("default.toml is valid");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(config.registries.len(), 7);
    let docker = &config.registries[0];
    assert_eq!(docker.name, "docker");
    assert!(docker.default && docker.library_namespace);
    assert_eq!(docker.hosts, ["private.docker.io"]);
    assert_eq!(docker.prefix.as_deref(), Some("docker.io"));
    let ghcr = &config.registries[1];
    assert!(!ghcr.library_namespace && !ghcr.default);
    assert_eq!(ghcr.hosts, ["private.ghcr.io"]);
    assert_eq!(config.server.listen, ["127.0.0.1:5000".parse().unwrap()]);
    assert!(config.registries.iter().all(|r| r.credentials.is_none()));
}

#[test]
fn embedded_default_caches_in_the_user_cache_dir() {
    let config = embedded_default();
    let expected = dirs::cache_dir()
        .map(|d| d.join("pullgate"))
        .unwrap_or_else(|| PathBuf::from(FALLBACK_USER_CACHE_DIR));
    assert_eq!(config.cache.dir, expected);
    assert!(config.warnings.is_empty());
}

#[test]
fn every_conf_file_loads() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    // Copies, next to stand-ins for the files `pullgate dev-certs` makes in certs/dev/ (which
    // conf/private-endpoint.toml names); loading checks that they exist, not what they hold.
    let root = tempfile::tempdir().expect("tempdir");
    let dev = root.path().join("certs/dev");
    std::fs::create_dir_all(&dev).expect("mkdir");
    std::fs::create_dir_all(root.path().join("conf")).expect("mkdir");
    for name in ["ca.crt", "icr.crt", "icr.key", "ghcr.crt", "ghcr.key"] {
        std::fs::write(dev.join(name), "").expect("stand-in");
    }
    let mut seen = 0;
    for entry in std::fs::read_dir(&conf).expect("conf/ exists") {
        let shipped = entry.expect("dir entry").path();
        if shipped.extension().is_some_and(|e| e == "toml") {
            let path = root
                .path()
                .join("conf")
                .join(shipped.file_name().expect("name"));
            std::fs::copy(&shipped, &path).expect("copy");
            if let Err(errs) = load(&path) {
                panic!("{} does not load:\n{errs}", path.display());
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected example.toml and mirror.toml in {}",
        conf.display()
    );
}

// --- a full config --------------------------------------------------------------------------

fn full_config() -> String {
    r#"
[server]
listen = ["127.0.0.1:5000", "[::1]:5000"]
admin_listen = ""
threads = 8
trusted_proxies = ["10.0.0.5", "fd00::/8"]
log_format = "json"
audit_log = "audit/pullgate.log"

[[server.tls]]
listen = "0.0.0.0:443"
certs = [{ cert = "a.pem", key = "a.key" }, { cert = "b.pem", key = "b.key" }]
client_ca = "ca.pem"
require_client_cert = true
proxy_protocol = true

[cache]
dir = "cache"
max_size = "50GiB"
tag_ttl = "0"
stale_if_error = "1h 30m"
max_manifest_size = 1048576
fill_stall_timeout = "5s"

[zones]
vpc = ["10.0.0.0/8", "fd00::/8"]
build = ["192.0.2.1"]

[[identity]]
name = "farm"
mtls_subject = "farm.internal"

[[identity]]
name = "ci"
username = "ci"
password_file = "ci.pass"
roles = ["pull", "push"]

[[identity]]
name = "bot"
username = "bot"
password_sha256 = "5E884898DA28047151D0E56F8DC6292773603D0D6AABBDD62A11EF721D1542D8"

[[registry]]
name = "icr"
upstream = "https://ICR.io/"
hosts = ["Private.ICR.io"]
data_hosts = ["data.icr.internal"]
ns = ["icr.io", "icr.io:443", "10.1.2.3:5000", "[::1]:5000"]
prefix = "icr.io/team_a"
credentials = { username = "iamapikey", password_env = "ICR_KEY" }
realm_hosts = ["iam.cloud.ibm.com"]
ca = "ca.pem"
network_access = "selected"
zones = ["vpc", "build"]
trusted_identities = false
repositories = ["team-a/**", "base/*"]
deny_repositories = ["team-a/secret-*"]
push = true
redirect = "data-endpoint"
tag_ttl = "1m"

[[registry]]
name = "hub"
upstream = "https://registry-1.docker.io"
default = true
credentials = { docker_config = "docker.json" }

[[registry]]
name = "ecr"
upstream = "http://[::1]:5001"
library_namespace = true
credentials = { credential_helper = "ecr-login" }

[[registry]]
name = "local"
upstream = "http://127.0.0.1:5002"
credentials = { username = "u", password = "inline" }
"#
    .to_owned()
}

#[test]
fn full_config_validates_and_resolves_paths() {
    let dir = dir_with(&["a.pem", "a.key", "b.pem", "b.key", "ca.pem", "ci.pass"]);
    let base = dir.path();
    let config =
        load_env(&full_config(), base, &[("ICR_KEY", "s3cret")]).unwrap_or_else(|e| panic!("{e}"));
    let server = &config.server;
    assert_eq!(server.listen.len(), 2);
    assert_eq!(server.admin_listen, None);
    assert_eq!(server.threads, 8);
    assert_eq!(server.trusted_proxies[0], "10.0.0.5/32".parse().unwrap());
    assert_eq!(server.log_format, LogFormat::Json);
    assert_eq!(
        server.audit_log,
        AuditSink::File(base.join("audit/pullgate.log"))
    );
    assert_eq!(server.tls[0].certs[1].key, base.join("b.key"));
    assert_eq!(server.tls[0].client_ca, Some(base.join("ca.pem")));
    assert!(server.tls[0].proxy_protocol);
    assert_eq!(config.cache.dir, base.join("cache"));
    assert_eq!(config.cache.max_size, 50 << 30);
    assert_eq!(config.cache.tag_ttl, Duration::ZERO);
    assert_eq!(config.cache.stale_if_error, Duration::from_secs(5400));
    assert_eq!(config.cache.max_manifest_size, 1 << 20);
    assert_eq!(config.cache.fill_stall_timeout, Duration::from_secs(5));
    assert_eq!(config.zones.len(), 2);
    assert_eq!(config.zones[0].name, "build"); // sorted by name
    assert_eq!(config.zones[0].nets[0], "192.0.2.1/32".parse().unwrap());
    assert!(matches!(
        &config.identities[1].auth,
        IdentityAuth::Password { password: PasswordCheck::File(p), .. } if *p == base.join("ci.pass")
    ));
    assert_eq!(
        config.identities[0].roles,
        Roles {
            pull: true,
            push: false,
            delete: false
        }
    );
    assert_eq!(
        config.identities[1].roles,
        Roles {
            pull: true,
            push: true,
            delete: false
        }
    );
    assert!(matches!(
        &config.identities[2].auth,
        IdentityAuth::Password { password: PasswordCheck::Sha256(h), .. } if h[0] == 0x5e
    ));

    let icr = &config.registries[0];
    assert_eq!(icr.upstream.origin, "https://icr.io");
    assert_eq!((icr.upstream.port, icr.upstream.https), (443, true));
    assert_eq!(icr.hosts, ["private.icr.io"]);
    assert!(!icr.library_namespace);
    assert!(matches!(
        &icr.credentials,
        Some(CredentialSource::Basic { username, password: PasswordSource::Env { var, value } })
            if username == "iamapikey" && var == "ICR_KEY" && value.expose() == "s3cret"
    ));
    assert_eq!(icr.ca, Some(base.join("ca.pem")));
    assert_eq!(icr.network_access, NetworkAccess::Selected);
    assert_eq!(icr.redirect, RedirectMode::DataEndpoint);
    assert_eq!(icr.tag_ttl(&config.cache), Duration::from_secs(60));

    let hub = &config.registries[1];
    assert!(hub.library_namespace && hub.default);
    assert_eq!(hub.hosts, ["private.registry-1.docker.io"]);
    assert!(matches!(
        &hub.credentials,
        Some(CredentialSource::DockerConfig { path }) if *path == base.join("docker.json")
    ));
    assert_eq!(hub.tag_ttl(&config.cache), Duration::ZERO);

    let ecr = &config.registries[2];
    assert_eq!(ecr.upstream.origin, "http://[::1]:5001");
    assert_eq!(ecr.upstream.host, "::1");
    assert!(ecr.library_namespace);
    assert!(
        matches!(&ecr.credentials, Some(CredentialSource::Helper { name }) if name == "ecr-login")
    );

    let keys: Vec<&str> = config.warnings.iter().map(|w| w.key.as_str()).collect();
    assert!(
        keys.contains(&"registry.local.credentials.password"),
        "no warning for the inline password: {keys:?}"
    );
    for served in ["registry.icr.data_hosts", "registry.icr.redirect"] {
        assert!(
            !keys.contains(&served),
            "data endpoints are served: {keys:?}"
        );
    }
    assert!(
        !keys.contains(&"server.tls"),
        "TLS listeners are served: {keys:?}"
    );
    let hub: Vec<&str> = config
        .warnings
        .iter()
        .filter(|w| w.key.starts_with("registry.hub"))
        .map(|w| w.message.as_str())
        .collect();
    assert!(
        hub.len() == 1 && hub[0].starts_with("[open-credentials]"),
        "{hub:?}"
    );
}

#[test]
fn load_resolves_relative_paths_against_the_file_dir() {
    let dir = dir_with(&["ca.pem"]);
    let path = dir.path().join("pullgate.toml");
    let text = format!("[cache]\ndir = \"c\"\n{HUB}ca = \"ca.pem\"\n");
    std::fs::write(&path, text).unwrap();
    let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.cache.dir, dir.path().join("c"));
    assert_eq!(config.registries[0].ca, Some(dir.path().join("ca.pem")));
}

#[test]
fn load_str_defaults_cache_dir_and_absolute_paths_stay() {
    let config = load_str(HUB, Path::new("/x")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.cache.dir, PathBuf::from("/var/cache/pullgate"));
    let config = ok(&format!("[cache]\ndir = \"/srv/c\"\n{HUB}"));
    assert_eq!(config.cache.dir, PathBuf::from("/srv/c"));
}

#[test]
fn load_names_a_missing_file() {
    let errs = load(Path::new("/nonexistent/pullgate.toml")).unwrap_err();
    assert_error(
        &errs,
        "/nonexistent/pullgate.toml",
        "cannot read config file",
    );
}

// --- values --------------------------------------------------------------------------------

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
fn manifest_size_bounds() {
    assert_err(
        &format!("[cache]\nmax_manifest_size = \"512B\"\n{HUB}"),
        "cache.max_manifest_size",
        "between 1KiB and 64MiB",
    );
    assert_err(
        &format!("[cache]\nmax_manifest_size = \"65MiB\"\n{HUB}"),
        "cache.max_manifest_size",
        "between",
    );
    ok(&format!("[cache]\nmax_manifest_size = \"64MiB\"\n{HUB}"));
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

// --- error classes -------------------------------------------------------------------------

#[test]
fn unknown_keys_name_key_line_and_file() {
    let errs = errors(&format!("[server]\nlisten = []\nbogus = 1\n{HUB}"));
    let e = &errs.0[0];
    assert_eq!(e.key, "server.bogus", "{e}");
    assert!(e.problem.contains("unknown field `bogus`"), "{e}");
    assert!(e.problem.contains("test.toml, line 3"), "{e}");

    let errs = errors(&format!(
        "{HUB}credentials = {{ username = \"u\", bogus = \"x\" }}\n"
    ));
    assert_eq!(errs.0[0].key, "registry[0].credentials.bogus", "{errs}");
    assert!(errs.0[0].problem.contains("line 4"), "{errs}");

    let errs = errors(&format!("{HUB}{HUB}tls = 1\n"));
    assert_eq!(errs.0[0].key, "registry[1].tls", "{errs}");

    let errs = errors("[surprise]\n");
    assert!(
        errs.0[0].problem.contains("unknown field `surprise`"),
        "{errs}"
    );
}

#[test]
fn type_errors_name_key_and_line() {
    let errs = errors(&format!("[server]\nthreads = \"two\"\n{HUB}"));
    assert_eq!(errs.0[0].key, "server.threads", "{errs}");
    assert!(errs.0[0].problem.contains("line 2"), "{errs}");
}

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

#[test]
fn all_errors_are_collected() {
    let text = "[server]\nthreads = 0\nlisten = []\n[cache]\nmax_size = \"x\"\n[[registry]]\nname = \"a\"\nupstream = \"ftp://a\"\n";
    let errs = errors(text);
    for key in [
        "server.threads",
        "server.listen",
        "cache.max_size",
        "registry.a.upstream",
    ] {
        assert!(errs.has_key(key), "{key} missing from:\n{errs}");
    }
    let shown = errs.to_string();
    assert_eq!(shown.lines().count(), errs.0.len());
    assert!(
        shown.starts_with("server.threads: must be between"),
        "{shown}"
    );
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
