//! The real runtimes, configured by exactly the files `pullgate client-config` writes (the
//! binary, run on the gateway's own config file), pulling through pullgate in front of the
//! real token-auth upstream: containerd (`ctr --hosts-dir`), dockerd (docker.io mirror) and
//! podman (registries.conf mirrors). Every digest a client reports is compared with the one the
//! upstream holds (what `skopeo copy --digestfile` pushed).
//!
//! Nothing can leave the machine: every client runs with its proxy variables pointing at a
//! closed loopback port, so a pull that succeeds for a name the gateway does not serve directly
//! (`docker.io/...`, `registry.corp.test/...`) came through the gateway.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{registry, Gateway};
use crate::support::{
    can_connect, free_port, run_cmd, wait_until, Containerd, Dockerd, Pki, Podman, PrivateHosts,
    PullOpts, TestImage, Upstream, UpstreamOptions,
};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

/// A second registry name, served only by `ns` (containerd) and by prefix (podman).
const CORP: &str = "registry.corp.test";

/// The upstream with the three test images, and a gateway with two registries in front of it:
/// `hub` (docker.io: ns, prefix, default) and `corp` (ns and prefix `registry.corp.test`).
struct Bed {
    up: Upstream,
    gw: Gateway,
    /// Digests the upstream holds for `team/small:v1`, `team/index:v1` (a two-platform OCI
    /// index) and `library/alpine:3.20`.
    small: String,
    index: String,
    alpine: String,
}

fn bed(seed: &str) -> Bed {
    let up = Upstream::start(UpstreamOptions::default());
    let images = [
        (TestImage::small(&format!("{seed}-small")), "team/small:v1"),
        (
            TestImage::two_platform_index(&format!("{seed}-index")),
            "team/index:v1",
        ),
        (
            TestImage::small(&format!("{seed}-alpine")),
            "library/alpine:3.20",
        ),
    ];
    let digests: Vec<String> = images
        .iter()
        .map(|(image, repo_tag)| {
            let pushed = up.push(image, repo_tag);
            assert_eq!(pushed, image.manifest_digest(), "{repo_tag}");
            pushed
        })
        .collect();
    let registries = registry(
        "hub",
        &up,
        "ns = [\"docker.io\"]\nprefix = \"docker.io\"\ndefault = true",
    ) + &registry(
        "corp",
        &up,
        &format!("ns = [\"{CORP}\"]\nprefix = \"{CORP}\"\nhosts = [\"private.corp.test\"]"),
    );
    let gw = Gateway::start(&registries);
    let [small, index, alpine] = <[String; 3]>::try_from(digests).expect("three digests");
    Bed {
        up,
        gw,
        small,
        index,
        alpine,
    }
}

/// Runs `pullgate client-config CLIENT -c <the gateway's config> --out DIR`; returns the dir
/// and what the command said on stderr.
fn client_config(gw: &Gateway, client: &str, extra: &[&str]) -> (tempfile::TempDir, String) {
    let out = tempfile::Builder::new()
        .prefix("client-config-")
        .tempdir()
        .expect("tempdir");
    let run = Command::new(BIN)
        .args(["client-config", client, "-c"])
        .arg(gw.config_path())
        .arg("--out")
        .arg(out.path())
        .args(extra)
        .output()
        .expect("run pullgate client-config");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        run.status.success(),
        "client-config {client} failed:\n{stderr}"
    );
    (out, stderr)
}

/// Audit lines of manifest or blob requests the gateway answered 200 for this registry and
/// repository (as the upstream names it).
fn served(gw: &Gateway, registry: &str, repository: &str) -> usize {
    gw.audit_lines()
        .iter()
        .filter(|l| {
            l["registry"] == registry && l["repository"] == repository && l["status"] == 200
        })
        .count()
}

fn assert_repo_digest(digests: &[String], want: &str) {
    assert!(
        digests.iter().any(|d| d.ends_with(&format!("@{want}"))),
        "{want} not in {digests:?}"
    );
}

#[test]
fn client_config_containerd_pulls_through_ns_dirs_and_default_then_falls_back_to_server() {
    let mut bed = bed("cc-ctr");
    let fallback = bed
        .up
        .push(&TestImage::small("cc-ctr-fallback"), "public/fallback:v1");
    let (hosts, _) = client_config(&bed.gw, "containerd", &[]);
    for dir in ["docker.io", CORP, "_default"] {
        assert!(hosts.path().join(dir).join("hosts.toml").is_file(), "{dir}");
    }
    let ctr = Containerd::start();
    let opts = PullOpts {
        hosts_dir: Some(hosts.path().to_path_buf()),
        ..Default::default()
    };

    // Per-registry directories: containerd adds ?ns=docker.io / ?ns=registry.corp.test.
    let got = ctr.pull_with("docker.io/team/small:v1", &opts);
    assert_eq!(got.expect("docker.io/team/small"), bed.small);
    let got = ctr.pull_with(&format!("{CORP}/team/index:v1"), &opts);
    assert_eq!(got.expect("corp team/index"), bed.index);
    let got = ctr.pull_with("docker.io/library/alpine:3.20", &opts);
    assert_eq!(got.expect("docker.io/library/alpine"), bed.alpine);
    // `corp` is reachable by ns only for containerd (no Host of its own, and containerd sends
    // no prefix): the gateway serving it proves the ns routing.
    assert!(served(&bed.gw, "corp", "team/index") >= 2);
    assert!(served(&bed.gw, "hub", "library/alpine") >= 2);

    // `_default` alone (the same file, in a directory of its own): still ?ns=<image host>.
    let only_default = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(only_default.path().join("_default")).expect("mkdir");
    std::fs::copy(
        hosts.path().join("_default/hosts.toml"),
        only_default.path().join("_default/hosts.toml"),
    )
    .expect("copy _default");
    let before = served(&bed.gw, "corp", "team/small");
    let got = ctr.pull_with(
        &format!("{CORP}/team/small:v1"),
        &PullOpts {
            hosts_dir: Some(only_default.path().to_path_buf()),
            ..Default::default()
        },
    );
    assert_eq!(got.expect("corp team/small through _default"), bed.small);
    assert!(served(&bed.gw, "corp", "team/small") > before);

    // The gateway stops: containerd goes on to `server` (the upstream over TLS, trusted through
    // the `ca` the registry's config gave), anonymously for a public repository.
    let gw_addr = bed.gw.addr().parse().expect("addr");
    bed.gw.stop();
    wait_until(
        Duration::from_secs(10),
        "the gateway's port to close",
        || !can_connect(gw_addr),
    )
    .expect("the gateway still accepts");
    let start = Instant::now();
    let got = ctr.pull_with("docker.io/public/fallback:v1", &opts);
    let took = start.elapsed();
    eprintln!("fallback pull took {took:?}");
    assert_eq!(got.expect("fallback to server"), fallback);
    assert!(
        took < Duration::from_secs(20),
        "fallback took {took:?} (dial_timeout is {})",
        pullgate::client_config::DIAL_TIMEOUT
    );
    // Straight from containerd: the gateway never forwards `ns`.
    assert!(
        bed.up
            .requests()
            .iter()
            .any(|r| r.uri.starts_with("/v2/public/fallback/") && r.uri.contains("ns=docker.io")),
        "the upstream saw no request from containerd itself"
    );
}

#[test]
fn client_config_docker_daemon_mirror_pulls_docker_io_images() {
    let bed = bed("cc-docker");
    let (dir, stderr) = client_config(&bed.gw, "docker", &[]);
    assert!(stderr.contains("docker.io images only"), "{stderr}");
    let daemon = Dockerd::start(&dir.path().join("daemon.json"));
    for (reference, want, repository) in [
        ("docker.io/team/small:v1", &bed.small, "team/small"),
        ("docker.io/team/index:v1", &bed.index, "team/index"),
        (
            "docker.io/library/alpine:3.20",
            &bed.alpine,
            "library/alpine",
        ),
    ] {
        let got = daemon.pull(reference).expect("docker pull");
        assert_eq!(&got, want, "{reference}");
        assert_repo_digest(&daemon.repo_digests(reference).expect("inspect"), want);
        assert!(served(&bed.gw, "hub", repository) >= 2, "{repository}");
    }
}

#[test]
fn client_config_podman_mirrors_by_prefix() {
    let bed = bed("cc-podman");
    let (dir, _) = client_config(&bed.gw, "podman", &[]);
    let podman = Podman::new(&dir.path().join("registries.conf"));
    let index_ref = format!("{CORP}/team/index:v1");
    for (reference, want, registry, repository) in [
        ("docker.io/team/small:v1", &bed.small, "hub", "team/small"),
        (index_ref.as_str(), &bed.index, "corp", "team/index"),
        (
            "docker.io/library/alpine:3.20",
            &bed.alpine,
            "hub",
            "library/alpine",
        ),
    ] {
        podman.pull(reference).expect("podman pull");
        assert_repo_digest(&podman.repo_digests(reference).expect("inspect"), want);
        assert!(served(&bed.gw, registry, repository) >= 2, "{repository}");
    }
}

#[test]
fn client_config_containerd_private_endpoint_over_tls_with_ca() {
    // The central private endpoint: a TLS listener, a registry known by its own name (Host
    // routing, no ns); clients pull `private.corp.test:PORT/...` directly, trusting --ca.
    const HOST: &str = "private.corp.test";
    let up = Upstream::start(UpstreamOptions::default());
    let small = up.push(&TestImage::small("cc-tls-small"), "team/small:v1");
    let certs = Pki::new();
    let (cert, key) = certs.issue(&[HOST]);
    let tls_port = free_port();
    let gw = Gateway::start_full(
        &format!(
            "tls = [{{ listen = \"127.0.0.1:{tls_port}\", certs = [{{ cert = \"{}\", key = \"{}\" }}] }}]",
            cert.display(),
            key.display()
        ),
        &registry("corp", &up, &format!("hosts = [\"{HOST}\"]")),
        None,
        "",
    );
    let endpoint = format!("https://{HOST}:{tls_port}");
    let ca = certs.ca_path().display().to_string();
    let (hosts, stderr) = client_config(&gw, "containerd", &["--endpoint", &endpoint, "--ca", &ca]);
    assert!(stderr.contains("has no `ns` values"), "{stderr}");
    let name = format!("{HOST}:{tls_port}");
    let written: Vec<_> = std::fs::read_dir(hosts.path())
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(
        written,
        std::slice::from_ref(&name),
        "only the private name, no _default"
    );

    let ctr = Containerd::start();
    let names = PrivateHosts::new(&[HOST]);
    let reference = format!("{name}/team/small:v1");
    let mut pull = names.wrap(&ctr.ctr());
    pull.args(["images", "pull", "--hosts-dir"])
        .arg(hosts.path())
        .arg(&reference);
    run_cmd(&mut pull).expect("ctr pulls over TLS with the CA client-config wrote");
    assert_eq!(ctr.image_digest(&reference).expect("pulled"), small);
    assert!(served(&gw, "corp", "team/small") >= 2);
}

#[test]
fn client_config_prints_without_out_and_exits_64_or_78() {
    // Embedded default, containerd: several files, each under a header naming its path.
    let out = Command::new(BIN)
        .args(["client-config", "containerd"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for header in [
        "# ==> docker.io/hosts.toml <==",
        "# ==> ghcr.io/hosts.toml <==",
        "# ==> _default/hosts.toml <==",
    ] {
        assert!(text.contains(header), "{header}:\n{text}");
    }
    // One file: printed as it is, valid JSON.
    let out = Command::new(BIN)
        .args([
            "client-config",
            "docker",
            "--endpoint",
            "http://10.1.2.3:5000",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("daemon.json");
    assert_eq!(json["registry-mirrors"][0], "http://10.1.2.3:5000");
    assert!(String::from_utf8_lossy(&out.stderr).contains("docker.io images only"));

    let out = Command::new(BIN)
        .args(["client-config", "podman", "--endpoint", "ftp://x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoint"));

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quay.toml");
    std::fs::write(
        &path,
        "[[registry]]\nname = \"quay\"\nupstream = \"https://quay.io\"\ndefault = true\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["client-config", "docker", "-c"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("docker.io only"));
}
