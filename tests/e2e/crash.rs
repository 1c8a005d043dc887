//! Crash safety: pullgate killed with SIGKILL in the middle of fills, many times, at different
//! points. After each restart no partial blob is served or kept, temp files are gone, and the
//! pull completes.

use std::process::Command;
use std::time::Duration;

use crate::harness::get;
use crate::support::{
    can_connect, free_port, sha256_hex, wait_until, ChildGuard, Fault, Relay, TestImage, Upstream,
    UpstreamOptions,
};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");
const MIB: usize = 1024 * 1024;

fn start(config: &std::path::Path, port: u16) -> ChildGuard {
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn pullgate");
    let guard = ChildGuard::new(child);
    wait_until(Duration::from_secs(10), "pullgate listening", || {
        can_connect(([127, 0, 0, 1], port).into())
    })
    .expect("pullgate starts");
    guard
}

fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn sigkill_during_fills_never_leaves_a_partial_blob() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::with_layer_size("crash", 16 * MIB);
    up.push(&img, "team/crash:v1");
    let layer = img.layer_digests()[0].clone();
    let hex = layer.trim_start_matches("sha256:").to_string();
    let relay = Relay::start(up.port());
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let password = dir.path().join("password");
    std::fs::write(&password, up.password()).expect("password");
    let port = free_port();
    let config = dir.path().join("pullgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"\"\naudit_log = \"{}\"\n\
             [cache]\ndir = \"{}\"\n[[registry]]\nname = \"hub\"\nupstream = \"{}\"\nca = \"{}\"\ndefault = true\n\
             credentials = {{ username = \"{}\", password_file = \"{}\" }}\n",
            dir.path().join("audit.log").display(),
            cache.display(),
            relay.url(),
            up.pki().ca_path().display(),
            up.user(),
            password.display()
        ),
    )
    .expect("config");
    let url = format!("http://127.0.0.1:{port}/v2/team/crash/blobs/{layer}");
    let blob_file = cache.join("blobs/sha256").join(&hex[..2]).join(&hex);

    // A slow upstream (about 1.3 s for the blob) so the kill lands inside the fill.
    relay.set(Fault::Slow { pause_ms: 5 });
    let rounds = 5;
    for round in 0..rounds {
        let mut gw = start(&config, port);
        assert!(
            entries(&cache.join("tmp")).is_empty(),
            "round {round}: temp files cleaned at start"
        );
        let client = {
            let url = url.clone();
            std::thread::spawn(move || get(&url))
        };
        wait_until(Duration::from_secs(10), "a fill to start", || {
            !entries(&cache.join("tmp")).is_empty()
        })
        .expect("fill started");
        // Different points of the fill each round (this waits for time, not for readiness).
        std::thread::sleep(Duration::from_millis(150 * round as u64));
        gw.kill();
        let answer = client.join();
        if let Ok(answer) = answer {
            // A client that got a complete answer got the right bytes.
            if answer.status == 200 && answer.body.len() == 16 * MIB {
                assert_eq!(format!("sha256:{}", sha256_hex(&answer.body)), layer);
            }
        }
        if blob_file.exists() {
            let bytes = std::fs::read(&blob_file).expect("read committed blob");
            assert_eq!(
                format!("sha256:{}", sha256_hex(&bytes)),
                layer,
                "round {round}: a committed blob is always whole"
            );
            std::fs::remove_file(&blob_file).expect("reset for the next round");
        }
    }

    relay.set(Fault::Pass);
    let _gw = start(&config, port);
    assert!(entries(&cache.join("tmp")).is_empty());
    let answer = get(&url);
    assert_eq!(answer.status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&answer.body)), layer);
}
