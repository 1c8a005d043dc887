//! DELETE through pullgate: only with `delete = true` (else 405 before the upstream hears of
//! it), only for the `delete` role when identities exist, with a token scope that includes
//! `delete`, and the cache forgets what it held so the next request answers what the upstream
//! now says.

use crate::api::{basic, identity, send};
use crate::harness::{registry, request, Answer, Gateway, MANIFEST_ACCEPT};
use crate::support::{TestImage, Upstream, UpstreamOptions};

fn deletes_upstream(up: &Upstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count()
}

fn get(gw: &Gateway, method: &str, path: &str) -> Answer {
    request(method, &gw.url(path), &[("Accept", MANIFEST_ACCEPT)])
}

/// Upstream requests of `method` on paths containing `part` that answered `status`.
fn upstream_answers(up: &Upstream, method: &str, part: &str, status: u16) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.method == method && r.uri.contains(part) && r.status == status)
        .count()
}

#[test]
fn without_the_key_deletes_are_unsupported_and_never_reach_the_upstream() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("del-off");
    up.push(&img, "team/app:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true\npush = true"));
    let layer = &img.layer_digests()[0];
    for path in [
        "/v2/team/app/manifests/v1".to_string(),
        format!("/v2/team/app/manifests/{}", img.manifest_digest()),
        format!("/v2/team/app/blobs/{layer}"),
    ] {
        let a = send("DELETE", &gw.url(&path), &[], vec![]);
        assert_eq!(a.status, 405, "{path}");
        assert_eq!(a.oci_code().as_deref(), Some("UNSUPPORTED"), "{path}");
        assert!(
            a.oci_message().contains("registry.hub.delete"),
            "{}",
            a.oci_message()
        );
    }
    assert_eq!(deletes_upstream(&up), 0, "nothing reached the upstream");
    let audit = gw.audit_lines();
    let refused: Vec<_> = audit
        .iter()
        .filter(|l| l["action"] == "delete" && l["reason"] == "delete_disabled")
        .collect();
    assert_eq!(refused.len(), 3, "{audit:?}");
    // Still pullable: nothing was deleted.
    assert_eq!(get(&gw, "GET", "/v2/team/app/manifests/v1").status, 200);
}

#[test]
fn deletes_reach_the_upstream_with_a_delete_token_and_the_cache_forgets() {
    let up = Upstream::start(UpstreamOptions::default());
    let by_digest = TestImage::small("del-digest");
    let by_tag = TestImage::small("del-tag");
    let blob = TestImage::small("del-blob");
    up.push(&by_digest, "team/app:v1");
    up.push(&by_tag, "team/app:v2");
    up.push(&blob, "team/blobs:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true\ndelete = true"));

    // Warm the cache: tag, manifest by digest, a blob.
    let d1 = by_digest.manifest_digest();
    assert_eq!(get(&gw, "GET", "/v2/team/app/manifests/v1").status, 200);
    assert_eq!(
        get(&gw, "GET", &format!("/v2/team/app/manifests/{d1}")).status,
        200
    );
    assert_eq!(get(&gw, "GET", "/v2/team/app/manifests/v2").status, 200);
    let layer = blob.layer_digests()[0].clone();
    assert_eq!(get(&gw, "GET", "/v2/team/blobs/manifests/v1").status, 200);
    let fetched = get(&gw, "GET", &format!("/v2/team/blobs/blobs/{layer}"));
    assert_eq!(fetched.status, 200);

    // A manifest by digest: 202, then the next GETs ask the upstream and answer its 404.
    let deleted = send(
        "DELETE",
        &gw.url(&format!("/v2/team/app/manifests/{d1}")),
        &[],
        vec![],
    );
    assert_eq!(
        deleted.status,
        202,
        "{}",
        String::from_utf8_lossy(&deleted.body)
    );
    assert_eq!(upstream_answers(&up, "DELETE", d1, 202), 1);
    let gone = get(&gw, "GET", &format!("/v2/team/app/manifests/{d1}"));
    assert_eq!(gone.status, 404);
    assert_eq!(gone.oci_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    assert_eq!(
        upstream_answers(&up, "GET", &format!("/manifests/{d1}"), 404),
        1,
        "asked the upstream after the delete"
    );
    // distribution drops the tags of a deleted manifest: so does the tag cache.
    let tag = get(&gw, "GET", "/v2/team/app/manifests/v1");
    assert_eq!(tag.status, 404, "{}", String::from_utf8_lossy(&tag.body));
    assert_eq!(get(&gw, "HEAD", "/v2/team/app/manifests/v1").status, 404);

    // A tag: what the upstream answers (distribution 2.8 refuses tag deletes with 400
    // DIGEST_INVALID), and when it deletes, the tag cache forgets it.
    let untagged = send("DELETE", &gw.url("/v2/team/app/manifests/v2"), &[], vec![]);
    let direct = up
        .requests()
        .into_iter()
        .rfind(|r| r.method == "DELETE" && r.uri.ends_with("/manifests/v2"))
        .expect("the tag delete reached the upstream");
    assert_eq!(untagged.status, direct.status, "the upstream's answer");
    let after = get(&gw, "GET", "/v2/team/app/manifests/v2");
    if untagged.status == 202 {
        assert_eq!(after.status, 404, "the tag is gone");
    } else {
        assert_eq!(
            after.status, 200,
            "the tag was kept upstream: {}",
            untagged.status
        );
    }

    // A blob: the repository's confirmation is dropped; the upstream's 404 is the answer.
    let deleted = send(
        "DELETE",
        &gw.url(&format!("/v2/team/blobs/blobs/{layer}")),
        &[],
        vec![],
    );
    assert_eq!(
        deleted.status,
        202,
        "{}",
        String::from_utf8_lossy(&deleted.body)
    );
    let gone = get(&gw, "GET", &format!("/v2/team/blobs/blobs/{layer}"));
    assert_eq!(gone.status, 404);
    assert_eq!(gone.oci_code().as_deref(), Some("BLOB_UNKNOWN"));
    assert!(
        up.requests()
            .iter()
            .any(|r| r.method == "HEAD" && r.uri.contains(&layer) && r.status == 404),
        "the upstream was asked again"
    );

    // The token asked for `delete`; every delete is audited as one.
    let scopes: Vec<String> = up
        .issuer()
        .requests()
        .into_iter()
        .flat_map(|r| r.scopes)
        .collect();
    assert!(
        scopes.iter().any(|s| s == "repository:team/app:delete"),
        "{scopes:?}"
    );
    let audited = gw
        .audit_lines()
        .into_iter()
        .filter(|l| l["action"] == "delete" && l["decision"] == "allow")
        .count();
    assert_eq!(audited, 3);
}

#[test]
fn deletes_need_the_delete_role_when_identities_exist() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("del-roles");
    up.push(&img, "team/app:v1");
    let gw = Gateway::start(&format!(
        "{}{}{}",
        identity("puller", "puller-pw", &["pull", "push"]),
        identity("cleaner", "cleaner-pw", &["pull", "delete"]),
        registry("hub", &up, "default = true\ndelete = true\npush = true"),
    ));
    let path = format!("/v2/team/app/manifests/{}", img.manifest_digest());
    let anonymous = send("DELETE", &gw.url(&path), &[], vec![]);
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.oci_code().as_deref(), Some("UNAUTHORIZED"));
    assert_eq!(
        anonymous.header("www-authenticate").as_deref(),
        Some("Basic realm=\"pullgate\"")
    );
    let puller = basic("puller", "puller-pw");
    let refused = send(
        "DELETE",
        &gw.url(&path),
        &[("Authorization", &puller)],
        vec![],
    );
    assert_eq!(refused.status, 403);
    assert!(
        refused.oci_message().contains("delete role"),
        "{}",
        refused.oci_message()
    );
    assert_eq!(
        deletes_upstream(&up),
        0,
        "refused deletes never reach the upstream"
    );
    let cleaner = basic("cleaner", "cleaner-pw");
    let done = send(
        "DELETE",
        &gw.url(&path),
        &[("Authorization", &cleaner)],
        vec![],
    );
    assert_eq!(done.status, 202, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(
        upstream_answers(&up, "DELETE", img.manifest_digest(), 202),
        1
    );
    let reasons: Vec<String> = gw
        .audit_lines()
        .iter()
        .filter(|l| l["action"] == "delete")
        .map(|l| {
            format!(
                "{}:{}",
                l["decision"].as_str().unwrap_or(""),
                l["reason"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        reasons,
        ["deny:delete_needs_identity", "deny:missing_role", "allow:-"]
    );
}
