//! The `pullgate` binary: `check` on every shipped config, errors that name the key, exit codes.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

#[test]
fn check_accepts_every_shipped_config_and_the_embedded_default() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf");
    // Copies next to the development certificates the README has users make first
    // (conf/private-endpoint.toml reads ../certs/dev/).
    let root = tempfile::tempdir().expect("tempdir");
    crate::tls::make_dev_certs(&root.path().join("certs/dev"));
    std::fs::create_dir_all(root.path().join("conf")).expect("mkdir");
    let mut checked = 0;
    for entry in std::fs::read_dir(conf).expect("conf/") {
        let shipped = entry.expect("entry").path();
        if shipped.extension().is_some_and(|e| e == "toml") {
            let path = root
                .path()
                .join("conf")
                .join(shipped.file_name().expect("name"));
            std::fs::copy(&shipped, &path).expect("copy");
            let out = Command::new(BIN)
                .arg("check")
                .arg("-c")
                .arg(&path)
                .output()
                .expect("run");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2);
    let out = Command::new(BIN).arg("check").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 warnings"));
}

#[test]
fn check_names_the_key_and_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:5000\"]\n[cache]\nmax_size = \"lots\"\n[[registry]]\nname = \"hub\"\nupstream = \"ftp://x\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.max_size"), "{err}");
    assert!(err.contains("registry.hub.upstream"), "{err}");
    let out = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn serve_runs_a_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = crate::support::free_port();
    let path = dir.path().join("pullgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"\"\n[cache]\ndir = \"cache\"\n[[registry]]\nname = \"hub\"\nupstream = \"https://registry.invalid\"\ndefault = true\n"
        ),
    )
    .expect("write");
    let child = Command::new(BIN)
        .arg("serve")
        .arg("-c")
        .arg(&path)
        .spawn()
        .expect("spawn");
    let mut guard = crate::support::ChildGuard::new(child);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    crate::support::wait_until(
        std::time::Duration::from_secs(10),
        "pullgate listening",
        || crate::support::can_connect(addr),
    )
    .expect("serve listens");
    let answer = crate::harness::get(&format!("http://127.0.0.1:{port}/v2/"));
    assert_eq!(answer.status, 200);
    guard.kill();
}
