//! One endpoint, four ways to name a registry: `?ns=` > Host > path prefix > default. Unknown
//! keys are NAME_UNKNOWN, never a new upstream.

use crate::harness::{registry, request, Gateway, MANIFEST_ACCEPT};
use crate::support::{skopeo_copy_to_oci, ClientTls, TestImage, Upstream, UpstreamOptions};

/// Two upstreams holding different images under the same name, so every answer shows which
/// registry served it.
struct TwoRegistries {
    _a: Upstream,
    _b: Upstream,
    img_a: TestImage,
    img_b: TestImage,
    gw: Gateway,
}

fn two_registries(default: bool) -> TwoRegistries {
    let a = Upstream::start(UpstreamOptions::default());
    let b = Upstream::start(UpstreamOptions::default());
    let img_a = TestImage::small("route-a");
    let img_b = TestImage::small("route-b");
    a.push(&img_a, "team/app:v1");
    b.push(&img_b, "team/app:v1");
    let registries = registry(
        "alpha",
        &a,
        &format!(
            "hosts = [\"private.alpha.test\"]\nns = [\"alpha.test\"]\nprefix = \"alpha.test\"\ndefault = {default}"
        ),
    ) + &registry("beta", &b, "hosts = [\"private.beta.test\"]\nns = [\"beta.test\", \"beta.test:5000\"]\nprefix = \"beta\"");
    let gw = Gateway::start(&registries);
    TwoRegistries {
        _a: a,
        _b: b,
        img_a,
        img_b,
        gw,
    }
}

fn digest_of(answer: &crate::harness::Answer) -> String {
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer
        .header("docker-content-digest")
        .expect("digest header")
}

#[test]
fn ns_host_prefix_and_default_each_route() {
    let t = two_registries(true);
    let gw = &t.gw;
    let (a, b) = (t.img_a.manifest_digest(), t.img_b.manifest_digest());
    let accept = ("Accept", MANIFEST_ACCEPT);

    // ns wins over everything, and is echoed.
    let by_ns = request(
        "GET",
        &gw.url("/v2/team/app/manifests/v1?ns=beta.test"),
        &[accept, ("Host", "private.alpha.test")],
    );
    assert_eq!(digest_of(&by_ns), b);
    assert_eq!(by_ns.header("oci-namespace").as_deref(), Some("beta.test"));
    let by_ns_port = request(
        "HEAD",
        &gw.url("/v2/team/app/manifests/v1?ns=beta.test:5000"),
        &[accept],
    );
    assert_eq!(digest_of(&by_ns_port), b);

    // Host, with and without a port, any case.
    let by_host = request(
        "GET",
        &gw.url("/v2/team/app/manifests/v1"),
        &[accept, ("Host", "Private.Beta.Test:443")],
    );
    assert_eq!(digest_of(&by_host), b);
    assert!(
        by_host.header("oci-namespace").is_none(),
        "echoed only when routed by ns"
    );

    // Prefix on a Host that names no registry.
    let by_prefix = request("GET", &gw.url("/v2/beta/team/app/manifests/v1"), &[accept]);
    assert_eq!(digest_of(&by_prefix), b);
    let by_prefix = request(
        "GET",
        &gw.url("/v2/alpha.test/team/app/manifests/v1"),
        &[accept],
    );
    assert_eq!(digest_of(&by_prefix), a);

    // Default for everything else.
    let by_default = request("GET", &gw.url("/v2/team/app/manifests/v1"), &[accept]);
    assert_eq!(digest_of(&by_default), a);

    // A real client through prefix routing.
    let got = skopeo_copy_to_oci(
        &format!("{}/beta/team/app:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("skopeo through a prefix");
    assert_eq!(got.manifest_digest, b);
}

#[test]
fn unknown_ns_host_and_prefix_are_name_unknown() {
    let t = two_registries(false);
    let gw = &t.gw;
    let accept = ("Accept", MANIFEST_ACCEPT);
    for ns in [
        "gamma.test",
        "https://evil.example",
        "127.0.0.1:22",
        "169.254.169.254",
        "..%2f..",
        "beta.test/x",
    ] {
        let url = format!(
            "{}?ns={}",
            gw.url("/v2/team/app/manifests/v1"),
            urlencode(ns)
        );
        let answer = request("GET", &url, &[accept]);
        assert_eq!(answer.status, 404, "ns {ns}");
        assert_eq!(
            answer.oci_code().as_deref(),
            Some("NAME_UNKNOWN"),
            "ns {ns}"
        );
    }
    let answer = request(
        "GET",
        &gw.url("/v2/team/app/manifests/v1"),
        &[accept, ("Host", "private.gamma.test")],
    );
    assert_eq!(answer.status, 404);
    assert_eq!(answer.oci_code().as_deref(), Some("NAME_UNKNOWN"));
    assert!(
        answer.oci_message().contains("private.gamma.test"),
        "names the host: {}",
        answer.oci_message()
    );
    let answer = request("GET", &gw.url("/v2/gamma/team/app/manifests/v1"), &[accept]);
    assert_eq!(answer.oci_code().as_deref(), Some("NAME_UNKNOWN"));
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[test]
fn tags_list_is_served_under_the_client_name() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("tags");
    for tag in ["a", "b", "c"] {
        up.push(&img, &format!("team/app:{tag}"));
    }
    let gw = Gateway::start(&registry("hub", &up, "prefix = \"hub\""));
    let page = request("GET", &gw.url("/v2/hub/team/app/tags/list"), &[]);
    assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
    let json: serde_json::Value = serde_json::from_slice(&page.body).expect("json");
    let mut tags: Vec<String> = serde_json::from_value(json["tags"].clone()).expect("tags");
    tags.sort();
    assert_eq!(tags, ["a", "b", "c"]);
}
