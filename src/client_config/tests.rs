use std::path::{Path, PathBuf};

use super::*;
use crate::config;

fn config(text: &str) -> Config {
    config::load_str(text, Path::new("/"))
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"))
}

/// The embedded default's registries behind a plain loopback listener.
fn default_config() -> Config {
    config::load_str(config::DEFAULT_TOML, Path::new("/")).expect("default validates")
}

fn run(client: Client, cfg: &Config, endpoint: Option<&str>, ca: Option<&str>) -> Output {
    generate(
        client,
        cfg,
        &Options {
            endpoint: endpoint.map(str::to_owned),
            ca: ca.map(PathBuf::from),
        },
    )
    .expect("generates")
}

fn file<'a>(out: &'a Output, path: &str) -> &'a str {
    &out.files
        .iter()
        .find(|f| f.path == Path::new(path))
        .unwrap_or_else(|| panic!("no {path} in {:?}", out.files))
        .contents
}

/// Parses what was written: every file must be valid TOML.
fn toml_of(text: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_else(|e| panic!("invalid TOML ({e}):\n{text}"))
}

fn hosts_of(table: &toml::Table) -> Vec<(String, toml::Table)> {
    table["host"]
        .as_table()
        .expect("[host] table")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_table().expect("host table").clone()))
        .collect()
}

#[test]
fn endpoint_parses_urls_clients_can_use_and_refuses_the_rest() {
    let e = Endpoint::parse("http://127.0.0.1:5000").unwrap();
    assert_eq!(
        e,
        Endpoint {
            https: false,
            authority: "127.0.0.1:5000".into(),
            path: String::new()
        }
    );
    assert_eq!(e.url(), "http://127.0.0.1:5000");
    let e = Endpoint::parse("https://Mirror.Example:443/").unwrap();
    assert_eq!(e.authority, "mirror.example");
    assert_eq!(e.url(), "https://mirror.example");
    let e = Endpoint::parse("https://[::1]:8443/pullgate/").unwrap();
    assert_eq!(e.authority, "[::1]:8443");
    assert_eq!(e.path, "/pullgate");
    for bad in [
        "127.0.0.1:5000",
        "ftp://x",
        "http://u:p@x",
        "http://x/?ns=a",
        "http://x/v2",
        "not a url",
    ] {
        assert!(
            matches!(Endpoint::parse(bad), Err(Error::Endpoint(_))),
            "{bad}"
        );
    }
}

#[test]
fn endpoint_defaults_to_the_first_listener_https_for_tls_and_loopback_for_any() {
    let mut notes = Vec::new();
    let cfg = default_config();
    let e = Endpoint::from_listeners(&cfg.server, &mut notes).unwrap();
    assert_eq!(e.url(), "http://127.0.0.1:5000");
    assert!(notes.is_empty());

    let mut cfg = default_config();
    cfg.server.listen.clear();
    cfg.server.tls.push(crate::config::TlsListener {
        listen: "0.0.0.0:8443".parse().unwrap(),
        certs: Vec::new(),
        client_ca: None,
        require_client_cert: false,
        proxy_protocol: false,
    });
    let e = Endpoint::from_listeners(&cfg.server, &mut notes).unwrap();
    assert_eq!(e.url(), "https://127.0.0.1:8443");
    assert!(notes[0].contains("--endpoint"), "{notes:?}");

    cfg.server.tls.clear();
    assert!(matches!(
        Endpoint::from_listeners(&cfg.server, &mut notes),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn containerd_writes_one_dir_per_ns_and_default_with_fallback_server() {
    let out = run(Client::Containerd, &default_config(), None, None);
    let paths: Vec<_> = out.files.iter().map(|f| f.path.clone()).collect();
    for ns in [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
        "mcr.microsoft.com",
        "public.ecr.aws",
        "_default",
    ] {
        assert!(
            paths.contains(&Path::new(ns).join("hosts.toml")),
            "{ns}: {paths:?}"
        );
    }
    assert_eq!(paths.len(), 8);

    let hub = toml_of(file(&out, "docker.io/hosts.toml"));
    assert_eq!(hub["server"].as_str(), Some("https://registry-1.docker.io"));
    assert!(hub.get("ca").is_none());
    let hosts = hosts_of(&hub);
    assert_eq!(hosts.len(), 1);
    let (url, host) = &hosts[0];
    assert_eq!(url, "http://127.0.0.1:5000");
    let caps: Vec<_> = host["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(caps, ["pull", "resolve"]);
    assert_eq!(host["dial_timeout"].as_str(), Some("3s"));
    for absent in ["skip_verify", "override_path", "ca"] {
        assert!(host.get(absent).is_none(), "{absent}");
    }

    let ghcr = toml_of(file(&out, "ghcr.io/hosts.toml"));
    assert_eq!(ghcr["server"].as_str(), Some("https://ghcr.io"));

    // _default: the gateway, and no server (the image's own host is the fallback).
    let default = toml_of(file(&out, "_default/hosts.toml"));
    assert!(default.get("server").is_none());
    assert_eq!(hosts_of(&default)[0].0, "http://127.0.0.1:5000");
}

#[test]
fn containerd_carries_the_gateway_ca_and_the_upstream_ca_never_skip_verify() {
    // The registry's `ca` must exist to load; a quote in its name must come out escaped.
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream_ca = dir.path().join("corp \"ca\".pem");
    std::fs::write(&upstream_ca, "").expect("write");
    let cfg = config(&format!(
        "[[registry]]\nname = \"corp\"\nupstream = \"https://127.0.0.1:7443\"\nns = [\"registry.corp:5000\", \"corp.test\"]\nca = {}\n",
        toml_string(&upstream_ca.display().to_string())
    ));
    let out = run(
        Client::Containerd,
        &cfg,
        Some("https://mirror.corp:8443"),
        Some("/etc/pullgate/gateway-ca.crt"),
    );
    assert_eq!(out.files.len(), 3);
    for path in ["registry.corp:5000/hosts.toml", "corp.test/hosts.toml"] {
        let t = toml_of(file(&out, path));
        assert_eq!(t["server"].as_str(), Some("https://127.0.0.1:7443"));
        assert_eq!(
            t["ca"].as_str(),
            Some(upstream_ca.display().to_string().as_str())
        );
        let (url, host) = &hosts_of(&t)[0];
        assert_eq!(url, "https://mirror.corp:8443");
        assert_eq!(host["ca"].as_str(), Some("/etc/pullgate/gateway-ca.crt"));
    }
    for f in &out.files {
        assert!(!f.contents.contains("skip_verify"), "{}", f.contents);
    }
}

#[test]
fn containerd_uses_override_path_for_an_endpoint_under_a_path() {
    let out = run(
        Client::Containerd,
        &default_config(),
        Some("https://ingress.example/pullgate"),
        None,
    );
    let t = toml_of(file(&out, "quay.io/hosts.toml"));
    let (url, host) = &hosts_of(&t)[0];
    assert_eq!(url, "https://ingress.example/pullgate/v2");
    assert_eq!(host["override_path"].as_bool(), Some(true));
    assert!(out.notes.iter().any(|n| n.contains("override_path")));
}

#[test]
fn containerd_reaches_a_registry_without_ns_by_its_private_name() {
    let cfg = config(
        "[[registry]]\nname = \"hub\"\nupstream = \"https://registry-1.docker.io\"\nns = [\"docker.io\"]\n\n[[registry]]\nname = \"private\"\nupstream = \"https://registry.corp:5000\"\nprefix = \"corp\"\n",
    );
    let out = run(Client::Containerd, &cfg, None, None);
    let paths: Vec<_> = out.files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(
        paths,
        [
            Path::new("docker.io/hosts.toml"),
            Path::new("private.registry.corp:5000/hosts.toml"),
            Path::new("_default/hosts.toml"),
        ]
    );
    // The image's host is the gateway: one [host] with the gateway's scheme and port, no ns.
    let t = toml_of(file(&out, "private.registry.corp:5000/hosts.toml"));
    assert!(t.get("server").is_none());
    assert_eq!(hosts_of(&t)[0].0, "http://private.registry.corp:5000");
    let note = out.notes.join("\n");
    assert!(note.contains("\"private\""), "{note}");
    assert!(note.contains("ns = [\"registry.corp:5000\"]"), "{note}");
}

#[test]
fn containerd_private_endpoint_gets_host_dirs_with_the_ca_and_no_default() {
    let cfg = config(
        "[[registry]]\nname = \"icr\"\nupstream = \"https://icr.io\"\nhosts = [\"private.icr.io\"]\npush = true\n\n[[registry]]\nname = \"ghcr\"\nupstream = \"https://ghcr.io\"\nhosts = [\"private.ghcr.io\"]\n",
    );
    let out = run(
        Client::Containerd,
        &cfg,
        Some("https://10.0.0.5"),
        Some("/etc/pullgate/ca.crt"),
    );
    assert_eq!(out.files.len(), 2, "{:?}", out.files);
    let icr = toml_of(file(&out, "private.icr.io/hosts.toml"));
    let (url, host) = &hosts_of(&icr)[0];
    assert_eq!(url, "https://private.icr.io");
    assert_eq!(host["ca"].as_str(), Some("/etc/pullgate/ca.crt"));
    let caps: Vec<_> = host["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(caps, ["pull", "resolve", "push"]);
    let ghcr = toml_of(file(&out, "private.ghcr.io/hosts.toml"));
    assert_eq!(
        ghcr["host"]["https://private.ghcr.io"]["capabilities"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn docker_mirrors_docker_io_through_the_default_registry_only() {
    let out = run(Client::Docker, &default_config(), None, None);
    assert_eq!(out.files.len(), 1);
    let json: serde_json::Value =
        serde_json::from_str(file(&out, "daemon.json")).expect("valid JSON");
    assert_eq!(
        json,
        serde_json::json!({
            "registry-mirrors": ["http://127.0.0.1:5000"],
            "insecure-registries": ["127.0.0.1:5000"],
        })
    );
    assert!(out
        .notes
        .iter()
        .any(|n| n.contains("docker.io images only")));

    // TLS: no insecure-registries, the CA goes to certs.d.
    let out = run(
        Client::Docker,
        &default_config(),
        Some("https://mirror.corp"),
        Some("/tmp/ca.crt"),
    );
    let json: serde_json::Value = serde_json::from_str(file(&out, "daemon.json")).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"registry-mirrors": ["https://mirror.corp"]})
    );
    assert!(out
        .notes
        .iter()
        .any(|n| n.contains("/etc/docker/certs.d/mirror.corp/ca.crt")));
}

#[test]
fn docker_refuses_without_a_docker_hub_default_or_with_a_path() {
    let no_default = config(
        "[[registry]]\nname = \"hub\"\nupstream = \"https://registry-1.docker.io\"\nns = [\"docker.io\"]\n",
    );
    let err = generate(Client::Docker, &no_default, &Options::default()).unwrap_err();
    assert!(err.to_string().contains("default = true"), "{err}");

    let quay_default =
        config("[[registry]]\nname = \"quay\"\nupstream = \"https://quay.io\"\ndefault = true\n");
    let err = generate(Client::Docker, &quay_default, &Options::default()).unwrap_err();
    assert!(err.to_string().contains("docker.io only"), "{err}");

    // A default registry with ns docker.io in front of another upstream (a test bed, or a
    // private Docker Hub copy) is a docker.io mirror.
    let hub_copy = config(
        "[[registry]]\nname = \"hub\"\nupstream = \"https://127.0.0.1:7443\"\nns = [\"docker.io\"]\ndefault = true\n",
    );
    run(Client::Docker, &hub_copy, None, None);

    let err = generate(
        Client::Docker,
        &default_config(),
        &Options {
            endpoint: Some("http://127.0.0.1:5000/x".into()),
            ca: None,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("path"), "{err}");
}

#[test]
fn podman_mirrors_each_registry_by_its_prefix() {
    let out = run(Client::Podman, &default_config(), None, None);
    assert_eq!(out.files.len(), 1);
    let t = toml_of(file(&out, "registries.conf"));
    let regs = t["registry"].as_array().expect("[[registry]]");
    assert_eq!(regs.len(), 7);
    let hub = regs[0].as_table().unwrap();
    assert_eq!(hub["prefix"].as_str(), Some("docker.io"));
    assert_eq!(hub["location"].as_str(), Some("docker.io"));
    let mirrors = hub["mirror"].as_array().unwrap();
    assert_eq!(mirrors.len(), 1);
    assert_eq!(
        mirrors[0]["location"].as_str(),
        Some("127.0.0.1:5000/docker.io")
    );
    assert_eq!(mirrors[0]["insecure"].as_bool(), Some(true));
    let ghcr = regs[1].as_table().unwrap();
    assert_eq!(ghcr["prefix"].as_str(), Some("ghcr.io"));
    assert_eq!(
        ghcr["mirror"][0]["location"].as_str(),
        Some("127.0.0.1:5000/ghcr.io")
    );
}

#[test]
fn podman_tls_is_never_insecure_and_default_without_prefix_has_no_path() {
    let cfg = config(
        "[[registry]]\nname = \"hub\"\nupstream = \"https://registry-1.docker.io\"\ndefault = true\n\n[[registry]]\nname = \"hidden\"\nupstream = \"https://hidden.example\"\n\n[[registry]]\nname = \"corp\"\nupstream = \"https://registry.corp:5000\"\nprefix = \"corp\"\n",
    );
    let out = run(
        Client::Podman,
        &cfg,
        Some("https://mirror.corp:8443"),
        Some("/ca.crt"),
    );
    let text = file(&out, "registries.conf");
    assert!(!text.contains("insecure"), "{text}");
    let t = toml_of(text);
    let regs = t["registry"].as_array().unwrap();
    assert_eq!(regs.len(), 2);
    assert_eq!(regs[0]["prefix"].as_str(), Some("docker.io"));
    assert_eq!(
        regs[0]["mirror"][0]["location"].as_str(),
        Some("mirror.corp:8443")
    );
    assert_eq!(regs[1]["prefix"].as_str(), Some("registry.corp:5000"));
    assert_eq!(
        regs[1]["mirror"][0]["location"].as_str(),
        Some("mirror.corp:8443/corp")
    );
    let notes = out.notes.join("\n");
    assert!(notes.contains("\"hidden\""), "{notes}");
    assert!(
        notes.contains("/etc/containers/certs.d/mirror.corp:8443/ca.crt"),
        "{notes}"
    );
}

#[test]
fn docker_and_podman_are_warned_about_an_ipv6_literal_endpoint() {
    for client in [Client::Docker, Client::Podman] {
        let out = run(client, &default_config(), Some("http://[::1]:5000"), None);
        assert!(
            out.notes.iter().any(|n| n.contains("IPv6 literal")),
            "{:?}",
            out.notes
        );
    }
    let out = run(
        Client::Containerd,
        &default_config(),
        Some("http://[::1]:5000"),
        None,
    );
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    let t = toml_of(file(&out, "docker.io/hosts.toml"));
    assert_eq!(hosts_of(&t)[0].0, "http://[::1]:5000");
}

#[test]
fn containerd_names_a_registry_it_cannot_reach_at_all() {
    let cfg = config(
        "[[registry]]\nname = \"hub\"\nupstream = \"https://registry-1.docker.io\"\nns = [\"docker.io\"]\n\n[[registry]]\nname = \"quay\"\nupstream = \"https://quay.io\"\nhosts = []\nprefix = \"quay.io\"\n",
    );
    let out = run(Client::Containerd, &cfg, None, None);
    assert_eq!(out.files.len(), 2, "{:?}", out.files);
    let notes = out.notes.join("\n");
    assert!(notes.contains("neither `ns` values nor `hosts`"), "{notes}");
    assert!(notes.contains("ns = [\"quay.io\"]"), "{notes}");
}
