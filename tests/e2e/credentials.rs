//! Every credential source, through the real binary so the environment and PATH are its own:
//! `password_env`, `docker_config`, `credential_helper`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use base64::Engine;

use crate::support::{
    can_connect, free_port, skopeo_copy_to_oci, wait_until, ChildGuard, ClientTls, TestImage,
    Upstream, UpstreamOptions,
};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

/// Run `pullgate serve` with `credentials` for `up`, with extra environment and an empty cache
/// (so every pull asks the upstream with the credentials under test).
fn serve(
    up: &Upstream,
    dir: &std::path::Path,
    credentials: &str,
    env: &[(&str, String)],
) -> (ChildGuard, String) {
    let port = free_port();
    let config = dir.join("pullgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"\"\n[cache]\ndir = \"cache-{port}\"\n\
             [[registry]]\nname = \"hub\"\nupstream = \"{}\"\nca = \"{}\"\ndefault = true\ncredentials = {credentials}\n",
            up.url(),
            up.pki().ca_path().display()
        ),
    )
    .expect("write config");
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("-c")
        .arg(&config)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let guard = ChildGuard::new(cmd.spawn().expect("spawn pullgate"));
    let addr = format!("127.0.0.1:{port}");
    wait_until(Duration::from_secs(10), "pullgate listening", || {
        can_connect(addr.parse().unwrap())
    })
    .expect("pullgate starts");
    (guard, addr)
}

fn pulls(addr: &str, img: &TestImage) {
    let got = skopeo_copy_to_oci(
        &format!("{addr}/team/small:v1"),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("pull with injected credentials");
    assert_eq!(got.manifest_digest, img.manifest_digest());
}

#[test]
fn password_env_docker_config_and_credential_helper_all_authenticate() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("credsources");
    up.push(&img, "team/small:v1");
    let (user, password) = up
        .creds()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .unwrap();
    let dir = tempfile::tempdir().expect("tempdir");

    // password_env
    let (mut g, addr) = serve(
        &up,
        dir.path(),
        &format!("{{ username = \"{user}\", password_env = \"PG_TEST_PASSWORD\" }}"),
        &[("PG_TEST_PASSWORD", password.clone())],
    );
    pulls(&addr, &img);
    g.kill();

    // docker_config with an `auths` entry keyed by host:port
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            up.host_port()
        ),
    )
    .expect("write docker config");
    let (mut g, addr) = serve(
        &up,
        dir.path(),
        &format!("{{ docker_config = \"{}\" }}", docker_config.display()),
        &[],
    );
    pulls(&addr, &img);
    g.kill();

    // credential_helper: docker-credential-pgtest on PATH, answering for exactly this server.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let helper = bin.join("docker-credential-pgtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\n[ \"$server\" = \"{}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{password}\"}}' \"$server\"\n",
            up.host_port()
        ),
    )
    .expect("write helper");
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (mut g, addr) = serve(
        &up,
        dir.path(),
        "{ credential_helper = \"pgtest\" }",
        &[("PATH", path)],
    );
    pulls(&addr, &img);
    g.kill();

    let authenticated = up
        .issuer()
        .requests()
        .iter()
        .filter(|r| r.authenticated)
        .count();
    assert!(
        authenticated >= 3,
        "each source presented alice's credentials"
    );
}
