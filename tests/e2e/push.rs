//! Pushes through pullgate with injected credentials: skopeo pushes every image shape, the
//! upstream holds identical digests, cross-repository mounts, a pushed tag is visible to the
//! next pull at once, and denied pushes never reach the upstream.

use crate::harness::{registry, request, Gateway, MANIFEST_ACCEPT};
use crate::support::{
    skopeo_copy_to_oci, skopeo_copy_to_registry, ClientTls, TestImage, Upstream, UpstreamOptions,
};

/// Upstream requests that write.
fn writes(up: &Upstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| ["POST", "PUT", "PATCH", "DELETE"].contains(&r.method.as_str()))
        .count()
}

/// The digest the upstream itself holds for `repo_tag`, read with the upstream's own CA and
/// credentials (not through pullgate).
fn upstream_digest(up: &Upstream, repo_tag: &str) -> String {
    skopeo_copy_to_oci(
        &format!("{}/{repo_tag}", up.host_port()),
        ClientTls::Ca(up.pki().cert_dir_for_clients()),
        up.creds(),
        true,
    )
    .expect("read back from the upstream")
    .manifest_digest
}

#[test]
fn skopeo_pushes_every_image_shape_and_the_upstream_holds_the_same_digests() {
    let up = Upstream::start(UpstreamOptions::default());
    let gw = Gateway::start(&format!(
        "{}{}",
        registry("hub", &up, "default = true\npush = true"),
        registry(
            "paths",
            &up,
            "prefix = \"paths\"\nhosts = [\"paths.example\"]\npush = true"
        )
    ));
    let images = [
        ("small", TestImage::small("push-small")),
        ("multi", TestImage::multi_layer("push-multi", 3)),
        ("index", TestImage::two_platform_index("push-index")),
    ];
    for (name, image) in &images {
        let digest = skopeo_copy_to_registry(
            &image.oci_ref(),
            &format!("{}/team/{name}:v1", gw.addr()),
            ClientTls::Plain,
            true,
        )
        .unwrap_or_else(|e| panic!("push {name}: {e}"));
        assert_eq!(digest, image.manifest_digest(), "{name}");
        assert_eq!(
            upstream_digest(&up, &format!("team/{name}:v1")),
            image.manifest_digest(),
            "{name} as the upstream holds it"
        );
    }
    // Path-prefix routing: upload Locations come back under the client's name.
    let small = &images[0].1;
    let digest = skopeo_copy_to_registry(
        &small.oci_ref(),
        &format!("{}/paths/team/by-prefix:v1", gw.addr()),
        ClientTls::Plain,
        false,
    )
    .expect("push through a path prefix");
    assert_eq!(digest, small.manifest_digest());
    let started = request(
        "POST",
        &gw.url("/v2/paths/team/by-prefix/blobs/uploads/"),
        &[],
    );
    assert_eq!(started.status, 202);
    let location = started.header("location").expect("Location");
    assert!(
        location.starts_with("/v2/paths/team/by-prefix/blobs/uploads/"),
        "{location}"
    );
    assert!(!location.contains(&up.host_port()), "no upstream URL leaks");

    // A monolithic upload: POST, then one PUT with the whole body and its digest.
    let body = b"monolithic blob through pullgate".to_vec();
    let digest = format!("sha256:{}", crate::support::sha256_hex(&body));
    let put_url = gw.url(&format!("{location}&digest={digest}"));
    let status = crate::support::block_on(async move {
        crate::support::http_client(None)
            .put(&put_url)
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    assert_eq!(status, 201, "monolithic PUT");
    let stored = request(
        "HEAD",
        &gw.url(&format!("/v2/paths/team/by-prefix/blobs/{digest}")),
        &[],
    );
    assert_eq!(stored.status, 200, "the upstream has the uploaded blob");

    // A cross-repository mount: the blob is linked upstream, not uploaded again.
    let layer = small.layer_digests()[0].clone();
    let mounted = request(
        "POST",
        &gw.url(&format!(
            "/v2/team/mounted/blobs/uploads/?mount={layer}&from=team/small"
        )),
        &[],
    );
    assert_eq!(
        mounted.status,
        201,
        "{}",
        String::from_utf8_lossy(&mounted.body)
    );
    assert_eq!(
        mounted.header("location"),
        Some(format!("/v2/team/mounted/blobs/{layer}"))
    );
    assert!(up.count_requests("POST", "mount=") >= 1);
    // And skopeo copying between two repositories of the same registry.
    let digest = skopeo_copy_to_registry(
        &format!("docker://{}/team/multi:v1", gw.addr()),
        &format!("{}/team/multi-copy:v1", gw.addr()),
        ClientTls::Plain,
        true,
    )
    .expect("copy between repositories");
    assert_eq!(digest, images[1].1.manifest_digest());
}

#[test]
fn a_pushed_tag_is_what_the_next_pull_gets() {
    let up = Upstream::start(UpstreamOptions::default());
    let v1 = TestImage::small("retag-v1");
    let v2 = TestImage::small("retag-v2");
    up.push(&v1, "team/app:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true\npush = true"));
    let head = || {
        request(
            "HEAD",
            &gw.url("/v2/team/app/manifests/v1"),
            &[("Accept", MANIFEST_ACCEPT)],
        )
        .header("docker-content-digest")
    };
    assert_eq!(head().as_deref(), Some(v1.manifest_digest()));
    skopeo_copy_to_registry(
        &v2.oci_ref(),
        &format!("{}/team/app:v1", gw.addr()),
        ClientTls::Plain,
        false,
    )
    .expect("push v2 over v1");
    // Within the tag TTL, yet the new digest: the push made the cached answer stale.
    assert_eq!(head().as_deref(), Some(v2.manifest_digest()));
}

#[test]
fn denied_pushes_never_reach_the_upstream() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("push-denied");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let before = writes(&up);
    let err = skopeo_copy_to_registry(
        &img.oci_ref(),
        &format!("{}/team/app:v1", gw.addr()),
        ClientTls::Plain,
        false,
    )
    .expect_err("push = false refuses pushes");
    assert!(err.contains("denied") || err.contains("403"), "{err}");
    let put = request(
        "PUT",
        &gw.url("/v2/team/app/manifests/v1"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(put.status, 403);
    assert_eq!(put.oci_code().as_deref(), Some("DENIED"));
    assert_eq!(writes(&up), before, "no write reached the upstream");
}
