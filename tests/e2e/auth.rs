//! Upstream authentication: anonymous upstreams, wrong credentials, token reuse and refresh,
//! and where credentials may go.

use std::time::Duration;

use crate::harness::{anonymous_registry, get, registry, request, Gateway, MANIFEST_ACCEPT};
use crate::support::{
    skopeo_copy_to_oci, Auth, ClientTls, TestImage, TokenIssuerOptions, Upstream, UpstreamOptions,
};

#[test]
fn anonymous_upstream_pulls() {
    let up = Upstream::start(UpstreamOptions {
        auth: Auth::None,
        ..Default::default()
    });
    let img = TestImage::small("anon");
    up.push(&img, "open/small:v1");
    let gw = Gateway::start(&anonymous_registry("open", &up, "default = true"));
    let got = skopeo_copy_to_oci(
        &format!("{}/open/small:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("anonymous pull");
    assert_eq!(got.manifest_digest, img.manifest_digest());
}

#[test]
fn anonymous_access_to_a_token_upstream_gets_public_repositories_only() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("public");
    up.push(&img, "public/small:v1");
    up.push(&img, "private/small:v1");
    let gw = Gateway::start(&anonymous_registry("hub", &up, "default = true"));
    let ok = skopeo_copy_to_oci(
        &format!("{}/public/small:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    );
    assert_eq!(
        ok.expect("public pull").manifest_digest,
        img.manifest_digest()
    );

    let denied = request(
        "GET",
        &gw.url("/v2/private/small/manifests/v1"),
        &[("Accept", MANIFEST_ACCEPT)],
    );
    assert_eq!(
        denied.status,
        403,
        "{}",
        String::from_utf8_lossy(&denied.body)
    );
    assert_eq!(denied.oci_code().as_deref(), Some("DENIED"));
    assert!(
        denied.oci_message().contains("\"hub\""),
        "names the registry: {}",
        denied.oci_message()
    );
}

#[test]
fn wrong_credentials_are_reported_as_what_they_are() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("wrong");
    up.push(&img, "team/small:v1");
    let gw = Gateway::start(&anonymous_registry(
        "hub",
        &up,
        "default = true\ncredentials = { username = \"alice\", password = \"not-her-password\" }",
    ));
    let answer = request(
        "GET",
        &gw.url("/v2/team/small/manifests/v1"),
        &[("Accept", MANIFEST_ACCEPT)],
    );
    assert_eq!(answer.status, 403, "not masked as 404");
    assert_eq!(answer.oci_code().as_deref(), Some("DENIED"));
    let msg = answer.oci_message();
    assert!(
        msg.contains("\"hub\"") && msg.contains("credentials"),
        "{msg}"
    );
    assert!(!msg.contains("not-her-password"));
    // Keep-alive survives the error: a second request on the same client works.
    assert_eq!(get(&gw.url("/v2/")).status, 200);
}

/// An upstream whose tokens really expire after 2 s, an image on it, and pullgate in front.
fn two_second_tokens(seed: &str) -> (Upstream, TestImage, Gateway) {
    let opts = TokenIssuerOptions {
        ttl_secs: 2,
        cancel_registry_leeway: true,
        ..Default::default()
    };
    let up = Upstream::start(UpstreamOptions {
        auth: Auth::Token(opts),
        ..Default::default()
    });
    let img = TestImage::small(seed);
    up.push(&img, "team/small:v1");
    // tag_ttl = 0: every manifest request asks the upstream, with a token.
    let gw = Gateway::start(&registry("hub", &up, "default = true\ntag_ttl = \"0s\""));
    (up, img, gw)
}

#[test]
fn tokens_are_reused_then_refreshed_after_expiry() {
    let (up, img, gw) = two_second_tokens("expiry");
    up.issuer().clear_requests();

    let manifest = gw.url("/v2/team/small/manifests/v1");
    let head = || request("HEAD", &manifest, &[("Accept", MANIFEST_ACCEPT)]);
    assert_eq!(head().status, 200);
    assert_eq!(head().status, 200);
    let first = up.issuer().requests();
    assert_eq!(
        first.len(),
        1,
        "one token for two requests within its lifetime: {first:?}"
    );
    assert_eq!(
        first[0].basic_user.as_deref(),
        Some("alice"),
        "credentials injected"
    );
    assert!(first[0]
        .scopes
        .iter()
        .any(|s| s == "repository:team/small:pull"));

    // Let the token expire (this waits for time itself, not for readiness).
    std::thread::sleep(Duration::from_millis(2500));
    let answer = head();
    assert_eq!(answer.status, 200, "expired token replaced");
    assert_eq!(
        answer.header("docker-content-digest").as_deref(),
        Some(img.manifest_digest())
    );
    assert_eq!(up.issuer().requests().len(), 2, "a new token after expiry");
}

#[test]
fn expired_token_refused_upstream_is_refreshed_and_retried_once() {
    // The upstream refuses tokens after 2 s, but the issuer claims they last 300 s: pullgate's
    // cached token goes stale under it and the 401 path must recover.
    let (up, _img, gw) = two_second_tokens("refresh");
    up.issuer().set_send_expires_in(false); // pullgate assumes the spec default of 60 s
    let manifest = gw.url("/v2/team/small/manifests/v1");
    assert_eq!(
        request("HEAD", &manifest, &[("Accept", MANIFEST_ACCEPT)]).status,
        200
    );
    up.issuer().clear_requests();
    std::thread::sleep(Duration::from_millis(2500));
    let answer = request("GET", &manifest, &[("Accept", MANIFEST_ACCEPT)]);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        up.issuer().requests().len(),
        1,
        "refreshed once after the 401"
    );
}

#[test]
fn a_token_service_outage_is_a_clear_error_and_pulls_resume_after_it() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("token-outage");
    up.push(&img, "team/app:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let manifest = gw.url("/v2/team/app/manifests/v1");

    up.issuer().set_unavailable(true);
    let refused = request("GET", &manifest, &[("Accept", MANIFEST_ACCEPT)]);
    assert!(
        refused.status >= 500,
        "{}: {}",
        refused.status,
        String::from_utf8_lossy(&refused.body)
    );
    assert!(
        refused.oci_message().contains("\"hub\""),
        "names the registry: {}",
        refused.oci_message()
    );
    let metrics = String::from_utf8(crate::harness::get(&gw.admin_url("/metrics")).body).unwrap();
    assert!(
        metrics.contains(r#"pullgate_token_fetches_total{outcome="error",registry="hub"}"#),
        "{metrics}"
    );

    up.issuer().set_unavailable(false);
    let answer = request("GET", &manifest, &[("Accept", MANIFEST_ACCEPT)]);
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("docker-content-digest").as_deref(),
        Some(img.manifest_digest())
    );
}
