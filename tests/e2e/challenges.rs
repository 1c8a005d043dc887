//! No upstream challenge ever reaches a client: every route, pulls and pushes, anonymous and
//! logged in, against the real token upstream refusing pullgate's account. Headers and bodies
//! are searched for the upstream's token realm and its own address.

use crate::api::{basic, identity, send};
use crate::harness::{anonymous_registry, registry, Answer, Gateway, MANIFEST_ACCEPT};
use crate::support::{Auth, TokenIssuerOptions, Upstream, UpstreamOptions};

const CI_PASSWORD: &str = "ci-password";

/// Every registry API route for `repo` (under `prefix`), with a body where one is usual.
fn routes(prefix: &str, repo: &str) -> Vec<(&'static str, String, Vec<u8>)> {
    let d = format!("sha256:{}", "ab".repeat(32));
    let name = format!("{prefix}{repo}");
    let p = |tail: &str| format!("/v2/{name}/{tail}");
    vec![
        ("GET", "/v2/".into(), vec![]),
        ("GET", "/v2/_catalog".into(), vec![]),
        ("GET", p("manifests/v1"), vec![]),
        ("HEAD", p("manifests/v1"), vec![]),
        ("GET", p(&format!("manifests/{d}")), vec![]),
        ("HEAD", p(&format!("manifests/{d}")), vec![]),
        ("GET", p(&format!("blobs/{d}")), vec![]),
        ("HEAD", p(&format!("blobs/{d}")), vec![]),
        ("GET", p("tags/list"), vec![]),
        ("GET", p("tags/list?n=1"), vec![]),
        ("GET", p(&format!("referrers/{d}")), vec![]),
        ("POST", p("blobs/uploads/"), vec![]),
        (
            "POST",
            p(&format!("blobs/uploads/?mount={d}&from={name}-other")),
            vec![],
        ),
        ("PATCH", p("blobs/uploads/some-session"), b"chunk".to_vec()),
        (
            "PUT",
            p(&format!("blobs/uploads/some-session?digest={d}")),
            b"chunk".to_vec(),
        ),
        ("GET", p("blobs/uploads/some-session"), vec![]),
        ("DELETE", p("blobs/uploads/some-session"), vec![]),
        ("PUT", p("manifests/v1"), b"{\"schemaVersion\":2}".to_vec()),
        ("DELETE", p("manifests/v1"), vec![]),
        ("DELETE", p(&format!("manifests/{d}")), vec![]),
        ("DELETE", p(&format!("blobs/{d}")), vec![]),
    ]
}

/// Panics when an answer carries anything of the upstream's auth: its realm host, its own
/// address, a Bearer challenge.
fn assert_clean(what: &str, a: &Answer, realm_host: &str, upstream_host: &str) {
    for (name, value) in &a.headers {
        let v = value.to_str().unwrap_or("");
        assert!(
            !v.contains(realm_host) && !v.contains(upstream_host),
            "{what}: header {name}: {v}"
        );
        if name == "www-authenticate" {
            assert_eq!(v, "Basic realm=\"pullgate\"", "{what}");
        }
    }
    let body = String::from_utf8_lossy(&a.body);
    for needle in [realm_host, upstream_host, "realm=", "Bearer", "/token"] {
        assert!(
            !body.contains(needle),
            "{what}: body names {needle:?}: {body}"
        );
    }
}

#[test]
fn no_route_ever_hands_on_the_upstream_challenge() {
    // The upstream account may use `team/` only: everything else is refused upstream.
    let up = Upstream::start(UpstreamOptions {
        auth: Auth::Token(TokenIssuerOptions {
            restricted: vec![("alice".into(), "team/".into())],
            ..Default::default()
        }),
        ..Default::default()
    });
    let realm_host = format!("127.0.0.1:{}", up.issuer().port());
    let upstream_host = up.host_port();
    let gw = Gateway::start(&format!(
        "{}{}{}",
        identity("ci", CI_PASSWORD, &["pull", "push", "delete"]),
        registry("hub", &up, "default = true\npush = true\ndelete = true"),
        anonymous_registry(
            "anon",
            &up,
            "prefix = \"anon\"\nhosts = [\"anon.example\"]\npush = true\ndelete = true"
        ),
    ));
    let ci = basic("ci", CI_PASSWORD);
    let mut refused_upstream = 0;
    for (prefix, who) in [("", Some(ci.as_str())), ("", None), ("anon/", Some(&ci))] {
        for (method, path, body) in routes(prefix, "secret/app") {
            let mut headers = vec![("Accept", MANIFEST_ACCEPT)];
            if let Some(auth) = who {
                headers.push(("Authorization", auth));
            }
            if method == "PUT" && path.contains("/manifests/") {
                headers.push(("Content-Type", "application/vnd.oci.image.manifest.v1+json"));
            }
            let a = send(method, &gw.url(&path), &headers, body);
            let what = format!("{method} {path} (logged in: {})", who.is_some());
            assert_clean(&what, &a, &realm_host, &upstream_host);
            if path == "/v2/" {
                assert_eq!(a.status, 200, "{what}");
                continue;
            }
            if path.contains("_catalog") {
                assert_eq!(a.oci_code().as_deref(), Some("UNSUPPORTED"), "{what}");
                continue;
            }
            // Everything else reached the upstream (or, anonymous writes, policy) and was
            // refused: pullgate's own error naming the registry.
            let (status, code) = match who {
                Some(_) => (403, "DENIED"),
                None => (401, "UNAUTHORIZED"),
            };
            assert_eq!(
                a.status,
                status,
                "{what}: {}",
                String::from_utf8_lossy(&a.body)
            );
            if method != "HEAD" {
                assert_eq!(a.oci_code().as_deref(), Some(code), "{what}");
                let registry = if prefix.is_empty() { "hub" } else { "anon" };
                assert!(
                    a.oci_message().contains(registry),
                    "{what}: {}",
                    a.oci_message()
                );
            }
            refused_upstream += 1;
        }
    }
    assert!(refused_upstream > 40, "{refused_upstream}");
    // The proxy path really met the upstream's challenge (and converted it).
    let challenged_writes = up
        .requests()
        .iter()
        .filter(|r| matches!(r.method.as_str(), "PUT" | "PATCH" | "POST") && r.status == 401)
        .count();
    assert!(challenged_writes >= 6, "{challenged_writes}");
}
