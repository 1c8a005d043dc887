//! Tags and manifests in a cluster: only a tag's owner asks the upstream about it, so the
//! cluster asks once per `tag_ttl` however many replicas its pollers hit, and GETs each
//! manifest once; a manifest by digest comes from the object store to a replica with an empty
//! disk, still only for repositories the upstream confirms.

use std::time::{Duration, Instant};

use crate::cluster::{metric, start_cluster};
use crate::harness::{registry, request, Answer, MANIFEST_ACCEPT};
use crate::support::{wait_until, S3Server, TestImage, Upstream, UpstreamOptions};

fn manifest(addr: std::net::SocketAddr, method: &str, path: &str) -> Answer {
    request(
        method,
        &format!("http://{addr}{path}"),
        &[("Accept", MANIFEST_ACCEPT)],
    )
}

/// Successful upstream requests of `method` (GET or HEAD, if empty) whose path contains
/// `part`.
fn upstream_ok(up: &Upstream, method: &str, part: &str) -> usize {
    up.requests()
        .iter()
        .filter(|r| {
            let pull = r.method == "GET" || r.method == "HEAD";
            (r.method == method || method.is_empty() && pull)
                && r.uri.contains(part)
                && r.status < 300
        })
        .count()
}

#[test]
fn a_tag_is_asked_of_the_upstream_once_per_tag_ttl_for_the_whole_cluster() {
    let up = Upstream::start(UpstreamOptions::default());
    let v1 = TestImage::small("cluster-tag-v1");
    let v2 = TestImage::small("cluster-tag-v2");
    up.push(&v1, "team/app:stable");
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = Duration::from_secs(4);
    let (_, admins, mut replicas) = start_cluster(
        dir.path(),
        &registry("hub", &up, "default = true\ntag_ttl = \"4s\""),
    );
    let tag_path = "/v2/team/app/manifests/stable";
    let by_digest = |img: &TestImage| format!("/manifests/{}", img.manifest_digest());

    // Tag pollers (HEAD) and pullers (GET) on every replica, three rounds, within the TTL.
    let started = Instant::now();
    for _ in 0..3 {
        for r in &replicas {
            let head = manifest(r.addr, "HEAD", tag_path);
            assert_eq!(head.status, 200);
            assert_eq!(
                head.header("docker-content-digest").as_deref(),
                Some(v1.manifest_digest())
            );
            let got = manifest(r.addr, "GET", tag_path);
            assert_eq!((got.status, got.body), (200, v1.manifest_bytes()));
        }
    }
    assert!(
        started.elapsed() < ttl,
        "the rounds took longer than tag_ttl: the counts below would not hold"
    );
    assert_eq!(
        upstream_ok(&up, "", tag_path),
        1,
        "one upstream request about the tag for the cluster"
    );
    assert_eq!(
        upstream_ok(&up, "GET", &by_digest(&v1)),
        1,
        "the manifest fetched once for the cluster"
    );
    let sent: u64 = admins
        .iter()
        .map(|a| metric(*a, "pullgate_cluster_forwards_sent_total"))
        .sum();
    let served: u64 = admins
        .iter()
        .map(|a| metric(*a, "pullgate_cluster_forwards_served_total"))
        .sum();
    assert!(sent > 0 && sent == served, "sent {sent}, served {served}");

    // The tag moves upstream; once the TTL has passed the owner asks again, once, and every
    // replica answers the new manifest.
    up.push(&v2, "team/app:stable");
    // Past the owner's TTL, which started at its first answer (a moment after `started`).
    std::thread::sleep(ttl.saturating_sub(started.elapsed()) + Duration::from_millis(1500));
    for r in &replicas {
        let got = manifest(r.addr, "GET", tag_path);
        assert_eq!(got.status, 200);
        assert_eq!(
            got.header("docker-content-digest").as_deref(),
            Some(v2.manifest_digest())
        );
        assert_eq!(got.body, v2.manifest_bytes());
    }
    assert_eq!(
        upstream_ok(&up, "", tag_path),
        2,
        "asked again once after tag_ttl, for the cluster"
    );
    assert_eq!(upstream_ok(&up, "GET", &by_digest(&v2)), 1);

    // The tag path is no way around policy: unsigned, or signed as a blob grant (another
    // context), it is refused; signed with the cluster key as a tag grant, it answers.
    let key = pullgate::sign::RedirectKey::load(&dir.path().join("cluster.key")).expect("key");
    let grant = pullgate::sign::Grant {
        registry: "hub".into(),
        account: None,
        repository: "team/app".into(),
        digest: "stable".into(),
        expires: pullgate::sign::expiry(std::time::SystemTime::now(), Duration::from_secs(60)),
    };
    let peer_url = |query: &str| {
        format!(
            "http://{}/_pullgate/peer/tag?registry=hub&repository=team/app&tag=stable&{query}",
            replicas[0].addr
        )
    };
    for query in [String::new(), key.peer_query(&grant)] {
        let refused = request("GET", &peer_url(&query), &[]);
        assert_eq!(refused.status, 403, "{query}");
        assert_eq!(refused.oci_code().as_deref(), Some("DENIED"));
    }
    let signed = request("GET", &peer_url(&key.peer_tag_query(&grant)), &[]);
    assert_eq!(signed.status, 200);
    assert_eq!(
        signed.header("docker-content-digest").as_deref(),
        Some(v2.manifest_digest())
    );

    // A tag the upstream does not have: its owner says so, every replica answers 404.
    for r in &replicas {
        let missing = manifest(r.addr, "GET", "/v2/team/app/manifests/nope");
        assert_eq!(missing.status, 404);
        assert_eq!(missing.oci_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    }
    for r in &mut replicas {
        r.child.kill();
    }
}

#[test]
fn manifests_by_digest_come_from_the_object_store_to_an_empty_disk() {
    manifests_through_the_object_store(false);
}

#[test]
fn sealed_manifests_come_from_the_object_store_to_an_empty_disk() {
    manifests_through_the_object_store(true);
}

/// With `encrypted`, every replica seals with its own keyring under one operator's key.
fn manifests_through_the_object_store(encrypted: bool) {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::two_platform_index("l2-manifests");
    let other = TestImage::small("l2-manifests-other");
    up.push(&img, "team/a:v1");
    up.push(&other, "team/b:v1");
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(dir.path());
    let kek = match encrypted {
        true => crate::l2::file_kek(dir.path(), "cache.kek", 5),
        false => String::new(),
    };
    let shared = format!(
        "{}\n{}\n{kek}",
        registry("hub", &up, "default = true"),
        s3.l2_table(dir.path())
    );
    let (_, admins, mut replicas) = start_cluster(dir.path(), &shared);
    let path = |repo: &str| format!("/v2/{repo}/manifests/{}", img.manifest_digest());
    let first = manifest(replicas[0].addr, "GET", &path("team/a"));
    assert_eq!((first.status, first.body), (200, img.manifest_bytes()));
    wait_until(Duration::from_secs(20), "the manifest uploaded", || {
        admins
            .iter()
            .map(|a| metric(*a, "pullgate_l2_manifest_uploads_total"))
            .sum::<u64>()
            >= 1
    })
    .expect("upload");
    for r in &mut replicas {
        r.child.kill();
    }
    let object = s3
        .blob_object(img.manifest_digest())
        .to_string_lossy()
        .replace("/cache/blobs/", "/cache/manifests/");
    let stored = std::fs::read(&object).expect("the manifest's object");
    assert_eq!(
        stored.starts_with(b"PGL2ENV1"),
        encrypted,
        "sealed exactly when the cache is encrypted"
    );
    assert_eq!(
        stored
            .windows(img.manifest_bytes().len())
            .any(|w| w == img.manifest_bytes()),
        !encrypted,
        "the manifest's bytes in the bucket only without encryption"
    );
    for i in 0..3 {
        std::fs::remove_dir_all(dir.path().join(format!("cache{i}"))).expect("empty the disk");
    }

    let (_, admins, mut replicas) = start_cluster(dir.path(), &shared);
    let gets = upstream_ok(&up, "GET", "/manifests/");
    for r in &replicas {
        let got = manifest(r.addr, "GET", &path("team/a"));
        assert_eq!((got.status, got.body), (200, img.manifest_bytes()));
    }
    assert_eq!(
        upstream_ok(&up, "GET", "/manifests/"),
        gets,
        "no manifest GET: the object store had it"
    );
    assert_eq!(
        admins
            .iter()
            .map(|a| metric(*a, "pullgate_l2_manifest_hits_total"))
            .sum::<u64>(),
        3
    );
    // The object store holds the bytes, not the right to read them: a repository without
    // this manifest upstream gets a 404, as without the object store (invariant 5).
    let elsewhere = manifest(replicas[1].addr, "GET", &path("team/b"));
    assert_eq!(
        elsewhere.status,
        404,
        "{}",
        String::from_utf8_lossy(&elsewhere.body)
    );
    for r in &mut replicas {
        r.child.kill();
    }
}
