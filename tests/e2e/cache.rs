//! The blob store in the request path: one upstream fetch per digest however many clients ask,
//! hits with no upstream contact, Range, restarts, and the cross-repository rule.

use std::sync::Arc;
use std::time::Duration;

use crate::harness::{concurrent_gets, get, registry, registry_at, request, Gateway};
use crate::support::{
    block_on, http_client, sha256_hex, wait_until, Fault, Relay, TestImage, Upstream,
    UpstreamOptions,
};

const MIB: usize = 1024 * 1024;

/// Successful upstream GETs of `digest` (401 challenges are not fetches).
fn upstream_blob_gets(up: &Upstream, digest: &str) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.uri.contains(digest) && r.status < 300)
        .count()
}

#[test]
fn twenty_concurrent_cold_pulls_fetch_the_blob_once() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::with_layer_size("single-flight", 50 * MIB);
    up.push(&img, "team/big:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let layer = img.layer_digests()[0].clone();

    let answers = concurrent_gets(&gw.url(&format!("/v2/team/big/blobs/{layer}")), &[], 20);
    for (status, body) in &answers {
        assert_eq!(*status, 200);
        assert_eq!(
            format!("sha256:{}", sha256_hex(body)),
            layer,
            "every client got the verified bytes"
        );
    }
    assert_eq!(
        upstream_blob_gets(&up, &layer),
        1,
        "one upstream fetch for 20 clients"
    );

    // Now a hit: served with no upstream contact, Range included.
    let before = up.requests().len();
    let whole = get(&gw.url(&format!("/v2/team/big/blobs/{layer}")));
    assert_eq!(format!("sha256:{}", sha256_hex(&whole.body)), layer);
    let part = request(
        "GET",
        &gw.url(&format!("/v2/team/big/blobs/{layer}")),
        &[("Range", "bytes=100-199")],
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body, whole.body[100..200]);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 100-199/{}", whole.body.len()))
    );
    let past = request(
        "GET",
        &gw.url(&format!("/v2/team/big/blobs/{layer}")),
        &[("Range", "bytes=999999999-")],
    );
    assert_eq!(past.status, 416);
    let head = request("HEAD", &gw.url(&format!("/v2/team/big/blobs/{layer}")), &[]);
    assert_eq!(
        head.header("content-length"),
        Some(whole.body.len().to_string())
    );
    assert_eq!(up.requests().len(), before, "hits never reach the upstream");
}

#[test]
fn range_during_a_fill_and_restart_keeps_the_cache() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::with_layer_size("range-fill", 8 * MIB);
    up.push(&img, "team/app:v1");
    let cache = tempfile::tempdir().expect("tempdir");
    let table = registry("hub", &up, "default = true");
    let layer = img.layer_digests()[0].clone();
    let bytes = Arc::new(img.blob_bytes(&layer));
    let url_path = format!("/v2/team/app/blobs/{layer}");

    let mut gw = Gateway::start_with_cache(&table, Some(cache.path()));
    // A cold Range request starts the fill and is served from it; its last byte waits for the
    // whole blob's verification (invariant 3), so the answer is complete only after that.
    let part = request(
        "GET",
        &gw.url(&url_path),
        &[("Range", "bytes=5000000-5000099")],
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body, bytes[5_000_000..5_000_100]);
    // A whole GET joins the fill (or finds the blob committed).
    assert_eq!(get(&gw.url(&url_path)).body.len(), bytes.len());
    // Readers finish once the blob is verified, before its fsync and rename: wait for the
    // commit, or the restart below would find only a temp file (and fetch again).
    let hex = layer.trim_start_matches("sha256:");
    let committed = cache.path().join("blobs/sha256").join(&hex[..2]).join(hex);
    wait_until(Duration::from_secs(10), "the commit", || committed.exists())
        .expect("blob committed");
    gw.stop();

    // A new gateway on the same cache dir serves the blob from disk: the upstream only
    // confirms this repository has it (HEAD), it is not fetched again.
    let gw = Gateway::start_with_cache(&table, Some(cache.path()));
    let whole = get(&gw.url(&url_path));
    assert_eq!(whole.status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&whole.body)), layer);
    assert_eq!(
        upstream_blob_gets(&up, &layer),
        1,
        "fetched once across the restart"
    );

    // With the upstream down, the confirmed blob keeps being served.
    let mut up = up;
    up.stop();
    let whole = get(&gw.url(&url_path));
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.body[..whole.body.len().min(300)])
    );
    assert_eq!(whole.body.len(), bytes.len());
}

#[test]
fn a_cached_blob_is_served_for_another_repository_only_when_the_upstream_confirms_it() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("cross-repo");
    let other = TestImage::small("cross-repo-other");
    up.push(&img, "team/a:v1");
    up.push(&img, "team/b:v1");
    up.push(&other, "team/c:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let layer = img.layer_digests()[0].clone();

    assert_eq!(
        get(&gw.url(&format!("/v2/team/a/blobs/{layer}"))).status,
        200
    );
    // team/c never had this blob: the cache must not hand it out under that name.
    let denied = get(&gw.url(&format!("/v2/team/c/blobs/{layer}")));
    assert_eq!(
        denied.status,
        404,
        "{}",
        String::from_utf8_lossy(&denied.body)
    );
    assert_eq!(denied.oci_code().as_deref(), Some("BLOB_UNKNOWN"));
    // team/b has it: confirmed with a HEAD, then served from the cache.
    let served = get(&gw.url(&format!("/v2/team/b/blobs/{layer}")));
    assert_eq!(served.status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&served.body)), layer);
    assert_eq!(
        upstream_blob_gets(&up, &layer),
        1,
        "b was confirmed, not fetched again"
    );
    assert!(up.count_requests("HEAD", &format!("/v2/team/b/blobs/{layer}")) >= 1);
}

/// The files under the blob store, and their total size.
fn blob_files(cache: &std::path::Path) -> (usize, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let shards = std::fs::read_dir(cache.join("blobs/sha256")).expect("blob dir");
    for shard in shards.flatten() {
        let Ok(blobs) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        // A file evicted between the listing and its metadata is gone: not counted.
        for meta in blobs.flatten().filter_map(|blob| blob.metadata().ok()) {
            files += 1;
            bytes += meta.len();
        }
    }
    (files, bytes)
}

#[test]
fn a_small_max_size_keeps_the_disk_under_it() {
    let up = Upstream::start(UpstreamOptions::default());
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start_configured(
        &registry("hub", &up, "default = true"),
        Some(cache.path()),
        "max_size = \"3MiB\"",
    );
    for i in 0..5 {
        let img = TestImage::with_layer_size(&format!("evict-{i}"), MIB);
        up.push(&img, &format!("team/e{i}:v1"));
        let layer = img.layer_digests()[0].clone();
        let got = get(&gw.url(&format!("/v2/team/e{i}/blobs/{layer}")));
        assert_eq!(got.status, 200);
        assert_eq!(format!("sha256:{}", sha256_hex(&got.body)), layer);
        // The commit renames the file into place, then evicts: poll past that instant.
        wait_until(Duration::from_secs(5), "eviction", || {
            blob_files(cache.path()).1 <= 3 * MIB as u64
        })
        .unwrap_or_else(|e| panic!("after {} pulls: {:?}: {e}", i + 1, blob_files(cache.path())));
    }
    assert!(blob_files(cache.path()).0 >= 2, "recent blobs stay");
}

#[test]
fn a_fill_cut_mid_blob_resumes_or_commits_nothing() {
    let up = Upstream::start(UpstreamOptions::default());
    let relay = Relay::start(up.port());
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start_with_cache(
        &registry_at("hub", &up, &relay.url(), "default = true"),
        Some(cache.path()),
    );
    let resumable = TestImage::with_layer_size("cut-resume", 8 * MIB);
    let doomed = TestImage::with_layer_size("cut-doomed", 20 * MIB);
    up.push(&resumable, "team/cut:v1");
    up.push(&doomed, "team/cut:v2");

    // One cut: the fill resumes with a Range request and the client sees nothing of it.
    relay.set(Fault::CutAfter {
        bytes: 2 * MIB as u64,
        times: 1,
    });
    let layer = resumable.layer_digests()[0].clone();
    let got = get(&gw.url(&format!("/v2/team/cut/blobs/{layer}")));
    assert_eq!(got.status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&got.body)), layer);
    assert_eq!(relay.cuts(), 1);
    assert!(
        up.requests()
            .iter()
            .any(|r| r.uri.contains(&layer) && r.status == 206),
        "the fill resumed with a Range request"
    );

    // Every connection cut: resumes run out, clients see an aborted body, nothing is kept.
    relay.set(Fault::CutAfter {
        bytes: MIB as u64,
        times: usize::MAX,
    });
    let layer = doomed.layer_digests()[0].clone();
    let url = gw.url(&format!("/v2/team/cut/blobs/{layer}"));
    let outcomes: Vec<Result<usize, String>> = block_on({
        let url = url.clone();
        async move {
            let client = http_client(None);
            let mut out = Vec::new();
            for _ in 0..2 {
                let attempt = async {
                    let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
                    let body = resp.bytes().await.map_err(|e| e.to_string())?;
                    Ok::<usize, String>(body.len())
                };
                out.push(attempt.await);
            }
            out
        }
    });
    for outcome in &outcomes {
        assert!(
            outcome.is_err(),
            "a broken fill never looks complete: {outcome:?}"
        );
    }
    wait_until(
        Duration::from_secs(10),
        "the failed fill to clean up",
        || {
            std::fs::read_dir(cache.path().join("tmp"))
                .map(|d| d.count() == 0)
                .unwrap_or(false)
        },
    )
    .expect("temp files removed");
    let hex = layer.trim_start_matches("sha256:");
    assert!(
        !cache
            .path()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists(),
        "nothing committed"
    );

    // The fault stops: the next pull succeeds.
    relay.set(Fault::Pass);
    let got = get(&url);
    assert_eq!(got.status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&got.body)), layer);
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a {size} tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_cache_disk_serves_without_caching_and_commits_nothing() {
    let up = Upstream::start(UpstreamOptions::default());
    let big = TestImage::with_layer_size("disk-full-big", 12 * MIB);
    let small = TestImage::with_layer_size("disk-full-small", MIB / 2);
    up.push(&big, "team/big:v1");
    up.push(&small, "team/small:v1");
    let disk = SmallDisk::mount("8m");
    let cache = disk.0.path().join("cache");
    // max_size says 1 GiB; the file system holds 8 MiB.
    let gw = Gateway::start_configured(
        &registry("hub", &up, "default = true"),
        Some(&cache),
        "max_size = \"1GiB\"",
    );
    let layer = big.layer_digests()[0].clone();
    for _ in 0..2 {
        let got = get(&gw.url(&format!("/v2/team/big/blobs/{layer}")));
        assert_eq!(got.status, 200);
        assert_eq!(format!("sha256:{}", sha256_hex(&got.body)), layer);
    }
    assert_eq!(blob_files(&cache).0, 0, "nothing committed");
    assert_eq!(std::fs::read_dir(cache.join("tmp")).unwrap().count(), 0);
    let metrics = String::from_utf8(get(&gw.admin_url("/metrics")).body).unwrap();
    assert!(
        metrics.contains(r#"pullgate_requests_total{cache="bypass",kind="blob",method="GET",registry="hub",status="2xx"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"pullgate_cache_fill_failures_total{reason="storage"} 2"#));
    // What fits is still cached.
    let layer = small.layer_digests()[0].clone();
    assert_eq!(
        get(&gw.url(&format!("/v2/team/small/blobs/{layer}"))).status,
        200
    );
    // The client has every byte once they are verified; the commit follows.
    wait_until(
        Duration::from_secs(10),
        "the small blob to be committed",
        || blob_files(&cache).0 == 1,
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", blob_files(&cache)));
}
