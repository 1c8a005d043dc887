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
