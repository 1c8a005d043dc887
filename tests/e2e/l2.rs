//! The object store tier (`[cache.l2]`) against a real S3-compatible server (s3s-fs): a blob one
//! replica fetched is fetched by no replica again, also after every disk was emptied; the
//! object store down or damaged never fails a pull for long and never serves a wrong byte.

use std::net::SocketAddr;
use std::time::Duration;

use crate::api::push_blob_upstream;
use crate::cluster::{free_port_on, metric, noise, start, start_cluster, Replica};
use crate::harness::{get, registry};
use crate::support::{can_connect, digest_of, wait_until, S3Server, Upstream, UpstreamOptions};

const MIB: usize = 1024 * 1024;

/// Upstream GETs of `digest` that returned the blob (401s are the token flow).
pub(super) fn upstream_fetches(up: &Upstream, digest: &str) -> usize {
    let path = format!("/blobs/{digest}");
    up.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.uri.contains(&path) && (200..300).contains(&r.status))
        .count()
}

fn one_replica(dir: &std::path::Path, i: usize, shared: &str) -> Replica {
    let (addr, admin): (SocketAddr, SocketAddr) =
        (free_port_on([127, 0, 0, 1]), free_port_on([127, 0, 0, 1]));
    let r = start(dir, i, addr, admin, shared);
    wait_until(Duration::from_secs(20), "replica listening", || {
        can_connect(r.addr)
    })
    .expect("replica starts");
    r
}

pub(super) fn pull(r: &Replica, repo: &str, digest: &str) -> (u16, Option<String>) {
    let answer = get(&format!("http://{}/v2/{repo}/blobs/{digest}", r.addr));
    (
        answer.status,
        (answer.status == 200).then(|| digest_of(&answer.body)),
    )
}

#[test]
fn a_blob_in_the_object_store_is_never_fetched_from_the_upstream_again() {
    let up = Upstream::start(UpstreamOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(dir.path());
    // One blob that goes up in one PUT, one that goes up in parts (over 8 MiB).
    let small = noise(3 * MIB, 5);
    let large = noise(20 * MIB, 6);
    let digests = [digest_of(&small), digest_of(&large)];
    push_blob_upstream(&up, "team/app", &digests[0], &small);
    push_blob_upstream(&up, "team/app", &digests[1], &large);
    let shared = format!(
        "{}\n{}",
        registry("hub", &up, "default = true"),
        s3.l2_table(dir.path())
    );

    let mut first = one_replica(dir.path(), 0, &shared);
    for d in &digests {
        assert_eq!(pull(&first, "team/app", d), (200, Some(d.clone())));
    }
    wait_until(Duration::from_secs(20), "both blobs uploaded", || {
        metric(first.admin, "pullgate_l2_uploads_total") == 2
    })
    .expect("uploads");
    for d in &digests {
        let object = std::fs::read(s3.blob_object(d)).expect("the object is in the bucket");
        assert_eq!(
            &digest_of(&object),
            d,
            "the object holds the verified bytes"
        );
    }
    first.child.kill();

    // A replica with an empty disk (a new one, or one restarted on a fresh volume): every blob
    // comes from the object store, none from the upstream.
    let second = one_replica(dir.path(), 1, &shared);
    for d in &digests {
        assert_eq!(pull(&second, "team/app", d), (200, Some(d.clone())));
        assert_eq!(upstream_fetches(&up, d), 1, "{d} fetched once in all");
    }
    assert_eq!(metric(second.admin, "pullgate_l2_hits_total"), 2);
    // The audit says where the bytes came from.
    wait_until(Duration::from_secs(10), "audit lines written", || {
        let text = std::fs::read_to_string(dir.path().join("audit1.log")).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(r#""filled_by":"l2""#))
            .count()
            == 2
    })
    .expect("two fills audited as filled_by l2");
    assert_eq!(metric(second.admin, "pullgate_l2_uploads_total"), 0);
    // The object store holds no repository rule: a repository the upstream does not say has
    // the blob gets no byte of it (invariant 5 holds with L2 as with the disk).
    let (status, _) = pull(&second, "other/app", &digests[0]);
    assert_eq!(status, 404, "another repository's blob");
}

#[test]
fn the_object_store_down_or_damaged_costs_no_wrong_byte_and_no_pull() {
    let up = Upstream::start(UpstreamOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s3 = S3Server::start(dir.path());
    let blob = noise(2 * MIB, 9);
    let digest = digest_of(&blob);
    push_blob_upstream(&up, "team/app", &digest, &blob);
    let shared = format!(
        "{}\n{}",
        registry("hub", &up, "default = true"),
        s3.l2_table(dir.path())
    );
    let mut first = one_replica(dir.path(), 0, &shared);
    assert_eq!(
        pull(&first, "team/app", &digest),
        (200, Some(digest.clone()))
    );
    wait_until(Duration::from_secs(20), "uploaded", || {
        metric(first.admin, "pullgate_l2_uploads_total") == 1
    })
    .expect("upload");
    first.child.kill();

    // Damaged in the bucket: the fill from it fails verification, so no client gets the bytes as
    // a complete blob, and the object is deleted; the next pull comes from the upstream.
    let object = s3.blob_object(&digest);
    let mut bad = std::fs::read(&object).expect("object");
    bad[MIB] ^= 0xff;
    std::fs::write(&object, &bad).expect("damage the object");
    let second = one_replica(dir.path(), 1, &shared);
    let answer = get(&format!(
        "http://{}/v2/team/app/blobs/{digest}",
        second.addr
    ));
    assert!(
        answer.status != 200 || answer.body.len() < blob.len(),
        "a damaged object is never served as complete"
    );
    let (status, got) = pull(&second, "team/app", &digest);
    assert_eq!((status, got.as_deref()), (200, Some(digest.as_str())));
    assert_eq!(
        upstream_fetches(&up, &digest),
        2,
        "one extra fetch for the damage"
    );
    assert!(metric(second.admin, "pullgate_l2_errors_total") >= 1);
    wait_until(Duration::from_secs(20), "the good copy uploaded", || {
        std::fs::read(&object).is_ok_and(|o| digest_of(&o) == digest)
    })
    .expect("re-upload");

    // Down: pulls go on from the upstream, counted.
    s3.stop();
    let cold = noise(MIB, 10);
    let cold_digest = digest_of(&cold);
    push_blob_upstream(&up, "team/app", &cold_digest, &cold);
    assert_eq!(
        pull(&second, "team/app", &cold_digest),
        (200, Some(cold_digest.clone()))
    );
    assert!(metric(second.admin, "pullgate_l2_errors_total") >= 2);
}

#[test]
fn a_cluster_restarted_on_empty_disks_pulls_nothing_from_the_upstream() {
    let up = Upstream::start(UpstreamOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(dir.path());
    let blobs: Vec<Vec<u8>> = (0..4)
        .map(|i| noise(MIB + i * 4096, 40 + i as u64))
        .collect();
    let digests: Vec<String> = blobs.iter().map(|b| digest_of(b)).collect();
    for (b, d) in blobs.iter().zip(&digests) {
        push_blob_upstream(&up, "team/app", d, b);
    }
    let shared = format!(
        "{}\n{}",
        registry("hub", &up, "default = true"),
        s3.l2_table(dir.path())
    );
    let (_, admins, mut replicas) = start_cluster(dir.path(), &shared);
    for (i, d) in digests.iter().enumerate() {
        assert_eq!(
            pull(&replicas[i % 3], "team/app", d),
            (200, Some(d.clone()))
        );
    }
    wait_until(Duration::from_secs(20), "every blob uploaded once", || {
        admins
            .iter()
            .map(|a| metric(*a, "pullgate_l2_uploads_total"))
            .sum::<u64>()
            == digests.len() as u64
    })
    .expect("uploads");
    for r in &mut replicas {
        r.child.kill();
    }
    for i in 0..3 {
        std::fs::remove_dir_all(dir.path().join(format!("cache{i}"))).expect("empty the disk");
    }
    let (_, _, mut replicas) = start_cluster(dir.path(), &shared);
    for (i, d) in digests.iter().enumerate() {
        assert_eq!(
            pull(&replicas[(i + 1) % 3], "team/app", d),
            (200, Some(d.clone()))
        );
        assert_eq!(
            upstream_fetches(&up, d),
            1,
            "{d}: fetched once, before the restart"
        );
    }
    for r in &mut replicas {
        r.child.kill();
    }
}

/// A `[cache.encryption]` table with the `file` provider and a KEK of `byte` x 32 (base64) in
/// `dir/name`; no periodic checks during the test, so provider calls are the unwraps alone.
pub(super) fn file_kek(dir: &std::path::Path, name: &str, byte: u8) -> String {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(
        &path,
        base64::engine::general_purpose::STANDARD.encode([byte; 32]),
    )
    .expect("kek");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("mode");
    format!(
        "[cache.encryption]\nprovider = \"file\"\nkey_file = \"{}\"\ncheck_interval = \"60s\"\n",
        path.display()
    )
}

/// `pullgate_kms_calls_total`, all providers.
fn kms_calls(r: &Replica) -> u64 {
    let text = get(&format!("http://{}/metrics", r.admin)).body;
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with("pullgate_kms_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn with_the_encrypted_cache_the_object_store_holds_sealed_objects_only() {
    let up = Upstream::start(UpstreamOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(dir.path());
    // One blob large enough for a multipart upload, one small.
    let blobs = [noise(9 * MIB + 4321, 90), noise(100_000, 92)];
    let digests: Vec<String> = blobs.iter().map(|b| digest_of(b)).collect();
    for (b, d) in blobs.iter().zip(&digests) {
        push_blob_upstream(&up, "team/app", d, b);
    }
    let registry = registry("hub", &up, "default = true");
    let with_kek = |name: &str, byte: u8| {
        format!(
            "{registry}\n{}\n{}",
            s3.l2_table(dir.path()),
            file_kek(dir.path(), name, byte)
        )
    };
    let same_key = with_kek("a.kek", 7);

    let first = one_replica(dir.path(), 0, &same_key);
    for d in &digests {
        assert_eq!(pull(&first, "team/app", d), (200, Some(d.clone())));
    }
    wait_until(Duration::from_secs(20), "both blobs uploaded", || {
        metric(first.admin, "pullgate_l2_uploads_total") == 2
    })
    .expect("uploads");

    // The bucket (s3s-fs keeps objects as files) holds sealed envelopes only: no window of
    // either blob's plaintext is anywhere in it.
    let mut objects = Vec::new();
    let mut dirs = vec![dir.path().join("s3")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                objects.push(path);
            }
        }
    }
    let needles: Vec<&[u8]> = blobs
        .iter()
        .flat_map(|b| {
            [
                &b[..64],
                &b[b.len() / 2..b.len() / 2 + 64],
                &b[b.len() - 64..],
            ]
        })
        .collect();
    let mut sealed = 0;
    for path in &objects {
        let bytes = std::fs::read(path).expect("object");
        if path.to_string_lossy().contains("/blobs/sha256/") {
            assert!(
                bytes.starts_with(b"PGL2ENV1"),
                "{}: not sealed",
                path.display()
            );
            sealed += 1;
        }
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == *needle),
                "{}: holds plaintext",
                path.display()
            );
        }
    }
    assert_eq!(sealed, 2, "both blobs in the bucket: {objects:?}");

    // A replica with an empty disk and its own keyring, under the same operator's key: both
    // blobs from the object store, one key-service call for the other replica's generation
    // (none per blob), nothing from the upstream.
    let second = one_replica(dir.path(), 1, &same_key);
    let calls = kms_calls(&second);
    for d in &digests {
        assert_eq!(pull(&second, "team/app", d), (200, Some(d.clone())));
        assert_eq!(upstream_fetches(&up, d), 1, "{d}");
    }
    assert_eq!(metric(second.admin, "pullgate_l2_hits_total"), 2);
    assert_eq!(
        kms_calls(&second) - calls,
        1,
        "one unwrap, then from memory"
    );

    // Under another operator's key the objects open for nothing: the pull comes from the
    // upstream, and the other replicas' objects stay.
    let stranger = one_replica(dir.path(), 2, &with_kek("c.kek", 9));
    assert_eq!(
        pull(&stranger, "team/app", &digests[1]),
        (200, Some(digests[1].clone()))
    );
    assert_eq!(upstream_fetches(&up, &digests[1]), 2);
    assert!(metric(stranger.admin, "pullgate_l2_errors_total") >= 1);
    let third = one_replica(dir.path(), 3, &same_key);
    assert_eq!(
        pull(&third, "team/app", &digests[1]),
        (200, Some(digests[1].clone()))
    );
    assert_eq!(metric(third.admin, "pullgate_l2_hits_total"), 1);
    for mut r in [first, second, stranger, third] {
        r.child.kill();
    }
}
