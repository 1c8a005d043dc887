//! Upstream failures become clear OCI errors naming the registry: unreachable, rate limited,
//! broken. A fake upstream is used only for what the real registry cannot be made to do.

use std::sync::Arc;

use crate::harness::{get, request, Gateway, MANIFEST_ACCEPT};
use crate::support::{free_port, resp, serve, Handler};

fn fake_upstream_registry(port: u16) -> String {
    format!(
        "[[registry]]\nname = \"flaky\"\nupstream = \"http://127.0.0.1:{port}\"\ndefault = true\n"
    )
}

#[test]
fn unreachable_upstream_is_502_naming_the_registry() {
    let closed = free_port();
    let gw = Gateway::start(&fake_upstream_registry(closed));
    let answer = request(
        "GET",
        &gw.url("/v2/team/app/manifests/v1"),
        &[("Accept", MANIFEST_ACCEPT)],
    );
    assert_eq!(answer.status, 502);
    assert_eq!(answer.oci_code().as_deref(), Some("UNAVAILABLE"));
    assert!(
        answer.oci_message().contains("\"flaky\""),
        "{}",
        answer.oci_message()
    );
    assert_eq!(get(&gw.url("/v2/")).status, 200, "gateway still answers");
}

#[test]
fn upstream_answers_become_oci_errors_naming_the_registry() {
    let handler: Handler = Arc::new(|req| {
        Box::pin(async move {
            if req.uri().path().contains("/huge/") {
                let body = vec![b' '; 5 * 1024 * 1024];
                resp(
                    200,
                    &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                    body,
                )
            } else if req.uri().path().contains("/limited/") {
                let body = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#;
                resp(
                    429,
                    &[("Retry-After", "7"), ("Content-Type", "application/json")],
                    body,
                )
            } else if req.uri().path().contains("/missing/") {
                let body =
                    r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
                resp(404, &[("Content-Type", "application/json")], body)
            } else {
                resp(503, &[], "down")
            }
        })
    });
    let fake = serve(None, handler);
    let gw = Gateway::start(&fake_upstream_registry(fake.addr.port()));

    let limited = get(&gw.url("/v2/limited/app/manifests/v1"));
    assert_eq!(limited.status, 429);
    assert_eq!(limited.oci_code().as_deref(), Some("TOOMANYREQUESTS"));
    assert_eq!(limited.header("retry-after").as_deref(), Some("7"));

    // Invariant 7: manifests are capped (4 MiB default), never buffered without bound.
    let huge = get(&gw.url("/v2/huge/app/manifests/v1"));
    assert_eq!(huge.status, 502);
    assert_eq!(huge.oci_code().as_deref(), Some("MANIFEST_INVALID"));
    assert!(
        huge.oci_message().contains("max_manifest_size"),
        "{}",
        huge.oci_message()
    );

    let missing = get(&gw.url("/v2/missing/app/manifests/v1"));
    assert_eq!(missing.status, 404);
    assert_eq!(missing.oci_code().as_deref(), Some("MANIFEST_UNKNOWN"));

    let blob = format!("/v2/broken/app/blobs/sha256:{}", "a".repeat(64));
    let broken = get(&gw.url(&blob));
    assert_eq!(broken.status, 502);
    assert!(
        broken.oci_message().contains("503"),
        "{}",
        broken.oci_message()
    );
}

#[test]
fn pagination_links_point_back_at_the_gateway_under_the_client_name() {
    let handler: Handler = Arc::new(|req| {
        Box::pin(async move {
            let ok =
                req.uri().query() == Some("n=2") && req.uri().path() == "/v2/library/app/tags/list";
            let link =
                r#"<https://upstream.example/v2/library/app/tags/list?last=b&n=2>; rel="next""#;
            let status = if ok { 200 } else { 400 };
            resp(
                status,
                &[("Link", link), ("Content-Type", "application/json")],
                r#"{"tags":["a","b"]}"#,
            )
        })
    });
    let fake = serve(None, handler);
    let gw = Gateway::start(&format!(
        "[[registry]]\nname = \"hub\"\nupstream = \"http://127.0.0.1:{}\"\nns = [\"docker.io\"]\nprefix = \"docker.io\"\nlibrary_namespace = true\n",
        fake.addr.port()
    ));
    let page = get(&gw.url("/v2/docker.io/app/tags/list?n=2"));
    assert_eq!(
        page.status, 200,
        "prefix stripped and name normalised upstream"
    );
    assert_eq!(
        page.header("link").as_deref(),
        Some(r#"</v2/docker.io/app/tags/list?last=b&n=2>; rel="next""#)
    );
    let page = get(&gw.url("/v2/app/tags/list?n=2&ns=docker.io"));
    assert_eq!(page.status, 200, "ns stripped from the upstream query");
    assert_eq!(
        page.header("link").as_deref(),
        Some(r#"</v2/app/tags/list?last=b&n=2>; rel="next""#)
    );
}
