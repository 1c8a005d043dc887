//! Upstream down: every image pulled earlier still pulls (skopeo and containerd), across a
//! gateway restart, within `stale_if_error`; after it, a clear error.

use crate::harness::{registry, request, Gateway, MANIFEST_ACCEPT};
use crate::support::{
    skopeo_copy_to_oci, wait_until, ClientTls, Containerd, PullOpts, TestImage, Upstream,
    UpstreamOptions,
};
use std::time::Duration;

#[test]
fn cached_images_pull_while_the_upstream_is_down_until_stale_if_error_runs_out() {
    let mut up = Upstream::start(UpstreamOptions::default());
    let small = TestImage::small("offline-small");
    let index = TestImage::two_platform_index("offline-index");
    up.push(&small, "team/small:v1");
    up.push(&index, "team/index:v1");
    let cache = tempfile::tempdir().expect("tempdir");
    let table = registry("hub", &up, "default = true");
    // tag_ttl = 0: every pull asks the upstream, so these pulls exercise stale_if_error.
    let keys = "tag_ttl = \"0s\"\nstale_if_error = \"1h\"";
    let mut gw = Gateway::start_configured(&table, Some(cache.path()), keys);
    let pull = |gw: &Gateway, name: &str, all: bool| {
        skopeo_copy_to_oci(
            &format!("{}/{name}", gw.addr()),
            ClientTls::Plain,
            None,
            all,
        )
    };
    pull(&gw, "team/small:v1", false).expect("warm pull");
    pull(&gw, "team/index:v1", true).expect("warm pull of the index");
    gw.stop();

    // The upstream goes away and the gateway restarts on the same cache.
    up.stop();
    let mut gw = Gateway::start_configured(&table, Some(cache.path()), keys);
    let head = request(
        "HEAD",
        &gw.url("/v2/team/small/manifests/v1"),
        &[("Accept", MANIFEST_ACCEPT)],
    );
    assert_eq!(head.status, 200);
    assert!(
        head.header("warning")
            .is_some_and(|w| w.starts_with("110 ")),
        "a stale answer says so: {:?}",
        head.header("warning")
    );
    let got = pull(&gw, "team/small:v1", false).expect("skopeo pulls with the upstream down");
    assert_eq!(got.manifest_digest, small.manifest_digest());
    let got = pull(&gw, "team/index:v1", true).expect("the index pulls with the upstream down");
    assert_eq!(got.manifest_digest, index.manifest_digest());
    for (digest, _) in index.blobs() {
        assert!(got.has_blob(&digest));
    }
    // A containerd that never pulled before: every byte comes from pullgate's cache.
    let ctr = Containerd::start();
    let digest = ctr
        .pull_with(
            &format!("{}/team/index:v1", gw.addr()),
            &PullOpts {
                plain_http: true,
                all_platforms: true,
                ..Default::default()
            },
        )
        .expect("ctr pulls with the upstream down");
    assert_eq!(digest, index.manifest_digest());
    gw.stop();

    // Past stale_if_error the cached answers no longer serve: a clear error names the registry.
    let gw = Gateway::start_configured(
        &table,
        Some(cache.path()),
        "tag_ttl = \"0s\"\nstale_if_error = \"1s\"",
    );
    let url = gw.url("/v2/team/small/manifests/v1");
    wait_until(Duration::from_secs(10), "the tag answer to age out", || {
        request("GET", &url, &[("Accept", MANIFEST_ACCEPT)]).status != 200
    })
    .expect("stale answers stop");
    let refused = request("GET", &url, &[("Accept", MANIFEST_ACCEPT)]);
    assert_eq!(refused.status, 502);
    assert_eq!(refused.oci_code().as_deref(), Some("UNAVAILABLE"));
    assert!(
        refused.oci_message().contains("\"hub\""),
        "{}",
        refused.oci_message()
    );
    let err = pull(&gw, "team/small:v1", false).expect_err("no pull past stale_if_error");
    assert!(err.contains("502"), "{err}");
}
