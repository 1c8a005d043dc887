//! Upstream storage redirects: followed by pullgate, credentials never cross to another origin,
//! and targets on addresses the upstream does not live on are refused (invariants 1 and 8).

use crate::harness::{anonymous_registry, get, Gateway};
use crate::support::{
    skopeo_copy_to_oci, ClientTls, Redirector, TestImage, Upstream, UpstreamOptions,
};

/// A registry table that points pullgate at the redirecting front instead of the upstream.
fn front_registry(front: &Redirector, up: &Upstream) -> String {
    let (user, password) = up.creds().expect("token upstream");
    anonymous_registry("cdn", up, "default = true").replace(&up.url(), &front.url())
        + &format!("credentials = {{ username = \"{user}\", password = \"{password}\" }}\n")
}

#[test]
fn storage_redirects_are_followed_without_credentials() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::multi_layer("redirect", 2);
    up.push(&img, "team/app:v1");
    let front = Redirector::start(&up);
    let gw = Gateway::start(&front_registry(&front, &up));

    let got = skopeo_copy_to_oci(
        &format!("{}/team/app:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("pull through a redirecting upstream");
    assert_eq!(got.manifest_digest, img.manifest_digest());
    assert!(
        front.blob_redirects() >= 3,
        "config and layers were redirected"
    );
    assert!(
        front.storage().hits() >= 3,
        "pullgate fetched from the storage host"
    );
    assert!(
        !front.storage().saw_authorization(),
        "Authorization never reached the storage host"
    );
}

#[test]
fn redirects_to_refused_addresses_are_not_followed() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("ssrf");
    up.push(&img, "team/app:v1");
    let storage_port = {
        let probe = Redirector::start(&up);
        probe.storage().port()
    };
    // 0.0.0.0 reaches this very machine on Linux: a classic way around loopback filters. The
    // upstream lives on loopback, but "unspecified" is never a dial target.
    let front = Redirector::start(&up)
        .with_target(move |_, _| format!("http://0.0.0.0:{storage_port}/objects/x"));
    let gw = Gateway::start(&front_registry(&front, &up));
    let layer = &img.layer_digests()[0];
    let answer = get(&gw.url(&format!("/v2/team/app/blobs/{layer}")));
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.oci_code().as_deref(), Some("UNAVAILABLE"));
    assert!(
        answer.oci_message().contains("redirect"),
        "{}",
        answer.oci_message()
    );
    assert_eq!(front.storage().hits(), 0);

    // Link-local (cloud metadata) is refused before any connection is attempted.
    let front = Redirector::start(&up)
        .with_target(|_, _| "http://169.254.169.254/latest/meta-data/".to_string());
    let gw = Gateway::start(&front_registry(&front, &up));
    let answer = get(&gw.url(&format!("/v2/team/app/blobs/{layer}")));
    assert_eq!(answer.status, 502);
    assert!(
        answer.oci_message().contains("169.254.169.254"),
        "{}",
        answer.oci_message()
    );
}
