//! Soak: 64 clients pull a mix of cached and uncached content (a cache too small for all of it,
//! tags asked again every time) for a bounded time; no error, no corrupt byte, and pullgate's
//! RSS and open file descriptors stay flat. `PULLGATE_SOAK_SECS` sets the length (default 40).

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::MANIFEST_ACCEPT;
use crate::support::{
    block_on, can_connect, free_port, http_client, sha256_hex, wait_until, ChildGuard, TestImage,
    Upstream, UpstreamOptions,
};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");
const KIB: usize = 1024;

/// (resident set in KiB, open file descriptors) of a process.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

#[test]
fn sixty_four_clients_pull_for_a_while_without_error_or_growth() {
    let secs: u64 = std::env::var("PULLGATE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let up = Upstream::start(UpstreamOptions::default());
    let sizes = [
        64 * KIB,
        256 * KIB,
        512 * KIB,
        KIB * KIB,
        2 * KIB * KIB,
        3 * KIB * KIB,
    ];
    let images: Vec<(String, Vec<String>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let img = TestImage::with_layer_size(&format!("soak-{i}"), *size);
            up.push(&img, &format!("soak/img{i}:v1"));
            let blobs = img.blobs().into_iter().map(|(d, _)| d).collect();
            (format!("soak/img{i}"), blobs)
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("password");
    std::fs::write(&password, up.password()).expect("password");
    let port = free_port();
    let config = dir.path().join("pullgate.toml");
    // 4 MiB of cache for ~7 MiB of blobs: evictions and refills all along.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"\"\naudit_log = \"{}\"\n\
             [cache]\ndir = \"cache\"\nmax_size = \"4MiB\"\ntag_ttl = \"0s\"\n\
             [[registry]]\nname = \"hub\"\nupstream = \"{}\"\nca = \"{}\"\ndefault = true\n\
             credentials = {{ username = \"{}\", password_file = \"{}\" }}\n",
            dir.path().join("audit.log").display(),
            up.url(),
            up.pki().ca_path().display(),
            up.user(),
            password.display()
        ),
    )
    .expect("config");
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        // glibc keeps what a thread frees in that thread's arena, and after the first 1 MiB
        // chunk buffer is freed it stops mapping such buffers on their own: the resident set
        // then sits at the busiest moment's high-water mark, which wandered by 15 MiB between
        // runs. A fixed threshold maps each chunk buffer and returns it when freed, so what
        // stays resident once the clients are gone is what pullgate still holds (a leak).
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .spawn()
        .expect("spawn pullgate");
    let pid = child.id();
    let _guard = ChildGuard::new(child);
    wait_until(Duration::from_secs(10), "pullgate listening", || {
        can_connect(([127, 0, 0, 1], port).into())
    })
    .expect("pullgate starts");

    let requests = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let run = |duration: Duration| {
        let (images, requests, bytes) = (images.clone(), requests.clone(), bytes.clone());
        block_on(async move {
            let client = http_client(None);
            let deadline = Instant::now() + duration;
            let tasks: Vec<_> = (0..64u64)
                .map(|n| {
                    let (client, images) = (client.clone(), images.clone());
                    let (requests, bytes) = (requests.clone(), bytes.clone());
                    tokio::spawn(async move {
                        let mut errors = Vec::new();
                        let mut pick = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                        while Instant::now() < deadline {
                            pick ^= pick << 13;
                            pick ^= pick >> 7;
                            pick ^= pick << 17;
                            let (repo, blobs) = &images[(pick % images.len() as u64) as usize];
                            let base = format!("http://127.0.0.1:{port}/v2/{repo}");
                            let manifest = client
                                .get(format!("{base}/manifests/v1"))
                                .header("Accept", MANIFEST_ACCEPT)
                                .send()
                                .await;
                            match manifest {
                                Ok(r) if r.status() == 200 => {}
                                other => errors.push(format!("manifest {repo}: {other:?}")),
                            }
                            for digest in blobs {
                                let got =
                                    match client.get(format!("{base}/blobs/{digest}")).send().await
                                    {
                                        Ok(r) if r.status() == 200 => {
                                            r.bytes().await.map_err(|e| e.to_string())
                                        }
                                        Ok(r) => Err(format!("status {}", r.status())),
                                        Err(e) => Err(e.to_string()),
                                    };
                                match got {
                                    Ok(body)
                                        if format!("sha256:{}", sha256_hex(&body)) == *digest =>
                                    {
                                        bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                                    }
                                    Ok(_) => errors.push(format!("CORRUPT {digest}")),
                                    Err(e) => errors.push(format!("blob {digest}: {e}")),
                                }
                                requests.fetch_add(1, Ordering::Relaxed);
                            }
                            requests.fetch_add(1, Ordering::Relaxed);
                        }
                        errors
                    })
                })
                .collect();
            let mut errors = Vec::new();
            for t in tasks {
                errors.extend(t.await.expect("client task"));
            }
            errors
        })
    };

    // Warm up, then measure the steady state from here.
    let errors = run(Duration::from_secs(5));
    assert!(
        errors.is_empty(),
        "warm-up errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    // Idle figures once the clients' connections are gone (closing takes a moment: poll until
    // the descriptor count stops falling).
    let settled = || {
        let mut last = usage(pid);
        let _ = wait_until(Duration::from_secs(10), "connections to close", || {
            std::thread::sleep(Duration::from_millis(200));
            let now = usage(pid);
            let steady = now.1 == last.1;
            last = now;
            steady
        });
        last
    };
    let (rss_start, fds_start) = settled();
    let mut errors = run(Duration::from_secs(secs / 2));
    let (rss_mid, _) = settled();
    errors.extend(run(Duration::from_secs(secs - secs / 2)));
    let (rss_end, fds_end) = settled();
    println!(
        "soak: {secs} s, {} requests, {} MiB verified, RSS {rss_start} -> {rss_mid} -> {rss_end} KiB, fds {fds_start} -> {fds_end}",
        requests.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) >> 20,
    );
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // Flat: the second half adds (almost) nothing to what the first half reached.
    assert!(
        rss_end < rss_mid + 8 * 1024,
        "RSS grew: {rss_start} -> {rss_mid} -> {rss_end} KiB"
    );
    assert!(
        fds_end <= fds_start + 4,
        "file descriptors grew: {fds_start} -> {fds_end}"
    );
}
