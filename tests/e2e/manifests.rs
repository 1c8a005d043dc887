//! The manifest and tag cache: tags reused within `tag_ttl` with no upstream contact, asked
//! again with a HEAD after it, manifests by digest served from disk, upstream 404s remembered,
//! the cross-repository rule for manifests, and one upstream question for many clients.

use crate::harness::{concurrent_gets, registry, request, Answer, Gateway, MANIFEST_ACCEPT};
use crate::support::{TestImage, Upstream, UpstreamOptions};

fn manifest(gw: &Gateway, method: &str, path: &str) -> Answer {
    request(method, &gw.url(path), &[("Accept", MANIFEST_ACCEPT)])
}

/// Successful upstream requests of `method` whose path contains `part`.
fn upstream_ok(up: &Upstream, method: &str, part: &str) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.method == method && r.uri.contains(part) && r.status < 300)
        .count()
}

#[test]
fn tags_are_reused_within_tag_ttl_and_asked_again_with_a_head_after_it() {
    let up = Upstream::start(UpstreamOptions::default());
    let v1 = TestImage::small("tag-ttl-v1");
    let v2 = TestImage::small("tag-ttl-v2");
    up.push(&v1, "team/app:stable");
    let gw = Gateway::start(&format!(
        "{}{}",
        registry("fresh", &up, "default = true\ntag_ttl = \"1h\""),
        registry(
            "due",
            &up,
            "prefix = \"due\"\nhosts = [\"due.example\"]\ntag_ttl = \"0s\""
        )
    ));

    // Within the TTL: the second GET and a HEAD never reach the upstream.
    let first = manifest(&gw, "GET", "/v2/team/app/manifests/stable");
    assert_eq!(first.status, 200);
    assert_eq!(first.body, v1.manifest_bytes(), "byte for byte");
    assert_eq!(
        first.header("docker-content-digest").as_deref(),
        Some(v1.manifest_digest())
    );
    let before = up.requests().len();
    let again = manifest(&gw, "GET", "/v2/team/app/manifests/stable");
    assert_eq!((again.status, again.body), (200, v1.manifest_bytes()));
    let head = manifest(&gw, "HEAD", "/v2/team/app/manifests/stable");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(v1.manifest_bytes().len().to_string())
    );
    assert_eq!(
        head.header("content-type").as_deref(),
        Some(v1.media_type())
    );
    assert_eq!(
        up.requests().len(),
        before,
        "a fresh tag is a pure cache hit"
    );

    // With tag_ttl = 0 every request asks again, with a HEAD; the unchanged manifest comes
    // from the cache.
    assert_eq!(
        manifest(&gw, "GET", "/v2/due/team/app/manifests/stable").status,
        200
    );
    let gets = upstream_ok(&up, "GET", "/manifests/");
    let heads = upstream_ok(&up, "HEAD", "/v2/team/app/manifests/stable");
    let again = manifest(&gw, "GET", "/v2/due/team/app/manifests/stable");
    assert_eq!((again.status, again.body), (200, v1.manifest_bytes()));
    assert_eq!(
        upstream_ok(&up, "GET", "/manifests/"),
        gets,
        "no manifest GET"
    );
    assert_eq!(
        upstream_ok(&up, "HEAD", "/v2/team/app/manifests/stable"),
        heads + 1
    );

    // The tag moves upstream: the due registry sees it at once, the fresh one after its TTL.
    up.push(&v2, "team/app:stable");
    let moved = manifest(&gw, "GET", "/v2/due/team/app/manifests/stable");
    assert_eq!(
        moved.header("docker-content-digest").as_deref(),
        Some(v2.manifest_digest())
    );
    assert_eq!(moved.body, v2.manifest_bytes());
    let cached = manifest(&gw, "GET", "/v2/team/app/manifests/stable");
    assert_eq!(
        cached.header("docker-content-digest").as_deref(),
        Some(v1.manifest_digest())
    );
}

#[test]
fn many_clients_asking_at_once_cost_one_upstream_manifest_request() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("flight");
    let polled = TestImage::small("flight-polled");
    let pinned = TestImage::small("flight-digest");
    up.push(&img, "team/rollout:v1");
    up.push(&polled, "team/polled:v1");
    up.push(&pinned, "team/pinned:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let every_answer = |path: &str, want: &[u8]| {
        for (status, body) in concurrent_gets(&gw.url(path), &[("Accept", MANIFEST_ACCEPT)], 24) {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            assert_eq!(body, want, "byte for byte");
        }
    };

    // A new tag, 24 clients at once (a rollout): one upstream GET, no HEAD.
    every_answer("/v2/team/rollout/manifests/v1", &img.manifest_bytes());
    assert_eq!(upstream_ok(&up, "GET", "/v2/team/rollout/manifests/"), 1);
    assert_eq!(upstream_ok(&up, "HEAD", "/v2/team/rollout/manifests/"), 0);

    // A tag a poller already resolved with a HEAD: the first 24 GETs fetch its body once.
    assert_eq!(
        manifest(&gw, "HEAD", "/v2/team/polled/manifests/v1").status,
        200
    );
    every_answer("/v2/team/polled/manifests/v1", &polled.manifest_bytes());
    assert_eq!(upstream_ok(&up, "GET", "/v2/team/polled/manifests/"), 1);

    // By digest, never seen before: one upstream GET.
    let by_digest = format!("/v2/team/pinned/manifests/{}", pinned.manifest_digest());
    every_answer(&by_digest, &pinned.manifest_bytes());
    assert_eq!(upstream_ok(&up, "GET", "/v2/team/pinned/manifests/"), 1);
}

#[test]
fn manifests_by_digest_come_from_disk_and_only_for_repositories_that_hold_them() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::two_platform_index("by-digest");
    let other = TestImage::small("by-digest-other");
    up.push(&img, "team/a:v1");
    up.push(&other, "team/b:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let path = |repo: &str| format!("/v2/{repo}/manifests/{}", img.manifest_digest());

    let first = manifest(&gw, "GET", &path("team/a"));
    assert_eq!((first.status, first.body), (200, img.manifest_bytes()));
    let before = up.requests().len();
    for (_, child) in img.platform_manifests() {
        assert_eq!(
            manifest(&gw, "GET", &format!("/v2/team/a/manifests/{child}")).status,
            200
        );
    }
    let after_children = up.requests().len();
    assert!(after_children > before, "children fetched once");
    assert_eq!(manifest(&gw, "GET", &path("team/a")).status, 200);
    assert_eq!(manifest(&gw, "HEAD", &path("team/a")).status, 200);
    assert_eq!(up.requests().len(), after_children, "hits by digest");

    // team/b never had this index: the cache must not hand it out under that name.
    let refused = manifest(&gw, "GET", &path("team/b"));
    assert_eq!(
        refused.status,
        404,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.oci_code().as_deref(), Some("MANIFEST_UNKNOWN"));
}

#[test]
fn upstream_404s_are_remembered_for_negative_ttl() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("negative");
    up.push(&img, "team/app:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let gone = |up: &Upstream| {
        up.requests()
            .iter()
            .filter(|r| r.uri.contains("/manifests/nope") && r.status == 404)
            .count()
    };

    for method in ["GET", "GET", "HEAD"] {
        let answer = manifest(&gw, method, "/v2/team/app/manifests/nope");
        assert_eq!(answer.status, 404);
        if method == "GET" {
            assert_eq!(answer.oci_code().as_deref(), Some("MANIFEST_UNKNOWN"));
        }
    }
    assert_eq!(gone(&up), 1, "one upstream 404 answers all three");
}
