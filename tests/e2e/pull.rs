//! Real pulls through pullgate from the token-auth upstream, with credentials injected: the
//! clients hold none.

use crate::harness::{registry, Gateway};
use crate::support::{
    skopeo_copy_to_dir, skopeo_copy_to_oci, ClientTls, TestImage, Upstream, UpstreamOptions,
};

#[test]
fn skopeo_pulls_every_image_shape_with_injected_credentials() {
    let up = Upstream::start(UpstreamOptions::default());
    let small = TestImage::small("pull-small");
    let multi = TestImage::multi_layer("pull-multi", 3);
    let index = TestImage::two_platform_index("pull-index");
    up.push(&small, "team/small:v1");
    up.push(&multi, "team/multi:v1");
    up.push(&index, "team/index:v1");
    let list_digest = up.push_v2s2(&index, "team/list:v1");
    let gw = Gateway::start(&registry("test", &up, "default = true"));

    // The client has no credentials: pullgate injects alice's.
    let got = skopeo_copy_to_oci(
        &format!("{}/team/small:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("small image pulls");
    assert_eq!(got.manifest_digest, small.manifest_digest());
    for (digest, _) in small.blobs() {
        assert!(got.has_blob(&digest), "{digest} pulled and verified");
    }

    let got = skopeo_copy_to_oci(
        &format!("{}/team/multi:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("multi-layer image pulls");
    assert_eq!(got.manifest_digest, multi.manifest_digest());
    assert_eq!(multi.layer_digests().len(), 3);
    for digest in multi.layer_digests() {
        assert!(got.has_blob(&digest));
    }

    let got = skopeo_copy_to_oci(
        &format!("{}/team/index:v1", gw.addr()),
        ClientTls::Plain,
        None,
        true,
    )
    .expect("two-platform index pulls");
    assert_eq!(
        got.manifest_digest,
        index.manifest_digest(),
        "index digest preserved"
    );
    for (digest, _) in index.blobs() {
        assert!(got.has_blob(&digest), "{digest} of every platform");
    }

    // A Docker manifest list stays byte-identical (dir: keeps manifests as served).
    let got = skopeo_copy_to_dir(
        &format!("{}/team/list:v1", gw.addr()),
        ClientTls::Plain,
        None,
        true,
    )
    .expect("docker manifest list pulls");
    assert_eq!(
        got.manifest_digest, list_digest,
        "manifest list byte-identical"
    );

    // Pull by digest too.
    let by_digest = format!("{}/team/small@{}", gw.addr(), small.manifest_digest());
    let got =
        skopeo_copy_to_oci(&by_digest, ClientTls::Plain, None, false).expect("pull by digest");
    assert_eq!(got.manifest_digest, small.manifest_digest());
}

#[test]
fn library_namespace_normalises_one_component_names() {
    let up = Upstream::start(UpstreamOptions::default());
    let alpine = TestImage::small("alpine");
    up.push(&alpine, "library/alpine:3.20");
    let gw = Gateway::start(&registry(
        "hub",
        &up,
        "default = true\nlibrary_namespace = true",
    ));
    let got = skopeo_copy_to_oci(
        &format!("{}/alpine:3.20", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("alpine resolves to library/alpine");
    assert_eq!(got.manifest_digest, alpine.manifest_digest());
    assert!(up.count_requests("GET", "/v2/library/alpine/manifests/3.20") >= 1);
}
