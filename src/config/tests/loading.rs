//! Whole-file tests: the embedded default and the shipped `conf/` files load, a config using
//! every key converts as expected, paths resolve, and parse errors and collected errors name
//! their keys.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

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
fn load_names_a_missing_file() {
    let errs = load(Path::new("/nonexistent/pullgate.toml")).unwrap_err();
    assert_error(
        &errs,
        "/nonexistent/pullgate.toml",
        "cannot read config file",
    );
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
